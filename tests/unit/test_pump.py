"""The pump (virtqueue.pump, pump.c) through real mechanisms: memfd guest memory, a
DriverQueue guest kicking and waiting on eventfds, unix socketpairs and TCP loopback pairs.
The pure-Python device path (SplitQueue + socket) is the reference it must match."""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostser.testing.pump_guest import (
    DATA,
    Guest,
    GuestQueue,
    guest_receive,
    guest_send,
    py_g2h,
    py_h2g,
    random_layout,
)
from virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, ChainError, RingError, SplitQueue
from virtqueue.pump import LaneStop, Pump

SockPair = Callable[[], tuple[socket.socket, socket.socket]]


def unix_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def pump() -> Iterator[Pump]:
    with Pump() as p:
        yield p


@pytest.fixture(params=["unix", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    dev, peer = (unix_pair if request.param == "unix" else tcp_pair)()
    yield dev, peer
    dev.close()
    peer.close()


class Reader(threading.Thread):
    """The host peer reading until `n` bytes came, `pause` seconds after each recv."""

    def __init__(self, sock: socket.socket, n: int, chunk: int = 1 << 16, pause: float = 0.0):
        super().__init__(daemon=True)
        self.sock, self.n, self.chunk, self.pause = sock, n, chunk, pause
        self.data = bytearray()
        self.go = threading.Event()
        self.go.set()

    def run(self) -> None:
        while len(self.data) < self.n:
            self.go.wait()
            b = self.sock.recv(self.chunk)
            if not b:
                return
            self.data += b
            if self.pause:
                time.sleep(self.pause)


def drain_calls(q: GuestQueue) -> int:
    try:
        q.calls += os.eventfd_read(q.call)
    except BlockingIOError:
        pass
    return q.calls


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.002)


def wait_stopped(pump: Pump) -> list[tuple[int, LaneStop]]:
    r, _, _ = select.select([pump.notify_fd], [], [], 10)
    assert r, "notify_fd never became readable"
    return pump.stopped()


# ---------------------------------------------------------------- byte-exact both ways

@pytest.mark.parametrize("event_idx", [False, True])
def test_g2h_moves_every_byte(guest: Guest, pump: Pump, pair: tuple[socket.socket, socket.socket],
                              event_idx: bool) -> None:
    dev, peer = pair
    q = guest.queue(event_idx=event_idx)
    data = random.Random(1).randbytes(3 << 20)
    reader = Reader(peer, len(data))
    reader.start()
    pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
    guest_send(q, data, random_layout(random.Random(2)))
    reader.join(10)
    assert reader.data == data
    st = pump.detach(0)
    c = st.counters
    assert c.bytes == len(data)
    # Every call the pump made reached the guest, and the guest never waited in vain.
    assert drain_calls(q) == c.calls > 0
    assert st.stop is None and st.offset == 0
    assert q.dev.next_avail == q.dev.next_used == st.next_used == c.chains % 65536


@pytest.mark.parametrize("event_idx", [False, True])
def test_h2g_moves_every_byte(guest: Guest, pump: Pump, pair: tuple[socket.socket, socket.socket],
                              event_idx: bool) -> None:
    dev, peer = pair
    q = guest.queue(event_idx=event_idx)
    data = random.Random(3).randbytes(3 << 20)
    writer = threading.Thread(target=peer.sendall, args=(data,), daemon=True)
    writer.start()
    pump.attach_h2g(0, q.dev, q.kick, q.call, dev.fileno())
    got = guest_receive(q, len(data), random_layout(random.Random(4)))
    writer.join(10)
    assert got == data
    st = pump.detach(0)
    c = st.counters
    assert c.bytes == len(data) and drain_calls(q) == c.calls > 0
    # The chain held for more data went back: the ring is at the last completed one.
    assert st.stop is None and st.next_avail == st.next_used == c.chains % 65536


def test_both_directions_of_one_socket_and_many_lanes(guest: Guest, pump: Pump) -> None:
    pairs = [unix_pair(), tcp_pair()]
    try:
        lanes = []
        for k, (dev, peer) in enumerate(pairs):
            tx, rx = guest.queue(areas=8), guest.queue(areas=8, event_idx=True)
            pump.attach_g2h(2 * k, tx.dev, tx.kick, tx.call, dev.fileno())
            pump.attach_h2g(2 * k + 1, rx.dev, rx.kick, rx.call, dev.fileno())
            lanes.append((tx, rx, peer))
        for k, (tx, rx, peer) in enumerate(lanes):
            data = random.Random(k).randbytes(256 << 10)
            reader = Reader(peer, len(data))
            reader.start()
            writer = threading.Thread(target=peer.sendall, args=(data[::-1],), daemon=True)
            writer.start()
            guest_send(tx, data, random_layout(random.Random(k + 10)))
            assert guest_receive(rx, len(data), random_layout(random.Random(k + 20))) \
                == data[::-1]
            reader.join(10)
            writer.join(10)
            assert reader.data == data
    finally:
        for dev, peer in pairs:
            dev.close()
            peer.close()


def test_partial_writes_to_a_slow_reader(guest: Guest, pump: Pump,
                                         pair: tuple[socket.socket, socket.socket]) -> None:
    dev, peer = pair
    dev.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    q = guest.queue(areas=4, area_size=0x8000)
    data = random.Random(5).randbytes(1 << 20)
    reader = Reader(peer, len(data), chunk=3000, pause=0.0005)
    reader.start()
    pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
    guest_send(q, data, lambda: ([0x3000, 0x5000], False))
    reader.join(20)
    assert reader.data == data
    # Chains larger than the socket buffer can only have gone out in pieces.
    assert pump.counters(0).wakeups > pump.counters(0).kicks


# ---------------------------------------------------------------- notifications

@pytest.mark.parametrize("event_idx", [False, True])
def test_calls_only_when_asked(guest: Guest, pump: Pump, event_idx: bool) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        q = guest.queue(event_idx=event_idx, areas=32)
        pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())

        def batch(n: int, total: int) -> None:
            for _ in range(n):
                q.add([10], write=False, payload=b"0123456789")
            q.kick_if_wanted()
            wait_for(lambda: pump.counters(0).chains == total, "chains completed")
            assert len(peer.recv(1 << 16)) > 0
            q.reap()

        # Without EVENT_IDX NO_INTERRUPT silences the device; with it, used_event (0 after
        # ring set-up) asks for one call when the first batch crosses it, and no more.
        q.drv.disable_interrupts()
        batch(10, 10)
        batch(10, 20)
        time.sleep(0.05)  # a spurious call would be written by now
        assert drain_calls(q) == (1 if event_idx else 0)
        # Asked again: exactly one call for the next completion.
        assert not q.drv.enable_interrupts()
        batch(1, 21)
        st = pump.detach(0)
        assert drain_calls(q) == st.counters.calls == (2 if event_idx else 1)


