"""The device side of split virtqueues, driven through DriverQueue; every test runs with both
chain walkers (compiled and pure Python)."""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import virtqueue.split as split_module
from vhostser.testing import sealed_memfd
from virtqueue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    BytesMemory,
    Chain,
    ChainError,
    DriverQueue,
    MappedMemory,
    QueueFullError,
    Region,
    RingError,
    SplitQueue,
    ring_layout,
)
from virtqueue._native import _common, _pywalk
from virtqueue._native._common import Segment

try:
    from virtqueue._native import _cwalk
except ImportError:
    _cwalk = None  # type: ignore[assignment]

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
RINGS = 0x1000  # rings live in region 0 ...
DATA = 0x10_0000  # ... buffers in region 1
DATA_SIZE = 0x10_0000


@pytest.fixture(scope="module", params=["cffi", "python"], autouse=True)
def walker(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the module once with each implementation behind SplitQueue."""
    mod = _cwalk if request.param == "cffi" else _pywalk
    if mod is None:
        pytest.skip("C helper not built")
    step = mod.step

    def walk_chain(
        table: memoryview, head: int, view: Callable[[int, int], memoryview], *, indirect: bool
    ) -> list[Segment]:
        return _common.walk_chain(step, table, head, view, indirect)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(split_module, "walk_chain", walk_chain)
        for name in ("fence_acquire", "fence_release", "fence_full"):
            mp.setattr(split_module, name, getattr(mod, name))
        yield request.param


def ref_need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event() of Linux include/uapi/linux/virtio_ring.h."""
    return (new - event - 1) % 65536 < (new - old) % 65536


@dataclass
class Rig:
    mem: BytesMemory
    drv: DriverQueue
    dev: SplitQueue
    addrs: tuple[int, int, int]
    next_free: int = DATA

    def alloc(self, n: int, fill: bytes = b"") -> int:
        """Bump-allocate n bytes (16-aligned) of buffer memory, optionally filled."""
        addr = self.next_free
        self.next_free += (n + 15) & ~15
        assert self.next_free <= DATA + DATA_SIZE
        if fill:
            self.mem.view(addr, n)[:] = fill
        return addr

    def bad_chain_then_good(self, head: int) -> None:
        """The bad chain at `head` was popped: complete it, then the queue still works."""
        self.dev.push(head, 0)
        out = self.alloc(3, b"abc")
        inb = self.alloc(4)
        good = self.drv.add([(out, 3)], [(inb, 4)])
        chain = self.dev.pop()
        assert chain is not None and chain.head == good and chain.read() == b"abc"
        chain.write(b"wxyz")
        self.dev.push(good, 4)
        assert self.drv.get_used() == (head, 0)
        assert self.drv.get_used() == (good, 4)
        assert bytes(self.mem.view(inb, 4)) == b"wxyz"
        assert self.dev.pop() is None


def rig(size: int = 8, *, event_idx: bool = False, start: int = 0, indirect: bool = True) -> Rig:
    mem = BytesMemory([(0, 0x10_0000), (DATA, DATA_SIZE)])
    d, a, u, _ = ring_layout(size)
    addrs = (RINGS + d, RINGS + a, RINGS + u)
    drv = DriverQueue(mem, size, *addrs, event_idx=event_idx, start_idx=start)
    dev = SplitQueue(mem, size, *addrs, event_idx=event_idx, indirect=indirect, next_avail=start)
    return Rig(mem, drv, dev, addrs)


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 65536, 32769, 6, -4])
def test_bad_queue_size(size: int) -> None:
    with pytest.raises(RingError, match="queue size"):
        SplitQueue(BytesMemory(), size, 0, 0x1000, 0x2000)


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_good_queue_sizes(size: int) -> None:
    d, a, u, total = ring_layout(size)
    q = SplitQueue(BytesMemory([(0, total)]), size, d, a, u)
    assert (q.size, q.next_avail, q.next_used, q.event_idx) == (size, 0, 0, False)


