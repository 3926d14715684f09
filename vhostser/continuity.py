"""The state region: what fds cannot carry, in a memfd that is itself in the fd store.

A successor needs the negotiated features, the memory table's layout, every vring's size and
addresses, the console device's state (`console.state.DeviceState`) and the fd store's
aliases: the daemon writes them as one JSON document here whenever they change. Ring
positions are not in it: the device completes chains in the order it takes them, so a
successor resumes every started ring from the used index in guest memory (see
`VhostUserBackend.resume`).

Layout (little endian), built so that a process killed at any instruction leaves a region a
successor can read:

    0   header   magic "VHSRSTAT", u32 layout version, u32 active snapshot slot (0 or 1)
    16  request  u64 generation, u32 kind, u32 length, 4096 + 12 bytes: the request being
                 handled (or the reply being sent) when the process died
    4140 slot 0, slot 1   u64 generation, u32 length, u32 crc32, then `capacity` bytes

A snapshot goes into the slot that is not active, then a single aligned 4-byte store makes it
active: a torn write is never the one read. The region grows (ftruncate, both slots) when a
document outgrows its slot.
"""

from __future__ import annotations

import enum
import json
import mmap
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .console.staging import HEADER_SIZE, Staging
from .console.state import CELLS_SIZE

MAGIC = b"VHSRSTAT"
LAYOUT = 1
HEADER = struct.Struct("<8sII")
REQUEST = struct.Struct("<QII")
REQUEST_MAX = 4096 + 12  # a vhost-user header and the largest body QEMU sends
SLOT = struct.Struct("<QII")
_REQUEST_AT = HEADER.size
_SLOTS_AT = _REQUEST_AT + REQUEST.size + REQUEST_MAX
INITIAL_CAPACITY = 64 * 1024
_T = TypeVar("_T")


class RegionError(ValueError):
    """A state region this daemon cannot use (not one, another layout, nothing valid)."""


class RequestKind(enum.IntEnum):
    NONE = 0
    RECEIVED = 1  # a request was being handled (its bytes follow)
    RECEIVED_WITH_FDS = 2  # the same, but its fds went with the process
    REPLY = 3  # the reply that follows is due (not yet written)
    REPLIED = 4  # its reply is written (the mark comes just before the write)


@dataclass(frozen=True, slots=True)
class Request:
    generation: int
    kind: RequestKind
    data: bytes


