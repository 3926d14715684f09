"""Split virtqueue geometry (virtio 1.2 §2.7) shared by the device and the driver side."""

from __future__ import annotations

import sys

from virtqueue.errors import GuestMemoryError, RingError
from virtqueue.memory import GuestMemory

# Rings are accessed through native-order memoryview casts, which is what the little-endian
# virtio 1.x layout needs only on a little-endian host.
if sys.byteorder != "little":
    raise ImportError("virtqueue supports little-endian hosts only")

MAX_QUEUE_SIZE = 32768
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

# The device-independent feature bits (virtio 1.2 §6) that decide how a queue is driven,
# whatever the transport negotiates them over.
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

DESC_SIZE = 16

# Indexes into the 16-bit views of the avail and used areas.
FLAGS = 0
IDX = 1
AVAIL_RING = 2


def check_size(size: int) -> None:
    """Raise RingError unless `size` is a valid split queue size."""
    if not (0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
        raise RingError(f"queue size {size} is not a power of two from 1 to {MAX_QUEUE_SIZE}")


def avail_bytes(size: int) -> int:
    """Bytes of the avail area: flags, idx, ring[size], used_event."""
    return 6 + 2 * size


def used_bytes(size: int) -> int:
    """Bytes of the used area: flags, idx, ring[size] of (id, len), avail_event."""
    return 6 + 8 * size


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: whether moving an index from `old` to `new` crossed `event`."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class Rings:
    """Views of the three ring areas of one queue, validated and taken once."""

    __slots__ = ("avail", "avail_event", "desc", "size", "used", "used_elems", "used_event")

    def __init__(
        self, mem: GuestMemory, size: int, desc_addr: int, avail_addr: int, used_addr: int
    ) -> None:
        check_size(size)
        for name, addr, align in (
            ("descriptor table", desc_addr, 16),
            ("avail ring", avail_addr, 2),
            ("used ring", used_addr, 4),
        ):
            if addr % align:
                raise RingError(f"{name} address {addr:#x} is not {align}-byte aligned")
        try:
            self.desc = mem.view(desc_addr, DESC_SIZE * size)
            avail = mem.view(avail_addr, avail_bytes(size))
            used = mem.view(used_addr, used_bytes(size))
        except GuestMemoryError as e:
            raise RingError(f"ring area outside guest memory: {e}") from e
        self.size = size
        # avail: [flags, idx, ring[0..size), used_event]; used: [flags, idx, ..., avail_event]
        # with the (id, len) pairs of its ring in used_elems.
        self.avail = avail.cast("H")
        self.used = used.cast("H")
        self.used_elems = used[4 : 4 + 8 * size].cast("I")
        self.used_event = AVAIL_RING + size  # index into avail
        self.avail_event = 2 + 4 * size  # index into used

    def release(self) -> None:
        """Drop every view so that the memory can be unmapped."""
        for view in (self.desc, self.avail, self.used, self.used_elems):
            view.release()