@pytest.mark.parametrize(
    ("desc", "avail", "used", "match"),
    [
        (0x1008, 0x2000, 0x3000, "16-byte"),
        (0x1000, 0x2001, 0x3000, "2-byte"),
        (0x1000, 0x2000, 0x3002, "4-byte"),
        (0xFF80 + 16, 0x2000, 0x3000, "outside"),  # table runs past the region's end
        (0x1000, 0x10000 - 6 - 2 * 8 + 2, 0x3000, "outside"),  # avail: used_event outside
        (0x1000, 0x2000, 0x10000 - 6 - 8 * 8 + 2, "outside"),  # used: avail_event outside
        (0x1000, 0x2000, 0x20000, "outside"),
    ],
)
def test_bad_ring_addresses(desc: int, avail: int, used: int, match: str) -> None:
    mem = BytesMemory([(0, 0x10000)])
    with pytest.raises(RingError, match=match):
        SplitQueue(mem, 8, desc, avail, used)


def test_rings_exactly_at_region_end() -> None:
    mem = BytesMemory([(0, 0x10000)])
    SplitQueue(mem, 8, 0x10000 - 128, 0x10000 - 6 - 16, 0x10000 - 6 - 64 - 2)


def test_start_indexes() -> None:
    mem = BytesMemory()
    assert SplitQueue(mem, 8, 0, 0x1000, 0x2000, next_avail=7).next_used == 7
    q = SplitQueue(mem, 8, 0, 0x1000, 0x2000, next_avail=7, next_used=3)
    assert (q.next_avail, q.next_used) == (7, 3)
    for bad in (-1, 65536):
        with pytest.raises(RingError, match="16-bit"):
            SplitQueue(mem, 8, 0, 0x1000, 0x2000, next_avail=bad)
        with pytest.raises(RingError, match="16-bit"):
            SplitQueue(mem, 8, 0, 0x1000, 0x2000, next_used=bad)


# --- round trips ----------------------------------------------------------------------------


def test_round_trip_direct_and_indirect() -> None:
    r = rig(4, start=0xFFFE)  # wraps the 16-bit indexes within the test
    for indirect in (False, True, False, True):
        out1, out2 = r.alloc(5, b"hello"), r.alloc(6, b" world")
        in1, in2 = r.alloc(4), r.alloc(100)
        table = r.alloc(64) if indirect else None
        head = r.drv.add([(out1, 5), (out2, 6)], [(in1, 4), (in2, 100)], indirect_table=table)
        assert r.dev.available() == 1
        chain = r.dev.pop()
        assert chain is not None
        assert chain.head == head
        assert chain.read() == b"hello world"
        assert (chain.readable_len, chain.writable_len) == (11, 104)
        assert [len(v) for v in chain.writable] == [4, 100]
        assert chain.write(b"0123456789") == 10
        r.dev.push(head, 10)
        assert r.dev.pop() is None
        assert r.drv.get_used() == (head, 10)
        assert bytes(r.mem.view(in1, 4)) + bytes(r.mem.view(in2, 6)) == b"0123456789"
    assert r.dev.next_avail == r.dev.next_used == 2
    assert r.drv.free_descriptors == 4


def test_chain_of_exactly_queue_size_and_zero_lengths() -> None:
    r = rig(4)
    bufs = [(r.alloc(1, b"a"), 1), (r.alloc(1), 0), (r.alloc(2, b"bc"), 2)]
    head = r.drv.add(bufs, [(r.alloc(1), 0)])
    chain = r.dev.pop()
    assert chain is not None and chain.head == head
    assert chain.read() == b"abc"
    assert chain.writable_len == 0 and chain.write(b"x") == 0


def test_push_many_publishes_all() -> None:
    r = rig(8)
    heads = [r.drv.add([(r.alloc(1, b"x"), 1)]) for _ in range(5)]
    chains = [r.dev.pop() for _ in heads]
    assert [c.head for c in chains if c] == heads
    r.dev.push_many([(h, i) for i, h in enumerate(reversed(heads))])
    got = [r.drv.get_used() for _ in heads]
    assert got == [(h, i) for i, h in enumerate(reversed(heads))]
    assert r.drv.get_used() is None


def test_push_rejects_bad_elements() -> None:
    r = rig(4)
    for head, written in ((4, 0), (-1, 0), (0, -1), (0, 1 << 32)):
        with pytest.raises(ValueError, match="bad used element"):
            r.dev.push(head, written)
    assert r.dev.next_used == 0
    heads = [r.drv.add([(r.alloc(1), 1)]) for _ in range(2)]
    with pytest.raises(ValueError, match="bad used element"):
        r.dev.push_many([(heads[0], 1), (9, 0), (heads[1], 0)])
    assert r.drv.get_used() == (heads[0], 1)  # what came before the bad one is returned
    assert r.drv.get_used() is None


