"""Guest memory: memfd-backed and bytearray-backed regions, bounds and translation."""

from __future__ import annotations

import fcntl
import gc
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostser.testing import sealed_memfd
from virtqueue import BytesMemory, GuestMemory, GuestMemoryError, MappedMemory, Region

PAGE = mmap.PAGESIZE
UVA = 0x7F12_3450_0000


def memfd(size: int, name: str = "vq-test") -> int:
    return sealed_memfd(name, size)


def mapped_names() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


@pytest.fixture
def mapped() -> Iterator[MappedMemory]:
    """Two regions: one at gpa 0 mapped from file offset 0, one at 1 MiB mapped from an
    offset that is not page aligned; both files written through the fd before mapping."""
    mem = MappedMemory()
    for gpa, size, offset, fill in ((0, 4 * PAGE, 0, b"A"), (1 << 20, 2 * PAGE, 123, b"B")):
        fd = memfd(offset + size)
        try:
            os.pwrite(fd, fill * size, offset)
            mem.add(Region(gpa, size, UVA + gpa, offset), fd)
        finally:
            os.close(fd)  # the mapping outlives the descriptor
    yield mem
    mem.close()


def test_mapped_views_see_file_contents_at_mmap_offset(mapped: MappedMemory) -> None:
    assert bytes(mapped.view(0, 4)) == b"AAAA"
    assert bytes(mapped.view((1 << 20) + 2 * PAGE - 3, 3)) == b"BBB"
    assert len(mapped.view(1 << 20, 2 * PAGE)) == 2 * PAGE


def test_mapped_view_is_shared_and_writable() -> None:
    mem = MappedMemory()
    fd = memfd(PAGE + 5000)
    try:
        mem.add(Region(0x10_0000, 5000, UVA, PAGE + 0), fd)
        mem.view(0x10_0000 + 10, 3)[:] = b"xyz"
        assert os.pread(fd, 3, PAGE + 10) == b"xyz"
        os.pwrite(fd, b"from file", PAGE + 4990)
        assert bytes(mem.view(0x10_0000 + 4990, 9)) == b"from file"
    finally:
        os.close(fd)
        mem.close()


def test_mapped_with_page_aligned_nonzero_offset() -> None:
    mem = MappedMemory()
    fd = memfd(3 * PAGE)
    try:
        os.pwrite(fd, b"second page", PAGE)
        mem.add(Region(0, 2 * PAGE, UVA, PAGE), fd)
    finally:
        os.close(fd)
    assert bytes(mem.view(0, 11)) == b"second page"
    mem.close()


def test_regions_and_translate_uva(mapped: MappedMemory) -> None:
    assert mapped.regions == (
        Region(0, 4 * PAGE, UVA, 0),
        Region(1 << 20, 2 * PAGE, UVA + (1 << 20), 123),
    )
    assert mapped.translate_uva(UVA + 5, 10) == 5
    assert mapped.translate_uva(UVA + (1 << 20) + 7, 2 * PAGE - 7) == (1 << 20) + 7
    assert mapped.translate_uva(UVA + 4 * PAGE - 1, 1) == 4 * PAGE - 1
    # alternating regions exercises the last-hit cache both ways
    for _ in range(3):
        assert mapped.translate_uva(UVA, 1) == 0
        assert mapped.translate_uva(UVA + (1 << 20), 1) == 1 << 20
        assert bytes(mapped.view(0, 1)) == b"A"
        assert bytes(mapped.view(1 << 20, 1)) == b"B"


def bad_ranges(base: int, size: int) -> list[tuple[int, int]]:
    """Ranges that are not wholly inside the region [base, base + size)."""
    return [
        (base - 1, 1),  # starts before
        (base - 1, 2),  # straddles the start
        (base + size - 1, 2),  # straddles the end
        (base + size, 1),  # just after
        (base + size, 0),  # empty, but not inside
        (base, size + 1),  # too long
        (base, -1),  # negative length
        (-1, 1),  # negative address
        (base + size + (1 << 30), 4),  # far away
        (1 << 64, 0),
        ((1 << 64) - 1, 2),  # wraps 64 bits
    ]


@pytest.mark.parametrize("kind", ["mapped", "bytes"])
def test_out_of_range(kind: str, mapped: MappedMemory) -> None:
    mem: GuestMemory = mapped if kind == "mapped" else BytesMemory([(0, 4 * PAGE)], UVA)
    for gpa, length in [*bad_ranges(0, 4 * PAGE), (4 * PAGE - 8, 16)]:
        with pytest.raises(GuestMemoryError, match=f"{gpa:#x}"):
            mem.view(gpa, length)
        with pytest.raises(GuestMemoryError):
            mem.translate_uva(UVA + gpa, length)
    assert len(mem.view(4 * PAGE - 1, 0)) == 0  # empty range inside a region
    assert len(mem.view(0, 4 * PAGE)) == 4 * PAGE


