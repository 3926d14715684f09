"""The daemon process against what used to kill it or lose state: a backend raising, floods
of connections, deeply nested input, signals at awkward moments, a front end reconnecting at
once, sockets in directories others control, admin requests naming paths they should not.
Each test drives a real daemon process over its real sockets and signals."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from vhostser import admin
from vhostser.admin import MAX_CONNECTIONS
from vhostser.backends.framing import FrameDecoder, Open
from vhostser.testing import FrontEndError, open_frontend

from .daemon_proc import ROOT, DaemonProcess, daemon_process, guest_echo, running_guest

ECHO_PORT = """
[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}
"""


def vm_config(vm: str = "", *, socket: str = "{tmp}/vu.sock",
              admin: str | None = "{tmp}/ctl.sock", ports: str = ECHO_PORT) -> str:
    """A config for daemon_process: VM "hard" with `vm` lines in [vm] and an echo port."""
    lines = ['[vm]', 'name = "hard"', f'socket = "{socket}"']
    if admin is not None:
        lines.append(f'admin_socket = "{admin}"')
    return "\n".join([*lines, vm, ports])


async def _console_then_echo(path: str, console_writes: int) -> bytes:
    """A guest that writes to its console `console_writes` times, then echoes through port
    1; what came back."""
    async with running_guest(path) as driver:
        console = await driver.wait_port(0)
        for i in range(console_writes):
            await console.write_all(b"console line %d\n" % i)
            await trio.sleep(0.05)  # let the restarted backend fail again: several rounds
    return await guest_echo(path, b"still echoing")


# ------------------------------------------------------------------ A: backend containment


def test_stdout_backend_whose_reader_went_away_affects_only_its_port(tmp_path: Path) -> None:
    """The embedded default's console backend writes to stdout; with its reader gone it
    used to raise BrokenPipeError from guest_data. Now it counts what it cannot write (and
    were it to raise, the containment rule would take only its port). Only port 0 notices."""
    stdout_port = '[[port]]\nid = 0\nconsole = true\nbackend = {{ type = "stdout" }}\n'
    config = vm_config(ports=ECHO_PORT + stdout_port)
    with daemon_process(tmp_path, config, stdout=subprocess.PIPE) as d:
        assert d.proc.stdout is not None
        d.proc.stdout.close()  # the reader goes away
        d.ready()
        assert trio.run(_console_then_echo, str(tmp_path / "vu.sock"), 10) == b"still echoing"
        stats = d.ctl_json("stats")
        console = stats["ports"]["0"]
        written = sum(len(b"console line %d\n" % i) for i in range(10))
        # Every console byte is accounted: taken by the backend, which counts it dropped.
        assert console["bytes_from_guest"] == written
        backend = console["backend"]
        assert backend["bytes_written"] + backend["bytes_dropped"] == written
        assert backend["bytes_dropped"] > 0
        assert console["backend_failures"] == stats["device"]["backend_failures"] == 0
        assert console["ledger"]["from_guest"]["balanced"], console["ledger"]
        assert stats["ports"]["1"]["backend_failures"] == 0
        assert d.stop() == 0


# ------------------------------------------------------------------ helpers


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def admin_line(path: str, line: bytes) -> dict[str, object]:
    """One raw request line on the admin socket and its response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(line)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, f"no response, got {buf!r}"
            buf += chunk
    response: dict[str, object] = json.loads(buf)
    return response


async def _realize(path: str) -> int:
    """A front end that connects and realizes the device: the features it was offered."""
    async with open_frontend(path) as fe:
        await fe.realize(10)
        return fe.device_features


def realizes(path: str) -> bool:
    return trio.run(_realize, path) != 0


def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------ B: connection floods

