"""Guest memory: the regions a front end shares with the device, addressed guest-physically.

A mapping touched past the end of its file raises SIGBUS, which kills the process: so
`MappedMemory` refuses a region its file is too short for, and a memfd not sealed against
shrinking (F_SEAL_SHRINK; QEMU's memory-backend-memfd seals by default). The residual risk:
hugetlbfs, tmpfs and plain files cannot be sealed, so their size is checked once, when the
region is mapped; a front end that truncates such a file afterwards still crashes the back
end. Only the front end can do that (not the guest); memfd guest RAM closes the hole.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from virtqueue.errors import GuestMemoryError

__all__ = ["BytesMemory", "GuestMemory", "MappedMemory", "Region"]

_ADDR_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class Region:
    """One guest memory region, with the fields of a vhost-user memory region."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int


class _Slot:
    """A region, its bounds precomputed for the lookup fast path, and a view of its bytes."""

    __slots__ = ("buf", "gpa", "gpa_end", "region", "uva", "uva_end")

    def __init__(self, region: Region, buf: memoryview) -> None:
        self.region = region
        self.gpa = region.guest_phys_addr
        self.gpa_end = region.guest_phys_addr + region.size
        self.uva = region.userspace_addr
        self.uva_end = region.userspace_addr + region.size
        self.buf = buf


def _check_region(region: Region, slots: Sequence[_Slot]) -> None:
    gpa, size, uva = region.guest_phys_addr, region.size, region.userspace_addr
    if size <= 0:
        raise GuestMemoryError(f"memory region at {gpa:#x} has size {size}")
    if min(gpa, uva, region.mmap_offset) < 0 or max(gpa, uva) + size > _ADDR_LIMIT:
        raise GuestMemoryError(f"memory region {region} does not fit in a 64-bit address space")
    for s in slots:
        if gpa < s.gpa_end and s.gpa < gpa + size:
            raise GuestMemoryError(f"memory region {region} overlaps {s.region} in guest memory")
        if uva < s.uva_end and s.uva < uva + size:
            raise GuestMemoryError(f"memory region {region} overlaps {s.region} in user space")


class GuestMemory(ABC):
    """Guest memory made of non-overlapping regions, each addressed both ways."""

    def __init__(self) -> None:
        self._slots: list[_Slot] = []
        # Consecutive accesses nearly always hit the same region, so try the last one first.
        self._last_gpa: _Slot | None = None
        self._last_uva: _Slot | None = None

    @property
    def regions(self) -> tuple[Region, ...]:
        """The mapped regions, in the order they were added."""
        return tuple(s.region for s in self._slots)

    def host_regions(self) -> list[tuple[int, memoryview]]:
        """(guest-physical address, view of all its bytes) of every region, for code that
        translates addresses itself (the pump); the views pin the mappings while held."""
        return [(s.gpa, s.buf) for s in self._slots]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest memory [gpa, gpa + length), which must lie in one region."""
        s = self._last_gpa
        if s is None or not (
            length >= 0 and s.gpa <= gpa < s.gpa_end and gpa + length <= s.gpa_end
        ):
            s = self._lookup_gpa(gpa, length)
            self._last_gpa = s
        off = gpa - s.gpa
        return s.buf[off : off + length]

    def translate_uva(self, uva: int, length: int) -> int:
        """The guest-physical address of front-end virtual range [uva, uva + length)."""
        s = self._last_uva
        if s is None or not (
            length >= 0 and s.uva <= uva < s.uva_end and uva + length <= s.uva_end
        ):
            s = self._lookup_uva(uva, length)
            self._last_uva = s
        return s.gpa + (uva - s.uva)

    @abstractmethod
    def close(self) -> None:
        """Forget every region; views handed out earlier stay valid while they are held."""

    def _lookup_gpa(self, gpa: int, length: int) -> _Slot:
        for s in self._slots:
            if s.gpa <= gpa < s.gpa_end:
                # Regions never overlap, so no other region can hold the range either.
                if length >= 0 and gpa + length <= s.gpa_end:
                    return s
                break
        raise GuestMemoryError.outside(gpa, length)

    def _lookup_uva(self, uva: int, length: int) -> _Slot:
        for s in self._slots:
            if s.uva <= uva < s.uva_end:
                if length >= 0 and uva + length <= s.uva_end:
                    return s
                break
        raise GuestMemoryError(
            f"front-end address range {uva:#x}+{length:#x} is not inside one memory region"
        )

    def _discard(self, gpa: int, size: int, uva: int) -> _Slot:
        for i, s in enumerate(self._slots):
            r = s.region
            if (r.guest_phys_addr, r.size, r.userspace_addr) == (gpa, size, uva):
                del self._slots[i]
                self._last_gpa = self._last_uva = None
                return s
        raise GuestMemoryError(
            f"no memory region at guest {gpa:#x} size {size:#x} user space {uva:#x}"
        )


def _is_memfd(fd: int) -> bool:
    # A memfd's /proc link is "/memfd:NAME (deleted)". Seals alone cannot tell: tmpfs and
    # hugetlbfs files report F_SEAL_SEAL, as a memfd made without MFD_ALLOW_SEALING does.
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def _check_backing(region: Region, fd: int, length: int) -> None:
    """Refuse a backing that could make touching the mapping raise SIGBUS (see the module
    doc): a file shorter than the region, a memfd its owner may still shrink."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise GuestMemoryError(f"cannot map memory region {region}: {e}") from e
    if stat.S_ISREG(st.st_mode) and st.st_size < length:
        raise GuestMemoryError(
            f"cannot map memory region {region}: its file is {st.st_size} bytes, "
            f"the region needs {length}"
        )
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return  # not shmem or hugetlbfs: a file that cannot be sealed
    if not seals & fcntl.F_SEAL_SHRINK and _is_memfd(fd):
        raise GuestMemoryError(
            f"memory region at guest 0x{region.guest_phys_addr:x} size 0x{region.size:x} "
            "refused: its memfd is not sealed against shrinking (F_SEAL_SHRINK); truncated "
            "under the mapping it would crash the back end (QEMU: memory-backend-memfd "
            "with seal=on, the default)"
        )


