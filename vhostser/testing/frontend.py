"""A vhost-user front end in Python: what QEMU does, in the order it does it.

`open_frontend(path)` connects to a vhost-user back end's unix socket and gives a `FrontEnd`
that plays QEMU's part with the real mechanisms, never a shortcut: guest RAM is a memfd mapped
shared and handed over with SCM_RIGHTS, kicks, calls and errors are real eventfds, replies are
read off the socket, and the back end's own requests arrive on a socketpair given with
SET_BACKEND_REQ_FD. The driver side of each virtqueue is a `virtqueue.DriverQueue` laid out in
that guest RAM, so a test moves bytes through the same rings, fds and memory a guest would.

The message sequence follows a recording of QEMU 11.1.3 driving a vhost-user-device:

- `realize(n)`: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
  GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD, SET_OWNER, GET_FEATURES, then per queue
  SET_VRING_CALL and SET_VRING_ERR;
- `start(queues)` (the guest set DRIVER_OK): SET_FEATURES, GET_STATUS, SET_STATUS(FEATURES_OK),
  ADD_MEM_REG (or SET_MEM_TABLE), per used queue SET_VRING_NUM/BASE/ADDR/KICK/CALL, per queue
  SET_VRING_ENABLE(1), per queue SET_VRING_CALL with a fresh eventfd;
- `stop()` (guest poweroff, VM stop): per queue SET_VRING_ENABLE(0), per used queue
  GET_VRING_BASE; `stop(pause=True)` (VM pause) adds SET_STATUS(0).

A multiport virtio-console guest reads the config space (`get_config(0, 12)`) between
`realize` and `start`, as QEMU forwards the guest's read before SET_FEATURES.

Steps that depend on a protocol feature are skipped when it was not negotiated, as QEMU does.
Requests QEMU sends with NEED_REPLY get it when REPLY_ACK was negotiated and every ack is read
and checked; without REPLY_ACK a GET_FEATURES after each SET_VRING_ENABLE is the barrier.

This module knows vhost-user and split virtqueues, nothing of any device type: a guest driver
for a particular device (the virtio-console one) is built on top of it.
"""

from __future__ import annotations

import array
import fcntl
import logging
import math
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio

from virtqueue import VIRTIO_F_RING_EVENT_IDX, DriverQueue, MappedMemory, Region, ring_layout

from ..fds import close_fd, wait_eventfd
from ..vhost_user.connection import receive_message
from ..vhost_user.errors import FramingError, MessageError
from ..vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    REQUESTS,
    U64,
    BackendRequest,
    ConfigSpace,
    DeviceStateTransfer,
    Header,
    MemoryTable,
    Payload,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    TransferDirection,
    TransferPhase,
    VringAddr,
    VringFile,
    VringState,
    encode,
    encode_reply,
    request_name,
)

__all__ = [
    "DEFAULT_MEM_SIZE",
    "IMPLEMENTED_PROTOCOL_FEATURES",
    "STATUS_FEATURES_OK",
    "AckError",
    "BackendClosedError",
    "BackendMessage",
    "FrontEnd",
    "FrontEndError",
    "open_frontend",
    "sealed_memfd",
]

log = logging.getLogger("vhostser.testing.frontend")

# The protocol features this front end knows how to use; what it acks is this set intersected
# with what the back end offers, as QEMU does with its own mask.
IMPLEMENTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.DEVICE_STATE
)
DEFAULT_MEM_SIZE = 16 << 20
STATUS_FEATURES_OK = 0x8
# Guest RAM starts here, guest-physically; it is not 0 so that a back end that confuses a
# guest-physical address with an offset into the region is caught.
DEFAULT_GPA_BASE = 0x4000_0000
# The "front-end virtual address" of guest RAM sent in memory regions and SET_VRING_ADDR.
# QEMU sends the address of its own mapping; a back end only uses it as a key to translate
# ring addresses, so a fixed value distinct from the guest-physical one is as good a test.
DEFAULT_UVA_BASE = 0x7F5E_0000_0000
RING_ALIGN = 4096


class FrontEndError(Exception):
    """The back end answered something the front end cannot go on from."""


class AckError(FrontEndError):
    """A request sent with NEED_REPLY was acknowledged with a nonzero (failure) status."""

    def __init__(self, request: int, status: int) -> None:
        super().__init__(f"{request_name(request)}: the back end replied failure status {status}")
        self.request = request
        self.status = status