def test_a_flood_of_idle_connections_leaves_the_daemon_serving(tmp_path: Path) -> None:
    """Idle connections to the admin socket (beyond its cap of 64) and to the metrics port
    (until the daemon runs out of fds: RLIMIT_NOFILE lowered to 128) neither kill the daemon
    nor keep it from serving once they are gone."""
    port = free_tcp_port()

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    held: list[socket.socket] = []
    config = vm_config(f'metrics_listen = "127.0.0.1:{port}"')
    with daemon_process(tmp_path, config, preexec_fn=few_fds) as d:
        d.ready()
        try:
            for _ in range(100):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(s)
                s.setblocking(False)
                # The backlog is full until the daemon accepts (or refuses) the earlier ones.
                until(lambda s=s: s.connect_ex(d.admin) == 0, "the daemon takes a connection")
            d.wait_log("admin socket: connection refused: 64 connections open")
            emfile = "metrics listener: accept failed: Too many open files"
            for _ in range(300):
                s = socket.socket()
                held.append(s)
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                select.select([], [s], [], 0.2)  # a moment for the handshake
                if emfile in d.stderr():
                    break
            d.wait_log(emfile)
            assert d.proc.poll() is None
        finally:
            for s in held:
                s.close()
        until(lambda: d.ctl("status").returncode == 0, "ctl status answers again")
        assert realizes(str(tmp_path / "vu.sock"))  # the vhost-user socket still accepts
        listeners = d.ctl_json("stats")["listeners"]
        assert listeners["admin"]["refused_busy"] >= 100 - MAX_CONNECTIONS
        assert listeners["metrics"]["accept_errors"] >= 1
        assert listeners["vhost-user"]["accepted"] == 1
        metrics = d.ctl("metrics").stdout
        assert ('vhostser_listener_connections_total{vm="hard",listener="admin",'
                'outcome="refused-busy"}') in metrics
        assert d.stop() == 0


# ------------------------------------------------------------------ C: nesting, bad bytes

