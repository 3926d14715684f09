"""Guest memory a front end could use against a real daemon process: an unsealed memfd it
could truncate under the daemon's mapping (SIGBUS), and more regions than GET_MAX_MEM_SLOTS
allows. Each is refused with a log line naming it and counted; the daemon serves on."""

from __future__ import annotations

import os

import pytest
import trio

from vhostser.testing import AckError, sealed_memfd
from vhostser.testing.console_driver import tx_queue
from vhostser.vhost_user import Request
from vhostser.vhost_user.messages import MAX_MEM_REGIONS, MemoryTable, SingleMemoryRegion
from virtqueue import Region

from .console_harness import echo_roundtrip
from .daemon_process import daemon_process, echo_works, guest, open_ports

PAGE = 4096
# Extra regions go far above the front end's RAM, guest-physically and in its address space.
EXTRA_GPA = 0x10_0000_0000
EXTRA_UVA = 0x7E00_0000_0000
SECOND = b"from the second region"


def _extra(i: int, size: int = PAGE) -> Region:
    return Region(EXTRA_GPA + i * size, size, EXTRA_UVA + i * size, 0)



async def test_an_unsealed_memfd_is_refused_and_its_truncation_harms_nothing() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            (port,) = await open_ports(driver, "org.test.one")
            region = _extra(0, 1 << 20)
            unsealed = os.memfd_create("unsealed-ram", os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(unsealed, region.size)
                with pytest.raises(AckError):
                    await fe.request(Request.ADD_MEM_REG, SingleMemoryRegion(region),
                                     fds=[unsealed], need_reply=True)
                os.ftruncate(unsealed, 0)  # what would have been SIGBUS in the daemon
            finally:
                os.close(unsealed)
            # A guest buffer in that region is outside guest memory: a bad chain, skipped.
            fe.queue(tx_queue(1)).add([(region.guest_phys_addr, 4096)])
            fe.kick(tx_queue(1), force=True)
            with trio.fail_after(10):
                while (await d.stats())["device"]["bad_chains"].get("descriptor") != 1:
                    await trio.sleep(0.01)
            assert await echo_roundtrip(port, b"RAM is fine" * 1000) == b"RAM is fine" * 1000
            await d.assert_responsive()
        assert d.log_lines(f"vring {tx_queue(1)}: bad descriptor chain", "outside guest memory")
        (line,) = d.log_lines("ADD_MEM_REG: rejected")
        assert (f"memory region at guest 0x{region.guest_phys_addr:x} size 0x{region.size:x} "
                "refused: its memfd is not sealed against shrinking (F_SEAL_SHRINK)") in line
        assert (await d.stats())["vhost_user"]["rejected"] == {"ADD_MEM_REG": 1}
        await echo_works(d)


async def test_a_sealed_memfd_is_mapped_and_cannot_be_truncated() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            (port,) = await open_ports(driver, "org.test.one")
            region = _extra(0, 1 << 20)
            sealed = sealed_memfd("sealed-ram", region.size)
            try:
                await fe.request(Request.ADD_MEM_REG, SingleMemoryRegion(region),
                                 fds=[sealed], need_reply=True)
                with pytest.raises(PermissionError):
                    os.ftruncate(sealed, 0)  # EPERM: the seal holds the daemon's mapping
                os.pwrite(sealed, SECOND, 0)
            finally:
                os.close(sealed)
            # The daemon reads a guest buffer in the new region: echoed back on port 1.
            fe.queue(tx_queue(1)).add([(region.guest_phys_addr, len(SECOND))])
            fe.kick(tx_queue(1), force=True)
            assert await port.read_exactly(len(SECOND), timeout=10) == SECOND
            await d.assert_responsive()
        assert (await d.stats())["vhost_user"]["rejected"] == {}


async def test_memory_slots_beyond_get_max_mem_slots_are_refused() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            (port,) = await open_ports(driver, "org.test.one")
            slots = fe.max_mem_slots
            assert slots == 509
            backing = sealed_memfd("slots", PAGE)
            try:
                # The front end's RAM took one slot; 1,011 more regions are offered.
                for i in range(1011):
                    try:
                        await fe.request(Request.ADD_MEM_REG, SingleMemoryRegion(_extra(i)),
                                         fds=[backing], need_reply=True)
                    except AckError:
                        assert i >= slots - 1
                    else:
                        assert i < slots - 1
            finally:
                os.close(backing)
            assert await echo_roundtrip(port, b"slots" * 2000) == b"slots" * 2000
            await d.assert_responsive()
        stats = await d.stats()
        assert stats["vhost_user"]["rejected"] == {"ADD_MEM_REG": 1011 - (slots - 1)}
        lines = d.log_lines("ADD_MEM_REG: rejected", "all 509 memory slots")
        # Rate-limited: a few lines, not one per refusal.
        assert 1 <= len(lines) <= 10, d.log()
        await echo_works(d)


async def test_a_memory_table_over_its_limit_is_refused() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, _):
            backing = sealed_memfd("table", PAGE)
            regions = tuple(_extra(i) for i in range(MAX_MEM_REGIONS + 1))
            try:
                with pytest.raises(AckError):
                    await fe.request(Request.SET_MEM_TABLE, MemoryTable(regions),
                                     fds=[backing] * MAX_MEM_REGIONS, need_reply=True)
            finally:
                os.close(backing)
            await fe.barrier()
            await d.assert_responsive()
        assert d.log_lines("SET_MEM_TABLE: rejected", "9 regions, at most 8")
        assert (await d.stats())["vhost_user"]["rejected"] == {"SET_MEM_TABLE": 1}
        await echo_works(d)