def test_idle_lanes_do_not_wake(guest: Guest, pump: Pump) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        tx, rx = guest.queue(), guest.queue()
        pump.attach_g2h(0, tx.dev, tx.kick, tx.call, dev.fileno())
        pump.attach_h2g(1, rx.dev, rx.kick, rx.call, dev.fileno())
        rx.add([100], write=True)  # held, waiting for the socket
        rx.kick_if_wanted()
        wait_for(lambda: pump.counters(1).kicks == 1, "the rx kick")
        before = [pump.counters(lane).wakeups for lane in (0, 1)]
        time.sleep(0.2)
        assert [pump.counters(lane).wakeups for lane in (0, 1)] == before
        peer.sendall(b"wake")
        wait_for(lambda: pump.counters(1).chains == 1, "the rx chain")
        assert rx.reap()[0][2] == b"wake"


def test_blocking_kick_fd_never_blocks_the_thread(guest: Guest, pump: Pump) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        q = guest.queue()
        os.close(q.kick)
        q.kick = os.eventfd(0)  # blocking, as a front end may hand it in
        pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
        other = guest.queue()
        pump.attach_g2h(1, other.dev, other.kick, other.call, dev.fileno())
        guest_send(q, b"a" * 1000, lambda: ([100], False))
        guest_send(other, b"b" * 1000, lambda: ([100], False))
        assert peer.recv(2000, socket.MSG_WAITALL) == b"a" * 1000 + b"b" * 1000
        t0 = time.monotonic()
        pump.detach(0)
        assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- hand-over

def test_detach_mid_chain_and_continue_in_python(guest: Guest, pump: Pump) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        dev.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        q = guest.queue(areas=2, area_size=0x40000)
        data = random.Random(8).randbytes(0x40000)
        pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
        q.add([0x10000] * 4, write=False, payload=data)
        q.kick_if_wanted()
        # Nobody reads: the chain is stuck half written.
        wait_for(lambda: pump.counters(0).bytes > 0, "first bytes")
        time.sleep(0.05)
        st = pump.detach(0)
        assert 0 < st.offset < len(data) and st.offset == st.counters.bytes
        assert q.dev.next_avail == st.next_avail == 0 and st.next_used == 0
        reader = Reader(peer, len(data))
        reader.start()
        assert py_g2h(q.dev, dev, q.call, offset=st.offset) == 1
        reader.join(10)
        assert reader.data == data
        assert q.reap()[0][1] == 0