def test_deep_nesting_and_bad_bytes_get_errors_not_a_dead_daemon(tmp_path: Path) -> None:
    with daemon_process(tmp_path, vm_config()) as d:
        d.ready()
        reply = admin_line(d.admin, b"[" * 60_000 + b"\n")
        assert reply == {"ok": False, "error": "not JSON: nested 60000 deep, more than 32"}
        assert admin_line(d.admin, b'{"cmd": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]'
                                   b']]]]]]]]]]]]]]]]]]]]]]]]]}\n')["ok"] is False
        before = d.ctl_json("ports")

        # SIGHUP with a config file nested 5,000 deep: the running config stays.
        d.config.write_text(vm_config().format(tmp=tmp_path) + "[extra]\nx = " + "[" * 5000
                            + "]" * 5000 + "\n")
        d.proc.send_signal(signal.SIGHUP)
        d.notifications("STATUS=config reloaded")
        assert (f"reload failed, keeping the running config: {d.config}: arrays or tables "
                "nested too deeply") in d.stderr()

        # ... and with one that is not UTF-8.
        d.config.write_bytes(vm_config().format(tmp=tmp_path).encode() + b"# caf\xe9\n")
        d.proc.send_signal(signal.SIGHUP)
        d.notifications("STATUS=config reloaded")
        assert (f"reload failed, keeping the running config: {d.config}: not UTF-8 (as TOML "
                "must be): byte 0xe9 at offset") in d.stderr()
        assert d.ctl_json("ports") == before
        assert "Traceback" not in d.stderr()
        assert d.stop() == 0

    # Started on such files, the daemon and `vhostser check` say so in one line.
    for name, content in (("deep.toml", b"x = " + b"[" * 5000 + b"]" * 5000),
                          ("latin1.toml", b"# caf\xe9\n")):
        path = tmp_path / name
        path.write_bytes(content)
        for command in ("run", "check"):
            args = ["run", "--config", str(path)] if command == "run" else ["check", str(path)]
            r = subprocess.run([sys.executable, "-m", "vhostser", *args], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
            # Every start-up failure: one line; `run` exits EX_CONFIG (not restarted).
            assert r.returncode == (78 if command == "run" else 1), r
            line = r.stderr.removeprefix("vhostser: ")  # `run` names itself, as CLIs do
            assert r.stderr.count("\n") == 1 and line.startswith(f"{path}: "), r.stderr


# ------------------------------------------------------------------ D: state at SIGTERM

FRAMED = vm_config('state_dir = "{tmp}/state"', ports="""
[[port]]
id = 1
name = "org.test.framed"
backend = {{ type = "unix", path = "{tmp}/framed.sock", mode = "framed" }}
""")


async def _open_twice_then_sigterm(d: DaemonProcess) -> int:
    """The guest opens, closes and opens again port 1 (session 2); while its QEMU is still
    connected, the daemon gets SIGTERM. The daemon's exit status."""
    async with running_guest(d.tmp / "vu.sock") as driver:
        port = await driver.wait_port("org.test.framed")
        await port.open()
        await port.close()
        await port.open()

        def session_two() -> bool:
            return [s["session"] for s in d.ctl_json("sessions")] == [2]

        with trio.fail_after(20):
            while not await trio.to_thread.run_sync(session_two):
                await trio.sleep(0.02)
        d.proc.send_signal(signal.SIGTERM)
        return await trio.to_thread.run_sync(d.proc.wait, 20)


def test_sigterm_with_qemu_connected_keeps_the_open_session_for_the_next_daemon(
    tmp_path: Path,
) -> None:
    with daemon_process(tmp_path, FRAMED) as d:
        d.ready()
        assert trio.run(_open_twice_then_sigterm, d) == 0
        assert "port 1 'org.test.framed': session 2 closed: shutdown" in d.stderr()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["ports"]["1"] == {"guest_open": True, "session_id": 2, "next_session_id": 3}

    # The next daemon replays the open session to its backend: a framed peer hears OPEN(2).
    with daemon_process(tmp_path, FRAMED, name="next") as d2:
        d2.ready()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.settimeout(10)
            until(lambda: (tmp_path / "framed.sock").exists(), "the framed socket is there")
            peer.connect(str(tmp_path / "framed.sock"))
            decoder = FrameDecoder(accept_open=True)
            frames: list[object] = []
            while not frames:
                chunk = peer.recv(4096)
                assert chunk, "the framed backend hung up"
                decoder.feed(chunk)
                frames.extend(decoder)
        assert frames[0] == Open(2, "org.test.framed")
        assert "port 1 'org.test.framed': session 2 restored (guest had it open)" in d2.stderr()
        assert d2.stop() == 0


# ------------------------------------------------------------------ E: early SIGHUP


def _sighup_blocked(pid: int) -> bool:
    """Whether process `pid` blocks SIGHUP: `vhostser run`'s first act."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    blocked = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(int(blocked.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_sighup_during_start_up_is_applied_once_ready(tmp_path: Path) -> None:
    """SIGHUP the moment `vhostser run` has begun (and at later points of its start-up): the
    daemon neither dies nor drops it; it reloads once it is ready."""
    for i, delay in enumerate((0.0, 0.0, 0.0, 0.01, 0.03, 0.1, 0.2)):
        with daemon_process(tmp_path, vm_config(), name=f"hup{i}") as d:
            until(lambda d=d: _sighup_blocked(d.proc.pid) or d.proc.poll() is not None,
                  "vhostser run blocked SIGHUP")
            time.sleep(delay)
            d.proc.send_signal(signal.SIGHUP)
            d.ready()
            d.wait_log("reload: added [], removed [], changed []")
            assert d.proc.poll() is None
            assert d.ctl("status").returncode == 0
            if delay == 0.0:
                assert "SIGHUP during start-up: reloading now that the daemon is ready" in (
                    d.stderr())
            assert d.stop() == 0


# ------------------------------------------------------------------ F: immediate reconnects


async def _reconnect_at_once(path: str, times: int) -> int:
    """A guest opens port 1; then its QEMU goes and comes back `times` times in a row, each
    time at once. How many of those connections the daemon served."""
    assert await guest_echo(path, b"ping") == b"ping"
    served = 0
    for _ in range(times):
        try:
            await _realize(path)
        except FrontEndError:
            continue
        served += 1
    return served


def test_a_front_end_reconnecting_at_once_is_taken_every_time(tmp_path: Path) -> None:
    with daemon_process(tmp_path, vm_config()) as d:
        d.ready()
        assert trio.run(_reconnect_at_once, str(tmp_path / "vu.sock"), 20) == 20
        assert "refusing a second front-end connection" not in d.stderr()
        assert d.ctl_json("sessions") == [
            {"port": 1, "name": "org.test.echo", "session": 1, "state": "A",
             "state_name": "open (guest+host)", "restored": False}]
        assert d.ctl_json("status")["connections"] == 21

        # A second front end while the first is really there is still refused.
        async def two_at_once() -> None:
            async with open_frontend(tmp_path / "vu.sock") as first:
                await first.realize(10)
                with pytest.raises(FrontEndError):
                    await _realize(str(tmp_path / "vu.sock"))

        trio.run(two_at_once)
        assert ("refusing a second front-end connection (the first one is still there)"
                in d.stderr())
        assert d.stop() == 0


# ------------------------------------------------------------------ G: socket security

def start_failure(tmp: Path, config: str, name: str) -> str:
    """Start a daemon that must refuse to start: its one-line error."""
    with daemon_process(tmp, config, name=name) as d:
        assert d.proc.wait(20) == 1, d.stderr()
        # Foreground lines start with a timestamp (`vhostser run` in a terminal).
        errors = [line for line in d.stderr().splitlines() if " ERROR " in f" {line}"]
        assert len(errors) == 1, d.stderr()
        assert "Traceback" not in d.stderr()
        return errors[0]


def test_socket_directories_others_control_are_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    theirs = tmp_path / "theirs"
    theirs.mkdir(0o755)
    os.chown(theirs, 65534, 65534)
    sticky = tmp_path / "sticky"  # like /tmp: anyone may add entries, only owners remove them
    sticky.mkdir()
    sticky.chmod(0o1777)
    (tmp_path / "real").mkdir(0o700)
    (sticky / "link").symlink_to(tmp_path / "real")
    os.lchown(sticky / "link", 65534, 65534)  # a symlink another user planted
    (open_dir / "link").symlink_to(tmp_path / "real")

    def config(where: str) -> str:
        return vm_config(socket=f"{{tmp}}/{where}/vu.sock", admin=None)

    line = start_failure(tmp_path, config("open"), "open")
    assert (f"cannot listen on {open_dir}/vu.sock: {open_dir}: writable by others (mode "
            "0777): another user could swap the socket") in line
    line = start_failure(tmp_path, config("theirs"), "theirs")
    assert (f"cannot listen on {theirs}/vu.sock: {theirs}: owned by uid 65534, not by this "
            f"user (uid {os.geteuid()}) or root") in line
    line = start_failure(tmp_path, config("sticky/link"), "sticky")
    assert (f"{sticky}/link: a symlink owned by uid 65534 (not this user, uid "
            f"{os.geteuid()}, nor root) in {sticky}, which others can write") in line
    line = start_failure(tmp_path, config("open/link"), "openlink")
    assert (f"{open_dir}/link: its directory {open_dir} is writable by others (mode 0777, "
            "not sticky): anyone could replace it") in line
    line = start_failure(tmp_path, vm_config(socket="{tmp}/real/vu.sock",
                                             admin="{tmp}/open/ctl.sock"), "admin")
    assert f"cannot listen: {open_dir}: writable by others (mode 0777)" in line
    for where in ("open", "theirs"):
        assert not (tmp_path / where / "vu.sock").exists()
    assert not (open_dir / "ctl.sock").exists()

    # A directory the daemon makes itself is 0700, its socket 0600: QEMU of this user only.
    with daemon_process(tmp_path, config("made/here")) as d:
        d.ready()
        assert (tmp_path / "made").stat().st_mode & 0o7777 == 0o700
        assert (tmp_path / "made/here").stat().st_mode & 0o7777 == 0o700
        assert (tmp_path / "made/here/vu.sock").stat().st_mode & 0o777 == 0o600
        assert d.stop() == 0


PEER_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(bytes([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]))  # GET_FEATURES, version 1
    print(len(s.recv(100)))  # 0: hung up on, without an answer
except (BrokenPipeError, ConnectionResetError):
    print(0)
"""


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def test_peer_credentials_allow_list(tmp_path: Path) -> None:
    """A socket open to a group (socket_group, socket_mode) with allow_uids: a process of
    another user in that group reaches the socket but is refused at accept; ours is served."""
    tmp = Path(tempfile.mkdtemp(prefix="vhs-peer-"))  # outside pytest's 0700 directories
    try:
        tmp.chmod(0o711)
        config = vm_config("socket_mode = 0o660\nsocket_group = 65534\nallow_uids = [4242]",
                           socket="{tmp}/run/vu.sock")
        with daemon_process(tmp, config) as d:
            d.ready()
            sock = tmp / "run/vu.sock"
            assert (tmp / "run").stat().st_mode & 0o7777 == 0o710
            assert (tmp / "run").stat().st_gid == 65534
            assert sock.stat().st_mode & 0o777 == 0o660 and sock.stat().st_gid == 65534
            r = subprocess.run(["/usr/bin/python3", "-c", PEER_SCRIPT, str(sock)],
                               preexec_fn=as_nobody, capture_output=True, text=True,
                               timeout=30)
            assert (r.returncode, r.stdout) == (0, "0\n"), r  # connected, then hung up on
            d.wait_log("vhost-user socket: refused a connection from uid 65534 gid 65534 "
                       "(pid ")
            assert realizes(str(sock))  # the daemon's own user is always let in
            vhost_user = d.ctl_json("stats")["listeners"]["vhost-user"]
            assert (vhost_user["refused_peer"], vhost_user["accepted"]) == (1, 1)
            assert d.stop() == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ H: what admin may name

CONFINED = vm_config('state_dir = "{tmp}/state"\nmax_ports = 8', socket="{tmp}/run/vu.sock",
                     admin="{tmp}/run/ctl.sock", ports="")


def test_admin_add_port_may_name_only_allowed_paths_and_loopback(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "state").mkdir()
    with daemon_process(tmp_path, CONFINED, admin="run/ctl.sock") as d:
        d.ready()
        (tmp_path / "run" / "link").symlink_to(victim)
        rule = f"is not inside a directory admin requests may name ({tmp_path}/state, " \
               f"{tmp_path}/run; [vm] allowed_dirs)"

        def add(pid: int, backend: dict[str, object]) -> dict[str, Any]:
            return admin.request(d.admin, {"cmd": "add-port", "port": {
                "id": pid, "name": f"org.test.{pid}", "backend": backend}})

        refused = [
            ({"type": "file", "path": str(victim), "append": False}, "path", str(victim)),
            ({"type": "file", "path": f"{tmp_path}/run/../victim", "append": False}, "path",
             f"{tmp_path}/run/../victim"),
            ({"type": "file", "path": f"{tmp_path}/run/link", "append": False}, "path",
             f"{tmp_path}/run/link"),
            ({"type": "file", "path": "victim"}, "path", "victim"),
            ({"type": "pty", "link": f"{tmp_path}/elsewhere/console"}, "link",
             f"{tmp_path}/elsewhere/console"),
            ({"type": "unix", "path": f"{tmp_path}/x.sock"}, "path", f"{tmp_path}/x.sock"),
            ({"type": "unix", "path": "/run/docker.sock", "role": "client"}, "path",
             "/run/docker.sock"),
            ({"type": "console", "socket": f"{tmp_path}/run/c.sock",
              "path": f"{tmp_path}/c.log"}, "path", f"{tmp_path}/c.log"),
        ]
        for backend, key, path in refused:
            reply = add(2, backend)
            assert reply == {"ok": False, "error": f"admin request: port.backend.{key}: "
                                                   f"{path!r} {rule}"}, (backend, reply)
        for host in ("0.0.0.0", "::", "10.0.0.1", "example.org"):
            reply = add(2, {"type": "tcp", "host": host, "port": 0})
            assert reply == {"ok": False, "error": (
                f"admin request: port.backend.host: {host!r}: admin requests may listen on "
                "loopback only (127.0.0.0/8, ::1, localhost) unless [vm] allow_remote_bind = "
                "true")}, reply
        assert victim.read_text() == "precious\n"
        assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x.sock").exists()
        assert [p["id"] for p in d.ctl_json("ports")] == []

        # Inside the allowed directories, and on loopback, the same requests work.
        assert add(2, {"type": "file", "path": f"{tmp_path}/state/serial.log",
                       "append": False})["ok"]
        assert add(3, {"type": "unix", "path": f"{tmp_path}/run/agent.sock"})["ok"]
        assert add(4, {"type": "pty", "link": f"{tmp_path}/run/console"})["ok"]
        assert add(5, {"type": "tcp", "host": "127.0.0.1", "port": 0})["ok"]
        assert add(6, {"type": "tcp", "host": "0.0.0.0", "port": 1, "role": "client"})["ok"]
        until(lambda: (tmp_path / "state/serial.log").exists()
              and (tmp_path / "run/agent.sock").exists(), "the allowed ports are up")
        assert d.stop() == 0


# ------------------------------------------------------------------ backend sockets

BACKEND_SOCKETS = vm_config("allow_uids = [4242]", socket="{tmp}/run/vu.sock", ports="""
[[port]]
id = 0
console = true
[port.backend]
type = "console"
socket = "{tmp}/peers/console.sock"
socket_mode = 0o660
socket_group = 65534

[[port]]
id = 1
name = "org.test.private"
backend = {{ type = "unix", path = "{tmp}/run/private.sock" }}

[[port]]
id = 2
name = "org.test.shared"
[port.backend]
type = "unix"
path = "{tmp}/peers/shared.sock"
socket_mode = 0o660
socket_group = 65534

[[port]]
id = 3
name = "org.test.nobody"
[port.backend]
type = "unix"
path = "{tmp}/peers/nobody.sock"
socket_mode = "0660"
socket_group = "nogroup"
allow_uids = ["nobody"]
""")

# Sends stdin (after one greeting byte from the guest, with "greeted"), then prints what
# comes back (at most argv[2] bytes) until EOF.
PEER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
got = b""
try:
    if sys.argv[3] == "greeted" and not s.recv(1):
        sys.exit(0)
    s.sendall(sys.stdin.buffer.read())
    while len(got) < int(sys.argv[2]) and (chunk := s.recv(65536)):
        got += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
sys.stdout.buffer.write(got)
"""


async def nobody_peer(path: Path, send: bytes, want: int, *, greeted: bool = False) -> bytes:
    """What a process of uid/gid 65534 connected to `path` got back for `send` (b"": hung
    up on); it fails on a timeout, when it was let in and nothing came."""
    r = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["/usr/bin/python3", "-c", PEER, str(path), str(want),
         "greeted" if greeted else "at-once"],
        input=send, preexec_fn=as_nobody, capture_output=True, timeout=30))
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def metric(metrics: str, name: str, port: int) -> int:
    found = re.findall(rf'^vhostser_{name}\{{vm="hard",port="{port}",[^}}]*\}} (\d+)$',
                       metrics, re.M)
    assert len(found) == 1, (name, port, metrics)
    return int(found[0])


async def _backend_sockets(d: DaemonProcess) -> None:
    peers = d.tmp / "peers"
    backend = lambda pid: d.ctl_json("stats")["ports"][str(pid)]["backend"]  # noqa: E731
    async with running_guest(d.tmp / "run/vu.sock") as driver:
        shared, mine, console = [await driver.wait_port(name) for name in
                                 ("org.test.shared", "org.test.nobody", 0)]
        # Another user who may reach the socket (its group), not in the allow list: hung up
        # on; the bytes it sent go nowhere, it is no peer and takes no place (max_peers 1).
        assert await nobody_peer(peers / "shared.sock", b"intruder", 1) == b""
        assert backend(2)["peers_not_allowed"] == 1
        assert (backend(2)["peers_accepted"], backend(2)["bytes_from_peers"]) == (0, 0)
        assert not shared.host_connected
        d.wait_log("org.test.shared': unix:" f"{peers}/shared.sock: refused a connection "
                   "from uid 65534 gid 65534 (pid ")
        # The daemon's own user is let in, and is the peer, byte-exact both ways.
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(peers / "shared.sock"))
        await driver.wait_for(lambda: shared.host_connected)
        await shared.open()
        up, down = random.Random(1).randbytes(200_000), random.Random(2).randbytes(300_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, peer.sendall, up)
            assert await shared.read_exactly(len(up), timeout=20) == up
        await shared.write_all(down)
        got = bytearray()
        while len(got) < len(down):
            got += await trio.to_thread.run_sync(peer.recv, 65536)
        assert got == down
        peer.close()
        assert backend(2)["peers_accepted"] == 1

        # A backend's own allow list replaces the VM's: uid 65534 is a peer of port 3.
        async def guest_side() -> None:
            await driver.wait_for(lambda: mine.host_connected, timeout=20)
            await mine.open()
            await mine.write_all(b"!")  # the peer's bytes are taken from now on
            assert await mine.read_exactly(len(up), timeout=20) == up
            await mine.write_all(down)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest_side)
            assert await nobody_peer(peers / "nobody.sock", up, len(down),
                                     greeted=True) == down
        assert (backend(3)["peers_accepted"], backend(3)["peers_not_allowed"]) == (1, 0)

        # The console's readers: the VM's list keeps uid 65534 out; ours reads the console.
        assert await nobody_peer(peers / "console.sock", b"", 1) == b""
        reader = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        reader.connect(str(peers / "console.sock"))
        await console.write_all(b"login: ")
        reader.settimeout(10)
        assert await trio.to_thread.run_sync(reader.recv, 100) == b"login: "
        reader.close()
        assert (backend(0)["readers_not_allowed"], backend(0)["readers_accepted"]) == (1, 1)


def test_backend_sockets_are_private_unless_opened_and_check_their_peers() -> None:
    """Backend sockets are 0600 unless socket_mode/socket_group open them to a group; the
    VM's allow_uids keep other users out of the unix and console backends' sockets too (a
    refusal counted in ctl stats and the metrics), a backend's own list replaces the VM's;
    the peers let in are served byte-exact."""
    tmp = Path(tempfile.mkdtemp(prefix="vhs-backend-"))  # outside pytest's 0700 directories
    try:
        tmp.chmod(0o711)
        with daemon_process(tmp, BACKEND_SOCKETS) as d:
            d.ready()
            until(lambda: (tmp / "peers/nobody.sock").exists()
                  and (tmp / "run/private.sock").exists(), "the backends listen")
            modes = {name: ((tmp / name).stat().st_mode & 0o7777, (tmp / name).stat().st_gid)
                     for name in ("run", "run/private.sock", "peers", "peers/shared.sock",
                                  "peers/nobody.sock", "peers/console.sock")}
            assert modes == {"run": (0o700, 0), "run/private.sock": (0o600, 0),
                             "peers": (0o710, 65534), "peers/shared.sock": (0o660, 65534),
                             "peers/nobody.sock": (0o660, 65534),
                             "peers/console.sock": (0o660, 65534)}
            trio.run(_backend_sockets, d)
            metrics = d.ctl("metrics").stdout
            assert metric(metrics, "backend_peers_not_allowed_total", 2) == 1
            assert metric(metrics, "backend_peers_not_allowed_total", 3) == 0
            assert metric(metrics, "backend_readers_not_allowed_total", 0) == 1
            assert d.stop() == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
