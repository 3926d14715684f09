"""The chain walk and fences from the compiled C helper (walk.c)."""

from __future__ import annotations

import threading

from virtqueue._native._common import Step
from virtqueue._native._ring import ffi, lib

# An editable install leaves the built module in the tree, where it outlives edits to walk.h.
if getattr(lib, "VQ_API_VERSION", None) != 1:
    raise ImportError("virtqueue._native._ring is stale: rebuild it with pip install -e .")

IMPLEMENTATION = "cffi"

fence_acquire = lib.vq_fence_acquire
fence_release = lib.vq_fence_release
fence_full = lib.vq_fence_full

# Room for the segments of nearly every chain; longer ones are walked again with room for all.
_CAP = 16
_HDR = lib.VQ_IO_HDR
_SPACE = lib.VQ_E_SPACE
_INDEX = lib.VQ_IO_INDEX
_VALUE = lib.VQ_IO_VALUE
_COUNT = lib.VQ_IO_COUNT
# One io array per thread, reused: vq_walk runs without the GIL.
_local = threading.local()


def step(table: memoryview, start: int, opts: int, total: int, seen_write: bool) -> Step:
    """Walk one descriptor table with vq_walk."""
    n = len(table) // 16
    buf = ffi.from_buffer(table)
    try:
        io = _local.io
    except AttributeError:
        io = _local.io = ffi.new("uint64_t[]", _HDR + 3 * _CAP)
    code: int = lib.vq_walk(buf, n, start, opts, total, seen_write, io, _CAP)
    if code == _SPACE:
        io = ffi.new("uint64_t[]", _HDR + 3 * n)
        code = lib.vq_walk(buf, n, start, opts, total, seen_write, io, n)
    if code < 0:
        return Step.failed(code, io[_INDEX], io[_VALUE])
    # The header's order is walk.h's VQ_IO_* order.
    _, index, value, addr, total, seen, *flat = ffi.unpack(io, _HDR + 3 * io[_COUNT])
    it = iter(flat)
    # zip over one iterator thrice groups the flat values into (addr, len, flags) triples.
    segments = list(zip(it, it, it, strict=False))
    return Step(code, segments, index, value, addr, total, bool(seen))