@pytest.mark.parametrize("event_idx", [False, True])
def test_g2h_hand_over_back_and_forth(guest: Guest, pump: Pump, event_idx: bool) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        dev.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        q = guest.queue(event_idx=event_idx, area_size=0xC000)
        data = random.Random(9).randbytes(2 << 20)
        reader = Reader(peer, len(data), chunk=5000)
        reader.start()
        pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
        rng = random.Random(10)
        offsets = []

        def between() -> None:
            if not offsets or rng.random() < 0.3:  # batches vary with timing: one at least
                st = pump.detach(0)
                offsets.append(st.offset)
                if rng.random() < 0.5:
                    # Python serves a while, then gives the ring back whole.
                    py_g2h(q.dev, dev, q.call, offset=st.offset)
                    pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
                else:
                    pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno(), offset=st.offset)

        guest_send(q, data, random_layout(rng, max_len=8192), between)
        reader.join(10)
        assert reader.data == data
        assert offsets


@pytest.mark.parametrize("event_idx", [False, True])
def test_h2g_hand_over_back_and_forth(guest: Guest, pump: Pump, event_idx: bool) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        dev.setblocking(False)
        q = guest.queue(event_idx=event_idx)
        data = random.Random(11).randbytes(2 << 20)
        writer = threading.Thread(target=peer.sendall, args=(data,), daemon=True)
        writer.start()
        pump.attach_h2g(0, q.dev, q.kick, q.call, dev.fileno())
        rng = random.Random(12)
        hand_overs = []

        def between() -> None:
            if not hand_overs or rng.random() < 0.3:  # batches vary with timing: one at least
                st = pump.detach(0)
                hand_overs.append(st)
                py_h2g(q.dev, dev, q.call)
                pump.attach_h2g(0, q.dev, q.kick, q.call, dev.fileno())

        got = guest_receive(q, len(data), random_layout(rng), between)
        writer.join(10)
        assert got == data and hand_overs


def test_close_hands_every_ring_back(guest: Guest) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        q = guest.queue()
        p = Pump()
        p.attach_h2g(3, q.dev, q.kick, q.call, dev.fileno())
        for _ in range(5):
            q.add([100], write=True)
        q.kick_if_wanted()
        peer.sendall(b"x" * 250)
        wait_for(lambda: p.counters(3).chains == 3, "three chains")
        p.close()
        p.close()
        assert (q.dev.next_avail, q.dev.next_used) == (3, 3)
        with pytest.raises(ValueError):
            p.counters(3)


def test_api_misuse(guest: Guest, pump: Pump) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        q, other = guest.queue(), guest.queue()
        pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
        with pytest.raises(ValueError, match="attached already"):
            pump.attach_g2h(0, other.dev, other.kick, other.call, dev.fileno())
        with pytest.raises(ValueError, match="another lane"):
            pump.attach_g2h(1, q.dev, q.kick, q.call, dev.fileno())
        with pytest.raises(ValueError, match="not below"):
            pump.attach_h2g(5000, other.dev, other.kick, other.call, dev.fileno())
        with pytest.raises(OSError):
            pump.attach_h2g(1, other.dev, other.kick, other.call, 9999)
        with pytest.raises(KeyError):
            pump.detach(1)
        other.add([5], write=True)
        other.kick_if_wanted()
        assert other.dev.pop() is not None
        with pytest.raises(ValueError, match="1 chains were taken and not completed"):
            pump.attach_h2g(1, other.dev, other.kick, other.call, dev.fileno())
        assert pump.lanes() == [0]


# ---------------------------------------------------------------- peers going away

def test_h2g_eof_loses_nothing(guest: Guest, pump: Pump) -> None:
    dev, peer = unix_pair()
    with dev:
        q = guest.queue()
        for _ in range(4):
            q.add([1000], write=True)
        q.kick_if_wanted()
        pump.attach_h2g(7, q.dev, q.kick, q.call, dev.fileno())
        peer.sendall(b"y" * 1500)
        peer.close()
        [(lane, stop)] = wait_stopped(pump)
        assert (lane, stop.kind, stop.error) == (7, "eof", None)
        assert pump.stop_of(7) == stop
        st = pump.detach(7)
        assert [w for _, w, _ in q.reap()] == [1000, 500]
        # The chain the lane held when the peer went is back on the avail side.
        assert (st.next_avail, st.next_used) == (2, 2)
        chain = q.dev.pop()
        assert chain is not None and chain.writable_len == 1000
        assert pump.stopped() == []


