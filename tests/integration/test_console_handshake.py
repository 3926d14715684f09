"""The console device through a Linux-like guest driver: probe, the multiport handshake,
hotplug, control messages queued for the guest, resize, emergency write."""

from __future__ import annotations

import struct

import pytest
import trio

from vhostser.backends.simple import EchoBackend, RecordingBackend
from vhostser.console import PortConfig
from vhostser.testing.console_driver import (
    BAD_ID,
    F_EMERG_WRITE,
    F_MULTIPORT,
    F_SIZE,
    PortGoneError,
)
from vhostser.vhost_user import BackendRequest
from virtqueue import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1

from .console_harness import CONSOLE0, ECHO, REC, console_rig, echo_ports, echo_roundtrip


async def test_multiport_handshake(nursery: trio.Nursery) -> None:
    async with console_rig(nursery, ports=echo_ports(console=True)) as rig:
        drv = rig.driver
        await drv.wait_for(lambda: len(drv.ports) == 3 and drv.port(1).host_connected)
        # Probe: config read before the features are acked, then the features Linux wants.
        log = rig.fe.log
        assert log.index("GET_CONFIG") < log.index("SET_FEATURES")
        assert (drv.cols, drv.rows, drv.max_nr_ports) == (80, 25, 4)
        assert drv.features == VIRTIO_F_VERSION_1 | F_MULTIPORT | F_SIZE | F_EMERG_WRITE
        assert not rig.fe.acked_features & VIRTIO_F_RING_EVENT_IDX
        assert rig.fe.used_queues == tuple(range(10))
        # DEVICE_READY first, then one DEVICE_ADD per port in id order.
        assert rig.sent()[0] == ("DEVICE_READY", BAD_ID, 1)
        assert rig.received()[:3] == [("DEVICE_ADD", i, 1) for i in range(3)]
        # Each port: PORT_READY → what the host says about it, in QEMU's order.
        assert rig.received(0) == [("DEVICE_ADD", 0, 1), ("CONSOLE_PORT", 0, 1)]
        assert rig.received(1) == [("DEVICE_ADD", 1, 1), ("PORT_NAME", 1, 1), ("PORT_OPEN", 1, 1)]
        assert rig.received(2) == [("DEVICE_ADD", 2, 1), ("PORT_NAME", 2, 1)]
        # The console is opened by the guest at once (init_port_console); nothing else is.
        assert rig.sent(0) == [("PORT_READY", 0, 1), ("PORT_OPEN", 0, 1)]
        assert rig.sent(1) == [("PORT_READY", 1, 1)]
        assert rig.sent(2) == [("PORT_READY", 2, 1)]
        assert drv.port(0).console and drv.port(0).guest_open
        assert drv.port("org.test.echo").id == 1 and drv.port("org.test.rec").id == 2
        assert not drv.port(1).guest_open and not drv.port(2).host_connected
        # Device side: the console has a session (no host peer: state D), the others none.
        await drv.wait_for(lambda: rig.dev(0).session is not None)
        assert [p.state.name for p in rig.device.ports.values()] == ["D", "C", "B"]
        console_backend = rig.dev(0).backend
        assert isinstance(console_backend, RecordingBackend)
        assert console_backend.events == [("open", 1, "")]
        assert rig.device.counters.device_ready == 1
        assert rig.device.counters.bad_control == 0
        assert not rig.driver.stats.ignored_control


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
async def test_handshake_and_echo_with_event_idx(nursery: trio.Nursery, event_idx: bool) -> None:
    async with console_rig(
        nursery, ports=echo_ports(), driver_args={"event_idx": event_idx, "queue_size": 16}
    ) as rig:
        assert bool(rig.fe.acked_features & VIRTIO_F_RING_EVENT_IDX) == event_idx
        echo = await rig.driver.wait_port("org.test.echo")
        await rig.driver.wait_for(lambda: echo.host_connected)
        await echo.open()
        data = bytes(range(256)) * 1000
        assert await echo_roundtrip(echo, data) == data