class StateRegion:
    """One state region, mapped; `fd` is what goes into the fd store as "state"."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        if size < _SLOTS_AT + 2 * SLOT.size:
            raise RegionError(f"state region of {size} bytes is too small")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        magic, layout, _ = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            raise RegionError("not a vhostser state region")
        if layout != LAYOUT:
            raise RegionError(f"state region layout {layout}, this daemon reads layout {LAYOUT}")
        self.capacity = (size - _SLOTS_AT) // 2 - SLOT.size

    @classmethod
    def create(cls, capacity: int = INITIAL_CAPACITY) -> StateRegion:
        fd = os.memfd_create("vhostser-state", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _SLOTS_AT + 2 * (SLOT.size + capacity))
            with mmap.mmap(fd, HEADER.size, mmap.MAP_SHARED) as m:
                HEADER.pack_into(m, 0, MAGIC, LAYOUT, 0)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)

    # ------------------------------------------------------------------ snapshots

    def _slot_at(self, slot: int) -> int:
        return _SLOTS_AT + slot * (SLOT.size + self.capacity)

    @property
    def generation(self) -> int:
        """The generation of the snapshot a successor would read (0: none yet)."""
        found = self._read()
        return found[0] if found else 0

    def write(self, doc: dict[str, Any]) -> int:
        """Make `doc` the current snapshot; returns its generation."""
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(data) > self.capacity:
            self._grow(len(data))
        active = HEADER.unpack_from(self._map, 0)[2]
        generation = self.generation + 1
        at = self._slot_at(1 - active)
        self._map[at + SLOT.size : at + SLOT.size + len(data)] = data
        SLOT.pack_into(self._map, at, generation, len(data), zlib.crc32(data))
        struct.pack_into("<I", self._map, 12, 1 - active)
        return generation

    def read(self) -> dict[str, Any]:
        """The current snapshot (RegionError if there is none that is whole)."""
        found = self._read()
        if found is None:
            raise RegionError("the state region holds no valid snapshot")
        doc = json.loads(found[1])
        if not isinstance(doc, dict):
            raise RegionError("the state region's snapshot is not an object")
        return doc

    def _read(self) -> tuple[int, bytes] | None:
        active = HEADER.unpack_from(self._map, 0)[2]
        # The active slot first; the other one is whole too unless a write into it was torn.
        for slot in (active, 1 - active):
            at = self._slot_at(slot)
            generation, length, crc = SLOT.unpack_from(self._map, at)
            if generation == 0 or length > self.capacity:
                continue
            data = bytes(self._map[at + SLOT.size : at + SLOT.size + length])
            if zlib.crc32(data) == crc:
                return generation, data
        return None

    def _grow(self, need: int) -> None:
        capacity = max(need * 2, self.capacity * 2)
        current = self._read()
        self._map.close()
        os.ftruncate(self.fd, _SLOTS_AT + 2 * (SLOT.size + capacity))
        self._map = mmap.mmap(self.fd, os.fstat(self.fd).st_size, mmap.MAP_SHARED)
        self.capacity = capacity
        # Both slots moved: put the current snapshot back into slot 0 and make it active.
        for slot in (0, 1):
            SLOT.pack_into(self._map, self._slot_at(slot), 0, 0, 0)
        if current is not None:
            generation, data = current
            at = self._slot_at(0)
            self._map[at + SLOT.size : at + SLOT.size + len(data)] = data
            SLOT.pack_into(self._map, at, generation, len(data), zlib.crc32(data))
        struct.pack_into("<I", self._map, 12, 0)

    # ------------------------------------------------------------------ the request slot

    def record_request(self, kind: RequestKind, data: bytes, generation: int) -> None:
        """Note what is being handled (or sent) now, for a successor to finish it."""
        if len(data) > REQUEST_MAX:
            data = b""  # never from QEMU; the kind alone says a request was in flight
        at = _REQUEST_AT
        self._map[at + REQUEST.size : at + REQUEST.size + len(data)] = data
        REQUEST.pack_into(self._map, at, generation, kind, len(data))

    def request_done(self) -> None:
        """The reply went out: one 4-byte store."""
        struct.pack_into("<I", self._map, _REQUEST_AT + 8, RequestKind.REPLIED)

    def request(self) -> Request:
        generation, kind, length = REQUEST.unpack_from(self._map, _REQUEST_AT)
        length = min(length, REQUEST_MAX)
        at = _REQUEST_AT + REQUEST.size
        try:
            k = RequestKind(kind)
        except ValueError:
            k = RequestKind.NONE
        return Request(generation, k, bytes(self._map[at : at + length]))


class SharedStaging(Staging):
    """A port's staging buffer in a memfd of its own, kept in the fd store, so that host
    bytes staged for the guest outlive the process (see `console.staging`)."""

    def __init__(self, fd: int, release: Callable[[], None]) -> None:
        self.fd = fd
        self._release = release
        self._map = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
        self._view = memoryview(self._map)
        super().__init__(self._view)

    @classmethod
    def create(cls, capacity: int, keep: Callable[[int], None],
               release: Callable[[], None]) -> SharedStaging:
        return _created(cls, "vhostser-staging", HEADER_SIZE + capacity, keep, release)

    def close(self) -> None:
        self._release()
        self._ring.release()
        self._buf.release()
        self._view.release()
        self._map.close()
        os.close(self.fd)


class SharedCells:
    """A port's ledger counters (`console.state.CELLS`) in a memfd of their own, kept in the
    fd store: every count is a store into this mapping, so a successor finds it exact."""

    def __init__(self, fd: int, release: Callable[[], None]) -> None:
        if os.fstat(fd).st_size != CELLS_SIZE:
            raise ValueError(f"{os.fstat(fd).st_size} bytes, not {CELLS_SIZE}")
        self.fd = fd
        self._release = release
        self._map = mmap.mmap(fd, CELLS_SIZE, mmap.MAP_SHARED)
        self.cells = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, keep: Callable[[int], None], release: Callable[[], None]) -> SharedCells:
        return _created(cls, "vhostser-counters", CELLS_SIZE, keep, release)

    def close(self) -> None:
        self._release()
        self.cells.release()
        self._map.close()
        os.close(self.fd)


def _created(cls: Callable[[int, Callable[[], None]], _T], name: str, size: int,
             keep: Callable[[int], None], release: Callable[[], None]) -> _T:
    """`cls(fd, release)` on a new memfd of `size` bytes, handed to `keep` once mapped."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        made = cls(fd, release)
    except BaseException:
        os.close(fd)
        raise
    keep(fd)
    return made
