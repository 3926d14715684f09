"""The errors raised by the virtqueue package."""

from __future__ import annotations

__all__ = [
    "ChainError",
    "GuestMemoryError",
    "QueueFullError",
    "RingError",
    "VirtqueueError",
]


class VirtqueueError(Exception):
    """Base class of every error raised by the virtqueue package."""


class GuestMemoryError(VirtqueueError):
    """An address range is not wholly inside one mapped guest memory region."""


class RingError(VirtqueueError):
    """The ring itself is broken; the queue cannot be used until the device is reset."""


class ChainError(VirtqueueError):
    """One descriptor chain is bad; the queue has moved past it and stays usable."""

    def __init__(self, head: int, reason: str) -> None:
        # Both go into args so the exception pickles and compares like any other.
        super().__init__(head, reason)
        self.head = head
        self.reason = reason

    def __str__(self) -> str:
        return f"descriptor chain {self.head}: {self.reason}"


class QueueFullError(VirtqueueError):
    """The driver has too few free descriptors for the buffers it was asked to add."""
