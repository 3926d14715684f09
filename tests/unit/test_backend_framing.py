"""The framed wire protocol (sans-io): round trips, any chunking, malformed input."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostser.backends import framing
from vhostser.backends.framing import (
    MAX_DATA,
    MAX_FRAME,
    Close,
    Data,
    FrameDecoder,
    FrameError,
    Open,
    encode,
    encode_data,
)
from vhostser.testing.hostile import MALFORMED_FRAMES

session_ids = st.integers(min_value=0, max_value=2**64 - 1)
texts = st.text(max_size=40)
frames = st.one_of(
    st.builds(Open, session_ids, texts),
    st.builds(Data, session_ids, st.binary(max_size=300)),
    st.builds(Close, session_ids, texts),
)


def decode_all(wire: bytes, cuts: list[int]) -> list[Open | Data | Close]:
    decoder = FrameDecoder(accept_open=True)
    out: list[Open | Data | Close] = []
    start = 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        decoder.feed(wire[start:cut])
        out.extend(decoder)
        start = max(start, cut)
    assert decoder.buffered == 0
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=12), st.lists(st.integers(min_value=0), max_size=8))
def test_frames_round_trip_through_any_chunking(
    sent: list[Open | Data | Close], cuts: list[int]
) -> None:
    wire = b"".join(encode(f) for f in sent)
    assert decode_all(wire, cuts) == sent


@settings(max_examples=50, deadline=None)
@given(session_ids, st.binary(max_size=5000))
def test_encode_data_splits_nothing_it_should_not(session: int, data: bytes) -> None:
    got = decode_all(b"".join(encode_data(session, data)), [])
    assert all(isinstance(f, Data) and f.session == session for f in got)
    assert b"".join(f.data for f in got if isinstance(f, Data)) == data
    assert len(got) == (1 if data else 0)


def test_encode_data_splits_at_the_frame_limit() -> None:
    data = bytes(range(256)) * ((MAX_DATA * 2 + 10) // 256 + 1)
    wire = list(encode_data(3, data))
    assert len(wire) == 3 and all(len(w) <= 4 + MAX_FRAME for w in wire)
    assert len(wire[0]) == 4 + MAX_FRAME
    got = decode_all(b"".join(wire), [5, 1 << 20, 3 << 20])
    assert b"".join(f.data for f in got if isinstance(f, Data)) == data


def test_the_docstring_example_is_the_wire_format() -> None:
    doc = framing.__doc__
    assert doc is not None
    lines = re.findall(r"^ {4}((?:[0-9a-f]{2} )+[0-9a-f]{2})$", doc, re.MULTILINE)
    assert [bytes.fromhex(line) for line in lines] == [
        encode(Open(7, "org.example.0")),
        encode(Data(7, b"hi")),
        encode(Close(7, "guest-close")),
    ]


@pytest.mark.parametrize(("wire", "message"), MALFORMED_FRAMES)
def test_malformed_frames_are_errors_for_good(wire: bytes, message: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(wire)
    with pytest.raises(FrameError, match=message):
        decoder.next_frame()
    with pytest.raises(FrameError):  # the decoder stays broken
        decoder.feed(encode(Data(1, b"fine")))


def test_a_bad_length_is_refused_before_its_body_arrives() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff")  # would be 4 GiB: never buffered
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_partial_frames_wait_for_more() -> None:
    decoder = FrameDecoder()
    wire = encode(Data(9, b"abc"))
    for i in range(len(wire) - 1):
        decoder.feed(wire[i : i + 1])
        assert decoder.next_frame() is None
    decoder.feed(wire[-1:])
    assert decoder.next_frame() == Data(9, b"abc")


def test_oversized_frames_are_not_encoded() -> None:
    with pytest.raises(ValueError):
        encode(Data(1, bytes(MAX_DATA + 1)))
