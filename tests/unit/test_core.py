"""ConsoleCore (vhostser.console.core) on real split rings in byte-array guest memory, with
no trio and no fds: the sans-io core is driven exactly as the trio layer drives it
(ring_started / service / ring_stopped, outputs drained), and fuzzed with hostile rings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostser.console import control
from vhostser.console.control import BAD_ID, ControlMessage, Event
from vhostser.console.core import (
    CONTROL_RX,
    CONTROL_TX,
    FEATURES,
    MAX_CONTROL_CHAIN_BYTES,
    MAX_TX_CHAIN_BYTES,
    ConsoleCore,
    Output,
    RingBroken,
    SessionClosed,
    SessionOpened,
    Wake,
    rx_queue,
    tx_queue,
)
from vhostser.console.session import Input, State
from vhostser.console.state import DeviceState, PortConfig
from virtqueue import BytesMemory, Chain, DriverQueue, RingError, SplitQueue, ring_layout

SIZE = 16
BUF = 0x8_0000  # guest buffers from here; rings below


class Machine:
    """A core, its rings and a driver per queue; `deliver` answers from `accept`."""

    def __init__(self, max_ports: int = 2, clock: Callable[[], float] = time.monotonic) -> None:
        self.mem = BytesMemory(((0, 1 << 20),))
        self.core = ConsoleCore(DeviceState(max_ports), self._deliver, clock=clock)
        self.core.features_acked(FEATURES)
        self.accept = True
        self.delivered: list[tuple[int, bytes]] = []
        self.outputs: list[Output] = []
        self.rings: dict[int, SplitQueue] = {}
        self.drivers: dict[int, DriverQueue] = {}
        self._next_buf = BUF
        _, avail, used, total = ring_layout(SIZE)
        for index in range(self.core.num_queues):
            base = index * ((total + 0xFFF) & ~0xFFF)
            self.drivers[index] = DriverQueue(self.mem, SIZE, base, base + avail, base + used)
            self.rings[index] = SplitQueue(self.mem, SIZE, base, base + avail, base + used)

    def _deliver(self, port_id: int, data: bytes) -> bool:
        if self.accept:
            self.delivered.append((port_id, data))
        return self.accept

    def start(self, *indexes: int) -> None:
        for index in indexes or range(self.core.num_queues):
            self.core.ring_started(index, self.rings[index])
        self.drain_outputs()

    def drain_outputs(self) -> list[Output]:
        out = self.core.outputs()
        self.outputs += out
        return out

    def buffer(self, data: bytes = b"", size: int = 0) -> int:
        gpa = self._next_buf
        self._next_buf += max(len(data), size, 1)
        self.mem.view(gpa, len(data))[:] = data
        return gpa

    def guest_sends(self, msg: ControlMessage) -> None:
        data = msg.pack()
        self.drivers[CONTROL_TX].add([(self.buffer(data), len(data))])
        self.serve(CONTROL_TX)

    def guest_writes(self, port_id: int, data: bytes) -> int:
        return self.drivers[tx_queue(port_id)].add([(self.buffer(data), len(data))])

    def guest_posts(self, index: int, size: int = 4096) -> int:
        gpa = self.buffer(size=size)
        return self.drivers[index].add([], [(gpa, size)])

    def serve(self, index: int) -> bool:
        wants = self.core.service(index)
        self.drain_outputs()
        return wants

    def used(self, index: int) -> list[tuple[int, int]]:
        out = []
        while (u := self.drivers[index].get_used()) is not None:
            out.append(u)
        return out

    def up(self, port_id: int) -> None:
        """Driver up, the port set up and opened by the guest."""
        self.guest_sends(ControlMessage(BAD_ID, Event.DEVICE_READY, 1))
        self.guest_sends(ControlMessage(port_id, Event.PORT_READY, 1))
        self.guest_sends(control.port_open(port_id, True))


def test_control_messages_go_into_posted_buffers_in_order() -> None:
    m = Machine()
    m.core.add_port(PortConfig(1, "org.test"))
    m.start()
    m.guest_sends(ControlMessage(BAD_ID, Event.DEVICE_READY, 1))
    assert [o for o in m.outputs if isinstance(o, Wake)] == [Wake(CONTROL_RX)]
    assert m.serve(CONTROL_RX) is True  # no buffer posted yet: it wants a kick
    heads = [m.guest_posts(CONTROL_RX, 64) for _ in range(2)]
    assert m.serve(CONTROL_RX) is False  # nothing more to send
    used = m.used(CONTROL_RX)
    assert [h for h, _ in used] == heads[:1]  # DEVICE_ADD took one buffer
    assert used[0][1] == 8 and m.core.state.ports[1].announce.value == "added"
    m.guest_sends(ControlMessage(1, Event.PORT_READY, 1))
    m.serve(CONTROL_RX)
    (head, n), = m.used(CONTROL_RX)
    assert (head, n) == (heads[1], 8 + len(b"org.test\0"))


def test_guest_bytes_reach_the_backend_and_the_chain_is_completed() -> None:
    m = Machine()
    m.core.add_port(PortConfig(1))
    m.start()
    m.up(1)
    m.core.host_event(1, Input.HOST_OPEN)
    head = m.guest_writes(1, b"hello")
    m.serve(tx_queue(1))
    assert m.delivered == [(1, b"hello")]
    assert m.used(tx_queue(1)) == [(head, 0)]
    assert any(isinstance(o, SessionOpened) for o in m.outputs)


def test_a_held_chain_is_given_back_at_a_stop_and_taken_once_after() -> None:
    m = Machine()
    m.core.add_port(PortConfig(1))
    m.start()
    m.up(1)
    m.core.host_event(1, Input.HOST_OPEN)
    m.accept = False
    first = m.guest_writes(1, b"held")
    m.guest_writes(1, b"next")
    assert m.serve(tx_queue(1)) is False
    assert m.core.held_ports == [1] and m.used(tx_queue(1)) == []
    ring = m.rings[tx_queue(1)]
    assert ring.next_avail == 1
    m.core.ring_stopped(tx_queue(1))
    assert ring.next_avail == 0 and m.core.held_ports == []
    m.accept = True
    m.core.ring_started(tx_queue(1), ring)
    m.serve(tx_queue(1))
    assert m.delivered == [(1, b"held"), (1, b"next")]
    assert m.used(tx_queue(1))[0][0] == first


def test_host_bytes_fill_posted_rx_buffers() -> None:
    m = Machine()
    m.core.add_port(PortConfig(1, staging_limit=4096))
    m.start()
    m.up(1)
    assert m.core.host_send(1, b"x" * 5000) == 4096
    assert m.core.staging_room(1) == 0
    heads = [m.guest_posts(rx_queue(1), 1000) for _ in range(2)]
    m.serve(rx_queue(1))
    assert m.used(rx_queue(1)) == [(heads[0], 1000), (heads[1], 1000)]
    assert m.core.staging_room(1) == 2000
    assert m.core.state.ports[1].counters.bytes_to_guest == 2000


def test_a_guest_close_drops_what_it_left_in_the_ring() -> None:
    m = Machine()
    m.core.add_port(PortConfig(1))
    m.start()
    m.up(1)  # no host peer: the guest's writes are held in the ring (policy hold)
    m.guest_writes(1, b"unsent")
    m.serve(tx_queue(1))
    assert m.used(tx_queue(1)) == []
    m.guest_sends(control.port_open(1, False))
    assert [u[1] for u in m.used(tx_queue(1))] == [0]
    assert m.core.state.ports[1].counters.discarded["stale"] == 6
    closed = [o for o in m.outputs if isinstance(o, SessionClosed)]
    assert [c.reason.value for c in closed] == ["guest-close"]
    assert m.delivered == []


# ------------------------------------------------------------------------ hostile rings


def _descriptor(m: Machine, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
    driver = m.drivers[index]
    head = driver._free.pop()
    driver.write_desc(head, addr, length, flags, nxt)
    driver._in_flight[head] = [head]
    driver.publish(head)


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("desc"), st.integers(0, 5), st.integers(0, 1 << 21),
                  st.integers(0, 1 << 17), st.integers(0, 7), st.integers(0, 40)),
        st.tuples(st.just("write"), st.binary(max_size=64)),
        st.tuples(st.just("control"), st.binary(max_size=16)),
        st.tuples(st.just("post"), st.sampled_from([0, 2, 4])),
        st.tuples(st.just("host"), st.binary(max_size=64)),
        st.tuples(st.just("event"), st.sampled_from([Input.HOST_OPEN, Input.HOST_CLOSE,
                                                     Input.HOST_END])),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ACTIONS)
def test_no_ring_or_message_breaks_the_core(actions: list[Any]) -> None:
    """Whatever the guest puts in its rings: the core raises nothing but RingError (for a
    ring it cannot trust any more), its state stays serializable, and port 1 keeps working."""
    m = Machine()
    m.core.add_port(PortConfig(1))
    m.start()
    m.up(1)
    broken: set[int] = set()
    for action in actions:
        kind = action[0]
        index = 0
        try:
            if kind == "desc":
                _, index, addr, length, flags, nxt = action
                if not m.drivers[index]._free:
                    continue
                _descriptor(m, index, addr, length, flags, nxt)
            elif kind == "write":
                index = tx_queue(1)
                m.guest_writes(1, action[1] or b"?")
            elif kind == "control":
                index = CONTROL_TX
                data = action[1] or b"?"
                m.drivers[index].add([(m.buffer(data), len(data))])
            elif kind == "post":
                index = action[1]
                m.guest_posts(index, 64)
            elif kind == "host":
                m.core.host_send(1, action[1])
                continue
            else:
                m.core.host_event(1, action[1])
                m.drain_outputs()
                continue
        except Exception:  # the driver side refusing (ring full): not the device's business
            continue
        if index in broken:
            continue
        try:
            m.serve(index)
        except RingError:
            broken.add(index)
        DeviceState.from_dict(m.core.state.to_dict())
        ledger = m.core.state.ports[1].ledger()
        assert ledger["to_guest"]["balanced"] and ledger["from_guest"]["balanced"], ledger
    assert m.core.state.ports[1].session in tuple(State)


# ------------------------------------------------------------------------ bounded work


def _aliased_chain(m: Machine, index: int, pieces: int, piece: int) -> int:
    """A chain of `pieces` descriptors (one indirect table) all naming the same `piece`
    bytes of guest memory: pieces * piece bytes for the walker, `piece` bytes of RAM."""
    buf = m.buffer(b"A" * piece)
    table = m.buffer(size=16 * pieces)
    return m.drivers[index].add([(buf, piece)] * pieces, indirect_table=table)


def _no_copy(self: Chain) -> bytes:
    raise AssertionError("an over-long chain was copied")


def test_an_over_long_tx_chain_is_completed_unread_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = Machine()
    m.core.add_port(PortConfig(1))
    m.start()
    m.up(1)
    m.core.host_event(1, Input.HOST_OPEN)
    head = _aliased_chain(m, tx_queue(1), 2048, 4096)  # 8 MiB for the walker
    monkeypatch.setattr(Chain, "read", _no_copy)
    m.serve(tx_queue(1))
    monkeypatch.undo()
    assert m.used(tx_queue(1)) == [(head, 0)] and m.delivered == []
    assert m.core.state.counters.bad_chains == {"tx-too-long": 1}
    assert m.core.state.ports[1].counters.discarded == {"too-long": 2048 * 4096}
    assert any("tx chain" in r.getMessage() and f"{2048 * 4096} bytes" in r.getMessage()
               for r in caplog.records)
    # The port goes on: the next chain is delivered.
    m.guest_writes(1, b"after")
    m.serve(tx_queue(1))
    assert m.delivered == [(1, b"after")]


def test_a_tx_chain_of_the_bound_is_delivered() -> None:
    m = Machine()
    m.core.add_port(PortConfig(1))
    m.start()
    m.up(1)
    m.core.host_event(1, Input.HOST_OPEN)
    _aliased_chain(m, tx_queue(1), MAX_TX_CHAIN_BYTES // 4096, 4096)
    m.serve(tx_queue(1))
    assert m.delivered == [(1, b"A" * MAX_TX_CHAIN_BYTES)]
    assert m.core.state.counters.bad_chains == {}


def test_an_over_long_chain_on_a_missing_port_is_counted_uncopied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = Machine()
    m.start()
    head = _aliased_chain(m, tx_queue(1), 1024, 4096)
    monkeypatch.setattr(Chain, "read", _no_copy)
    m.serve(tx_queue(1))
    assert m.used(tx_queue(1)) == [(head, 0)]
    assert m.core.state.counters.bytes_on_missing_ports == 1024 * 4096


def test_an_over_long_control_chain_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine()
    m.core.add_port(PortConfig(1))
    m.start()
    head = _aliased_chain(m, CONTROL_TX, 2, MAX_CONTROL_CHAIN_BYTES // 2 + 1)
    monkeypatch.setattr(Chain, "read", _no_copy)
    m.serve(CONTROL_TX)
    monkeypatch.undo()
    assert m.used(CONTROL_TX) == [(head, 0)]
    assert m.core.state.counters.bad_chains == {"control-tx-too-long": 1}
    assert m.core.state.counters.control_from_guest == 0
    m.up(1)  # the control queue goes on
    assert m.core.state.ports[1].session is State.D


# ------------------------------------------------------------------------ containment


def _break(m: Machine, index: int) -> None:
    """The guest claims more chains than its ring holds: the ring cannot be trusted."""
    m.drivers[index].set_avail_idx(SIZE + 1)


def _two_open_ports() -> Machine:
    m = Machine(max_ports=3)
    for port_id in (1, 2):
        m.core.add_port(PortConfig(port_id))
    m.start()
    m.guest_sends(ControlMessage(BAD_ID, Event.DEVICE_READY, 1))
    for port_id in (1, 2):
        m.guest_sends(ControlMessage(port_id, Event.PORT_READY, 1))
        m.guest_sends(control.port_open(port_id, True))
        m.core.host_event(port_id, Input.HOST_OPEN)
        assert m.core.state.ports[port_id].session is State.A
    m.drain_outputs()
    return m


def test_a_broken_port_ring_is_that_ports_alone(caplog: pytest.LogCaptureFixture) -> None:
    m = _two_open_ports()
    _break(m, tx_queue(1))
    with pytest.raises(RingError) as info:
        m.serve(tx_queue(1))
    assert m.core.ring_broken(tx_queue(1), str(info.value)) is False
    assert m.drain_outputs() == [RingBroken(tx_queue(1))]
    assert m.core.state.counters.rings_broken == 1
    (line,) = [r.getMessage() for r in caplog.records if "broken by the guest" in r.getMessage()]
    assert f"vring {tx_queue(1)} (port 1)" in line and "avail idx" in line
    # Neither of its queues is served any more; reported again, it is not counted again.
    assert m.serve(tx_queue(1)) is False and m.serve(rx_queue(1)) is False
    assert m.core.ring_broken(rx_queue(1), "again") is False
    assert m.core.state.counters.rings_broken == 1
    # Port 2 and the control queue go on.
    m.guest_writes(2, b"port 2")
    m.serve(tx_queue(2))
    assert m.delivered == [(2, b"port 2")]
    m.guest_sends(control.port_open(2, False))
    assert m.core.state.ports[2].session is State.C
    # The port's ring set up anew (a reset, a new SET_VRING_ADDR) is served again.
    m.drivers[tx_queue(1)].set_avail_idx(0)
    m.rings[tx_queue(1)] = fresh = SplitQueue(m.mem, SIZE, *_ring_addrs(tx_queue(1)))
    m.core.ring_started(tx_queue(1), fresh)
    m.guest_writes(1, b"again")
    m.serve(tx_queue(1))
    assert m.delivered[-1] == (1, b"again")


def _ring_addrs(index: int) -> tuple[int, int, int]:
    """Where Machine lays out ring `index`."""
    _, avail, used, total = ring_layout(SIZE)
    base = index * ((total + 0xFFF) & ~0xFFF)
    return base, base + avail, base + used


def test_a_port_ring_broken_under_the_control_queue_stays_the_ports() -> None:
    """The guest closes port 1, whose tx ring it broke: the close flushes that ring from the
    control queue's service, which must go on (the bug: the control ring stopped)."""
    m = _two_open_ports()
    m.guest_writes(1, b"before")
    _break(m, tx_queue(1))
    m.guest_sends(control.port_open(1, False))  # raises nothing: the control queue lives
    assert m.core.state.ports[1].session is State.C
    assert RingBroken(tx_queue(1)) in m.outputs
    assert m.core.state.counters.rings_broken == 1
    m.guest_sends(control.port_open(2, False))
    assert m.core.state.ports[2].session is State.C