class BackendClosedError(FrontEndError):
    """The back end closed the connection while the front end waited for a reply."""


@dataclass(frozen=True, slots=True)
class BackendMessage:
    """One request the back end sent on the back-end channel (SET_BACKEND_REQ_FD)."""

    request: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        try:
            return BackendRequest(self.request).name
        except ValueError:
            return f"backend request {self.request}"


@dataclass(slots=True)
class _Vq:
    """The front end's side of one virtqueue: its eventfds and, once started, its rings."""

    index: int
    call_fd: int | None = None
    err_fd: int | None = None
    kick_fd: int | None = None
    # Set by start(): ring geometry in guest RAM and the driver using it.
    size: int = 0
    start_idx: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    driver: DriverQueue | None = None


def _transfer_accepted(reply: bytes) -> None:
    status = _parse(Request.SET_DEVICE_STATE_FD, U64, reply).value
    if status & 0xFF:
        raise FrontEndError(f"SET_DEVICE_STATE_FD: the back end refused ({status:#x})")


async def _read_some(fd: int) -> bytes:
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, 1 << 16)
        except BlockingIOError:
            continue


def sealed_memfd(name: str, size: int) -> int:
    """A memfd of `size` bytes sealed as QEMU's memory-backend-memfd (seal=on) seals guest
    RAM: its size can never change under a back end's mapping (ftruncate fails with EPERM)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _new_eventfd() -> int:
    # As QEMU's event_notifier_init: non-blocking, close-on-exec.
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _close_watched(fd: int | None) -> None:
    """close_fd, first waking any task waiting on `fd` (wait_call, wait_err) with
    trio.ClosedResourceError, so none is left polling a number that may be reused."""
    if fd is not None:
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:  # outside trio: nobody can be waiting on it
            pass
    close_fd(fd)


class FrontEnd:
    """One connection to a vhost-user back end, driven as QEMU drives it.

    Make it with `open_frontend`. The high-level steps (`realize`, `start`, `stop`, `resume`,
    `reset_device`, `get_config`, `set_config`) send QEMU's sequences and record every request
    name in `log`; the low-level ones (`request`, `send_raw`, `receive_raw`, `barrier`) send
    anything, for bad-input tests. A request whose reply is never read (timed out, cancelled,
    malformed) leaves the conversation out of step, and every later request fails.

    Guest RAM is `mem` (guest-physical views), with `alloc`, `read` and `write`; the driver
    side of a started queue is `queue(i)` (a `virtqueue.DriverQueue`), notified with `kick`,
    and its completions come with `wait_call` / `collect_used`. Requests that the back end
    sends on its own channel are acknowledged and appear on `backend_requests`.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        mem_size: int,
        protocol_features: int | None,
        reply_timeout: float,
        gpa_base: int = DEFAULT_GPA_BASE,
        uva_base: int = DEFAULT_UVA_BASE,
    ) -> None:
        if protocol_features is not None and protocol_features & ~IMPLEMENTED_PROTOCOL_FEATURES:
            raise ValueError(
                f"protocol features 0x{protocol_features:x} include bits this front end "
                f"does not implement (0x{protocol_features & ~IMPLEMENTED_PROTOCOL_FEATURES:x})"
            )
        if mem_size <= 0 or mem_size % mmap.PAGESIZE:
            raise ValueError(f"guest RAM size {mem_size} is not a positive number of pages")
        self._sock = sock
        # Runs the back-end channel task; open_frontend provides it.
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        # The request whose reply was never read (cancelled, malformed): the stream is out of
        # step from then on and every later request fails rather than read a stale reply.
        self._broken: str | None = None
        self._wanted_protocol_features = (
            IMPLEMENTED_PROTOCOL_FEATURES if protocol_features is None else protocol_features
        )
        self.reply_timeout = reply_timeout
        #: Names of the requests sent, in order (raw sends included).
        self.log: list[str] = []
        #: What GET_FEATURES and GET_PROTOCOL_FEATURES reported, and what was acked.
        self.device_features = 0
        self.offered_protocol_features = 0
        self.protocol_features = ProtocolFeature(0)
        self.acked_features = 0
        #: GET_QUEUE_NUM and GET_MAX_MEM_SLOTS answers (None when not asked).
        self.max_queues: int | None = None
        self.max_mem_slots: int | None = None
        self._vqs: list[_Vq] = []
        self._used: tuple[int, ...] = ()
        self._running = False
        self._bases: dict[int, int] | None = None
        self._mem_added = False
        self._use_mem_table = False
        self._backend_sock: trio.socket.SocketType | None = None
        send, receive = trio.open_memory_channel[BackendMessage](math.inf)
        self._backend_send = send
        #: Requests received on the back-end channel, already acknowledged.
        self.backend_requests: trio.MemoryReceiveChannel[BackendMessage] = receive
        self._closed = False

        # Guest RAM: one memfd, mapped shared here and sent to the back end.
        self.gpa_base = gpa_base
        self.uva_base = uva_base
        self.mem_size = mem_size
        self._memfd: int | None = sealed_memfd("vhostser-guest-ram", mem_size)
        try:
            self.region = Region(gpa_base, mem_size, uva_base, 0)
            #: The guest's RAM, addressed guest-physically.
            self.mem = MappedMemory()
            self.mem.add(self.region, self._memfd)
        except BaseException:
            os.close(self._memfd)
            raise
        # The first page stays unused, as in a real guest nothing lives at the very start.
        self._next_free = gpa_base + mmap.PAGESIZE

    # ------------------------------------------------------------------ properties

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated."""
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def num_queues(self) -> int:
        """How many virtqueues `realize` set up."""
        return len(self._vqs)

    @property
    def used_queues(self) -> tuple[int, ...]:
        """The queues the guest driver uses (given to `start`)."""
        return self._used

    @property
    def running(self) -> bool:
        """Whether the rings are started (between `start`/`resume` and `stop`)."""
        return self._running

    def queue(self, index: int) -> DriverQueue:
        """The driver side of started queue `index`."""
        vq = self._vq(index)
        if vq.driver is None:
            raise FrontEndError(f"queue {index} was not started")
        return vq.driver

    def uva(self, gpa: int) -> int:
        """The front-end virtual address of guest-physical `gpa`."""
        return self.uva_base + (gpa - self.gpa_base)

    # ------------------------------------------------------------------ guest RAM

    def alloc(self, size: int, *, align: int = 16) -> int:
        """Reserve `size` bytes of guest RAM (never freed) and return their guest address."""
        if size < 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation: size {size}, alignment {align}")
        gpa = (self._next_free + align - 1) & ~(align - 1)
        if gpa + size > self.gpa_base + self.mem_size:
            raise FrontEndError(
                f"guest RAM exhausted: {size} bytes wanted, "
                f"{self.gpa_base + self.mem_size - gpa} left"
            )
        self._next_free = gpa + size
        return gpa

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` into guest RAM at `gpa`."""
        self.mem.view(gpa, len(data))[:] = data

    def read(self, gpa: int, size: int) -> bytes:
        """Read `size` bytes of guest RAM at `gpa`."""
        return bytes(self.mem.view(gpa, size))

    # ------------------------------------------------------------------ QEMU's sequences

    async def realize(self, num_queues: int) -> None:
        """Device realize: feature and protocol negotiation, the back-end channel, SET_OWNER,
        and the (masked) call and err eventfds of `num_queues` queues."""
        if self._vqs:
            raise FrontEndError("realize() was already done on this connection")
        if num_queues <= 0:
            raise ValueError(f"a device has at least one queue, not {num_queues}")
        self.device_features = await self._get_u64(Request.GET_FEATURES)
        if self.device_features & F_PROTOCOL_FEATURES:
            self.offered_protocol_features = await self._get_u64(Request.GET_PROTOCOL_FEATURES)
            acked = self.offered_protocol_features & self._wanted_protocol_features
            await self.request(Request.SET_PROTOCOL_FEATURES, U64(acked))
            self.protocol_features = ProtocolFeature(acked)
        if self.protocol_features & ProtocolFeature.MQ:
            self.max_queues = await self._get_u64(Request.GET_QUEUE_NUM)
            if num_queues > self.max_queues:
                raise FrontEndError(
                    f"{num_queues} queues wanted, the back end has {self.max_queues}"
                )
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = await self._get_u64(Request.GET_MAX_MEM_SLOTS)
        if self.protocol_features & ProtocolFeature.BACKEND_REQ:
            await self._open_backend_channel()
        await self.request(Request.SET_OWNER)
        self.device_features = await self._get_u64(Request.GET_FEATURES)
        self._vqs = [_Vq(i) for i in range(num_queues)]
        for vq in self._vqs:
            await self._set_call(vq)
            vq.err_fd = _new_eventfd()
            await self._qemu_request(
                Request.SET_VRING_ERR, VringFile(vq.index, False), fds=(vq.err_fd,)
            )

    async def start(
        self,
        queues: Sequence[int],
        *,
        size: int | Mapping[int, int] = 64,
        features: int | None = None,
        event_idx: bool = False,
        base: int | Mapping[int, int] = 0,
        use_mem_table: bool = False,
    ) -> None:
        """The guest set DRIVER_OK: ack features, share guest RAM, lay out and start the rings
        of `queues` (the ones the guest driver uses) and enable every queue.

        `features` are the virtio features the guest acks (default: all the device offers but
        EVENT_IDX, which `event_idx` decides); `size` and `base` are per queue or for all;
        `use_mem_table` sends SET_MEM_TABLE even when CONFIGURE_MEM_SLOTS was negotiated.
        """
        if not self._vqs:
            raise FrontEndError("start() before realize()")
        if self._running:
            raise FrontEndError("the rings are already started; stop() first")
        if not queues or len(set(queues)) != len(queues):
            raise ValueError(f"queues {list(queues)}: need distinct queue indexes")
        for i in queues:
            self._vq(i)
        offered = self.device_features & ~F_PROTOCOL_FEATURES
        wanted = offered & ~VIRTIO_F_RING_EVENT_IDX if features is None else features
        if event_idx:
            wanted |= VIRTIO_F_RING_EVENT_IDX
        else:
            wanted &= ~VIRTIO_F_RING_EVENT_IDX
        if wanted & ~offered:
            raise FrontEndError(f"features 0x{wanted:x} include bits not offered")
        self.acked_features = wanted | (self.device_features & F_PROTOCOL_FEATURES)
        self._used = tuple(queues)
        self._use_mem_table = use_mem_table
        for i in queues:
            vq = self._vqs[i]
            n = size if isinstance(size, int) else size[i]
            vq.start_idx = base if isinstance(base, int) else base.get(i, 0)
            if vq.size != n:  # first start, or a new size: lay the rings out afresh
                vq.size = n
                desc_off, avail_off, used_off, total = ring_layout(n)
                ring = self.alloc(total, align=RING_ALIGN)
                vq.desc, vq.avail, vq.used = ring + desc_off, ring + avail_off, ring + used_off
            vq.driver = DriverQueue(
                self.mem,
                n,
                vq.desc,
                vq.avail,
                vq.used,
                event_idx=event_idx,
                start_idx=vq.start_idx,
            )
        await self._start_sequence({i: self._vqs[i].start_idx for i in queues})

    async def stop(self, *, pause: bool = False) -> dict[int, int]:
        """Stop the rings as QEMU does at guest poweroff or VM stop: disable every queue and
        take each used queue's base (GET_VRING_BASE). With `pause` (a paused VM), also set
        status 0 when STATUS was negotiated; that is not a reset.

        Returns {queue: base}; `resume()` continues from there."""
        if not self._running:
            raise FrontEndError("stop() while the rings are not started")
        for vq in self._vqs:
            await self._set_enable(vq.index, False)
        bases: dict[int, int] = {}
        for i in self._used:
            body = await self.request(Request.GET_VRING_BASE, VringState(i, 0))
            state = _parse(Request.GET_VRING_BASE, VringState, body)
            if state.index != i:
                raise FrontEndError(f"GET_VRING_BASE {i}: the reply is for vring {state.index}")
            bases[i] = state.num
        if pause and self.protocol_features & ProtocolFeature.STATUS:
            await self.request(Request.SET_STATUS, U64(0))
        self._running = False
        self._bases = bases
        return bases

    async def resume(self) -> None:
        """Restart the rings after `stop()`, continuing from the bases it returned: the guest's
        rings are untouched, only the back end is told again (QEMU's vhost_dev_start)."""
        if self._running or self._bases is None:
            raise FrontEndError("resume() needs a stop() first")
        await self._start_sequence(self._bases)

    async def reset_device(self) -> None:
        """RESET_DEVICE (RESET_OWNER without the protocol feature): the back end forgets the
        device state and the guest driver starts over; `start()` may follow."""
        req = (
            Request.RESET_DEVICE
            if self.protocol_features & ProtocolFeature.RESET_DEVICE
            else Request.RESET_OWNER
        )
        await self.request(req)
        self._running = False
        self._bases = None
        for vq in self._vqs:
            vq.driver = None

    # ------------------------------------------------------------------ migration

    async def save_device_state(self) -> bytes:
        """The back end's state, as QEMU's migration source takes it: SET_DEVICE_STATE_FD
        (SAVE, the device suspended) with a pipe, read to its end, CHECK_DEVICE_STATE."""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            try:
                reply = await self.request(
                    Request.SET_DEVICE_STATE_FD,
                    DeviceStateTransfer(TransferDirection.SAVE, TransferPhase.STOPPED), fds=(w,))
            finally:
                os.close(w)
            _transfer_accepted(reply)
            data = bytearray()
            while chunk := await _read_some(r):
                data += chunk
        finally:
            _close_watched(r)
        await self._check_device_state()
        return bytes(data)

    async def load_device_state(self, data: bytes) -> None:
        """Hand a state to the back end, as QEMU's migration destination does: LOAD with a
        pipe, the state written and the pipe closed, CHECK_DEVICE_STATE."""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            try:
                reply = await self.request(
                    Request.SET_DEVICE_STATE_FD,
                    DeviceStateTransfer(TransferDirection.LOAD, TransferPhase.STOPPED), fds=(r,))
            finally:
                os.close(r)
            _transfer_accepted(reply)
            view = memoryview(data)
            while view:
                await trio.lowlevel.wait_writable(w)
                try:
                    view = view[os.write(w, view):]
                except BlockingIOError:
                    continue
        finally:
            _close_watched(w)
        await self._check_device_state()

    async def _check_device_state(self) -> None:
        if status := await self._get_u64(Request.CHECK_DEVICE_STATE):
            raise FrontEndError(f"CHECK_DEVICE_STATE: the back end reports {status}")

    async def migrate_to(self, path: str | os.PathLike[str]) -> None:
        """Move the running device to the back end listening at `path`, as a migration of the
        VM does: the rings stop (the VM pauses), the state is saved from this back end, a new
        connection is realized, the state loaded, and the rings start where they stopped. The
        guest's memory, rings and driver stay as they are; the old connection closes."""
        bases = await self.stop(pause=True)
        state = await self.save_device_state()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(os.fspath(path))
        old, self._sock = self._sock, sock
        old.close()
        if self._backend_sock is not None:
            self._backend_sock.close()
            self._backend_sock = None
        vqs, self._vqs = self._vqs, []
        self._mem_added = False
        self.log.append("-- migrated --")
        await self.realize(len(vqs))
        for fresh, moved in zip(self._vqs, vqs, strict=True):
            for fd in (moved.call_fd, moved.err_fd):
                _close_watched(fd)
            moved.call_fd, moved.err_fd = fresh.call_fd, fresh.err_fd
        self._vqs = vqs
        await self.load_device_state(state)
        await self._start_sequence(bases)

    async def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: `size` bytes of the device's config space from `offset`."""
        body = await self.request(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)))
        reply = _parse(Request.GET_CONFIG, ConfigSpace, body)
        if (reply.offset, reply.size) != (offset, size):
            raise FrontEndError(
                f"GET_CONFIG {offset}+{size}: the reply is for {reply.offset}+{reply.size}"
            )
        return reply.data

    async def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: the driver writes config space (acked when REPLY_ACK is on)."""
        await self._qemu_request(Request.SET_CONFIG, ConfigSpace(offset, len(data), 0, data))

    async def set_vring_fd(self, request: Request, index: int, fd: int) -> None:
        """Give the back end `fd` as queue `index`'s kick, call or err eventfd (request
        SET_VRING_KICK, SET_VRING_CALL or SET_VRING_ERR; acked when REPLY_ACK is on) and use
        it from now on in place of the one it replaces, as QEMU does when it changes a
        notifier. The front end owns `fd` from then on; refused (AckError), it is closed and
        the old one stays."""
        which = {Request.SET_VRING_KICK: "kick_fd", Request.SET_VRING_CALL: "call_fd",
                 Request.SET_VRING_ERR: "err_fd"}[request]
        vq = self._vq(index)
        try:
            await self._qemu_request(request, VringFile(index, False), fds=(fd,))
        except BaseException:
            os.close(fd)
            raise
        _close_watched(getattr(vq, which))
        setattr(vq, which, fd)

    # ------------------------------------------------------------------ data plane

    def kick(self, index: int, *, force: bool = False) -> bool:
        """Kick queue `index` if the device asked for it (or `force`); return whether it was."""
        vq = self._vq(index)
        if vq.kick_fd is None:
            raise FrontEndError(f"queue {index} has no kick eventfd (not started)")
        if not (self.queue(index).should_kick() or force):
            return False
        os.eventfd_write(vq.kick_fd, 1)
        return True

    async def wait_call(self, index: int, timeout: float = 5.0) -> int:
        """Wait until the device signals queue `index`'s call eventfd, drain it and return its
        count; trio.TooSlowError after `timeout` seconds, trio.ClosedResourceError if the
        eventfd is replaced meanwhile (`start`/`resume` give the back end fresh ones)."""
        fd = self._vq(index).call_fd
        if fd is None:
            raise FrontEndError(f"queue {index} has no call eventfd")
        with trio.fail_after(timeout):
            return await wait_eventfd(fd)

    async def wait_err(self, index: int, timeout: float = 5.0) -> int:
        """Wait until the back end signals queue `index`'s err eventfd; as `wait_call`."""
        fd = self._vq(index).err_fd
        if fd is None:
            raise FrontEndError(f"queue {index} has no err eventfd")
        with trio.fail_after(timeout):
            return await wait_eventfd(fd)

    async def collect_used(self, index: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Every (head, written) the device has returned on queue `index`, waiting for at
        least one as a guest driver does: re-enable interrupts, recheck, sleep on the call."""
        q = self.queue(index)
        with trio.fail_after(timeout):
            while True:
                done: list[tuple[int, int]] = []
                while (item := q.get_used()) is not None:
                    done.append(item)
                if done:
                    return done
                if q.enable_interrupts():
                    continue
                try:
                    await self.wait_call(index, math.inf)
                except trio.ClosedResourceError:
                    # resume() replaced the call eventfd: whatever was signalled on the old
                    # one is in the used ring, which the loop looks at again.
                    pass

    # ------------------------------------------------------------------ low level

    async def request(
        self,
        request: int,
        payload: Payload | bytes = b"",
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> bytes:
        """Send one request and return the body of its reply (b"" when none is due).

        A request with a reply of its own (GET_*) waits for it; `need_reply` sets NEED_REPLY
        and, when REPLY_ACK was negotiated, waits for the ack and raises AckError if it is
        nonzero. `fds` ride along with SCM_RIGHTS and stay owned by the caller.
        """
        flags = FLAG_NEED_REPLY if need_reply else 0
        try:
            has_reply = REQUESTS[Request(request)].reply is not None
        except (ValueError, KeyError):
            has_reply = False
        wants_ack = need_reply and self.reply_ack
        async with self._lock:
            await self._send(encode(request, payload, flags=flags), fds)
            if not (has_reply or wants_ack):
                return b""
            self._broken = f"{request_name(request)} was sent but its reply never read"
            body = await self._read_reply(request)
            if has_reply:
                self._broken = None
                return body
            if len(body) != U64.SIZE:
                raise FrontEndError(
                    f"{request_name(request)}: ack body is {len(body)} bytes, want 8"
                )
            self._broken = None
            status = U64.unpack(body).value
            if status:
                raise AckError(request, status)
            return body

    async def barrier(self) -> None:
        """Wait until the back end has handled everything sent so far: a GET_FEATURES round
        trip, QEMU's own barrier. Requests QEMU sends without NEED_REPLY (SET_STATUS,
        RESET_DEVICE, ...) are only known to be done after one."""
        await self._get_u64(Request.GET_FEATURES)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (a whole message, part of one, garbage) with `fds`."""
        async with self._lock:
            await self._send(data, fds)

    async def receive_raw(self, timeout: float = 5.0) -> tuple[Header, bytes] | None:
        """The next message from the back end as it came, or None once it closed the
        connection; trio.TooSlowError when nothing comes within `timeout` seconds."""
        async with self._lock:
            with trio.fail_after(timeout):
                try:
                    message = await receive_message(self._sock)
                except ConnectionResetError:
                    return None
        if message is None:
            return None
        header, body, fds = message
        for fd in fds:
            os.close(fd)
        return header, body

    async def aclose(self) -> None:
        """Close the connection, the back-end channel, every eventfd and guest RAM."""
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """`aclose` without the checkpoint, for cleanup code that must not be interrupted."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._backend_sock is not None:
            self._backend_sock.close()
        self._backend_send.close()
        for vq in self._vqs:
            for fd in (vq.kick_fd, vq.call_fd, vq.err_fd):
                _close_watched(fd)
            vq.kick_fd = vq.call_fd = vq.err_fd = None
            vq.driver = None
        self.mem.close()
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None

    # ------------------------------------------------------------------ internals

    def _vq(self, index: int) -> _Vq:
        if not 0 <= index < len(self._vqs):
            raise FrontEndError(f"no queue {index} (the device was realized with {len(self._vqs)})")
        return self._vqs[index]

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the front end is closed")
        if self._broken is not None:
            raise FrontEndError(f"the conversation is out of step: {self._broken}")
        self.log.append(request_name(HEADER.unpack_from(data)[0]) if len(data) >= 12 else "raw")
        ancdata = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = await self._sock.sendmsg([data], ancdata)
            while sent < len(data):
                sent += await self._sock.send(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise BackendClosedError(f"the back end closed the connection: {e}") from e

    async def _read_reply(self, request: int) -> bytes:
        name = request_name(request)
        try:
            with trio.fail_after(self.reply_timeout):
                message = await receive_message(self._sock)
        except trio.TooSlowError:
            raise FrontEndError(f"{name}: no reply within {self.reply_timeout} s") from None
        except (FramingError, ConnectionResetError) as e:
            raise BackendClosedError(f"{name}: connection failed waiting for the reply: {e}") from e
        if message is None:
            raise BackendClosedError(f"{name}: the back end closed the connection")
        header, body, fds = message
        for fd in fds:
            os.close(fd)
        if header.request != request or not header.flags & FLAG_REPLY:
            raise FrontEndError(
                f"{name}: got {request_name(header.request)} flags 0x{header.flags:x} "
                "instead of its reply"
            )
        return body

    async def _get_u64(self, request: Request) -> int:
        return _parse(request, U64, await self.request(request)).value

    async def _qemu_request(
        self, request: Request, payload: Payload | bytes = b"", *, fds: Sequence[int] = ()
    ) -> None:
        """A request QEMU sends with NEED_REPLY when REPLY_ACK is on, ack checked."""
        await self.request(request, payload, fds=fds, need_reply=self.reply_ack)

    async def _set_call(self, vq: _Vq) -> None:
        """Give the back end a fresh call eventfd for `vq`, then drop the one it replaces."""
        fd = _new_eventfd()
        try:
            await self._qemu_request(Request.SET_VRING_CALL, VringFile(vq.index, False), fds=(fd,))
        except BaseException:
            os.close(fd)
            raise
        if vq.call_fd is not None:
            # An interrupt the back end raised on the old eventfd before it switched must not
            # be lost: QEMU moves a pending notification over when it swaps notifiers.
            try:
                pending = os.eventfd_read(vq.call_fd)
            except BlockingIOError:
                pending = 0
            if pending:
                os.eventfd_write(fd, pending)
        _close_watched(vq.call_fd)
        vq.call_fd = fd

    async def _set_enable(self, index: int, enable: bool) -> None:
        await self._qemu_request(Request.SET_VRING_ENABLE, VringState(index, int(enable)))
        if not self.reply_ack:
            # QEMU's barrier when it cannot ask for an ack: a request with a reply.
            await self.barrier()

    async def _set_memory(self) -> None:
        if self._use_mem_table or not self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            # QEMU sends the whole table at every start.
            assert self._memfd is not None
            await self._qemu_request(
                Request.SET_MEM_TABLE, MemoryTable((self.region,)), fds=(self._memfd,)
            )
        elif not self._mem_added:
            # With memory slots QEMU only sends what changed since the last time.
            assert self._memfd is not None
            await self._qemu_request(
                Request.ADD_MEM_REG, SingleMemoryRegion(self.region), fds=(self._memfd,)
            )
        self._mem_added = True

    async def _start_sequence(self, bases: Mapping[int, int]) -> None:
        """vhost_dev_start: features, status, memory, then each used ring from `bases`."""
        await self.request(Request.SET_FEATURES, U64(self.acked_features))
        if self.protocol_features & ProtocolFeature.STATUS:
            status = await self._get_u64(Request.GET_STATUS)
            await self.request(Request.SET_STATUS, U64(status | STATUS_FEATURES_OK))
        await self._set_memory()
        for i, base in bases.items():
            vq = self._vqs[i]
            await self.request(Request.SET_VRING_NUM, VringState(i, vq.size))
            await self.request(Request.SET_VRING_BASE, VringState(i, base))
            await self.request(
                Request.SET_VRING_ADDR,
                VringAddr(i, 0, self.uva(vq.desc), self.uva(vq.used), self.uva(vq.avail), 0),
            )
            if vq.kick_fd is None:
                vq.kick_fd = _new_eventfd()
            await self._qemu_request(Request.SET_VRING_KICK, VringFile(i, False), fds=(vq.kick_fd,))
            await self._set_call(vq)
        for vq in self._vqs:
            await self._set_enable(vq.index, True)
        for vq in self._vqs:
            await self._set_call(vq)
        self._running = True
        self._bases = None

    async def _open_backend_channel(self) -> None:
        if self._nursery is None:
            raise FrontEndError("no nursery for the back-end channel: use open_frontend()")
        nursery = self._nursery
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._qemu_request(Request.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._backend_sock = trio.socket.from_stdlib_socket(ours)
        nursery.start_soon(self._serve_backend_channel, self._backend_sock)

    async def _serve_backend_channel(self, sock: trio.socket.SocketType) -> None:
        """Read the back end's requests, ack those that ask for it and queue them on
        `backend_requests`, until the channel closes."""
        while True:
            try:
                message = await receive_message(sock)
            except trio.ClosedResourceError:
                return
            except (OSError, FramingError) as e:
                log.warning("back-end channel failed: %s", e)
                return
            if message is None:
                return
            header, body, fds = message
            for fd in fds:
                os.close(fd)
            msg = BackendMessage(header.request, header.flags, body)
            log.debug("back-end request %s flags=0x%x", msg.name, msg.flags)
            if header.need_reply:
                try:
                    await sock.send(encode_reply(header.request, U64(0)))
                except (OSError, trio.ClosedResourceError) as e:
                    log.warning("back-end channel failed sending an ack: %s", e)
                    return
            try:
                self._backend_send.send_nowait(msg)
            except trio.ClosedResourceError:
                return


_P = TypeVar("_P", bound=Payload)


def _parse(request: Request, kind: type[_P], body: bytes) -> _P:
    """The reply body of `request` as a `kind` payload, or FrontEndError."""
    if kind.SIZE is not None and len(body) != kind.SIZE:
        raise FrontEndError(f"{request.name}: reply body is {len(body)} bytes, want {kind.SIZE}")
    try:
        return kind.unpack(body)
    except (MessageError, struct.error) as e:
        raise FrontEndError(f"{request.name}: bad reply: {e}") from e


@asynccontextmanager
async def open_frontend(
    path: str | os.PathLike[str],
    *,
    mem_size: int = DEFAULT_MEM_SIZE,
    protocol_features: int | None = None,
    reply_timeout: float = 5.0,
) -> AsyncIterator[FrontEnd]:
    """Connect to the back end listening on unix socket `path` and yield a `FrontEnd`.

    `mem_size` is the guest RAM size; `protocol_features` limits what `realize` acks (None:
    everything the back end offers that this front end implements). On exit every fd is closed.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
        fe = FrontEnd(
            sock,
            mem_size=mem_size,
            protocol_features=protocol_features,
            reply_timeout=reply_timeout,
        )
    except BaseException:
        sock.close()
        raise
    try:
        async with trio.open_nursery() as nursery:
            fe._nursery = nursery
            try:
                yield fe
            finally:
                fe.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery only runs the back-end channel task, which never raises: the group holds
        # what the body raised, so raise that as it was rather than an implementation detail.
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        cause, context, suppress = exc.__cause__, exc.__context__, exc.__suppress_context__
        try:
            raise exc
        finally:
            exc.__cause__, exc.__context__, exc.__suppress_context__ = cause, context, suppress
            del exc, group
    finally:
        fe.close()
