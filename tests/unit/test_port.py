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

from vhostser.backends.simple import EchoBackend, NullBackend, RecordingBackend
from vhostser.console import (
    DEFAULT_STAGING,
    Port,
    PortBackend,
    PortConfig,
    PortCounters,
    Session,
    control,
)
from vhostser.console.session import Input, Reason, State
from vhostser.testing.port_guest import PortGuest

LIMIT = 16


def make(
    *,
    backend: PortBackend | None = None,
    ready: bool = False,
    first_session_id: int = 1,
    **config: object,
) -> tuple[Port, RecordingBackend, PortGuest]:
    """A port as the device has it; the guest has not set it up unless `ready`."""
    be = backend if backend is not None else RecordingBackend()
    cfg = PortConfig(**{"id": 1, "staging_limit": LIMIT, **config})  # type: ignore[arg-type]
    g = PortGuest(be, cfg, ready=ready, first_session_id=first_session_id)
    return g.port, be, g  # type: ignore[return-value]


def to_state(g: PortGuest, state: State) -> None:
    """Drive a fresh port (state B) into `state` with real inputs."""
    assert g.state is State.B
    path = {
        State.B: [],
        State.C: [Input.HOST_OPEN],
        State.D: [Input.GUEST_OPEN],
        State.A: [Input.HOST_OPEN, Input.GUEST_OPEN],
        State.E: [Input.GUEST_OPEN, Input.HOST_END],
    }[state]
    if not g.port.guest_ready and state.guest_open:
        g.set_up()  # the guest opens only ports it set up
    for inp in path:
        g.apply(inp)
    assert g.state is state


def drain(g: PortGuest) -> bytes:
    return g.read()


# ------------------------------------------------------------------------ basics


def test_defaults_and_binding() -> None:
    be = RecordingBackend()
    port = PortGuest(be, PortConfig(3, "n"), ready=False).port
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
        "sessions_opened", "resets_seen", "redundant_events", "backend_failures", "discarded",
        "bytes_from_host", "bytes_guest_wrote", "dropped_to_guest", "dropped_from_guest",
        "dropped_to_guest_total", "dropped_from_guest_total",
    }
    c.drop("to_guest", "stale", 2)
    c.drop("from_guest", "no-host", 1)
    d = c.as_dict()
    assert d["discarded"] == {"stale": 5, "no-host": 1}
    assert (d["dropped_to_guest"], d["dropped_from_guest"]) == ({"stale": 2}, {"no-host": 1})


def test_session_carries_port_and_name() -> None:
    port, _, g = make(name="org.x")
    g.apply(Input.GUEST_OPEN)
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
    port, _, g = make(console=console, name=name, id=2)
    if host:
        port.host_attach()
    assert g.control == []  # nothing before the guest announced the port
    g.set_up()
    assert port.guest_ready
    msgs = {
        "console": control.console_port(2),
        "name": control.port_name(2, name),
        "open": control.port_open(2, True),
    }
    assert g.control == [msgs[k] for k in expect]


def test_h_changes_told_only_after_guest_ready() -> None:
    port, _, g = make()
    port.host_attach()
    port.host_detach()
    port.host_attach()
    assert g.control == []
    g.set_up()
    assert g.control == [control.port_open(1, True)]
    g.control.clear()
    port.host_detach()
    port.host_attach()
    assert g.control == [control.port_open(1, False), control.port_open(1, True)]


def test_h_flaps_the_guest_has_not_read_collapse_into_the_final_value() -> None:
    """A paused VM reads no control message while peers come and go: the queue holds one
    PORT_OPEN for the port, with the latest H, and never overflows."""
    port, _, g = make(ready=True, name="p")
    g.reads_control = False
    for _ in range(10_000):
        port.host_attach()
        port.host_detach()
    assert list(g.core.state.control_out) == [control.port_open(1, False)]
    port.host_attach()
    assert list(g.core.state.control_out) == [control.port_open(1, True)]
    assert g.core.state.counters.control_overflow == 0
    assert g.control == [control.port_open(1, True)]  # what the guest reads on resume
    # Once the guest took it, the next change is a message of its own.
    port.host_detach()
    port.host_attach()
    port.host_detach()
    assert list(g.core.state.control_out) == [control.port_open(1, False)]