@pytest.mark.parametrize("start", [0, 0xFFFF])
def test_give_back_makes_pop_return_the_chain_again(start: int) -> None:
    r = rig(4, start=start)  # 0xFFFF: giving back steps next_avail back across the wrap
    first = r.drv.add([(r.alloc(5, b"first"), 5)], [(r.alloc(8), 8)])
    second = r.drv.add([(r.alloc(6, b"second"), 6)], [])
    a = r.dev.pop()
    b = r.dev.pop()
    assert a is not None and b is not None and (a.head, b.head) == (first, second)
    r.dev.give_back(b)
    assert r.dev.available() == 1
    again = r.dev.pop()
    assert again is not None and again.head == second and again.read() == b"second"
    r.dev.give_back(again)
    r.dev.push(a.head, 0)  # completing another chain does not stop the give-back
    again = r.dev.pop()
    assert again is not None and again.head == second and again.read() == b"second"
    r.dev.push(again.head, 0)
    assert r.dev.pop() is None
    assert [r.drv.get_used(), r.drv.get_used()] == [(first, 0), (second, 0)]


def test_give_back_twice_is_refused() -> None:
    r = rig()
    r.drv.add([(r.alloc(1, b"x"), 1)], [])
    chain = r.dev.pop()
    assert chain is not None
    r.dev.give_back(chain)
    with pytest.raises(ValueError, match="no chain was popped since the last give_back"):
        r.dev.give_back(chain)
    assert r.dev.available() == 1


def test_give_back_of_a_chain_not_popped_last_is_refused() -> None:
    r = rig()
    for data in (b"a", b"b"):
        r.drv.add([(r.alloc(1, data), 1)], [])
    a = r.dev.pop()
    b = r.dev.pop()
    assert a is not None and b is not None
    with pytest.raises(ValueError, match=f"only the chain popped last \\({b.head}\\)"):
        r.dev.give_back(a)
    assert r.dev.available() == 0
    r.dev.give_back(b)  # the last one still can be


def test_give_back_of_a_pushed_chain_is_refused() -> None:
    r = rig()
    r.drv.add([(r.alloc(1, b"x"), 1)], [])
    chain = r.dev.pop()
    assert chain is not None
    r.dev.push(chain.head, 0)
    with pytest.raises(ValueError, match="or it was pushed"):
        r.dev.give_back(chain)


def test_give_back_after_a_bad_chain_is_refused_for_the_chain_before_it() -> None:
    r = rig()
    good = r.drv.add([(r.alloc(1, b"x"), 1)], [])
    r.drv.add([(DATA + DATA_SIZE, 1)], [])  # outside guest memory
    chain = r.dev.pop()
    assert chain is not None and chain.head == good
    with pytest.raises(ChainError) as bad:
        r.dev.pop()
    with pytest.raises(ValueError, match="only the chain popped last"):
        r.dev.give_back(chain)
    r.bad_chain_then_good(bad.value.head)


def test_full_ring_is_not_an_error() -> None:
    r = rig(4)
    for _ in range(4):
        r.drv.add([(r.alloc(1), 1)])
    assert r.dev.available() == 4
    assert [c.head for c in iter(r.dev.pop, None)] == [0, 1, 2, 3]


def test_release_lets_mapped_memory_unmap() -> None:
    mem = MappedMemory()
    fd = sealed_memfd("vq-release-test", 0x10000)
    try:
        mem.add(Region(0, 0x10000, 0x7000_0000, 0), fd)
    finally:
        os.close(fd)
    d, a, u, _ = ring_layout(8)
    drv = DriverQueue(mem, 8, d, a, u)
    q = SplitQueue(mem, 8, d, a, u)
    drv.add([(0x8000, 4)])
    chain = q.pop()
    assert chain is not None
    del chain, drv  # every view the test took
    q.release()
    mem.close()
    with open("/proc/self/maps") as f:
        assert "vq-release-test" not in f.read()


# --- chains ---------------------------------------------------------------------------------


