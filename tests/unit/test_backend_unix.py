"""The `unix` backend over real unix sockets: the three modes, flow control, client role."""

from __future__ import annotations

import os
import random
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from test_backend_harness import (
    Guest,
    receive_exactly,
    receive_until_eof,
    running,
    unix_connect,
    wait_until,
)
from trio.testing import MockClock

from vhostser.backends.framing import Close, Data, FrameDecoder, Open, encode
from vhostser.backends.unix import UnixBackend
from vhostser.console import PortConfig
from vhostser.console.session import Input, State
from vhostser.sockets import prepare_socket_path


def make(tmp_path: Path, **options: Any) -> UnixBackend:
    return UnixBackend.from_options({"path": str(tmp_path / "p.sock"), **options}, "test")


async def unix_listener(path: str) -> trio.socket.SocketType:
    """A server for the client role to connect to."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(4)
    return listener


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ====================================================================== stream mode


async def test_stream_first_peer_attaches_last_detaches(tmp_path: Path) -> None:
    backend = make(tmp_path, max_peers=2)
    guest = Guest(backend)
    async with running(backend):
        assert stat.S_IMODE(os.stat(backend.path).st_mode) == 0o600  # the daemon's user's
        assert not guest.host_open and not guest.port.state.guest_open  # B
        a = await unix_connect(backend.path)
        await wait_until(lambda: guest.state is State.C)
        b = await unix_connect(backend.path)
        await wait_until(lambda: backend.counters.peers_accepted == 2)
        await a.aclose()
        await wait_until(lambda: len(backend.peers) == 1)
        assert guest.state is State.C
        guest.open()
        assert guest.port.state is State.A
        await b.aclose()
        await wait_until(lambda: guest.state is State.D)  # the session goes on without H
        assert guest.port.session is not None and guest.port.session.id == 1
    assert guest.host_opens() == [1, 0]
    assert not os.path.exists(backend.path)  # our socket file is removed


async def test_stream_bytes_both_ways_to_every_peer(tmp_path: Path) -> None:
    backend = make(tmp_path, max_peers=2)
    guest = Guest(backend)
    up, down = blob(300_000, 1), blob(200_000, 2)
    async with running(backend):
        a = await unix_connect(backend.path)
        b = await unix_connect(backend.path)
        await wait_until(lambda: len(backend.peers) == 2)
        guest.open()
        async with trio.open_nursery() as nursery:
            got: dict[str, bytes] = {}

            async def peer_reads(name: str, s: trio.SocketStream) -> None:
                got[name] = await receive_exactly(s, len(up))

            nursery.start_soon(peer_reads, "a", a)
            nursery.start_soon(peer_reads, "b", b)
            nursery.start_soon(a.send_all, down)
            guest.write(up)
            await guest.drain()
            assert await guest.read_exactly(len(down)) == down
        assert got == {"a": up, "b": up}
        assert backend.counters.bytes_to_peers == len(up)
        assert backend.counters.bytes_from_peers == len(down)


async def test_stream_full_staging_stops_reading_the_peer(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    backend = make(tmp_path)
    guest = Guest(backend, PortConfig(1, name="x", staging_limit=4096))
    payload = blob(4 << 20, 3)
    async with running(backend):
        peer = await unix_connect(backend.path)
        await wait_until(lambda: guest.host_open)
        guest.open()
        async with trio.open_nursery() as nursery:
            sent = trio.Event()

            async def sender() -> None:
                await peer.send_all(payload)
                sent.set()

            nursery.start_soon(sender)
            await trio.sleep(0.3)  # autojump_clock: over once every task is blocked
            assert not sent.is_set(), "the peer's send should block: nobody reads"
            assert guest.port.staged == 4096
            # Read at most a chunk beyond what fits: the socket pushes back, memory is bounded.
            assert backend.counters.bytes_from_peers <= 4096 + 2 * 65536
            assert await guest.read_exactly(len(payload), timeout=10) == payload


async def test_stream_slow_peer_blocks_the_guest(tmp_path: Path) -> None:
    backend = make(tmp_path, max_peers=2, peer_queue=8192)
    guest = Guest(backend)
    payload = blob(2 << 20, 4)
    async with running(backend):
        fast = await unix_connect(backend.path)
        slow = await unix_connect(backend.path)
        await wait_until(lambda: len(backend.peers) == 2)
        guest.open()
        async with trio.open_nursery() as nursery:
            fast_got = bytearray()

            async def fast_reader() -> None:
                fast_got.extend(await receive_exactly(fast, len(payload), timeout=10))

            nursery.start_soon(fast_reader)
            guest.write(payload)
            with trio.move_on_after(0.3):
                await guest.drain()
            assert guest.pending, "the guest's write should block behind the slow peer"
            # Bounded: each peer's queue holds at most peer_queue (+ one chain), the rest of
            # the payload waits in the guest.
            for p in backend.peers:
                assert len(p.out) <= 8192 + 4096
            slow_got = await receive_exactly(slow, len(payload), timeout=10)
            await guest.drain()
        assert slow_got == payload and bytes(fast_got) == payload
        assert backend.counters.peers_dropped_slow == 0


async def test_stream_drop_peer_disconnects_the_slow_one(tmp_path: Path) -> None:
    backend = make(tmp_path, max_peers=2, peer_queue=8192, slow_peer="drop-peer")
    guest = Guest(backend)
    payload = blob(2 << 20, 5)
    async with running(backend):
        fast = await unix_connect(backend.path)
        slow = await unix_connect(backend.path)
        await wait_until(lambda: len(backend.peers) == 2)
        guest.open()
        async with trio.open_nursery() as nursery:
            fast_got = bytearray()

            async def fast_reader() -> None:
                fast_got.extend(await receive_exactly(fast, len(payload), timeout=10))

            nursery.start_soon(fast_reader)
            guest.write(payload)
            await guest.drain(timeout=10)  # never blocked by the slow peer
        assert bytes(fast_got) == payload
        assert backend.counters.peers_dropped_slow == 1
        await wait_until(lambda: len(backend.peers) == 1)
        # The slow peer got a prefix of the stream, then its connection was closed.
        with trio.fail_after(3):
            rest = bytearray()
            try:
                while chunk := await slow.receive_some(65536):
                    rest += chunk
            except trio.BrokenResourceError:
                pass
        assert payload.startswith(bytes(rest)) and len(rest) < len(payload)
        assert guest.host_open  # the fast peer is still there


async def test_connections_over_max_peers_are_refused(tmp_path: Path) -> None:
    backend = make(tmp_path)
    guest = Guest(backend)
    async with running(backend):
        first = await unix_connect(backend.path)
        await wait_until(lambda: guest.host_open)
        second = await unix_connect(backend.path)
        assert await receive_until_eof(second) == b""
        assert backend.counters.peers_refused == 1
        guest.open()
        await first.send_all(b"still here")
        assert await guest.read_exactly(10) == b"still here"


async def test_peer_bytes_never_reach_a_later_session(tmp_path: Path) -> None:
    backend = make(tmp_path)
    guest = Guest(backend, PortConfig(1, name="x", staging_limit=4096))
    async with running(backend):
        peer = await unix_connect(backend.path)
        await wait_until(lambda: guest.host_open)
        guest.open()
        await peer.send_all(b"o" * 10_000)
        await wait_until(lambda: guest.port.staged == 4096)
        # The rest was read (peeked) in this session and waits in the socket for room: it
        # leaves the socket only once the port has it.
        assert backend.counters.bytes_from_peers == 4096
        guest.close()
        guest.open()
        # The staged 4096 and the 5904 read in that session: all dropped, counted.
        await wait_until(lambda: guest.port.counters.discarded["stale"] == 10_000)
        assert backend.counters.bytes_from_peers == 10_000
        await peer.send_all(b"new")
        assert await guest.read_exactly(3) == b"new"
        assert guest.read() == b""


async def test_bytes_from_a_peer_while_the_guest_is_closed_are_dropped(tmp_path: Path) -> None:
    backend = make(tmp_path)
    guest = Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)
        await peer.send_all(b"nobody hears this")
        await wait_until(lambda: guest.port.counters.discarded["guest-closed"] == 17)
        guest.open()
        await peer.send_all(b"hi")
        assert await guest.read_exactly(2) == b"hi"


async def test_a_stale_socket_file_is_replaced_and_other_files_are_not(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: stale
    prepare_socket_path(str(path))
    assert not path.exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    with pytest.raises(OSError, match="another process"):
        prepare_socket_path(str(path))
    live.close()
    path.unlink()
    path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        prepare_socket_path(str(path))
    assert path.read_text() == "precious"
    prepare_socket_path(str(tmp_path / "new" / "dir" / "s.sock"))
    assert (tmp_path / "new" / "dir").is_dir()


# ====================================================================== session mode


async def test_session_mode_one_connection_per_session(tmp_path: Path) -> None:
    backend = make(tmp_path, mode="session")
    guest = Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)
        await wait_until(lambda: guest.state is State.C)
        guest.open()
        await peer.send_all(b"ping")
        assert await guest.read_exactly(4) == b"ping"
        guest.write(b"pong, and bye")
        await guest.drain()
        guest.close()
        # The session's last bytes, then EOF exactly at the session boundary.
        assert await receive_until_eof(peer) == b"pong, and bye"
        await peer.aclose()
        await wait_until(lambda: guest.state is State.B)
        # The next peer lives the next session.
        peer2 = await unix_connect(backend.path)
        await wait_until(lambda: guest.state is State.C)
        guest.open()
        assert guest.port.session is not None and guest.port.session.id == 2
        guest.write(b"2")
        await guest.drain()
        assert await receive_exactly(peer2, 1) == b"2"
    assert guest.host_opens() == [1, 0, 1]


async def test_session_mode_peer_hangup_ends_the_session(tmp_path: Path) -> None:
    backend = make(tmp_path, mode="session")
    guest = Guest(backend)
    async with running(backend):
        guest.open()  # D: open, nobody there
        peer = await unix_connect(backend.path)
        await wait_until(lambda: guest.state is State.A)
        assert guest.port.session is not None and guest.port.session.id == 1
        await peer.aclose()
        await wait_until(lambda: guest.state is State.E)  # host-close: the guest reads EOF
        assert guest.port.session is None
        # A new peer starts a new session; nothing of session 1 can reach it.
        peer2 = await unix_connect(backend.path)
        await wait_until(lambda: guest.state is State.A)
        assert guest.port.session is not None and guest.port.session.id == 2
        guest.write(b"hello 2")
        await guest.drain()
        assert await receive_exactly(peer2, 7) == b"hello 2"
    assert guest.host_opens() == [1, 0, 1]


async def test_session_mode_bytes_sent_before_the_guest_opens(tmp_path: Path) -> None:
    backend = make(tmp_path, mode="session")
    guest = Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)
        await peer.send_all(b"early request")
        await wait_until(lambda: backend.peers and backend.peers[0].unread() == 13)
        await trio.sleep(0.2)
        # Its bytes wait in the socket for its session: none reach the closed port.
        assert backend.counters.bytes_from_peers == 0
        assert guest.port.counters.discarded["guest-closed"] == 0
        guest.open()
        assert await guest.read_exactly(13) == b"early request"


async def test_session_mode_a_new_peer_may_come_while_the_old_one_lingers(
    tmp_path: Path,
) -> None:
    backend = make(tmp_path, mode="session")
    guest = Guest(backend)
    async with running(backend):
        old = await unix_connect(backend.path)
        await wait_until(lambda: guest.host_open)
        guest.open()
        guest.close()
        assert await receive_until_eof(old) == b""  # EOF, but `old` does not hang up yet
        new = await unix_connect(backend.path)
        await wait_until(lambda: backend.counters.peers_accepted == 2)
        assert backend.counters.peers_refused == 0
        guest.open()
        await new.send_all(b"n")
        assert await guest.read_exactly(1) == b"n"
        await old.send_all(b"late")  # the old session's peer: never delivered
        await wait_until(lambda: backend.counters.stale_bytes == 4)
        assert guest.read() == b""


async def test_session_mode_reconnect_right_after_closing_is_never_refused(
    tmp_path: Path,
) -> None:
    """A client that reconnects at once after closing used to find its old connection still
    counted against max_peers (its hang-up not yet read) every second time: refused."""
    backend = make(tmp_path, mode="session")
    guest = Guest(backend)
    async with running(backend):
        for i in range(1, 51):
            peer = await unix_connect(backend.path)
            c = backend.counters
            await wait_until(lambda: c.peers_accepted + c.peers_refused == i)  # noqa: B023
            assert c.peers_refused == 0, f"connection {i} refused"
            await wait_until(lambda: guest.host_open)
            await peer.send_all(b"x")  # an ECONNRESET would show here or at the close
            await peer.aclose()
        await wait_until(lambda: not backend.peers)
    assert guest.host_opens() == [1, 0] * 50


async def test_session_mode_slow_peer_dropped_ends_its_session(tmp_path: Path) -> None:
    backend = make(tmp_path, mode="session", peer_queue=4096, slow_peer="drop-peer")
    guest = Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)  # connected, never reads
        await wait_until(lambda: guest.host_open)
        guest.open()
        guest.write(blob(4 << 20))
        await wait_until(lambda: backend.counters.peers_dropped_slow == 1)
        await wait_until(lambda: guest.state is State.E)
        # What the guest writes after its session ended is the port's to drop (counted).
        await guest.drain()
        assert guest.port.counters.discarded["no-session"] > 0
        await peer.aclose()


# ====================================================================== unsent bytes
# Every byte queued for a peer is sent or counted dropped, by reason: with one peer, what the
# port handed the backend = bytes_sent + the bytes dropped unsent (+ what is still queued).


def balanced(backend: UnixBackend, guest: Guest) -> bool:
    c = backend.counters
    queued = sum(len(p.out) for p in backend.peers)
    return (guest.port.counters.bytes_from_guest
            == c.bytes_sent + sum(c.bytes_dropped_unsent.values()) + queued)


async def test_client_whose_server_stops_reading_and_goes_away_counts_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "server.sock")
    backend = UnixBackend.from_options({"path": path, "role": "client"}, "test")
    guest = Guest(backend)
    listener = await unix_listener(path)
    with listener:
        async with running(backend):
            conn, _ = await listener.accept()
            await wait_until(lambda: guest.host_open)
            guest.open()
            guest.write(blob(4 << 20, 11))  # far more than the socket and peer_queue hold
            with trio.move_on_after(0.3):
                await guest.drain()
            assert guest.pending  # the server reads nothing: the guest is held
            conn.close()  # ... and goes away
            await wait_until(lambda: not guest.host_open)
            dropped = backend.counters.bytes_dropped_unsent
            assert dropped["peer-gone"] > 0 and set(dropped) == {"peer-gone"}
            assert balanced(backend, guest)
            assert backend.counters.bytes_to_peers == guest.port.counters.bytes_from_guest
    lost = [r.getMessage() for r in caplog.records if "dropped unsent" in r.getMessage()]
    assert len(lost) == 1 and f"{dropped['peer-gone']} bytes" in lost[0], lost


async def test_drop_peer_counts_what_the_dropped_peer_never_got(tmp_path: Path) -> None:
    backend = make(tmp_path, peer_queue=4096, slow_peer="drop-peer")
    guest = Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)  # never reads
        await wait_until(lambda: guest.host_open)
        guest.open()
        guest.write(blob(4 << 20, 12))
        await wait_until(lambda: backend.counters.peers_dropped_slow == 1 and not backend.peers)
        dropped = backend.counters.bytes_dropped_unsent
        assert dropped["drop-peer"] > 0 and set(dropped) == {"drop-peer"}
        assert balanced(backend, guest)
        await peer.aclose()


async def test_session_close_flush_timeout_counts_what_was_not_flushed(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    backend = make(tmp_path, mode="session")
    guest = Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)  # never reads, never hangs up
        await wait_until(lambda: guest.host_open)
        guest.open()
        guest.write(blob(1 << 20, 13))
        await trio.sleep(1)  # autojump_clock: over once every task is blocked
        assert backend.peers[0].out  # queued, the socket full
        taken = guest.port.counters.bytes_from_guest
        guest.close()  # the peer gets CLOSE_TIMEOUT to take the session's last bytes
        await wait_until(lambda: not backend.peers, timeout=10)
        dropped = backend.counters.bytes_dropped_unsent
        assert dropped["close-timeout"] > 0 and set(dropped) == {"close-timeout"}
        assert guest.port.counters.bytes_from_guest == taken
        assert balanced(backend, guest)
        await peer.aclose()


async def test_bytes_queued_when_the_backend_stops_are_counted(tmp_path: Path) -> None:
    backend = make(tmp_path)
    guest = Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)  # never reads
        await wait_until(lambda: guest.host_open)
        guest.open()
        guest.write(blob(2 << 20, 14))
        await wait_until(lambda: bool(guest.pending) and bool(backend.peers[0].out))
    dropped = backend.counters.bytes_dropped_unsent
    assert dropped["stopped"] > 0 and set(dropped) == {"stopped"}
    assert balanced(backend, guest)
    await peer.aclose()


async def test_bytes_a_session_peer_sent_before_hanging_up_unbound_are_counted(
    tmp_path: Path,
) -> None:
    backend = make(tmp_path, mode="session")
    Guest(backend)
    async with running(backend):
        peer = await unix_connect(backend.path)
        await peer.send_all(b"request")
        await wait_until(lambda: backend.peers and backend.peers[0].unread() == 7)
        await peer.aclose()  # gone before the guest opened: its session never existed
        await wait_until(lambda: not backend.peers)
        assert backend.counters.bytes_from_peers == 7
        assert backend.counters.peer_bytes_dropped == 7


# ====================================================================== framed mode


class FramedPeer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(accept_open=True)
        self.frames: list[Open | Data | Close] = []

    async def next(self) -> Open | Data | Close:
        with trio.fail_after(3):
            while not self.frames:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError
                self.decoder.feed(data)
                self.frames.extend(self.decoder)
        return self.frames.pop(0)

    async def data(self, session: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            frame = await self.next()
            assert isinstance(frame, Data) and frame.session == session, frame
            out += frame.data
        return bytes(out)

    async def send(self, frame: Open | Data | Close) -> None:
        await self.stream.send_all(encode(frame))


async def test_framed_sessions_as_frames(tmp_path: Path) -> None:
    backend = make(tmp_path, mode="framed")
    guest = Guest(backend, PortConfig(1, name="org.test.framed"))
    async with running(backend):
        peer = FramedPeer(await unix_connect(backend.path))
        await wait_until(lambda: guest.host_open)
        guest.open()
        assert await peer.next() == Open(1, "org.test.framed")
        big = blob(200_000, 7)
        guest.write(big)
        await guest.drain()
        assert await peer.data(1, len(big)) == big
        await peer.send(Data(1, b"pong"))
        assert await guest.read_exactly(4) == b"pong"
        guest.close()
        assert await peer.next() == Close(1, "guest-close")
        guest.open()
        assert await peer.next() == Open(2, "org.test.framed")
        # DATA naming session 1 is stale now: dropped and counted, never given to session 2.
        await peer.send(Data(1, b"stale!"))
        await peer.send(Data(2, b"ok"))
        assert await guest.read_exactly(2) == b"ok"
        assert backend.counters.stale_frames == 1 and backend.counters.stale_bytes == 6
        guest.reset()
        assert await peer.next() == Close(2, "reset")


async def test_framed_peer_close_ends_the_session_until_the_guest_reopens(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    backend = make(tmp_path, mode="framed")
    guest = Guest(backend, PortConfig(1, name="f"))
    async with running(backend):
        peer = FramedPeer(await unix_connect(backend.path))
        await wait_until(lambda: guest.host_open)
        guest.open()
        assert await peer.next() == Open(1, "f")
        await peer.send(Close(1, "host-close"))
        assert await peer.next() == Close(1, "host-close")
        await wait_until(lambda: guest.state is State.E)
        await trio.sleep(0.05)  # autojump_clock: over once every task is blocked
        assert guest.state is State.E  # not re-attached under the guest's EOF
        await peer.send(Close(1, "again"))  # no longer open: ignored, counted
        await wait_until(lambda: backend.counters.stale_frames == 1)
        guest.close()
        guest.open()
        await wait_until(lambda: guest.state is State.A)
        assert await peer.next() == Open(2, "f")
    assert guest.host_opens() == [1, 0, 1]


async def test_framed_peer_joining_an_open_session_gets_open_once(tmp_path: Path) -> None:
    backend = make(tmp_path, mode="framed", max_peers=2)
    guest = Guest(backend, PortConfig(1, name="f"))
    async with running(backend):
        guest.open()
        first = FramedPeer(await unix_connect(backend.path))
        assert await first.next() == Open(1, "f")
        second = FramedPeer(await unix_connect(backend.path))
        assert await second.next() == Open(1, "f")
        guest.write(b"both")
        await guest.drain()
        assert await first.data(1, 4) == b"both"
        assert await second.data(1, 4) == b"both"
        assert first.frames == [] and second.frames == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00",  # length 0
        b"\x00\x20\x00\x00",  # length over 1 MiB
        b"\x00\x00\x00\x09\x07" + bytes(8),  # unknown type
        encode(Open(1, "peers may not open")),
        b"\x00\x00\x00\x03\x02ab",  # DATA without a session id
        b"\x00\x00\x00\x0a\x03" + bytes(8) + b"\xff",  # CLOSE reason not UTF-8
    ],
)
async def test_framed_malformed_frame_disconnects_the_peer(
    tmp_path: Path, garbage: bytes
) -> None:
    backend = make(tmp_path, mode="framed")
    guest = Guest(backend)
    async with running(backend):
        stream = await unix_connect(backend.path)
        await wait_until(lambda: guest.host_open)
        await stream.send_all(garbage)
        assert await receive_until_eof(stream) == b""
        await wait_until(lambda: not guest.host_open)
        assert backend.counters.peers_malformed == 1


# ====================================================================== client role


async def test_client_reconnects_with_backoff(tmp_path: Path) -> None:
    path = str(tmp_path / "server.sock")
    backend = UnixBackend.from_options({"path": path, "role": "client"}, "test")
    guest = Guest(backend)
    async with running(backend):
        await wait_until(lambda: backend.counters.connect_failures >= 2)
        t0 = trio.current_time()
        listener = await unix_listener(path)
        with listener:
            conn, _ = await listener.accept()  # the third attempt, 0.4 s after the second
            assert trio.current_time() - t0 < 1.0
            await wait_until(lambda: guest.host_open)
            guest.open()
            server = trio.SocketStream(conn)
            await server.send_all(b"from server")
            assert await guest.read_exactly(11) == b"from server"
            await server.aclose()  # the server drops us: H goes, we come back
            await wait_until(lambda: not guest.host_open)
            conn2, _ = await listener.accept()
            await wait_until(lambda: guest.host_open)
            guest.write(b"again")
            await guest.drain()
            assert await receive_exactly(trio.SocketStream(conn2), 5) == b"again"
        assert backend.counters.connects == 2
    assert guest.host_opens() == [1, 0, 1]


async def test_client_in_session_mode_reconnects_for_the_next_session(tmp_path: Path) -> None:
    path = str(tmp_path / "server.sock")
    backend = UnixBackend.from_options({"path": path, "role": "client", "mode": "session"},
                                       "test")
    guest = Guest(backend)
    listener = await unix_listener(path)
    with listener:
        async with running(backend):
            conn, _ = await listener.accept()
            await wait_until(lambda: guest.host_open)
            guest.open()
            guest.write(b"session one")
            await guest.drain()
            guest.close()
            first = trio.SocketStream(conn)
            assert await receive_until_eof(first) == b"session one"
            await first.aclose()
            conn2, _ = await listener.accept()  # a fresh connection for the next session
            await wait_until(lambda: guest.state is State.C)
            guest.open()
            assert guest.port.session is not None and guest.port.session.id == 2
            await trio.SocketStream(conn2).send_all(b"two")
            assert await guest.read_exactly(3) == b"two"
        assert backend.counters.connect_failures == 0


# ====================================================================== daemon life cycle


async def test_shutdown_closes_the_session_without_starting_another(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    backend = make(tmp_path, mode="framed")
    guest = Guest(backend, PortConfig(1, name="f"))
    async with running(backend):
        peer = FramedPeer(await unix_connect(backend.path))
        await wait_until(lambda: guest.host_open)
        guest.open()
        assert await peer.next() == Open(1, "f")
        guest.apply(Input.SHUTDOWN)
        assert await peer.next() == Close(1, "shutdown")
        await trio.sleep(0.05)  # autojump_clock: over once every task is blocked
        assert guest.port.session is None and guest.port.counters.sessions_opened == 1


async def test_a_restored_session_is_replayed_to_peers(tmp_path: Path) -> None:
    backend = make(tmp_path, mode="framed")
    guest = Guest(backend, PortConfig(1, name="f"))
    guest.restore_session(41)  # the daemon restarted; the guest never closed the port
    async with running(backend):
        peer = FramedPeer(await unix_connect(backend.path))
        assert await peer.next() == Open(41, "f")
        await wait_until(lambda: guest.port.state is State.A)
        await peer.send(Data(41, b"same session"))
        assert await guest.read_exactly(12) == b"same session"