def test_tcp_reset_stops_both_lanes(guest: Guest, pump: Pump) -> None:
    dev, peer = tcp_pair()
    with dev:
        tx, rx = guest.queue(), guest.queue()
        rx.add([1000], write=True)
        rx.kick_if_wanted()
        pump.attach_h2g(0, rx.dev, rx.kick, rx.call, dev.fileno())
        pump.attach_g2h(1, tx.dev, tx.kick, tx.call, dev.fileno())
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        stops = dict(wait_stopped(pump))
        assert stops[0].kind == "errno"
        assert isinstance(stops[0].error, OSError) and stops[0].error.errno == errno.ECONNRESET
        tx.add([10], write=False, payload=b"z" * 10)
        tx.kick_if_wanted()
        wait_for(lambda: pump.stop_of(1) is not None, "g2h stop")
        stop = pump.stop_of(1)
        assert stop is not None and isinstance(stop.error, OSError)
        assert stop.error.errno in (errno.EPIPE, errno.ECONNRESET)
        st = pump.detach(1)
        # The chain that could not be sent was not completed: whoever goes on has it.
        assert (st.next_avail, st.next_used, st.offset) == (0, 0, 0)


def test_g2h_peer_gone(guest: Guest, pump: Pump) -> None:
    dev, peer = unix_pair()
    with dev:
        q = guest.queue()
        pump.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
        peer.close()
        q.add([10], write=False, payload=b"z" * 10)
        q.kick_if_wanted()
        [(_, stop)] = wait_stopped(pump)
        assert isinstance(stop.error, OSError) and stop.error.errno == errno.EPIPE
        assert stop.reason.startswith("EPIPE")


# ---------------------------------------------------------------- hostile rings

NEXT, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


def _head_out_of_range(q: GuestQueue) -> None:
    q.drv.publish(q.drv.size + 3)


def _looping_chain(q: GuestQueue) -> None:
    q.drv.write_desc(0, DATA, 16, NEXT, 1)
    q.drv.write_desc(1, DATA, 16, NEXT, 0)
    q.drv.publish(0)


def _buffer_outside(q: GuestQueue) -> None:
    q.drv.write_desc(0, DATA, 16, NEXT, 1)
    q.drv.write_desc(1, 0xDEAD_0000_0000, 16, 0, 0)
    q.drv.publish(0)


def _indirect_outside(q: GuestQueue) -> None:
    q.drv.write_desc(0, 0xDEAD_0000_0000, 32, INDIRECT, 0)
    q.drv.publish(0)


def _bad_inside_indirect(q: GuestQueue) -> None:
    q.drv.write_desc(0, DATA + 0x1000, 32, INDIRECT, 0)
    # The indirect table's entry 0 links to entry 9 of a 2-entry table.
    q.mem.view(DATA + 0x1000, 32)[:] = struct.pack("<QIHHQIHH", DATA, 8, NEXT, 9, DATA, 8, 0, 0)
    q.drv.publish(0)


def _avail_jump(q: GuestQueue) -> None:
    q.drv.set_avail_idx(q.drv.size + 7)


@pytest.mark.parametrize("spoil", [_head_out_of_range, _looping_chain, _buffer_outside,
                                   _indirect_outside, _bad_inside_indirect, _avail_jump])
def test_hostile_ring_stops_only_its_lane(guest: Guest, pump: Pump,
                                          spoil: Callable[[GuestQueue], None]) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        bad, good = guest.queue(size=16), guest.queue()
        pump.attach_g2h(0, bad.dev, bad.kick, bad.call, dev.fileno())
        pump.attach_g2h(1, good.dev, good.kick, good.call, dev.fileno())
        spoil(bad)
        # What the Python path says of the same ring, from the same place.
        ref = SplitQueue(bad.mem, 16, *bad.addrs, indirect=True)
        with pytest.raises((ChainError, RingError)) as expected:
            ref.pop()
        bad.kick_if_wanted()
        os.eventfd_write(bad.kick, 1)
        [(lane, stop)] = wait_stopped(pump)
        assert lane == 0 and str(stop.error) == str(expected.value) == stop.reason
        assert type(stop.error) is type(expected.value)
        guest_send(good, b"still here", lambda: ([5], False))
        assert peer.recv(100) == b"still here"
        st = pump.detach(0)
        assert st.next_avail == ref.next_avail
        if isinstance(expected.value, ChainError):
            assert stop.head == expected.value.head == 0 and stop.kind == "chain"
        else:
            with pytest.raises(RingError, match=str(expected.value)):
                bad.dev.pop()


