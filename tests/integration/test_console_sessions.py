"""Sessions seen from both ends: guest open/close, host attach/detach, no stale data, a reset
(DEVICE_READY again, RESET_DEVICE), a stop (not a reset), freeze/restore."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from vhostser.backends.simple import EchoBackend, RecordingBackend
from vhostser.console import PortConfig
from vhostser.testing.console_driver import (
    BAD_ID,
    MAX_WRITE,
    PortGoneError,
    WouldBlockError,
    tx_queue,
)

from .console_harness import (
    CONSOLE0,
    ECHO,
    REC,
    Rig,
    console_rig,
    echo_ports,
    echo_roundtrip,
    eventually,
    streaming,
)


def _rec(rig: Rig, port_id: int = 2) -> RecordingBackend:
    backend = rig.dev(port_id).backend
    assert isinstance(backend, RecordingBackend)
    return backend


async def test_guest_open_close_sessions(nursery: trio.Nursery) -> None:
    async with console_rig(nursery, ports=echo_ports()) as rig:
        port = await rig.driver.wait_port("org.test.rec")
        rig.dev(2).host_attach()
        await rig.driver.wait_for(lambda: port.host_connected)
        for i in range(1, 4):
            await port.open()
            await port.write_all(f"session {i}".encode())
            await port.drain()
            await port.close()
        rec = _rec(rig)
        assert rec.events == [
            ev for i in (1, 2, 3) for ev in (("open", i, ""), ("close", i, "guest-close"))
        ]
        assert {k: bytes(v) for k, v in rec.data.items()} == {
            i: f"session {i}".encode() for i in (1, 2, 3)
        }
        assert rig.dev(2).state.name == "C" and rig.dev(2).counters.sessions_opened == 3
        assert rig.sent(2)[1:] == [("PORT_OPEN", 2, v) for _ in range(3) for v in (1, 0)]


async def test_host_attach_detach(nursery: trio.Nursery) -> None:
    async with console_rig(nursery, ports=echo_ports()) as rig:
        drv, dev = rig.driver, rig.dev(2)
        port = await drv.wait_port("org.test.rec")
        await port.open()
        assert not port.host_connected
        assert await port.read(timeout=1) == b""  # no host: EOF at once
        dev.host_attach()
        await drv.wait_for(lambda: port.host_connected)
        assert rig.received(2)[-1] == ("PORT_OPEN", 2, 1)
        await dev.send_all(b"from the host")
        assert await port.read_exactly(13) == b"from the host"
        dev.host_detach()
        await drv.wait_for(lambda: not port.host_connected)
        assert rig.received(2)[-1] == ("PORT_OPEN", 2, 0)
        assert await port.read(timeout=1) == b""  # EOF after the detach
        with pytest.raises(WouldBlockError):
            await port.write(b"nobody", nonblock=True)
        # The session goes on across the detach (classic chardev); a new peer continues it.
        dev.host_attach()
        await drv.wait_for(lambda: port.host_connected)
        await port.write_all(b"still session 1")
        await port.drain()
        assert _rec(rig).events == [("open", 1, "")]
        assert bytes(_rec(rig).data[1]) == b"still session 1"


async def test_host_ends_the_session(nursery: trio.Nursery) -> None:
    """end_session (admin API, backend): the guest reads EOF, the backend sees host-close,
    and a peer attaching again starts a new session."""
    async with console_rig(nursery, ports=echo_ports()) as rig:
        drv, dev = rig.driver, rig.dev(2)
        port = await drv.wait_port("org.test.rec")
        dev.host_attach()
        await drv.wait_for(lambda: port.host_connected)
        await port.open()
        dev.end_session()
        await drv.wait_for(lambda: not port.host_connected)
        assert await port.read(timeout=1) == b""
        assert _rec(rig).events == [("open", 1, ""), ("close", 1, "host-close")]
        dev.host_attach()
        await drv.wait_for(lambda: port.host_connected)
        await port.write_all(b"two")
        await port.drain()
        assert _rec(rig).events[-1] == ("open", 2, "")
        assert bytes(_rec(rig).data[2]) == b"two"


async def _stage_unread(rig: Rig, port_id: int, staged: int) -> int:
    """With the guest not reading, fill its rx buffers and leave `staged` more bytes in the
    device's staging buffer; return how many went into guest buffers."""
    dev, port = rig.dev(port_id), rig.driver.port(port_id)
    in_ring = port.rx_posted * 4096
    dev.send(b"\xff" * in_ring)
    with trio.fail_after(2):
        while dev.staged:
            await trio.sleep(0.001)
    assert dev.send(b"\xfe" * staged) == staged
    await trio.sleep(0.02)
    assert dev.staged == staged
    return in_ring


