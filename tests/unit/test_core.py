"""ConsoleCore (vhostser.console.core) on real split rings in byte-array guest memory, with
no trio and no fds: the sans-io core is driven exactly as the trio layer drives it
(ring_started / service / ring_stopped, outputs drained), and fuzzed with hostile rings."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vhostser.console import control
from vhostser.console.control import BAD_ID, ControlMessage, Event
from vhostser.console.core import (
    CONTROL_RX,
    CONTROL_TX,
    FEATURES,
    ConsoleCore,
    Output,
    SessionClosed,
    SessionOpened,
    Wake,
    rx_queue,
    tx_queue,
)
from vhostser.console.session import Input, State
from vhostser.console.state import DeviceState, PortConfig
from virtqueue import BytesMemory, DriverQueue, RingError, SplitQueue, ring_layout

SIZE = 16
BUF = 0x8_0000  # guest buffers from here; rings below


class Machine:
    """A core, its rings and a driver per queue; `deliver` answers from `accept`."""

    def __init__(self, max_ports: int = 2) -> None:
        self.mem = BytesMemory(((0, 1 << 20),))
        self.core = ConsoleCore(DeviceState(max_ports), self._deliver)
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
    assert m.core.state.ports[1].session in tuple(State)