def test_range_across_two_adjacent_regions_is_rejected() -> None:
    mem = BytesMemory([(0, 0x1000), (0x1000, 0x1000)])
    assert len(mem.view(0xFF0, 0x10)) == len(mem.view(0x1000, 0x10)) == 0x10
    with pytest.raises(GuestMemoryError):
        mem.view(0xFF0, 0x20)
    with pytest.raises(GuestMemoryError):
        mem.translate_uva(0x7F00_0000_0FF0, 0x20)


def test_region_at_top_of_address_space() -> None:
    top = (1 << 64) - 0x1000
    mem = BytesMemory([(top, 0x1000)], uva_base=0)
    assert len(mem.view((1 << 64) - 1, 1)) == 1
    for gpa, length in bad_ranges(top, 0x1000):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, length)
    with pytest.raises(GuestMemoryError, match="64-bit"):
        BytesMemory([(top, 0x1001)], uva_base=0)
    with pytest.raises(GuestMemoryError, match="64-bit"):
        BytesMemory([(0, 0x1000)], uva_base=top + 1)


OVERLAPS = [
    Region(0x800, 0x1000, 0x10_0000, 0),  # guest-physical overlap at the start
    Region(0x1FFF, 1, 0x10_0000, 0),  # guest-physical overlap at the end
    Region(0x0, 0x10_0000, 0x10_0000, 0),  # covers it
    Region(0x10_0000, 0x1000, UVA + 0x800, 0),  # user-space overlap
]


@pytest.mark.parametrize("region", OVERLAPS)
def test_mapped_rejects_overlap(region: Region) -> None:
    mem = MappedMemory()
    fd = memfd(0x2000)
    try:
        mem.add(Region(0x1000, 0x1000, UVA, 0), fd)
        with pytest.raises(GuestMemoryError, match="overlaps"):
            mem.add(region, fd)
        assert len(mem.regions) == 1
        mem.add(Region(0x2000, 0x1000, UVA + 0x1000, 0x1000), fd)  # adjacent both ways is fine
        assert len(mem.regions) == 2
    finally:
        os.close(fd)
        mem.close()


def test_bytes_rejects_overlap_and_empty() -> None:
    with pytest.raises(GuestMemoryError, match="overlaps"):
        BytesMemory([(0, 0x1000), (0xFFF, 0x10)])
    with pytest.raises(GuestMemoryError, match="size 0"):
        BytesMemory([(0, 0)])
    with pytest.raises(GuestMemoryError):
        BytesMemory([(-0x1000, 0x1000)])


def test_mapped_rejects_bad_regions_and_mmap_failures() -> None:
    mem = MappedMemory()
    fd = memfd(PAGE)
    try:
        with pytest.raises(GuestMemoryError, match="size 0"):
            mem.add(Region(0, 0, UVA, 0), fd)
        with pytest.raises(GuestMemoryError, match="cannot map"):
            mem.add(Region(0, 2 * PAGE, UVA, 0), fd)  # file too small
        with pytest.raises(GuestMemoryError, match="cannot map"):
            mem.add(Region(0, PAGE, UVA, 1), fd)  # offset pushes it past the end
        with pytest.raises(GuestMemoryError):
            mem.add(Region(0, PAGE, UVA, -1), fd)
        with pytest.raises(GuestMemoryError, match="cannot map"):
            mem.add(Region(0, PAGE, UVA, 0), -1)  # would be anonymous memory
        closed = memfd(PAGE)
        os.close(closed)
        with pytest.raises(GuestMemoryError, match="cannot map"):
            mem.add(Region(0, PAGE, UVA, 0), closed)
        assert mem.regions == ()
    finally:
        os.close(fd)
        mem.close()


def test_remove(mapped: MappedMemory) -> None:
    with pytest.raises(GuestMemoryError, match="no memory region"):
        mapped.remove(0, 4 * PAGE, UVA + 1)
    assert bytes(mapped.view(0, 1)) == b"A"  # caches the region about to go
    removed = mapped.remove(0, 4 * PAGE, UVA)
    assert removed == Region(0, 4 * PAGE, UVA, 0)
    with pytest.raises(GuestMemoryError):
        mapped.view(0, 1)
    with pytest.raises(GuestMemoryError):
        mapped.translate_uva(UVA, 1)
    with pytest.raises(GuestMemoryError):
        mapped.remove(0, 4 * PAGE, UVA)
    assert bytes(mapped.view(1 << 20, 1)) == b"B"
    fd = memfd(PAGE)
    try:
        mapped.add(Region(0, PAGE, UVA, 0), fd)  # the space is free again
    finally:
        os.close(fd)
    assert bytes(mapped.view(0, 1)) == b"\0"


def test_close_unmaps() -> None:
    mem = MappedMemory()
    fd = memfd(PAGE, "vq-close-test")
    try:
        mem.add(Region(0, PAGE, UVA, 0), fd)
    finally:
        os.close(fd)
    bytes(mem.view(0, 8))
    assert "vq-close-test" in mapped_names()
    mem.close()
    assert "vq-close-test" not in mapped_names()
    assert mem.regions == ()
    with pytest.raises(GuestMemoryError):
        mem.view(0, 1)
    mem.close()  # twice is fine