async def test_no_stale_data_across_sessions(nursery: trio.Nursery) -> None:
    """Host bytes queued for session N (guest not reading) never reach session N+1; the
    device counts what it dropped as stale."""
    async with console_rig(nursery, ports=echo_ports(), driver_args={"queue_size": 4}) as rig:
        drv, dev = rig.driver, rig.dev(2)
        port = await drv.wait_port("org.test.rec")
        dev.host_attach()
        await drv.wait_for(lambda: port.host_connected)
        await port.open()
        in_ring = await _stage_unread(rig, 2, 30_000)
        await port.close()
        assert dev.counters.discarded["stale"] == 30_000
        # The guest dropped what it had received and not read (port_fops_release).
        assert drv.stats.discarded["unread-at-close"] == in_ring
        await port.open()
        await dev.send_all(b"fresh")
        assert await port.read(timeout=2) == b"fresh"
        with pytest.raises(WouldBlockError):
            await port.read(nonblock=True)
        assert _rec(rig).events == [("open", 1, ""), ("close", 1, "guest-close"), ("open", 2, "")]
        assert dev.counters.bytes_to_guest == in_ring + 5


@pytest.mark.parametrize("reset_device", [False, True], ids=["device-ready-again", "reset-device"])
async def test_reinit_closes_every_session(nursery: trio.Nursery, reset_device: bool) -> None:
    """The guest driver starts over: every session closes with reason reset, nothing of the
    old sessions reaches the new ones, and the ports work again."""
    console = RecordingBackend()
    ports = [(CONSOLE0, console), (ECHO, EchoBackend()), (REC, RecordingBackend())]
    async with console_rig(nursery, ports=ports, driver_args={"queue_size": 4}) as rig:
        drv, dev = rig.driver, rig.device
        echo = await drv.wait_port("org.test.echo")
        rec_port = await drv.wait_port("org.test.rec")
        dev.ports[2].host_attach()
        await drv.wait_for(lambda: echo.host_connected and rec_port.host_connected)
        await echo.open()
        await rec_port.open()
        assert await echo_roundtrip(echo, b"before" * 1000) == b"before" * 1000
        await _stage_unread(rig, 2, 20_000)
        old = drv.port(0)

        await drv.reinit(reset_device=reset_device)

        await drv.wait_for(
            lambda: len(drv.ports) == 3 and drv.port(1).host_connected
            and drv.port(2).host_connected
        )
        assert old.unplugged and old is not drv.port(0)
        with pytest.raises(PortGoneError):
            await echo.write(b"old fd")
        assert dev.counters.device_ready == 2
        assert _rec(rig).events == [("open", 1, ""), ("close", 1, "reset")]
        # The console: closed by the reset, opened again by the new driver (CONSOLE_PORT).
        await drv.wait_for(lambda: dev.ports[0].session is not None)
        assert console.events == [("open", 1, ""), ("close", 1, "reset"), ("open", 2, "")]
        assert dev.ports[2].counters.discarded["stale"] == 20_000
        assert all(p.counters.resets_seen == 1 for p in dev.ports.values())
        # The new driver saw the whole handshake again, and nothing else of before.
        assert rig.sent().count(("DEVICE_READY", BAD_ID, 1)) == 2
        # Ports work again, from fresh sessions.
        echo2, rec2 = drv.port(1), drv.port(2)
        await echo2.open()
        assert await echo_roundtrip(echo2, b"after" * 1000) == b"after" * 1000
        await rec2.open()
        await dev.ports[2].send_all(b"new")
        assert await rec2.read(timeout=2) == b"new"
        with pytest.raises(WouldBlockError):
            await rec2.read(nonblock=True)
        assert _rec(rig).events[-1] == ("open", 2, "")
        assert dev.counters.bad_control == 0


