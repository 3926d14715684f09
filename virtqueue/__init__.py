"""Split virtqueues (virtio 1.2 §2.7) over guest memory, from the device and the driver side.

Knows nothing of any device type or transport: give it guest memory and ring addresses.
"""

from virtqueue._layout import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from virtqueue.driver import DriverQueue, ring_layout
from virtqueue.errors import (
    ChainError,
    GuestMemoryError,
    QueueFullError,
    RingError,
    VirtqueueError,
)
from virtqueue.memory import BytesMemory, GuestMemory, MappedMemory, Region
from virtqueue.split import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Chain,
    Lent,
    SplitQueue,
)

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTIO_F_RING_EVENT_IDX",
    "VIRTIO_F_RING_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "BytesMemory",
    "Chain",
    "ChainError",
    "DriverQueue",
    "GuestMemory",
    "GuestMemoryError",
    "Lent",
    "MappedMemory",
    "QueueFullError",
    "Region",
    "RingError",
    "SplitQueue",
    "VirtqueueError",
    "ring_layout",
]
