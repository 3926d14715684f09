"""The two chain walkers (compiled and pure Python) agree, and the right one is picked."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtqueue import BytesMemory, ChainError
from virtqueue._native import _common, _pywalk
from virtqueue._native._common import Step

try:
    from virtqueue._native import _cwalk
except ImportError:  # reported by test_compiled_module_is_built
    _cwalk = None  # type: ignore[assignment]

NEXT, WRITE, INDIRECT = 1, 2, 4
DESC = struct.Struct("<QIHH")

needs_cffi = pytest.mark.skipif(_cwalk is None, reason="C helper not built")


def table(*descs: tuple[int, int, int, int]) -> memoryview:
    buf = bytearray(16 * len(descs))
    for i, d in enumerate(descs):
        DESC.pack_into(buf, 16 * i, *d)
    return memoryview(buf)


def steppers() -> list[Callable[[memoryview, int, int, int, bool], Step]]:
    return [_pywalk.step] if _cwalk is None else [_pywalk.step, _cwalk.step]


def test_compiled_module_is_built() -> None:
    assert _cwalk is not None, "build it: pip install -e . --no-build-isolation"


@needs_cffi
def test_codes_match_walk_h() -> None:
    from virtqueue._native._ring import lib

    names = [n for n in dir(_common) if n.startswith(("E_", "OPT_")) or n in ("DONE", "INDIRECT")]
    assert len(names) == 13
    for name in names:
        assert getattr(lib, "VQ_" + name) == getattr(_common, name), name


def run_python(code: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.mark.parametrize(("pure", "expected"), [("1", "python"), ("0", "cffi"), ("", "cffi")])
def test_implementation_choice(pure: str, expected: str) -> None:
    if expected == "cffi" and _cwalk is None:
        pytest.skip("C helper not built")
    code = "import virtqueue._native as n; print(n.IMPLEMENTATION)"
    assert run_python(code, VIRTQUEUE_PURE=pure) == expected


@pytest.mark.parametrize("mod", [_pywalk, _cwalk], ids=["python", "cffi"])
def test_fences_run(mod: object) -> None:
    if mod is None:
        pytest.skip("C helper not built")
    for name in ("fence_acquire", "fence_release", "fence_full"):
        getattr(mod, name)()


CASES = [
    # (name, descriptors, start, opts, expected code, expected descriptor)
    ("one", [(0x10, 8, 0, 0)], 0, 0, _common.DONE, 0),
    ("head", [(0x10, 8, 0, 0)], 1, 0, _common.E_HEAD, 1),
    ("next", [(0x10, 8, NEXT, 1)], 0, 0, _common.E_NEXT, 0),
    ("loop", [(0, 1, NEXT, 1), (0, 1, NEXT, 0)], 0, 0, _common.E_TTL, 0),
    ("self loop", [(0, 1, NEXT, 0)], 0, 0, _common.E_TTL, 0),
    ("total", [(0, 0xFFFF_FFFF, NEXT, 1), (0, 1, 0, 0)], 0, 0, _common.E_TOTAL, 1),
    ("total max", [(0, 0xFFFF_FFFE, NEXT, 1), (0, 1, 0, 0)], 0, 0, _common.DONE, 1),
    ("order", [(0, 1, WRITE | NEXT, 1), (0, 1, 0, 0)], 0, 0, _common.E_ORDER, 1),
    ("order ok", [(0, 1, NEXT, 1), (0, 1, WRITE, 0)], 0, 0, _common.DONE, 1),
    ("ind off", [(0x100, 16, INDIRECT, 0)], 0, 0, _common.E_IND_OFF, 0),
    ("ind", [(0x100, 16, INDIRECT, 0)], 0, _common.OPT_INDIRECT_OK, _common.INDIRECT, 0),
    ("ind next", [(0x100, 16, INDIRECT | NEXT, 0)], 0, 1, _common.E_IND_NEXT, 0),
    ("ind len 0", [(0x100, 0, INDIRECT, 0)], 0, 1, _common.E_IND_LEN, 0),
    ("ind len 24", [(0x100, 24, INDIRECT, 0)], 0, 1, _common.E_IND_LEN, 0),
    ("ind len max", [(0x100, 16 * 32768, INDIRECT, 0)], 0, 1, _common.INDIRECT, 0),
    ("ind len big", [(0x100, 16 * 32769, INDIRECT, 0)], 0, 1, _common.E_IND_LEN, 0),
    ("nested", [(0, 1, NEXT, 1), (0x100, 16, INDIRECT, 0)], 0, 3, _common.E_NESTED, 1),
    ("ind write flag ignored", [(0, 1, WRITE | NEXT, 1), (0x9, 16, INDIRECT | WRITE, 0)],
     0, 1, _common.INDIRECT, 1),
]  # fmt: skip


@pytest.mark.parametrize("step", steppers())
@pytest.mark.parametrize(
    ("descs", "start", "opts", "code", "at"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_step_cases(
    step: Callable[[memoryview, int, int, int, bool], Step],
    descs: list[tuple[int, int, int, int]],
    start: int,
    opts: int,
    code: int,
    at: int,
) -> None:
    s = step(table(*descs), start, opts, 0, False)
    assert (s.code, s.at) == (code, at)
    if code < 0:
        assert s.segments == []


@pytest.mark.parametrize("step", steppers())
def test_long_chain_beyond_first_buffer(
    step: Callable[[memoryview, int, int, int, bool], Step],
) -> None:
    n = 100  # more than the C glue's first segment buffer
    descs = [(0x1000 + i, i, NEXT, i + 1) for i in range(n - 1)] + [(0x2000, 7, WRITE, 0)]
    s = step(table(*descs), 0, 0, 0, False)
    assert s.code == _common.DONE
    assert s.segments == [(d[0], d[1], d[2]) for d in descs]
    assert s.total == sum(range(n - 1)) + 7
    assert s.seen_write


@pytest.mark.parametrize("step", steppers())
def test_state_carries_into_indirect_table(
    step: Callable[[memoryview, int, int, int, bool], Step],
) -> None:
    t = table((0, 5, 0, 0))
    assert step(t, 0, _common.OPT_IN_INDIRECT, 0, True).code == _common.E_ORDER
    assert step(t, 0, _common.OPT_IN_INDIRECT, 0xFFFF_FFFB, False).code == _common.E_TOTAL
    assert step(t, 0, _common.OPT_IN_INDIRECT, 0xFFFF_FFFA, False).total == 0xFFFF_FFFF


# Random raw tables: flags and links drawn so that every rule gets broken now and then.
_lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 0x8000_0000, 0xFFFF_FFFF]))


# Mostly links, so that chains get long enough to loop and to break the later rules.
_FLAGS = [NEXT, NEXT, NEXT, NEXT | WRITE, NEXT | WRITE, 0, WRITE, INDIRECT, INDIRECT | NEXT]


@st.composite
def raw_tables(draw: st.DrawFn, entries: int) -> bytes:
    descs = [
        (
            draw(st.sampled_from([0, 0x100, 0x2000, 0x3000, 1 << 40])),
            draw(_lengths),
            draw(st.sampled_from(_FLAGS)),
            draw(st.integers(0, entries + 1)),
        )
        for _ in range(entries)
    ]
    return bytes(table(*descs))


@needs_cffi
@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 24),
    opts=st.integers(0, 3),
    total=st.sampled_from([0, 100, 0xFFFF_FF00]),
    seen_write=st.booleans(),
)
def test_walkers_agree_on_one_table(
    data: st.DataObject, n: int, opts: int, total: int, seen_write: bool
) -> None:
    t = memoryview(data.draw(raw_tables(n)))
    start = data.draw(st.integers(0, n))
    assert _cwalk.step(t, start, opts, total, seen_write) == _pywalk.step(
        t, start, opts, total, seen_write
    )


def outcome(
    step: Callable[[memoryview, int, int, int, bool], Step],
    mem: BytesMemory,
    head: int,
    indirect: bool,
) -> list[tuple[int, int, int]] | str:
    try:
        return _common.walk_chain(step, mem.view(0, 16 * 16), head, mem.view, indirect)
    except ChainError as e:
        assert e.head == head
        return str(e)


@needs_cffi
@settings(max_examples=300, deadline=None)
@given(
    ring=raw_tables(16),
    tables=st.lists(raw_tables(3), min_size=3, max_size=3),
    head=st.integers(0, 15),
    indirect=st.booleans(),
)
def test_walkers_agree_on_whole_chains(
    ring: bytes, tables: list[bytes], head: int, indirect: bool
) -> None:
    # Indirect tables at 0x100 (inside memory), 0x2000 and 0x3000 (straddling its end).
    mem = BytesMemory([(0, 0x2000), (0x2000, 0x1008)])
    mem.view(0, len(ring))[:] = ring
    for addr, t in zip((0x100, 0x2000, 0x3000), tables, strict=True):
        room = min(len(t), 0x3008 - addr)
        mem.view(addr, room)[:] = t[:room]
    assert outcome(_cwalk.step, mem, head, indirect) == outcome(_pywalk.step, mem, head, indirect)
