"""The device side of a split virtqueue (virtio 1.2 §2.7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from virtqueue._layout import (
    AVAIL_RING,
    FLAGS,
    IDX,
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Rings,
    need_event,
)
from virtqueue._native import fence_acquire, fence_full, fence_release, walk_chain
from virtqueue.errors import ChainError, GuestMemoryError, RingError
from virtqueue.memory import GuestMemory

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Chain",
    "Lent",
    "SplitQueue",
]


class Lent(NamedTuple):
    """What SplitQueue.lend() hands an engine that drives the ring in its place."""

    memory: GuestMemory
    desc: memoryview
    avail: memoryview
    used: memoryview
    size: int
    next_avail: int
    next_used: int
    signalled: int
    event_idx: bool
    indirect: bool


class Chain:
    """One descriptor chain taken from the avail ring, as views of its guest buffers."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_len(self) -> int:
        """Total bytes the device may read."""
        return sum(map(len, self.readable))

    @property
    def writable_len(self) -> int:
        """Total bytes the device may write."""
        return sum(map(len, self.writable))

    def read(self) -> bytes:
        """All device-readable bytes, in order."""
        return b"".join(self.readable)

    def read_into(self, buf: memoryview | bytearray) -> int:
        """Copy readable bytes into `buf` until either runs out; return the count copied."""
        dst = memoryview(buf).cast("B")
        done = 0
        for src in self.readable:
            n = min(len(src), len(dst) - done)
            dst[done : done + n] = src[:n]
            done += n
            if done == len(dst):
                break
        return done

    def write(self, data: bytes | memoryview, offset: int = 0) -> int:
        """Scatter `data` into the writable buffers from byte `offset` on; return bytes written.

        Stops when the buffers are full, so the result is less than len(data) then.
        """
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        src = memoryview(data).cast("B")
        done = 0
        for dst in self.writable:
            if done == len(src):
                break
            if offset >= len(dst):
                offset -= len(dst)
                continue
            n = min(len(dst) - offset, len(src) - done)
            dst[offset : offset + n] = src[done : done + n]
            done += n
            offset = 0
        return done


