"""The pure-Python chain walk and fences, used when the C helper is not built."""

from __future__ import annotations

import platform
import struct
import threading

from virtqueue._layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from virtqueue._native._common import (
    DONE,
    E_HEAD,
    E_IND_LEN,
    E_IND_NEXT,
    E_IND_OFF,
    E_NESTED,
    E_NEXT,
    E_ORDER,
    E_TOTAL,
    E_TTL,
    INDIRECT,
    MAX_INDIRECT,
    OPT_IN_INDIRECT,
    OPT_INDIRECT_OK,
    Segment,
    Step,
)

IMPLEMENTATION = "python"

_DESC = struct.Struct("<QIHH")

# Taking and dropping a lock is an atomic read-modify-write on every platform CPython runs
# on, and so a full memory barrier (on x86, a locked instruction).
_barrier = threading.Lock()


def fence_full() -> None:
    """Full (sequentially consistent) memory barrier."""
    with _barrier:
        pass


def _compiler_fence() -> None:
    """On x86 loads are not reordered with older loads, nor stores with older accesses, so
    acquire and release fences only have to stop compiler reordering: Python cannot ask for
    that, and needs not, as each ring access is a separate call into the interpreter."""


if platform.machine().lower() in ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"):
    fence_acquire = fence_release = _compiler_fence
else:
    # Weaker hardware needs real fences; a full one is the one Python can make.
    fence_acquire = fence_release = fence_full


def step(table: memoryview, start: int, opts: int, total: int, seen_write: bool) -> Step:
    """vq_walk of walk.c, check for check and in the same order."""
    n = len(table) // 16
    if start >= n:
        return Step.failed(E_HEAD, start, start)
    unpack = _DESC.unpack_from
    segments: list[Segment] = []
    i = start
    ttl = n
    while True:
        if ttl == 0:
            return Step.failed(E_TTL, i, n)
        ttl -= 1
        # One read per descriptor: the driver may rewrite the table under us.
        addr, length, flags, nxt = unpack(table, 16 * i)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if opts & OPT_IN_INDIRECT:
                return Step.failed(E_NESTED, i, flags)
            if not opts & OPT_INDIRECT_OK:
                return Step.failed(E_IND_OFF, i, flags)
            if flags & VIRTQ_DESC_F_NEXT:
                return Step.failed(E_IND_NEXT, i, flags)
            if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                return Step.failed(E_IND_LEN, i, length)
            return Step(INDIRECT, segments, i, length, addr, total, seen_write)
        if flags & VIRTQ_DESC_F_WRITE:
            seen_write = True
        elif seen_write:
            return Step.failed(E_ORDER, i, flags)
        total += length
        if total > 0xFFFF_FFFF:
            return Step.failed(E_TOTAL, i, total)
        segments.append((addr, length, flags))
        if not flags & VIRTQ_DESC_F_NEXT:
            return Step(DONE, segments, i, 0, 0, total, seen_write)
        if nxt >= n:
            return Step.failed(E_NEXT, i, nxt)
        i = nxt