def make_chain(bufs: list[bytes], writable: list[int]) -> tuple[Chain, list[bytearray]]:
    out = [bytearray(n) for n in writable]
    return Chain(7, [memoryview(b) for b in bufs], [memoryview(b) for b in out]), out


def test_chain_read_and_read_into() -> None:
    chain, _ = make_chain([b"abc", b"", b"defgh"], [])
    assert chain.read() == b"abcdefgh"
    buf = bytearray(5)
    assert chain.read_into(buf) == 5 and buf == b"abcde"
    big = bytearray(20)
    assert chain.read_into(memoryview(big)) == 8 and big[:8] == b"abcdefgh"
    assert chain.read_into(bytearray()) == 0


def test_chain_write_scatters_from_offset() -> None:
    chain, out = make_chain([], [3, 0, 4, 2])
    assert chain.writable_len == 9
    assert chain.write(b"ABCDE", offset=2) == 5
    assert out == [bytearray(b"\0\0A"), bytearray(), bytearray(b"BCDE"), bytearray(2)]
    assert chain.write(memoryview(b"xyz123"), offset=7) == 2
    assert out[3] == b"xy"
    assert chain.write(b"q", offset=9) == 0
    assert chain.write(b"", offset=0) == 0
    assert chain.write(b"0123456789ab") == 9
    assert b"".join(out) == b"012345678"
    with pytest.raises(ValueError, match="negative"):
        chain.write(b"x", offset=-1)


# --- bad chains: ChainError, the queue moves on ----------------------------------------------


def raw_desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def pop_chain_error(r: Rig, head: int, match: str) -> None:
    with pytest.raises(ChainError, match=match) as info:
        r.dev.pop()
    assert info.value.head == head
    r.bad_chain_then_good(head)


def test_buffer_outside_memory() -> None:
    r = rig()
    head = r.drv.add([(r.alloc(4), 4), (0xDEAD_0000_0000, 8)])
    pop_chain_error(r, head, "outside guest memory")


def test_buffer_straddling_region_end() -> None:
    r = rig()
    head = r.drv.add([], [(DATA + DATA_SIZE - 4, 8)])
    pop_chain_error(r, head, "outside guest memory")


def test_indirect_table_outside_memory() -> None:
    r = rig()
    r.drv.write_desc(5, 0x8000_0000, 32, INDIRECT, 0)
    r.drv.publish(5)
    pop_chain_error(r, 5, "indirect table of descriptor 5")


def test_buffer_in_indirect_table_outside_memory() -> None:
    r = rig()
    head = r.drv.add([(0x8000_0000, 1)], indirect_table=r.alloc(16))
    pop_chain_error(r, head, "outside guest memory")


def test_loop() -> None:
    r = rig(8)
    buf = r.alloc(8)
    r.drv.write_desc(6, buf, 8, NEXT, 7)
    r.drv.write_desc(7, buf, 8, NEXT, 6)
    r.drv.publish(6)
    pop_chain_error(r, 6, "loops")


def test_chain_longer_than_queue() -> None:
    r = rig(4)
    buf = r.alloc(8)
    for i, nxt in enumerate([1, 2, 3, 1]):  # 0 1 2 3 1 ...: a fifth descriptor
        r.drv.write_desc(i, buf, 8, NEXT, nxt)
    r.drv.publish(0)
    pop_chain_error(r, 0, "longer than the table size 4")


def test_loop_in_indirect_table() -> None:
    r = rig()
    table = r.alloc(48)
    r.drv.write_desc(2, table, 48, INDIRECT, 0)
    r.drv.publish(2)
    r.mem.view(table, 48)[:] = b"".join(raw_desc(r.alloc(1), 1, NEXT, nxt) for nxt in (1, 2, 0))
    pop_chain_error(r, 2, "indirect table: chain loops")


def test_next_out_of_range() -> None:
    r = rig(8)
    r.drv.write_desc(3, r.alloc(8), 8, NEXT, 8)
    r.drv.publish(3)
    pop_chain_error(r, 3, "links to 8")


def test_indirect_inside_indirect() -> None:
    r = rig()
    inner = r.alloc(16)
    outer = r.alloc(32)
    head = r.drv.add([(r.alloc(1), 1), (inner, 16)], indirect_table=outer)
    r.mem.view(outer + 16 + 12, 2)[:] = INDIRECT.to_bytes(2, "little")  # second entry
    pop_chain_error(r, head, "indirect inside an indirect table")


