"""The driver side: ring layout, descriptor bookkeeping and what it writes to the rings."""

from __future__ import annotations

import struct

import pytest

from virtqueue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    BytesMemory,
    DriverQueue,
    QueueFullError,
    RingError,
    VirtqueueError,
    ring_layout,
)

BASE = 0x4000
DESC = struct.Struct("<QIHH")


def make(
    size: int = 8, *, event_idx: bool = False, start_idx: int = 0
) -> tuple[BytesMemory, DriverQueue, tuple[int, int, int]]:
    mem = BytesMemory()
    d, a, u, _ = ring_layout(size)
    addrs = (BASE + d, BASE + a, BASE + u)
    return mem, DriverQueue(mem, size, *addrs, event_idx=event_idx, start_idx=start_idx), addrs


def u16(mem: BytesMemory, addr: int) -> int:
    return int.from_bytes(mem.view(addr, 2), "little")


def put_u16(mem: BytesMemory, addr: int, value: int) -> None:
    mem.view(addr, 2)[:] = value.to_bytes(2, "little")


def desc(mem: BytesMemory, addr: int) -> tuple[int, int, int, int]:
    return DESC.unpack(mem.view(addr, 16))


@pytest.mark.parametrize("size", [1, 2, 4, 256, 32768])
def test_ring_layout(size: int) -> None:
    d, a, u, total = ring_layout(size)
    assert d == 0
    assert a == 16 * size
    assert u % 4 == 0 and a + 6 + 2 * size <= u < a + 6 + 2 * size + 4
    assert total == u + 6 + 8 * size


@pytest.mark.parametrize("size", [0, 3, 65536, 32769, -8])
def test_ring_layout_bad_size(size: int) -> None:
    with pytest.raises(RingError, match="queue size"):
        ring_layout(size)


def test_init_zeroes_rings_and_sets_start_idx() -> None:
    mem = BytesMemory()
    d, a, u, total = ring_layout(4)
    mem.view(BASE, total)[:] = b"\xff" * total
    DriverQueue(mem, 4, BASE + d, BASE + a, BASE + u, start_idx=0xFFFE)
    raw = bytes(mem.view(BASE, total))
    assert raw[: a + 2] == bytes(a + 2)
    assert u16(mem, BASE + a + 2) == 0xFFFE
    assert u16(mem, BASE + u + 2) == 0xFFFE


def test_add_writes_a_linked_chain_and_publishes() -> None:
    mem, drv, (d, a, _) = make()
    head = drv.add([(0x10000, 5), (0x10010, 6)], [(0x20000, 7)])
    assert head == 0
    assert desc(mem, d) == (0x10000, 5, VIRTQ_DESC_F_NEXT, 1)
    assert desc(mem, d + 16) == (0x10010, 6, VIRTQ_DESC_F_NEXT, 2)
    assert desc(mem, d + 32) == (0x20000, 7, VIRTQ_DESC_F_WRITE, 0)
    assert u16(mem, a + 2) == 1  # avail.idx
    assert u16(mem, a + 4) == 0  # avail.ring[0]
    assert drv.free_descriptors == 5


def test_add_indirect_uses_one_descriptor() -> None:
    mem, drv, (d, _, _) = make()
    head = drv.add([(0x10000, 5)], [(0x20000, 7), (0x30000, 9)], indirect_table=0x50000)
    assert desc(mem, d + 16 * head) == (0x50000, 48, VIRTQ_DESC_F_INDIRECT, 0)
    assert [desc(mem, 0x50000 + 16 * i) for i in range(3)] == [
        (0x10000, 5, VIRTQ_DESC_F_NEXT, 1),
        (0x20000, 7, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2),
        (0x30000, 9, VIRTQ_DESC_F_WRITE, 0),
    ]
    assert drv.free_descriptors == 7


def test_queue_full_and_empty_chain() -> None:
    _, drv, _ = make(4)
    drv.add([(0x10000, 1)] * 3)
    with pytest.raises(QueueFullError) as info:
        drv.add([(0x10000, 1)] * 2)
    assert isinstance(info.value, VirtqueueError)
    assert drv.free_descriptors == 1  # a failed add takes nothing
    drv.add([], [(0x10000, 1)], indirect_table=0x60000)
    with pytest.raises(QueueFullError):
        drv.add([(0x10000, 1)], indirect_table=0x60000)
    with pytest.raises(ValueError, match="at least one"):
        drv.add([])


