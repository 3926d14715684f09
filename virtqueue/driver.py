"""The driver side of a split virtqueue, for testing front ends and tests."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from virtqueue._layout import (
    AVAIL_RING,
    DESC_SIZE,
    FLAGS,
    IDX,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Rings,
    avail_bytes,
    check_size,
    need_event,
    used_bytes,
)
from virtqueue._native import fence_acquire, fence_full, fence_release
from virtqueue.errors import QueueFullError, RingError
from virtqueue.memory import GuestMemory

__all__ = ["DriverQueue", "ring_layout"]

_DESC = struct.Struct("<QIHH")


def ring_layout(size: int) -> tuple[int, int, int, int]:
    """(desc_off, avail_off, used_off, total_bytes) of one contiguous block for a queue.

    The avail ring follows the descriptor table, and the used ring follows it at the next
    4-byte boundary: the alignment virtio 1.x requires, not legacy's 4096 bytes.
    """
    check_size(size)
    avail_off = DESC_SIZE * size
    used_off = (avail_off + avail_bytes(size) + 3) & ~3
    return 0, avail_off, used_off, used_off + used_bytes(size)


class DriverQueue:
    """A driver using one split virtqueue: adds buffers, kicks, and collects used ones."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        start_idx: int = 0,
    ) -> None:
        """`start_idx` is where the avail and used indexes begin (a device resuming there)."""
        self._rings = r = Rings(mem, size, desc_addr, avail_addr, used_addr)
        for area in (r.desc, r.avail, r.used):
            area.cast("B")[:] = bytes(area.nbytes)
        r.avail[IDX] = r.used[IDX] = start_idx
        self._mem = mem
        self._mask = size - 1
        self.size = size
        self.event_idx = event_idx
        self._free = list(range(size - 1, -1, -1))  # a stack: hands out 0, 1, 2... first
        # head -> the ring descriptors of its chain, freed when the device returns it.
        self._in_flight: dict[int, list[int]] = {}
        self._next_avail = start_idx
        self._kicked = start_idx  # avail idx at the previous should_kick()
        self._last_used = start_idx

    @property
    def free_descriptors(self) -> int:
        """Descriptors of the ring not in any chain in flight."""
        return len(self._free)

    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]] = (),
        *,
        indirect_table: int | None = None,
    ) -> int:
        """Make a chain of device-readable `out` then device-writable `in_` (gpa, len) buffers
        available and return its head; with `indirect_table` (a gpa with room for 16 bytes per
        buffer) the buffers go in an indirect table there and take one ring descriptor."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in in_]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        needed = len(bufs) if indirect_table is None else 1
        if needed > len(self._free):
            raise QueueFullError(f"{needed} descriptors needed, {len(self._free)} free")
        descs = [self._free.pop() for _ in range(needed)]
        if indirect_table is None:
            nexts = [*descs[1:], 0]
            self._write_chain(self._rings.desc, descs, nexts, bufs)
        else:
            table = self._mem.view(indirect_table, DESC_SIZE * len(bufs))
            entries = list(range(len(bufs)))
            self._write_chain(table, entries, [*entries[1:], 0], bufs)
            self.write_desc(descs[0], indirect_table, table.nbytes, VIRTQ_DESC_F_INDIRECT, 0)
        self._in_flight[descs[0]] = descs
        self._make_available(descs[0])
        return descs[0]

    def should_kick(self) -> bool:
        """Whether the device wants a kick for what was added since the last call."""
        fence_full()  # our avail idx store before reading the device's suppression state
        r = self._rings
        if self.event_idx:
            old, self._kicked = self._kicked, self._next_avail
            return need_event(r.used[r.avail_event], self._next_avail, old)
        return not r.used[FLAGS] & VIRTQ_USED_F_NO_NOTIFY

    def used_pending(self) -> int:
        """How many used elements the device has published that get_used() did not take."""
        return (self._rings.used[IDX] - self._last_used) & 0xFFFF

    def get_used(self) -> tuple[int, int] | None:
        """The next (head, written) the device returned, or None; frees its descriptors."""
        if not self.used_pending():
            return None
        fence_acquire()  # the element is read after the used idx that published it
        i = 2 * (self._last_used & self._mask)
        head, written = self._rings.used_elems[i], self._rings.used_elems[i + 1]
        self._last_used = (self._last_used + 1) & 0xFFFF
        descs = self._in_flight.pop(head, None)
        if descs is None:
            raise RingError(f"the device returned head {head}, which is not in flight")
        self._free.extend(descs)
        return head, written

    def enable_interrupts(self) -> bool:
        """Ask the device for interrupts again; True if used elements are already pending."""
        r = self._rings
        if self.event_idx:
            r.avail[r.used_event] = self._last_used
        else:
            r.avail[FLAGS] &= ~VIRTQ_AVAIL_F_NO_INTERRUPT
        fence_full()  # the request before the check, or a completion could go unnoticed
        return self.used_pending() > 0

    def disable_interrupts(self) -> None:
        """Tell the device interrupts are not needed; a no-op with event_idx."""
        if not self.event_idx:
            self._rings.avail[FLAGS] |= VIRTQ_AVAIL_F_NO_INTERRUPT

    def write_desc(self, index: int, addr: int, length: int, flags: int, next: int) -> None:
        """Write ring descriptor `index` as given, valid or not (for building bad rings)."""
        if not 0 <= index < self.size:
            raise ValueError(f"descriptor index {index} outside a queue of {self.size}")
        _DESC.pack_into(self._rings.desc, DESC_SIZE * index, addr, length, flags, next)

    def publish(self, head: int) -> None:
        """Put `head` in the avail ring as is (bad rings).

        Only `head` itself is taken off the free list until the device returns it; the rest of
        a chain built with write_desc is the caller's to keep apart from add().
        """
        if head in self._free:
            self._free.remove(head)
            self._in_flight[head] = [head]
        else:
            self._in_flight.setdefault(head, [])
        self._make_available(head)

    def set_avail_idx(self, value: int) -> None:
        """Overwrite the avail idx the device sees (bad rings)."""
        self._rings.avail[IDX] = value

    def _write_chain(
        self,
        table: memoryview,
        slots: list[int],
        nexts: list[int],
        bufs: list[tuple[int, int, int]],
    ) -> None:
        last = len(bufs) - 1
        for k, (addr, length, flags) in enumerate(bufs):
            flags |= VIRTQ_DESC_F_NEXT if k < last else 0
            _DESC.pack_into(table, DESC_SIZE * slots[k], addr, length, flags, nexts[k])

    def _make_available(self, head: int) -> None:
        self._rings.avail[AVAIL_RING + (self._next_avail & self._mask)] = head
        self._next_avail = (self._next_avail + 1) & 0xFFFF
        fence_release()  # the entry and its descriptors before the idx that publishes them
        self._rings.avail[IDX] = self._next_avail
