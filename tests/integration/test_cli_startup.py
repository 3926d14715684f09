"""`vhostser run` as management software and people start it: the vhost-user back-end
program conventions (--socket-path, --fd with a listening or a connected socket,
--print-capabilities), one line and exit status 1 for every start-up failure, the admin
socket beside the vhost-user socket and gone at exit, and `ctl` telling "not running" apart.
Real daemon processes, real sockets, the testing front end and guest driver."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vhostser.testing import open_frontend

from .procs import ROOT, DaemonProc, echo_through, env, guest_echo, vhostser

CONFIG = """
[vm]
name = "{name}"
socket = "{tmp}/{name}.sock"
max_ports = 4
{extra}
[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}
"""


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Short: unix socket paths have 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="vhs-cli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def config(tmp: Path, name: str = "vm1", extra: str = "") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(CONFIG.format(tmp=tmp, name=name, extra=extra))
    return path


def one_line_error(r: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The failure of a command: `status` (78, EX_CONFIG: `run` with a bad config), one
    line on stderr, no traceback."""
    assert r.returncode == status, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


# ---------------------------------------------------------------------------- conventions


def test_print_capabilities_ignores_everything_else() -> None:
    for args in (["run", "--print-capabilities", "--config", "/nonexistent", "--log-level",
                  "bogus"], ["--print-capabilities"]):
        r = vhostser(*args)
        assert r.returncode == 0, r.stderr
        # vhost-user.json: VHostUserBackendCapabilities, discriminated by `type`; the
        # "console" branch has no members of its own, so nothing but the type.
        assert json.loads(r.stdout) == {"type": "console"}
        assert r.stderr == ""


def test_version() -> None:
    from vhostser import __version__

    for flag in ("--version", "-V"):
        r = vhostser(flag)
        assert r.returncode == 0 and r.stdout.strip() == f"vhostser {__version__}"
    assert vhostser("run", "--version").stdout.strip() == f"vhostser {__version__}"


def test_vhost_user_console_is_run(tmp: Path) -> None:
    """The conventions' name for a virtio-console back end, vhost-user-console, is `run`."""
    r = subprocess.run(
        [sys.executable, "-c", "import sys; from vhostser.cli import backend_main; "
         "sys.exit(backend_main())", "--print-capabilities"],
        capture_output=True, text=True, cwd=ROOT, env=env(), timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout) == {"type": "console"}


def test_socket_path_and_derived_admin_socket_removed_at_exit(tmp: Path) -> None:
    cfg = config(tmp)
    other = tmp / "other.sock"
    d = DaemonProc(tmp, ["--config", str(cfg), "--socket-path", str(other)])
    try:
        d.wait_ready()
        assert stat.S_ISSOCK(os.lstat(other).st_mode)
        assert not os.path.exists(tmp / "vm1.sock")
        # The admin socket follows the socket it serves: other.sock -> other.ctl.
        r = vhostser("ctl", "--admin", str(tmp / "other.ctl"), "--json", "status")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["socket"] == str(other) and status["pid"] == d.pid
        assert trio.run(guest_echo, str(other), b"through --socket-path") == \
            b"through --socket-path"
    finally:
        assert d.stop() == 0, d.stderr()
    assert not os.path.exists(tmp / "other.ctl"), "the admin socket outlived the daemon"
    assert not os.path.exists(other)
    # --socket stays an alias.
    d = DaemonProc(tmp, ["--config", str(cfg), "--socket", str(other)], name="alias")
    try:
        d.wait_ready()
        assert stat.S_ISSOCK(os.lstat(tmp / "other.ctl").st_mode)
    finally:
        assert d.stop() == 0


def test_fd_listening_socket(tmp: Path) -> None:
    """--fd with a listening socket (libvirt's way with virtiofsd): front ends come and go."""
    path = str(tmp / "passed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    d = DaemonProc(tmp, ["--config", str(config(tmp)), f"--fd={listener.fileno()}",
                         "--log-level", "debug"], pass_fds=[listener.fileno()])
    listener.close()
    try:
        d.wait_ready()
        for payload in (b"first front end", b"second front end"):
            assert trio.run(guest_echo, path, payload) == payload
        status = json.loads(vhostser("ctl", "--admin", str(tmp / "passed.ctl"), "--json",
                                     "status").stdout)
        assert status["socket"] == path and status["connections"] == 2
        assert not os.path.exists(tmp / "vm1.sock")  # nothing bound at the config's path
        assert "serving a listening socket passed as fd" in d.stderr()
    finally:
        assert d.stop() == 0, d.stderr()


