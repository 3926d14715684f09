"""Bad input over the real socket: each has a defined outcome and the server lives on.

Rejected requests are nacked (with REPLY_ACK and NEED_REPLY) or ignored, and the connection
goes on: a GET_FEATURES right after is answered. Input that breaks the framing, or a bad
request the front end waits a real answer for, closes the connection: the server then
accepts the next one, which works. No fd is leaked either way.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Awaitable, Callable

import pytest

from vhostser.testing import IMPLEMENTED_PROTOCOL_FEATURES, AckError, FrontEnd
from vhostser.vhost_user import F_PROTOCOL_FEATURES, ProtocolFeature, Request
from vhostser.vhost_user.messages import (
    HEADER,
    U64,
    MemoryTable,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
    encode,
)
from virtqueue import Region

from .conftest import ECHO_FEATURES, RX, TX, Server


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _assert_alive(fe: FrontEnd) -> None:
    """A valid request is still answered, in order, on this connection."""
    body = await fe.request(Request.GET_FEATURES)
    assert U64.unpack(body).value == ECHO_FEATURES | F_PROTOCOL_FEATURES


async def _assert_new_connection_works(server: Server, served: int) -> None:
    await server.wait_served(served)
    async with server.running() as fe:
        assert await server.driver(fe).echo(b"still here" * 500) == b"still here" * 500


# --------------------------------------------------------------------------- rejected


async def _unknown_code(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(99, b"", need_reply=need_reply)


async def _known_but_unsupported(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SEND_RARP, bytes(8), need_reply=need_reply)


async def _body_size_mismatch(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SET_VRING_NUM, bytes(12), need_reply=need_reply)


async def _mem_table_two_regions_one_fd(fe: FrontEnd, need_reply: bool) -> None:
    table = MemoryTable((fe.region, fe.region))
    memfd = os.memfd_create("extra", os.MFD_CLOEXEC)
    try:
        await fe.request(Request.SET_MEM_TABLE, table, fds=[memfd], need_reply=need_reply)
    finally:
        os.close(memfd)


async def _vring_index_out_of_range(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SET_VRING_NUM, VringState(2, 64), need_reply=need_reply)


async def _vring_file_index_out_of_range(fe: FrontEnd, need_reply: bool) -> None:
    fds = _eventfds(1)
    try:
        await fe.request(
            Request.SET_VRING_CALL, VringFile(255, False), fds=fds, need_reply=need_reply
        )
    finally:
        _close(fds)


def _queue_size(size: int) -> Callable[[FrontEnd, bool], Awaitable[None]]:
    async def bad_size(fe: FrontEnd, need_reply: bool) -> None:
        await fe.request(Request.SET_VRING_NUM, VringState(RX, size), need_reply=need_reply)

    return bad_size


async def _second_set_owner(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SET_OWNER, need_reply=need_reply)


async def _features_never_offered(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SET_FEATURES, U64(1 << 63), need_reply=need_reply)


async def _fd_on_a_request_without_fds(fe: FrontEnd, need_reply: bool) -> None:
    fds = _eventfds(1)
    try:
        await fe.request(Request.SET_VRING_NUM, VringState(RX, 64), fds=fds, need_reply=need_reply)
    finally:
        _close(fds)


async def _mem_region_fd_not_mappable(fe: FrontEnd, need_reply: bool) -> None:
    fds = _eventfds(1)
    try:
        await fe.request(
            Request.ADD_MEM_REG, SingleMemoryRegion(fe.region), fds=fds, need_reply=need_reply
        )
    finally:
        _close(fds)


async def _remove_unknown_region(fe: FrontEnd, need_reply: bool) -> None:
    region = SingleMemoryRegion(Region(0x1000_0000, 4096, 0x7000_0000, 0))
    await fe.request(Request.REM_MEM_REG, region, need_reply=need_reply)


async def _enable_value_2(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SET_VRING_ENABLE, VringState(TX, 2), need_reply=need_reply)


async def _base_too_big(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SET_VRING_BASE, VringState(TX, 0x10000), need_reply=need_reply)


async def _status_too_big(fe: FrontEnd, need_reply: bool) -> None:
    await fe.request(Request.SET_STATUS, U64(0x100), need_reply=need_reply)


async def _config_out_of_range(fe: FrontEnd, need_reply: bool) -> None:
    body = struct.pack("<III", 250, 10, 0) + bytes(10)
    await fe.request(Request.SET_CONFIG, body, need_reply=need_reply)


async def _protocol_features_not_offered(fe: FrontEnd, need_reply: bool) -> None:
    bits = fe.protocol_features | ProtocolFeature.LOG_SHMFD
    await fe.request(Request.SET_PROTOCOL_FEATURES, U64(bits), need_reply=need_reply)


REJECTED = {
    "unknown-code": _unknown_code,
    "unsupported-code": _known_but_unsupported,
    "body-size": _body_size_mismatch,
    "mem-table-2-regions-1-fd": _mem_table_two_regions_one_fd,
    "vring-index": _vring_index_out_of_range,
    "vring-file-index": _vring_file_index_out_of_range,
    "queue-size-0": _queue_size(0),
    "queue-size-3": _queue_size(3),
    "queue-size-65536": _queue_size(65536),
    "second-set-owner": _second_set_owner,
    "features-not-offered": _features_never_offered,
    "unexpected-fd": _fd_on_a_request_without_fds,
    "mem-region-fd-not-mappable": _mem_region_fd_not_mappable,
    "remove-unknown-region": _remove_unknown_region,
    "enable-value-2": _enable_value_2,
    "base-too-big": _base_too_big,
    "status-too-big": _status_too_big,
    "config-out-of-range": _config_out_of_range,
    "protocol-features-not-offered": _protocol_features_not_offered,
}


@pytest.mark.parametrize("reply_ack", [True, False], ids=["reply-ack", "no-reply-ack"])
@pytest.mark.parametrize("case", REJECTED.values(), ids=REJECTED.keys())
async def test_rejected_request(
    server: Server, case: Callable[[FrontEnd, bool], Awaitable[None]], reply_ack: bool
) -> None:
    before = server.open_fds()
    features = IMPLEMENTED_PROTOCOL_FEATURES
    if not reply_ack:
        features &= ~ProtocolFeature.REPLY_ACK
    async with server.frontend(protocol_features=features) as fe:
        await fe.realize(2)
        if reply_ack:
            with pytest.raises(AckError) as info:
                await case(fe, True)
            assert info.value.status != 0
        else:
            await case(fe, True)  # NEED_REPLY without REPLY_ACK: no answer, as the spec says
        await _assert_alive(fe)
        # The connection is in order for real work too.
        await fe.start([RX, TX])
        assert await server.driver(fe).echo(b"ok" * 3000) == b"ok" * 3000
    await server.wait_served(1)
    assert server.open_fds() == before


async def test_rejected_without_need_reply_is_silent(server: Server) -> None:
    async with server.frontend() as fe:
        await fe.realize(2)
        for case in REJECTED.values():
            await case(fe, False)
        await _assert_alive(fe)


# --------------------------------------------------------------------------- closed


async def _bad_version_bits(fe: FrontEnd) -> None:
    await fe.send_raw(HEADER.pack(Request.GET_FEATURES, 0x2, 0))


async def _nine_fds(fe: FrontEnd) -> None:
    fds = _eventfds(9)
    try:
        await fe.send_raw(encode(Request.SET_MEM_TABLE, MemoryTable((fe.region,))), fds)
    finally:
        _close(fds)


async def _oversize_body(fe: FrontEnd) -> None:
    await fe.send_raw(HEADER.pack(Request.SET_CONFIG, 0x1, 1 << 20) + bytes(64))


async def _get_vring_base_bad_index(fe: FrontEnd) -> None:
    await fe.send_raw(encode(Request.GET_VRING_BASE, VringState(7, 0)))


async def _get_with_a_body(fe: FrontEnd) -> None:
    await fe.send_raw(encode(Request.GET_FEATURES, U64(0)))


async def _reply_flag_on_a_request(fe: FrontEnd) -> None:
    await fe.send_raw(encode(Request.GET_QUEUE_NUM, flags=0x4))


async def _get_config_oversize(fe: FrontEnd) -> None:
    body = struct.pack("<III", 0, 300, 0) + bytes(300)
    await fe.send_raw(encode(Request.GET_CONFIG, body))


CLOSED = {
    "bad-version-bits": _bad_version_bits,
    "nine-fds": _nine_fds,
    "oversize-body": _oversize_body,
    "get-vring-base-bad-index": _get_vring_base_bad_index,
    "get-with-a-body": _get_with_a_body,
    "reply-flag": _reply_flag_on_a_request,
    "get-config-oversize": _get_config_oversize,
}


@pytest.mark.parametrize("case", CLOSED.values(), ids=CLOSED.keys())
async def test_connection_closed(
    server: Server, case: Callable[[FrontEnd], Awaitable[None]]
) -> None:
    before = server.open_fds()
    async with server.running() as fe:
        await case(fe)
        assert await fe.receive_raw(timeout=2) is None
    await server.wait_served(1)
    assert server.open_fds() == before
    await _assert_new_connection_works(server, 1)


@pytest.mark.parametrize(
    "data",
    [
        HEADER.pack(Request.SET_FEATURES, 0x1, 8) + b"\1\2\3",
        HEADER.pack(Request.SET_FEATURES, 0x1, 8)[:5],
    ],
    ids=["in-body", "in-header"],
)
async def test_eof_in_the_middle_of_a_message(
    server: Server, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "vhostser.vhost_user")
    before = server.open_fds()
    async with server.running() as fe:
        await fe.send_raw(data)
    await server.wait_served(1)
    assert "closing the front-end connection" in caplog.text
    assert server.open_fds() == before
    await _assert_new_connection_works(server, 1)


async def test_vring_file_with_nofd_bit_and_an_fd(server: Server) -> None:
    async with server.running() as fe:
        fds = _eventfds(1)
        try:
            word = struct.pack("<Q", TX | 0x100)
            with pytest.raises(AckError):
                await fe.request(Request.SET_VRING_KICK, word, fds=fds, need_reply=True)
        finally:
            _close(fds)
        await _assert_alive(fe)
        # The ring still runs on its old kick fd.
        assert await server.driver(fe).echo(b"k" * 100) == b"k" * 100


# --------------------------------------------------------------------------- while running


async def test_resize_a_running_ring(server: Server) -> None:
    async with server.running() as fe:
        with pytest.raises(AckError):
            await fe.request(Request.SET_VRING_NUM, VringState(TX, 128), need_reply=True)
        with pytest.raises(AckError):
            await fe.request(Request.SET_VRING_BASE, VringState(TX, 5), need_reply=True)
        assert await server.driver(fe).echo(b"r" * 9000) == b"r" * 9000


async def test_ring_address_outside_guest_memory(server: Server) -> None:
    """Rings moved outside guest memory cannot run; moved back, they run again."""
    async with server.running() as fe:
        good = server.backend.vrings[TX].addr
        assert good is not None
        bad = VringAddr(TX, 0, 0x1000, 0x2000, 0x3000, 0)
        try:
            await fe.request(Request.SET_VRING_ADDR, bad, need_reply=True)
        except AckError:
            pass  # refusing it outright is as good an outcome
        assert server.backend.vrings[TX].queue is None or server.backend.vrings[TX].addr == good
        await _assert_alive(fe)
        await fe.request(Request.SET_VRING_ADDR, good, need_reply=True)
        assert server.backend.vrings[TX].started
        assert await server.driver(fe).echo(b"a" * 9000) == b"a" * 9000


async def test_polling_kick_is_refused(server: Server) -> None:
    async with server.running() as fe:
        with pytest.raises(AckError):
            await fe.request(Request.SET_VRING_KICK, VringFile(TX, True), need_reply=True)
        assert await server.driver(fe).echo(b"p" * 100) == b"p" * 100


async def test_bad_chain_from_the_guest(server: Server) -> None:
    """A chain pointing outside guest memory is returned unused; the queue goes on."""
    async with server.running() as fe:
        tx = fe.queue(TX)
        head = tx.add([(fe.alloc(16), 16)])
        tx.write_desc(head, 0xDEAD_0000_0000, 4096, 0, 0)
        fe.kick(TX)
        assert await fe.collect_used(TX, timeout=2) == [(head, 0)]
        assert await server.driver(fe).echo(b"after" * 100) == b"after" * 100