async def test_without_multiport_port0_is_the_console(nursery: trio.Nursery) -> None:
    async with console_rig(
        nursery,
        ports=[(PortConfig(0, console=True), EchoBackend())],
        max_ports=1,
        driver_args={"multiport": False},
    ) as rig:
        drv = rig.driver
        assert not drv.multiport and rig.fe.used_queues == (0, 1)
        assert drv.features & F_MULTIPORT == 0
        assert drv.sent == [] and drv.received == []  # no control queues at all
        port = drv.port(0)
        assert port.console and port.guest_open
        assert rig.dev(0).session is not None and rig.dev(0).state.name == "A"
        data = bytes(range(256)) * 200  # hvc writes a page at a time
        assert await echo_roundtrip(port, data) == data
        assert rig.dev(0).counters.discarded == {}


async def test_control_messages_wait_for_guest_buffers(nursery: trio.Nursery) -> None:
    """No control rx buffer posted: what the device has to say waits, in order, bounded."""
    async with console_rig(nursery, ports=echo_ports(console=True), fill_control=False) as rig:
        drv, dev = rig.driver, rig.device
        hot = RecordingBackend()
        dev.add_port(PortConfig(3, "hot"), hot)
        dev.resize(0, 132, 43)  # not sent: the guest has not answered DEVICE_ADD yet
        await trio.sleep(0.05)
        assert drv.received == [] and dev.counters.control_to_guest == 0
        assert rig.dev(0).guest_ready is False
        drv.fill_control(2)  # fewer buffers than messages: they go on as buffers come back
        await drv.wait_for(
            lambda: len(drv.ports) == 4 and drv.port(1).host_connected and drv.port(3).name == "hot"
        )
        assert rig.received()[:4] == [("DEVICE_ADD", i, 1) for i in range(4)]
        assert rig.received(3) == [("DEVICE_ADD", 3, 1), ("PORT_NAME", 3, 1)]
        assert drv.port(3).name == "hot"
        assert dev.counters.control_overflow == 0 and dev.counters.bad_control == 0
        assert dev.counters.control_to_guest == len(drv.received)


async def test_hotplug_add_and_remove(nursery: trio.Nursery) -> None:
    async with console_rig(nursery, ports=echo_ports()) as rig:
        drv, dev = rig.driver, rig.device
        await drv.wait_port(2)
        hot = RecordingBackend()
        dev.add_port(PortConfig(3, "org.test.hot"), hot)
        port = await drv.wait_port("org.test.hot")
        assert port.id == 3
        assert rig.received(3) == [("DEVICE_ADD", 3, 1), ("PORT_NAME", 3, 1)]
        await port.open()
        rig.dev(3).host_attach()
        await drv.wait_for(lambda: port.host_connected)
        await port.write_all(b"hello")
        await port.drain()
        assert hot.data == {1: bytearray(b"hello")}

        dev.remove_port(3)
        await drv.wait_for(lambda: port.unplugged)
        assert rig.received(3)[-1] == ("DEVICE_REMOVE", 3, 1)
        assert hot.events == [("open", 1, ""), ("close", 1, "port-removed")]
        assert not port.guest_open and not port.host_connected
        with pytest.raises(PortGoneError):
            await port.write(b"more")
        with pytest.raises(PortGoneError):
            await port.open()
        assert await port.read() == b""  # EOF, as port_fops_read on an unplugged port
        await port.close()  # the process lets go of its fd
        # Linux's unplug_port tells the host nothing, nor does the later close.
        assert rig.sent(3) == [("PORT_READY", 3, 1), ("PORT_OPEN", 3, 1)]
        assert 3 not in drv.ports and dev.counters.bad_control == 0

        # The same id can come back; its rx buffers are the ones still posted.
        again = RecordingBackend()
        dev.add_port(PortConfig(3, "org.test.hot2"), again)
        port2 = await drv.wait_port("org.test.hot2")
        await port2.open()
        assert [e[0] for e in again.events] == ["open"]
        # Other ports never noticed.
        echo = drv.port(1)
        await echo.open()
        assert await echo_roundtrip(echo, b"x" * 100_000) == b"x" * 100_000


