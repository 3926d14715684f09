"""Bytes through the console device, both ways, byte-exact, with flow control bounded on
each side, through the Linux-like guest driver."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from vhostser.backends.simple import EchoBackend, RecordingBackend
from vhostser.console import PortConfig
from vhostser.testing.console_driver import MAX_WRITE, GuestPort, WouldBlockError

from .console_harness import CONSOLE0, ECHO, REC, Rig, console_rig, echo_ports, echo_roundtrip


async def _open(rig: Rig, key: int | str, *, host: bool = False) -> GuestPort:
    port = await rig.driver.wait_port(key)
    if host:
        rig.dev(port.id).host_attach()
        await rig.driver.wait_for(lambda: port.host_connected)
    await port.open()
    return port


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
async def test_echo_one_mib_sha256(nursery: trio.Nursery, event_idx: bool) -> None:
    async with console_rig(
        nursery, ports=echo_ports(), driver_args={"event_idx": event_idx}
    ) as rig:
        echo = await _open(rig, "org.test.echo")
        await rig.driver.wait_for(lambda: echo.host_connected)
        data = os.urandom(1 << 20)
        got = await echo_roundtrip(echo, data)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        c = rig.dev(1).counters
        assert c.bytes_from_guest == c.bytes_to_guest == 1 << 20
        # One descriptor per write() of up to 32 KiB, as port_fops_write makes them.
        assert c.buffers_from_guest == (1 << 20) // MAX_WRITE
        assert c.discarded == {}
        # Every wakeup came from a device interrupt, none from the driver's recheck timer.
        assert not rig.driver.stats.missed_interrupts


async def test_recording_backend_both_ways(nursery: trio.Nursery) -> None:
    async with console_rig(nursery, ports=echo_ports()) as rig:
        rec = rig.dev(2).backend
        assert isinstance(rec, RecordingBackend)
        port = await _open(rig, "org.test.rec", host=True)
        up = os.urandom(200_000)
        await port.write_all(up)
        await port.drain()
        assert bytes(rec.data[1]) == up
        down = os.urandom(300_000)
        async with trio.open_nursery() as n:
            n.start_soon(rig.dev(2).send_all, down)
            got = await port.read_exactly(len(down))
        assert got == down
        assert rig.dev(2).counters.bytes_to_guest == len(down)


async def test_guest_writes_block_while_the_backend_refuses(nursery: trio.Nursery) -> None:
    """accept=False: tx buffers stop coming back, the guest's writes stop once its queue is
    full, the device holds one chain; accept=True + resume_guest_data delivers all, once."""
    async with console_rig(nursery, ports=echo_ports(), driver_args={"queue_size": 16}) as rig:
        rec = rig.dev(2).backend
        assert isinstance(rec, RecordingBackend)
        port = await _open(rig, "org.test.rec", host=True)
        rec.accept = False
        written = bytearray()
        with pytest.raises(WouldBlockError):
            for i in range(100):
                chunk = bytes([i]) * MAX_WRITE
                n = await port.write(chunk, nonblock=True)
                written += chunk[:n]
        # The ring is full (16 descriptors), nothing came back, nothing was delivered.
        assert len(written) == 16 * MAX_WRITE and port.outvq_full
        await trio.sleep(0.05)
        assert port.reclaim() == 0 and port.tx_in_flight == 16
        assert rec.data == {}
        # Bounded on the host side: one chain held, the rest left in the ring.
        assert rig.device.core.held_ports == [2]
        assert rig.dev(2).counters.bytes_from_guest == 0
        # A blocking write waits.
        with pytest.raises(trio.TooSlowError):
            await port.write(b"blocked", timeout=0.1)

        rec.accept = True
        rig.dev(2).resume_guest_data()
        await port.drain()
        assert bytes(rec.data[1]) == bytes(written)
        assert not port.outvq_full
        await port.write_all(b"after")
        await port.drain()
        assert bytes(rec.data[1]) == bytes(written) + b"after"
        assert rig.device.core.held_ports == []


async def test_host_to_guest_bounded_by_staging(nursery: trio.Nursery) -> None:
    """The guest posts no rx buffer: port.send takes at most staging_limit, then waits."""
    cfg = PortConfig(2, "org.test.rec", staging_limit=10_000)
    async with console_rig(
        nursery, ports=[(ECHO, EchoBackend()), (cfg, RecordingBackend())],
        driver_args={"rx_buffers": 0},
    ) as rig:
        port = await _open(rig, "org.test.rec", host=True)
        dev = rig.dev(2)
        assert port.rx_posted == 0
        data = os.urandom(50_000)
        assert dev.send(data) == 10_000
        assert dev.send(data[10_000:]) == 0
        assert dev.staged == 10_000
        with trio.move_on_after(0.1) as waited:
            await dev.wait_writable()
        assert waited.cancelled_caught
        # The guest posts buffers; the rest flows as it reads.
        async with trio.open_nursery() as n:

            async def host() -> None:
                await dev.send_all(data[10_000:])

            n.start_soon(host)
            port.post_rx()
            got = await port.read_exactly(len(data))
        assert got == data
        assert dev.counters.discarded == {}


@pytest.mark.parametrize("policy", ["hold", "discard"])
async def test_guest_writes_without_host_peer(nursery: trio.Nursery, policy: str) -> None:
    """State D (guest open, no host peer): writes are held (the guest blocks) or discarded and
    counted. Linux itself never writes without a host; `ignore_host` makes the guest do so."""
    cfg = PortConfig(2, "org.test.d", guest_writes_without_host=policy)  # type: ignore[arg-type]
    rec = RecordingBackend()
    async with console_rig(nursery, ports=[(ECHO, EchoBackend()), (cfg, rec)]) as rig:
        port = await _open(rig, "org.test.d")
        assert rig.dev(2).state.name == "D" and not port.host_connected
        # Linux blocks the write (host not connected).
        with pytest.raises(WouldBlockError):
            await port.write(b"x", nonblock=True)
        await port.write(b"held or dropped", ignore_host=True)
        await trio.sleep(0.05)
        if policy == "hold":
            assert port.reclaim() == 0 and port.tx_in_flight == 1
            assert rec.data == {}
            rig.dev(2).host_attach()
            await port.drain()
            assert rec.data == {1: bytearray(b"held or dropped")}
            assert rig.dev(2).counters.discarded == {}
        else:
            await port.drain()
            assert rec.data == {}
            assert rig.dev(2).counters.discarded == {"no-host": len(b"held or dropped")}


async def test_console_tx_never_holds_the_guest(nursery: trio.Nursery) -> None:
    """hvc spins on its buffer: the device completes console chains even when the backend
    refuses them, counting the bytes as console-overflow."""
    rec = RecordingBackend()
    async with console_rig(nursery, ports=[(CONSOLE0, rec), (ECHO, EchoBackend())]) as rig:
        await rig.driver.wait_for(lambda: 0 in rig.driver.ports and rig.driver.port(0).console)
        con = rig.driver.port(0)
        await con.write_all(b"boot log\n")
        assert rec.data == {1: bytearray(b"boot log\n")}
        rec.accept = False
        data = b"z" * 10_000
        with trio.fail_after(2):
            await con.write_all(data)  # completes: nothing waits on the backend
        assert rig.dev(0).counters.discarded["console-overflow"] == len(data)
        assert con.tx_in_flight == 0
        rec.accept = True
        await con.write_all(b"ok")
        assert rec.data == {1: bytearray(b"boot log\nok")}


async def test_console_reads_host_bytes(nursery: trio.Nursery) -> None:
    rec = RecordingBackend()
    async with console_rig(nursery, ports=[(CONSOLE0, rec), (REC, RecordingBackend())]) as rig:
        await rig.driver.wait_for(lambda: 0 in rig.driver.ports and rig.driver.port(0).console)
        await rig.driver.wait_for(lambda: rig.dev(0).session is not None)
        await rig.dev(0).send_all(b"login: ")
        assert await rig.driver.port(0).read_exactly(7) == b"login: "
