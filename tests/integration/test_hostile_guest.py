"""A hostile guest against a real daemon process, through its real rings in memfd guest RAM:
a tx chain that claims gigabytes of aliased buffers, a broken ring on one port, floods of bad
control messages and bad chains. Each has a bounded cost and a defined outcome — counted,
logged (rate-limited), contained — and the daemon goes on serving the other ports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from vhostser.console.core import MAX_TX_CHAIN_BYTES
from vhostser.logs import BURST
from vhostser.testing.console_driver import (
    CONTROL_TX,
    tx_queue,
)
from vhostser.testing.hostile import add_aliased_tx_chain, bad_control_messages
from vhostser.vhost_user import Request
from vhostser.vhost_user.messages import VringState

from .console_harness import echo_roundtrip, streaming
from .daemon_process import DaemonProcess, daemon_process, echo_works, guest, open_ports

MiB = 1 << 20



async def _until(
    d: DaemonProcess, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    """Poll the daemon's stats until `predicate(stats)` holds; the stats then."""
    with trio.fail_after(timeout):
        while True:
            stats = await d.stats()
            if predicate(stats):
                return stats
            await trio.sleep(0.01)


# --------------------------------------------------------------------------- bounded work

CHAINS = 4
PIECES = 2048  # descriptors per chain, all naming the same 1 MiB: 2 GiB to the ring walker


async def test_a_tx_chain_claiming_gigabytes_costs_no_memory() -> None:
    with daemon_process() as d:
        # 2048-descriptor chains need a queue of 2048; the RAM holds its rx buffers too.
        async with guest(d, mem_size=64 * MiB, queue_size=2048, rx_buffers=16) as (fe, driver):
            (one,) = await open_ports(driver, "org.test.one")
            buf = fe.alloc(MiB)
            fe.write(buf, b"A" * MiB)
            for _ in range(CHAINS):
                head = add_aliased_tx_chain(fe, tx_queue(1), buf, MiB, PIECES)
                assert await fe.collect_used(tx_queue(1), timeout=60) == [(head, 0)]
            assert d.vm_hwm() < 200 * MiB, d.vm_hwm()
            await d.assert_responsive()
            # The port goes on: a chain within the bound is echoed.
            assert await echo_roundtrip(one, b"small" * 1000) == b"small" * 1000
        stats = await d.stats()
        assert stats["ports"]["1"]["discarded"] == {"too-long": CHAINS * PIECES * MiB}
        assert stats["device"]["bad_chains"] == {"tx-too-long": CHAINS}
        lines = d.log_lines(f"vring {tx_queue(1)} (port 1): tx chain", "dropped unread")
        assert len(lines) == CHAINS, d.log()
        assert f"of {PIECES * MiB} bytes (> {MAX_TX_CHAIN_BYTES})" in lines[0]
        await echo_works(d)


# --------------------------------------------------------------------------- containment


async def test_a_broken_tx_ring_stops_only_its_port() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            one, two = await open_ports(driver, "org.test.one", "org.test.two")
            async with streaming(two):
                # The guest claims 32768 chains in a ring of 128: nothing on it can be trusted.
                fe.queue(tx_queue(1)).set_avail_idx(0x8000)
                fe.kick(tx_queue(1), force=True)
                assert await fe.wait_err(tx_queue(1), timeout=10) == 1
                # Control messages still flow, also the guest closing the broken port: its
                # tx ring is flushed from the control queue's service, which must go on.
                await one.close()
            await two.close()
            await two.open()
            assert await echo_roundtrip(two, b"two" * 5000) == b"two" * 5000
            status = await d.ask("status")
            assert status["needs_reset"] is False
        stats = await d.stats()
        assert stats["device"]["rings_broken"] == 1
        assert stats["ports"]["2"]["sessions_opened"] == 2
        assert stats["ports"]["1"]["sessions_opened"] == 1
        (line,) = d.log_lines(f"vring {tx_queue(1)} (port 1) broken by the guest")
        assert "control queue and other ports go on" in line and "avail idx" in line
        await echo_works(d)  # a new front end sets the rings up anew: port 1 works again


async def test_a_broken_control_ring_is_the_devices() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            (one,) = await open_ports(driver, "org.test.one")
            fe.queue(CONTROL_TX).set_avail_idx(0x8000)
            fe.kick(CONTROL_TX, force=True)
            assert await fe.wait_err(CONTROL_TX, timeout=10) == 1
            assert (await d.ask("status"))["needs_reset"] is True
            # The data rings are not the control ring's: port 1 still echoes.
            assert await echo_roundtrip(one, b"one" * 1000) == b"one" * 1000
            await d.assert_responsive()
        assert d.log_lines(f"device needs reset (vring {CONTROL_TX})")
        assert (await d.stats())["device"]["rings_broken"] == 0


# --------------------------------------------------------------------------- rate limits


async def test_floods_of_bad_input_log_a_few_lines_and_count_all() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            one, two = await open_ports(driver, "org.test.one", "org.test.two")
            async with streaming(two):
                bad = bad_control_messages(1, max_ports=4)
                for _ in range(40):
                    await driver.send_raw_control(*bad * 33, bad[0])
                q = fe.queue(tx_queue(1))
                gpa = fe.alloc(64)
                for n in range(1, 21):
                    for _ in range(20):
                        q.add([(gpa, 32)], [(gpa + 32, 32)])  # writable: not a tx chain
                    fe.kick(tx_queue(1), force=True)
                    await _until(d, lambda s, n=n: s["device"]["bad_chains"].get("tx-writable")
                                 == 20 * n)
                    one.reclaim()
                for _ in range(500):  # and the front end: a bad queue size, 500 times
                    await fe.request(Request.SET_VRING_NUM, VringState(0, 3))
                await fe.barrier()
            await d.assert_responsive()
        stats = await d.stats()
        assert stats["device"]["bad_control"] == 4000
        assert stats["device"]["bad_chains"] == {"tx-writable": 400}
        assert stats["vhost_user"]["rejected"] == {"SET_VRING_NUM": 500}
        for needle in ("bad control message ignored", "has device-writable buffers",
                       "SET_VRING_NUM: rejected"):
            assert len(d.log_lines(needle)) == BURST, needle
        await echo_works(d)


async def test_a_ring_broken_after_a_device_reset_is_still_reported() -> None:
    # QEMU gives a ring's err eventfd once, when it realizes the device: a reset must not
    # take it away, or a guest breaking a ring after a reboot goes unreported.
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            await driver.reinit(reset_device=True)
            (one,) = await open_ports(driver, "org.test.one")
            assert await echo_roundtrip(one, b"after the reset" * 100) == b"after the reset" * 100
            fe.queue(tx_queue(1)).set_avail_idx(0x8000)
            fe.kick(tx_queue(1), force=True)
            assert await fe.wait_err(tx_queue(1), timeout=10) == 1
        assert (await d.stats())["device"]["rings_broken"] == 1
        await echo_works(d)