def test_fd_connected_socket_stops_with_its_front_end(tmp: Path) -> None:
    """--fd with an already-connected socket (libvirt's vhost-user-gpu, crosvm): one front end;
    when it leaves, the sessions close (frontend-gone: it cannot come back) and the daemon
    exits 0."""
    listen_path = str(tmp / "qemu-side.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    listener.listen(1)
    cfg = config(tmp, extra=f'admin_socket = "{tmp}/c.ctl"')
    holder: dict[str, DaemonProc] = {}

    async def main() -> bytes:
        async with open_frontend(listen_path) as fe:
            conn, _ = listener.accept()  # already queued: the front end connected
            holder["d"] = DaemonProc(tmp, ["--config", str(cfg), "--fd", str(conn.fileno())],
                                     pass_fds=[conn.fileno()])
            conn.close()
            listener.close()
            return await echo_through(fe, b"over a passed connection")

    try:
        assert trio.run(main) == b"over a passed connection"
        d = holder["d"]
        assert d.proc.wait(30) == 0, d.stderr()
        log = d.stderr()
        assert "serving a connection passed as fd" in log
        assert "cannot come back on a passed connection: closing sessions" in log
        assert "closed: frontend-gone" in log
        assert not os.path.exists(tmp / "c.ctl")
    finally:
        if "d" in holder:
            holder["d"].kill()


def test_fd_errors(tmp: Path) -> None:
    assert "--fd 77: Bad file descriptor" in one_line_error(vhostser("run", "--fd", "77"))
    with open(tmp / "file", "w") as f:
        fd = f.fileno()
        r = subprocess.run([sys.executable, "-m", "vhostser", "run", "--fd", str(fd)],
                           capture_output=True, text=True, cwd=ROOT, env=env(), timeout=60,
                           pass_fds=[fd])
    assert f"--fd {fd}: Socket operation on non-socket" in one_line_error(r)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        fd = udp.fileno()
        r = subprocess.run([sys.executable, "-m", "vhostser", "run", "--fd", str(fd)],
                           capture_output=True, text=True, cwd=ROOT, env=env(), timeout=60,
                           pass_fds=[fd])
    assert "a AF_INET SOCK_DGRAM socket, not a unix stream socket" in one_line_error(r)
    r = vhostser("run", "--fd", "3", "--socket-path", "/x")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    assert r.stderr.startswith("usage: vhostser run")


# ---------------------------------------------------------------------------- start-up errors


def test_second_daemon_for_the_same_vm(tmp: Path) -> None:
    cfg = config(tmp)
    first = DaemonProc(tmp, ["--config", str(cfg)])
    try:
        first.wait_ready()
        line = one_line_error(vhostser("run", "--config", str(cfg)))
        assert line.startswith(f"vhostser: another vhostser serves VM vm1 on {tmp}/vm1.sock "
                               f"(pid {first.pid})"), line
        # Only the admin socket in the way: the same one given to another socket.
        line = one_line_error(vhostser("run", "--config", str(cfg), "--socket-path",
                                       str(tmp / "b.sock"), "--admin", str(tmp / "vm1.ctl")))
        assert f"(pid {first.pid})" in line and "another --admin" in line, line
        # Told by the admin socket's status: no probe on the vhost-user socket, which the
        # first daemon would have taken for a front end.
        assert "front end connected" not in first.stderr()
        # The first daemon is untouched by all this.
        assert trio.run(guest_echo, str(tmp / "vm1.sock"), b"still here") == b"still here"
    finally:
        assert first.stop() == 0, first.stderr()


def test_port_socket_in_use(tmp: Path) -> None:
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(tmp / "peer.sock"))
    holder.listen(1)
    extra_port = f"""
[[port]]
id = 2
name = "org.test.unix"
backend = {{ type = "unix", path = "{tmp}/peer.sock" }}
"""
    cfg = tmp / "p.toml"
    cfg.write_text(CONFIG.format(tmp=tmp, name="p", extra="") + extra_port)
    with holder:
        line = one_line_error(vhostser("run", "--config", str(cfg)))
        # Found through /proc/net/unix, not by connecting: a peer connecting to a port's
        # socket would be a host open for that port's guest.
        holder.setblocking(False)
        with pytest.raises(BlockingIOError):
            holder.accept()
    assert f"port 2's socket {tmp}/peer.sock is in use (pid {os.getpid()}" in line, line
    assert f"change port 2 (org.test.unix).backend in {cfg}" in line


def test_socket_path_not_writable(tmp: Path) -> None:
    """A directory this user may not write in: root made unprivileged by dropping the
    capabilities that let it write anywhere (setpriv), so the test needs no other user's
    access to the venv."""
    setpriv = shutil.which("setpriv")
    if os.getuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv(1)")
    locked = tmp / "locked"
    locked.mkdir()
    os.chown(locked, 65534, 65534)
    os.chmod(locked, 0o555)
    r = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner",
                        "--inh-caps=-all", sys.executable, "-m", "vhostser", "run",
                        "--socket-path", str(locked / "sub" / "vm.sock")],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=60)
    line = one_line_error(r)
    assert line == (f"vhostser: cannot create the vhost-user socket {locked}/sub/vm.sock: "
                    f"{locked} is not writable for this user (choose another path, or run "
                    "as a user who may write there)"), line


