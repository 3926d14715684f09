"""The virtio-console control protocol (virtio 1.2 §5.3.6.2), sans-io.

A control message is `le32 id, le16 event, le16 value`, followed by a payload for RESIZE
(two le16) and PORT_NAME (the name bytes). They travel on the control queues: guest→host on
queue 3 (c_ovq), host→guest on queue 2 (c_ivq), one message per buffer.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IHH")
RESIZE = struct.Struct("<HH")
# DEVICE_READY carries this id: it concerns the device, not a port.
BAD_ID = 0xFFFFFFFF
# Linux reads at most this much of a control buffer, and so we bound what we send: a port name
# longer than the guest's control buffer minus the header would be cut by the guest.
MAX_NAME = 4096 - HEADER.size - 1  # the NUL terminator counts


class Event(enum.IntEnum):
    """Control events; the comment says who sends each."""

    DEVICE_READY = 0  # guest: the driver is ready for DEVICE_ADDs
    DEVICE_ADD = 1  # host: a port exists
    DEVICE_REMOVE = 2  # host: a port is gone
    PORT_READY = 3  # guest: the port is set up (value 1) or failed (0)
    CONSOLE_PORT = 4  # host: this port is a console (hvc)
    RESIZE = 5  # host: console size changed (payload: two le16)
    PORT_OPEN = 6  # both: the sender opened (1) or closed (0) the port
    PORT_NAME = 7  # host: the port's name (payload)


class ControlError(ValueError):
    """A control message from the guest that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class ControlMessage:
    id: int
    event: Event
    value: int = 0
    payload: bytes = b""

    def pack(self) -> bytes:
        return HEADER.pack(self.id, self.event, self.value) + self.payload


def parse(data: bytes) -> ControlMessage:
    """One guest→host control message. Only the guest's events are accepted: DEVICE_READY,
    PORT_READY, PORT_OPEN (a guest sending DEVICE_ADD is not something a driver does)."""
    if len(data) < HEADER.size:
        raise ControlError(f"control message of {len(data)} bytes, need {HEADER.size}")
    id_, event, value = HEADER.unpack_from(data)
    try:
        ev = Event(event)
    except ValueError:
        raise ControlError(f"unknown control event {event} (id {id_})") from None
    if ev not in (Event.DEVICE_READY, Event.PORT_READY, Event.PORT_OPEN):
        raise ControlError(f"{ev.name} is a host→guest event; the guest sent it (id {id_})")
    return ControlMessage(id_, ev, value, bytes(data[HEADER.size :]))


def device_add(port: int) -> ControlMessage:
    return ControlMessage(port, Event.DEVICE_ADD, 1)


def device_remove(port: int) -> ControlMessage:
    return ControlMessage(port, Event.DEVICE_REMOVE, 1)


def console_port(port: int) -> ControlMessage:
    return ControlMessage(port, Event.CONSOLE_PORT, 1)


def port_open(port: int, is_open: bool) -> ControlMessage:
    return ControlMessage(port, Event.PORT_OPEN, int(is_open))


def port_name(port: int, name: str) -> ControlMessage:
    raw = name.encode()
    if len(raw) > MAX_NAME:
        raise ValueError(f"port name of {len(raw)} bytes, at most {MAX_NAME}")
    # Linux copies the name and terminates it itself; QEMU sends a trailing NUL too.
    return ControlMessage(port, Event.PORT_NAME, 1, raw + b"\0")


def resize(port: int, cols: int, rows: int, *, rows_first: bool = False) -> ControlMessage:
    """RESIZE's payload order: the spec says cols then rows; Linux's driver has read it as
    rows then cols, so the order is a setting."""
    pair = (rows, cols) if rows_first else (cols, rows)
    return ControlMessage(port, Event.RESIZE, 0, RESIZE.pack(*pair))