def test_close_with_outstanding_views_defers_unmap() -> None:
    mem = MappedMemory()
    fd = memfd(PAGE, "vq-held-test")
    try:
        mem.add(Region(0, PAGE, UVA, 0), fd)
    finally:
        os.close(fd)
    held = mem.view(16, 4)
    held_cast = mem.view(32, 8).cast("I")
    mem.close()  # must not raise BufferError
    held[:] = b"live"
    assert bytes(held) == b"live"
    held_cast[1] = 7
    assert "vq-held-test" in mapped_names()
    del held
    assert "vq-held-test" in mapped_names()
    del held_cast
    gc.collect()
    assert "vq-held-test" not in mapped_names()


def test_remove_with_outstanding_view_defers_unmap(mapped: MappedMemory) -> None:
    held = mapped.view(1 << 20, 4)
    mapped.remove(1 << 20, 2 * PAGE, UVA + (1 << 20))
    assert bytes(held) == b"BBBB"


def test_bytes_memory_defaults_and_translation() -> None:
    mem = BytesMemory()
    assert mem.regions == (Region(0, 1 << 20, 0x7F00_0000_0000, 0),)
    mem.view(100, 3)[:] = b"abc"
    assert bytes(mem.view(99, 5)) == b"\0abc\0"
    assert mem.translate_uva(0x7F00_0000_0000 + 100, 3) == 100

    two = BytesMemory([(0x1000, 0x1000), (0x10_0000, 0x2000)], uva_base=0x5000_0000)
    assert two.translate_uva(0x5010_0010, 0x10) == 0x10_0010
    assert [r.userspace_addr for r in two.regions] == [0x5000_1000, 0x5010_0000]
    two.view(0x10_0000, 2)[:] = b"hi"
    assert bytes(two.view(two.translate_uva(0x5010_0000, 2), 2)) == b"hi"


def test_bytes_close_keeps_held_views() -> None:
    mem = BytesMemory()
    held = mem.view(0, 4)
    mem.close()
    held[:] = b"okay"
    assert bytes(held) == b"okay"
    with pytest.raises(GuestMemoryError):
        mem.view(0, 4)


def test_region_longer_than_its_file_is_refused() -> None:
    # Touching a mapping past the end of its file is SIGBUS: it must never be mapped.
    fd = os.memfd_create("short")
    try:
        os.ftruncate(fd, 4096)
        mem = MappedMemory()
        with pytest.raises(GuestMemoryError, match="4096 bytes"):
            mem.add(Region(0, 8192, 0x10000, 0), fd)
        assert mem.regions == ()
    finally:
        os.close(fd)


@pytest.mark.parametrize("flags", [os.MFD_ALLOW_SEALING, 0], ids=["sealable", "unsealable"])
def test_memfd_not_sealed_against_shrinking_is_refused(flags: int) -> None:
    # Its owner could truncate it under the mapping: SIGBUS on the next access.
    fd = os.memfd_create("unsealed", flags)
    try:
        os.ftruncate(fd, 8192)
        mem = MappedMemory()
        with pytest.raises(GuestMemoryError, match=r"guest 0x0 size 0x2000 refused: its memfd "
                           r"is not sealed against shrinking \(F_SEAL_SHRINK\)"):
            mem.add(Region(0, 8192, 0x10000, 0), fd)
        assert mem.regions == () and "unsealed" not in mapped_names()
        if flags:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            mem.add(Region(0, 8192, 0x10000, 0), fd)
            mem.close()
    finally:
        os.close(fd)


def test_sealed_memfd_cannot_shrink_under_the_mapping() -> None:
    fd = memfd(2 * PAGE, "sealed")
    try:
        mem = MappedMemory()
        mem.add(Region(0, 2 * PAGE, UVA, 0), fd)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE)
        mem.view(PAGE, PAGE)[:] = b"x" * PAGE  # the last page is still there
        mem.close()
    finally:
        os.close(fd)


def test_unsealable_shmem_file_is_mapped_after_its_size_check(tmp_path: Path) -> None:
    # tmpfs and hugetlbfs files cannot be sealed (they report F_SEAL_SEAL, as an unsealable
    # memfd does): they are checked for size only, the residual risk the module documents.
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() else tmp_path
    path = where / f"vq-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        path.unlink()
        os.ftruncate(fd, PAGE)
        mem = MappedMemory()
        with pytest.raises(GuestMemoryError, match=f"{PAGE} bytes"):
            mem.add(Region(0, 2 * PAGE, UVA, 0), fd)
        mem.add(Region(0, PAGE, UVA, 0), fd)
        assert mem.regions == (Region(0, PAGE, UVA, 0),)
        mem.close()
    finally:
        os.close(fd)
