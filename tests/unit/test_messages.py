"""The vhost-user codec: framing, payload formats and the request table (sans-io)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostser.vhost_user import messages as m
from vhostser.vhost_user.errors import FramingError, MessageError, UnknownRequestError
from virtqueue import Region

HEADER_SIZE = m.HEADER.size
WIRE_HEADER = struct.Struct("<III")

# --------------------------------------------------------------------------- helpers


def frame(wire: bytes) -> tuple[m.Header, bytes]:
    """Split one encoded message as the connection layer does: 12 header bytes, then body."""
    return m.Header.unpack(wire[:HEADER_SIZE]), wire[HEADER_SIZE:]


def decode_wire(wire: bytes, fds: tuple[int, ...] = ()) -> m.Message:
    header, body = frame(wire)
    return m.decode(header, body, fds)


REGION = Region(
    guest_phys_addr=0x10_0000, size=0x4_0000, userspace_addr=0x7F00_0000_0000, mmap_offset=0x1000
)


def example(request: m.Request) -> tuple[m.Payload, int]:
    """A valid payload for `request` and an fd count its spec accepts."""
    payload_type = m.REQUESTS[request].payload
    examples: dict[type[m.Payload], tuple[m.Payload, int]] = {
        m.Empty: (m.Empty(), 0),
        m.U64: (m.U64(1), 0),
        m.VringState: (m.VringState(1, 64), 0),
        m.VringAddr: (
            m.VringAddr(1, 0, 0x7F00_0000_1000, 0x7F00_0000_2000, 0x7F00_0000_3000, 0),
            0,
        ),
        m.VringFile: (m.VringFile(1, no_fd=False), 1),
        m.MemoryTable: (m.MemoryTable((REGION,)), 1),
        m.SingleMemoryRegion: (m.SingleMemoryRegion(REGION), 1),
        m.ConfigSpace: (m.ConfigSpace(4, 8, 0, bytes(range(8))), 0),
        m.DeviceStateTransfer: (m.DeviceStateTransfer(0, 0), 1),
    }
    payload, nfds = examples[payload_type]
    nfds = max(m.REQUESTS[request].min_fds, min(nfds, m.REQUESTS[request].max_fds))
    return payload, nfds


FAKE_FDS = tuple(range(1000, 1020))  # decode never touches fds, so numbers stand in for them

TABLE = sorted(m.REQUESTS)
FIXED_SIZE = [r for r in TABLE if m.REQUESTS[r].payload.SIZE is not None]
NOT_IN_TABLE = [r for r in m.Request if r not in m.REQUESTS]

# --------------------------------------------------------------------------- header


def test_header_unpacks_fields() -> None:
    h = m.Header.unpack(WIRE_HEADER.pack(8, 0x1 | m.FLAG_NEED_REPLY, 8))
    assert h == m.Header(8, 0x9, 8)
    assert h.need_reply


def test_header_without_need_reply() -> None:
    assert not m.Header.unpack(WIRE_HEADER.pack(8, 0x1, 8)).need_reply


@pytest.mark.parametrize("version", [0, 2, 3])
def test_header_rejects_other_versions(version: int) -> None:
    with pytest.raises(FramingError, match="version bits"):
        m.Header.unpack(WIRE_HEADER.pack(1, version | m.FLAG_NEED_REPLY, 0))


def test_header_version_ignores_higher_flag_bits() -> None:
    # Only the two low bits are the version; REPLY/NEED_REPLY and others do not affect it.
    h = m.Header.unpack(WIRE_HEADER.pack(1, 0xFFFF_FFF1 & ~0x2, 0))
    assert h.flags & m.FLAG_VERSION_MASK == 1


def test_header_payload_size_bound() -> None:
    assert m.Header.unpack(WIRE_HEADER.pack(25, 1, m.MAX_PAYLOAD_SIZE)).size == m.MAX_PAYLOAD_SIZE
    with pytest.raises(FramingError, match=r"SET_CONFIG.*4097"):
        m.Header.unpack(WIRE_HEADER.pack(25, 1, m.MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(FramingError):
        m.Header.unpack(WIRE_HEADER.pack(1, 1, 0xFFFF_FFFF))


def test_encode_adds_version_and_size() -> None:
    wire = m.encode(m.Request.SET_VRING_NUM, m.VringState(2, 256), flags=m.FLAG_NEED_REPLY)
    assert wire == struct.pack("<IIIII", 8, 0x9, 8, 2, 256)


def test_encode_reply_sets_reply_flag() -> None:
    wire = m.encode_reply(m.Request.GET_FEATURES, m.U64(0x1_4000_0000))
    assert wire == struct.pack("<IIIQ", 1, 0x5, 8, 0x1_4000_0000)


def test_encode_raw_bytes_body() -> None:
    assert m.encode(99, b"abc") == struct.pack("<III", 99, 1, 3) + b"abc"


def test_request_name() -> None:
    assert m.request_name(9) == "SET_VRING_ADDR"
    assert m.request_name(99) == "request 99"


def test_protocol_feature_bits_match_the_spec() -> None:
    # Spot checks against docs/interop/vhost-user.rst; a shifted enum would break QEMU.
    assert m.ProtocolFeature.REPLY_ACK == 1 << 3
    assert m.ProtocolFeature.CONFIG == 1 << 9
    assert m.ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15
    assert m.ProtocolFeature.STATUS == 1 << 16
    assert m.F_PROTOCOL_FEATURES == 1 << 30
    assert m.Request.GET_STATUS == 40 and m.Request.ADD_MEM_REG == 37


# --------------------------------------------------------------------------- request table


@pytest.mark.parametrize("request_", TABLE, ids=lambda r: r.name)
def test_every_request_decodes_its_example(request_: m.Request) -> None:
    payload, nfds = example(request_)
    msg = decode_wire(m.encode(request_, payload, flags=m.FLAG_NEED_REPLY), FAKE_FDS[:nfds])
    assert msg == m.Message(request_, 0x9, payload, FAKE_FDS[:nfds])
    assert msg.need_reply
    assert msg.spec is m.REQUESTS[request_]


WRONG_SIZES = [
    (r, n) for r in FIXED_SIZE for n in {0, 1, 7, 9, 12, 39, 41, 64} - {m.REQUESTS[r].payload.SIZE}
]


@pytest.mark.parametrize(("request_", "length"), WRONG_SIZES, ids=lambda v: str(v))
def test_fixed_size_bodies_are_exact(request_: m.Request, length: int) -> None:
    payload, nfds = example(request_)
    body = (payload.pack() + bytes(64))[:length]
    with pytest.raises(MessageError, match=f"{request_.name}: body is {length} bytes"):
        decode_wire(m.encode(request_, body), FAKE_FDS[:nfds])


@pytest.mark.parametrize("request_", TABLE, ids=lambda r: r.name)
def test_more_fds_than_allowed(request_: m.Request) -> None:
    payload, _ = example(request_)
    spec = m.REQUESTS[request_]
    if request_ is m.Request.SET_MEM_TABLE:
        # Even a full table cannot bring a ninth fd.
        payload = m.MemoryTable((REGION,) * m.MAX_MEM_REGIONS)
    too_many = FAKE_FDS[: spec.max_fds + 1]
    with pytest.raises(MessageError, match=f"{request_.name}: carries {len(too_many)} fds"):
        decode_wire(m.encode(request_, payload), too_many)


@pytest.mark.parametrize(
    "request_", [r for r in TABLE if m.REQUESTS[r].min_fds], ids=lambda r: r.name
)
def test_fewer_fds_than_required(request_: m.Request) -> None:
    payload, _ = example(request_)
    with pytest.raises(MessageError, match=f"{request_.name}: carries 0 fds"):
        decode_wire(m.encode(request_, payload), ())


def test_fd_bounds_of_the_table() -> None:
    # The exact surface: which requests may carry fds at all, and how many.
    with_fds = {r: (s.min_fds, s.max_fds) for r, s in m.REQUESTS.items() if s.max_fds}
    R = m.Request
    assert with_fds == {
        R.SET_MEM_TABLE: (0, 8),
        R.SET_VRING_KICK: (0, 1),
        R.SET_VRING_CALL: (0, 1),
        R.SET_VRING_ERR: (0, 1),
        R.SET_BACKEND_REQ_FD: (1, 1),
        R.ADD_MEM_REG: (1, 1),
        R.REM_MEM_REG: (0, 1),
        R.SET_DEVICE_STATE_FD: (1, 1),
    }


def test_rem_mem_reg_with_or_without_fd() -> None:
    wire = m.encode(m.Request.REM_MEM_REG, m.SingleMemoryRegion(REGION))
    assert decode_wire(wire, ()).fds == ()
    assert decode_wire(wire, (7,)).fds == (7,)


@pytest.mark.parametrize("request_", TABLE, ids=lambda r: r.name)
def test_reply_flag_from_the_front_end_is_rejected(request_: m.Request) -> None:
    payload, nfds = example(request_)
    with pytest.raises(MessageError, match="flagged as a reply"):
        decode_wire(m.encode(request_, payload, flags=m.FLAG_REPLY), FAKE_FDS[:nfds])


@pytest.mark.parametrize("code", [0, 44, 99, 0xFFFF_FFFF])
def test_unknown_codes(code: int) -> None:
    with pytest.raises(UnknownRequestError) as e:
        decode_wire(m.encode(code, b""), ())
    assert e.value.code == code
    assert isinstance(e.value, MessageError)


@pytest.mark.parametrize("request_", NOT_IN_TABLE, ids=lambda r: r.name)
def test_known_but_unsupported_requests_are_unknown(request_: m.Request) -> None:
    # e.g. SET_LOG_BASE (6) comes with an fd and a 16-byte body.
    with pytest.raises(UnknownRequestError) as e:
        decode_wire(m.encode(request_, bytes(16)), FAKE_FDS[:1])
    assert e.value.code == request_


def test_decode_never_closes_fds() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(MessageError):
            decode_wire(m.encode(m.Request.SET_OWNER, b""), (r, w))
        with pytest.raises(UnknownRequestError):
            decode_wire(m.encode(99, b""), (r, w))
        os.fstat(r)
        os.fstat(w)
    finally:
        os.close(r)
        os.close(w)


# --------------------------------------------------------------------------- memory tables


@pytest.mark.parametrize("nregions", [0, 1, 2, 8])
def test_memory_table_round_trip(nregions: int) -> None:
    regions = tuple(
        Region(0x1000_0000 * i, 0x1000 * (i + 1), 0x7F00_0000_0000 + 0x1000_0000 * i, 0x10 * i)
        for i in range(nregions)
    )
    msg = decode_wire(
        m.encode(m.Request.SET_MEM_TABLE, m.MemoryTable(regions)), FAKE_FDS[:nregions]
    )
    assert msg.payload == m.MemoryTable(regions)
    assert msg.fds == FAKE_FDS[:nregions]


@pytest.mark.parametrize(("nregions", "nfds"), [(2, 1), (1, 2), (1, 0), (0, 1), (3, 8)])
def test_memory_table_region_count_must_match_fds(nregions: int, nfds: int) -> None:
    table = m.MemoryTable((REGION,) * nregions)
    with pytest.raises(MessageError, match=f"{nregions} regions but {nfds} fds"):
        decode_wire(m.encode(m.Request.SET_MEM_TABLE, table), FAKE_FDS[:nfds])


def test_memory_table_too_many_regions() -> None:
    body = struct.pack("<II", 9, 0) + bytes(32 * 9)
    with pytest.raises(MessageError, match="9 regions, at most 8"):
        decode_wire(m.encode(m.Request.SET_MEM_TABLE, body), FAKE_FDS[:8])


@pytest.mark.parametrize("extra", [-1, 1, -32, 32])
def test_memory_table_length_must_match_region_count(extra: int) -> None:
    body = m.MemoryTable((REGION, REGION)).pack()
    body = body[:extra] if extra < 0 else body + bytes(extra)
    with pytest.raises(MessageError, match="SET_MEM_TABLE: memory table of 2 regions"):
        decode_wire(m.encode(m.Request.SET_MEM_TABLE, body), FAKE_FDS[:2])


@pytest.mark.parametrize("length", [0, 4, 7])
def test_memory_table_shorter_than_its_head(length: int) -> None:
    with pytest.raises(MessageError, match="need at least 8"):
        decode_wire(m.encode(m.Request.SET_MEM_TABLE, bytes(length)), ())


def test_single_memory_region_ignores_padding() -> None:
    body = struct.pack("<QQQQQ", 0xDEAD, 1, 2, 3, 4)
    msg = decode_wire(m.encode(m.Request.ADD_MEM_REG, body), (5,))
    assert msg.payload == m.SingleMemoryRegion(Region(1, 2, 3, 4))
    assert m.SingleMemoryRegion(Region(1, 2, 3, 4)).pack() == struct.pack("<QQQQQ", 0, 1, 2, 3, 4)


# --------------------------------------------------------------------------- vring files


@pytest.mark.parametrize(
    "request_",
    [m.Request.SET_VRING_KICK, m.Request.SET_VRING_CALL, m.Request.SET_VRING_ERR],
    ids=lambda r: r.name,
)
def test_vring_file_no_fd_bit_against_fds(request_: m.Request) -> None:
    with_fd = m.encode(request_, m.U64(3))
    without_fd = m.encode(request_, m.U64(3 | m.VRING_NOFD_MASK))
    assert decode_wire(with_fd, (9,)).payload == m.VringFile(3, no_fd=False)
    assert decode_wire(without_fd, ()).payload == m.VringFile(3, no_fd=True)
    with pytest.raises(MessageError, match="no-fd bit is 0 but 0 fds"):
        decode_wire(with_fd, ())
    with pytest.raises(MessageError, match="no-fd bit is 1 but 1 fds"):
        decode_wire(without_fd, (9,))


@pytest.mark.parametrize("word", [1 << 9, 1 << 63, 0x200 | 0x100, 0xFFFF_FFFF])
def test_vring_file_unknown_bits(word: int) -> None:
    with pytest.raises(MessageError, match=r"SET_VRING_CALL: vring file word .* unknown bits"):
        decode_wire(m.encode(m.Request.SET_VRING_CALL, m.U64(word)), ())


def test_vring_file_wire_format() -> None:
    assert m.VringFile(0xFF, no_fd=True).pack() == struct.pack("<Q", 0x1FF)
    assert m.VringFile(2, no_fd=False).pack() == struct.pack("<Q", 2)


# --------------------------------------------------------------------------- config space


@pytest.mark.parametrize("request_", [m.Request.GET_CONFIG, m.Request.SET_CONFIG])
@pytest.mark.parametrize(("offset", "size"), [(0, 0), (0, 256), (252, 4), (256, 0), (100, 20)])
def test_config_space_in_bounds(request_: m.Request, offset: int, size: int) -> None:
    payload = m.ConfigSpace(offset, size, 1, bytes(range(size)))
    assert decode_wire(m.encode(request_, payload)).payload == payload


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 257), (253, 4), (256, 1), (1, 256), (0xFFFF_FFFF, 1), (0xFFFF_FFFF, 0), (4, 0xFFFF_FFFF)],
)
def test_config_space_out_of_bounds(offset: int, size: int) -> None:
    body = struct.pack("<III", offset, size, 0) + bytes(min(size, 300))
    with pytest.raises(MessageError, match=r"GET_CONFIG: config range .* exceeds 256"):
        decode_wire(m.encode(m.Request.GET_CONFIG, body))


@pytest.mark.parametrize("data_len", [0, 3, 5, 256])
def test_config_space_body_must_match_size(data_len: int) -> None:
    body = struct.pack("<III", 0, 4, 0) + bytes(data_len)
    with pytest.raises(MessageError, match=f"SET_CONFIG: config body is {12 + data_len} bytes"):
        decode_wire(m.encode(m.Request.SET_CONFIG, body))


@pytest.mark.parametrize("length", [0, 8, 11])
def test_config_space_shorter_than_its_head(length: int) -> None:
    with pytest.raises(MessageError, match="need at least 12"):
        decode_wire(m.encode(m.Request.SET_CONFIG, bytes(length)))


# --------------------------------------------------------------------------- properties

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(Region, u64, u64, u64, u64)


@st.composite
def config_spaces(draw: st.DrawFn) -> m.ConfigSpace:
    size = draw(st.integers(0, m.MAX_CONFIG_SIZE))
    offset = draw(st.integers(0, m.MAX_CONFIG_SIZE - size))
    return m.ConfigSpace(offset, size, draw(u32), draw(st.binary(min_size=size, max_size=size)))


PAYLOADS: dict[type[m.Payload], st.SearchStrategy[m.Payload]] = {
    m.Empty: st.just(m.Empty()),
    m.U64: st.builds(m.U64, u64),
    m.VringState: st.builds(m.VringState, u32, u32),
    m.VringAddr: st.builds(m.VringAddr, u32, u32, u64, u64, u64, u64),
    m.VringFile: st.builds(m.VringFile, st.integers(0, 255), st.booleans()),
    m.MemoryTable: st.builds(m.MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    m.SingleMemoryRegion: st.builds(m.SingleMemoryRegion, regions),
    m.ConfigSpace: config_spaces(),
    m.DeviceStateTransfer: st.builds(m.DeviceStateTransfer, u32, u32),
}


def test_every_payload_type_has_a_strategy() -> None:
    used = {spec.payload for spec in m.REQUESTS.values()}
    assert used <= PAYLOADS.keys()


def fds_for(request: m.Request, payload: m.Payload, extra: bool) -> tuple[int, ...]:
    spec = m.REQUESTS[request]
    if isinstance(payload, m.MemoryTable):
        return FAKE_FDS[: len(payload.regions)]
    if isinstance(payload, m.VringFile):
        return () if payload.no_fd else FAKE_FDS[:1]
    return FAKE_FDS[: spec.max_fds if extra else spec.min_fds]


@st.composite
def valid_messages(draw: st.DrawFn) -> tuple[m.Request, int, m.Payload, tuple[int, ...]]:
    request = draw(st.sampled_from(TABLE))
    payload = draw(PAYLOADS[m.REQUESTS[request].payload])
    flags = draw(st.sampled_from([0, m.FLAG_NEED_REPLY]))
    return request, flags, payload, fds_for(request, payload, draw(st.booleans()))


@given(valid_messages())
def test_round_trip_through_the_wire(
    case: tuple[m.Request, int, m.Payload, tuple[int, ...]],
) -> None:
    request, flags, payload, fds = case
    wire = m.encode(request, payload, flags=flags)
    header, body = frame(wire)
    assert header == m.Header(request, m.FLAG_VERSION | flags, len(body))
    msg = m.decode(header, body, fds)
    assert msg == m.Message(request, m.FLAG_VERSION | flags, payload, fds)
    # And the payload alone, both ways.
    assert type(payload).unpack(payload.pack()) == payload
    assert type(payload).unpack(body).pack() == body


@given(st.sampled_from(list(PAYLOADS)).flatmap(lambda t: PAYLOADS[t]))
def test_reply_round_trip(payload: m.Payload) -> None:
    header, body = frame(m.encode_reply(40, payload))
    assert header.flags == m.FLAG_VERSION | m.FLAG_REPLY
    assert header.size == len(body)
    assert type(payload).unpack(body) == payload


EXPECTED = (FramingError, MessageError)  # UnknownRequestError is a MessageError


def decode_or_reject(head: bytes, body: bytes, fds: tuple[int, ...]) -> None:
    try:
        header = m.Header.unpack(head)
        msg = m.decode(header, body, fds)
    except EXPECTED:
        return
    # Anything that got through is a well-formed request within its spec.
    spec = m.REQUESTS[msg.request]
    assert msg.fds == fds
    assert spec.min_fds <= len(fds) <= spec.max_fds
    assert not msg.flags & m.FLAG_REPLY
    assert header.size <= m.MAX_PAYLOAD_SIZE
    assert isinstance(msg.payload, spec.payload)
    if spec.payload.SIZE is not None:
        assert len(body) == spec.payload.SIZE
    assert type(msg.payload).unpack(msg.payload.pack()) == msg.payload


codes = st.one_of(st.sampled_from([int(r) for r in m.Request]), u32)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    code=codes,
    flags=st.one_of(u32, st.sampled_from([1, 5, 9, 0xD])),
    size=st.one_of(u32, st.integers(0, 5000)),
    body=st.one_of(st.binary(max_size=300), st.integers(0, 300).map(bytes)),
    nfds=st.integers(0, 10),
)
def test_random_input_only_raises_protocol_errors(
    code: int, flags: int, size: int, body: bytes, nfds: int
) -> None:
    decode_or_reject(WIRE_HEADER.pack(code, flags, size), body, FAKE_FDS[:nfds])


@settings(max_examples=400)
@given(
    valid_messages(),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    st.integers(-16, 16),
    st.integers(-2, 2),
)
def test_mutated_messages_only_raise_protocol_errors(
    case: tuple[m.Request, int, m.Payload, tuple[int, ...]],
    flips: list[tuple[int, int]],
    grow: int,
    fd_delta: int,
) -> None:
    request, flags, payload, fds = case
    wire = bytearray(m.encode(request, payload, flags=flags))
    for pos, value in flips:
        wire[pos % len(wire)] = value
    wire = wire[: len(wire) + grow] if grow < 0 else wire + bytes(grow)
    if len(wire) < HEADER_SIZE:
        wire += bytes(HEADER_SIZE - len(wire))
    nfds = max(0, len(fds) + fd_delta)
    decode_or_reject(bytes(wire[:HEADER_SIZE]), bytes(wire[HEADER_SIZE:]), FAKE_FDS[:nfds])
