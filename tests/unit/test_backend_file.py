"""The `file` backend: append, rotate-safe reopen, timestamps, when it attaches."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_backend_harness import Guest, running

from vhostser.backends.file import FileBackend, LineStamper, format_timestamp
from vhostser.console import PortConfig
from vhostser.console.session import State

ROOT = Path(__file__).resolve().parents[2]


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


async def test_a_fifo_at_the_path_is_refused_at_reopen_and_the_old_file_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """logrotate's place taken by a FIFO: opening it would wait for a reader (the daemon hung
    in SIGHUP), writing to it blocks when the reader stops. Refused; the old file goes on."""
    caplog.set_level(logging.INFO, logger="vhostser")
    log = tmp_path / "serial.log"
    backend = FileBackend.from_options({"path": str(log)}, "test")
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        guest.write(b"one\n")
        await guest.drain()
        os.rename(log, tmp_path / "serial.log.1")
        os.mkfifo(log)
        # With a reader the FIFO opens, and is refused all the same. (Without one its open
        # would block: the daemon test in tests/integration/test_backend_faults.py.)
        reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
        try:
            backend.reopen()
            guest.write(b"two\n")
            await guest.drain()
            assert os.read(reader, 100) == b""  # nothing went into the FIFO
        finally:
            os.close(reader)
    assert (tmp_path / "serial.log.1").read_bytes() == b"one\ntwo\n"
    assert backend.counters.open_errors == 1 and backend.counters.reopens == 0
    assert backend.counters.bytes_lost == 0
    refused = [r.getMessage() for r in caplog.records if "reopen" in r.getMessage()]
    assert len(refused) == 1
    assert "failed, writing on to the old file: it is a FIFO, not a regular file" in refused[0]
    assert backend.problems() == [f"{log} is a FIFO, not a regular file: it will be refused"]


async def test_a_fifo_at_the_path_from_the_start_drops_and_counts(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    os.mkfifo(log)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
    try:
        backend = FileBackend.from_options({"path": str(log)}, "test")
        guest = Guest(backend)
        async with running(backend):
            guest.open()
            guest.write(b"nowhere")
            await guest.drain()
        assert os.read(reader, 100) == b""
    finally:
        os.close(reader)
    assert backend.counters.bytes_lost == 7 and backend.counters.bytes_written == 0


async def test_a_missing_directory_drops_counts_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vhostser")
    log = tmp_path / "missing" / "serial.log"
    backend = FileBackend.from_options({"path": str(log)}, "test")
    assert backend.problems() == [
        f"{log}: directory {log.parent} does not exist: the guest's output will be dropped "
        "(counted) until it does"
    ]
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        for _ in range(3):
            backend.sink._next_open = 0  # retry the open at every write, as seconds go by
            guest.write(b"0123456789")
            await guest.drain()
        assert backend.counters.bytes_lost == 30 and backend.counters.open_errors == 4
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 2, errors  # the open failing (once per streak), the first loss
        assert "cannot open" in errors[0] and "No such file or directory" in errors[0]
        log.parent.mkdir()
        backend.sink._next_open = 0
        guest.write(b"back")
        await guest.drain()
    assert log.read_bytes() == b"back"
    assert any("30 bytes were dropped while it would not open" in r.getMessage()
               for r in caplog.records)


def test_check_warns_about_a_missing_log_directory(tmp_path: Path) -> None:
    config = tmp_path / "vm.toml"
    config.write_text(f'[vm]\nsocket = "{tmp_path}/vu.sock"\n[[port]]\nid = 1\n'
                      f'backend = {{ type = "file", path = "{tmp_path}/nodir/x.log" }}\n'
                      '[[port]]\nid = 2\nconsole = true\n'
                      f'backend = {{ type = "console", path = "{tmp_path}/c.log" }}\n')
    r = subprocess.run([sys.executable, "-m", "vhostser", "check", str(config)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr  # a warning: the directory may exist when it runs
    assert f"{config}: ok" in r.stdout
    assert r.stderr.splitlines() == [
        f"{config}: warning: port 1: {tmp_path}/nodir/x.log: directory {tmp_path}/nodir does "
        "not exist: the guest's output will be dropped (counted) until it does"
    ]
