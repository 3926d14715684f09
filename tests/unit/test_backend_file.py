"""The `file` backend: append, rotate-safe reopen, timestamps, when it attaches."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from test_backend_harness import Guest, running

from vhostser.backends.file import FileBackend, LineStamper, format_timestamp
from vhostser.console import PortConfig
from vhostser.console.session import State


async def test_guest_bytes_appended_byte_exact(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"before\n")
    backend = FileBackend.from_options({"path": str(log)}, "test")
    guest = Guest(backend)
    async with running(backend):
        assert guest.state is State.C  # a data port: attached, or Linux would never write
        guest.open()
        payload = bytes(range(256)) * 100
        guest.write(payload)
        await guest.drain()
        assert log.read_bytes() == b"before\n" + payload
        assert backend.counters.bytes_written == len(payload)
    assert guest.host_opens() == [1]


async def test_a_new_file_gets_mode_0640_and_append_false_truncates(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        log = tmp_path / "new.log"
        backend = FileBackend.from_options({"path": str(log), "append": False}, "test")
        Guest(backend)
        async with running(backend):
            assert stat.S_IMODE(log.stat().st_mode) == 0o640
        log.write_bytes(b"old contents")
        backend = FileBackend.from_options({"path": str(log), "append": False}, "test")
        guest = Guest(backend)
        async with running(backend):
            guest.open()
            guest.write(b"fresh")
            await guest.drain()
            backend.reopen()  # a reopen never truncates
            guest.write(b" and more")
            await guest.drain()
        assert log.read_bytes() == b"fresh and more"
    finally:
        os.umask(old_umask)


async def test_reopen_after_rename_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    backend = FileBackend.from_options({"path": str(log)}, "test")
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        guest.write(b"one\n")
        await guest.drain()
        os.rename(log, tmp_path / "console.log.1")  # logrotate
        guest.write(b"two\n")  # still the old file until SIGHUP
        await guest.drain()
        backend.reopen()
        guest.write(b"three\n")
        await guest.drain()
    assert (tmp_path / "console.log.1").read_bytes() == b"one\ntwo\n"
    assert log.read_bytes() == b"three\n"
    assert backend.counters.reopens == 1 and backend.counters.bytes_lost == 0


async def test_a_failed_reopen_keeps_writing_to_the_old_file(tmp_path: Path) -> None:
    log = tmp_path / "d" / "x.log"
    log.parent.mkdir()
    backend = FileBackend.from_options({"path": str(log)}, "test")
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        os.rename(log.parent, tmp_path / "moved")
        backend.reopen()  # the directory is gone: logged, counted, the old fd stays
        guest.write(b"kept")
        await guest.drain()
    assert (tmp_path / "moved" / "x.log").read_bytes() == b"kept"
    assert backend.counters.open_errors == 1


async def test_unwritable_path_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    backend = FileBackend.from_options({"path": str(tmp_path)}, "test")  # a directory
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        guest.write(b"lost")
        await guest.drain()
    assert backend.counters.bytes_lost == 4 and backend.counters.open_errors >= 1


async def test_console_port_log_does_not_attach_but_gets_the_output(tmp_path: Path) -> None:
    log = tmp_path / "hvc0.log"
    backend = FileBackend.from_options({"path": str(log)}, "test")
    guest = Guest(backend, PortConfig(0, console=True))
    async with running(backend):
        assert guest.state is State.B  # H stays 0 on a console port ("auto")
        guest.open()
        assert guest.port.state is State.D
        guest.write(b"Linux version 6.x\n")
        await guest.drain()
    assert log.read_bytes() == b"Linux version 6.x\n"
    assert guest.host_opens() == []


async def test_attach_false_and_true_are_obeyed(tmp_path: Path) -> None:
    for attach, state in [(False, State.B), (True, State.C)]:
        backend = FileBackend.from_options(
            {"path": str(tmp_path / "a.log"), "attach": attach}, "test"
        )
        guest = Guest(backend)
        async with running(backend):
            assert guest.state is state


async def test_timestamps_prefix_each_line(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    backend = FileBackend.from_options({"path": str(log), "timestamps": True}, "test")
    backend.sink.stamper = LineStamper(clock=lambda: 1_700_000_000.25)
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        for chunk in [b"boot", b"ing\nok\n", b"\n", b"tail"]:
            guest.write(chunk)
            await guest.drain()
    ts = b"2023-11-14T22:13:20.250Z "
    assert log.read_bytes() == ts + b"booting\n" + ts + b"ok\n" + ts + b"\n" + ts + b"tail"


def test_line_stamper_across_chunks() -> None:
    clock = iter([1.0, 2.0, 3.0])
    s = LineStamper(clock=lambda: next(clock))
    a, c = format_timestamp(1.0).encode(), format_timestamp(3.0).encode()
    assert s.stamp(b"x\ny") == a + b"x\n" + a + b"y"
    assert s.stamp(b"z\n") == b"z\n"  # the line "yz" was stamped when it started
    assert s.stamp(b"") == b""
    assert s.stamp(b"\n\n") == c + b"\n" + c + b"\n"  # empty lines are lines
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z "
