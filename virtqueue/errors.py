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

    @classmethod
    def outside(cls, gpa: int, length: int) -> GuestMemoryError:
        """Guest range [gpa, gpa + length) is not inside one region."""
        return cls(f"guest address range {gpa:#x}+{length:#x} is not inside one memory region")


class RingError(VirtqueueError):
    """The ring itself is broken; the queue cannot be used until the device is reset."""

    # The two ways a driver breaks a split ring's avail side, worded once for SplitQueue and
    # for the pump (virtqueue.pump), which finds them in C.
    @classmethod
    def avail_ahead(cls, pending: int, size: int) -> RingError:
        """The avail idx is `pending` chains ahead of the device."""
        return cls(f"avail idx is {pending} ahead of the device, more than the queue size {size}")

    @classmethod
    def head_out_of_range(cls, slot: int, head: int, size: int) -> RingError:
        """Avail ring entry `slot` holds a head not below the queue size."""
        return cls(f"avail ring entry {slot} holds head {head}, queue size {size}")


class ChainError(VirtqueueError):
    """One descriptor chain is bad; the queue has moved past it and stays usable."""

    def __init__(self, head: int, reason: str) -> None:
        # Both go into args so the exception pickles and compares like any other.
        super().__init__(head, reason)
        self.head = head
        self.reason = reason

    def __str__(self) -> str:
        return f"descriptor chain {self.head}: {self.reason}"

    @classmethod
    def buffer_outside(cls, head: int, e: GuestMemoryError) -> ChainError:
        """A buffer of chain `head` is outside guest memory."""
        return cls(head, f"buffer outside guest memory: {e}")

    @classmethod
    def indirect_outside(cls, head: int, index: int, e: GuestMemoryError) -> ChainError:
        """The indirect table of descriptor `index` is outside guest memory."""
        return cls(head, f"indirect table of descriptor {index}: {e}")


class QueueFullError(VirtqueueError):
    """The driver has too few free descriptors for the buffers it was asked to add."""
