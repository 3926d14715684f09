"""The trio side of vhost-user: frame messages off a unix socket with their SCM_RIGHTS fds,
hand them to the sans-io `VhostUserBackend`, send its replies. Nothing here decides anything."""

from __future__ import annotations

import array
import logging
import os
import socket
from typing import Protocol

import trio

from ..fds import close_fds
from .backend import MAX_DEVICE_STATE, Transfer, VhostUserBackend
from .errors import FramingError
from .messages import FLAG_NEED_REPLY, HEADER, MAX_FDS, U64, Header, request_name

log = logging.getLogger("vhostser.vhost_user")

_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
# How long a back-end request (CONFIG_CHANGE_MSG) may wait for the front end's ack.
BACKEND_REQUEST_TIMEOUT = 5.0
# How long a device-state transfer may take (the front end reads or writes the other end).
TRANSFER_TIMEOUT = 30.0


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


async def _recv_exact(sock: trio.socket.SocketType, n: int, fds: list[int]) -> bytes | None:
    """Read exactly n bytes, collecting any fds that ride along; None on EOF before any byte."""
    buf = bytearray()
    while len(buf) < n:
        data, ancdata, flags, _ = await sock.recvmsg(n - len(buf), _ANCILLARY_SPACE)
        fds.extend(_fds_from(ancdata))
        if flags & socket.MSG_CTRUNC:
            raise FramingError(f"more than {MAX_FDS} fds attached to one message")
        if not data:
            if not buf:
                return None
            raise FramingError(f"connection closed {len(buf)} bytes into a {n}-byte read")
        buf += data
    return bytes(buf)


async def receive_message(
    sock: trio.socket.SocketType,
) -> tuple[Header, bytes, list[int]] | None:
    """One framed message (header, body, fds), or None at a clean end of stream."""
    fds: list[int] = []
    try:
        head = await _recv_exact(sock, HEADER.size, fds)
        if head is None:
            return None
        header = Header.unpack(head)
        body = await _recv_exact(sock, header.size, fds) if header.size else b""
        if body is None:
            raise FramingError(f"{request_name(header.request)}: connection closed before body")
    except BaseException:
        close_fds(fds)
        raise
    return header, body, fds


class Journal(Protocol):
    """Told of each request around its handling, so that a successor can finish one the
    process died in (the state region keeps it)."""

    def received(self, raw: bytes, with_fds: bool) -> None:
        """A request (header and body as they came) is about to be handled."""

    def handled(self, reply: bytes | None) -> None:
        """It was handled; `reply` is about to be sent."""

    async def durable(self) -> None:
        """Return once what the handling changed outlives the process (before the reply)."""

    def replied(self) -> None:
        """The reply goes out now (told just before it is written: see `_send_reply`)."""


async def serve_connection(
    sock: trio.socket.SocketType, backend: VhostUserBackend, journal: Journal | None = None
) -> None:
    """Run one front end's conversation to its end; the backend outlives it."""
    try:
        while True:
            try:
                message = await receive_message(sock)
            except FramingError as e:
                log.warning("closing the front-end connection: %s", e)
                return
            except OSError as e:
                log.warning("front-end connection failed: %s", e)
                return
            if message is None:
                log.info("front end closed the connection")
                return
            header, body, fds = message
            if journal is not None:
                journal.received(HEADER.pack(header.request, header.flags, header.size) + body,
                                 bool(fds))
            outcome = backend.receive(header, body, fds)
            if journal is not None:
                journal.handled(outcome.reply)
                await journal.durable()
            if outcome.reply is not None:
                try:
                    await _send_reply(sock, outcome.reply, journal)
                except OSError as e:
                    log.warning("front-end connection failed sending a reply: %s", e)
                    return
            if outcome.transfer is not None:
                await _carry_out(outcome.transfer, backend)
            if outcome.close:
                return
    finally:
        backend.disconnected()


async def _send_reply(sock: trio.socket.SocketType, reply: bytes,
                      journal: Journal | None) -> None:
    """Tell the journal, then send the reply, with no scheduling point between the two.

    The journal hears it first: the front end may act on a reply the moment it is written
    (the write can wake it before this process runs again — a test, or a manager, may kill
    us then), and a successor must never send a reply the front end already has: a stray
    reply desynchronises QEMU's vhost-user conversation. The other order's window — killed
    after the journal heard and before the one write — is a few instructions that nothing
    outside can aim at. The socket is non-blocking: a small reply goes out in that write;
    what does not fit is sent the trio way."""
    if journal is not None:
        journal.replied()
    try:
        sent = os.write(sock.fileno(), reply)
    except BlockingIOError:
        sent = 0
    if sent < len(reply):
        view = memoryview(reply)[sent:]
        while view:
            view = view[await sock.send(view):]


async def _carry_out(transfer: Transfer, backend: VhostUserBackend) -> None:
    """Stream a device state through its channel (non-blocking since receipt), then close
    it: the front end reads to its end (SAVE) or closes its end when all is written (LOAD)."""
    fd, loaded, error = transfer.fd, bytearray(), None
    try:
        with trio.fail_after(TRANSFER_TIMEOUT):
            if transfer.data is not None:
                view = memoryview(transfer.data)
                while view:
                    await trio.lowlevel.wait_writable(fd)
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        continue
            else:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break
                    loaded += chunk
                    if len(loaded) > MAX_DEVICE_STATE:
                        raise ValueError(f"more than {MAX_DEVICE_STATE} bytes of state")
    except (OSError, ValueError, trio.TooSlowError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        trio.lowlevel.notify_closing(fd)
        close_fds([fd])
    backend.transfer_done(None if transfer.data is not None else bytes(loaded), error)


async def send_backend_request(backend: VhostUserBackend, message: bytes) -> bool:
    """Send one back-end request (e.g. `backend.config_change_message()`) on the channel the
    front end gave with SET_BACKEND_REQ_FD; wait for its ack when one was asked for.
    Returns False (with a log line) when there is no channel or it failed."""
    if backend.backend_req_fd is None:
        log.info("no back-end request channel: front end not told of the change")
        return False
    sock = trio.socket.fromfd(backend.backend_req_fd, socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.send(message)
        header = Header.unpack(message[: HEADER.size])
        if header.flags & FLAG_NEED_REPLY:
            with trio.move_on_after(BACKEND_REQUEST_TIMEOUT) as scope:
                reply = await receive_message(sock)
            if scope.cancelled_caught or reply is None:
                log.warning("back-end request %d: no ack from the front end", header.request)
                return False
            close_fds(reply[2])
            if len(reply[1]) != U64.SIZE or U64.unpack(reply[1]).value != 0:
                log.warning("back-end request %d: the front end refused it", header.request)
                return False
            return True
        return True
    except (OSError, FramingError) as e:
        log.warning("back-end request channel failed: %s", e)
        return False
    finally:
        sock.close()