@pytest.mark.parametrize("length", [0, 8, 24, 16 * 32768 + 16])
def test_indirect_table_length(length: int) -> None:
    r = rig()
    r.drv.write_desc(0, r.alloc(64), length, INDIRECT, 0)
    r.drv.publish(0)
    pop_chain_error(r, 0, f"indirect table length {length} ")


def test_indirect_with_next() -> None:
    r = rig()
    r.drv.write_desc(0, r.alloc(16), 16, INDIRECT | NEXT, 1)
    r.drv.publish(0)
    pop_chain_error(r, 0, "both INDIRECT and NEXT")


def test_indirect_when_not_negotiated() -> None:
    r = rig(indirect=False)
    head = r.drv.add([(r.alloc(1), 1)], indirect_table=r.alloc(16))
    pop_chain_error(r, head, "not in use")


def test_total_length_overflow() -> None:
    r = rig()
    buf = r.alloc(8)
    r.drv.write_desc(0, buf, 0xFFFF_FFFF, NEXT, 1)
    r.drv.write_desc(1, buf, 1, 0, 0)
    r.drv.publish(0)
    pop_chain_error(r, 0, r"2\*\*32")


def test_total_length_overflow_across_indirect() -> None:
    r = rig()
    table = r.alloc(16)
    r.mem.view(table, 16)[:] = raw_desc(0, 0xFFFF_FFF0, 0, 0)
    r.drv.write_desc(0, r.alloc(16), 16, NEXT, 1)
    r.drv.write_desc(1, table, 16, INDIRECT, 0)
    r.drv.publish(0)
    pop_chain_error(r, 0, r"indirect table: total length reaches 0x100000000")


def test_readable_after_writable() -> None:
    r = rig()
    buf = r.alloc(8)
    r.drv.write_desc(0, buf, 8, WRITE | NEXT, 1)
    r.drv.write_desc(1, buf, 8, 0, 0)
    r.drv.publish(0)
    pop_chain_error(r, 0, "device-readable after a device-writable")


def test_readable_in_indirect_after_writable_direct() -> None:
    r = rig()
    table = r.alloc(16)
    r.mem.view(table, 16)[:] = raw_desc(r.alloc(4), 4, 0, 0)
    r.drv.write_desc(0, r.alloc(4), 4, WRITE | NEXT, 1)
    r.drv.write_desc(1, table, 16, INDIRECT, 0)
    r.drv.publish(0)
    pop_chain_error(r, 0, "indirect table: descriptor 0 is device-readable")


# --- broken rings: RingError, and the queue stays broken ------------------------------------


def test_head_out_of_range() -> None:
    r = rig(8)
    r.drv.publish(8)
    with pytest.raises(RingError, match="head 8"):
        r.dev.pop()
    r.drv.add([(r.alloc(1), 1)])
    with pytest.raises(RingError, match="head 8"):
        r.dev.pop()
    with pytest.raises(RingError):
        r.dev.available()


@pytest.mark.parametrize("start", [0, 0xFFFC])
def test_avail_idx_jumps_too_far(start: int) -> None:
    r = rig(4, start=start)
    r.drv.set_avail_idx((start + 5) & 0xFFFF)
    with pytest.raises(RingError, match="ahead"):
        r.dev.available()
    with pytest.raises(RingError, match="ahead"):
        r.dev.pop()
    r.drv.set_avail_idx(start)  # even put back, the device has given up on the queue
    with pytest.raises(RingError):
        r.dev.pop()


# --- notification suppression ---------------------------------------------------------------


def u16(r: Rig, addr: int) -> int:
    return int.from_bytes(r.mem.view(addr, 2), "little")


