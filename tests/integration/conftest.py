"""Integration harness: the real vhost-user server side in-process, on a real unix socket.

`server` listens in a temporary directory and serves one front-end connection after another
with `serve_connection`, all against one `VhostUserBackend` wrapping `EchoDevice`: a two-queue
device that echoes what the driver writes on queue 1 (tx) back into the buffers of queue 0 (rx).
The front end under test is `vhostser.testing`, talking over memfd, eventfds and SCM_RIGHTS.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from vhostser.testing import FrontEnd, open_frontend
from vhostser.vhost_user import Outcome, VhostUserBackend, Vring, serve_connection
from vhostser.vhost_user.messages import Header, request_name
from virtqueue import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    ChainError,
    RingError,
    SplitQueue,
)

log = logging.getLogger("tests.echo")

RX, TX = 0, 1
ECHO_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC
ECHO_CONFIG = (80).to_bytes(2, "little") + (25).to_bytes(2, "little") + bytes(8)


class EchoDevice:
    """A two-queue test device: bytes read from tx chains come back in rx chains.

    Each started queue gets a task (in the nursery given at construction) that waits on the
    kick eventfd and services the ring; queue_stopped cancels it. It never keeps a chain
    across a checkpoint, so a stop always leaves `next_avail` where the ring resumes.
    """

    num_queues = 2
    max_queue_size = 1024
    features = ECHO_FEATURES

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.events: list[tuple[Any, ...]] = []
        self.pending = bytearray()
        self.config = bytearray(ECHO_CONFIG)
        self.vrings: dict[int, Vring] = {}
        self._scopes: dict[int, trio.CancelScope] = {}

    # ---- Device protocol

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size]).ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        self.events.append(("set_config", offset, data))

    def features_acked(self, features: int) -> None:
        self.events.append(("features", features))

    def queue_started(self, vring: Vring) -> None:
        self.events.append(("started", vring.index))
        self.vrings[vring.index] = vring
        scope = trio.CancelScope()
        self._scopes[vring.index] = scope
        self._nursery.start_soon(self._run, vring, scope)

    def queue_stopped(self, vring: Vring) -> None:
        assert vring.queue is not None
        self.events.append(("stopped", vring.index, vring.queue.next_avail))
        self._scopes.pop(vring.index).cancel()
        del self.vrings[vring.index]

    def status_changed(self, status: int) -> None:
        self.events.append(("status", status))

    def reset(self) -> None:
        self.events.append(("reset",))
        self.pending.clear()

    # ---- the queue tasks

    def started(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "started"]

    async def _run(self, vring: Vring, scope: trio.CancelScope) -> None:
        with scope:
            if scope.cancel_called:  # stopped before this task ever ran
                return
            kick_fd = vring.kick_fd
            assert kick_fd is not None
            while True:
                try:
                    self._service(vring.index)
                except RingError as e:
                    log.warning("vring %d broken: %s", vring.index, e)
                    return
                await trio.lowlevel.wait_readable(kick_fd)
                try:
                    os.eventfd_read(kick_fd)
                except BlockingIOError:
                    pass

    def _service(self, index: int) -> None:
        if index == TX:
            self._drain_tx()
        self._fill_rx()

    def _queue(self, index: int) -> tuple[Vring, SplitQueue] | None:
        vring = self.vrings.get(index)
        if vring is None or vring.queue is None:
            return None
        return vring, vring.queue

    def _drain_tx(self) -> None:
        found = self._queue(TX)
        if found is None:
            return
        vring, q = found
        while True:
            pushed = False
            while True:
                try:
                    chain = q.pop()
                except ChainError as e:
                    q.push(e.head, 0)
                    pushed = True
                    continue
                if chain is None:
                    break
                self.pending += chain.read()
                q.push(chain.head, 0)
                pushed = True
            if pushed and q.should_notify():
                vring.notify()
            if not q.enable_notifications():
                return

    def _fill_rx(self) -> None:
        found = self._queue(RX)
        if found is None:
            return
        vring, q = found
        while True:
            pushed = False
            while self.pending:
                try:
                    chain = q.pop()
                except ChainError as e:
                    q.push(e.head, 0)
                    pushed = True
                    continue
                if chain is None:
                    break
                with memoryview(self.pending) as view:
                    n = chain.write(view)
                del self.pending[:n]
                q.push(chain.head, n)
                pushed = True
            if pushed and q.should_notify():
                vring.notify()
            # Buffers waiting and nothing to put in them: the next tx kick brings more.
            if not q.enable_notifications() or not self.pending:
                return


class RecordingBackend(VhostUserBackend):
    """A VhostUserBackend recording what arrived on the wire: (request name, flags, fd count)."""

    def __init__(self, device: EchoDevice) -> None:
        super().__init__(device)
        self.wire: list[tuple[str, int, int]] = []

    def receive(self, header: Header, body: bytes, fds: Sequence[int]) -> Outcome:
        self.wire.append((request_name(header.request), header.flags, len(fds)))
        return super().receive(header, body, fds)


@dataclass
class Server:
    """The in-process back end: its socket path, device, backend and connection count."""

    path: str
    device: EchoDevice
    backend: RecordingBackend
    served: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    def frontend(self, **kwargs: Any) -> AbstractAsyncContextManager[FrontEnd]:
        """A new front-end connection (see `open_frontend` for the arguments)."""
        return open_frontend(self.path, **kwargs)

    @asynccontextmanager
    async def running(
        self,
        *,
        protocol_features: int | None = None,
        event_idx: bool = False,
        size: int = 64,
        base: int = 0,
        use_mem_table: bool = False,
    ) -> AsyncIterator[FrontEnd]:
        """A front end that went through realize and start with both queues."""
        async with self.frontend(protocol_features=protocol_features) as fe:
            await fe.realize(2)
            await fe.start(
                [RX, TX], size=size, event_idx=event_idx, base=base, use_mem_table=use_mem_table
            )
            yield fe

    async def wait_served(self, n: int, timeout: float = 5.0) -> None:
        """Wait until `n` connections have been served to their end."""
        with trio.fail_after(timeout):
            while self.served < n:
                await self._changed.wait()

    async def serve(self, listener: trio.socket.SocketType) -> None:
        """Accept and serve one connection after another, as the daemon does."""
        with listener:
            while True:
                sock, _ = await listener.accept()
                with sock:
                    await serve_connection(sock, self.backend)
                self.served += 1
                self._changed.set()
                self._changed = trio.Event()

    def driver(self, fe: FrontEnd, **kwargs: Any) -> EchoDriver:
        """The guest side of the echo device on `fe`'s started queues."""
        return EchoDriver(fe, **kwargs)

    @staticmethod
    def open_fds() -> set[int]:
        """The fds open in this process (the server side runs in it too)."""
        return {int(name) for name in os.listdir("/proc/self/fd")}