class MappedMemory(GuestMemory):
    """Guest memory mapped shared from file descriptors (memfd, hugetlbfs)."""

    def __init__(self) -> None:
        super().__init__()
        self._maps: dict[Region, tuple[mmap.mmap, memoryview]] = {}

    def add(self, region: Region, fd: int) -> None:
        """Map `region` from `fd`; the caller keeps ownership of `fd` and may close it at once."""
        _check_region(region, self._slots)
        if fd < 0:
            # mmap would quietly make anonymous memory, unseen by the front end.
            raise GuestMemoryError(f"cannot map memory region {region}: bad fd {fd}")
        # mmap_offset need not be page aligned, so map from file offset 0 and skip it in the view.
        length = region.mmap_offset + region.size
        _check_backing(region, fd, length)
        try:
            if sys.version_info >= (3, 13):
                # Otherwise CPython keeps a private dup of fd open as long as the mapping.
                mm = mmap.mmap(fd, length, mmap.MAP_SHARED, trackfd=False)
            else:
                mm = mmap.mmap(fd, length, mmap.MAP_SHARED)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map memory region {region}: {e}") from e
        whole = memoryview(mm)
        self._maps[region] = (mm, whole)
        self._slots.append(_Slot(region, whole[region.mmap_offset : length]))

    def remove(self, guest_phys_addr: int, size: int, userspace_addr: int) -> Region:
        """Unmap the region with exactly these bounds and return it."""
        slot = self._discard(guest_phys_addr, size, userspace_addr)
        self._unmap(slot)
        return slot.region

    def close(self) -> None:
        """Unmap every region.

        A mapping that the caller still holds views of cannot be unmapped yet: it is dropped
        here and unmapped when the last of those views is released or collected.
        """
        slots, self._slots = self._slots, []
        self._last_gpa = self._last_uva = None
        for slot in slots:
            self._unmap(slot)

    def _unmap(self, slot: _Slot) -> None:
        mm, whole = self._maps.pop(slot.region)
        slot.buf.release()
        whole.release()
        try:
            mm.close()
        except BufferError:
            # The caller's views pin the mapping; CPython unmaps it when the last one goes.
            pass


class BytesMemory(GuestMemory):
    """Guest memory in bytearrays, for tests and fuzzers."""

    def __init__(
        self,
        regions: Sequence[tuple[int, int]] = ((0, 1 << 20),),
        uva_base: int = 0x7F00_0000_0000,
    ) -> None:
        super().__init__()
        for gpa, size in regions:
            # A distinct user-space address per region makes callers really translate.
            region = Region(gpa, size, uva_base + gpa, 0)
            _check_region(region, self._slots)
            self._slots.append(_Slot(region, memoryview(bytearray(size))))

    def close(self) -> None:
        """Forget every region; the bytes live on while views of them are held."""
        slots, self._slots = self._slots, []
        self._last_gpa = self._last_uva = None
        for slot in slots:
            slot.buf.release()
