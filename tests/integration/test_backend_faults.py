"""Backends under the faults of the hardening issue, end to end: the console device behind a
real front end (`console_rig`) or a real daemon process, with real sockets, pipes and files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from vhostser.backends.unix import UnixBackend
from vhostser.console import PortConfig
from vhostser.testing import open_frontend
from vhostser.testing.console_driver import ConsoleDriver

from .console_harness import console_rig, eventually
from .test_daemon_process import ROOT, Activated

VM = """
[vm]
name = "faults"
socket = "{tmp}/vu.sock"
max_ports = 2
state_dir = "{tmp}/state"
admin_socket = "{tmp}/ctl.sock"
"""
STDOUT_CONSOLE = """
[[port]]
id = 0
console = true
backend = {{ type = "stdout" }}
"""
FILE_PORT = """
[[port]]
id = 1
name = "org.test.log"
backend = {{ type = "file", path = "{tmp}/serial.log" }}
"""


@contextmanager
def daemon(tmp: Path, ports: str, *, stdout: int = subprocess.DEVNULL) -> Iterator[Activated]:
    """`vhostser run` as a child process with the ports given, READY on its notify socket."""
    config = tmp / "faults.toml"
    config.write_text((VM + ports).format(tmp=tmp))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify"))
    with open(tmp / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostser", "run", "--config", str(config),
             "--log-level", "debug"], env=env, cwd=ROOT, stdout=stdout, stderr=err,
        )
    d = Activated(proc, tmp, str(tmp / "vu.sock"), notify, config)
    try:
        d.notifications("READY=1")
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def stop(d: Activated) -> None:
    """SIGTERM, honoured: the event loop was never put to sleep."""
    d.proc.send_signal(signal.SIGTERM)
    try:
        assert d.proc.wait(20) == 0, d.stderr()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGTERM ignored\n{d.stderr()}") from None


async def _console_writes(path: str, total: int) -> None:
    """A guest printing `total` bytes on its console (hvc: never held by the device)."""
    async with open_frontend(path) as fe:
        driver = ConsoleDriver(fe, max_ports=2)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            await driver.wait_for(lambda: 0 in driver.ports and driver.port(0).console)
            await driver.port(0).write_all(os.urandom(total), timeout=20)
            nursery.cancel_scope.cancel()


def test_stdout_nobody_reads_never_blocks_the_daemon(tmp_path: Path) -> None:
    """The daemon's stdout a pipe nobody reads: it used to block in write(2), deaf to the
    admin socket and to SIGTERM. The sink holds a bounded amount; the console overflows."""
    r, w = os.pipe()
    try:
        with daemon(tmp_path, STDOUT_CONSOLE, stdout=w) as d:
            os.close(w)
            w = -1
            trio.run(_console_writes, d.vhost_path, 1 << 20)
            assert d.ctl("status").returncode == 0
            port0 = json.loads(d.ctl("--json", "stats").stdout)["ports"]["0"]
            assert port0["discarded"]["console-overflow"] > 0
            sink = port0["backend"]
            taken = port0["bytes_from_guest"]
            assert sink["bytes_dropped"] == 0 and taken - sink["bytes_written"] <= 256 * 1024
            stop(d)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_stdout_whose_reader_went_away_is_counted_not_fatal(tmp_path: Path) -> None:
    r, w = os.pipe()
    with daemon(tmp_path, STDOUT_CONSOLE, stdout=w) as d:
        os.close(w)
        os.close(r)  # EPIPE from here on
        trio.run(_console_writes, d.vhost_path, 100_000)
        port0 = json.loads(d.ctl("--json", "stats").stdout)["ports"]["0"]
        sink = port0["backend"]
        assert sink["bytes_dropped"] == port0["bytes_from_guest"] == 100_000
        assert sink["bytes_written"] == 0
        lines = [x for x in d.stderr().splitlines() if "stdout:" in x and "dropped" in x]
        assert len(lines) == 1, d.stderr()  # logged once
        stop(d)


def test_a_fifo_in_place_of_the_log_at_sighup_is_refused(tmp_path: Path) -> None:
    """logrotate's place taken by a FIFO nobody reads: the reopen at SIGHUP used to wait for
    a reader forever. It is refused, logged; the daemon answers and writes the old file."""
    with daemon(tmp_path, FILE_PORT) as d:
        log = tmp_path / "serial.log"
        assert log.exists()
        os.rename(log, tmp_path / "serial.log.1")
        os.mkfifo(log)
        d.proc.send_signal(signal.SIGHUP)
        d.notifications("STATUS=config reloaded")
        assert d.ctl("status").returncode == 0
        assert "it is a FIFO, not a regular file" in d.stderr()
        backend = json.loads(d.ctl("--json", "stats").stdout)["ports"]["1"]["backend"]
        assert backend["open_errors"] == 1 and backend["reopens"] == 0
        stop(d)


async def _unix_connect(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return trio.SocketStream(sock)


async def test_peer_flaps_while_the_vm_is_paused_leave_guest_and_host_agreeing(
    nursery: trio.Nursery,
) -> None:
    """1,000 peer connect/close cycles while the VM is paused (no control buffer is taken) used
    to overflow the 1024-entry control queue and leave the guest believing the host closed:
    the H changes the guest has not read collapse into one PORT_OPEN, the latest."""
    with tempfile.TemporaryDirectory(prefix="vhs-flap-") as tmp:
        path = str(Path(tmp) / "peer.sock")
        backend = UnixBackend.from_options({"path": path}, "test")
        async with console_rig(nursery, ports=[(PortConfig(3, "org.test.unix"), backend)]) as rig:
            drv, dev = rig.driver, rig.dev(3)
            port = await drv.wait_port("org.test.unix")
            await eventually(lambda: Path(path).exists())
            await port.open()
            await rig.fe.stop(pause=True)
            for _ in range(1000):
                peer = await _unix_connect(path)
                await eventually(lambda: dev.state.host_open)
                await peer.aclose()
                await eventually(lambda: not dev.state.host_open)
            peer = await _unix_connect(path)  # this one stays: the host is open at the end
            await eventually(lambda: dev.state.host_open)
            assert rig.device.counters.control_overflow == 0
            await rig.fe.resume()
            await drv.wait_for(lambda: port.host_connected)
            await port.write_all(b"through")
            got = bytearray()
            with trio.fail_after(5):
                while len(got) < 7:
                    got += await peer.receive_some(7 - len(got))
            assert bytes(got) == b"through"
            await peer.aclose()
