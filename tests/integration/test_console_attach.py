"""`vhostser console` and `vhostser attach` against a real daemon process: the guest (the
testing front end and guest driver) writes and reads its ports, `console` runs on a real pty
(its slave as stdin/stdout/stderr, as a terminal emulator would give it), `attach` on pipes.

On the pty: raw mode while attached (checked on the slave from outside), the scrollback
first, live output, typing reaching the guest, Ctrl-] leaving, and the terminal's mode
restored after the escape key and after SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from vhostser.testing import open_frontend
from vhostser.testing.console_driver import ConsoleDriver

from .procs import ROOT, DaemonProc, env, vhostser

CONFIG = """
[vm]
name = "tty1"
socket = "{tmp}/tty1.sock"
max_ports = 4

[[port]]
id = 0
console = true
backend = {{ type = "console", socket = "{tmp}/console.sock", scrollback = 4 }}

[[port]]
id = 1
name = "org.test.unix"
backend = {{ type = "unix", path = "{tmp}/unix.sock" }}

[[port]]
id = 2
name = "org.test.tcp"
backend = {{ type = "tcp", port = 0 }}

[[port]]
id = 3
name = "org.test.echo"
backend = {{ type = "echo" }}
"""


@pytest.fixture
def daemon() -> Iterator[DaemonProc]:
    tmp = Path(tempfile.mkdtemp(prefix="vhs-tty-"))
    (tmp / "tty1.toml").write_text(CONFIG.format(tmp=tmp))
    d = DaemonProc(tmp, ["--config", str(tmp / "tty1.toml")])
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.stderr()
        shutil.rmtree(tmp, ignore_errors=True)


def by_name(d: DaemonProc) -> dict[str, str]:
    """How a user names the VM: tty1, found as tty1.toml in $VHOSTSER_CONFIG_DIR."""
    return env(VHOSTSER_CONFIG_DIR=str(d.tmp))


@asynccontextmanager
async def guest(d: DaemonProc) -> AsyncIterator[ConsoleDriver]:
    async with open_frontend(d.tmp / "tty1.sock") as fe:
        driver = ConsoleDriver(fe, max_ports=4)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            yield driver
            nursery.cancel_scope.cancel()


class Pty:
    """A pty pair; the test holds the master side (what a terminal emulator holds)."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        self.seen = bytearray()

    def mode(self) -> list[object]:
        return termios.tcgetattr(self.slave)

    async def read_until(self, needle: bytes, timeout: float = 20) -> bytes:
        with trio.fail_after(timeout):
            while needle not in self.seen:
                await trio.lowlevel.wait_readable(self.master)
                try:
                    self.seen += os.read(self.master, 65536)
                except BlockingIOError:
                    continue
        return bytes(self.seen)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


async def open_console(d: DaemonProc, pty: Pty, *args: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "vhostser", "console", "tty1", *args], cwd=ROOT,
        stdin=pty.slave, stdout=pty.slave, stderr=pty.slave, env=by_name(d))


def raw(mode: list[object]) -> bool:
    lflag = mode[3]
    assert isinstance(lflag, int)
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


async def test_console_on_a_pty(daemon: DaemonProc) -> None:
    pty = Pty()
    cooked = pty.mode()
    assert not raw(cooked)
    try:
        async with guest(daemon) as driver:
            hvc = await driver.wait_port(0)
            await hvc.write_all(b"boot log line\r\n")
            await hvc.drain()  # the console backend has it: it is scrollback now
            proc = await open_console(daemon, pty)
            await pty.read_until(b"Escape character is ^]\r\n")
            assert raw(pty.mode()), "not in raw mode while attached"
            # The scrollback comes first, then what the guest writes now.
            await pty.read_until(b"boot log line\r\n")
            await hvc.write_all(b"live output\r\n")
            seen = await pty.read_until(b"live output\r\n")
            assert seen.index(b"boot log line") < seen.index(b"live output")
            assert b"Connected to VM 'tty1' port 0." in seen
            # Typing goes to the guest, as typed (raw: \r stays \r, ^C is a byte).
            pty.type(b"ls\r\x03")
            assert await hvc.read_exactly(4, timeout=20) == b"ls\r\x03"
            # Ctrl-]: detached, exit 0, the terminal as it was.
            pty.type(b"\x1d")
            with trio.fail_after(20):
                assert await proc.wait() == 0
            assert pty.mode() == cooked
            # Attach again: SIGTERM restores the terminal too.
            proc = await open_console(daemon, pty, "0", "--escape", "^A")
            await pty.read_until(b"Escape character is ^A\r\n")
            assert raw(pty.mode())
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 128 + signal.SIGTERM
            await pty.read_until(b"SIGTERM: detached.")
            assert pty.mode() == cooked
    finally:
        pty.close()


def test_console_needs_a_terminal(daemon: DaemonProc) -> None:
    r = subprocess.run([sys.executable, "-m", "vhostser", "console", "tty1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT,
                       env=by_name(daemon), timeout=60)
    assert r.returncode == 1
    assert "needs a terminal on stdin" in r.stderr and "vhostser attach" in r.stderr


@pytest.mark.parametrize("port", ["org.test.unix", "2"])
async def test_attach_over_pipes(daemon: DaemonProc, port: str) -> None:
    """Bytes both ways untouched (no raw mode, no escape key on a pipe); EOF on stdin
    half-closes, and attach ends when the daemon closes its side."""
    async with guest(daemon) as driver:
        gport = await driver.wait_port(port if not port.isdigit() else int(port))
        await gport.open()
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "vhostser", "attach", "tty1", port], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=by_name(daemon))
        assert proc.stdin is not None and proc.stdout is not None
        await driver.wait_for(lambda: gport.host_connected, timeout=20)
        await gport.write_all(b"guest says \x1d\x00 hi")
        got = b""
        with trio.fail_after(20):
            while len(got) < 15:
                got += await proc.stdout.receive_some(100)
        assert got == b"guest says \x1d\x00 hi"
        await proc.stdin.send_all(b"host \x1d answers")
        await proc.stdin.aclose()  # EOF: the connection is half-closed
        assert await gport.read_exactly(14, timeout=20) == b"host \x1d answers"
        # The stream backend hangs up on a peer whose input ended: attach is done.
        with trio.fail_after(20):
            assert await proc.wait() == 0


def test_attach_errors(daemon: DaemonProc) -> None:
    r = vhostser("attach", "tty1", "3", extra_env={"VHOSTSER_CONFIG_DIR": str(daemon.tmp)})
    assert r.returncode == 1
    assert r.stderr.strip() == ("vhostser: VM 'tty1' port 3 (org.test.echo): its backend is "
                                "`echo`: nothing on the host to attach to")
    r = vhostser("attach", "tty1", "nope", extra_env={"VHOSTSER_CONFIG_DIR": str(daemon.tmp)})
    assert r.returncode == 1
    assert "VM tty1 has no port 'nope' (ports: 0, 1 (org.test.unix), 2 (org.test.tcp), 3 " \
        "(org.test.echo))" in r.stderr
    r = vhostser("attach", "tty1", "1", "--admin", str(daemon.tmp / "missing.ctl"))
    assert r.returncode == 1 and "is not running (no socket at" in r.stderr
    status = vhostser("ctl", "--admin", str(daemon.tmp / "tty1.ctl"), "status")
    assert status.returncode == 0
