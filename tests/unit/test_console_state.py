"""The console device's state as plain data (vhostser.console.state): after any traffic it
survives a JSON round trip unchanged, a core built on the copy goes on exactly where the
original was, and a state that does not fit is refused with a message naming what."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vhostser.backends.simple import RecordingBackend
from vhostser.console import DeviceState, PortConfig, StateError
from vhostser.console.control import Event
from vhostser.console.handshake import Announce
from vhostser.console.session import Input, State
from vhostser.testing.port_guest import PortGuest

OPS = st.lists(
    st.one_of(
        st.sampled_from(list(Input)).map(lambda i: ("input", i)),
        st.binary(min_size=1, max_size=40).map(lambda b: ("send", b)),
        st.binary(min_size=1, max_size=40).map(lambda b: ("write", b)),
        st.integers(0, 40).map(lambda n: ("read", n)),
        st.just(("set_up", None)),
    ),
    max_size=40,
)


def run(ops: list[tuple[str, Any]]) -> PortGuest:
    guest = PortGuest(RecordingBackend(), PortConfig(1, "org.test", staging_limit=64))
    do(guest, ops)
    return guest


def do(guest: PortGuest, ops: list[tuple[str, Any]]) -> None:
    for op, arg in ops:
        if guest.port.removed:
            break
        if op == "input":
            guest.apply(arg)
        elif op == "send":
            guest.port.send(arg)
        elif op == "write":
            guest.write_chain(arg)
        elif op == "read":
            guest.read(arg)
        else:
            guest.set_up()


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_round_trip_after_any_traffic(ops: list[tuple[str, Any]]) -> None:
    state = run(ops).core.state
    for port in state.ports.values():  # every byte accounted, after any traffic
        ledger = port.ledger()
        assert ledger["to_guest"]["balanced"] and ledger["from_guest"]["balanced"], ledger
    doc = state.to_dict()
    again = DeviceState.from_dict(json.loads(json.dumps(doc)))
    assert again == state
    assert again.to_dict() == doc


@settings(max_examples=100, deadline=None)
@given(OPS, OPS)
def test_a_core_on_the_copy_goes_on_alike(first: list[tuple[str, Any]],
                                          then: list[tuple[str, Any]]) -> None:
    """What a successor resumes from: the same next steps give the same state and the same
    outputs (session ids continue, staged bytes are delivered, counters go on)."""
    original = run(first)
    assume(not original.port.removed)
    saved = json.loads(json.dumps(original.core.state.to_dict()))
    twin = PortGuest(RecordingBackend(), original.port.config,
                     resume=DeviceState.from_dict(saved))
    for guest in (original, twin):
        do(guest, then)
    assert twin.core.state == original.core.state


def sample() -> dict[str, Any]:
    guest = PortGuest(RecordingBackend(), PortConfig(1, "org.test"))
    guest.reads_control = False  # a paused VM: the PORT_OPEN waits in the state
    guest.port.host_attach()
    guest.open()
    guest.port.send(b"staged")
    return guest.core.state.to_dict()


def test_the_sample_holds_what_a_successor_needs() -> None:
    doc = sample()
    port = doc["ports"]["1"]
    assert (port["session"], port["announce"], port["session_id"], port["next_session_id"]) == (
        "A", "ready", 1, 2)
    assert doc["driver_ready"] is True and doc["version"] == 1
    state = DeviceState.from_dict(doc)
    assert state.ports[1].staging.data() == b"staged"
    assert state.ports[1].session is State.A and state.ports[1].announce is Announce.READY
    assert [m.event for m in state.control_out] == [Event.PORT_OPEN]


def _broken(path: list[str | int], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(sample())
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["version"], 2, "device state version 2, this daemon resumes version 1"),
        (["max_ports"], 0, "max_ports 0 not in 1..31"),
        (["cols"], "80", "cols: expected int, got '80'"),
        (["driver_ready"], 1, "driver_ready: expected bool, got 1"),
        (["control_out"], ["AAA"], "control_out[0]: not base64"),
        (["control_out"], ["AAAA"], "control_out[0]: 3 bytes, need 8"),
        (["ports", "1", "session"], "F", "'F' is not a valid State"),
        (["ports", "1", "session_id"], None, "session A with id None"),
        (["ports", "1", "session_id"], 2, "session A with id 2 and next id 2"),
        (["ports", "1", "staging"], "!!", "staging: not base64"),
        (["ports", "1", "config", "staging_limit"], 2, "6 staged bytes over the port's limit 2"),
        (["ports", "1", "config", "guest_writes_without_host"], "keep",
         "guest_writes_without_host 'keep'"),
        (["ports", "1", "config", "id"], 3, "port 1 has id 3"),
        (["ports", "1", "counters", "bytes_to_guest"], -1, "bytes_to_guest: expected a count"),
        (["ports", "1", "counters", "bogus"], 1, "unknown counters ['bogus']"),
        (["counters", "bad_chains"], {"x": "1"}, "bad_chains: expected counts by reason"),
    ],
)
def test_a_state_that_does_not_fit_is_refused(path: list[str | int], value: Any,
                                              message: str) -> None:
    with pytest.raises(StateError) as e:
        DeviceState.from_dict(_broken(path, value))
    assert message in str(e.value)


@pytest.mark.parametrize("doc", [None, [], "state", 3])
def test_not_an_object(doc: Any) -> None:
    with pytest.raises(StateError, match="device state: expected an object"):
        DeviceState.from_dict(doc)