def test_a_collapsed_port_open_keeps_its_place_among_the_ports_messages() -> None:
    port, _, g = make(name="p")
    g.reads_control = False
    port.host_attach()
    g.set_up()  # the announcement: PORT_NAME, then PORT_OPEN(1)
    other = control.port_open(2, True)
    g.core.state.control_out.append(other)  # a message of another port after them
    port.host_detach()
    assert list(g.core.state.control_out) == [
        control.port_name(1, "p"), control.port_open(1, False), other
    ]


def test_guest_events_send_no_control() -> None:
    _, _, g = make(ready=True)
    g.apply(Input.GUEST_OPEN)
    g.apply(Input.GUEST_OPEN)
    g.apply(Input.GUEST_CLOSE)
    assert g.control == []


def test_reset_forgets_guest_ready() -> None:
    port, _, g = make(ready=True)
    port.host_attach()
    g.control.clear()
    g.apply(Input.RESET)
    assert not port.guest_ready
    assert g.control == [control.device_add(1)]  # the driver learns of the port again
    g.control.clear()
    port.host_detach()
    port.host_attach()
    assert g.control == []  # the re-initialising guest hears H on its PORT_READY
    g.set_up()
    assert g.control == [control.port_open(1, True)]


def test_redundant_inputs_counted() -> None:
    port, be, g = make(ready=True)
    port.host_detach()  # B
    g.apply(Input.GUEST_CLOSE)  # B
    port.host_attach()
    port.host_attach()  # C
    assert port.counters.redundant_events == 3
    assert be.events == []


def test_state_change_pokes_queues_redundant_does_not() -> None:
    _, _, g = make(ready=True)
    g.apply(Input.GUEST_OPEN)
    assert g.pokes == {"tx": 1, "rx": 1}
    g.apply(Input.GUEST_OPEN)
    assert g.pokes == {"tx": 1, "rx": 1}


# ------------------------------------------------------------------------ staging (host→guest)


def test_send_bounded_by_staging() -> None:
    port, _, g = make()
    to_state(g, State.A)
    assert port.send(b"a" * 10) == 10
    assert port.send(b"b" * 10) == LIMIT - 10
    assert port.send(b"c") == 0
    assert port.staged == LIMIT
    assert drain(g) == b"a" * 10 + b"b" * 6


def test_send_memoryview_and_poke() -> None:
    port, _, g = make()
    to_state(g, State.D)
    before = g.pokes["rx"]
    assert port.send(memoryview(b"xyz")[1:]) == 2
    assert g.pokes["rx"] == before + 1
    assert port.send(b"") == 0
    assert g.pokes["rx"] == before + 1  # nothing taken, nothing to wake
    assert drain(g) == b"yz"


@given(chunks=st.lists(st.binary(max_size=2 * LIMIT), max_size=20),
       reads=st.lists(st.integers(0, LIMIT), max_size=20))
def test_staging_is_a_bounded_fifo(chunks: list[bytes], reads: list[int]) -> None:
    port, _, g = make()
    to_state(g, State.A)
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
            delivered += g.core.take_staged(g.id, k)
            g.consume(k)
    delivered += drain(g)
    assert delivered == accepted
    assert port.counters.bytes_to_guest == len(delivered)


def test_take_staged_does_not_consume() -> None:
    port, _, g = make()
    to_state(g, State.A)
    port.send(b"hello")
    assert bytes(g.core.take_staged(g.id, 3)) == b"hel"
    assert bytes(g.core.take_staged(g.id, 3)) == b"hel"
    assert port.staged == 5
    g.consume(3)
    assert bytes(g.core.take_staged(g.id, 10)) == b"lo"
    assert port.counters.bytes_to_guest == 3
    assert port.counters.buffers_to_guest == 1