@pytest.mark.parametrize("stage", ["queued", "delivered"])
async def test_port_removed_before_the_guest_answered(nursery: trio.Nursery, stage: str) -> None:
    """A port added and removed before the guest answered its DEVICE_ADD must not remain in
    the guest: its DEVICE_ADD is either never delivered or followed by DEVICE_REMOVE."""
    async with console_rig(
        nursery, ports=echo_ports(), fill_control=stage == "delivered"
    ) as rig:
        drv, dev = rig.driver, rig.device
        await drv.wait_for(lambda: stage == "queued" or len(drv.ports) == 2)
        with drv.control_held():
            delivered = dev.counters.control_to_guest
            dev.add_port(PortConfig(3, "brief"), RecordingBackend())
            await trio.sleep(0.02)
            # queued: no control buffer, DEVICE_ADD waits in the device; delivered: it is in a
            # guest buffer the guest has not handled yet.
            if stage == "delivered":
                assert dev.counters.control_to_guest > delivered
            else:
                assert dev.counters.control_to_guest == delivered
            dev.remove_port(3)
        if stage == "queued":
            drv.fill_control()
        await drv.wait_for(lambda: len(drv.ports) >= 2 and drv.port(1).host_connected)
        await trio.sleep(0.05)
        await drv.poll()
        assert 3 not in drv.ports, f"phantom port 3; guest got {rig.received(3)}"
        if stage == "queued":
            assert dev.counters.bad_control == 0


@pytest.mark.parametrize("rows_first", [False, True], ids=["cols-rows", "rows-cols"])
async def test_resize_message_order(nursery: trio.Nursery, rows_first: bool) -> None:
    ports = [
        (CONSOLE0, RecordingBackend()),
        (PortConfig(1, "c1", console=True), RecordingBackend()),
    ]
    async with console_rig(
        nursery, ports=ports, device_args={"resize_rows_first": rows_first}
    ) as rig:
        drv = rig.driver
        await drv.wait_for(lambda: len(drv.ports) == 2 and drv.port(1).console)
        rig.device.resize(1, 132, 43)
        await drv.wait_for(lambda: drv.port(1).resize_payload is not None)
        pair = (43, 132) if rows_first else (132, 43)
        assert drv.port(1).resize_payload == struct.pack("<HH", *pair)
        # Linux reads (rows, cols): right only when the device sends rows first.
        assert drv.port(1).size == pair
        assert rig.received(1)[-1] == ("RESIZE", 1, 0)

        # Port 0: the config space changes too and the front end is told (CONFIG_CHANGE_MSG).
        rig.device.resize(0, 100, 30)
        await drv.wait_for(lambda: drv.port(0).resize_payload is not None)
        with trio.fail_after(5):
            msg = await rig.fe.backend_requests.receive()
        assert msg.request == BackendRequest.CONFIG_CHANGE_MSG
        cols, rows = struct.unpack("<HH", await rig.fe.get_config(0, 4))
        assert (cols, rows) == (100, 30)


async def test_emergency_write_reaches_port0(nursery: trio.Nursery) -> None:
    console = RecordingBackend()
    async with console_rig(nursery, ports=[(CONSOLE0, console), (ECHO, EchoBackend())]) as rig:
        await rig.driver.wait_for(lambda: rig.dev(0).session is not None)
        for ch in b"SOS":
            await rig.driver.emergency_write(ch)
        await rig.fe.barrier()
        assert console.data == {1: bytearray(b"SOS")}
        assert rig.dev(0).counters.bytes_from_guest == 3


async def test_emergency_write_without_a_session(nursery: trio.Nursery) -> None:
    rec = RecordingBackend()
    ports = [(PortConfig(0, "p0"), rec), (REC, RecordingBackend())]
    async with console_rig(nursery, ports=ports) as rig:
        await rig.driver.wait_port("p0")
        assert rig.dev(0).session is None
        await rig.driver.emergency_write(b"!")
        await rig.fe.barrier()  # the connection must still be alive
        assert rec.data == {}
        assert rig.dev(0).counters.discarded["no-session"] == 1