async def test_stop_resume_keeps_sessions_and_bytes(nursery: trio.Nursery) -> None:
    """A VM pause (rings stopped, status 0) in the middle of traffic is not a reset: the
    sessions stay, and not one byte is lost or doubled."""
    async with console_rig(nursery, ports=echo_ports()) as rig:
        drv = rig.driver
        echo = await drv.wait_port("org.test.echo")
        rec_port = await drv.wait_port("org.test.rec")
        rig.dev(2).host_attach()
        await drv.wait_for(lambda: echo.host_connected and rec_port.host_connected)
        await echo.open()
        await rec_port.open()
        async with streaming(echo) as stream:
            for _ in range(3):
                await eventually(stream.moved_since(stream.nrecv))  # stopped mid-traffic
                await rig.fe.stop(pause=True)
                await trio.sleep(0.01)
                await rig.fe.resume()
                await trio.sleep(0.01)
        assert _rec(rig).events == [("open", 1, "")]
        session = rig.dev(1).session
        assert session is not None and session.id == 1
        assert rig.dev(1).counters.sessions_opened == 1
        assert all(p.counters.resets_seen == 0 for p in rig.device.ports.values())


async def test_stop_with_a_held_tx_chain(nursery: trio.Nursery) -> None:
    """A tx chain held by backpressure at the moment of the stop is given back to the ring and
    taken again after the resume: the guest's bytes arrive exactly once."""
    async with console_rig(nursery, ports=echo_ports()) as rig:
        drv = rig.driver
        port = await drv.wait_port("org.test.rec")
        rig.dev(2).host_attach()
        await drv.wait_for(lambda: port.host_connected)
        await port.open()
        rec = _rec(rig)
        await port.write_all(b"first;")
        await port.drain()
        rec.accept = False
        chunks = [os.urandom(MAX_WRITE) for _ in range(3)]
        for c in chunks:
            await port.write(c)
        await trio.sleep(0.02)
        assert rig.device.core.held_ports == [2] and port.tx_in_flight == 3
        bases = await rig.fe.stop(pause=True)
        assert bases[tx_queue(2)] == 1  # only "first;" was completed
        await rig.fe.resume()
        await trio.sleep(0.02)
        assert port.reclaim() == 0 and port.tx_in_flight == 3  # still held after the resume
        # Stop again while held after a resume, for good measure.
        await rig.fe.stop(pause=True)
        await rig.fe.resume()
        rec.accept = True
        rig.dev(2).resume_guest_data()
        await port.drain()
        assert bytes(rec.data[1]) == b"first;" + b"".join(chunks)
        assert rig.dev(2).counters.bytes_from_guest == 6 + 3 * MAX_WRITE
        assert rec.events == [("open", 1, "")]


