"""Bad input from the guest to the console device: each is logged, counted and ignored, and an
echo port keeps streaming byte-exact meanwhile (the `streaming` block checks every byte)."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from vhostser.backends.simple import RecordingBackend
from vhostser.console import PortConfig
from vhostser.console.control import Event
from vhostser.testing.console_driver import (
    BAD_ID,
    CONTROL_TX,
    ControlEvent,
    GuestPort,
    rx_queue,
    tx_queue,
)
from virtqueue import VIRTQ_DESC_F_WRITE

from .console_harness import Rig, console_rig, echo_ports, eventually, messages, streaming

CONTROL = struct.Struct("<IHH")


@asynccontextmanager
async def _rig(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, **kwargs: object
) -> AsyncIterator[tuple[Rig, GuestPort]]:
    """A rig with the echo port open and the recording port open with a host peer."""
    caplog.set_level(logging.INFO, logger="vhostser")
    async with console_rig(nursery, ports=echo_ports(), **kwargs) as rig:  # type: ignore[arg-type]
        drv = rig.driver
        echo = await drv.wait_port("org.test.echo")
        rec = await drv.wait_port("org.test.rec")
        rig.dev(2).host_attach()
        await drv.wait_for(lambda: echo.host_connected and rec.host_connected)
        await echo.open()
        await rec.open()
        caplog.clear()
        yield rig, rec


async def _rec_still_works(rig: Rig, port: GuestPort, marker: bytes = b"still fine") -> None:
    backend = rig.dev(port.id).backend
    assert isinstance(backend, RecordingBackend)
    session = rig.dev(port.id).session
    assert session is not None
    before = bytes(backend.data.get(session.id, b""))
    await port.write_all(marker)
    await port.drain()
    assert bytes(backend.data[session.id]) == before + marker


def _msg(port_id: int, event: int, value: int = 1) -> bytes:
    return CONTROL.pack(port_id, event, value)


@pytest.mark.parametrize(
    ("message", "port_text"),
    [
        (_msg(40, ControlEvent.PORT_OPEN), "port 40"),  # ≥ max_nr_ports
        (_msg(BAD_ID, ControlEvent.PORT_READY), f"port {BAD_ID}"),
        (_msg(3, ControlEvent.PORT_READY), "port 3"),  # < max_nr_ports, never added
        (_msg(3, ControlEvent.PORT_OPEN), "port 3"),
    ],
    ids=["id-beyond-max", "bad-id", "never-added-ready", "never-added-open"],
)
async def test_control_for_a_port_that_does_not_exist(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, message: bytes, port_text: str
) -> None:
    async with _rig(nursery, caplog) as (rig, rec):
        dev = rig.device
        async with streaming(rig.driver.port(1)):
            await rig.driver.send_raw_control(message)
        assert dev.counters.bad_control == 1
        lines = [m for m in messages(caplog) if port_text in m]
        assert lines and all("control" in m for m in lines), messages(caplog)
        assert 3 not in dev.ports and sorted(dev.ports) == [1, 2]
        await _rec_still_works(rig, rec)


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (_msg(1, 99), "unknown control event 99 (id 1)"),
        (_msg(1, ControlEvent.DEVICE_ADD), "(id 1)"),  # a host→guest event from the guest
        (_msg(1, ControlEvent.PORT_NAME) + b"evil\0", "(id 1)"),
        (_msg(1, ControlEvent.PORT_OPEN)[:4], "4 bytes"),
        (b"", "0 bytes"),
    ],
    ids=["unknown-event", "host-event", "host-event-with-payload", "truncated-4", "empty"],
)
async def test_unparsable_control_message(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, message: bytes, needle: str
) -> None:
    async with _rig(nursery, caplog) as (rig, rec):
        async with streaming(rig.driver.port(1)):
            await rig.driver.send_raw_control(message)
        assert rig.device.counters.bad_control == 1
        lines = [m for m in messages(caplog) if needle in m]
        assert lines and all(f"vring {CONTROL_TX}" in m for m in lines), messages(caplog)
        # Nothing moved: the echo port's session is the same, its host still there.
        assert rig.dev(1).state.name == "A" and rig.dev(1).counters.sessions_opened == 1
        await _rec_still_works(rig, rec)


async def test_port_open_before_port_ready(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with _rig(nursery, caplog) as (rig, rec):
        drv, dev = rig.driver, rig.device
        hot = RecordingBackend()
        async with streaming(drv.port(1)):
            with drv.control_held():
                dev.add_port(PortConfig(3, "org.test.hot"), hot)
                await trio.sleep(0.01)
                await drv.send_raw_control(_msg(3, ControlEvent.PORT_OPEN, 1))
                assert dev.counters.bad_control == 1 and hot.events == []
                assert dev.ports[3].state.name == "B"
        assert any("port 3" in m and "PORT_READY" in m for m in messages(caplog))
        # The handshake then goes on as if nothing happened.
        port = await drv.wait_port("org.test.hot")
        await port.open()
        assert hot.events == [("open", 1, "")]
        await _rec_still_works(rig, rec)


async def test_device_ready_storm(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    """50 DEVICE_READY in a row: each one is a reset; what the device queues for the guest
    stays bounded (one announcement per port), and the device ends usable."""
    async with _rig(nursery, caplog) as (rig, rec):
        drv, dev = rig.driver, rig.device
        with drv.control_held():
            await drv.send_raw_control(*[_msg(BAD_ID, ControlEvent.DEVICE_READY)] * 50)
            assert dev.counters.device_ready == 51
            # Bounded: only the last reset's DEVICE_ADDs wait for the guest.
            assert len(dev.state.control_out) <= len(dev.ports)
        assert dev.counters.control_overflow == 0
        backend = dev.ports[2].backend
        assert isinstance(backend, RecordingBackend)
        assert backend.events == [("open", 1, ""), ("close", 1, "reset")]
        assert all(p.counters.resets_seen == 50 for p in dev.ports.values())
        # The guest answers the DEVICE_ADDs of ports it has with PORT_READY (Linux), the device
        # re-announces them; reopening the ports gives working sessions.
        await drv.wait_for(lambda: all(p.guest_ready for p in dev.ports.values()))
        echo = drv.port(1)
        await drv.wait_for(lambda: echo.host_connected and rec.host_connected)
        for port in (echo, rec):
            await port.close()
            await port.open()
        async with streaming(echo):
            pass
        await _rec_still_works(rig, rec)
        assert backend.events[-1] == ("open", 2, "")
        assert dev.counters.bad_control == 0


async def test_port_ready_storm_is_bounded(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """PORT_READY over and over while the guest takes no control message: each is answered
    (PORT_NAME, PORT_OPEN), but the queue toward the guest is bounded; overflow is counted.
    The PORT_OPEN answers the guest has not read collapse into one (the latest H)."""
    async with _rig(nursery, caplog) as (rig, rec):
        drv, dev = rig.driver, rig.device
        before = dev.counters.control_to_guest
        storm = 1200
        async with streaming(drv.port(1)):
            with drv.control_held():
                for _ in range(storm // 100):
                    await drv.send_raw_control(*[_msg(1, ControlEvent.PORT_READY)] * 100)
                await trio.sleep(0.02)
                # The guest's 128 posted buffers took some, at most 1024 wait, the rest was
                # dropped and counted: PORT_NAMEs, and a PORT_OPEN only when none was waiting.
                pending = dev.state.control_out
                queued = len(pending)
                delivered = dev.counters.control_to_guest - before
                assert queued == 1024 and delivered == drv.queue_size
                assert sum(m.event is Event.PORT_OPEN for m in pending) <= 1
                # Every PORT_NAME neither delivered nor queued was dropped; a PORT_OPEN is
                # appended (or dropped) only when the one before it had been delivered.
                overflow = dev.counters.control_overflow
                assert storm - queued - delivered <= overflow <= storm + 1 - queued
        assert any("control queue to the guest full" in m for m in messages(caplog))
        await drv.wait_for(lambda: not dev.state.control_out)
        await _rec_still_works(rig, rec)


async def test_tx_chain_with_a_device_writable_descriptor(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with _rig(nursery, caplog) as (rig, rec):
        fe, q = rig.fe, rig.fe.queue(tx_queue(2))
        gpa = fe.alloc(64)
        fe.write(gpa, b"w" * 64)
        async with streaming(rig.driver.port(1)):
            # Built with the raw helper: the descriptor says the device may write into it.
            head = q.add([(gpa, 64)])
            q.write_desc(head, gpa, 64, VIRTQ_DESC_F_WRITE, 0)
            # And a well-formed chain of readable then writable buffers: still not a tx chain.
            q.add([(gpa, 32)], [(gpa + 32, 32)])
            fe.kick(tx_queue(2), force=True)
            await eventually(lambda: rig.device.counters.bad_chains.get("tx-writable") == 2)
        assert rig.driver.port(2).reclaim() == 0  # both came back (as foreign heads)
        assert rig.driver.stats.foreign_used[tx_queue(2)] == 2
        lines = [m for m in messages(caplog) if "writable" in m]
        assert len(lines) == 2
        assert all(f"vring {tx_queue(2)}" in m and "port 2" in m for m in lines)
        backend = rig.dev(2).backend
        assert isinstance(backend, RecordingBackend) and backend.data == {}
        await _rec_still_works(rig, rec)


async def test_rx_chain_with_only_readonly_descriptors(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with _rig(nursery, caplog, driver_args={"rx_buffers": 0}) as (rig, rec):
        fe, q = rig.fe, rig.fe.queue(rx_queue(2))
        gpa = fe.alloc(4096)
        fe.write(gpa, b"\x00" * 4096)
        rig.driver.port(1).post_rx()  # the echo port streams as usual
        async with streaming(rig.driver.port(1)):
            head = q.add([(gpa, 4096)])  # device-readable only: nothing can go in it
            assert head >= 0
            rec.post_rx(4)
            await rig.dev(2).send_all(b"to the guest")
            assert await rec.read_exactly(12) == b"to the guest"
        assert rig.device.counters.bad_chains == {"rx-readonly": 1}
        assert fe.read(gpa, 4096) == b"\x00" * 4096  # not written
        lines = [m for m in messages(caplog) if "no writable buffer" in m]
        assert len(lines) == 1 and f"vring {rx_queue(2)}" in lines[0] and "port 2" in lines[0]
        assert rig.driver.stats.foreign_used[rx_queue(2)] == 1
        await _rec_still_works(rig, rec)


async def _data_on_removed_port(rig: Rig) -> int:
    """Remove port 2, then have the guest write on its tx queue anyway; return the bytes."""
    drv, fe = rig.driver, rig.fe
    port = drv.port(2)
    rig.device.remove_port(2)
    await drv.wait_for(lambda: port.unplugged)
    q = fe.queue(tx_queue(2))
    gpa = fe.alloc(1000)
    fe.write(gpa, b"g" * 1000)
    q.add([(gpa, 1000)])
    fe.kick(tx_queue(2), force=True)
    with trio.fail_after(2):
        while q.get_used() is None:
            await trio.sleep(0.001)
    return 1000


async def test_data_on_a_removed_port_is_dropped_and_counted(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with _rig(nursery, caplog) as (rig, _):
        async with streaming(rig.driver.port(1)):
            n = await _data_on_removed_port(rig)
        assert rig.device.counters.bytes_on_missing_ports == n


async def test_data_on_a_removed_port_is_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with _rig(nursery, caplog) as (rig, _):
        await _data_on_removed_port(rig)
        lines = [m for m in messages(caplog, logging.INFO) if f"vring {tx_queue(2)}" in m]
        assert lines and "port 2" in lines[0], messages(caplog, logging.INFO)
