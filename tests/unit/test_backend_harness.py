"""Helpers for backend tests, around `vhostser.testing.PortGuest` (a guest in a box for one
port, no virtqueues). Imported by the other `test_backend_*` modules; its own tests check the
harness against the simple backends.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from vhostser.backends.simple import EchoBackend, RecordingBackend
from vhostser.testing.port_guest import TIMEOUT, PortGuest

# The name the backend tests use for the guest in a box.
Guest = PortGuest


async def wait_until(cond: Callable[[], object], timeout: float = TIMEOUT) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


@asynccontextmanager
async def running(backend: Any) -> AsyncIterator[Any]:
    """Run `backend.run` (started: bound / pty open) for the body, cancel it after."""
    async with trio.open_nursery() as nursery:
        started = await nursery.start(backend.run)
        yield started
        nursery.cancel_scope.cancel()


async def unix_connect(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return trio.SocketStream(sock)


async def receive_exactly(stream: trio.SocketStream, n: int, timeout: float = TIMEOUT) -> bytes:
    out = bytearray()
    with trio.fail_after(timeout):
        while len(out) < n:
            chunk = await stream.receive_some(n - len(out))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
    return bytes(out)


async def receive_until_eof(stream: trio.SocketStream, timeout: float = TIMEOUT) -> bytes:
    out = bytearray()
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            out += chunk
    return bytes(out)


# -------------------------------------------------------------------- the harness itself


async def test_harness_echo_round_trip() -> None:
    guest = Guest(EchoBackend())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest.port.backend.run)
        await wait_until(lambda: guest.host_open)
        guest.open()
        payload = bytes(range(256)) * 1024  # 256 KiB: 4x the staging buffer
        reader = trio.Event()
        got = bytearray()

        async def read_back() -> None:
            got.extend(await guest.read_exactly(len(payload)))
            reader.set()

        nursery.start_soon(read_back)
        guest.write(payload)
        await guest.drain()
        await reader.wait()
        assert bytes(got) == payload
        nursery.cancel_scope.cancel()


def test_harness_holds_refused_writes() -> None:
    backend = RecordingBackend()
    guest = Guest(backend)
    guest.port.host_attach()
    guest.open()
    backend.accept = False
    guest.write(b"abc")
    assert guest.pending == b"abc"
    backend.accept = True
    guest.port.resume_guest_data()
    assert not guest.pending
    assert backend.data[1] == b"abc"
    assert guest.host_opens() == [1]
