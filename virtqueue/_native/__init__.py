"""Memory fences and the descriptor chain walk, compiled (cffi) or in pure Python.

The compiled helper is used when it was built and VIRTQUEUE_PURE is unset, empty or "0";
IMPLEMENTATION says which one is in use. Both give the same results.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

from virtqueue._native import _common
from virtqueue._native._common import Segment, StepFn

__all__ = [
    "IMPLEMENTATION",
    "Segment",
    "fence_acquire",
    "fence_full",
    "fence_release",
    "walk_chain",
]


def _load() -> ModuleType:
    if os.environ.get("VIRTQUEUE_PURE", "") in ("", "0"):
        try:
            from virtqueue._native import _cwalk
        except ImportError:
            pass
        else:
            return _cwalk
    from virtqueue._native import _pywalk

    return _pywalk


_impl = _load()
IMPLEMENTATION: str = _impl.IMPLEMENTATION
fence_acquire: Callable[[], None] = _impl.fence_acquire
fence_release: Callable[[], None] = _impl.fence_release
fence_full: Callable[[], None] = _impl.fence_full
_step: StepFn = _impl.step


def walk_chain(
    table: memoryview, head: int, view: Callable[[int, int], memoryview], *, indirect: bool
) -> list[Segment]:
    """The (addr, len, flags) segments of the chain at `head` of descriptor table `table`.

    Follows one level of indirect table, mapped with `view`; raises ChainError when the
    chain breaks any rule of virtio 1.2 §2.7.5.
    """
    return _common.walk_chain(_step, table, head, view, indirect)