def test_notifications_without_event_idx() -> None:
    r = rig(4)
    used_flags = r.addrs[2]
    r.dev.disable_notifications()
    assert u16(r, used_flags) == VIRTQ_USED_F_NO_NOTIFY
    head = r.drv.add([(r.alloc(1), 1)])
    assert r.drv.should_kick() is False
    # the device re-enables and finds the chain added meanwhile: no lost wakeup
    assert r.dev.enable_notifications() is True
    assert u16(r, used_flags) == 0
    assert r.drv.should_kick() is True
    assert r.dev.pop() is not None
    assert r.dev.enable_notifications() is False

    r.dev.push(head, 0)
    assert r.dev.should_notify() is True
    assert r.dev.should_notify() is False  # nothing pushed since
    assert r.drv.get_used() == (head, 0)
    r.drv.disable_interrupts()
    assert u16(r, r.addrs[1]) == VIRTQ_AVAIL_F_NO_INTERRUPT
    for interrupts in (False, True):
        head = r.drv.add([(r.alloc(1), 1)])
        assert r.dev.pop() is not None
        r.dev.push(head, 0)
        assert r.dev.should_notify() is interrupts
        assert r.drv.enable_interrupts() is True


def test_notifications_with_event_idx() -> None:
    r = rig(8, event_idx=True, start=0xFFFE)
    avail_event = r.addrs[2] + 4 + 8 * 8
    r.dev.disable_notifications()  # a no-op with event_idx
    assert u16(r, r.addrs[2]) == 0
    assert r.dev.enable_notifications() is False
    assert u16(r, avail_event) == 0xFFFE
    heads = [r.drv.add([(r.alloc(1), 1)]) for _ in range(3)]
    assert r.drv.should_kick() is True  # 0xFFFE -> 1 passes avail_event
    assert r.dev.pop() is not None
    heads2 = [r.drv.add([(r.alloc(1), 1)])]
    assert r.drv.should_kick() is False  # avail_event still 0xFFFE
    assert r.dev.enable_notifications() is True  # 3 chains wait
    assert u16(r, avail_event) == 0xFFFF

    assert r.drv.enable_interrupts() is False  # used_event = 0xFFFE
    r.dev.push(heads[0], 0)
    assert r.dev.should_notify() is True  # used 0xFFFE -> 0xFFFF passes 0xFFFE
    while r.dev.pop() is not None:
        pass
    r.dev.push_many([(heads[1], 0), (heads[2], 0)])
    assert r.dev.should_notify() is False  # used_event still 0xFFFE
    assert r.dev.should_notify() is False  # nothing new
    r.drv.disable_interrupts()  # no-op with event_idx
    assert r.drv.get_used() == (heads[0], 0)
    assert r.drv.enable_interrupts() is True  # two more wait: used_event 0xFFFF is stale
    r.dev.push(heads2[0], 0)
    assert r.dev.should_notify() is False  # 1 -> 2 does not pass 0xFFFF
    assert [r.drv.get_used() for _ in range(3)] == [(heads[1], 0), (heads[2], 0), (heads2[0], 0)]
    assert r.drv.enable_interrupts() is False  # used_event = 2
    last = r.drv.add([(r.alloc(1), 1)])
    assert r.dev.pop() is not None
    r.dev.push(last, 0)
    assert r.dev.should_notify() is True  # 2 -> 3 passes 2


# --- random traffic -------------------------------------------------------------------------


@dataclass
class Sent:
    head: int
    data: bytes
    ins: list[tuple[int, int]]
    descs: int
    written: bytes = b""


