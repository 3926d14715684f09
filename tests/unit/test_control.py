"""The virtio-console control protocol codec (vhostser.console.control), sans-io.

Wire layout (virtio 1.2 §5.3.6.2): `le32 id, le16 event, le16 value` + payload. The guest may
only send DEVICE_READY, PORT_READY and PORT_OPEN; everything else is a host→guest event.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostser.console import control
from vhostser.console.control import (
    BAD_ID,
    HEADER,
    MAX_NAME,
    ControlError,
    ControlMessage,
    Event,
)

GUEST_EVENTS = (Event.DEVICE_READY, Event.PORT_READY, Event.PORT_OPEN)
HOST_EVENTS = tuple(e for e in Event if e not in GUEST_EVENTS)
# What Linux allocates for each control rx buffer (drivers/char/virtio_console.c fill_queue:
# alloc_buf(..., PAGE_SIZE, 0)); a host message longer than that does not fit.
GUEST_CONTROL_BUFFER = 4096

u32 = st.integers(0, 0xFFFF_FFFF)
u16 = st.integers(0, 0xFFFF)


def raw(id_: int, event: int, value: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IHH", id_, event, value) + payload


# ------------------------------------------------------------------------ wire layout


def test_event_numbers_are_the_specs() -> None:
    assert {e.name: e.value for e in Event} == {
        "DEVICE_READY": 0, "DEVICE_ADD": 1, "DEVICE_REMOVE": 2, "PORT_READY": 3,
        "CONSOLE_PORT": 4, "RESIZE": 5, "PORT_OPEN": 6, "PORT_NAME": 7,
    }


def test_header_is_8_bytes_little_endian() -> None:
    assert HEADER.size == 8
    msg = ControlMessage(0x01020304, Event.PORT_OPEN, 0x0A0B)
    assert msg.pack() == bytes([4, 3, 2, 1, 6, 0, 0x0B, 0x0A])


@given(id_=u32, event=st.sampled_from(list(Event)), value=u16, payload=st.binary(max_size=64))
def test_pack_layout(id_: int, event: Event, value: int, payload: bytes) -> None:
    assert ControlMessage(id_, event, value, payload).pack() == raw(id_, event, value, payload)


# ------------------------------------------------------------------------ parse


@given(id_=u32, event=st.sampled_from(GUEST_EVENTS), value=u16, payload=st.binary(max_size=64))
def test_guest_messages_round_trip(id_: int, event: Event, value: int, payload: bytes) -> None:
    msg = ControlMessage(id_, event, value, payload)
    parsed = control.parse(msg.pack())
    assert parsed == msg
    assert type(parsed.event) is Event
    assert type(parsed.payload) is bytes


@given(id_=u32, event=st.sampled_from(GUEST_EVENTS), value=u16)
def test_parse_accepts_memoryview_and_bytearray(id_: int, event: Event, value: int) -> None:
    data = raw(id_, event, value, b"xy")
    for view in (memoryview(data), bytearray(data)):
        parsed = control.parse(view)  # type: ignore[arg-type]
        assert parsed == ControlMessage(id_, event, value, b"xy")
        assert type(parsed.payload) is bytes


def test_device_ready_with_bad_id() -> None:
    assert control.parse(raw(BAD_ID, 0, 1)) == ControlMessage(BAD_ID, Event.DEVICE_READY, 1)


@pytest.mark.parametrize("length", range(HEADER.size))
def test_truncated_header_rejected(length: int) -> None:
    data = raw(1, Event.PORT_OPEN, 1)[:length]
    with pytest.raises(ControlError, match=rf"control message of {length} bytes, need 8"):
        control.parse(data)


@given(data=st.binary(max_size=HEADER.size - 1))
def test_any_short_message_rejected(data: bytes) -> None:
    with pytest.raises(ControlError):
        control.parse(data)


@given(id_=u32, event=st.integers(8, 0xFFFF), value=u16, payload=st.binary(max_size=16))
def test_unknown_events_rejected(id_: int, event: int, value: int, payload: bytes) -> None:
    with pytest.raises(ControlError, match=rf"unknown control event {event} \(id {id_}\)"):
        control.parse(raw(id_, event, value, payload))


@pytest.mark.parametrize("event", HOST_EVENTS, ids=lambda e: e.name)
def test_host_events_from_the_guest_rejected(event: Event) -> None:
    with pytest.raises(ControlError, match=rf"{event.name} is a host→guest event.*id 5"):
        control.parse(raw(5, event, 1))


@given(data=st.binary(max_size=40))
def test_parse_never_raises_anything_else(data: bytes) -> None:
    try:
        msg = control.parse(data)
    except ControlError:
        return
    assert msg.event in GUEST_EVENTS
    assert msg.pack() == data


def test_control_error_is_a_value_error() -> None:
    assert issubclass(ControlError, ValueError)


# ------------------------------------------------------------------------ host→guest builders


@given(port=u32)
def test_simple_host_messages(port: int) -> None:
    assert control.device_add(port).pack() == raw(port, 1, 1)
    assert control.device_remove(port).pack() == raw(port, 2, 1)
    assert control.console_port(port).pack() == raw(port, 4, 1)
    assert control.port_open(port, True).pack() == raw(port, 6, 1)
    assert control.port_open(port, False).pack() == raw(port, 6, 0)


def test_port_name_nul_terminated() -> None:
    msg = control.port_name(3, "org.qemu.guest_agent.0")
    assert msg == ControlMessage(3, Event.PORT_NAME, 1, b"org.qemu.guest_agent.0\0")
    assert msg.pack() == raw(3, 7, 1, b"org.qemu.guest_agent.0\0")


def test_port_name_utf8() -> None:
    assert control.port_name(1, "cons\u00f6le").payload == "cons\u00f6le".encode() + b"\0"


@given(name=st.text(max_size=40))
def test_port_name_payload_is_name_plus_one_nul(name: str) -> None:
    payload = control.port_name(2, name).payload
    assert payload[:-1] == name.encode()
    assert payload[-1:] == b"\0"


def test_port_name_too_long_rejected() -> None:
    with pytest.raises(ValueError, match=rf"port name of {MAX_NAME + 1} bytes, at most {MAX_NAME}"):
        control.port_name(1, "x" * (MAX_NAME + 1))
    # counted in bytes, not characters
    with pytest.raises(ValueError):
        control.port_name(1, "\u00e9" * (MAX_NAME // 2 + 1))


def test_port_name_bound_in_bytes_is_not_silly() -> None:
    # A long but legal name: the message fits Linux's control buffer.
    msg = control.port_name(1, "n" * 1000)
    assert len(msg.pack()) == HEADER.size + 1001


def test_longest_accepted_port_name_fits_the_guest_buffer() -> None:
    msg = control.port_name(1, "x" * MAX_NAME)  # accepted: at most MAX_NAME bytes
    assert len(msg.pack()) <= GUEST_CONTROL_BUFFER


@given(port=u32, cols=u16, rows=u16)
def test_resize_spec_order_cols_then_rows(port: int, cols: int, rows: int) -> None:
    msg = control.resize(port, cols, rows)
    assert msg.event is Event.RESIZE and msg.value == 0
    assert msg.pack() == raw(port, 5, 0, struct.pack("<HH", cols, rows))


@given(port=u32, cols=u16, rows=u16)
def test_resize_linux_order_rows_then_cols(port: int, cols: int, rows: int) -> None:
    msg = control.resize(port, cols, rows, rows_first=True)
    assert msg.pack() == raw(port, 5, 0, struct.pack("<HH", rows, cols))


def test_resize_orders_differ() -> None:
    a = control.resize(0, 80, 25).payload
    b = control.resize(0, 80, 25, rows_first=True).payload
    assert a == bytes([80, 0, 25, 0])
    assert b == bytes([25, 0, 80, 0])


def test_resize_out_of_range_rejected() -> None:
    with pytest.raises(struct.error):
        control.resize(0, 0x10000, 25)
