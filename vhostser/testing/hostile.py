"""Hostile input, as data: what a bad host peer or a bad guest sends, for the tests and for
`vhostser soak`. Each item has a defined outcome in the daemon (see the tests that use it)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from ..backends.framing import MAX_FRAME, Open, encode
from .console_driver import ControlEvent
from .frontend import FrontEnd, sealed_memfd

# A framed peer's malformed frames, each with the words of the decoder's error: the backend
# logs it and closes the connection (peers_malformed).
MALFORMED_FRAMES: list[tuple[bytes, str]] = [
    (b"\x00\x00\x00\x00", "length 0"),
    ((MAX_FRAME + 1).to_bytes(4, "big"), "length 1048577"),
    (b"\x00\x00\x00\x09\x04", "type 4"),
    (b"\x00\x00\x00\x09\x00", "type 0"),
    (encode(Open(1, "x")), "type 1"),
    (b"\x00\x00\x00\x05\x02abcd", "no session id"),
    (b"\x00\x00\x00\x0a\x03" + bytes(8) + b"\xc3", "not UTF-8"),
]

_CONTROL = struct.Struct("<IHH")


def bad_control_messages(port_id: int, max_ports: int) -> list[bytes]:
    """Guest control messages the device must ignore, each counted once in bad_control: one
    too short to parse, an event no guest sends, a PORT_OPEN for a port that cannot exist."""
    return [
        _CONTROL.pack(port_id, ControlEvent.PORT_OPEN, 1)[:5],
        _CONTROL.pack(port_id, 99, 0),
        _CONTROL.pack(max_ports + 3, ControlEvent.PORT_OPEN, 1),
    ]


def add_aliased_tx_chain(fe: FrontEnd, queue: int, gpa: int, piece: int, pieces: int) -> int:
    """A tx chain of `pieces` descriptors all naming the same `piece` bytes at `gpa` (it
    claims pieces * piece bytes of guest RAM that holds only `piece`), made available and
    kicked; returns its head."""
    q = fe.queue(queue)
    head = q.add([(gpa, piece)] * pieces)
    fe.kick(queue, force=True)
    return head


# Fds a front end can hand over with SCM_RIGHTS, of every kind, each made new in directory
# `tmp` (a regular file lives there) and owned by the caller. Which kind a request accepts is
# the request table's (vhost_user.messages.REQUESTS, fds.FdKind): the rest are refused.


def _regular_file(tmp: Path) -> int:
    return os.open(tmp / "plain", os.O_RDWR | os.O_CREAT, 0o600)


def _dead_pipe(tmp: Path) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _stream_socket(tmp: Path) -> int:
    """A unix stream socket whose other end is closed."""
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _dgram_socket(tmp: Path) -> int:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()


FD_MAKERS: dict[str, Callable[[Path], int]] = {
    "eventfd": lambda tmp: os.eventfd(0),
    "regular-file": _regular_file,
    "dead-pipe": _dead_pipe,
    "memfd": lambda tmp: sealed_memfd("hostile", 4096),
    "stream-socket": _stream_socket,
    "dgram-socket": _dgram_socket,
    "dev-null": lambda tmp: os.open(os.devnull, os.O_RDWR),
}
