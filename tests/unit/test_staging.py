"""A port's staging buffer (vhostser.console.staging): a bounded FIFO that a second mapping of
the same memory — a successor's — reads exactly as the first left it."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostser.console.staging import HEADER_SIZE, Staging
from vhostser.continuity import SharedStaging


@given(st.lists(st.one_of(st.binary(max_size=40).map(lambda b: ("put", b)),
                          st.binary(max_size=40).map(lambda b: ("fill", b)),
                          st.integers(0, 40).map(lambda n: ("take", n))), max_size=60))
def test_a_bounded_fifo(ops: list[tuple[str, object]]) -> None:
    staging = Staging.in_memory(32)
    model = bytearray()
    for op, arg in ops:
        if op == "put":
            assert isinstance(arg, bytes)
            n = staging.append(arg)
            assert n == min(len(arg), 32 - len(model))
            model += arg[:n]
        elif op == "fill":  # a read straight into the ring: up to its wrap or the room
            assert isinstance(arg, bytes)
            view = staging.free_view(len(arg))
            assert 0 < len(view) or not arg or len(model) == 32
            view[:] = arg[:len(view)]
            with pytest.raises(ValueError):
                staging.commit(len(view) + 1 + 32)
            staging.commit(len(view))
            model += arg[:len(view)]
        else:
            assert isinstance(arg, int)
            got = bytes(staging.peek(arg))
            assert got == model[: min(arg, len(model))]
            staging.consume(len(got))
            del model[: len(got)]
        assert len(staging) == len(model) and staging.room == 32 - len(model)
        assert staging.data() == model


def test_counts_that_do_not_fit_are_refused() -> None:
    buf = bytearray(HEADER_SIZE + 8)
    buf[:8] = (20).to_bytes(8, "little")  # 20 staged in an 8-byte ring
    with pytest.raises(ValueError, match="do not fit"):
        Staging(buf)
    with pytest.raises(ValueError, match="no room"):
        Staging(bytearray(HEADER_SIZE))
    staging = Staging.in_memory(8, b"abc")
    with pytest.raises(ValueError, match="consume 4 of 3"):
        staging.consume(4)


def test_a_successor_finds_what_was_staged() -> None:
    kept: list[int] = []
    released: list[bool] = []
    first = SharedStaging.create(16, keep=kept.append, release=lambda: released.append(True))
    assert kept == [first.fd]
    first.append(b"0123456789")
    first.consume(4)
    first.append(b"abcdefghij")  # wraps
    # The predecessor dies: its mapping goes, the memfd stays (the fd store has it).
    successor = SharedStaging(os.dup(first.fd), release=lambda: None)
    assert successor.data() == b"456789abcdefghij" and successor.room == 0
    assert bytes(successor.peek(16)) == b"456789abcdefghij"
    first.close()
    assert released == [True]
    successor.close()


def test_a_shared_buffer_is_a_real_shared_mapping() -> None:
    staging = SharedStaging.create(64, keep=lambda fd: None, release=lambda: None)
    staging.append(b"seen")
    with mmap.mmap(staging.fd, HEADER_SIZE + 64, mmap.MAP_SHARED) as m:
        assert bytes(m[HEADER_SIZE : HEADER_SIZE + 4]) == b"seen"
    staging.close()
