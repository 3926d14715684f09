"""The `console` backend: log + live readers with scrollback, one writer, slow readers dropped."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import trio
from test_backend_harness import (
    Guest,
    receive_exactly,
    receive_until_eof,
    running,
    unix_connect,
    wait_until,
)
from trio.testing import MockClock

from vhostser.backends.console_log import ConsoleBackend
from vhostser.backends.peers import BACKOFF_MAX
from vhostser.console import PortConfig
from vhostser.console.session import State


def make(tmp_path: Path, **options: object) -> ConsoleBackend:
    return ConsoleBackend.from_options(
        {"path": str(tmp_path / "console.log"), "socket": str(tmp_path / "c.sock"), **options},
        "test",
    )


async def test_log_and_scrollback_then_live(tmp_path: Path) -> None:
    backend = make(tmp_path, scrollback=1)  # 1 KiB
    guest = Guest(backend, PortConfig(0, console=True))
    history = os.urandom(5000)
    async with running(backend) as sock_path:
        assert guest.state is State.C
        guest.open()
        guest.write(history)
        await guest.drain()
        reader = await unix_connect(sock_path)
        assert await receive_exactly(reader, 1024) == history[-1024:]
        guest.write(b"live line\n")
        await guest.drain()
        assert await receive_exactly(reader, 10) == b"live line\n"
        late = await unix_connect(sock_path)
        assert await receive_exactly(late, 1024) == (history + b"live line\n")[-1024:]
        backend.reopen()
    assert (tmp_path / "console.log").read_bytes() == history + b"live line\n"


async def test_one_writer_at_a_time(tmp_path: Path) -> None:
    backend = make(tmp_path)
    guest = Guest(backend, PortConfig(0, console=True))
    async with running(backend) as sock_path:
        guest.open()
        a = await unix_connect(sock_path)
        b = await unix_connect(sock_path)
        await wait_until(lambda: len(backend.readers) == 2)
        await a.send_all(b"ls\r")
        assert await guest.read_exactly(3) == b"ls\r"
        assert backend.writer is backend.readers[0]
        await b.send_all(b"rm -rf /\r")  # not the writer: dropped, counted
        await wait_until(lambda: backend.counters.input_dropped == 9)
        await a.send_all(b"x")
        assert await guest.read_exactly(1) == b"x"  # nothing of b's in between
        await a.aclose()
        await wait_until(lambda: backend.writer is None)
        await b.send_all(b"b now")
        assert await guest.read_exactly(5) == b"b now"
        assert backend.counters.writers == 2
        # Everyone reads the guest's output.
        guest.write(b"$ ")
        await guest.drain()
        assert await receive_exactly(b, 2) == b"$ "


async def test_a_reader_that_stops_sending_still_reads(tmp_path: Path) -> None:
    backend = make(tmp_path)
    guest = Guest(backend)
    async with running(backend) as sock_path:
        guest.open()
        r = await unix_connect(sock_path)
        await r.send_all(b"w")
        assert await guest.read_exactly(1) == b"w"
        await r.send_eof()
        await wait_until(lambda: backend.writer is None)
        guest.write(b"still there")
        await guest.drain()
        assert await receive_exactly(r, 11) == b"still there"


async def test_slow_readers_are_dropped_never_the_guest_held(tmp_path: Path) -> None:
    backend = make(tmp_path, reader_queue=16384, scrollback=0)
    guest = Guest(backend)  # a data port: even there the console never holds the guest
    chunk = os.urandom(4096)
    rounds = 256  # 1 MiB: far more than the kernel buffers of the slow reader
    async with running(backend) as sock_path:
        guest.open()
        fast = await unix_connect(sock_path)
        slow = await unix_connect(sock_path)
        await wait_until(lambda: len(backend.readers) == 2)
        fast_peer = backend.readers[0]
        async with trio.open_nursery() as nursery:
            got = bytearray()

            async def fast_reader() -> None:
                got.extend(await receive_exactly(fast, len(chunk) * rounds, timeout=10))

            nursery.start_soon(fast_reader)
            for _ in range(rounds):
                guest.write(chunk)
                assert not guest.pending  # taken at once, always
                await wait_until(lambda: len(fast_peer.out) < 8192)
        assert bytes(got) == chunk * rounds
        assert backend.counters.readers_dropped_slow == 1
        await wait_until(lambda: len(backend.readers) == 1)
        rest = bytearray()
        try:
            rest += await receive_until_eof(slow)
        except trio.BrokenResourceError:
            pass
        assert len(rest) < len(chunk) * rounds
    assert (tmp_path / "console.log").stat().st_size == len(chunk) * rounds


async def test_writer_bytes_only_reach_an_open_session(tmp_path: Path) -> None:
    backend = ConsoleBackend.from_options({"socket": str(tmp_path / "c.sock")}, "test")
    guest = Guest(backend, PortConfig(0, console=True))
    async with running(backend) as sock_path:
        r = await unix_connect(sock_path)
        await r.send_all(b"typed before the guest listens")
        await wait_until(lambda: guest.port.counters.discarded["guest-closed"] == 30)
        guest.open()
        await r.send_all(b"ok")
        assert await guest.read_exactly(2) == b"ok"


async def test_readers_over_the_limit_are_refused(tmp_path: Path) -> None:
    backend = make(tmp_path, max_readers=1)
    Guest(backend)
    async with running(backend) as sock_path:
        first = await unix_connect(sock_path)
        await wait_until(lambda: len(backend.readers) == 1)
        second = await unix_connect(sock_path)
        assert await receive_until_eof(second) == b""
        assert backend.counters.readers_refused == 1
        await first.aclose()


async def test_a_taken_socket_path_is_retried_with_backoff(
    tmp_path: Path, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vhostser")
    backend = make(tmp_path)
    guest = Guest(backend, PortConfig(0, console=True))
    taken = tmp_path / "c.sock"
    taken.write_text("not a socket")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.run)
        await wait_until(lambda: backend.counters.listen_failures >= 3, timeout=30)
        guest.open()
        guest.write(b"kept meanwhile\n")  # the log and the scrollback work without readers
        await guest.drain()
        taken.unlink()
        with trio.fail_after(BACKOFF_MAX + 1):  # the next attempt, at most one backoff later
            while not (taken.exists() and stat.S_ISSOCK(taken.stat().st_mode)):
                await trio.sleep(0.05)
        reader = await unix_connect(str(taken))
        assert await receive_exactly(reader, 15) == b"kept meanwhile\n"
        nursery.cancel_scope.cancel()
    failed = [r for r in caplog.records if "cannot listen" in r.getMessage()]
    assert len(failed) == backend.counters.listen_failures
    assert [r.levelno for r in failed].count(logging.ERROR) == 1  # once per streak
    assert (tmp_path / "console.log").read_bytes() == b"kept meanwhile\n"
