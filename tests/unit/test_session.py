"""The per-port session state machine (vhostser.console.session), alone and driving a real Port.

The table is checked as data (complete over State x Input, each step's effects consistent with
the states), then random input sequences drive a Port with a RecordingBackend and the
invariants of DESIGN.md "Ports and sessions" are checked after every step.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from vhostser.backends.simple import RecordingBackend
from vhostser.console import PortConfig, control
from vhostser.console.control import ControlMessage, Event
from vhostser.console.session import (
    TABLE,
    Effect,
    Input,
    Reason,
    SessionError,
    SessionStep,
    State,
    transition,
)
from vhostser.testing.port_guest import PortGuest

S, X = State, Effect
ALL_PAIRS = list(itertools.product(State, Input))
CLOSING_INPUTS = {
    Input.GUEST_CLOSE: Reason.GUEST_CLOSE,
    Input.RESET: Reason.RESET,
    Input.REMOVE: Reason.PORT_REMOVED,
    Input.HOST_END: Reason.HOST_CLOSE,
    Input.FRONTEND_GONE: Reason.FRONTEND_GONE,
    Input.SHUTDOWN: Reason.SHUTDOWN,
}


def pair_id(pair: tuple[State, Input]) -> str:
    return f"{pair[0].name}-{pair[1].value}"


# ------------------------------------------------------------------------ the states


def test_state_facts() -> None:
    assert {s for s in State if s.guest_open} == {S.A, S.D, S.E}
    assert {s for s in State if s.host_open} == {S.A, S.C}
    assert {s for s in State if s.in_session} == {S.A, S.D}


def test_reasons_are_designs() -> None:
    assert {r.value for r in Reason} == {
        "guest-close", "reset", "port-removed", "host-close", "frontend-gone", "shutdown",
    }


# ------------------------------------------------------------------------ the table as data


def test_table_is_complete_and_nothing_else() -> None:
    assert set(TABLE) == set(ALL_PAIRS)
    assert len(TABLE) == len(State) * len(Input)


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=pair_id)
def test_transition_returns_the_table_entry(pair: tuple[State, Input]) -> None:
    step = transition(*pair)
    assert step is TABLE[pair]
    assert isinstance(step, SessionStep)


def test_missing_pair_is_a_session_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(TABLE, (S.A, Input.RESET))
    with pytest.raises(SessionError, match="no transition from A on reset"):
        transition(S.A, Input.RESET)


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=pair_id)
def test_step_effects_are_consistent(pair: tuple[State, Input]) -> None:
    old, inp = pair
    step = TABLE[pair]
    fx = step.effects
    # No effect twice, a close carries its reason and nothing else does.
    assert len(set(fx)) == len(fx)
    assert (X.CLOSE_SESSION in fx) == (step.reason is not None)
    if X.CLOSE_SESSION in fx:
        assert step.reason is CLOSING_INPUTS[inp]
    # REDUNDANT means exactly that: nothing else, no state change.
    if X.REDUNDANT in fx:
        assert fx == (X.REDUNDANT,) and step.state is old
    # Sessions open only when none is, close only when one is.
    if X.OPEN_SESSION in fx:
        assert not old.in_session and step.state.in_session
    if X.CLOSE_SESSION in fx:
        assert old.in_session
    assert not (X.OPEN_SESSION in fx and X.CLOSE_SESSION in fx)
    # The guest hears about H exactly when H changes (port removal says DEVICE_REMOVE instead).
    assert (X.TELL_GUEST_OPEN in fx) == (not old.host_open and step.state.host_open)
    if inp is Input.REMOVE:
        assert X.TELL_GUEST_CLOSED not in fx
    else:
        assert (X.TELL_GUEST_CLOSED in fx) == (old.host_open and not step.state.host_open)
    # G changes only on the guest's own inputs, a reset, a removal or the front end going away.
    if old.guest_open != step.state.guest_open:
        assert inp in (
            Input.GUEST_OPEN, Input.GUEST_CLOSE, Input.RESET, Input.REMOVE, Input.FRONTEND_GONE
        )


def session_open_after(pair: tuple[State, Input]) -> bool:
    """Whether a session is open after the step's effects, starting from the state's fact."""
    is_open = pair[0].in_session
    for effect in TABLE[pair].effects:
        if effect is X.OPEN_SESSION:
            is_open = True
        elif effect is X.CLOSE_SESSION:
            is_open = False
    return is_open


_SHUTDOWN_IN_SESSION = [(S.A, Input.SHUTDOWN), (S.D, Input.SHUTDOWN)]


@pytest.mark.parametrize(
    "pair", [p for p in ALL_PAIRS if p not in _SHUTDOWN_IN_SESSION], ids=pair_id
)
def test_session_open_iff_state_in_a_or_d(pair: tuple[State, Input]) -> None:
    assert session_open_after(pair) == TABLE[pair].state.in_session


@pytest.mark.parametrize("pair", _SHUTDOWN_IN_SESSION, ids=pair_id)
def test_session_open_iff_state_in_a_or_d_on_shutdown(pair: tuple[State, Input]) -> None:
    assert session_open_after(pair) == TABLE[pair].state.in_session


@pytest.mark.parametrize(
    ("old", "inp", "new", "effects", "reason"),
    [
        # The guest opens / closes.
        (S.B, Input.GUEST_OPEN, S.D, (X.OPEN_SESSION,), None),
        (S.C, Input.GUEST_OPEN, S.A, (X.OPEN_SESSION,), None),
        (S.A, Input.GUEST_CLOSE, S.C, (X.CLOSE_SESSION,), Reason.GUEST_CLOSE),
        (S.D, Input.GUEST_CLOSE, S.B, (X.CLOSE_SESSION,), Reason.GUEST_CLOSE),
        # freeze/restore: Linux re-sends PORT_OPEN(1) for a port it has open
        (S.A, Input.GUEST_OPEN, S.A, (X.REDUNDANT,), None),
        (S.D, Input.GUEST_OPEN, S.D, (X.REDUNDANT,), None),
        # host peers come and go; the session goes on
        (S.D, Input.HOST_OPEN, S.A, (X.TELL_GUEST_OPEN,), None),
        (S.A, Input.HOST_CLOSE, S.D, (X.TELL_GUEST_CLOSED,), None),
        # the host ends the session: the guest learns H=0 first, then the backend the close
        (S.A, Input.HOST_END, S.E, (X.TELL_GUEST_CLOSED, X.CLOSE_SESSION), Reason.HOST_CLOSE),
        (S.D, Input.HOST_END, S.E, (X.CLOSE_SESSION,), Reason.HOST_CLOSE),
        # E + a peer attaching: a new session, never the old one
        (S.E, Input.HOST_OPEN, S.A, (X.TELL_GUEST_OPEN, X.OPEN_SESSION), None),
        (S.E, Input.GUEST_CLOSE, S.B, (), None),
        # reset keeps H, drops G, closes with reason reset
        (S.A, Input.RESET, S.C, (X.CLOSE_SESSION,), Reason.RESET),
        (S.D, Input.RESET, S.B, (X.CLOSE_SESSION,), Reason.RESET),
        (S.E, Input.RESET, S.B, (), None),
        (S.C, Input.RESET, S.C, (), None),
        # removal and the front end going away
        (S.A, Input.REMOVE, S.B, (X.CLOSE_SESSION,), Reason.PORT_REMOVED),
        (S.C, Input.REMOVE, S.B, (), None),
        (S.A, Input.FRONTEND_GONE, S.C, (X.CLOSE_SESSION,), Reason.FRONTEND_GONE),
        (S.D, Input.FRONTEND_GONE, S.B, (X.CLOSE_SESSION,), Reason.FRONTEND_GONE),
    ],
)
def test_named_transitions(
    old: State, inp: Input, new: State, effects: tuple[Effect, ...], reason: Reason | None
) -> None:
    assert transition(old, inp) == SessionStep(new, effects, reason)


# ------------------------------------------------------------------------ driving a real Port


def open_events(backend: RecordingBackend) -> list[int]:
    return [sid for kind, sid, _ in backend.events if kind == "open"]


def test_freeze_restore_port_open_is_redundant_same_session() -> None:
    backend = RecordingBackend()
    g = PortGuest(backend, PortConfig(1, "p"), ready=False)
    port = g.port
    g.set_up()
    port.host_attach()
    g.apply(Input.GUEST_OPEN)
    session = port.session
    assert session is not None and session.id == 1
    g.control.clear()
    # After restore Linux re-sends PORT_READY, then PORT_OPEN(1).
    g.set_up()
    g.apply(Input.GUEST_OPEN)
    assert port.session == session
    assert port.state is S.A
    assert port.counters.redundant_events == 1
    assert port.counters.sessions_opened == 1
    assert backend.events == [("open", 1, "")]
    assert g.control == [control.port_name(1, "p"), control.port_open(1, True)]


def test_reset_from_a_and_d_closes_with_reason_reset() -> None:
    backend = RecordingBackend()
    g = PortGuest(backend, PortConfig(1), ready=False)
    port = g.port
    g.apply(Input.GUEST_OPEN)  # D
    g.apply(Input.RESET)
    port.host_attach()
    g.apply(Input.GUEST_OPEN)  # A
    g.apply(Input.RESET)
    assert backend.events == [
        ("open", 1, ""), ("close", 1, "reset"), ("open", 2, ""), ("close", 2, "reset"),
    ]
    assert port.state is S.C
    assert port.counters.resets_seen == 2


def test_host_end_from_a_tells_guest_closed_and_closes_host_close() -> None:
    backend = RecordingBackend()
    g = PortGuest(backend, PortConfig(2))
    port = g.port
    port.host_attach()
    g.apply(Input.GUEST_OPEN)
    g.control.clear()
    port.end_session()
    assert port.state is S.E
    assert port.session is None
    assert g.control == [ControlMessage(2, Event.PORT_OPEN, 0)]
    assert backend.events[-1] == ("close", 1, "host-close")


def test_e_plus_host_open_starts_a_new_session() -> None:
    backend = RecordingBackend()
    g = PortGuest(backend, PortConfig(2))
    port = g.port
    port.host_attach()
    g.apply(Input.GUEST_OPEN)
    port.end_session()
    g.control.clear()
    port.host_attach()
    assert port.state is S.A
    assert port.session is not None and port.session.id == 2
    assert g.control == [control.port_open(2, True)]
    assert backend.events == [("open", 1, ""), ("close", 1, "host-close"), ("open", 2, "")]


@pytest.mark.parametrize("late", [Input.GUEST_CLOSE, Input.SHUTDOWN, Input.RESET, Input.HOST_END])
def test_input_after_shutdown_is_defined(late: Input) -> None:
    backend = RecordingBackend()
    g = PortGuest(backend, PortConfig(1))
    g.port.host_attach()
    g.apply(Input.GUEST_OPEN)
    g.apply(Input.SHUTDOWN)
    assert backend.events == [("open", 1, ""), ("close", 1, "shutdown")]
    g.apply(late)  # must not raise
    assert backend.events == [("open", 1, ""), ("close", 1, "shutdown")]


# ------------------------------------------------------------------------ stateful


class PortSessions(RuleBasedStateMachine):
    """Random inputs into a Port with a RecordingBackend; invariants after every step.

    `restart` is what the daemon does on SIGTERM and the next start: snapshot the state file's
    facts, SHUTDOWN, then a new Port (new backend) that restores the open session. SHUTDOWN is
    the last input a port sees (the xfails above show what happens otherwise)."""

    @initialize(first=st.integers(1, 1000), ready=st.booleans())
    def make_port(self, first: int, ready: bool) -> None:
        self.new_ids: list[int] = []  # ids of sessions opened, across restarts
        self.new_port(first, ready)

    def new_port(self, first: int, ready: bool = False) -> None:
        self.replayed = 0
        self.backend = RecordingBackend()
        self.guest = PortGuest(self.backend, PortConfig(4, "x"), ready=ready,
                               first_session_id=first)
        self.port = self.guest.port
        self.sent = self.guest.control
        self.sent.clear()

    def feed(self, inp: Input) -> None:
        port = self.port
        guest, control_ = self.guest, self.guest.control
        if port.removed:
            # A removed port is inert: a backend winding down changes nothing any more.
            before = (port.state, port.session, len(control_), len(self.backend.events))
            guest.apply(inp)
            after = (port.state, port.session, len(guest.control), len(self.backend.events))
            # A reset re-announces the ports the device has: this one is not among them.
            assert after == before
            return
        old, old_session = port.state, port.session
        old_ready = port.guest_ready
        n_sent, n_events = len(control_), len(self.backend.events)
        bad_before = guest.core.state.counters.bad_control
        if inp in (Input.GUEST_OPEN, Input.GUEST_CLOSE):
            # Raw, as the guest sends it: not setting the port up first.
            guest.control_from_guest(control.port_open(4, inp is Input.GUEST_OPEN))
        else:
            guest.apply(inp)
        sent = guest.control[n_sent:]
        if inp in (Input.GUEST_OPEN, Input.GUEST_CLOSE) and not old_ready:
            # The handshake refuses a PORT_OPEN before PORT_READY: nothing changes.
            assert guest.core.state.counters.bad_control == bad_before + 1
            assert (port.state, port.session, sent) == (old, old_session, [])
            assert self.backend.events[n_events:] == []
            return
        step = TABLE[(old, inp)]
        new = port.state
        assert new is step.state
        events = self.backend.events[n_events:]
        if inp is Input.RESET:
            # The driver that initialised the device again learns of the port again.
            assert sent[:1] == [control.device_add(4)]
            sent = sent[1:]
        if inp is Input.REMOVE and old_ready:
            # The guest set the port up: it hears that it is gone.
            assert sent[-1:] == [control.device_remove(4)]
            sent = sent[:-1]
        # OPEN only when no session was open, CLOSE only when one was; every close has a reason
        opens = [e for e in events if e[0] == "open"]
        closes = [e for e in events if e[0] == "close"]
        assert len(opens) <= 1 and len(closes) <= 1
        if opens:
            assert old_session is None and not old.in_session
            assert port.session is not None and opens[0][1] == port.session.id
            assert all(opens[0][1] > i for i in self.new_ids)
            self.new_ids.append(opens[0][1])
        if closes:
            assert old_session is not None and closes[0][1] == old_session.id
            assert step.reason is not None and closes[0][2] == step.reason.value
            assert closes[0][2] in {r.value for r in Reason}
        if old_session is not None and not closes:
            assert port.session == old_session  # the same session, no new id
        # TELL_GUEST_* only when H changes, and only to a guest that announced the port
        tells = [m for m in sent if m.event is Event.PORT_OPEN]
        assert sent == tells
        if tells:
            assert old_ready
            assert old.host_open != new.host_open
            assert tells == [control.port_open(4, new.host_open)]
        elif old_ready and inp is not Input.REMOVE:
            assert old.host_open == new.host_open
        if inp is Input.RESET:
            assert not port.guest_ready

    @rule(inp=st.sampled_from([i for i in Input if i is not Input.SHUTDOWN]))
    def apply(self, inp: Input) -> None:
        self.feed(inp)

    @rule()
    def announce(self) -> None:
        n = len(self.guest.control)
        self.guest.set_up()
        expect = [control.port_name(4, "x")]
        if self.port.state.host_open:
            expect.append(control.port_open(4, True))
        if self.port.removed:
            expect = []
        assert self.guest.control[n:] == expect

    @rule()
    def restart(self) -> None:
        port = self.port
        next_id = port.next_session_id
        session = port.session
        self.feed(Input.SHUTDOWN)
        assert port.session is None
        if session is not None:
            assert self.backend.events[-1] == ("close", session.id, "shutdown")
        self.new_port(next_id)
        if session is not None:
            self.guest.restore_session(session.id)
            self.replayed = 1
            assert self.port.state is S.D
            assert self.port.session is not None and self.port.session.id == session.id
            assert self.backend.events == [("open", session.id, "")]
        assert self.port.next_session_id == next_id

    @invariant()
    def session_open_iff_a_or_d(self) -> None:
        assert (self.port.session is not None) == (self.port.state in (S.A, S.D))

    @invariant()
    def backend_events_alternate_ids_increase(self) -> None:
        events = self.backend.events
        for i, (kind, _, reason) in enumerate(events):
            assert kind == ("open" if i % 2 == 0 else "close")
            assert (reason == "") == (kind == "open")
        for (_, s1, _), (_, s2, _) in zip(events[::2], events[1::2], strict=False):
            assert s1 == s2  # each close is the session just opened
        opened = [sid for kind, sid, _ in events if kind == "open"]
        assert all(a < b for a, b in itertools.pairwise(opened))
        assert all(i < self.port.next_session_id for i in self.new_ids)
        # a restored session is a replay, not a new one
        assert self.port.counters.sessions_opened == len(opened) - self.replayed
        if self.port.session is not None:
            assert events[-1] == ("open", self.port.session.id, "")

    @invariant()
    def facts_match_state(self) -> None:
        state = self.port.state
        assert state.guest_open == (state in (S.A, S.D, S.E))
        assert state.host_open == (state in (S.A, S.C))


PortSessions.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestPortSessions = PortSessions.TestCase
