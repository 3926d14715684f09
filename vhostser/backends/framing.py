"""The framed wire protocol of the `unix` and `tcp` backends (`mode = "framed"`), sans-io.

In framed mode a host peer sees the guest's sessions explicitly, so it never has to guess
where one guest open ends and the next begins (the qemu-ga 0xFF problem of seeds/004).

Wire format, both directions, over one stream connection::

    frame  = length:u32  type:u8  body
    length = number of bytes after the length field (1 + len(body)); 1 <= length <= 1048576
    all integers big-endian (network order); strings UTF-8, not NUL-terminated, they run to
    the end of the frame

    type 1  OPEN   body = session:u64  port_name:utf8        (backend -> peer only)
    type 2  DATA   body = session:u64  payload:bytes         (both ways; payload may be empty)
    type 3  CLOSE  body = session:u64  reason:utf8           (both ways)

Backend -> peer:

- OPEN(session, port name) when the guest opens the port (a session starts), and right after
  the peer connects if a session is already open. Session ids are positive, increase per
  port and are never reused, also across daemon restarts.
- DATA(session, bytes): what the guest wrote in that session, in order. One guest write may
  be split over several DATA frames and several writes may be merged: it is a byte stream.
- CLOSE(session, reason) when the session ends; reason is one of guest-close, reset,
  port-removed, host-close, frontend-gone, shutdown. No frame of that session follows.

Peer -> backend:

- DATA(session, bytes): bytes for the guest. Delivered only if `session` is the session open
  right now; otherwise dropped and counted as stale — never delivered into another session.
  The backend stops reading the connection while the port's bounded buffer towards the
  guest is full (TCP/unix backpressure), so a peer should not expect its writes to complete
  while the guest is not reading.
- CLOSE(session, reason): end that session from the host side (the guest reads EOF; its next
  open starts a new session, announced with OPEN). The reason is informational: any UTF-8
  text, "host-close" suggested. A CLOSE for a session that is not open is ignored (counted as
  stale).
- Anything else — a length of 0 or over 1 MiB, an unknown type, an OPEN, a body shorter than
  8 bytes, a string that is not UTF-8 — is a protocol error: the backend logs it and closes
  the connection.

Example, a guest session 7 on port "org.example.0" that writes "hi" and closes::

    00 00 00 16 01 00 00 00 00 00 00 00 07 6f 72 67 2e 65 78 61 6d 70 6c 65 2e 30
    00 00 00 0b 02 00 00 00 00 00 00 00 07 68 69
    00 00 00 14 03 00 00 00 00 00 00 00 07 67 75 65 73 74 2d 63 6c 6f 73 65
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAX_FRAME = 1 << 20  # largest `length` value
HEADER = struct.Struct(">IB")  # length, type
SESSION = struct.Struct(">Q")
# Payload bytes that fit in one DATA frame.
MAX_DATA = MAX_FRAME - 1 - SESSION.size


class FrameType(enum.IntEnum):
    OPEN = 1
    DATA = 2
    CLOSE = 3


@dataclass(frozen=True, slots=True)
class Open:
    session: int
    name: str


@dataclass(frozen=True, slots=True)
class Data:
    session: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    session: int
    reason: str


Frame = Open | Data | Close


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame; the connection cannot go on."""


def encode(frame: Frame) -> bytes:
    """One frame on the wire. DATA payloads over MAX_DATA are the caller's to split
    (`encode_data` does it)."""
    if isinstance(frame, Open):
        ftype, body = FrameType.OPEN, frame.name.encode()
    elif isinstance(frame, Data):
        ftype, body = FrameType.DATA, frame.data
    else:
        ftype, body = FrameType.CLOSE, frame.reason.encode()
    length = 1 + SESSION.size + len(body)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(length, ftype) + SESSION.pack(frame.session) + body


def encode_data(session: int, data: bytes | memoryview) -> Iterator[bytes]:
    """DATA frames carrying `data`, split so that none exceeds the maximum frame size."""
    view = memoryview(data)
    for start in range(0, len(view), MAX_DATA):
        yield encode(Data(session, bytes(view[start : start + MAX_DATA])))


def frame_size(head: bytes | bytearray | memoryview, *, accept_open: bool = False) -> int | None:
    """The wire size of the frame `head` starts (None: too few bytes to say yet); FrameError
    as soon as the bytes there show it is not a valid frame."""
    if len(head) < 4:
        return None
    length: int = struct.unpack_from(">I", head)[0]
    if not 1 <= length <= MAX_FRAME:
        raise FrameError(f"frame length {length} not in 1..{MAX_FRAME}")
    if len(head) >= 5 and head[4] not in (FrameType.DATA, FrameType.CLOSE) and not (
        accept_open and head[4] == FrameType.OPEN
    ):
        raise FrameError(f"unexpected frame type {head[4]}")
    return 4 + length


def decode(wire: bytes | memoryview) -> Frame:
    """The one whole frame `wire` holds (its size as `frame_size` gave it, type checked)."""
    ftype = FrameType(wire[4])
    body = bytes(wire[5:])
    if len(body) < SESSION.size:
        raise FrameError(f"{ftype.name} frame body of {len(body)} bytes has no session id")
    (session,) = SESSION.unpack_from(body)
    rest = body[SESSION.size :]
    if ftype is FrameType.DATA:
        return Data(session, rest)
    try:
        text = rest.decode()
    except UnicodeDecodeError:
        raise FrameError(f"{ftype.name} frame text is not UTF-8") from None
    return Open(session, text) if ftype is FrameType.OPEN else Close(session, text)


class FrameDecoder:
    """Feed bytes in, take frames out. After a FrameError every later call raises it again."""

    def __init__(self, *, accept_open: bool = False) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None
        self._accept_open = accept_open  # peers never send OPEN; tests decode both ways

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            size = frame_size(self._buf, accept_open=self._accept_open)
            if size is None or len(self._buf) < size:
                return None
            wire = bytes(self._buf[:size])
            del self._buf[:size]
            return decode(wire)
        except FrameError as e:
            self._error = e
            self._buf.clear()
            raise
