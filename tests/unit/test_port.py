"""Port (vhostser.console.port): session effects, control messages, the bounded host→guest
staging buffer, the guest write policy, counters and restore after a daemon restart.

The port is used as the device uses it: control messages go to a list, the backend is a real
RecordingBackend (or a small subclass), and the rx side is driven by `take_staged`/`consumed`.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from vhostser.backends.base import PortBackend, Session
from vhostser.backends.simple import EchoBackend, NullBackend, RecordingBackend
from vhostser.console import control
from vhostser.console.control import ControlMessage
from vhostser.console.port import DEFAULT_STAGING, Port, PortConfig, PortCounters
from vhostser.console.session import Input, Reason, State

LIMIT = 16


def make(
    *,
    backend: PortBackend | None = None,
    ready: bool = False,
    **config: object,
) -> tuple[Port, RecordingBackend, list[ControlMessage]]:
    sent: list[ControlMessage] = []
    be = backend if backend is not None else RecordingBackend()
    cfg = PortConfig(**{"id": 1, "staging_limit": LIMIT, **config})  # type: ignore[arg-type]
    port = Port(cfg, be, sent.append)
    if ready:
        port.announce()
        sent.clear()
    return port, be, sent  # type: ignore[return-value]


def to_state(port: Port, state: State) -> None:
    """Drive a fresh port (state B) into `state` with real inputs."""
    assert port.state is State.B
    path = {
        State.B: [],
        State.C: [Input.HOST_OPEN],
        State.D: [Input.GUEST_OPEN],
        State.A: [Input.HOST_OPEN, Input.GUEST_OPEN],
        State.E: [Input.GUEST_OPEN, Input.HOST_END],
    }[state]
    for inp in path:
        port.apply(inp)
    assert port.state is state


def drain(port: Port) -> bytes:
    data = bytes(port.take_staged(port.staged))
    port.consumed(len(data))
    return data


# ------------------------------------------------------------------------ basics


def test_defaults_and_binding() -> None:
    be = RecordingBackend()
    port = Port(PortConfig(3, "n"), be, [].append)
    assert be.port is port
    assert (port.id, port.name, port.state, port.session) == (3, "n", State.B, None)
    assert port.config.staging_limit == DEFAULT_STAGING == 64 * 1024
    assert port.config.guest_writes_without_host == "hold"
    assert port.next_session_id == 1
    assert not port.guest_ready
    assert repr(port) == "<Port 3 'n' B>"


def test_counters_as_dict() -> None:
    c = PortCounters()
    c.bytes_to_guest = 5
    c.discarded["stale"] += 3
    d = c.as_dict()
    assert d["bytes_to_guest"] == 5
    assert d["discarded"] == {"stale": 3}
    assert type(d["discarded"]) is dict
    assert set(d) == {
        "bytes_to_guest", "buffers_to_guest", "bytes_from_guest", "buffers_from_guest",
        "sessions_opened", "resets_seen", "redundant_events", "discarded",
    }


def test_session_carries_port_and_name() -> None:
    port, _, _ = make(name="org.x")
    port.apply(Input.GUEST_OPEN)
    assert port.session == Session(1, "org.x", 1)


# ------------------------------------------------------------------------ control messages


@pytest.mark.parametrize(
    ("console", "name", "host", "expect"),
    [
        (False, "", False, []),
        (False, "", True, ["open"]),
        (False, "n", False, ["name"]),
        (True, "", False, ["console"]),
        (True, "hvc.log", True, ["console", "name", "open"]),
        (False, "org.qemu.guest_agent.0", True, ["name", "open"]),
    ],
)
def test_announce_in_qemus_order(console: bool, name: str, host: bool, expect: list[str]) -> None:
    port, _, sent = make(console=console, name=name, id=2)
    if host:
        port.host_attach()
    assert sent == []  # nothing before the guest announced the port
    port.announce()
    assert port.guest_ready
    msgs = {
        "console": control.console_port(2),
        "name": control.port_name(2, name),
        "open": control.port_open(2, True),
    }
    assert sent == [msgs[k] for k in expect]


def test_h_changes_told_only_after_guest_ready() -> None:
    port, _, sent = make()
    port.host_attach()
    port.host_detach()
    port.host_attach()
    assert sent == []
    port.announce()
    assert sent == [control.port_open(1, True)]
    sent.clear()
    port.host_detach()
    port.host_attach()
    assert sent == [control.port_open(1, False), control.port_open(1, True)]


def test_guest_events_send_no_control() -> None:
    port, _, sent = make(ready=True)
    port.apply(Input.GUEST_OPEN)
    port.apply(Input.GUEST_OPEN)
    port.apply(Input.GUEST_CLOSE)
    assert sent == []


def test_reset_forgets_guest_ready() -> None:
    port, _, sent = make(ready=True)
    port.host_attach()
    sent.clear()
    port.apply(Input.RESET)
    assert not port.guest_ready
    port.host_detach()
    port.host_attach()
    assert sent == []  # the re-initialising guest hears H on its PORT_READY
    port.announce()
    assert sent == [control.port_open(1, True)]


def test_redundant_inputs_counted() -> None:
    port, be, _ = make()
    port.host_detach()  # B
    port.apply(Input.GUEST_CLOSE)  # B
    port.host_attach()
    port.host_attach()  # C
    assert port.counters.redundant_events == 3
    assert be.events == []


def test_state_change_pokes_queues_redundant_does_not() -> None:
    port, _, _ = make()
    pokes: list[str] = []
    port.poke_rx = lambda: pokes.append("rx")
    port.poke_tx = lambda: pokes.append("tx")
    port.apply(Input.GUEST_OPEN)
    assert pokes == ["tx", "rx"]
    pokes.clear()
    port.apply(Input.GUEST_OPEN)
    assert pokes == []


# ------------------------------------------------------------------------ staging (host→guest)


def test_send_bounded_by_staging() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    assert port.send(b"a" * 10) == 10
    assert port.send(b"b" * 10) == LIMIT - 10
    assert port.send(b"c") == 0
    assert port.staged == LIMIT
    assert drain(port) == b"a" * 10 + b"b" * 6


def test_send_memoryview_and_poke() -> None:
    port, _, _ = make()
    to_state(port, State.D)
    pokes: list[int] = []
    port.poke_rx = lambda: pokes.append(1)
    assert port.send(memoryview(b"xyz")[1:]) == 2
    assert pokes == [1]
    assert port.send(b"") == 0
    assert pokes == [1]  # nothing taken, nothing to wake
    assert drain(port) == b"yz"


@given(chunks=st.lists(st.binary(max_size=2 * LIMIT), max_size=20),
       reads=st.lists(st.integers(0, LIMIT), max_size=20))
def test_staging_is_a_bounded_fifo(chunks: list[bytes], reads: list[int]) -> None:
    port, _, _ = make()
    to_state(port, State.A)
    accepted = bytearray()
    delivered = bytearray()
    for i, chunk in enumerate(chunks):
        n = port.send(chunk)
        assert 0 <= n <= len(chunk)
        assert n == min(len(chunk), LIMIT - (len(accepted) - len(delivered)))
        accepted += chunk[:n]
        assert port.staged <= LIMIT
        if i < len(reads):
            k = min(reads[i], port.staged)
            delivered += port.take_staged(k)
            port.consumed(k)
    delivered += drain(port)
    assert delivered == accepted
    assert port.counters.bytes_to_guest == len(delivered)


def test_take_staged_does_not_consume() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    port.send(b"hello")
    assert bytes(port.take_staged(3)) == b"hel"
    assert bytes(port.take_staged(3)) == b"hel"
    assert port.staged == 5
    port.consumed(3)
    assert bytes(port.take_staged(10)) == b"lo"
    assert port.counters.bytes_to_guest == 3
    assert port.counters.buffers_to_guest == 1


async def test_wait_writable_blocks_until_consumed() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    assert port.send(b"x" * LIMIT) == LIMIT
    woke = trio.Event()

    async def waiter() -> None:
        await port.wait_writable()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        port.take_staged(1)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()  # looking is not consuming
        port.consumed(1)
        await trio.testing.wait_all_tasks_blocked()
        assert woke.is_set()
    assert port.send(b"yy") == 1


async def test_wait_writable_returns_at_once_with_room() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    port.send(b"x" * (LIMIT - 1))
    with trio.fail_after(1):
        await port.wait_writable()


async def test_send_all_waits_for_the_guest() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    payload = bytes(range(50))
    received = bytearray()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def producer() -> None:
            await port.send_all(payload)
            done.set()

        nursery.start_soon(producer)
        while not done.is_set() or port.staged:
            await trio.testing.wait_all_tasks_blocked()
            assert port.staged <= LIMIT
            k = min(5, port.staged)
            received += port.take_staged(k)
            port.consumed(k)
    assert bytes(received) == payload


async def test_session_close_wakes_a_blocked_sender() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    port.send(b"x" * LIMIT)
    woke = trio.Event()

    async def waiter() -> None:
        await port.wait_writable()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        port.apply(Input.GUEST_CLOSE)
        await trio.testing.wait_all_tasks_blocked()
        assert woke.is_set()


async def test_two_senders_both_woken() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    port.send(b"x" * LIMIT)
    woken: list[str] = []

    async def waiter(name: str) -> None:
        await port.wait_writable()
        woken.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "first")
        await trio.testing.wait_all_tasks_blocked()
        assert port.send(b"y") == 0  # a second producer (another peer) finds it full too
        nursery.start_soon(waiter, "second")
        await trio.testing.wait_all_tasks_blocked()
        port.consumed(LIMIT)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert sorted(woken) == ["first", "second"]


# ------------------------------------------------------------------------ no stale data


@pytest.mark.parametrize(
    ("end", "reason", "after"),
    [
        (Input.GUEST_CLOSE, "guest-close", State.C),
        (Input.RESET, "reset", State.C),
        (Input.HOST_END, "host-close", State.E),
        (Input.FRONTEND_GONE, "frontend-gone", State.C),
        (Input.REMOVE, "port-removed", State.B),
    ],
)
def test_queued_bytes_dropped_as_stale_at_session_end(
    end: Input, reason: str, after: State
) -> None:
    port, be, _ = make()
    to_state(port, State.A)
    port.send(b"old session")
    port.take_staged(3)  # the device looked, never delivered
    port.apply(end)
    assert port.state is after
    assert port.staged == 0
    assert port.counters.discarded["stale"] == len(b"old session")
    assert be.events[-1] == ("close", 1, reason)
    if end is Input.REMOVE:
        port.host_attach()  # a removed port is inert: nothing of this reaches anyone
        assert port.state is State.B and port.staged == 0
        return
    # the next session starts empty
    if not after.host_open:
        port.host_attach()
    if not port.state.in_session:
        if port.state is State.C:
            port.apply(Input.GUEST_OPEN)
    assert port.state is State.A and port.session is not None and port.session.id == 2
    assert port.staged == 0
    port.send(b"new")
    assert drain(port) == b"new"
    assert port.counters.bytes_to_guest == 3


def test_stale_drop_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    port, _, _ = make()
    to_state(port, State.A)
    port.send(b"12345")
    with caplog.at_level(logging.INFO, logger="vhostser.console"):
        port.apply(Input.GUEST_CLOSE)
    assert "port 1: 5 queued bytes dropped (stale)" in caplog.text


def test_host_detach_keeps_the_sessions_bytes() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    port.send(b"still mine")
    port.host_detach()  # A → D, same session
    assert port.state is State.D
    assert drain(port) == b"still mine"
    assert "stale" not in port.counters.discarded


def test_partially_delivered_then_closed_counts_only_the_rest() -> None:
    port, _, _ = make()
    to_state(port, State.A)
    port.send(b"abcdef")
    port.consumed(2)
    port.apply(Input.GUEST_CLOSE)
    assert port.counters.bytes_to_guest == 2
    assert port.counters.discarded["stale"] == 4


# ------------------------------------------------------------------------ host bytes, ¬session


@pytest.mark.parametrize(
    ("state", "reason"),
    [(State.B, "guest-closed"), (State.C, "guest-closed"), (State.E, "no-session")],
)
def test_host_bytes_without_a_session_are_counted(state: State, reason: str) -> None:
    port, _, _ = make()
    to_state(port, state)
    assert port.send(b"x" * (3 * LIMIT)) == 3 * LIMIT  # taken (dropped), never blocks
    assert port.staged == 0
    assert port.counters.discarded == {reason: 3 * LIMIT}
    assert port.counters.bytes_to_guest == 0


async def test_send_all_without_a_session_does_not_block() -> None:
    port, _, _ = make()
    to_state(port, State.C)
    with trio.fail_after(1):
        await port.send_all(b"z" * (10 * LIMIT))
    assert port.counters.discarded["guest-closed"] == 10 * LIMIT


# ------------------------------------------------------------------------ guest writes


def test_guest_bytes_in_a_delivered_and_counted() -> None:
    port, be, _ = make()
    to_state(port, State.A)
    assert port.guest_bytes(b"abc")
    assert port.guest_bytes(b"de")
    assert be.data == {1: bytearray(b"abcde")}
    assert port.counters.bytes_from_guest == 5
    assert port.counters.buffers_from_guest == 2


def test_guest_bytes_backend_refuses_then_takes() -> None:
    port, be, _ = make()
    to_state(port, State.A)
    be.accept = False
    assert not port.guest_bytes(b"abc")
    assert port.counters.bytes_from_guest == 0
    assert not port.counters.discarded
    be.accept = True
    assert port.guest_bytes(b"abc")
    assert be.data == {1: bytearray(b"abc")}
    assert port.counters.bytes_from_guest == 3


def test_guest_bytes_hold_in_d() -> None:
    port, be, _ = make(guest_writes_without_host="hold")
    to_state(port, State.D)
    assert not port.guest_may_write()
    assert not port.guest_bytes(b"held")
    assert be.data == {}
    assert not port.counters.discarded
    assert port.counters.bytes_from_guest == 0
    port.host_attach()
    assert port.guest_may_write()
    assert port.guest_bytes(b"held")
    assert be.data == {1: bytearray(b"held")}


def test_guest_bytes_discard_in_d() -> None:
    port, be, _ = make(guest_writes_without_host="discard")
    to_state(port, State.D)
    assert port.guest_may_write()
    assert port.guest_bytes(b"gone")
    assert be.data == {}
    assert port.counters.discarded["no-host"] == 4
    assert port.counters.bytes_from_guest == 0
    assert port.counters.buffers_from_guest == 0


@pytest.mark.parametrize("policy", ["hold", "discard"])
@pytest.mark.parametrize("state", [State.B, State.C, State.E])
def test_guest_bytes_without_session_dropped(state: State, policy: str) -> None:
    port, be, _ = make(guest_writes_without_host=policy)
    to_state(port, state)
    assert port.guest_may_write()
    assert port.guest_bytes(b"late")
    assert port.counters.discarded == {"no-session": 4}
    assert be.data == {}


@pytest.mark.parametrize("policy", ["hold", "discard"])
@pytest.mark.parametrize("state", [State.A, State.D])
def test_console_never_holds(state: State, policy: str) -> None:
    port, be, _ = make(console=True, guest_writes_without_host=policy)
    to_state(port, state)
    assert port.guest_may_write()
    assert port.guest_bytes(b"boot log")
    assert be.data == {1: bytearray(b"boot log")}
    assert port.counters.bytes_from_guest == 8
    be.accept = False
    assert port.guest_bytes(b"overflow")  # done with, not held
    assert port.counters.discarded["console-overflow"] == 8
    assert port.counters.bytes_from_guest == 8
    assert port.counters.buffers_from_guest == 1


@pytest.mark.parametrize("state", [State.B, State.E])
def test_console_output_outside_a_session_is_delivered(state: State) -> None:
    # hvc writes (the kernel log) before Linux sends PORT_OPEN for a console port.
    port, be, _ = make(console=True)
    to_state(port, state)
    assert port.guest_bytes(b"xx")
    assert port.counters.discarded == {}
    assert port.counters.bytes_from_guest == 2
    assert be.data == {0: bytearray(b"xx")}


def test_data_goes_to_the_session_it_was_written_in() -> None:
    port, be, _ = make()
    to_state(port, State.A)
    port.guest_bytes(b"one")
    port.apply(Input.GUEST_CLOSE)
    port.apply(Input.GUEST_OPEN)
    port.guest_bytes(b"two")
    assert be.data == {1: bytearray(b"one"), 2: bytearray(b"two")}


# ------------------------------------------------------------------------ session ids, restore


def test_first_session_id_and_counting() -> None:
    port, be, _ = make()
    port = Port(PortConfig(1), be, [].append, first_session_id=41)
    port.apply(Input.GUEST_OPEN)
    port.apply(Input.GUEST_CLOSE)
    port.apply(Input.GUEST_OPEN)
    assert be.events == [("open", 41, ""), ("close", 41, "guest-close"), ("open", 42, "")]
    assert port.next_session_id == 43
    assert port.counters.sessions_opened == 2


def test_restore_session_replays_open_and_ids_continue() -> None:
    be = RecordingBackend()
    port = Port(PortConfig(1, "qga"), be, [].append, first_session_id=8)
    port.restore_session(7)
    assert port.state is State.D
    assert port.session == Session(1, "qga", 7)
    assert be.events == [("open", 7, "")]
    assert port.counters.sessions_opened == 0  # a replay, not a new session
    port.host_attach()
    assert port.guest_bytes(b"in 7")
    port.apply(Input.GUEST_CLOSE)
    port.apply(Input.GUEST_OPEN)
    assert be.events == [("open", 7, ""), ("close", 7, "guest-close"), ("open", 8, "")]
    assert be.data == {7: bytearray(b"in 7")}


def test_restore_session_never_reuses_ids() -> None:
    # A state file whose next id lags the open session (written by an older daemon, say).
    be = RecordingBackend()
    port = Port(PortConfig(1), be, [].append, first_session_id=3)
    port.restore_session(10)
    assert port.next_session_id == 11
    port.apply(Input.RESET)
    port.apply(Input.GUEST_OPEN)
    assert be.events[-1] == ("open", 11, "")


@pytest.mark.parametrize("state", [State.A, State.C, State.D, State.E])
def test_restore_only_from_b(state: State) -> None:
    port, be, _ = make()
    to_state(port, state)
    n = len(be.events)
    with pytest.raises(ValueError, match=f"port 1: restore in state {state.name}"):
        port.restore_session(99)
    assert len(be.events) == n
    assert port.state is state


# ------------------------------------------------------------------------ with simple backends


def test_null_backend_takes_everything() -> None:
    port, _, _ = make(backend=NullBackend())
    to_state(port, State.A)
    assert port.guest_bytes(b"x" * 1000)
    assert port.counters.bytes_from_guest == 1000


async def test_echo_backend_bounded() -> None:
    port, _, sent = make(backend=EchoBackend(), ready=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.backend.run)
        await trio.testing.wait_all_tasks_blocked()
        assert port.state is State.C
        assert sent == [control.port_open(1, True)]
        port.apply(Input.GUEST_OPEN)
        assert port.guest_bytes(b"a" * 10)
        assert port.guest_bytes(b"b" * 10)  # 6 bytes fit; the backend holds the other 4
        assert port.staged == LIMIT
        assert not port.guest_bytes(b"c" * 10)  # one held write at most: the guest waits
        assert port.counters.bytes_from_guest == 20
        assert drain(port) == b"a" * 10 + b"b" * 6
        await trio.testing.wait_all_tasks_blocked()
        assert drain(port) == b"b" * 4
        assert port.guest_bytes(b"c" * 10)
        assert drain(port) == b"c" * 10
        nursery.cancel_scope.cancel()


async def test_echo_backend_resumes_only_when_its_held_bytes_are_sent() -> None:
    port, _, _ = make(backend=EchoBackend(), ready=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.backend.run)
        await trio.testing.wait_all_tasks_blocked()
        port.apply(Input.GUEST_OPEN)
        resumed: list[int] = []
        port.poke_tx = lambda: resumed.append(1)
        assert port.guest_bytes(b"a" * 10)
        assert port.guest_bytes(b"b" * 10)
        assert not port.guest_bytes(b"c" * 10)
        await trio.testing.wait_all_tasks_blocked()
        assert resumed == []  # the 4 held bytes cannot be staged yet
        drain(port)
        await trio.testing.wait_all_tasks_blocked()
        assert resumed == [1]
        nursery.cancel_scope.cancel()


async def test_echo_backend_takes_a_chain_longer_than_staging() -> None:
    port, _, _ = make(backend=EchoBackend(), ready=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.backend.run)
        await trio.testing.wait_all_tasks_blocked()
        port.apply(Input.GUEST_OPEN)
        chain = bytes(range(LIMIT + 4))
        echoed = bytearray()
        taken = False
        for _ in range(5):
            taken = port.guest_bytes(chain)
            echoed += drain(port)
            await trio.testing.wait_all_tasks_blocked()
            if taken:
                break
        echoed += drain(port)
        await trio.testing.wait_all_tasks_blocked()
        echoed += drain(port)
        nursery.cancel_scope.cancel()
    assert taken
    assert bytes(echoed) == chain


def test_backend_sees_reason_objects() -> None:
    seen: list[tuple[Session, Reason]] = []

    class Backend(RecordingBackend):
        def session_closed(self, session: Session, reason: Reason) -> None:
            seen.append((session, reason))

    port, _, _ = make(backend=Backend())
    to_state(port, State.D)
    port.apply(Input.FRONTEND_GONE)
    assert seen == [(Session(1, "", 1), Reason.FRONTEND_GONE)]