class EchoDriver:
    """A guest driver for EchoDevice: writes on tx in `buf_size` chains of `pieces`
    descriptors each (or one indirect table of them) and keeps rx stocked with buffers."""

    def __init__(
        self, fe: FrontEnd, *, buf_size: int = 4096, pieces: int = 1, indirect: bool = False
    ) -> None:
        self.fe = fe
        self.buf_size = buf_size
        self.pieces = pieces
        self.indirect = indirect
        self.tx, self.rx = fe.queue(TX), fe.queue(RX)
        nbufs = self.tx.size if indirect else max(1, self.tx.size // pieces)
        self._tx_slots = [(fe.alloc(buf_size), fe.alloc(16 * pieces)) for _ in range(nbufs)]
        self._rx_bufs: dict[int, int] = {}
        for _ in range(self.rx.size):
            gpa = fe.alloc(buf_size)
            self._rx_bufs[self.rx.add([], [(gpa, buf_size)])] = gpa
        fe.kick(RX)
        #: Chains completed per queue, which is what the rings' indexes moved by.
        self.completed = {RX: 0, TX: 0}

    async def echo(self, data: bytes, *, timeout: float = 5.0) -> bytes:
        """Send `data` through the device and return what came back."""
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._transmit, data, timeout)
            nursery.start_soon(self._receive, received, len(data), timeout)
        return bytes(received)

    async def receive(self, size: int, *, timeout: float = 5.0) -> bytes:
        """Take `size` bytes from rx (sent some other way than `echo`)."""
        received = bytearray()
        await self._receive(received, size, timeout)
        return bytes(received)

    async def _transmit(self, data: bytes, timeout: float) -> None:
        q, fe = self.tx, self.fe
        free = list(range(len(self._tx_slots)))
        in_flight: dict[int, int] = {}
        sent = 0
        need = 1 if self.indirect else self.pieces
        while sent < len(data) or in_flight:
            added = False
            while sent < len(data) and free and q.free_descriptors >= need:
                slot = free.pop()
                buf, table = self._tx_slots[slot]
                chunk = data[sent : sent + self.buf_size]
                fe.write(buf, chunk)
                head = q.add(
                    _split(buf, len(chunk), self.pieces),
                    indirect_table=table if self.indirect else None,
                )
                in_flight[head] = slot
                sent += len(chunk)
                added = True
            if added:
                fe.kick(TX)
            if in_flight:
                for head, written in await fe.collect_used(TX, timeout):
                    assert written == 0
                    free.append(in_flight.pop(head))
                    self.completed[TX] += 1

    async def _receive(self, received: bytearray, total: int, timeout: float) -> None:
        q, fe = self.rx, self.fe
        while len(received) < total:
            done = await fe.collect_used(RX, timeout)
            # Take every buffer back before re-adding any: add() reuses freed heads.
            gpas = [self._rx_bufs.pop(head) for head, _ in done]
            for gpa, (_, written) in zip(gpas, done, strict=True):
                received += fe.read(gpa, written)
            for gpa in gpas:
                self._rx_bufs[q.add([], [(gpa, self.buf_size)])] = gpa
            self.completed[RX] += len(done)
            fe.kick(RX)


def _split(gpa: int, length: int, pieces: int) -> list[tuple[int, int]]:
    step = max(1, -(-length // pieces))
    return [(gpa + o, min(step, length - o)) for o in range(0, length, step)]


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    if len(str(tmp_path)) < 90:
        yield tmp_path
        return
    short = tempfile.mkdtemp(prefix="vhs-")
    try:
        yield Path(short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
async def server(nursery: trio.Nursery, socket_dir: Path) -> Server:
    """The back end, listening; it lives (and its device tasks run) until the test ends."""
    path = str(socket_dir / "vhost.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    device = EchoDevice(nursery)
    srv = Server(path, device, RecordingBackend(device))
    nursery.start_soon(srv.serve, listener)
    return srv