def device_returns(
    mem: BytesMemory,
    addrs: tuple[int, int, int],
    size: int,
    used: list[tuple[int, int]],
    start: int = 0,
) -> None:
    """What a device does: used elements, then used.idx."""
    u = addrs[2]
    for k, (head, written) in enumerate(used):
        slot = (start + k) % size
        mem.view(u + 4 + 8 * slot, 8)[:] = struct.pack("<II", head, written)
    put_u16(mem, u + 2, (start + len(used)) & 0xFFFF)


def test_get_used_frees_descriptors_and_wraps() -> None:
    mem, drv, addrs = make(4, start_idx=0xFFFF)
    h1 = drv.add([(0x10000, 1)], [(0x20000, 2)])
    h2 = drv.add([(0x10000, 1)])
    assert drv.free_descriptors == 1
    assert drv.get_used() is None and drv.used_pending() == 0
    device_returns(mem, addrs, 4, [(h2, 0), (h1, 2)], start=0xFFFF)
    assert drv.used_pending() == 2
    assert drv.get_used() == (h2, 0)
    assert drv.get_used() == (h1, 2)
    assert drv.get_used() is None
    assert drv.free_descriptors == 4
    assert u16(mem, addrs[1] + 2) == 1  # avail.idx wrapped from 0xFFFF


def test_get_used_rejects_a_head_not_in_flight() -> None:
    mem, drv, addrs = make(4)
    device_returns(mem, addrs, 4, [(3, 0)])
    with pytest.raises(RingError, match="not in flight"):
        drv.get_used()


def test_interrupt_suppression_without_event_idx() -> None:
    mem, drv, addrs = make(4)
    a, u = addrs[1], addrs[2]
    drv.disable_interrupts()
    assert u16(mem, a) == VIRTQ_AVAIL_F_NO_INTERRUPT
    assert drv.enable_interrupts() is False
    assert u16(mem, a) == 0
    drv.add([(0x10000, 1)])
    device_returns(mem, addrs, 4, [(0, 0)])
    assert drv.enable_interrupts() is True  # already pending: poll again
    assert drv.should_kick() is True
    put_u16(mem, u, VIRTQ_USED_F_NO_NOTIFY)
    assert drv.should_kick() is False


def test_event_idx_kicks_and_interrupts() -> None:
    mem, drv, addrs = make(8, event_idx=True)
    a, u = addrs[1], addrs[2]
    avail_event = u + 4 + 8 * 8
    used_event = a + 4 + 2 * 8
    drv.disable_interrupts()  # no-op with event_idx
    assert u16(mem, a) == 0
    drv.add([(0x10000, 1)])
    drv.add([(0x10000, 1)])
    put_u16(mem, avail_event, 5)  # device: kick me when avail idx passes 5
    assert drv.should_kick() is False  # 0 -> 2
    for _ in range(4):
        drv.add([(0x10000, 1)])
    assert drv.should_kick() is True  # 2 -> 6 crosses 5
    drv.add([(0x10000, 1)])
    assert drv.should_kick() is False  # 6 -> 7
    device_returns(mem, addrs, 8, [(0, 0)])
    assert drv.get_used() == (0, 0)
    assert drv.enable_interrupts() is False
    assert u16(mem, used_event) == 1


def test_raw_helpers() -> None:
    mem, drv, (d, a, _) = make(4)
    drv.write_desc(3, 0xDEAD, 17, 0xFFFF, 9)
    assert desc(mem, d + 48) == (0xDEAD, 17, 0xFFFF, 9)
    with pytest.raises(ValueError, match="outside"):
        drv.write_desc(4, 0, 0, 0, 0)
    drv.publish(3)
    assert (u16(mem, a + 2), u16(mem, a + 4)) == (1, 3)
    assert drv.free_descriptors == 3  # the head is in flight
    drv.publish(7)  # a corrupt head, for the device to reject
    assert drv.free_descriptors == 3
    drv.set_avail_idx(0x1234)
    assert u16(mem, a + 2) == 0x1234
