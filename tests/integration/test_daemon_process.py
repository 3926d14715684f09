"""The daemon as systemd runs it: a child process handed its listening socket through
LISTEN_FDS/LISTEN_FDNAMES exactly as systemd does it, READY/STATUS/STOPPING on a real
NOTIFY_SOCKET, a guest driver working through it, `vhostser ctl` against its admin socket,
SIGHUP reloading the config live, and SIGTERM closing every session with reason shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from .daemon_proc import notifications
from .procs import guest_echo

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[vm]
name = "act"
socket = "{tmp}/unused.sock"
max_ports = 4
state_dir = "{tmp}/state"
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}
{extra}
"""
EXTRA_PORT = """
[[port]]
id = 2
name = "org.test.added"
backend = { type = "null" }
"""


@dataclass
class Activated:
    proc: subprocess.Popen[bytes]
    tmp: Path
    vhost_path: str
    notify: socket.socket
    config: Path

    def notifications(self, want: str, timeout: float = 20) -> list[str]:
        """Datagrams received until one contains `want`."""
        return notifications(self.notify, want, timeout, self.stderr)

    def stderr(self) -> str:
        return (self.tmp / "stderr").read_text(errors="replace")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vhostser", "ctl", "--admin", str(self.tmp / "ctl.sock"),
             *args], capture_output=True, text=True, timeout=30, cwd=ROOT,
        )


@pytest.fixture
def activated() -> Iterator[Activated]:
    tmp = Path(tempfile.mkdtemp(prefix="vhs-act-"))
    config = tmp / "act.toml"
    config.write_text(CONFIG.format(tmp=tmp, extra=""))
    # What systemd does for vhostser@act.socket: it binds and listens, then starts the
    # service with the socket as fd 3, LISTEN_FDS=1, LISTEN_FDNAMES=vhost-user, and
    # LISTEN_PID set to the service's own pid (here: bash's $$, which exec keeps).
    vhost_path = str(tmp / "act.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(vhost_path)
    listener.listen(8)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify"), LISTEN_FDS="1",
               LISTEN_FDNAMES="vhost-user")
    script = (f'exec 3<&{listener.fileno()}; LISTEN_PID=$$ exec "$0" -m vhostser run '
              f'--config "$1" --log-level debug')
    with open(tmp / "stderr", "wb") as err:
        proc = subprocess.Popen(
            ["bash", "-c", script, sys.executable, str(config)], env=env, cwd=ROOT,
            pass_fds=(listener.fileno(),), stdout=subprocess.DEVNULL, stderr=err,
        )
    listener.close()  # the daemon holds the only copy now, as with systemd's hand-over
    a = Activated(proc, tmp, vhost_path, notify, config)
    try:
        yield a
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_socket_activation_notify_ctl_reload_and_shutdown(activated: Activated) -> None:
    a = activated
    ready = a.notifications("READY=1")
    assert any("STATUS=serving 1 ports" in n for n in ready), ready
    assert "socket-activated (vhost-user)" in a.stderr()
    assert not os.path.exists(a.tmp / "unused.sock")  # it did not bind its own socket

    # A guest works through the socket systemd handed over.
    payload = os.urandom(200_000)
    assert trio.run(guest_echo, a.vhost_path, payload) == payload

    # ctl, human and --json; the front end has gone, the session stays for the grace period.
    r = a.ctl("ports")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["ID", "NAME", "CONSOLE", "BACKEND", "STATE",
                                                 "SESSION", "ENDPOINT"]
    ports = json.loads(a.ctl("--json", "ports").stdout)
    assert [(p["id"], p["name"], p["session"]) for p in ports] == [(1, "org.test.echo", 1)]
    stats = json.loads(a.ctl("--json", "stats").stdout)
    assert stats["ports"]["1"]["bytes_from_guest"] == len(payload)
    metrics = a.ctl("metrics").stdout
    assert (f'vhostser_port_bytes_total{{vm="act",port="1",name="org.test.echo",'
            f'direction="to_guest"}} {len(payload)}') in metrics
    status = json.loads(a.ctl("--json", "status").stdout)
    assert status["vm"] == "act" and status["frontend_connected"] is False

    # add-port / remove-port / close-session, and their errors.
    r = a.ctl("add-port", "--id", "3", "--name", "org.test.hot", "--backend", "null")
    assert r.returncode == 0, r.stderr
    r = a.ctl("add-port", "--id", "3", "--name", "x", "--backend", "null")
    assert r.returncode == 1 and "port 3 exists" in r.stderr
    r = a.ctl("add-port", "--id", "9", "--backend", "null")
    assert r.returncode == 1 and "port.id: expected an integer in 0..3, got 9" in r.stderr
    assert a.ctl("remove-port", "3").returncode == 0
    r = a.ctl("close-session", "1")
    assert r.returncode == 0, r.stderr
    assert "closed: host-close" in a.stderr()
    assert a.ctl("close-session", "1").returncode == 1  # no session any more

    # SIGHUP: the edited config adds a port live.
    a.config.write_text(CONFIG.format(tmp=a.tmp, extra=EXTRA_PORT))
    a.proc.send_signal(signal.SIGHUP)
    reloaded = a.notifications("STATUS=config reloaded")
    assert any(n.startswith("RELOADING=1") for n in reloaded), reloaded
    names = [p["name"] for p in json.loads(a.ctl("--json", "ports").stdout)]
    assert names == ["org.test.echo", "org.test.added"]

    # SIGTERM: STOPPING=1, exit 0, state saved with the session ids.
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(20) == 0, a.stderr()
    assert any("STOPPING=1" in n for n in a.notifications("STOPPING=1"))
    state = json.loads((a.tmp / "state" / "state.json").read_text())
    assert state["ports"]["1"]["next_session_id"] == 2


def test_watchdog_pings(tmp_path: Path) -> None:
    config = tmp_path / "wd.toml"
    config.write_text(f'[vm]\nsocket = "{tmp_path}/vu.sock"\n[[port]]\nid = 1\n'
                      'backend = { type = "null" }\n')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "n"))
    notify.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "n"), WATCHDOG_USEC="200000")
    proc = subprocess.Popen([sys.executable, "-m", "vhostser", "run", "--config", str(config)],
                            env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        got = [notify.recv(4096).decode() for _ in range(4)]
        assert sum("WATCHDOG=1" in g for g in got) >= 2, got
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        notify.close()


def test_metrics_http_listener(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port on loopback for the daemon to take
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "m.toml"
    config.write_text(f'[vm]\nname = "m"\nsocket = "{tmp_path}/vu.sock"\n'
                      f'metrics_listen = "127.0.0.1:{port}"\n'
                      '[[port]]\nid = 1\nname = "org.test.null"\nbackend = { type = "null" }\n')
    proc = subprocess.Popen([sys.executable, "-m", "vhostser", "run", "--config", str(config)],
                            cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        with conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Type: text/plain; version=0.0.4" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b'vhostser_port_session_open{vm="m",port="1",name="org.test.null"} 0' in body
        with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
            other.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert other.recv(100).startswith(b"HTTP/1.1 404")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
