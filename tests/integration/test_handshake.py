"""The QEMU-order handshake over a real socket, and the control-path requests around it."""

from __future__ import annotations

import pytest
import trio

from vhostser.testing import IMPLEMENTED_PROTOCOL_FEATURES, FrontEndError
from vhostser.vhost_user import (
    F_PROTOCOL_FEATURES,
    PROTOCOL_FEATURES,
    BackendRequest,
    ProtocolFeature,
    Request,
    send_backend_request,
)
from virtqueue import VIRTIO_F_RING_EVENT_IDX

from .conftest import ECHO_CONFIG, ECHO_FEATURES, RX, TX, Server

NR = 0x9  # version 1 | NEED_REPLY
V1 = 0x1

REALIZE = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS",
    "SET_BACKEND_REQ_FD",
    "SET_OWNER",
    "GET_FEATURES",
    *["SET_VRING_CALL", "SET_VRING_ERR"] * 2,
]
RING = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL"]
START = [
    "SET_FEATURES",
    "GET_STATUS",
    "SET_STATUS",
    "ADD_MEM_REG",
    *RING * 2,
    *["SET_VRING_ENABLE"] * 2,
    *["SET_VRING_CALL"] * 2,
]
STOP = [*["SET_VRING_ENABLE"] * 2, *["GET_VRING_BASE"] * 2]


async def test_qemu_order(server: Server) -> None:
    async with server.frontend() as fe:
        await fe.realize(2)
        assert fe.protocol_features == PROTOCOL_FEATURES == 0x9A229
        assert fe.log == REALIZE
        # A multiport guest reads the config space before it acks features.
        assert await fe.get_config(0, 12) == ECHO_CONFIG
        await fe.start([RX, TX])
        assert fe.log == [*REALIZE, "GET_CONFIG", *START]
        assert server.device.started() == [RX, TX]
        assert fe.acked_features == ECHO_FEATURES & ~VIRTIO_F_RING_EVENT_IDX | F_PROTOCOL_FEATURES
        backend = server.backend
        assert backend.owned and backend.status == 0x8
        assert backend.memory is not None and backend.memory.regions == (fe.region,)
        assert ("features", ECHO_FEATURES & ~VIRTIO_F_RING_EVENT_IDX) in server.device.events


async def test_wire_flags_and_fds(server: Server) -> None:
    """NEED_REPLY where QEMU sets it, and each fd where QEMU attaches one."""
    async with server.running():
        pass
    await server.wait_served(1)
    wire = server.backend.wire
    assert [name for name, _, _ in wire] == [*REALIZE, *START]
    fd_requests = {"SET_BACKEND_REQ_FD", "SET_VRING_CALL", "SET_VRING_ERR", "ADD_MEM_REG"}
    for name, flags, nfds in wire:
        needs_reply = name in fd_requests | {"SET_VRING_KICK", "SET_VRING_ENABLE"}
        assert flags == (NR if needs_reply else V1), name
        assert nfds == (1 if name in fd_requests | {"SET_VRING_KICK"} else 0), name


async def test_without_reply_ack_get_features_is_the_barrier(server: Server) -> None:
    features = IMPLEMENTED_PROTOCOL_FEATURES & ~ProtocolFeature.REPLY_ACK
    async with server.running(protocol_features=features) as fe:
        enable = ["SET_VRING_ENABLE", "GET_FEATURES"] * 2
        i = fe.log.index("SET_VRING_ENABLE")
        assert fe.log[i : i + 4] == enable
        assert server.device.started() == [RX, TX]
        assert all(flags == V1 for _, flags, _ in server.backend.wire)
        assert await server.driver(fe).echo(b"no acks" * 100) == b"no acks" * 100
        assert await fe.stop() == {RX: 1, TX: 1}
        assert fe.log[-6:] == [*enable, *STOP[2:]]