async def test_freeze_restore_keeps_sessions(nursery: trio.Nursery) -> None:
    console = RecordingBackend()
    ports = [(CONSOLE0, console), (ECHO, EchoBackend()), (REC, RecordingBackend()),
             (PortConfig(3, "closed"), RecordingBackend())]
    async with console_rig(nursery, ports=ports) as rig:
        drv, dev = rig.driver, rig.device
        echo = await drv.wait_port("org.test.echo")
        rec_port = await drv.wait_port("org.test.rec")
        await drv.wait_port("closed")
        dev.ports[2].host_attach()
        await drv.wait_for(lambda: echo.host_connected and rec_port.host_connected)
        await echo.open()
        await rec_port.open()
        assert await echo_roundtrip(echo, b"before" * 100) == b"before" * 100
        sent_before = len(drv.sent)

        await drv.freeze_restore()

        # Restore: PORT_READY for every port, PORT_OPEN(1) for the open ones; no DEVICE_READY.
        assert rig.sent()[sent_before:] == [
            ("PORT_READY", 0, 1), ("PORT_OPEN", 0, 1),
            ("PORT_READY", 1, 1), ("PORT_OPEN", 1, 1),
            ("PORT_READY", 2, 1), ("PORT_OPEN", 2, 1),
            ("PORT_READY", 3, 1),
        ]
        assert dev.counters.device_ready == 1
        # The host state comes back from the device's answer to PORT_READY.
        await drv.wait_for(lambda: echo.host_connected and rec_port.host_connected)
        assert not drv.port(3).host_connected
        # Same sessions: no close, no new open.
        assert console.events == [("open", 1, "")]
        assert _rec(rig).events == [("open", 1, "")]
        assert dev.ports[1].session is not None and dev.ports[1].session.id == 1
        assert all(p.counters.resets_seen == 0 for p in dev.ports.values())
        assert dev.counters.bad_control == 0
        # Ports still work.
        assert await echo_roundtrip(echo, b"after" * 10_000) == b"after" * 10_000
        await rec_port.write_all(b"same session")
        await rec_port.drain()
        assert bytes(_rec(rig).data[1]) == b"same session"
        await drv.port(0).write_all(b"console")
        assert console.data == {1: bytearray(b"console")}


async def test_bytes_written_just_before_close_stay_in_their_session(
    nursery: trio.Nursery,
) -> None:
    """write() returns before the device took the bytes; a close right after must not lose
    them (they precede the PORT_OPEN(0) on another queue) nor move them to the next session."""
    async with console_rig(nursery, ports=echo_ports()) as rig:
        port = await rig.driver.wait_port("org.test.rec")
        rig.dev(2).host_attach()
        await rig.driver.wait_for(lambda: port.host_connected)
        data = os.urandom(5 * MAX_WRITE + 123)
        for _ in range(3):
            await port.open()
            await port.write_all(data)
            await port.close()  # no drain
        await port.open()
        await port.write_all(b"last")
        await port.drain()
        rec = _rec(rig)
        assert {k: bytes(v) for k, v in rec.data.items()} == {1: data, 2: data, 3: data, 4: b"last"}
        assert rig.dev(2).counters.discarded == {}


async def test_close_and_reopen_in_one_batch_keeps_old_bytes_out(nursery: trio.Nursery) -> None:
    """A driver may have several control buffers in flight (the spec allows it; Linux does
    not): PORT_OPEN(0) and PORT_OPEN(1) handled in one go must still end session 1 with its
    bytes."""
    async with console_rig(nursery, ports=echo_ports()) as rig:
        drv = rig.driver
        port = await drv.wait_port("org.test.rec")
        await port.open()  # state D, hold: the write below stays in the ring
        await port.write(b"session 1 bytes", ignore_host=True)
        await trio.sleep(0.02)
        assert port.tx_in_flight == 1
        close_open = [struct.pack("<IHH", 2, 6, v) for v in (0, 1)]
        await drv.send_raw_control(*close_open)
        rec = _rec(rig)
        assert rec.events == [("open", 1, ""), ("close", 1, "guest-close"), ("open", 2, "")]
        rig.dev(2).host_attach()
        await drv.wait_for(lambda: port.host_connected)
        await port.write_all(b"session 2 bytes")
        await port.drain()
        assert bytes(rec.data.get(2, b"")) == b"session 2 bytes"
        assert 1 not in rec.data
        assert rig.dev(2).counters.discarded["stale"] == len(b"session 1 bytes")