def test_socket_path_is_a_file(tmp: Path) -> None:
    (tmp / "plain").write_text("")
    line = one_line_error(vhostser("run", "--socket-path", str(tmp / "plain")))
    assert line == (f"vhostser: {tmp}/plain exists and is not a socket: remove it, or give "
                    "this one another --socket-path")


def test_config_error_is_one_line(tmp: Path) -> None:
    bad = tmp / "bad.toml"
    bad.write_text('[vm]\nmax_ports = 99\n')
    line = one_line_error(vhostser("run", "--config", str(bad)), 78)
    assert line.startswith(f"vhostser: {bad}:2: vm.max_ports: expected an integer in 1..31"), line
    line = one_line_error(vhostser("run", "--config", str(tmp / "missing.toml")), 78)
    assert f"{tmp}/missing.toml: cannot read" in line


def test_metrics_port_in_use(tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = config(tmp, extra=f'metrics_listen = "127.0.0.1:{port}"')
        line = one_line_error(vhostser("run", "--config", str(cfg)))
    assert f"metrics_listen 127.0.0.1:{port}: Address already in use" in line, line


# ---------------------------------------------------------------------------- ctl


def test_ctl_not_running(tmp: Path) -> None:
    cfg = config(tmp)
    line = one_line_error(vhostser("ctl", "--config", str(cfg), "status"))
    assert line == (f"vhostser ctl: the daemon for VM vm1 is not running "
                    f"(no socket at {tmp}/vm1.ctl)")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp / "vm1.ctl"))
    stale.close()  # a socket file nobody listens on: what a killed daemon leaves
    line = one_line_error(vhostser("ctl", "--config", str(cfg), "ports"))
    assert line == (f"vhostser ctl: the daemon for VM vm1 is not running (stale socket "
                    f"{tmp}/vm1.ctl: nobody accepts on it)")
    (tmp / "notsock").write_text("")
    line = one_line_error(vhostser("ctl", "--admin", str(tmp / "notsock"), "status"))
    assert "is not a socket" in line
    # --vm NAME finds NAME.toml in $VHOSTSER_CONFIG_DIR.
    r = vhostser("ctl", "--vm", "vm1", "status", extra_env={"VHOSTSER_CONFIG_DIR": str(tmp)})
    assert "the daemon for VM vm1 is not running (stale socket" in one_line_error(r)
    r = vhostser("ctl", "--vm", "nope", "status", extra_env={"VHOSTSER_CONFIG_DIR": str(tmp)})
    assert f"no config for VM 'nope': {tmp}/nope.toml does not exist" in one_line_error(r)


def test_ctl_json_anywhere_and_wrong_options(tmp: Path) -> None:
    d = DaemonProc(tmp, ["--config", str(config(tmp))])
    try:
        d.wait_ready()
        admin = ["--admin", str(tmp / "vm1.ctl")]
        before = vhostser("ctl", *admin, "--json", "ports")
        after = vhostser("ctl", *admin, "ports", "--json")
        assert before.returncode == after.returncode == 0
        assert json.loads(before.stdout) == json.loads(after.stdout)
        assert json.loads(after.stdout)[0]["name"] == "org.test.echo"
        r = vhostser("ctl", *admin, "ports", "--bogus")
        assert r.returncode == 2
        assert r.stderr.startswith("usage: vhostser ctl ports")
        assert "vhostser ctl ports: error: unrecognized arguments: --bogus" in r.stderr
        r = vhostser("ctl", *admin, "remove-port")
        assert r.stderr.startswith("usage: vhostser ctl remove-port") and r.returncode == 2
        r = vhostser("run", "--bogus")
        assert r.stderr.startswith("usage: vhostser run") and r.returncode == 2
    finally:
        assert d.stop() == 0


def test_no_start_up_check_when_a_predecessors_fds_come_back(tmp: Path) -> None:
    """Restarted under a service manager that kept the fds (fd store), this VM's own sockets
    are held by the manager: live, but not in the way. The start-up check must not take
    them for another process's (here the test holds the port's socket, passed back as a
    stored fd)."""
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.bind(str(tmp / "peer.sock"))
    held.listen(1)
    cfg = tmp / "p.toml"
    cfg.write_text(CONFIG.format(tmp=tmp, name="p", extra="") + f"""
[[port]]
id = 2
name = "org.test.unix"
backend = {{ type = "unix", path = "{tmp}/peer.sock" }}
""")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.settimeout(30)
    script = (f'exec 3<&{held.fileno()}; LISTEN_PID=$$ exec "$0" -m vhostser run '
              '--config "$1"')
    with notify, open(tmp / "stderr", "wb") as err:
        proc = subprocess.Popen(
            ["bash", "-c", script, sys.executable, str(cfg)], cwd=ROOT, stderr=err,
            pass_fds=(held.fileno(),),
            env=env(NOTIFY_SOCKET=str(tmp / "notify"), LISTEN_FDS="1",
                    LISTEN_FDNAMES="port.2.listen"))
        try:
            assert b"READY=1" in notify.recv(4096), (tmp / "stderr").read_text()
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
            held.close()
    assert "is in use" not in (tmp / "stderr").read_text()
