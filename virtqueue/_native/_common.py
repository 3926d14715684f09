"""What both chain walkers share: result codes, the step result, and the two-level walk."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from virtqueue.errors import ChainError, GuestMemoryError

# Mirrors of walk.h; tests check the compiled values against these.
DONE = 0
INDIRECT = 1
E_HEAD = -1
E_NEXT = -2
E_TTL = -3
E_TOTAL = -4
E_IND_LEN = -5
E_NESTED = -6
E_IND_NEXT = -7
E_IND_OFF = -8
E_ORDER = -9
OPT_INDIRECT_OK = 1
OPT_IN_INDIRECT = 2

# An indirect table may be larger than the queue (Linux builds such tables), so it is bounded
# by the largest queue size rather than by this queue's size.
MAX_INDIRECT = 32768

# One device buffer of a chain: (guest-physical address, length, descriptor flags).
Segment = tuple[int, int, int]

_REASONS = {
    E_HEAD: "head {value} is not below the table size {n}",
    E_NEXT: "descriptor {index} links to {value}, not below the table size {n}",
    E_TTL: "chain loops or is longer than the table size {n}",
    E_TOTAL: "total length reaches {value:#x} (2**32 or more) at descriptor {index}",
    E_IND_LEN: (
        "descriptor {index}: indirect table length {value} is zero, not a multiple of 16"
        f" or more than {MAX_INDIRECT} entries"
    ),
    E_NESTED: "descriptor {index} is indirect inside an indirect table",
    E_IND_NEXT: "descriptor {index} has both INDIRECT and NEXT",
    E_IND_OFF: "descriptor {index} is indirect but indirect descriptors are not in use",
    E_ORDER: "descriptor {index} is device-readable after a device-writable one",
}


class Step(NamedTuple):
    """The outcome of walking one descriptor table; see struct vq_walk in walk.h."""

    code: int
    segments: list[Segment]
    at: int
    value: int
    addr: int
    total: int
    seen_write: bool

    @classmethod
    def failed(cls, code: int, index: int, value: int) -> Step:
        """An error outcome; the partial walk state is not part of it."""
        return cls(code, [], index, value, 0, 0, False)


# walk one table: (table, start, opts, total so far, seen_write so far) -> Step
StepFn = Callable[[memoryview, int, int, int, bool], Step]


def walk_chain(
    step: StepFn,
    table: memoryview,
    head: int,
    view: Callable[[int, int], memoryview],
    indirect: bool,
) -> list[Segment]:
    """The segments of the chain at `head`, following one level of indirection.

    `view` maps an indirect table's guest range; any fault raises ChainError.
    """
    s = step(table, head, OPT_INDIRECT_OK if indirect else 0, 0, False)
    where = ""
    if s.code == INDIRECT:
        try:
            table = view(s.addr, s.value)
        except GuestMemoryError as e:
            raise ChainError.indirect_outside(head, s.at, e) from e
        first = s.segments
        s = step(table, 0, OPT_IN_INDIRECT, s.total, s.seen_write)
        if s.code == DONE:
            return first + s.segments
        where = "indirect table: "
    if s.code == DONE:
        return s.segments
    raise chain_error(head, s.code, s.at, s.value, len(table) // 16, bool(where))


def chain_error(head: int, code: int, index: int, value: int, n: int, indirect: bool) -> ChainError:
    """The ChainError for walk code `code` at descriptor `index` of an n-entry table (the
    chain's indirect table if `indirect`); the pump reports its walk faults through it."""
    where = "indirect table: " if indirect else ""
    return ChainError(head, where + _REASONS[code].format(index=index, value=value, n=n))