def test_writable_tx_chain_and_readonly_rx_chain(guest: Guest, pump: Pump) -> None:
    dev, peer = unix_pair()
    with dev, peer:
        tx, rx = guest.queue(), guest.queue()
        pump.attach_g2h(0, tx.dev, tx.kick, tx.call, dev.fileno(), max_chain=100)
        pump.attach_h2g(1, rx.dev, rx.kick, rx.call, dev.fileno())
        tx.add([10], write=True)
        tx.kick_if_wanted()
        rx.add([10], write=False, payload=b"q" * 10)
        rx.kick_if_wanted()
        peer.sendall(b"data")
        wait_for(lambda: None not in (pump.stop_of(0), pump.stop_of(1)), "both stops")
        assert pump.stop_of(0) == LaneStop("writable", "tx chain 0 has device-writable buffers",
                                           None, 0)
        assert pump.stop_of(1) == LaneStop("readonly", "rx chain 0 has no writable buffer",
                                           None, 0)
        # Completed empty by the control plane, as the daemon does, then served again.
        for q, lane in ((tx, 0), (rx, 1)):
            pump.detach(lane)
            q.dev.push(0, 0)
        pump.attach_g2h(0, tx.dev, tx.kick, tx.call, dev.fileno(), max_chain=100)
        tx.add([101], write=False, payload=b"l" * 101)
        tx.kick_if_wanted()
        wait_for(lambda: pump.stop_of(0) is not None, "too long")
        stop = pump.stop_of(0)
        assert stop is not None and stop.kind == "too-long" and "101 bytes" in stop.reason


# ---------------------------------------------------------------- against the Python path

chains_st = st.lists(
    st.tuples(st.lists(st.integers(0, 3000), min_size=1, max_size=6), st.booleans()),
    min_size=1, max_size=24,
)


def _run_g2h(layout: list[tuple[list[int], bool]], data: bytes, use_pump: bool) -> tuple[
        bytes, list[int]]:
    g = Guest()
    dev, peer = unix_pair()
    try:
        q = g.queue(areas=32, area_size=0x8000)
        pos = 0
        for lens, ind in layout:
            q.add(lens, write=False, indirect=ind, payload=data[pos:pos + sum(lens)])
            pos += sum(lens)
        if use_pump:
            with Pump() as p:
                p.attach_g2h(0, q.dev, q.kick, q.call, dev.fileno())
                wait_for(lambda: p.counters(0).chains == len(layout), "all chains")
        else:
            py_g2h(q.dev, dev, q.call)
        dev.shutdown(socket.SHUT_WR)
        out = b""
        while b := peer.recv(1 << 16):
            out += b
        return out, [w for _, w, _ in q.reap()]
    finally:
        dev.close()
        peer.close()
        g.close()


def _run_h2g(layout: list[tuple[list[int], bool]], data: bytes, use_pump: bool) -> tuple[
        list[bytes], list[int], int]:
    g = Guest()
    dev, peer = unix_pair()
    try:
        dev.setblocking(False)
        q = g.queue(areas=32, area_size=0x8000)
        peer.sendall(data)
        peer.close()
        for lens, ind in layout:
            q.add(lens, write=True, indirect=ind)
        if use_pump:
            with Pump() as p:
                p.attach_h2g(0, q.dev, q.kick, q.call, dev.fileno())
                wait_for(lambda: p.stop_of(0) is not None or p.counters(0).chains == len(layout),
                         "all chains or EOF")
        else:
            py_h2g(q.dev, dev, q.call)
        used = q.reap()
        return [d for _, _, d in used], [w for _, w, _ in used], q.dev.next_avail
    finally:
        dev.close()
        g.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=chains_st, seed=st.integers(0, 2**32))
def test_g2h_matches_the_python_path(layout: list[tuple[list[int], bool]], seed: int) -> None:
    data = random.Random(seed).randbytes(sum(sum(lens) for lens, _ in layout))
    ref = _run_g2h(layout, data, use_pump=False)
    assert ref[0] == data
    assert _run_g2h(layout, data, use_pump=True) == ref


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=chains_st, n=st.integers(1, 40000), seed=st.integers(0, 2**32))
def test_h2g_matches_the_python_path(layout: list[tuple[list[int], bool]], n: int,
                                     seed: int) -> None:
    data = random.Random(seed).randbytes(n)
    ref = _run_h2g(layout, data, use_pump=False)
    assert b"".join(ref[0]) == data[:sum(ref[1])]
    assert _run_h2g(layout, data, use_pump=True) == ref
