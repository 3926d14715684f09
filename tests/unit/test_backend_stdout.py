"""The `stdout` sink (`SinkBackend` on an inherited fd): bounded, never blocking the event
loop, on real pipes, files and sockets; a sink whose reader went away is counted, not fatal."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import trio
from test_backend_harness import Guest, running, wait_until

from vhostser.backends.registry import Stdout
from vhostser.backends.simple import SINK_LIMIT, SinkBackend
from vhostser.console import PortConfig

CONSOLE = PortConfig(0, console=True)


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A write that blocked the event loop would hang the test: SIGALRM breaks it instead."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("the event loop was blocked")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


async def read_all_available(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(out)
        out += chunk


async def test_a_pipe_nobody_reads_fills_the_bound_then_the_console_overflows() -> None:
    r, w = os.pipe()
    try:
        backend = SinkBackend(w)
        guest = Guest(backend, CONSOLE)
        payload = os.urandom(1 << 20)
        async with running(backend):
            guest.open()
            guest.write(payload)
            await guest.drain()  # a console never holds the guest
            overflow = guest.port.counters.discarded["console-overflow"]
            assert overflow > 0
            assert len(backend._out) <= SINK_LIMIT  # bounded
            assert os.get_blocking(w)  # the shared description's flags are left alone
            # The reader comes back: everything the sink took arrives, in order.
            os.set_blocking(r, False)
            got = bytearray()
            while len(got) < len(payload) - overflow:
                got += await read_all_available(r)
                await trio.sleep(0.001)
        assert backend.counters.bytes_written == len(got) == len(payload) - overflow
        assert backend.counters.bytes_dropped == 0
        # The guest wrote in one go: the sink took the start, the console dropped the rest.
        assert bytes(got) == payload[: len(got)]
    finally:
        os.close(r)
        os.close(w)


async def test_a_full_sink_refuses_until_it_drained() -> None:
    r, w = os.pipe()
    try:
        backend = SinkBackend(w, limit=4096)
        Guest(backend, CONSOLE)
        async with running(backend):
            while backend.guest_data(b"x" * 4096):
                await trio.sleep(0.001)  # the pipe takes its 64 KiB first
            assert not backend.guest_data(b"y")
            os.set_blocking(r, False)
            await read_all_available(r)
            await wait_until(lambda: backend.guest_data(b"y"))
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("when", ["before-start", "while-running"])
async def test_a_pipe_whose_reader_went_away_drops_and_counts(
    when: str, caplog: pytest.LogCaptureFixture
) -> None:
    r, w = os.pipe()
    try:
        backend = SinkBackend(w, "stdout")
        guest = Guest(backend, CONSOLE)
        guest.open()
        if when == "before-start":
            os.close(r)
        async with running(backend):
            if when == "while-running":
                guest.write(b"seen\n")
                await wait_until(lambda: backend.counters.bytes_written == 5)
                assert os.read(r, 5) == b"seen\n"
                os.close(r)
            for _ in range(10):
                guest.write(b"z" * 10_000)
                await guest.drain()
            await wait_until(lambda: backend.failed is not None)
            for _ in range(10):
                guest.write(b"z" * 10_000)
                await guest.drain()
        c = backend.counters
        assert c.bytes_written + c.bytes_dropped == guest.port.counters.bytes_from_guest
        assert c.bytes_dropped >= 100_000  # at least what came after the failure
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith("stdout: "), errors
        assert "reader went away" in errors[0] or "Broken pipe" in errors[0]
    finally:
        os.close(w)


async def test_a_regular_file_is_written_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        backend = SinkBackend(fd)
        guest = Guest(backend, CONSOLE)
        payload = os.urandom(300_000)
        async with running(backend):
            guest.open()
            for i in range(0, len(payload), 4096):
                guest.write(payload[i : i + 4096])
                await guest.drain()
                await wait_until(lambda: not backend._out)
    finally:
        os.close(fd)
    assert path.read_bytes() == payload


async def test_a_socket_is_written_without_changing_its_flags() -> None:
    mine, theirs = socket.socketpair()
    with mine, theirs:
        backend = SinkBackend(mine.fileno())
        guest = Guest(backend, CONSOLE)
        async with running(backend):
            guest.open()
            guest.write(b"to journald, say")
            await guest.drain()
            await wait_until(lambda: backend.counters.bytes_written == 16)
            assert theirs.recv(100) == b"to journald, say"
            assert mine.getblocking()


def test_stdout_writes_fd_1() -> None:
    assert Stdout.from_options({}, "test").target == 1
