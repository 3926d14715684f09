"""A port's staging buffer: host bytes waiting for guest rx buffers, bounded.

A FIFO over one byte buffer laid out as `u64 appended, u64 consumed` (both counted from the
port's creation) and a ring of `capacity` bytes. The buffer may be plain memory or a shared
mapping of a memfd kept in the fd store (the daemon's `SharedStaging`): then what was staged
outlives the process, and a successor finds every staged byte that is not yet in a guest
buffer. Bytes are stored before the count that publishes them, and a consumed count moves only
after they are in a used guest buffer, so a process killed at any point leaves at most the
one buffer being filled to be delivered again, and loses nothing.
"""

from __future__ import annotations

import struct

_COUNTS = struct.Struct("<QQ")
HEADER_SIZE = _COUNTS.size


class Staging:
    """The FIFO; `buf` is HEADER_SIZE + capacity bytes (kept as they are: a successor's)."""

    def __init__(self, buf: memoryview | bytearray) -> None:
        self._buf = memoryview(buf).cast("B")
        self.capacity = len(self._buf) - HEADER_SIZE
        if self.capacity <= 0:
            raise ValueError(f"a staging buffer of {len(self._buf)} bytes has no room")
        self._ring = self._buf[HEADER_SIZE:]
        appended, consumed = _COUNTS.unpack_from(self._buf, 0)
        if not 0 <= appended - consumed <= self.capacity:
            raise ValueError(f"staging counts {appended}/{consumed} do not fit {self.capacity}")

    @classmethod
    def in_memory(cls, capacity: int, data: bytes = b"") -> Staging:
        staging = cls(bytearray(HEADER_SIZE + capacity))
        staging.append(data)
        return staging

    def _counts(self) -> tuple[int, int]:
        appended, consumed = _COUNTS.unpack_from(self._buf, 0)
        return appended, consumed

    def __len__(self) -> int:
        appended, consumed = self._counts()
        return appended - consumed

    @property
    def consumed(self) -> int:
        """Bytes consumed since the FIFO was made: where its oldest byte stands."""
        return self._counts()[1]

    @property
    def room(self) -> int:
        return self.capacity - len(self)

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Stage what fits of `data`; how many bytes that was."""
        appended, consumed = self._counts()
        n = min(len(data), self.capacity - (appended - consumed))
        src = memoryview(data).cast("B")[:n]
        at = appended % self.capacity
        first = min(n, self.capacity - at)
        self._ring[at : at + first] = src[:first]
        self._ring[: n - first] = src[first:]
        struct.pack_into("<Q", self._buf, 0, appended + n)  # published after the bytes
        return n

    def free_view(self, n: int) -> memoryview:
        """Where the next up to `n` bytes go, contiguous (shorter where the ring wraps or
        room ends), to be filled in place (a read straight into it) and then `commit`ted."""
        appended, consumed = self._counts()
        at = appended % self.capacity
        return self._ring[at : at + min(n, self.capacity - (appended - consumed),
                                        self.capacity - at)]

    def commit(self, n: int) -> None:
        """Publish `n` bytes written into `free_view`."""
        appended, consumed = self._counts()
        if not 0 <= n <= min(self.capacity - (appended - consumed),
                             self.capacity - appended % self.capacity):
            raise ValueError(f"commit {n}: more than the free view")
        struct.pack_into("<Q", self._buf, 0, appended + n)

    def peek(self, n: int) -> memoryview | bytes:
        """The oldest min(n, len) staged bytes: a view, or a copy where the ring wraps."""
        appended, consumed = self._counts()
        n = min(n, appended - consumed)
        at = consumed % self.capacity
        if at + n <= self.capacity:
            return self._ring[at : at + n]
        return bytes(self._ring[at:]) + bytes(self._ring[: n - (self.capacity - at)])

    def consume(self, n: int) -> None:
        appended, consumed = self._counts()
        if not 0 <= n <= appended - consumed:
            raise ValueError(f"consume {n} of {appended - consumed} staged bytes")
        struct.pack_into("<Q", self._buf, 8, consumed + n)

    def clear(self) -> int:
        """Drop everything staged; how many bytes that was."""
        appended, consumed = self._counts()
        struct.pack_into("<Q", self._buf, 8, appended)
        return appended - consumed

    def data(self) -> bytes:
        """Every staged byte, oldest first (for the serialized state)."""
        appended, consumed = self._counts()
        return bytes(self.peek(appended - consumed))

    def close(self) -> None:
        """The port is gone (a shared buffer lets go of its memory here)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Staging) and (self.capacity, self.data()) == (
            other.capacity, other.data())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Staging {len(self)}/{self.capacity}>"
