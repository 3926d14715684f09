"""The state region (vhostser.continuity) on a real memfd: snapshots survive a torn write, a
second mapping of the same fd (the successor's) reads what the first wrote, the region grows,
and the request slot tells a successor what was in flight."""

from __future__ import annotations

import os
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostser.console.state import PortCounters
from vhostser.continuity import (
    _SLOTS_AT,
    SLOT,
    RegionError,
    RequestKind,
    SharedCells,
    StateRegion,
)


def successor(region: StateRegion) -> StateRegion:
    """The same memfd mapped by another process would see this: a fresh mapping of a dup."""
    return StateRegion(os.dup(region.fd))


def test_empty_region_has_no_snapshot() -> None:
    region = StateRegion.create()
    assert region.generation == 0
    with pytest.raises(RegionError, match="no valid snapshot"):
        region.read()


def test_write_then_read_from_another_mapping() -> None:
    region = StateRegion.create()
    assert region.write({"a": 1}) == 1
    assert region.write({"a": 2, "b": [1, 2]}) == 2
    other = successor(region)
    assert other.read() == {"a": 2, "b": [1, 2]} and other.generation == 2


def test_a_torn_write_leaves_the_previous_snapshot() -> None:
    region = StateRegion.create()
    region.write({"n": 1})
    region.write({"n": 2})
    # A process killed while writing snapshot 3: bytes in the inactive slot, header not yet
    # flipped (or flipped to a slot whose crc does not match).
    active = struct.unpack_from("<I", region._map, 12)[0]
    at = region._slot_at(1 - active)
    region._map[at + SLOT.size : at + SLOT.size + 5] = b"{garb"
    assert successor(region).read() == {"n": 2}
    struct.pack_into("<I", region._map, 12, 1 - active)  # flipped onto the torn slot
    assert successor(region).read() == {"n": 2}


def test_it_grows_for_a_large_document() -> None:
    region = StateRegion.create(capacity=64)
    region.write({"small": True})
    big = {"blob": "x" * 10_000}
    region.write(big)
    assert region.capacity >= 10_000
    assert successor(region).read() == big and successor(region).generation == 2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=5), min_size=1,
                max_size=8))
def test_the_last_write_wins(docs: list[dict[str, int]]) -> None:
    region = StateRegion.create(capacity=32)
    for doc in docs:
        region.write(doc)
    assert successor(region).read() == docs[-1]
    assert region.generation == len(docs)


def test_not_a_region() -> None:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 1 << 16)
    with pytest.raises(RegionError, match="not a vhostser state region"):
        StateRegion(fd)
    os.close(fd)
    small = os.memfd_create("y")
    with pytest.raises(RegionError, match="too small"):
        StateRegion(small)
    os.close(small)


def test_another_layout_is_refused() -> None:
    region = StateRegion.create()
    struct.pack_into("<I", region._map, 8, 99)
    with pytest.raises(RegionError, match="layout 99, this daemon reads layout 1"):
        successor(region)


def test_request_slot() -> None:
    region = StateRegion.create()
    assert region.request().kind is RequestKind.NONE
    region.record_request(RequestKind.RECEIVED, b"\x01\x02", generation=5)
    r = successor(region).request()
    assert (r.generation, r.kind, r.data) == (5, RequestKind.RECEIVED, b"\x01\x02")
    region.record_request(RequestKind.REPLY, b"reply", generation=6)
    region.request_done()
    r = successor(region).request()
    assert (r.generation, r.kind, r.data) == (6, RequestKind.REPLIED, b"reply")


def test_slots_start_after_the_request_slot() -> None:
    assert _SLOTS_AT == 16 + 16 + 4096 + 12


def test_ledger_counts_are_stores_into_a_shared_mapping() -> None:
    """What a port counts after its last snapshot is in the memfd a successor maps: the
    bytes and drop totals exact, reasons the snapshot missed shown as `unrecorded`."""
    kept: list[int] = []
    cells = SharedCells.create(keep=kept.append, release=lambda: None)
    counters = PortCounters()
    counters.bytes_from_host = 7  # before it is shared: carried over
    counters.share(cells.cells, cells, newer=False)
    snapshot = counters.as_dict()
    counters.bytes_to_guest += 5
    counters.drop("to_guest", "stale", 2)
    # The successor: the snapshot as it was, the predecessor's memfd as it is now.
    successor = PortCounters(**{k: Counter(v) if isinstance(v, dict) else v
                                for k, v in snapshot.items()})
    again = SharedCells(os.dup(kept[0]), release=lambda: None)
    successor.share(again.cells, again, newer=True)
    assert (successor.bytes_from_host, successor.bytes_to_guest) == (7, 5)
    assert successor.dropped("to_guest") == {"unrecorded": 2}
    successor.drop("to_guest", "stale", 1)
    assert successor.dropped("to_guest") == {"stale": 1, "unrecorded": 2}
    assert counters.bytes_to_guest == 5 and counters.dropped_to_guest_total == 3  # shared
    counters.close()
    successor.close()
    assert counters.bytes_to_guest == 5  # a closed port keeps its last counts in memory
    with pytest.raises(ValueError):
        SharedCells(os.memfd_create("short"), release=lambda: None)