@dataclass
class Model:
    """What the queues should do, worked out by the test on its own."""

    start: int
    avail: deque[Sent] = field(default_factory=deque)  # made available, not popped
    popped: list[tuple[Sent, Chain]] = field(default_factory=list)
    used: deque[Sent] = field(default_factory=deque)  # pushed, not reaped
    added: int = 0
    taken: int = 0  # popped by the device
    pushed: int = 0
    reaped: int = 0
    descs_in_use: int = 0
    kicks_on: bool = True  # without event_idx: used.flags
    irqs_on: bool = True  # without event_idx: avail.flags
    avail_event: int = 0  # with event_idx; DriverQueue zeroes the rings
    used_event: int = 0
    kicked: int = -1  # avail idx at the last should_kick()
    signalled: int = -1  # used idx at the last should_notify()

    def idx(self, count: int) -> int:
        return (self.start + count) & 0xFFFF


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4, 8]),
    start=st.one_of(st.integers(0xFFF8, 0xFFFF), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    data=st.data(),
)
def test_random_traffic(size: int, start: int, event_idx: bool, data: st.DataObject) -> None:
    r = rig(size, event_idx=event_idx, start=start)
    m = Model(start, kicked=start, signalled=start)
    lengths = st.lists(st.integers(0, 40), max_size=4)
    ops = ["add", "add", "pop", "push", "reap", "kick", "device notify", "driver irq"]
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(st.sampled_from(ops), label="op")
        if op == "add":
            outs = data.draw(lengths, label="out")
            ins = data.draw(lengths, label="in")
            if not outs and not ins:
                continue
            indirect = data.draw(st.booleans(), label="indirect")
            payload = [data.draw(st.binary(min_size=n, max_size=n), label="payload") for n in outs]
            out_bufs = [(r.alloc(n, p), n) for n, p in zip(outs, payload, strict=True)]
            in_bufs = [(r.alloc(n), n) for n in ins]
            table = r.alloc(16 * (len(outs) + len(ins))) if indirect else None
            needed = 1 if indirect else len(outs) + len(ins)
            if m.descs_in_use + needed > size:
                with pytest.raises(QueueFullError):
                    r.drv.add(out_bufs, in_bufs, indirect_table=table)
                continue
            head = r.drv.add(out_bufs, in_bufs, indirect_table=table)
            m.descs_in_use += needed
            m.added += 1
            m.avail.append(Sent(head, b"".join(payload), in_bufs, needed))
        elif op == "kick":
            new = m.idx(m.added)
            if event_idx:
                expected = ref_need_event(m.avail_event, new, m.kicked)
            else:
                expected = m.kicks_on
            m.kicked = new
            assert r.drv.should_kick() is expected
        elif op == "pop":
            assert r.dev.available() == len(m.avail)
            chain = r.dev.pop()
            if not m.avail:
                assert chain is None
                continue
            sent = m.avail.popleft()
            m.taken += 1
            assert chain is not None and chain.head == sent.head
            assert chain.read() == sent.data
            assert chain.writable_len == sum(n for _, n in sent.ins)
            m.popped.append((sent, chain))
        elif op == "push" and m.popped:
            batch = []
            for _ in range(data.draw(st.integers(1, len(m.popped)), label="push count")):
                pick = data.draw(st.integers(0, len(m.popped) - 1), label="which")
                sent, chain = m.popped.pop(pick)
                reply = data.draw(st.binary(max_size=chain.writable_len + 5), label="reply")
                offset = data.draw(st.integers(0, 3), label="offset")
                written = chain.write(reply, offset)
                assert written == max(0, min(len(reply), chain.writable_len - offset))
                sent.written = bytes(offset) + reply[:written] if written else b""
                batch.append((sent.head, len(sent.written)))
                m.used.append(sent)
            if len(batch) == 1 and data.draw(st.booleans(), label="single push"):
                r.dev.push(*batch[0])
            else:
                r.dev.push_many(batch)
            m.pushed += len(batch)
            new = m.idx(m.pushed)
            if event_idx:
                expected = ref_need_event(m.used_event, new, m.signalled)
            else:
                expected = m.irqs_on
            m.signalled = new
            assert r.dev.should_notify() is expected
        elif op == "reap":
            assert r.drv.used_pending() == len(m.used)
            got = r.drv.get_used()
            if not m.used:
                assert got is None
                continue
            sent = m.used.popleft()
            m.reaped += 1
            m.descs_in_use -= sent.descs
            assert got == (sent.head, len(sent.written))
            landed = b"".join(bytes(r.mem.view(a, n)) for a, n in sent.ins)
            # bytes before the write offset were never written: they are still zero
            assert landed[: len(sent.written)] == sent.written
        elif op == "device notify":
            if data.draw(st.booleans(), label="enable"):
                assert r.dev.enable_notifications() is bool(m.avail)
                m.kicks_on = True
                m.avail_event = m.idx(m.taken)
            else:
                r.dev.disable_notifications()
                m.kicks_on = event_idx  # a no-op with event_idx
        elif op == "driver irq":
            if data.draw(st.booleans(), label="enable"):
                assert r.drv.enable_interrupts() is bool(m.used)
                m.irqs_on = True
                m.used_event = m.idx(m.reaped)
            else:
                r.drv.disable_interrupts()
                m.irqs_on = event_idx
        assert r.drv.free_descriptors == size - m.descs_in_use
    assert (r.dev.next_avail, r.dev.next_used) == (m.idx(m.taken), m.idx(m.pushed))