@pytest.mark.parametrize("use_mem_table", [False, True], ids=["no-mem-slots", "forced"])
async def test_set_mem_table(server: Server, use_mem_table: bool) -> None:
    """SET_MEM_TABLE when CONFIGURE_MEM_SLOTS is not negotiated (or not wanted); QEMU sends
    the whole table again at every start."""
    features = IMPLEMENTED_PROTOCOL_FEATURES
    if not use_mem_table:
        features &= ~ProtocolFeature.CONFIGURE_MEM_SLOTS
    async with server.running(protocol_features=features, use_mem_table=use_mem_table) as fe:
        realize = [r for r in REALIZE if use_mem_table or r != "GET_MAX_MEM_SLOTS"]
        start = ["SET_MEM_TABLE" if r == "ADD_MEM_REG" else r for r in START]
        assert fe.log == [*realize, *start]
        assert ("SET_MEM_TABLE", NR, 1) in server.backend.wire
        data = bytes(range(256)) * 64
        drv = server.driver(fe)
        assert await drv.echo(data) == data
        await fe.stop()
        await fe.resume()
        assert fe.log.count("SET_MEM_TABLE") == 2
        assert await drv.echo(data) == data


async def test_add_mem_reg_is_not_repeated_on_resume(server: Server) -> None:
    async with server.running() as fe:
        await fe.stop()
        del fe.log[:]
        await fe.resume()
        assert fe.log == [r for r in START if r != "ADD_MEM_REG"]
        assert server.device.started() == [RX, TX, RX, TX]


async def test_poweroff_stop_sequence(server: Server) -> None:
    async with server.running() as fe:
        n = len(fe.log)
        assert await fe.stop() == {RX: 0, TX: 0}
        assert fe.log[n:] == STOP
        assert server.backend.status == 0x8
        stopped = {e[1] for e in server.device.events if e[0] == "stopped"}
        assert stopped == {RX, TX}


async def test_pause_sets_status_zero_and_is_not_a_reset(server: Server) -> None:
    async with server.running() as fe:
        n = len(fe.log)
        assert await fe.stop(pause=True) == {RX: 0, TX: 0}
        assert fe.log[n:] == [*STOP, "SET_STATUS"]
        # SET_STATUS has no ack (as in QEMU): a request with a reply orders it.
        await fe.barrier()
        assert server.backend.status == 0
        events = server.device.events
        assert events[-1] == ("status", 0)
        assert ("reset",) not in events
        await fe.resume()
        assert server.backend.status == 0x8
        assert await server.driver(fe).echo(b"p" * 100) == b"p" * 100


async def test_config_space(server: Server) -> None:
    async with server.running() as fe:
        assert await fe.get_config(2, 2) == (25).to_bytes(2, "little")
        await fe.set_config(0, b"\x84\x00")  # acked: done by now
        assert server.device.events[-1] == ("set_config", 0, b"\x84\x00")


async def test_backend_request_channel(server: Server) -> None:
    async with server.running() as fe:
        message = server.backend.config_change_message()
        assert await send_backend_request(server.backend, message)
        with trio.fail_after(2):
            got = await fe.backend_requests.receive()
        assert got.request == BackendRequest.CONFIG_CHANGE_MSG
        assert got.name == "CONFIG_CHANGE_MSG"
        assert got.flags & 0x8


async def test_reset_device_then_start_again(server: Server) -> None:
    async with server.running() as fe:
        drv = server.driver(fe)
        assert await drv.echo(b"before" * 1000) == b"before" * 1000
        await fe.stop()
        await fe.reset_device()
        await fe.barrier()
        assert server.device.events[-1] == ("reset",)
        assert server.backend.acked_features == 0
        with pytest.raises(FrontEndError):
            fe.queue(RX)
        await fe.start([RX, TX], event_idx=True)
        drv = server.driver(fe)
        assert await drv.echo(b"after" * 1000) == b"after" * 1000


async def test_err_eventfd(server: Server) -> None:
    async with server.running() as fe:
        server.backend.mark_needs_reset(server.backend.vrings[TX], "test")
        assert await fe.wait_err(TX, timeout=2) == 1
        status = await fe.request(Request.GET_STATUS)
        assert int.from_bytes(status, "little") & 0x40


async def test_wait_call_times_out(server: Server) -> None:
    async with server.running() as fe:
        with pytest.raises(trio.TooSlowError):
            await fe.wait_call(RX, timeout=0.05)
