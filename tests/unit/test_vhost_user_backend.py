"""The sans-io vhost-user back end, driven message by message as the connection layer does.

Everything the back end touches is real: guest RAM is a memfd the test maps too (the driver's
side of the rings lives in that mapping), notifications are eventfds, and the fds handed in are
dups the back end owns, so "closed" is checked with fstat right after the message that closes
them (nothing can reuse the number in between).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from vhostser.testing import sealed_memfd
from vhostser.vhost_user import messages as m
from vhostser.vhost_user.backend import (
    MAX_MEM_SLOTS,
    PROTOCOL_FEATURES,
    STATUS_NEEDS_RESET,
    Outcome,
    VhostUserBackend,
)
from vhostser.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    U64,
    ConfigSpace,
    Header,
    MemoryTable,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
)
from vhostser.vhost_user.vring import Vring
from virtqueue import ChainError, DriverQueue, MappedMemory, Region, ring_layout

LOGGER = "vhostser.vhost_user"
NEED = FLAG_NEED_REPLY
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
INDIRECT_DESC = 1 << 28
MULTIPORT = 1 << 1
# What QEMU 11.1 acked when offered our protocol features (recorded).
QEMU_PROTOCOL_FEATURES = 0x1A229

# Guest-physical layout: RAM at RAM_GPA; the rings and buffers live in its upper part, so a
# table that splits RAM in two puts them in a region with a non-zero mmap_offset.
RAM_GPA = 0x10_0000
RAM_SIZE = 0x4_0000
UVA = 0x7F3A_8000_0000
RING_GPA = RAM_GPA + 0x1_0000
RING_STRIDE = 0x2000
BUF_GPA = RAM_GPA + 0x3_0000

RAM = Region(RAM_GPA, RAM_SIZE, UVA, 0)
# Low memory below RAM, its own region; in the LOW_AND_RAM layout RAM sits after it in the file.
LOW = Region(0, 0x1_0000, UVA + 0x1000_0000, 0)
LAYOUTS: dict[str, tuple[Region, ...]] = {
    "one": (RAM,),
    # The same RAM as two regions of one memfd: same gpa→uva→file mapping, split at 64 KiB.
    "split": (
        Region(RAM_GPA, 0x1_0000, UVA, 0),
        Region(RAM_GPA + 0x1_0000, RAM_SIZE - 0x1_0000, UVA + 0x1_0000, 0x1_0000),
    ),
    # Two regions, RAM at file offset 64 KiB behind low memory.
    "low+ram": (LOW, Region(RAM_GPA, RAM_SIZE, UVA, 0x1_0000)),
}


# --------------------------------------------------------------------------- the fake device


class FakeDevice:
    """Implements the Device protocol and records every call, in order."""

    def __init__(
        self,
        num_queues: int = 4,
        max_queue_size: int = 256,
        features: int = VERSION_1 | EVENT_IDX | INDIRECT_DESC | MULTIPORT,
    ) -> None:
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.features = features
        self.config = bytearray(range(12))
        self.calls: list[tuple[Any, ...]] = []
        # Called from queue_stopped, as a real device completes its in-flight chains there.
        self.on_stop: Callable[[Vring], None] | None = None

    def get_config(self, offset: int, size: int) -> bytes:
        self.calls.append(("get_config", offset, size))
        return bytes(self.config[offset : offset + size]).ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        self.calls.append(("set_config", offset, bytes(data)))
        self.config[offset : offset + len(data)] = data

    def features_acked(self, features: int) -> None:
        self.calls.append(("features_acked", features))

    def queue_started(self, vring: Vring) -> None:
        assert vring.queue is not None, "queue_started on a vring without a queue"
        self.calls.append(("started", vring.index, vring.queue.next_avail))

    def queue_stopped(self, vring: Vring) -> None:
        assert vring.queue is not None, "queue_stopped on a vring without a queue"
        if self.on_stop is not None:
            self.on_stop(vring)
        self.calls.append(("stopped", vring.index, vring.queue.next_avail))

    def status_changed(self, status: int) -> None:
        self.calls.append(("status", status))

    def reset(self) -> None:
        self.calls.append(("reset",))

    def take(self) -> list[tuple[Any, ...]]:
        calls, self.calls = self.calls, []
        return calls


# --------------------------------------------------------------------------- wire helpers


def send(
    backend: VhostUserBackend,
    request: int,
    payload: m.Payload | bytes = b"",
    fds: Sequence[int] = (),
    flags: int = 0,
) -> Outcome:
    """One message through the codec, framed exactly as the connection layer frames it."""
    wire = m.encode(request, payload, flags=flags)
    header = Header.unpack(wire[: m.HEADER.size])
    return backend.receive(header, wire[m.HEADER.size :], list(fds))


P = TypeVar("P", bound=m.Payload)


def reply(outcome: Outcome, request: int, payload_type: type[P]) -> P:
    """The payload of a well-formed reply to `request`."""
    assert not outcome.close
    assert outcome.reply is not None, "no reply"
    header = Header.unpack(outcome.reply[: m.HEADER.size])
    body = outcome.reply[m.HEADER.size :]
    assert header == Header(request, m.FLAG_VERSION | m.FLAG_REPLY, len(body))
    return payload_type.unpack(body)


def ack(outcome: Outcome, request: int) -> int:
    return reply(outcome, request, U64).value


def assert_closed(*fds: int) -> None:
    for fd in fds:
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF, f"fd {fd}"


def assert_open(*fds: int) -> None:
    for fd in fds:
        os.fstat(fd)


def assert_peer_closed(sock: socket.socket) -> None:
    """The other end of `sock` is closed: a read sees end of stream at once."""
    sock.setblocking(False)
    assert sock.recv(1) == b""  # BlockingIOError if the other end is still open


class EventFd:
    """An eventfd the test keeps; `give()` hands the back end its own dup of it."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def give(self) -> int:
        return os.dup(self.fd)

    def count(self) -> int:
        """The counter, consumed; 0 if nobody wrote."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)


class Guest:
    """Guest RAM in one memfd, the regions a front end would describe, and the driver's own
    mapping of them (where the test builds rings with DriverQueue)."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self.regions = tuple(regions)
        self.memfd = sealed_memfd("vhostser-test-ram", max(r.mmap_offset + r.size for r in regions))
        self.mem = MappedMemory()
        for r in self.regions:
            self.mem.add(r, self.memfd)

    def fd(self) -> int:
        return os.dup(self.memfd)

    def region_of(self, gpa: int) -> Region:
        (r,) = [r for r in self.regions if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.size]
        return r

    def uva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.userspace_addr + gpa - r.guest_phys_addr

    def file_offset(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.mmap_offset + gpa - r.guest_phys_addr

    def poke(self, gpa: int, data: bytes) -> None:
        """Write guest RAM through the file, bypassing every mapping."""
        assert os.pwrite(self.memfd, data, self.file_offset(gpa)) == len(data)

    def peek(self, gpa: int, n: int) -> bytes:
        return os.pread(self.memfd, n, self.file_offset(gpa))

    def close(self) -> None:
        self.mem.close()
        os.close(self.memfd)


def ring_gpas(index: int, size: int) -> tuple[int, int, int]:
    desc, avail, used, total = ring_layout(size)
    assert total <= RING_STRIDE
    base = RING_GPA + index * RING_STRIDE
    return base + desc, base + avail, base + used


@dataclass
class Rig:
    """A back end with a fake device, guest RAM, and the fds the test gave away."""

    device: FakeDevice
    backend: VhostUserBackend
    guest: Guest
    eventfds: list[EventFd] = field(default_factory=list)
    drivers: dict[int, DriverQueue] = field(default_factory=dict)

    def send(
        self,
        request: int,
        payload: m.Payload | bytes = b"",
        fds: Sequence[int] = (),
        flags: int = 0,
    ) -> Outcome:
        return send(self.backend, request, payload, fds, flags)

    def ok(self, request: int, payload: m.Payload | bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send with NEED_REPLY and expect a success ack (REPLY_ACK must be negotiated)."""
        assert ack(self.send(request, payload, fds, NEED), request) == 0

    def eventfd(self) -> EventFd:
        e = EventFd()
        self.eventfds.append(e)
        return e

    def negotiate(
        self,
        features: int = VERSION_1 | F_PROTOCOL_FEATURES,
        protocol: int = QEMU_PROTOCOL_FEATURES,
    ) -> None:
        offered = reply(self.send(Request.GET_FEATURES), Request.GET_FEATURES, U64).value
        assert offered == self.device.features | F_PROTOCOL_FEATURES
        if features & F_PROTOCOL_FEATURES:
            assert self.send(Request.SET_PROTOCOL_FEATURES, U64(protocol)) == Outcome()
        assert self.send(Request.SET_OWNER) == Outcome()
        assert self.send(Request.SET_FEATURES, U64(features)) == Outcome()
        assert self.device.take() == [("features_acked", features & ~F_PROTOCOL_FEATURES)]

    def set_mem_table(self, regions: Sequence[Region] | None = None) -> list[int]:
        regions = self.guest.regions if regions is None else regions
        fds = [self.guest.fd() for _ in regions]
        self.ok(Request.SET_MEM_TABLE, MemoryTable(tuple(regions)), fds)
        # Kept open, not only mapped: a successor maps them again from the fd store.
        assert sorted(fd for _, fd in self.backend.region_fds.values()) == sorted(fds)
        assert_open(*fds)
        return fds

    def addr(self, index: int, size: int) -> VringAddr:
        desc, avail, used = ring_gpas(index, size)
        g = self.guest
        return VringAddr(index, 0, g.uva(desc), g.uva(used), g.uva(avail), 0)

    def driver(self, index: int, size: int = 64, start: int = 0) -> DriverQueue:
        """The driver's side of ring `index` (zeroes the ring: call before the ring starts)."""
        desc, avail, used = ring_gpas(index, size)
        event_idx = bool(self.backend.acked_features & EVENT_IDX)
        q = DriverQueue(
            self.guest.mem, size, desc, avail, used, event_idx=event_idx, start_idx=start
        )
        self.drivers[index] = q
        return q

    def start_ring(self, index: int, size: int = 64, base: int = 0) -> tuple[EventFd, EventFd]:
        """Configure ring `index` as QEMU does and enable it; returns (kick, call)."""
        self.driver(index, size, base)
        kick, call = self.eventfd(), self.eventfd()
        self.ok(Request.SET_VRING_NUM, VringState(index, size))
        self.ok(Request.SET_VRING_BASE, VringState(index, base))
        self.ok(Request.SET_VRING_ADDR, self.addr(index, size))
        self.ok(Request.SET_VRING_KICK, VringFile(index, False), [kick.give()])
        self.ok(Request.SET_VRING_CALL, VringFile(index, False), [call.give()])
        self.ok(Request.SET_VRING_ENABLE, VringState(index, 1))
        assert self.device.take() == [("started", index, base)]
        return kick, call

    def queue(self, index: int) -> Any:
        q = self.backend.vrings[index].queue
        assert q is not None, f"vring {index} is not started"
        return q

    def transfer(self, index: int, count: int, tag: bytes = b"") -> None:
        """The driver sends `count` chains on ring `index`; the device takes each, checks its
        bytes (written through the memfd, not a mapping) and returns it."""
        driver, queue = self.drivers[index], self.queue(index)
        for k in range(count):
            data = tag + b"chain %d of ring %d" % (k, index)
            gpa = BUF_GPA + 0x100 * (k % 32) + 0x2000 * index
            self.guest.poke(gpa, data)
            head = driver.add([(gpa, len(data))], [(gpa + 0x80, 16)])
            chain = queue.pop()
            assert chain is not None and chain.head == head
            assert chain.read() == data
            assert chain.write(b"ok %d" % k) == len(b"ok %d" % k)
            queue.push(chain.head, len(b"ok %d" % k))
            assert driver.get_used() == (head, len(b"ok %d" % k))
            assert self.guest.peek(gpa + 0x80, 4) == b"ok %d" % k


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(layout: str = "one", **device: Any) -> Rig:
        dev = FakeDevice(**device)
        rig = Rig(dev, VhostUserBackend(dev), Guest(LAYOUTS[layout]))
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.backend.disconnected()
        rig.drivers.clear()
        rig.guest.close()
        for e in rig.eventfds:
            os.close(e.fd)


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    """Negotiated as QEMU does (REPLY_ACK on), with RAM mapped."""
    r = make_rig()
    r.negotiate()
    r.set_mem_table()
    return r


def warnings_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and text in r.getMessage()
    ]


# --------------------------------------------------------------------------- QEMU's sequence


def test_qemu_11_1_sequence(make_rig: Callable[..., Rig]) -> None:
    """Start, run and stop exactly as QEMU 11.1 drives a vhost-user device (recorded)."""
    rig = make_rig(num_queues=6, features=VERSION_1 | MULTIPORT)
    b, dev, guest = rig.backend, rig.device, rig.guest
    used_vqs, all_vqs = (0, 1, 2, 3), range(6)

    def plain(request: int, payload: m.Payload | bytes = b"") -> None:
        assert rig.send(request, payload) == Outcome()

    offered = VERSION_1 | MULTIPORT | F_PROTOCOL_FEATURES
    assert reply(rig.send(Request.GET_FEATURES), Request.GET_FEATURES, U64) == U64(offered)
    # What QEMU 11.1's vhost-user-test-device acks, and DEVICE_STATE, which it does not.
    assert PROTOCOL_FEATURES == QEMU_PROTOCOL_FEATURES | m.ProtocolFeature.DEVICE_STATE
    got = reply(rig.send(Request.GET_PROTOCOL_FEATURES), Request.GET_PROTOCOL_FEATURES, U64)
    assert got == U64(0x9A229)
    plain(Request.SET_PROTOCOL_FEATURES, U64(0x1A229))
    assert reply(rig.send(Request.GET_QUEUE_NUM), Request.GET_QUEUE_NUM, U64) == U64(6)
    slots = reply(rig.send(Request.GET_MAX_MEM_SLOTS), Request.GET_MAX_MEM_SLOTS, U64)
    assert slots == U64(509)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        given = theirs.detach()
        rig.ok(Request.SET_BACKEND_REQ_FD, b"", [given])
        assert b.backend_req_fd == given
        os.write(b.backend_req_fd, b"ping")  # really our socket pair
        assert ours.recv(4) == b"ping"

        plain(Request.SET_OWNER)
        assert reply(rig.send(Request.GET_FEATURES), Request.GET_FEATURES, U64) == U64(offered)
        early_calls: dict[int, int] = {}
        errs: dict[int, EventFd] = {}
        for i in all_vqs:
            call, errs[i] = rig.eventfd(), rig.eventfd()
            early_calls[i] = call.give()
            rig.ok(Request.SET_VRING_CALL, VringFile(i, False), [early_calls[i]])
            rig.ok(Request.SET_VRING_ERR, VringFile(i, False), [errs[i].give()])
            assert_open(early_calls[i])

        plain(Request.SET_FEATURES, U64(VERSION_1 | F_PROTOCOL_FEATURES))
        assert dev.take() == [("features_acked", VERSION_1)]
        assert reply(rig.send(Request.GET_STATUS), Request.GET_STATUS, U64) == U64(0)
        plain(Request.SET_STATUS, U64(0x8))
        assert dev.take() == [("status", 0x8)]

        memfd = guest.fd()
        rig.ok(Request.ADD_MEM_REG, SingleMemoryRegion(RAM), [memfd])
        assert b.region_fds[RAM][1] == memfd  # kept for the fd store
        assert b.memory is not None and b.memory.regions == (RAM,)

        kicks: dict[int, EventFd] = {}
        calls: dict[int, EventFd] = {}
        for i in used_vqs:
            rig.driver(i, 64)
            kicks[i], calls[i] = rig.eventfd(), rig.eventfd()
            plain(Request.SET_VRING_NUM, VringState(i, 64))
            plain(Request.SET_VRING_BASE, VringState(i, 0))
            plain(Request.SET_VRING_ADDR, rig.addr(i, 64))
            rig.ok(Request.SET_VRING_KICK, VringFile(i, False), [kicks[i].give()])
            call_fd = calls[i].give()
            rig.ok(Request.SET_VRING_CALL, VringFile(i, False), [call_fd])
            assert_closed(early_calls[i])  # replaced
            assert b.vrings[i].call_fd == call_fd
        assert dev.take() == []  # nothing is enabled yet
        assert not any(v.started for v in b.vrings)

        for i in all_vqs:
            rig.ok(Request.SET_VRING_ENABLE, VringState(i, 1))
            assert dev.take() == ([("started", i, 0)] if i in used_vqs else [])
        assert [v.started for v in b.vrings] == [True] * 4 + [False] * 2

        # QEMU switches to new call eventfds once the rings run.
        for i in all_vqs:
            old = b.vrings[i].call_fd
            calls[i] = rig.eventfd()
            rig.ok(Request.SET_VRING_CALL, VringFile(i, False), [calls[i].give()])
            assert old is not None
            assert_closed(old)
        assert dev.take() == []  # a new call fd does not restart anything

        # The rings work: kicks arrive on the fds we gave, chains flow, interrupts reach us.
        for i in used_vqs:
            kicks[i].signal()
            kick_fd = b.vrings[i].kick_fd
            assert kick_fd is not None and os.eventfd_read(kick_fd) == 1
        rig.transfer(1, 3)
        rig.transfer(3, 2)
        b.vrings[1].notify()
        assert calls[1].count() == 1
        assert calls[0].count() == 0
        # Host → guest on ring 0: the device fills a buffer the driver offered.
        head = rig.drivers[0].add([], [(BUF_GPA, 64)])
        chain = rig.queue(0).pop()
        assert chain is not None and chain.head == head and chain.readable == []
        chain.write(b"hello")
        rig.queue(0).push(head, 5)
        assert rig.drivers[0].get_used() == (head, 5)
        assert guest.peek(BUF_GPA, 5) == b"hello"

        # Shutdown: disable every ring, then read back where each used ring stands.
        for i in all_vqs:
            rig.ok(Request.SET_VRING_ENABLE, VringState(i, 0))
        expected = {0: 1, 1: 3, 2: 0, 3: 2}
        assert dev.take() == [("stopped", i, expected[i]) for i in used_vqs]
        for i in used_vqs:
            kick_fd = b.vrings[i].kick_fd
            out = rig.send(Request.GET_VRING_BASE, VringState(i, 0))
            assert reply(out, Request.GET_VRING_BASE, VringState) == VringState(i, expected[i])
            assert kick_fd is not None
            assert_closed(kick_fd)  # the ring is stopped until the next SET_VRING_KICK
        assert dev.take() == []

        # The connection ends: everything that belonged to it is closed.
        fds = [fd for v in b.vrings for fd in (v.kick_fd, v.call_fd, v.err_fd) if fd is not None]
        assert len(fds) == 12  # call and err of every ring
        fds.append(memfd)
        b.disconnected()
        assert_closed(*fds)
        assert b.region_fds == {}
        assert_peer_closed(ours)  # the back-end channel is closed too
        assert b.backend_req_fd is None and b.memory is None
    assert dev.take() == []


# --------------------------------------------------------------------------- ring start/stop

INGREDIENTS = ("memory", "num", "addr", "kick", "enable")


def provide(rig: Rig, what: str) -> None:
    size = 16
    if what == "memory":
        rig.set_mem_table()
    elif what == "num":
        rig.ok(Request.SET_VRING_NUM, VringState(0, size))
    elif what == "addr":
        rig.ok(Request.SET_VRING_ADDR, rig.addr(0, size))
    elif what == "kick":
        rig.ok(Request.SET_VRING_KICK, VringFile(0, False), [rig.eventfd().give()])
    else:
        rig.ok(Request.SET_VRING_ENABLE, VringState(0, 1))


@pytest.mark.parametrize("order", list(itertools.permutations(INGREDIENTS)), ids="-".join)
def test_ring_starts_exactly_when_complete(make_rig: Callable[..., Rig], order: tuple[str]) -> None:
    rig = make_rig()
    rig.negotiate()
    rig.driver(0, 16, start=7)
    rig.ok(Request.SET_VRING_BASE, VringState(0, 7))
    for n, what in enumerate(order, 1):
        provide(rig, what)
        complete = n == len(order)
        assert rig.backend.vrings[0].started == complete, f"after {what}"
        assert rig.device.take() == ([("started", 0, 7)] if complete else [])
    rig.transfer(0, 2)
    # Taking enable away stops it; giving it back restarts it where it stood.
    rig.ok(Request.SET_VRING_ENABLE, VringState(0, 0))
    assert rig.device.take() == [("stopped", 0, 9)]
    rig.ok(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert rig.device.take() == [("started", 0, 9)]


@pytest.mark.parametrize("order", list(itertools.permutations(INGREDIENTS[:4])), ids="-".join)
def test_without_protocol_features_rings_start_without_enable(
    make_rig: Callable[..., Rig], order: tuple[str]
) -> None:
    rig = make_rig()
    # No PROTOCOL_FEATURES, hence no REPLY_ACK: requests get no replies at all.
    rig.negotiate(features=VERSION_1)
    rig.ok = lambda request, payload=b"", fds=(): (  # type: ignore[method-assign]
        None if rig.send(request, payload, fds, NEED) == Outcome() else pytest.fail("a reply")
    )
    rig.driver(0, 16)
    for n, what in enumerate(order, 1):
        provide(rig, what)
        assert rig.backend.vrings[0].started == (n == len(order)), f"after {what}"
    assert rig.device.take() == [("started", 0, 0)]
    rig.transfer(0, 1)


def test_acking_protocol_features_later_needs_enable(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.negotiate(features=VERSION_1)
    # QEMU would not send it without PROTOCOL_FEATURES offered; here it only turns acks on.
    assert rig.send(Request.SET_PROTOCOL_FEATURES, U64(ProtocolFeature.REPLY_ACK)) == Outcome()
    for what in INGREDIENTS[:4]:
        provide(rig, what)
    assert rig.device.take() == [("started", 0, 0)]
    assert rig.send(Request.SET_FEATURES, U64(VERSION_1 | F_PROTOCOL_FEATURES)) == Outcome()
    assert rig.device.take() == [("features_acked", VERSION_1), ("stopped", 0, 0)]
    provide(rig, "enable")
    assert rig.device.take() == [("started", 0, 0)]


@pytest.mark.parametrize("event_idx", [False, True])
def test_queue_follows_negotiated_event_idx(make_rig: Callable[..., Rig], event_idx: bool) -> None:
    rig = make_rig()
    rig.negotiate(features=VERSION_1 | F_PROTOCOL_FEATURES | (EVENT_IDX if event_idx else 0))
    rig.set_mem_table()
    rig.start_ring(2)
    assert rig.queue(2).event_idx is event_idx
    rig.transfer(2, 3)


def test_get_vring_base_stops_a_running_ring_and_wraps(rig: Rig) -> None:
    rig.start_ring(1, size=8, base=65530)
    for _ in range(3):
        rig.transfer(1, 4)  # 12 chains: the 16-bit index wraps past 65535
    assert rig.queue(1).next_avail == 6
    # Two more chains; the device has taken one and not completed it when the stop comes.
    driver = rig.drivers[1]
    heads = [driver.add([(BUF_GPA + 0x100 * k, 8)]) for k in range(2)]
    in_flight = rig.queue(1).pop()
    assert in_flight is not None

    def drain(vring: Vring) -> None:
        # A device that completes what it holds and what is waiting before it stops.
        assert vring.queue is not None
        vring.queue.push(in_flight.head, 0)
        while (chain := vring.queue.pop()) is not None:
            vring.queue.push(chain.head, 0)

    rig.device.on_stop = drain
    kick_fd = rig.backend.vrings[1].kick_fd
    out = rig.send(Request.GET_VRING_BASE, VringState(1, 0))
    # The reply counts the chains the device drained in queue_stopped: it came first.
    assert reply(out, Request.GET_VRING_BASE, VringState) == VringState(1, 8)
    assert rig.device.take() == [("stopped", 1, 8)]
    assert not rig.backend.vrings[1].started
    assert kick_fd is not None
    assert_closed(kick_fd)
    assert [driver.get_used(), driver.get_used()] == [(h, 0) for h in heads]
    rig.device.on_stop = None

    # QEMU resumes it: SET_VRING_BASE with what it read, then a new kick.
    rig.ok(Request.SET_VRING_BASE, VringState(1, 8))
    rig.ok(Request.SET_VRING_KICK, VringFile(1, False), [rig.eventfd().give()])
    assert rig.device.take() == [("started", 1, 8)]
    rig.transfer(1, 3, tag=b"resumed ")
    # A second GET_VRING_BASE on the stopped ring reports the same position.
    assert reply(
        rig.send(Request.GET_VRING_BASE, VringState(1, 0)), Request.GET_VRING_BASE, VringState
    ) == VringState(1, 11)
    assert rig.device.take() == [("stopped", 1, 11)]
    assert reply(
        rig.send(Request.GET_VRING_BASE, VringState(1, 0)), Request.GET_VRING_BASE, VringState
    ) == VringState(1, 11)
    assert rig.device.take() == []


def test_get_vring_base_of_a_ring_never_started(rig: Rig) -> None:
    rig.ok(Request.SET_VRING_BASE, VringState(3, 1234))
    out = rig.send(Request.GET_VRING_BASE, VringState(3, 0))
    assert reply(out, Request.GET_VRING_BASE, VringState) == VringState(3, 1234)
    assert rig.device.take() == []


def test_new_ring_address_moves_a_running_ring(rig: Rig) -> None:
    rig.start_ring(0, size=16)
    rig.transfer(0, 5)
    # The driver's ring moves to where ring 3's slot is, keeping its indexes.
    desc, avail, used = ring_gpas(3, 16)
    moved = DriverQueue(rig.guest.mem, 16, desc, avail, used, start_idx=5)
    rig.drivers[0] = moved
    addr = rig.addr(3, 16)
    rig.ok(Request.SET_VRING_ADDR, VringAddr(0, 0, addr.desc, addr.used, addr.avail, 0))
    assert rig.device.take() == [("stopped", 0, 5), ("started", 0, 5)]
    rig.transfer(0, 2)


def test_new_kick_fd_restarts_a_running_ring(rig: Rig) -> None:
    rig.start_ring(0)
    old = rig.backend.vrings[0].kick_fd
    new = rig.eventfd()
    given = new.give()
    rig.ok(Request.SET_VRING_KICK, VringFile(0, False), [given])
    assert old is not None
    assert_closed(old)
    assert rig.backend.vrings[0].kick_fd == given
    assert rig.device.take() == [("stopped", 0, 0), ("started", 0, 0)]


# --------------------------------------------------------------------------- memory tables


@pytest.mark.parametrize("layout", ["one", "low+ram"])
def test_set_mem_table_maps_regions_at_their_offsets(
    make_rig: Callable[..., Rig], layout: str
) -> None:
    rig = make_rig(layout)
    rig.negotiate()
    fds = rig.set_mem_table()  # each fd closed once mapped
    assert len(fds) == len(LAYOUTS[layout])
    assert rig.backend.memory is not None
    assert rig.backend.memory.regions == LAYOUTS[layout]
    rig.start_ring(0)
    rig.transfer(0, 4)  # bytes poked into the file at mmap_offset + ... reach the device
    if layout == "low+ram":
        # Low memory is really mapped from file offset 0, RAM from 64 KiB.
        rig.guest.poke(0x100, b"low memory")
        assert bytes(rig.backend.memory.view(0x100, 10)) == b"low memory"
        assert rig.guest.file_offset(RAM_GPA) == 0x1_0000


def test_replacing_the_table_restarts_rings_where_they_were(rig: Rig) -> None:
    rig.start_ring(0)
    rig.start_ring(1, size=16, base=100)
    rig.transfer(0, 3)
    rig.transfer(1, 5)
    old_memory = rig.backend.memory
    rig.set_mem_table(LAYOUTS["split"])
    assert rig.backend.memory is not old_memory
    assert rig.backend.memory is not None and rig.backend.memory.regions == LAYOUTS["split"]
    assert rig.device.take() == [
        ("stopped", 0, 3),
        ("stopped", 1, 105),
        ("started", 0, 3),
        ("started", 1, 105),
    ]
    # The rings now sit in the second region (mmap_offset 64 KiB) and go on working.
    assert rig.guest.file_offset(RING_GPA) == 0x1_0000
    rig.transfer(0, 2, tag=b"after ")
    rig.transfer(1, 2, tag=b"after ")


def test_failed_mem_table_keeps_the_old_one(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.start_ring(0)
    memory = rig.backend.memory
    too_big = Region(RAM_GPA, RAM_SIZE * 4, UVA, 0)  # larger than the memfd
    fds = [rig.guest.fd(), rig.guest.fd()]
    out = rig.send(Request.SET_MEM_TABLE, MemoryTable((LOW, too_big)), fds, NEED)
    assert ack(out, Request.SET_MEM_TABLE) == 1
    assert_closed(*fds)
    assert warnings_naming(caplog, "SET_MEM_TABLE")
    assert rig.backend.memory is memory
    assert rig.device.take() == []  # the running ring never noticed
    rig.transfer(0, 2)


def test_add_and_remove_regions(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig("low+ram")
    rig.negotiate()
    low, ram = LAYOUTS["low+ram"]
    kept = {}
    for region in (low, ram):
        fd = kept[region] = rig.guest.fd()
        rig.ok(Request.ADD_MEM_REG, SingleMemoryRegion(region), [fd])
        assert rig.backend.region_fds[region][1] == fd  # kept for the fd store
    assert rig.backend.memory is not None and rig.backend.memory.regions == (low, ram)
    rig.start_ring(0)
    rig.transfer(0, 2)
    # Older QEMUs attach the region's fd to REM_MEM_REG; it is closed.
    fd = rig.guest.fd()
    rig.ok(Request.REM_MEM_REG, SingleMemoryRegion(low), [fd])
    assert_closed(fd, kept[low])  # the removed region's own fd goes too
    assert rig.backend.memory.regions == (ram,)
    assert list(rig.backend.region_fds) == [ram]
    # Rings hold views into the mappings, so they stop around the change and resume.
    assert rig.device.take() == [("stopped", 0, 2), ("started", 0, 2)]
    rig.transfer(0, 2)
    rig.ok(Request.REM_MEM_REG, SingleMemoryRegion(ram))
    assert rig.backend.memory.regions == ()


def test_ring_resumes_when_its_region_comes_back(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig()
    rig.negotiate()
    rig.ok(Request.ADD_MEM_REG, SingleMemoryRegion(RAM), [rig.guest.fd()])
    rig.start_ring(0)
    rig.transfer(0, 3)
    rig.ok(Request.REM_MEM_REG, SingleMemoryRegion(RAM))
    assert rig.device.take() == [("stopped", 0, 3)]
    assert warnings_naming(caplog, "vring 0: cannot start")
    rig.ok(Request.ADD_MEM_REG, SingleMemoryRegion(RAM), [rig.guest.fd()])
    # Everything the ring needs is there again: it runs, from where it stopped.
    assert rig.device.take() == [("started", 0, 3)]
    rig.transfer(0, 1)


def test_bad_region_changes(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.start_ring(0)
    fd = rig.guest.fd()
    overlapping = Region(RAM_GPA + 0x1000, 0x1000, UVA + 0x100_0000, 0)
    assert (
        ack(
            rig.send(Request.ADD_MEM_REG, SingleMemoryRegion(overlapping), [fd], NEED),
            Request.ADD_MEM_REG,
        )
        == 1
    )
    assert_closed(fd)
    assert warnings_naming(caplog, "ADD_MEM_REG")
    missing = Region(0x1_0000_0000, 0x1000, UVA + 0x1000_0000, 0)
    assert (
        ack(
            rig.send(Request.REM_MEM_REG, SingleMemoryRegion(missing), [], NEED),
            Request.REM_MEM_REG,
        )
        == 1
    )
    assert warnings_naming(caplog, "REM_MEM_REG")
    assert rig.backend.memory is not None and rig.backend.memory.regions == (RAM,)
    rig.device.take()
    assert rig.backend.vrings[0].started
    rig.transfer(0, 2)


BAD_ADDRS: dict[str, Callable[[VringAddr], VringAddr]] = {
    "used ring past the end of RAM": lambda a: VringAddr(
        0, 0, a.desc, UVA + RAM_SIZE - 8, a.avail, 0
    ),
    "desc table in no region": lambda a: VringAddr(0, 0, 0x1000, a.used, a.avail, 0),
    "avail ring across two regions": lambda a: VringAddr(
        0, 0, a.desc, a.used, UVA + 0x1_0000 - 4, 0
    ),
}


@pytest.mark.parametrize("what", BAD_ADDRS)
def test_ring_outside_memory_is_refused_when_it_can_be_checked(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, what: str
) -> None:
    # Memory and size are known when the address comes: SET_VRING_ADDR itself is refused.
    rig = make_rig("split")
    rig.negotiate()
    rig.set_mem_table()
    rig.driver(0, 16)
    rig.ok(Request.SET_VRING_NUM, VringState(0, 16))
    caplog.clear()
    bad = BAD_ADDRS[what](rig.addr(0, 16))
    assert ack(rig.send(Request.SET_VRING_ADDR, bad, (), NEED), Request.SET_VRING_ADDR) == 1
    assert len(warnings_naming(caplog, "SET_VRING_ADDR")) == 1
    assert rig.backend.vrings[0].addr is None
    rig.ok(Request.SET_VRING_KICK, VringFile(0, False), [rig.eventfd().give()])
    rig.ok(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert not rig.backend.vrings[0].started
    assert rig.device.take() == []
    # Good addresses start it.
    rig.ok(Request.SET_VRING_ADDR, rig.addr(0, 16))
    assert rig.device.take() == [("started", 0, 0)]
    rig.transfer(0, 1)


@pytest.mark.parametrize("what", BAD_ADDRS)
def test_ring_outside_memory_given_before_memory_does_not_start(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, what: str
) -> None:
    # No memory yet, so the address cannot be checked when it comes; the ring then stays
    # stopped with a warning once memory arrives.
    rig = make_rig("split")
    rig.negotiate()
    rig.driver(0, 16)
    rig.ok(Request.SET_VRING_NUM, VringState(0, 16))
    rig.ok(Request.SET_VRING_ADDR, BAD_ADDRS[what](rig.addr(0, 16)))
    rig.ok(Request.SET_VRING_KICK, VringFile(0, False), [rig.eventfd().give()])
    rig.ok(Request.SET_VRING_ENABLE, VringState(0, 1))
    caplog.clear()
    rig.set_mem_table()
    assert not rig.backend.vrings[0].started
    assert rig.device.take() == []
    assert len(warnings_naming(caplog, "vring 0: cannot start")) == 1
    rig.ok(Request.SET_VRING_ADDR, rig.addr(0, 16))
    assert rig.device.take() == [("started", 0, 0)]
    rig.transfer(0, 1)


@pytest.mark.parametrize("ring", ["desc", "avail", "used"])
def test_misaligned_ring_does_not_start(
    rig: Rig, caplog: pytest.LogCaptureFixture, ring: str
) -> None:
    rig.driver(0, 16)
    a = rig.addr(0, 16)
    # Each by less than its alignment (16, 2 and 4 bytes), still inside RAM.
    where = {"desc": a.desc, "avail": a.avail, "used": a.used}
    where[ring] += {"desc": 8, "avail": 1, "used": 2}[ring]
    rig.ok(Request.SET_VRING_NUM, VringState(0, 16))
    rig.ok(Request.SET_VRING_ADDR, VringAddr(0, 0, log=0, **where))
    rig.ok(Request.SET_VRING_KICK, VringFile(0, False), [rig.eventfd().give()])
    caplog.clear()
    rig.ok(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert not rig.backend.vrings[0].started
    assert rig.device.take() == []
    assert len(warnings_naming(caplog, "vring 0: cannot start")) == 1
    rig.ok(Request.SET_VRING_ADDR, a)
    assert rig.device.take() == [("started", 0, 0)]
    rig.transfer(0, 1)


@pytest.mark.parametrize("indirect", [False, True])
def test_indirect_descriptors_follow_negotiation(rig: Rig, indirect: bool) -> None:
    features = VERSION_1 | F_PROTOCOL_FEATURES | (INDIRECT_DESC if indirect else 0)
    assert rig.send(Request.SET_FEATURES, U64(features)) == Outcome()
    rig.device.take()
    rig.start_ring(0)
    rig.guest.poke(BUF_GPA, b"indirect")
    head = rig.drivers[0].add([(BUF_GPA, 8)], indirect_table=BUF_GPA + 0x1000)
    if indirect:
        chain = rig.queue(0).pop()
        assert chain is not None and chain.head == head and chain.read() == b"indirect"
    else:
        with pytest.raises(ChainError, match="indirect"):
            rig.queue(0).pop()


# --------------------------------------------------------------------------- notifications


def test_notify_and_signal_error_write_the_eventfds(rig: Rig) -> None:
    call, err = rig.eventfd(), rig.eventfd()
    rig.ok(Request.SET_VRING_CALL, VringFile(2, False), [call.give()])
    rig.ok(Request.SET_VRING_ERR, VringFile(2, False), [err.give()])
    vring = rig.backend.vrings[2]
    vring.notify()
    vring.notify()
    assert call.count() == 2
    assert err.count() == 0
    vring.signal_error()
    assert err.count() == 1
    assert call.count() == 0
    # Without fds (no-fd bit) both are silent no-ops, and the old fds are closed.
    old_call, old_err = vring.call_fd, vring.err_fd
    rig.ok(Request.SET_VRING_CALL, VringFile(2, True))
    rig.ok(Request.SET_VRING_ERR, VringFile(2, True))
    assert old_call is not None and old_err is not None
    assert_closed(old_call, old_err)
    vring.notify()
    vring.signal_error()


# --------------------------------------------------------------------------- config and status


def test_config_passes_through_to_the_device(rig: Rig) -> None:
    out = rig.send(Request.GET_CONFIG, ConfigSpace(4, 8, 0, bytes(8)))
    assert reply(out, Request.GET_CONFIG, ConfigSpace) == ConfigSpace(4, 8, 0, bytes(range(4, 12)))
    assert rig.device.take() == [("get_config", 4, 8)]
    rig.ok(Request.SET_CONFIG, ConfigSpace(2, 3, 0, b"abc"))
    assert rig.device.take() == [("set_config", 2, b"abc")]
    out = rig.send(Request.GET_CONFIG, ConfigSpace(0, 12, 0, bytes(12)))
    assert reply(out, Request.GET_CONFIG, ConfigSpace).data == b"\0\1abc" + bytes(range(5, 12))


def test_status_and_needs_reset(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    assert reply(rig.send(Request.GET_STATUS), Request.GET_STATUS, U64) == U64(0)
    rig.ok(Request.SET_STATUS, U64(0xF))
    assert rig.device.take() == [("status", 0xF)]
    assert reply(rig.send(Request.GET_STATUS), Request.GET_STATUS, U64) == U64(0xF)

    err = rig.eventfd()
    rig.ok(Request.SET_VRING_ERR, VringFile(1, False), [err.give()])
    rig.backend.mark_needs_reset(None, "config went bad")
    assert err.count() == 0
    rig.backend.mark_needs_reset(rig.backend.vrings[1], "avail idx jumped")
    assert err.count() == 1
    assert STATUS_NEEDS_RESET == 0x40
    assert reply(rig.send(Request.GET_STATUS), Request.GET_STATUS, U64) == U64(0x4F)
    assert any("vring 1" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    # The driver writing status does not clear it; only a reset does.
    rig.ok(Request.SET_STATUS, U64(0x7))
    assert reply(rig.send(Request.GET_STATUS), Request.GET_STATUS, U64) == U64(0x47)
    rig.ok(Request.RESET_DEVICE)
    assert reply(rig.send(Request.GET_STATUS), Request.GET_STATUS, U64) == U64(0)


@pytest.mark.parametrize("request_", [Request.RESET_DEVICE, Request.RESET_OWNER])
def test_reset_stops_rings_then_resets_the_device(rig: Rig, request_: Request) -> None:
    rig.start_ring(0)
    rig.start_ring(3, base=40)
    rig.transfer(3, 2)
    err = rig.eventfd()
    rig.ok(Request.SET_VRING_ERR, VringFile(3, False), [err.give()])
    rig.ok(Request.SET_STATUS, U64(0xF))
    rig.device.take()
    kicks = [v.kick_fd for v in rig.backend.vrings if v.kick_fd is not None]
    lines = {v.index: (v.call_fd, v.err_fd) for v in rig.backend.vrings}
    assert len(kicks) == 2 and lines[3][0] is not None and lines[3][1] is not None
    rig.ok(request_)
    assert rig.device.take() == [("stopped", 0, 0), ("stopped", 3, 42), ("reset",)]
    assert_closed(*kicks)
    # The front end's interrupt and error lines stay: it set them at realize, and QEMU does
    # not send the err eventfd again after a reset.
    assert {v.index: (v.call_fd, v.err_fd) for v in rig.backend.vrings} == lines
    rig.backend.mark_needs_reset(rig.backend.vrings[3], "broken after the reset")
    assert err.count() == 1
    for v in rig.backend.vrings:
        assert (v.size, v.addr, v.base, v.used_base, v.enabled, v.queue) == (
            0,
            None,
            0,
            0,
            False,
            None,
        )
        assert v.kick_fd is None
    assert rig.backend.acked_features == 0 and rig.backend.status == 0
    # Ready to be set up again (memory and protocol features stay).
    assert rig.send(Request.SET_FEATURES, U64(VERSION_1 | F_PROTOCOL_FEATURES)) == Outcome()
    rig.device.take()
    rig.start_ring(0)
    rig.transfer(0, 1)


def test_disconnected_drops_the_connection_state(rig: Rig) -> None:
    rig.start_ring(1)
    rig.transfer(1, 3)
    err = rig.eventfd()
    rig.ok(Request.SET_VRING_ERR, VringFile(1, False), [err.give()])
    ours, theirs = socket.socketpair()
    with ours:
        rig.ok(Request.SET_BACKEND_REQ_FD, b"", [theirs.detach()])
        v = rig.backend.vrings[1]
        fds = [v.kick_fd, v.call_fd, v.err_fd, rig.backend.backend_req_fd]
        rig.backend.disconnected()
        assert_closed(*[fd for fd in fds if fd is not None])
        assert_peer_closed(ours)
    assert rig.device.take() == [("stopped", 1, 3)]
    b = rig.backend
    assert (v.kick_fd, v.call_fd, v.err_fd, b.backend_req_fd, b.memory) == (None,) * 5
    assert not v.enabled
    assert v.base == 3  # the position survives for the next front end
    # A new front end: ownership is free again, and nothing is acked before it negotiates.
    assert rig.send(Request.SET_OWNER, b"", (), NEED) == Outcome()
    rig.send(Request.SET_PROTOCOL_FEATURES, U64(QEMU_PROTOCOL_FEATURES))
    rig.set_mem_table()
    rig.driver(1, 64, start=3)
    rig.ok(Request.SET_VRING_KICK, VringFile(1, False), [rig.eventfd().give()])
    rig.ok(Request.SET_VRING_ENABLE, VringState(1, 1))
    assert rig.device.take() == [("started", 1, 3)]
    rig.transfer(1, 1)


def test_config_change_message(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    # No payload (the spec's and libvhost-user's format); NEED_REPLY once acks are on.
    msg = rig.backend.config_change_message()
    assert msg == struct.pack("<III", m.BackendRequest.CONFIG_CHANGE_MSG, 0x1, 0)
    rig.negotiate()
    msg = rig.backend.config_change_message()
    assert msg == struct.pack("<III", 2, 0x1 | NEED, 0)


# --------------------------------------------------------------------------- bad input


@dataclass(frozen=True)
class Bad:
    """A rejected request: how to build it, what it does, and what must not have changed."""

    request: int
    build: Callable[[Rig], tuple[m.Payload | bytes, list[int]]]
    close: bool = False
    unchanged: Callable[[Rig], Any] = lambda rig: None
    device: dict[str, Any] = field(default_factory=dict)


def no_fds(payload: m.Payload | bytes) -> Callable[[Rig], tuple[m.Payload | bytes, list[int]]]:
    return lambda rig: (payload, [])


def vring_sizes(rig: Rig) -> list[int]:
    return [v.size for v in rig.backend.vrings]


def addr_outside_memory(rig: Rig) -> tuple[m.Payload | bytes, list[int]]:
    rig.ok(Request.SET_VRING_NUM, VringState(0, 16))
    return VringAddr(0, 0, UVA + RAM_SIZE, UVA, UVA + 0x1000, 0), []


def resize_started_ring(rig: Rig) -> tuple[m.Payload | bytes, list[int]]:
    rig.start_ring(1, size=16)
    return VringState(1, 32), []


def dead_pipe() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def unix_stream() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def unsealed_memfd(size: int = RAM_SIZE) -> int:
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def kept_fds(*attrs: str) -> Callable[[Rig], Any]:
    return lambda rig: [getattr(v, a) for v in rig.backend.vrings for a in attrs]


BAD: dict[str, Bad] = {
    "mem table with fewer fds than regions": Bad(
        Request.SET_MEM_TABLE,
        lambda rig: (MemoryTable((LOW, RAM)), [rig.guest.fd()]),
        unchanged=lambda rig: rig.backend.memory,
    ),
    "mem table region beyond its file": Bad(
        Request.SET_MEM_TABLE,
        lambda rig: (MemoryTable((Region(0, RAM_SIZE * 2, UVA, 0),)), [rig.guest.fd()]),
        unchanged=lambda rig: rig.backend.memory,
    ),
    "body too short": Bad(Request.SET_VRING_NUM, no_fds(bytes(4)), unchanged=vring_sizes),
    "body too long": Bad(Request.SET_OWNER, no_fds(bytes(8))),
    "body of a GET": Bad(Request.GET_FEATURES, no_fds(bytes(8)), close=True),
    "unknown code 99": Bad(99, no_fds(bytes(8))),
    "unknown code 99 with fds": Bad(99, lambda rig: (b"", [rig.eventfd().give(), rig.guest.fd()])),
    "SET_LOG_BASE": Bad(Request.SET_LOG_BASE, lambda rig: (bytes(16), [rig.guest.fd()])),
    "reply flag": Bad(Request.SET_VRING_NUM, no_fds(VringState(0, 64)), unchanged=vring_sizes),
    "vring index = queues": Bad(
        Request.SET_VRING_NUM, no_fds(VringState(4, 64)), unchanged=vring_sizes
    ),
    "vring index 255 kick": Bad(
        Request.SET_VRING_KICK, lambda rig: (VringFile(255, False), [rig.eventfd().give()])
    ),
    "vring index 4 call": Bad(
        Request.SET_VRING_CALL, lambda rig: (VringFile(4, False), [rig.eventfd().give()])
    ),
    "vring index addr": Bad(Request.SET_VRING_ADDR, no_fds(VringAddr(4, 0, UVA, UVA, UVA, 0))),
    "ring outside memory": Bad(
        Request.SET_VRING_ADDR,
        addr_outside_memory,
        unchanged=lambda rig: rig.backend.vrings[0].addr,
    ),
    "vring index enable": Bad(Request.SET_VRING_ENABLE, no_fds(VringState(4, 1))),
    "vring index get base": Bad(Request.GET_VRING_BASE, no_fds(VringState(4, 0)), close=True),
    "vring index 2**32-1 get base": Bad(
        Request.GET_VRING_BASE, no_fds(VringState(2**32 - 1, 0)), close=True
    ),
    "size 0": Bad(Request.SET_VRING_NUM, no_fds(VringState(0, 0)), unchanged=vring_sizes),
    "size 3": Bad(Request.SET_VRING_NUM, no_fds(VringState(0, 3)), unchanged=vring_sizes),
    "size 65536": Bad(
        Request.SET_VRING_NUM,
        no_fds(VringState(0, 65536)),
        unchanged=vring_sizes,
        device={"max_queue_size": 32768},
    ),
    "size 32769": Bad(
        Request.SET_VRING_NUM,
        no_fds(VringState(0, 32769)),
        unchanged=vring_sizes,
        device={"max_queue_size": 32768},
    ),
    "size above device max": Bad(
        Request.SET_VRING_NUM, no_fds(VringState(0, 512)), unchanged=vring_sizes
    ),
    "resize a started ring": Bad(Request.SET_VRING_NUM, resize_started_ring, unchanged=vring_sizes),
    "second SET_OWNER": Bad(Request.SET_OWNER, no_fds(b"")),
    "unoffered feature": Bad(
        Request.SET_FEATURES,
        no_fds(U64(VERSION_1 | F_PROTOCOL_FEATURES | 1 << 40)),
        unchanged=lambda rig: rig.backend.acked_features,
    ),
    "unoffered protocol feature": Bad(
        Request.SET_PROTOCOL_FEATURES,
        no_fds(U64(QEMU_PROTOCOL_FEATURES | ProtocolFeature.LOG_SHMFD)),
        unchanged=lambda rig: rig.backend.acked_protocol_features,
    ),
    "kick without fd (polling)": Bad(
        Request.SET_VRING_KICK,
        no_fds(VringFile(0, True)),
        unchanged=lambda rig: rig.backend.vrings[0].kick_fd,
    ),
    "kick no-fd bit with an fd": Bad(
        Request.SET_VRING_KICK,
        lambda rig: (VringFile(0, True), [rig.eventfd().give()]),
        unchanged=lambda rig: rig.backend.vrings[0].kick_fd,
    ),
    "call fd missing": Bad(Request.SET_VRING_CALL, no_fds(VringFile(0, False))),
    "vring file unknown bits": Bad(
        Request.SET_VRING_ERR, lambda rig: (U64(0x400), [rig.eventfd().give()])
    ),
    "base 65536": Bad(
        Request.SET_VRING_BASE,
        no_fds(VringState(0, 65536)),
        unchanged=lambda rig: rig.backend.vrings[0].base,
    ),
    "enable 2": Bad(
        Request.SET_VRING_ENABLE,
        no_fds(VringState(0, 2)),
        unchanged=lambda rig: rig.backend.vrings[0].enabled,
    ),
    "status 0x100": Bad(
        Request.SET_STATUS, no_fds(U64(0x100)), unchanged=lambda rig: rig.backend.status
    ),
    "config beyond 256 bytes": Bad(
        Request.SET_CONFIG, no_fds(struct.pack("<III", 250, 8, 0) + bytes(8))
    ),
    "GET_CONFIG beyond 256 bytes": Bad(
        Request.GET_CONFIG, no_fds(struct.pack("<III", 0, 300, 0) + bytes(300)), close=True
    ),
    "two backend channel fds": Bad(
        Request.SET_BACKEND_REQ_FD,
        lambda rig: (b"", [rig.eventfd().give(), rig.eventfd().give()]),
        unchanged=lambda rig: rig.backend.backend_req_fd,
    ),
    "add region without fd": Bad(
        Request.ADD_MEM_REG,
        no_fds(SingleMemoryRegion(LOW)),
        unchanged=lambda rig: rig.backend.memory.regions,
    ),
    # fds of the wrong kind: refused at receipt, before anything polls or reads them
    "kick fd a memfd": Bad(
        Request.SET_VRING_KICK,
        lambda rig: (VringFile(0, False), [rig.guest.fd()]),
        unchanged=kept_fds("kick_fd"),
    ),
    "call fd a dead pipe": Bad(
        Request.SET_VRING_CALL,
        lambda rig: (VringFile(1, False), [dead_pipe()]),
        unchanged=kept_fds("call_fd"),
    ),
    "err fd a socket": Bad(
        Request.SET_VRING_ERR,
        lambda rig: (VringFile(1, False), [unix_stream()]),
        unchanged=kept_fds("err_fd"),
    ),
    "backend channel an eventfd": Bad(
        Request.SET_BACKEND_REQ_FD,
        lambda rig: (b"", [rig.eventfd().give()]),
        unchanged=lambda rig: rig.backend.backend_req_fd,
    ),
    "backend channel a datagram socket": Bad(
        Request.SET_BACKEND_REQ_FD,
        lambda rig: (b"", [socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()]),
        unchanged=lambda rig: rig.backend.backend_req_fd,
    ),
    "region fd an eventfd": Bad(
        Request.ADD_MEM_REG,
        lambda rig: (SingleMemoryRegion(LOW), [rig.eventfd().give()]),
        unchanged=lambda rig: rig.backend.memory.regions,
    ),
    "mem table fd a dead pipe": Bad(
        Request.SET_MEM_TABLE,
        lambda rig: (MemoryTable((RAM,)), [dead_pipe()]),
        unchanged=lambda rig: rig.backend.memory,
    ),
    "region of an unsealed memfd": Bad(
        Request.ADD_MEM_REG,
        lambda rig: (SingleMemoryRegion(Region(0, 0x1_0000, UVA + 0x1000_0000, 0)),
                     [unsealed_memfd()]),
        unchanged=lambda rig: rig.backend.memory.regions,
    ),
}
MODES = {
    # REPLY_ACK negotiated and NEED_REPLY set: a failure ack.
    "ack": (QEMU_PROTOCOL_FEATURES, NEED),
    # REPLY_ACK negotiated, no NEED_REPLY: silence.
    "no-need-reply": (QEMU_PROTOCOL_FEATURES, 0),
    # NEED_REPLY set but REPLY_ACK not negotiated: silence.
    "no-reply-ack": (QEMU_PROTOCOL_FEATURES & ~ProtocolFeature.REPLY_ACK, NEED),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", BAD)
def test_bad_input(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, case: str, mode: str
) -> None:
    bad = BAD[case]
    protocol, flags = MODES[mode]
    rig = make_rig(**bad.device)
    rig.negotiate()  # acks on while setting up
    rig.set_mem_table()
    payload, fds = bad.build(rig)
    assert rig.send(Request.SET_PROTOCOL_FEATURES, U64(protocol)) == Outcome()
    if case == "reply flag":
        flags |= m.FLAG_REPLY
    before = bad.unchanged(rig)
    rig.device.take()
    caplog.clear()

    out = rig.send(bad.request, payload, fds, flags)
    assert_closed(*fds)

    name = m.request_name(bad.request)
    lines = warnings_naming(caplog, name)
    assert len(lines) == 1, caplog.text
    if bad.close:
        assert out == Outcome(close=True)
        assert "closing the connection" in lines[0]
    elif mode == "ack":
        assert ack(out, bad.request) == 1  # a failure ack, with the request's own code
    else:
        assert out == Outcome()
    assert bad.unchanged(rig) == before
    assert rig.device.take() == []

    # Still working: a question is answered, and a valid request takes effect.
    assert reply(rig.send(Request.GET_QUEUE_NUM), Request.GET_QUEUE_NUM, U64) == U64(4)
    assert rig.send(Request.SET_PROTOCOL_FEATURES, U64(QEMU_PROTOCOL_FEATURES)) == Outcome()
    rig.ok(Request.SET_VRING_NUM, VringState(0, 64))
    assert rig.backend.vrings[0].size == 64
    rig.start_ring(2)
    rig.transfer(2, 1)


def test_unknown_request_failure_ack_echoes_its_code(rig: Rig) -> None:
    out = rig.send(1234, b"", (), NEED)
    assert out.reply == struct.pack("<IIIQ", 1234, 0x5, 8, 1)


def test_need_reply_on_a_get_gets_only_the_answer(rig: Rig) -> None:
    out = rig.send(Request.GET_QUEUE_NUM, b"", (), NEED)
    assert out.reply == struct.pack("<IIIQ", Request.GET_QUEUE_NUM, 0x5, 8, 4)


def test_acks_need_reply_ack_negotiated(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    assert rig.send(Request.SET_OWNER, b"", (), NEED) == Outcome()
    rig.send(Request.SET_PROTOCOL_FEATURES, U64(ProtocolFeature.REPLY_ACK))
    assert (
        ack(rig.send(Request.SET_VRING_NUM, VringState(0, 8), (), NEED), Request.SET_VRING_NUM) == 0
    )
    assert rig.send(Request.SET_VRING_NUM, VringState(0, 8)) == Outcome()


# --------------------------------------------------------------------------- fds from outside


def test_a_wrong_fd_kind_is_named_with_its_vring_and_counted(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.start_ring(1)
    running = rig.backend.vrings[1].kick_fd
    pipe = dead_pipe()
    assert ack(rig.send(Request.SET_VRING_KICK, VringFile(1, False), [pipe], NEED),
               Request.SET_VRING_KICK) == 1
    assert_closed(pipe)
    assert warnings_naming(caplog, "SET_VRING_KICK") == [
        "SET_VRING_KICK: rejected: vring 1: the fd is a pipe, not an eventfd"]
    # The ring runs on as it was, on its old kick fd.
    assert rig.backend.vrings[1].kick_fd == running and rig.device.take() == []
    rig.transfer(1, 2)
    memory = rig.backend.memory
    fds = [rig.guest.fd(), rig.eventfd().give()]
    out = rig.send(Request.SET_MEM_TABLE, MemoryTable((LOW, RAM)), fds, NEED)
    assert ack(out, Request.SET_MEM_TABLE) == 1
    assert_closed(*fds)
    assert warnings_naming(caplog, "SET_MEM_TABLE") == [
        "SET_MEM_TABLE: rejected: fd 2 of 2: the fd is an eventfd, not a regular file "
        "(memfd, hugetlbfs, tmpfs)"]
    assert rig.backend.memory is memory
    assert rig.backend.stats()["bad_fds"] == {"SET_VRING_KICK": 1, "SET_MEM_TABLE": 1}
    assert rig.backend.stats()["rejected"] == {"SET_VRING_KICK": 1, "SET_MEM_TABLE": 1}


def test_fds_that_are_read_or_written_are_made_non_blocking(rig: Rig) -> None:
    # QEMU's are non-blocking already; a blocking one would let the front end stall the
    # event loop by draining it after epoll woke us, or by leaving it at its maximum.
    blocking = [os.eventfd(0) for _ in range(3)]
    ours, theirs = socket.socketpair()
    with ours:
        kept = [os.dup(fd) for fd in blocking]
        kept.append(os.dup(theirs.fileno()))
        for request, fd in zip((Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                Request.SET_VRING_ERR), blocking, strict=True):
            rig.ok(request, VringFile(2, False), [fd])
        rig.ok(Request.SET_BACKEND_REQ_FD, b"", [theirs.detach()])
        try:
            assert [os.get_blocking(fd) for fd in kept] == [False] * 4
        finally:
            for fd in kept:
                os.close(fd)


def test_a_full_eventfd_is_counted_never_waited_on(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    call = os.eventfd(0)  # blocking, as the front end may hand it over
    mine = os.dup(call)
    try:
        rig.ok(Request.SET_VRING_CALL, VringFile(0, False), [call])
        os.eventfd_write(mine, 0xFFFF_FFFF_FFFF_FFFE)  # the maximum count
        vring = rig.backend.vrings[0]
        for _ in range(3):
            vring.notify()  # would block in write(2) forever if the fd were blocking
        assert rig.backend.stats()["eventfd_failures"] == {"0": {"call": 3}}
        assert len(warnings_naming(caplog, "call eventfd write failed")) == 1
        # A new call fd: its first failure is logged again.
        fresh = rig.eventfd()
        rig.ok(Request.SET_VRING_CALL, VringFile(0, False), [fresh.give()])
        os.eventfd_write(fresh.fd, 0xFFFF_FFFF_FFFF_FFFE)
        vring.notify()
        assert len(warnings_naming(caplog, "call eventfd write failed")) == 2
        assert rig.backend.stats()["eventfd_failures"] == {"0": {"call": 4}}
    finally:
        os.close(mine)


def test_memory_slots_are_bounded_by_get_max_mem_slots(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig()
    rig.negotiate()
    slots = reply(rig.send(Request.GET_MAX_MEM_SLOTS), Request.GET_MAX_MEM_SLOTS, U64).value
    assert slots == MAX_MEM_SLOTS == 509
    page = 4096
    regions = [Region(0x1000_0000 + i * page, page, UVA + 0x1000_0000 + i * page, 0)
               for i in range(slots + 1)]
    for region in regions[:slots]:
        rig.ok(Request.ADD_MEM_REG, SingleMemoryRegion(region), [rig.guest.fd()])
    assert rig.backend.memory is not None and len(rig.backend.memory.regions) == slots
    fd = rig.guest.fd()
    out = rig.send(Request.ADD_MEM_REG, SingleMemoryRegion(regions[slots]), [fd], NEED)
    assert ack(out, Request.ADD_MEM_REG) == 1
    assert_closed(fd)
    (line,) = warnings_naming(caplog, "ADD_MEM_REG")
    assert f"0x{regions[slots].guest_phys_addr:x}" in line and "all 509 memory slots" in line
    assert len(rig.backend.memory.regions) == slots
    # A slot freed is a slot to use again.
    rig.ok(Request.REM_MEM_REG, SingleMemoryRegion(regions[0]))
    rig.ok(Request.ADD_MEM_REG, SingleMemoryRegion(regions[slots]), [rig.guest.fd()])
    assert len(rig.backend.memory.regions) == slots
