"""The testing front end's own contract: errors, resource handling, exports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

import vhostser.testing
from vhostser.testing import (
    BackendClosedError,
    FrontEndError,
    frontend,
    open_frontend,
)
from vhostser.vhost_user import ProtocolFeature, Request
from vhostser.vhost_user.messages import VringState

from .conftest import RX, TX, Server


def test_exports() -> None:
    assert sorted(vhostser.testing.__all__) == sorted([*frontend.__all__, "ConsoleDriver"])
    for name in frontend.__all__:
        assert getattr(vhostser.testing, name) is getattr(frontend, name)


async def test_unanswered_request_puts_the_conversation_out_of_step(
    nursery: trio.Nursery, socket_dir: Path
) -> None:
    """A back end that never answers: the request times out, and every later one fails
    instead of taking a stale reply for its own."""
    path = str(socket_dir / "mute.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    accepted: list[trio.socket.SocketType] = []

    async def accept_and_ignore() -> None:
        with listener:
            accepted.append((await listener.accept())[0])
            await trio.sleep_forever()

    nursery.start_soon(accept_and_ignore)
    async with open_frontend(path, reply_timeout=0.05) as fe:
        with pytest.raises(FrontEndError, match="no reply within"):
            await fe.realize(2)
        with pytest.raises(FrontEndError, match="out of step"):
            await fe.barrier()
    accepted[0].close()


async def test_request_on_a_connection_the_backend_closes(server: Server) -> None:
    async with server.running() as fe:
        with pytest.raises(BackendClosedError):
            await fe.request(Request.GET_VRING_BASE, VringState(9, 0))
        with pytest.raises(FrontEndError):
            await fe.barrier()


async def test_argument_checks(server: Server) -> None:
    with pytest.raises(ValueError, match="does not implement"):
        async with server.frontend(protocol_features=ProtocolFeature.LOG_SHMFD):
            pass
    async with server.frontend(mem_size=1 << 20) as fe:
        with pytest.raises(FrontEndError, match="before realize"):
            await fe.start([RX])
        await fe.realize(2)
        with pytest.raises(FrontEndError, match="not started"):
            fe.queue(RX)
        with pytest.raises(FrontEndError, match="no queue 5"):
            fe.kick(5)
        with pytest.raises(FrontEndError, match="not offered"):
            await fe.start([RX, TX], features=1 << 40)
        await fe.start([RX, TX])
        with pytest.raises(FrontEndError, match="already started"):
            await fe.start([RX, TX])
        with pytest.raises(FrontEndError, match="exhausted"):
            fe.alloc(1 << 20)


async def test_errors_from_the_body_are_not_wrapped(server: Server) -> None:
    """open_frontend's internal nursery does not turn errors into exception groups."""
    with pytest.raises(KeyError, match="mine"):
        async with server.running():
            raise KeyError("mine")
    with pytest.raises(FrontEndError, match="not started"):
        async with server.frontend() as fe:
            await fe.realize(2)
            fe.queue(TX)


async def test_guest_ram_is_shared_with_the_backend(server: Server) -> None:
    async with server.running() as fe:
        gpa = fe.alloc(11)
        fe.write(gpa, b"hello guest")
        assert server.backend.memory is not None
        assert bytes(server.backend.memory.view(gpa, 11)) == b"hello guest"
        server.backend.memory.view(gpa, 5)[:] = b"HELLO"
        assert fe.read(gpa, 11) == b"HELLO guest"
        # Ring addresses went over as front-end virtual addresses, translated back.
        vring = server.backend.vrings[TX]
        assert vring.addr is not None
        assert server.backend.memory.translate_uva(vring.addr.desc, 16) != vring.addr.desc


async def test_close_releases_every_fd(server: Server) -> None:
    before = server.open_fds()
    async with server.running() as fe:
        await fe.stop()
        await fe.resume()
        await fe.aclose()
        await fe.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await fe.barrier()
    await server.wait_served(1)
    assert server.open_fds() == before