class SplitQueue:
    """The device's view of one split virtqueue in guest memory.

    With event_idx, call enable_notifications() before waiting for the first kick, so that
    avail_event asks for one.
    """

    __slots__ = (
        "_broken",
        "_indirect",
        "_last_popped",
        "_mask",
        "_mem",
        "_rings",
        "_signalled",
        "event_idx",
        "next_avail",
        "next_used",
        "size",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        next_avail: int = 0,
        next_used: int | None = None,
    ) -> None:
        if next_used is None:
            # vhost-user resumes a queue from one index (SET_VRING_BASE) for both rings.
            next_used = next_avail
        for name, value in (("next_avail", next_avail), ("next_used", next_used)):
            if not 0 <= value <= 0xFFFF:
                raise RingError(f"{name} {value} is not a 16-bit ring index")
        self._rings = Rings(mem, size, desc_addr, avail_addr, used_addr)
        self._mem = mem
        self._mask = size - 1
        self._indirect = indirect
        self._broken: str | None = None
        self.size = size
        self.event_idx = event_idx
        self.next_avail = next_avail
        self.next_used = next_used
        # used.idx at the previous should_notify(): the "old" of vring_need_event.
        self._signalled = next_used
        # Head of the chain the last pop() moved past, while it may still be given back.
        self._last_popped: int | None = None

    def available(self) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        if self._broken is not None:
            raise RingError(self._broken)
        pending = (self._rings.avail[IDX] - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise self._break(str(RingError.avail_ahead(pending, self.size)))
        return pending

    def pop(self) -> Chain | None:
        """The next available chain, or None; the queue moves past it even if it is bad."""
        if not self.available():
            return None
        # The ring entry and the descriptors must not be read before the avail idx that
        # published them.
        fence_acquire()
        slot = self.next_avail & self._mask
        head = self._rings.avail[AVAIL_RING + slot]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self._last_popped = head
        if head >= self.size:
            raise self._break(str(RingError.head_out_of_range(slot, head, self.size)))
        view = self._mem.view
        segments = walk_chain(self._rings.desc, head, view, indirect=self._indirect)
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        try:
            for addr, length, flags in segments:
                (writable if flags & VIRTQ_DESC_F_WRITE else readable).append(view(addr, length))
        except GuestMemoryError as e:
            raise ChainError.buffer_outside(head, e) from e
        return Chain(head, readable, writable)

    def give_back(self, chain: Chain) -> None:
        """Return `chain`, popped and not pushed, to the avail side: the next pop() takes it
        again, as when the device must stop before it can complete it. Only the chain popped
        last can be given back, and only once."""
        if self._last_popped is None:
            raise ValueError(
                f"cannot give back chain {chain.head}: no chain was popped since the last "
                "give_back, or it was pushed"
            )
        if chain.head != self._last_popped:
            raise ValueError(
                f"cannot give back chain {chain.head}: only the chain popped last "
                f"({self._last_popped}) can be"
            )
        self._last_popped = None
        # Its avail ring entry is still there: the driver cannot reuse that slot while the
        # chain's descriptors are out.
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def push(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes written into it."""
        self._put(head, written)
        # The element must be visible before the used idx that publishes it.
        fence_release()
        self._rings.used[IDX] = self.next_used

    def push_many(self, items: Sequence[tuple[int, int]]) -> None:
        """push() every (head, written), publishing the used idx once for all of them."""
        try:
            for head, written in items:
                self._put(head, written)
        finally:
            # Even when a bad item stops the loop, what was put before it is returned.
            fence_release()
            self._rings.used[IDX] = self.next_used

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call
        (never when nothing was)."""
        # Our used idx store must be visible before we read the driver's suppression state,
        # or both sides may decide the other will act.
        fence_full()
        old, self._signalled = self._signalled, self.next_used
        if self.event_idx:
            return need_event(self._rings.avail[self._rings.used_event], self.next_used, old)
        return old != self.next_used and not self._rings.avail[FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notifications(self) -> bool:
        """Ask the driver for kicks again; True if chains are already waiting (drain again)."""
        if self.event_idx:
            self._rings.used[self._rings.avail_event] = self.next_avail
        else:
            self._rings.used[FLAGS] &= ~VIRTQ_USED_F_NO_NOTIFY
        # The request must be visible before we look at avail idx, or a chain the driver
        # added meanwhile would be seen by neither side.
        fence_full()
        return self.available() > 0

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed; a no-op with event_idx, as in Linux."""
        if not self.event_idx:
            self._rings.used[FLAGS] |= VIRTQ_USED_F_NO_NOTIFY

    def lend(self) -> Lent:
        """The ring areas and positions, for an engine (virtqueue.pump) that drives the ring
        until it hands it back with take_back(); meanwhile this object must not be used."""
        if self._broken is not None:
            raise RingError(self._broken)
        r = self._rings
        return Lent(self._mem, r.desc, r.avail, r.used, self.size, self.next_avail,
                    self.next_used, self._signalled, self.event_idx, self._indirect)

    def take_back(
        self, next_avail: int, next_used: int, signalled: int, broken: str | None = None
    ) -> None:
        """Go on from where the engine lend() served left the ring (`broken`: why it found the
        ring broken, as pop() would have)."""
        self.next_avail = next_avail
        self.next_used = next_used
        self._signalled = signalled
        self._last_popped = None
        if broken is not None:
            self._broken = broken

    def unpop(self) -> None:
        """The chain taken last goes back to the avail side (an engine took it and left it
        uncompleted): the next pop() takes it again."""
        if self.next_avail == self.next_used:
            raise ValueError("no chain is taken and not completed")
        self.next_avail = (self.next_avail - 1) & 0xFFFF
        self._last_popped = None

    def release(self) -> None:
        """Drop the views of the rings so the memory can be unmapped; the queue is unusable."""
        self._rings.release()

    def _put(self, head: int, written: int) -> None:
        if not (0 <= head < self.size and 0 <= written <= 0xFFFF_FFFF):
            raise ValueError(f"bad used element: head {head}, written {written}")
        i = 2 * (self.next_used & self._mask)
        self._rings.used_elems[i] = head
        self._rings.used_elems[i + 1] = written
        self.next_used = (self.next_used + 1) & 0xFFFF
        if head == self._last_popped:
            self._last_popped = None  # completed: the driver may reuse it, so it is not ours

    def _break(self, reason: str) -> RingError:
        self._broken = reason
        return RingError(reason)