async def test_wait_writable_blocks_until_consumed() -> None:
    port, _, g = make()
    to_state(g, State.A)
    assert port.send(b"x" * LIMIT) == LIMIT
    woke = trio.Event()

    async def waiter() -> None:
        await port.wait_writable()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        g.core.take_staged(g.id, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()  # looking is not consuming
        g.consume(1)
        await trio.testing.wait_all_tasks_blocked()
        assert woke.is_set()
    assert port.send(b"yy") == 1


async def test_wait_writable_returns_at_once_with_room() -> None:
    port, _, g = make()
    to_state(g, State.A)
    port.send(b"x" * (LIMIT - 1))
    with trio.fail_after(1):
        await port.wait_writable()


async def test_send_all_waits_for_the_guest() -> None:
    port, _, g = make()
    to_state(g, State.A)
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
            received += g.core.take_staged(g.id, k)
            g.consume(k)
    assert bytes(received) == payload


async def test_session_close_wakes_a_blocked_sender() -> None:
    port, _, g = make()
    to_state(g, State.A)
    port.send(b"x" * LIMIT)
    woke = trio.Event()

    async def waiter() -> None:
        await port.wait_writable()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        g.apply(Input.GUEST_CLOSE)
        await trio.testing.wait_all_tasks_blocked()
        assert woke.is_set()


async def test_two_senders_both_woken() -> None:
    port, _, g = make()
    to_state(g, State.A)
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
        g.consume(LIMIT)
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
    port, be, g = make()
    to_state(g, State.A)
    port.send(b"old session")
    g.core.take_staged(g.id, 3)  # the device looked, never delivered
    g.apply(end)
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
            g.apply(Input.GUEST_OPEN)
    assert port.state is State.A and port.session is not None and port.session.id == 2
    assert port.staged == 0
    port.send(b"new")
    assert drain(g) == b"new"
    assert port.counters.bytes_to_guest == 3


def test_stale_drop_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    port, _, g = make()
    to_state(g, State.A)
    port.send(b"12345")
    with caplog.at_level(logging.INFO, logger="vhostser.console"):
        g.apply(Input.GUEST_CLOSE)
    assert "port 1: 5 queued bytes dropped (stale)" in caplog.text


def test_host_detach_keeps_the_sessions_bytes() -> None:
    port, _, g = make()
    to_state(g, State.A)
    port.send(b"still mine")
    port.host_detach()  # A → D, same session
    assert port.state is State.D
    assert drain(g) == b"still mine"
    assert "stale" not in port.counters.discarded


def test_partially_delivered_then_closed_counts_only_the_rest() -> None:
    port, _, g = make()
    to_state(g, State.A)
    port.send(b"abcdef")
    g.consume(2)
    g.apply(Input.GUEST_CLOSE)
    assert port.counters.bytes_to_guest == 2
    assert port.counters.discarded["stale"] == 4


# ------------------------------------------------------------------------ host bytes, ¬session


@pytest.mark.parametrize(
    ("state", "reason"),
    [(State.B, "guest-closed"), (State.C, "guest-closed"), (State.E, "no-session")],
)
def test_host_bytes_without_a_session_are_counted(state: State, reason: str) -> None:
    port, _, g = make()
    to_state(g, state)
    assert port.send(b"x" * (3 * LIMIT)) == 3 * LIMIT  # taken (dropped), never blocks
    assert port.staged == 0
    assert port.counters.discarded == {reason: 3 * LIMIT}
    assert port.counters.bytes_to_guest == 0


async def test_send_all_without_a_session_does_not_block() -> None:
    port, _, g = make()
    to_state(g, State.C)
    with trio.fail_after(1):
        await port.send_all(b"z" * (10 * LIMIT))
    assert port.counters.discarded["guest-closed"] == 10 * LIMIT


# ------------------------------------------------------------------------ guest writes


def test_guest_bytes_in_a_delivered_and_counted() -> None:
    port, be, g = make()
    to_state(g, State.A)
    assert g.write_chain(b"abc")
    assert g.write_chain(b"de")
    assert be.data == {1: bytearray(b"abcde")}
    assert port.counters.bytes_from_guest == 5
    assert port.counters.buffers_from_guest == 2


def test_guest_bytes_backend_refuses_then_takes() -> None:
    port, be, g = make()
    to_state(g, State.A)
    be.accept = False
    assert not g.write_chain(b"abc")
    assert port.counters.bytes_from_guest == 0
    assert not port.counters.discarded
    be.accept = True
    assert g.write_chain(b"abc")
    assert be.data == {1: bytearray(b"abc")}
    assert port.counters.bytes_from_guest == 3


def test_guest_bytes_hold_in_d() -> None:
    port, be, g = make(guest_writes_without_host="hold")
    to_state(g, State.D)
    assert not g.core.guest_may_write(g.id)
    assert not g.write_chain(b"held")
    assert be.data == {}
    assert not port.counters.discarded
    assert port.counters.bytes_from_guest == 0
    port.host_attach()
    assert g.core.guest_may_write(g.id)
    assert g.write_chain(b"held")
    assert be.data == {1: bytearray(b"held")}


def test_guest_bytes_discard_in_d() -> None:
    port, be, g = make(guest_writes_without_host="discard")
    to_state(g, State.D)
    assert g.core.guest_may_write(g.id)
    assert g.write_chain(b"gone")
    assert be.data == {}
    assert port.counters.discarded["no-host"] == 4
    assert port.counters.bytes_from_guest == 0
    assert port.counters.buffers_from_guest == 0


@pytest.mark.parametrize("policy", ["hold", "discard"])
@pytest.mark.parametrize("state", [State.B, State.C, State.E])
def test_guest_bytes_without_session_dropped(state: State, policy: str) -> None:
    port, be, g = make(guest_writes_without_host=policy)
    to_state(g, state)
    assert g.core.guest_may_write(g.id)
    assert g.write_chain(b"late")
    assert port.counters.discarded == {"no-session": 4}
    assert be.data == {}


@pytest.mark.parametrize("policy", ["hold", "discard"])
@pytest.mark.parametrize("state", [State.A, State.D])
def test_console_never_holds(state: State, policy: str) -> None:
    port, be, g = make(console=True, guest_writes_without_host=policy)
    to_state(g, state)
    assert g.core.guest_may_write(g.id)
    assert g.write_chain(b"boot log")
    assert be.data == {1: bytearray(b"boot log")}
    assert port.counters.bytes_from_guest == 8
    be.accept = False
    assert g.write_chain(b"overflow")  # done with, not held
    assert port.counters.discarded["console-overflow"] == 8
    assert port.counters.bytes_from_guest == 8
    assert port.counters.buffers_from_guest == 1


@pytest.mark.parametrize("state", [State.B, State.E])
def test_console_output_outside_a_session_is_delivered(state: State) -> None:
    # hvc writes (the kernel log) before Linux sends PORT_OPEN for a console port.
    port, be, g = make(console=True)
    to_state(g, state)
    assert g.write_chain(b"xx")
    assert port.counters.discarded == {}
    assert port.counters.bytes_from_guest == 2
    assert be.data == {0: bytearray(b"xx")}


def test_data_goes_to_the_session_it_was_written_in() -> None:
    _, be, g = make()
    to_state(g, State.A)
    g.write_chain(b"one")
    g.apply(Input.GUEST_CLOSE)
    g.apply(Input.GUEST_OPEN)
    g.write_chain(b"two")
    assert be.data == {1: bytearray(b"one"), 2: bytearray(b"two")}


# ------------------------------------------------------------------------ session ids, restore


def test_first_session_id_and_counting() -> None:
    port, be, g = make(ready=True, first_session_id=41)
    g.apply(Input.GUEST_OPEN)
    g.apply(Input.GUEST_CLOSE)
    g.apply(Input.GUEST_OPEN)
    assert be.events == [("open", 41, ""), ("close", 41, "guest-close"), ("open", 42, "")]
    assert port.next_session_id == 43
    assert port.counters.sessions_opened == 2


def test_restore_session_replays_open_and_ids_continue() -> None:
    port, be, g = make(ready=True, name="qga", first_session_id=8)
    g.restore_session(7)
    assert port.state is State.D
    assert port.session == Session(1, "qga", 7)
    assert be.events == [("open", 7, "")]
    assert port.counters.sessions_opened == 0  # a replay, not a new session
    port.host_attach()
    assert g.write_chain(b"in 7")
    g.apply(Input.GUEST_CLOSE)
    g.apply(Input.GUEST_OPEN)
    assert be.events == [("open", 7, ""), ("close", 7, "guest-close"), ("open", 8, "")]
    assert be.data == {7: bytearray(b"in 7")}


def test_restore_session_never_reuses_ids() -> None:
    # A state file whose next id lags the open session (written by an older daemon, say).
    port, be, g = make(ready=True, first_session_id=3)
    g.restore_session(10)
    assert port.next_session_id == 11
    g.apply(Input.RESET)
    g.apply(Input.GUEST_OPEN)
    assert be.events[-1] == ("open", 11, "")


@pytest.mark.parametrize("state", [State.A, State.C, State.D, State.E])
def test_restore_only_from_b(state: State) -> None:
    port, be, g = make()
    to_state(g, state)
    n = len(be.events)
    with pytest.raises(ValueError, match=f"port 1: restore in state {state.name}"):
        g.restore_session(99)
    assert len(be.events) == n
    assert port.state is state


# ------------------------------------------------------------------------ with simple backends


def test_null_backend_takes_everything() -> None:
    port, _, g = make(backend=NullBackend())
    to_state(g, State.A)
    assert g.write_chain(b"x" * 1000)
    assert port.counters.bytes_from_guest == 1000


async def test_echo_backend_bounded() -> None:
    port, _, g = make(backend=EchoBackend(), ready=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.backend.run)
        await trio.testing.wait_all_tasks_blocked()
        assert port.state is State.C
        assert g.control == [control.port_open(1, True)]
        g.apply(Input.GUEST_OPEN)
        assert g.write_chain(b"a" * 10)
        # 6 bytes of room: the write waits whole (no part of it is held only in the process,
        # where a crash would lose it).
        assert not g.write_chain(b"b" * 10)
        assert port.staged == 10
        assert port.counters.bytes_from_guest == 10
        assert drain(g) == b"a" * 10
        await trio.testing.wait_all_tasks_blocked()
        assert g.write_chain(b"b" * 10)
        assert drain(g) == b"b" * 10
        assert g.write_chain(b"c" * 10)
        assert drain(g) == b"c" * 10
        nursery.cancel_scope.cancel()


async def test_echo_backend_resumes_only_when_the_refused_write_fits() -> None:
    port, _, g = make(backend=EchoBackend(), ready=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.backend.run)
        await trio.testing.wait_all_tasks_blocked()
        g.apply(Input.GUEST_OPEN)
        before = g.pokes["tx"]
        assert g.write_chain(b"a" * 10)
        assert not g.write_chain(b"b" * 10)
        await trio.testing.wait_all_tasks_blocked()
        assert g.pokes["tx"] == before  # 6 bytes of room, 10 needed
        g.read(3)
        await trio.testing.wait_all_tasks_blocked()
        assert g.pokes["tx"] == before  # 9: still not
        g.read(1)
        await trio.testing.wait_all_tasks_blocked()
        assert g.pokes["tx"] == before + 1  # 10: the guest may write again
        nursery.cancel_scope.cancel()


async def test_echo_backend_takes_a_chain_longer_than_staging() -> None:
    port, _, g = make(backend=EchoBackend(), ready=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.backend.run)
        await trio.testing.wait_all_tasks_blocked()
        g.apply(Input.GUEST_OPEN)
        chain = bytes(range(LIMIT + 4))
        echoed = bytearray()
        taken = False
        for _ in range(5):
            taken = g.write_chain(chain)
            echoed += drain(g)
            await trio.testing.wait_all_tasks_blocked()
            if taken:
                break
        echoed += drain(g)
        await trio.testing.wait_all_tasks_blocked()
        echoed += drain(g)
        nursery.cancel_scope.cancel()
    assert taken
    assert bytes(echoed) == chain


def test_backend_sees_reason_objects() -> None:
    seen: list[tuple[Session, Reason]] = []

    class Backend(RecordingBackend):
        def session_closed(self, session: Session, reason: Reason) -> None:
            seen.append((session, reason))

    _, _, g = make(backend=Backend())
    to_state(g, State.D)
    g.apply(Input.FRONTEND_GONE)
    assert seen == [(Session(1, "", 1), Reason.FRONTEND_GONE)]
