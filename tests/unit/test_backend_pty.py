"""The `pty` backend: a real pseudo-terminal, raw, always attached."""

from __future__ import annotations

import os
import sys
import termios
from pathlib import Path

import pytest
import trio
from test_backend_harness import Guest, running, wait_until

from vhostser.backends.pty import PtyBackend, make_symlink
from vhostser.console import PortConfig
from vhostser.console.session import State


async def read_fd(fd: int, n: int, timeout: float = 3.0) -> bytes:
    out = bytearray()
    with trio.fail_after(timeout):
        while len(out) < n:
            await trio.lowlevel.wait_readable(fd)
            try:
                out += os.read(fd, n - len(out))
            except BlockingIOError:
                pass
    return bytes(out)


async def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(fd)
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            pass


def open_slave(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    return fd


async def test_pty_is_attached_raw_and_carries_bytes(tmp_path: Path) -> None:
    link = tmp_path / "console"
    backend = PtyBackend.from_options({"link": str(link)}, "test")
    guest = Guest(backend)
    async with running(backend) as path:
        assert path == backend.path and path.startswith("/dev/pts/")
        assert os.readlink(link) == path
        assert os.stat(path).st_mode & 0o777 == 0o600  # not devpts' 0620 (group tty)
        assert guest.state is State.C  # H=1 from the start
        fd = open_slave(path)
        try:
            lflag = termios.tcgetattr(fd)[3]
            assert not lflag & (termios.ECHO | termios.ICANON)  # raw
            guest.open()
            every_byte = bytes(range(256)) * 4
            guest.write(every_byte)
            await guest.drain()
            # Input to the slave unchanged: no ^C signal, no ^D EOF, no CR/NL mapping.
            assert await read_fd(fd, len(every_byte)) == every_byte
            await write_fd(fd, b"typed\n\r\x03")
            assert await guest.read_exactly(8) == b"typed\n\r\x03"  # no output processing
        finally:
            os.close(fd)
    assert not link.exists()  # removed at exit
    assert guest.host_opens() == [1]


async def test_pty_output_blocks_the_guest_when_nobody_reads() -> None:
    backend = PtyBackend.from_options({"queue": 4096}, "test")
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        guest.write(os.urandom(1 << 20))
        with trio.move_on_after(0.3):
            await guest.drain()
        assert guest.pending  # bounded: the tty buffer and our queue, then the guest waits
        assert len(backend._out) <= 4096 + 4096
        fd = open_slave(backend.path or "")
        try:
            total = len(guest.pending) + guest.written

            async def reader() -> None:
                got = 0
                with trio.fail_after(10):
                    while got < total:
                        await trio.lowlevel.wait_readable(fd)
                        try:
                            got += len(os.read(fd, 65536))
                        except BlockingIOError:
                            pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await guest.drain(timeout=10)
        finally:
            os.close(fd)


async def test_pty_on_a_console_port_never_holds_the_guest() -> None:
    backend = PtyBackend.from_options({"queue": 4096}, "test")
    guest = Guest(backend, PortConfig(0, console=True))
    async with running(backend):
        guest.open()
        guest.write(os.urandom(1 << 20))
        await guest.drain()  # dropped when full, counted by the port
        await wait_until(lambda: guest.port.counters.discarded["console-overflow"] > 0)


# What getty and login do to their tty: take it as their controlling terminal, vhangup().
VHANGUP = """
import ctypes, os, signal, sys
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the hang-up signals the session leader too
os.open(sys.argv[1], os.O_RDWR)  # a session leader's first tty: its controlling terminal
if ctypes.CDLL(None, use_errno=True).vhangup() != 0:
    sys.exit("vhangup: " + os.strerror(ctypes.get_errno()))
"""


def is_raw(fd: int) -> bool:
    iflag, oflag, _, lflag = termios.tcgetattr(fd)[:4]
    return not (lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
                or iflag & (termios.ICRNL | termios.IXON) or oflag & termios.OPOST)


@pytest.mark.skipif(os.geteuid() != 0, reason="vhangup needs CAP_SYS_TTY_CONFIG")
async def test_a_hung_up_slave_is_raw_again_and_never_echoes_the_guest() -> None:
    """A hang-up resets the slave's termios to ECHO|ICANON: the guest's output used to come
    back into the guest as echo (12,289 bytes no host process wrote)."""
    backend = PtyBackend.from_options({}, "test")
    guest = Guest(backend)
    async with running(backend) as path:
        guest.open()
        for n in (1, 2):  # after each hang-up
            await trio.run_process([sys.executable, "-c", VHANGUP, path],
                                   start_new_session=True)
            await wait_until(lambda: backend.counters.hangups == n)  # noqa: B023
            fd = open_slave(path)  # someone attaches again, as screen or minicom would
            try:
                assert is_raw(fd)
                written = b"echo me?\r\x03\x04 line\n" * 100
                guest.write(written)
                await guest.drain()
                assert await read_fd(fd, len(written)) == written  # raw: not one byte changed
                await write_fd(fd, b"END")
                # Anything echoed would have been queued before END.
                assert await guest.read_exactly(3) == b"END"
                assert guest.read() == b""
            finally:
                os.close(fd)


def test_symlinks_replace_symlinks_only(tmp_path: Path) -> None:
    link = tmp_path / "l"
    make_symlink("/dev/pts/1", str(link))
    make_symlink("/dev/pts/2", str(link))
    assert os.readlink(link) == "/dev/pts/2"
    plain = tmp_path / "plain"
    plain.write_text("x")
    try:
        make_symlink("/dev/pts/3", str(plain))
    except OSError as e:
        assert "not a symlink" in str(e)
    else:
        raise AssertionError("a plain file was replaced")
    assert plain.read_text() == "x"
