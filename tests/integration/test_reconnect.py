"""A front end that goes away and another that comes: one VhostUserBackend serves them both."""

from __future__ import annotations

import os

from .conftest import RX, TX, Server


async def test_second_frontend_after_disconnect(server: Server) -> None:
    data = os.urandom(100_000)
    async with server.running() as fe:
        assert await server.driver(fe).echo(data) == data
        # Gone without a stop, as when QEMU crashes.
    await server.wait_served(1)
    stopped = [e[1] for e in server.device.events if e[0] == "stopped"]
    assert sorted(stopped) == [RX, TX]
    backend = server.backend
    assert backend.memory is None and not backend.owned and backend.backend_req_fd is None
    assert all(v.kick_fd is None and v.call_fd is None for v in backend.vrings)

    async with server.running(event_idx=True) as fe:
        assert await server.driver(fe).echo(data) == data
        assert fe.log[0] == "GET_FEATURES"
        assert await fe.stop() == {RX: 25, TX: 25}
    assert server.device.started() == [RX, TX, RX, TX]


async def test_reconnect_leaks_no_fds(server: Server) -> None:
    before = server.open_fds()
    for n in range(1, 4):
        async with server.running() as fe:
            assert await server.driver(fe).echo(b"x" * 5000) == b"x" * 5000
            assert len(server.open_fds()) > len(before)
        await server.wait_served(n)
        assert server.open_fds() == before


async def test_disconnect_while_stopped(server: Server) -> None:
    async with server.running() as fe:
        assert await server.driver(fe).echo(b"y" * 10) == b"y" * 10
        await fe.stop()
    await server.wait_served(1)
    async with server.running() as fe:
        assert await server.driver(fe).echo(b"z" * 10) == b"z" * 10
