"""A guest in a box for backend tests: drives a Port the way the device does, no virtqueues.

`Guest` opens and closes the port (control inputs), writes like a tx queue (a refused write
is held and offered again when the port pokes tx, exactly as the device keeps a pending
chain), and reads like an rx queue (`take_staged` / `consumed`). Imported by the other
`test_backend_*` modules; its own tests check the harness against the simple backends.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from vhostser.backends.base import PortBackend
from vhostser.backends.simple import EchoBackend, RecordingBackend
from vhostser.console.control import ControlMessage, Event
from vhostser.console.port import Port, PortConfig
from vhostser.console.session import Input, State

TIMEOUT = 3.0


class Guest:
    def __init__(self, backend: PortBackend, config: PortConfig | None = None) -> None:
        self.control: list[ControlMessage] = []
        self.port = Port(config or PortConfig(1, name="org.test.0"), backend,
                         send_control=self.control.append)
        self.port.announce()  # the guest answered PORT_READY: host PORT_OPEN is sent from now
        self.port.poke_tx = self._poke_tx
        self.port.poke_rx = self._poke_rx
        self.pending: bytearray = bytearray()
        self.written = 0  # bytes the port took from us (delivered or dropped)
        self._tx = trio.Event()
        self._rx = trio.Event()

    # -- control
    def open(self) -> None:
        self.port.apply(Input.GUEST_OPEN)

    def close(self) -> None:
        self.port.apply(Input.GUEST_CLOSE)

    def reset(self) -> None:
        self.port.apply(Input.RESET)

    @property
    def state(self) -> State:
        return self.port.state

    @property
    def host_open(self) -> bool:
        return self.port.state.host_open

    def host_opens(self) -> list[int]:
        """The host PORT_OPEN values the guest was sent, in order."""
        return [m.value for m in self.control if m.event is Event.PORT_OPEN]

    # -- tx (guest → host)
    def _poke_tx(self) -> None:
        self._tx.set()
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            if not self.port.guest_may_write():
                return
            chunk = bytes(self.pending[:4096])
            if not self.port.guest_bytes(chunk):
                return
            del self.pending[: len(chunk)]
            self.written += len(chunk)

    def write(self, data: bytes) -> None:
        """Queue bytes to write, in 4 KiB chains; they move as far as the port takes them."""
        self.pending += data
        self._flush()

    async def drain(self, timeout: float = TIMEOUT) -> None:
        """Until every queued byte was taken by the port."""
        with trio.fail_after(timeout):
            while self.pending:
                self._tx = trio.Event()
                self._flush()
                if self.pending:
                    await self._tx.wait()

    # -- rx (host → guest)
    def _poke_rx(self) -> None:
        self._rx.set()

    def read(self) -> bytes:
        n = self.port.staged
        data = bytes(self.port.take_staged(n))
        if n:
            self.port.consumed(n)
        return data

    async def read_exactly(self, n: int, timeout: float = TIMEOUT) -> bytes:
        out = bytearray()
        with trio.fail_after(timeout):
            while len(out) < n:
                self._rx = trio.Event()
                want = n - len(out)
                k = min(want, self.port.staged)
                if k:
                    out += self.port.take_staged(k)
                    self.port.consumed(k)
                    continue
                await self._rx.wait()
        return bytes(out)


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