def test_a_broken_control_ring_is_the_devices() -> None:
    m = _two_open_ports()
    for index in (CONTROL_RX, CONTROL_TX):
        assert m.core.ring_broken(index, "avail idx jumped") is True
    assert m.drain_outputs() == [] and m.core.state.counters.rings_broken == 0


# ------------------------------------------------------------------------ rate-limited lines


def test_a_flood_of_bad_control_messages_logs_a_few_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "vhostser")
    now = [0.0]
    m = Machine(clock=lambda: now[0])
    m.start()
    for _ in range(SIZE * 8):
        m.drivers[CONTROL_TX].add([(m.buffer(b"bad"), 3)])
        m.serve(CONTROL_TX)
        m.used(CONTROL_TX)
    assert m.core.state.counters.bad_control == SIZE * 8
    lines = [r.getMessage() for r in caplog.records if "bad control message" in r.getMessage()]
    assert len(lines) == 10
    now[0] += 60
    caplog.clear()
    m.drivers[CONTROL_TX].add([(m.buffer(b"bad"), 3)])
    m.serve(CONTROL_TX)
    assert [r.getMessage() for r in caplog.records] == [
        f"bad control messages: {SIZE * 8 - 10} similar messages suppressed in 60 s",
        f"vring {CONTROL_TX}: bad control message ignored: control message of 3 bytes, need 8",
    ]
