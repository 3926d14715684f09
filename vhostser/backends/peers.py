"""Host peers on stream sockets: the one implementation behind the `unix` and `tcp` backends.

A `PeerBackend` gets its sockets from an `Endpoint` (listen or connect: the only thing that
differs between unix and tcp) and runs one of three modes:

stream   the classic chardev. The first peer connecting attaches the host (the guest gets
         host PORT_OPEN(1)), the last one leaving detaches it. Guest bytes go to every peer,
         peer bytes go to the guest's current session (`port.send_all(data, session)`: if
         the session they were read in ends first, the port drops them, counted stale —
         never delivered into a later one).
session  one connection lives exactly one guest session. A peer waiting while the guest has
         the port closed is attached (H=1); the guest's open binds the session to it; the
         guest's close (any reason) closes the connection after the session's last bytes,
         so the peer reads EOF exactly at the session boundary. The peer hanging up ends the
         session from the host side (the guest reads EOF). One peer at a time (a peer still
         finishing the previous session does not count). Bytes a peer sends before its
         session opens wait in its socket and are delivered when it opens.
framed   like stream, but every byte is carried in frames that name the session, and the
         session's open and close are frames too: see `framing` for the wire format.

Flow control, both ways bounded (the token model of seeds/002):

- guest → peers: each peer has its own queue of at most `peer_queue` bytes. With
  `slow_peer = "block"`, `guest_data` refuses bytes (the guest's write blocks) while any
  peer's queue cannot take them, and calls `port.resume_guest_data()` once they all can; with
  `"drop-peer"` a peer whose queue stays full for SLOW_PEER_GRACE (0.5 s; the guest's write
  is held meanwhile) is disconnected (counted) and the others go on.
- peers → guest: bytes go through `port.send` and the reader waits for room, so while the
  port's staging buffer is full the socket is not read and the peer is pushed back.

An exact ledger: every byte queued for a peer is sent (`bytes_sent`: what its socket took) or
dropped and counted by reason (`bytes_dropped_unsent`, one log line per peer): peer-gone (it
hung up or failed before taking them), drop-peer, close-timeout (it did not take a closed
session's last bytes within CLOSE_TIMEOUT), malformed-frame, stopped (the backend was: the
port removed, the daemon stopping). So with one peer, the guest bytes the port handed the
backend = bytes_sent + the dropped + what is still queued (framed mode counts frames,
headers included). Bytes read from a peer that never reach the port are
`peer_bytes_dropped`.

Continuity: the listening socket, every peer's socket, its queue and (framed) its inbox are
in the port's custody (`Port.custody`; the daemon's is the fd store), and `continuity()` says
which session each peer lives. A successor takes them back in `run` and goes on: no OPEN is
sent again, H stays as the port has it. So that no byte is lost in between, bytes leave a
peer's socket only once the port has them staged (`Peer.peek`, then `Peer.consume` with no
checkpoint between) and guest bytes are in the peer's queue before their chain is completed;
a crash repeats at most the one read being staged (framed: the DATA frame being delivered)
and the one write to a socket not yet marked sent. Bytes still unread in a socket when a
peer is cut off count as read and dropped (`peer_bytes_dropped`).

A peer that hung up does not hold a place under `max_peers` while its hang-up waits to be
read: a connection arriving then waits (up to HANGUP_WAIT) for it to leave instead of being
refused, so a client may reconnect at once after closing.

Changes of H that follow from port callbacks (`session_opened` / `session_closed`) are not
made inside the callback (the port is in the middle of a transition): they go through a
small reconciler task that compares "do we have a live peer" with the port's H. In state E
(the host ended the session — a framed CLOSE, the admin API, a session-mode hang-up — or the
daemon is shutting down) H stays 0 so the guest sees its EOF: only a newly connecting peer
starts the next session there; otherwise H comes back at the guest's next open.
"""

from __future__ import annotations

import array
import fcntl
import logging
import math
import os
import select
import socket
import termios
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self, cast

import trio

from ..console.core import MAX_TX_CHAIN_BYTES
from ..console.port import Counters, Custody, Port, Session
from ..console.session import Reason, State
from ..console.staging import Staging
from ..options import Options
from ..pacing import BACKOFF_MAX, backoff_delays
from ..sockets import ListenerCounters, PeerPolicy, accept_connection, refuses
from .framing import (
    MAX_DATA,
    MAX_FRAME,
    Close,
    Data,
    FrameError,
    Open,
    decode,
    encode,
    encode_data,
    frame_size,
)
from .options import ANYONE, ConfigurableBackend

log = logging.getLogger("vhostser.backends")

Mode = Literal["stream", "session", "framed"]
Role = Literal["server", "client"]
SlowPeer = Literal["block", "drop-peer"]

READ_CHUNK = 64 * 1024
WRITE_CHUNK = 64 * 1024
DEFAULT_PEER_QUEUE = 256 * 1024
CLOSE_TIMEOUT = 5.0  # a peer closed at a session end gets this long to take its last bytes
CONNECT_TIMEOUT = 10.0
SLOW_PEER_GRACE = 0.5  # drop-peer: a peer whose queue stays full this long is dropped
STABLE_AFTER = 1.0  # a client connection that lived this long resets the reconnect backoff
HANGUP_WAIT = 1.0  # a new connection waits this long for a peer that hung up to leave
HANGUP_POLL = 0.2  # how often a session-mode peer with bytes waiting is checked for a hang-up

TOO_SLOW, MALFORMED = "too slow", "malformed frame"  # why we cut a peer off (Peer.dropped)

PEER_OPTION_KEYS = frozenset({"role", "mode", "max_peers", "slow_peer", "peer_queue"})


class Endpoint(Protocol):
    """Where a backend's sockets come from: a listening socket or an outgoing connection."""

    @property
    def policy(self) -> PeerPolicy | None:
        """Who may connect (to a listening unix socket: by SO_PEERCRED); None: whoever
        reaches it."""
        ...

    def describe(self) -> str: ...

    def info(self, address: Any) -> dict[str, object]:
        """`endpoint_info`'s address part; `address` is the bound one, once listening."""
        ...

    async def listen(self) -> trio.socket.SocketType: ...

    async def connect(self) -> trio.socket.SocketType: ...

    def adopted(self, listener: trio.socket.SocketType) -> None:
        """`listener` is the one a predecessor made (kept in the port's custody)."""
        ...

    def cleanup(self) -> None: ...


async def listen_retrying(
    endpoint: Endpoint, where: str, on_failure: Callable[[], None]
) -> trio.socket.SocketType:
    """`endpoint.listen()`, retried with backoff until it works (the path is taken, the
    address in use...): each failure counted (`on_failure`), logged once per streak."""
    delays = backoff_delays()
    failures = 0
    while True:
        try:
            listener = await endpoint.listen()
        except OSError as e:
            on_failure()
            failures += 1
            delay = next(delays)
            log.log(logging.DEBUG if failures > 1 else logging.ERROR,
                    "%s: cannot listen: %s (retrying in %.1f s, backing off to %.0f s)",
                    where, e, delay, BACKOFF_MAX)
            await trio.sleep(delay)
            continue
        if failures:
            log.info("%s: listening after %d failed attempts", where, failures)
        return listener


@dataclass(frozen=True, slots=True)
class PeerOptions:
    role: Role = "server"
    mode: Mode = "stream"
    max_peers: int = 1
    slow_peer: SlowPeer = "block"
    peer_queue: int = DEFAULT_PEER_QUEUE

    @classmethod
    def read(cls, o: Options) -> Self:
        role = cast(Role, o.choice("role", ("server", "client"), "server"))
        mode = cast(Mode, o.choice("mode", ("stream", "session", "framed"), "stream"))
        if role == "client":
            o.not_with("max_peers", 'with role = "client" (a client has one connection)')
            max_peers = 1
        else:
            max_peers = o.integer("max_peers", 1, lo=1, hi=1024)
            if mode == "session" and max_peers != 1:
                o.fail("max_peers", '1 with mode = "session" (one peer per session)', max_peers)
        slow_peer = cast(SlowPeer, o.choice("slow_peer", ("block", "drop-peer"), "block"))
        peer_queue = o.size("peer_queue", DEFAULT_PEER_QUEUE, lo=1, hi=64 << 20)
        return cls(role, mode, max_peers, slow_peer, peer_queue)


@dataclass
class PeerCounters(Counters):
    """Per-backend counters (the port's own counters are in `port.counters`)."""

    peers_accepted: int = 0  # connections taken as peers (server)
    peers_refused: int = 0  # connections over max_peers, closed at once
    peers_not_allowed: int = 0  # refused by allow_uids/allow_gids (SO_PEERCRED), closed at once
    peers_dropped_slow: int = 0  # disconnected by slow_peer = "drop-peer"
    peers_malformed: int = 0  # disconnected for a bad frame (framed mode)
    listen_failures: int = 0  # the listening socket could not be made (retried)
    connects: int = 0  # connections made (client)
    connect_failures: int = 0
    bytes_to_peers: int = 0  # guest bytes queued towards peers (each byte once)
    bytes_sent: int = 0  # bytes the peers' sockets took (each peer's copy)
    # Bytes queued for (or, drop-peer, taken for) a peer and never sent, by reason: see the
    # module doc.
    bytes_dropped_unsent: dict[str, int] = field(default_factory=dict)
    bytes_from_peers: int = 0  # payload bytes read from peers
    # Read from a peer, never handed to the port: a session-mode peer that left before its
    # session opened, or one cut off while its bytes waited for room.
    peer_bytes_dropped: int = 0
    # Peer bytes for a session that is over: read from a peer closed at its session's end, or
    # carried by stale DATA frames. (Bytes whose session ended while they waited for room in
    # the port's staging buffer are the port's: port.counters.discarded["stale"].)
    stale_bytes: int = 0
    stale_frames: int = 0  # DATA/CLOSE frames naming a session that is not open


# A peer's queue holds up to peer_queue bytes, or one guest write however large (a tx chain,
# framed: split into DATA frames), plus the OPEN/CLOSE frames that come outside flow control.
FRAMES_SLACK = 64 * 1024
# A framed peer's inbox holds the frame being read (at most MAX_FRAME + 4) and one read more.
INBOX_CAPACITY = 4 + MAX_FRAME + READ_CHUNK


def queue_capacity(limit: int) -> int:
    one_write = MAX_TX_CHAIN_BYTES + (MAX_TX_CHAIN_BYTES // MAX_DATA + 1) * 13
    return max(limit, one_write) + FRAMES_SLACK


class Peer:
    """One connection: a bounded queue towards it and the task that drains the queue.

    The queue (`out`) and, framed, the bytes read from the peer that are not handled yet
    (`inbox`) are FIFOs the port's custody holds, so that they outlive the process when the
    socket does (see "Continuity" in the module doc)."""

    def __init__(self, sock: trio.socket.SocketType, serial: int, label: str, limit: int,
                 custody: Custody, *, framed: bool) -> None:
        self.stream = trio.SocketStream(sock)
        self.serial = serial
        self.label = label
        self.limit = limit
        self.custody = custody
        self.out = custody.fifo(f"peerq.{serial}", queue_capacity(limit))
        self.inbox = custody.fifo(f"peerin.{serial}", INBOX_CAPACITY) if framed else None
        # Framed: payload bytes of the inbox's first frame already delivered, as (the inbox's
        # consumed count where that frame starts, how many): a hand-over goes on after them.
        self.partial: tuple[int, int] | None = None
        self.scope = trio.CancelScope()
        self.closing = False  # flush what is queued, then hang up (a session ended)
        self.dropped: str | None = None  # why we cut it off
        self.full_since: float | None = None  # drop-peer: when its queue first refused bytes
        self.session: Session | None = None  # session mode: the session it lives
        self.wait_scope: trio.CancelScope | None = None  # interrupted on bind / close
        self._scratch = bytearray(READ_CHUNK)  # where consumed bytes go (they were peeked)
        self._wake = trio.Event()

    @property
    def name(self) -> str:
        """Its socket's name in the port's custody."""
        return f"peer.{self.serial}"

    def __repr__(self) -> str:
        return f"<Peer {self.label} queued={len(self.out)}>"

    @property
    def live(self) -> bool:
        return not self.closing and self.dropped is None

    def can_take(self, n: int) -> bool:
        """Room for n more bytes (an empty queue takes any one chunk, however large)."""
        return not len(self.out) or len(self.out) + n <= self.limit

    def push(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue `data` whole, or nothing (False: the queue is full even past its slack)."""
        if len(data) > self.out.room:
            return False
        self.out.append(data)
        self._wake.set()
        return True

    def interrupt_wait(self) -> None:
        if self.wait_scope is not None:
            self.wait_scope.cancel()

    def close_after_flush(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + CLOSE_TIMEOUT)
        self._wake.set()
        self.interrupt_wait()

    def kill(self, why: str) -> None:
        if self.dropped is None:
            self.dropped = why
        self.scope.cancel()

    def close(self) -> None:
        """Let go of the socket and the FIFOs (out of custody first)."""
        self.custody.release(self.name)
        self.stream.socket.close()
        self.out.close()
        if self.inbox is not None:
            self.inbox.close()

    def hung_up(self) -> bool:
        """The peer shut down its sending side or closed; the reader may not have seen it yet."""
        poller = select.poll()
        poller.register(self.stream.socket.fileno(), select.POLLRDHUP)
        return bool(poller.poll(0))

    def unread(self) -> int:
        """Bytes the peer sent that are still in the socket (never read)."""
        count = array.array("i", [0])
        try:
            fcntl.ioctl(self.stream.socket.fileno(), termios.FIONREAD, count)
        except OSError:
            return 0
        return count[0]

    async def peek(self, limit: int = READ_CHUNK) -> bytes:
        """What the peer sent, left in the socket until `consume`d: bytes leave the socket
        only once they are where a successor finds them. b"" once it hung up."""
        data: bytes = await self.stream.socket.recv(limit, socket.MSG_PEEK)
        return data

    def consume(self, n: int) -> None:
        """Take n peeked bytes out of the socket, now: no checkpoint between a copy of them
        and this (a hand-over would leave them to be delivered twice)."""
        fd = self.stream.socket.fileno()
        while n > 0:
            got = os.readv(fd, [memoryview(self._scratch)[: min(n, READ_CHUNK)]])
            if got <= 0:
                raise ConnectionError(f"{n} peeked bytes are gone from the socket")
            n -= got

    async def write_loop(self, on_sent: Callable[[int], None]) -> None:
        """Drain the queue into the socket (`on_sent(n)` after each write: n bytes are the
        socket's now); when closing, flush and send EOF, then return."""
        while True:
            if not len(self.out):
                if self.closing:
                    break
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            # One send at a time, not send_all: what a failing socket took is known exactly.
            n = await self.stream.socket.send(self.out.peek(WRITE_CHUNK))
            self.out.consume(n)
            on_sent(n)
        await self.stream.send_eof()


_CONN_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def deliver(port: Port, data: bytes | memoryview, session: Session | None,
                  on_sent: Callable[[int], None]) -> None:
    """`port.send_all(data, session)`, calling `on_sent(n)` for each piece the port took
    with no checkpoint in between (see `Peer.consume`)."""
    view = memoryview(data)
    while view:
        n = port.send(view, session)
        on_sent(n)
        view = view[n:]
        if view:
            await port.wait_writable()


class PeerBackend(ConfigurableBackend):
    """Peers on stream sockets in stream, session or framed mode (see the module doc)."""

    counters: PeerCounters

    def __init__(self, endpoint: Endpoint, options: PeerOptions | None = None) -> None:
        self.endpoint = endpoint
        self.opts = options or PeerOptions()
        self.peers: list[Peer] = []
        self.counters = PeerCounters()
        self.address: Any = None  # the bound address once listening (tcp: (host, port))
        self._blocked: int | None = None  # size of the guest write we refused, if any
        self._poke = trio.Event()
        self._serial = 0
        self._nursery: trio.Nursery | None = None
        self._timer: float | None = None  # when a pending _wake_at fires
        self._departed = trio.Event()  # set (and replaced) whenever a peer leaves
        # The device's native data plane has the one peer's socket (see native_socket).
        self._native = False
        self._native_off = trio.Event()

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        raise NotImplementedError  # unix.py / tcp.py build the endpoint

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint.describe()} {self.opts.mode}>"

    @property
    def _where(self) -> str:
        port = getattr(self, "port", None)
        prefix = f"port {port.id} {port.name!r}: " if port is not None else ""
        return f"{prefix}{self.endpoint.describe()}"

    def _live(self) -> list[Peer]:
        return [p for p in self.peers if p.live]

    def endpoint_info(self) -> dict[str, object]:
        return {**self.endpoint.info(self.address), "role": self.opts.role,
                "mode": self.opts.mode, "peers": len(self._live()),
                "max_peers": self.opts.max_peers}

    # ------------------------------------------------------------------ native data plane

    def native_socket(self) -> int | None:
        # Stream mode, one live peer, nothing queued for it or refused: every byte would go
        # the way the native data plane sends it (a guest write blocks on a slow peer).
        if self.opts.mode != "stream" or self.opts.slow_peer != "block" or self._blocked:
            return None
        if len(self.peers) != 1 or not self.peers[0].live or len(self.peers[0].out):
            return None
        return self.peers[0].stream.socket.fileno()

    def native_engaged(self, engaged: bool) -> None:
        self._native = engaged
        if not engaged:
            self._native_off.set()
            self._native_off = trio.Event()

    def native_moved(self, *, to_host: int, from_host: int) -> None:
        self.counters.bytes_to_peers += to_host
        self.counters.bytes_sent += to_host
        self.counters.bytes_from_peers += from_host

    # ------------------------------------------------------------------ port callbacks

    def guest_data(self, data: bytes) -> bool:
        session = self.port.session
        targets = self._targets(session)
        if not targets or session is None:
            # A peer just left (the reconciler detaches us) or the session's peer is not
            # bound yet: hold the write, offered again when a peer is there.
            self._blocked = len(data)
            return False
        payload: bytes | bytearray = data
        if self.opts.mode == "framed":
            payload = b"".join(encode_data(session.id, data))
        if self.opts.slow_peer == "block":
            if not all(p.can_take(len(payload)) for p in targets):
                self._blocked = len(payload)
                return False
            for p in targets:
                p.push(payload)  # can_take: it fits
        else:
            now = trio.current_time()
            waiting: list[float] = []
            for p in targets:
                if p.can_take(len(payload)):
                    p.full_since = None
                    continue
                if p.full_since is None:
                    p.full_since = now
                if now - p.full_since >= SLOW_PEER_GRACE:
                    self._drop_slow(p)
                else:
                    waiting.append(p.full_since + SLOW_PEER_GRACE)
            if waiting:
                # Give a full peer a moment: the device hands over a whole ring of writes at
                # once, which says nothing about whether a peer keeps up.
                self._blocked = len(payload)
                self._wake_at(min(waiting))
                return False
            took = 0
            for p in targets:
                if p.live:
                    p.push(payload)
                    took += 1
            if not took:
                self._count_unsent(len(data), "drop-peer", "every peer")
                return True
        self.counters.bytes_to_peers += len(data)
        return True

    def session_opened(self, session: Session) -> None:
        if self.opts.mode == "framed":
            self._push_frame(encode(Open(session.id, session.port_name)))
        elif self.opts.mode == "session":
            self._bind()
        self._poke.set()

    def session_closed(self, session: Session, reason: Reason) -> None:
        self._blocked = None
        if self.opts.mode == "framed":
            self._push_frame(encode(Close(session.id, reason.value)))
        elif self.opts.mode == "session":
            for p in self._live():
                if p.session == session:
                    log.info("%s: session %d closed (%s): closing peer %s",
                             self._where, session.id, reason.value, p.label)
                    p.close_after_flush()
                    self.port.custody.changed()
        self._poke.set()

    def _push_frame(self, frame: bytes) -> None:
        """OPEN and CLOSE frames go outside flow control: a peer whose queue cannot take one
        even past its slack has read nothing for a long time, and is cut off."""
        for p in self._live():
            if not p.push(frame):
                self.counters.peers_dropped_slow += 1
                log.warning("%s: peer %s has not read its last %d bytes: disconnecting it",
                            self._where, p.label, len(p.out))
                p.kill(TOO_SLOW)

    # ------------------------------------------------------------------ H and flow control

    def _targets(self, session: Session | None) -> list[Peer]:
        live = self._live()
        if self.opts.mode == "session":
            return [p for p in live if session is not None and p.session == session]
        return live

    def _reconcile(self, new_peer: bool = False) -> None:
        """Make H follow the peers: attached while there is a live peer. Except in state E
        (the host ended the session, or the daemon is shutting down): the guest must see its
        EOF, so only a newly arrived peer starts the next session there; otherwise H comes
        back at the guest's next open."""
        port = self.port
        want = bool(self._live())
        if want and not port.state.host_open:
            if port.state is not State.E or new_peer:
                port.host_attach()
        elif not want and port.state.host_open:
            port.host_detach()
        self._bind()

    def _bind(self) -> None:
        """Session mode: give the open session to the waiting peer, if it has none."""
        session = self.port.session
        if self.opts.mode != "session" or session is None:
            return
        live = self._live()
        if any(p.session == session for p in live):
            return
        for p in live:
            if p.session is None:
                p.session = session
                log.info("%s: peer %s lives session %d", self._where, p.label, session.id)
                p.interrupt_wait()
                self.port.custody.changed()
                return

    def _maybe_resume(self) -> None:
        if self._blocked is None:
            return
        targets = self._targets(self.port.session)
        if targets and all(p.can_take(self._blocked) for p in targets):
            self._blocked = None
            self.port.resume_guest_data()

    def _wake_at(self, deadline: float) -> None:
        """Offer the held guest write again at `deadline` (to drop a peer still full then)."""
        if self._nursery is None or (self._timer is not None and self._timer <= deadline):
            return
        self._timer = deadline
        self._nursery.start_soon(self._timer_task, deadline)

    async def _timer_task(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        if self._timer == deadline:
            self._timer = None
        self.port.resume_guest_data()

    def _count_unsent(self, n: int, reason: str, whom: str) -> None:
        dropped = self.counters.bytes_dropped_unsent
        dropped[reason] = dropped.get(reason, 0) + n
        log.warning("%s: %d bytes for %s dropped unsent (%s; %d so far)", self._where, n, whom,
                    reason, sum(dropped.values()))

    def _listen_failed(self) -> None:
        self.counters.listen_failures += 1

    def _sent(self, n: int) -> None:
        self.counters.bytes_sent += n
        self._maybe_resume()

    def _drop_slow(self, peer: Peer) -> None:
        self.counters.peers_dropped_slow += 1
        log.warning("%s: peer %s too slow (%d bytes queued, peer_queue %d): disconnecting it",
                    self._where, peer.label, len(peer.out), peer.limit)
        peer.kill(TOO_SLOW)

    # ------------------------------------------------------------------ tasks

    async def drain(self) -> None:
        while any(peer.out for peer in self._live()):
            await trio.sleep(0.01)

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (server) or connect (client) until cancelled. `task_status.started()` gets
        the bound address (server) or None (client) once the socket is there."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                adopted = self._adopt()
                nursery.start_soon(self._reconcile_loop)
                if self.opts.role == "server":
                    for peer in adopted:
                        nursery.start_soon(self._run_peer, peer)
                    await self._serve(nursery, task_status)
                else:
                    task_status.started(None)
                    for peer in adopted:
                        await self._run_peer(peer)
                    await self._connect_loop()
        finally:
            if not self.port.custody.handing_over:
                self.endpoint.cleanup()

    # ------------------------------------------------------------------ continuity

    def continuity(self) -> dict[str, Any]:
        return {
            "serial": self._serial,
            "counters": self.counters.as_dict(),
            "peers": {str(p.serial): {"label": p.label, "closing": p.closing,
                                      "session": p.session.id if p.session else None,
                                      "partial": p.partial}
                      for p in self.peers},
        }

    def _adopt(self) -> list[Peer]:
        """The peers a predecessor kept (their sockets and FIFOs), taken back as they were:
        nothing is sent to them (no second OPEN) and H stays as the port has it."""
        custody = self.port.custody
        saved = custody.saved
        try:
            self.counters = PeerCounters(**saved.get("counters", {}))
            self._serial = int(saved.get("serial", 0))
        except (TypeError, ValueError) as e:
            log.error("%s: the predecessor's counters are unusable (%s): starting at 0",
                      self._where, e)
        metas = saved.get("peers", {})
        adopted: list[Peer] = []
        for name in custody.kept("peer."):
            fd = custody.take(name)
            serial = name.removeprefix("peer.")
            if fd is None or not serial.isdigit():
                continue
            try:
                sock = trio.socket.socket(fileno=fd)
            except OSError as e:
                log.error("%s: the kept socket %s is unusable: %s", self._where, name, e)
                custody.release(name)
                os.close(fd)
                continue
            meta = metas.get(serial, {}) if isinstance(metas, dict) else {}
            self._serial = max(self._serial, int(serial))
            peer = Peer(sock, int(serial), str(meta.get("label", f"#{serial}")),
                        self.opts.peer_queue, custody, framed=self.opts.mode == "framed")
            session = self.port.session
            if session is not None and meta.get("session") == session.id:
                peer.session = session
            partial = meta.get("partial")
            if isinstance(partial, list) and len(partial) == 2:
                peer.partial = (int(partial[0]), int(partial[1]))
            if meta.get("closing"):
                peer.close_after_flush()
            self.peers.append(peer)
            adopted.append(peer)
            log.info("%s: peer %s taken back from the predecessor (%d bytes queued for it)",
                     self._where, peer.label, len(peer.out))
        # FIFOs whose socket did not make it into the store: nothing can be done with them.
        for name in custody.kept("peerq.") + custody.kept("peerin."):
            fd = custody.take(name)
            custody.release(name)
            if fd is not None:
                os.close(fd)
        if adopted:
            self._bind()
        return adopted

    async def _reconcile_loop(self) -> None:
        while True:
            await self._poke.wait()
            self._poke = trio.Event()
            self._reconcile()
            self._maybe_resume()

    async def _serve(self, nursery: trio.Nursery, task_status: trio.TaskStatus[Any]) -> None:
        custody = self.port.custody
        kept = custody.take("listen")
        if kept is not None:
            listener = trio.socket.socket(fileno=kept)
            self.endpoint.adopted(listener)
        else:
            listener = await listen_retrying(self.endpoint, self._where, self._listen_failed)
            custody.keep("listen", listener.fileno())
        with listener:
            try:
                await self._accept_loop(listener, nursery, task_status)
            finally:
                custody.release("listen")

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery,
                           task_status: trio.TaskStatus[Any]) -> None:
        accepts = ListenerCounters()  # for accept_connection's log lines
        self.address = listener.getsockname()
        log.info("%s: listening (%s mode, up to %d peer(s))",
                 self._where, self.opts.mode, self.opts.max_peers)
        task_status.started(self.address)
        while True:
            sock = await accept_connection(listener, self._where, accepts)
            policy = self.endpoint.policy
            if policy is not None and refuses(policy, sock, self._where):
                self.counters.peers_not_allowed += 1
                sock.close()
                continue
            if len(self._live()) >= self.opts.max_peers:
                try:
                    await self._let_hung_up_peers_leave()
                except BaseException:  # cancelled: the backend stops
                    sock.close()
                    raise
            if len(self._live()) >= self.opts.max_peers:
                self.counters.peers_refused += 1
                log.warning("%s: connection refused: max_peers %d reached",
                            self._where, self.opts.max_peers)
                sock.close()
                continue
            self.counters.peers_accepted += 1
            nursery.start_soon(self._run_peer, self._arrive(sock))

    async def _let_hung_up_peers_leave(self) -> None:
        """Wait (up to HANGUP_WAIT) for the live peers that already hung up to leave: their
        readers have their last bytes and the hang-up to take first."""
        leaving = [p for p in self._live() if p.hung_up()]
        with trio.move_on_after(HANGUP_WAIT):
            while any(p.live and p in self.peers for p in leaving):
                await self._departed.wait()

    async def _connect_loop(self) -> None:
        delays = backoff_delays()
        failing = False
        while True:
            sock: trio.socket.SocketType | None = None
            try:
                with trio.move_on_after(CONNECT_TIMEOUT):
                    sock = await self.endpoint.connect()
                if sock is None:
                    raise TimeoutError(f"no answer in {CONNECT_TIMEOUT:.0f} s")
            except OSError as e:
                self.counters.connect_failures += 1
                delay = next(delays)
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "%s: connect failed: %s (retrying in %.1f s)", self._where, e, delay)
                failing = True
                await trio.sleep(delay)
                continue
            failing = False
            self.counters.connects += 1
            started = trio.current_time()
            peer = self._arrive(sock)
            await self._run_peer(peer)
            if peer.closing or trio.current_time() - started >= STABLE_AFTER:
                delays = backoff_delays()
            await trio.sleep(next(delays))

    def _arrive(self, sock: trio.socket.SocketType) -> Peer:
        self._serial += 1
        try:
            name = sock.getpeername()
        except OSError:
            name = None
        label = f"#{self._serial}" + (f" {name[0]}:{name[1]}" if isinstance(name, tuple) else "")
        custody = self.port.custody
        peer = Peer(sock, self._serial, label, self.opts.peer_queue, custody,
                    framed=self.opts.mode == "framed")
        custody.keep(peer.name, sock.fileno())
        self.peers.append(peer)
        log.info("%s: peer %s connected", self._where, label)
        before = self.port.session
        self._reconcile(new_peer=True)
        session = self.port.session
        if self.opts.mode == "framed" and session is not None and session == before:
            peer.push(encode(Open(session.id, session.port_name)))  # else session_opened did
        custody.changed()
        self._maybe_resume()
        self.port.settle()  # one peer more: the device decides where bytes go again
        return peer

    def _depart(self, peer: Peer) -> None:
        self.peers.remove(peer)
        self._departed.set()
        self._departed = trio.Event()
        why = peer.dropped or ("closed at its session's end" if peer.closing else "gone")
        log.info("%s: peer %s disconnected (%s)", self._where, peer.label, why)
        if trio.current_effective_deadline() == -math.inf:
            return  # the backend itself is stopping (port removed, shutdown): leave H alone
        self.port.custody.changed()
        session = self.port.session
        if (
            self.opts.mode == "session"
            and not peer.closing
            and session is not None
            and peer.session == session
        ):
            # The peer hung up in the middle of its session: the host ends it.
            self.port.end_session()
        else:
            self._reconcile()
        self._maybe_resume()

    async def _run_peer(self, peer: Peer) -> None:
        try:
            with peer.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_side, peer, nursery.cancel_scope)
                    try:
                        if self.opts.mode == "framed":
                            await self._read_framed(peer)
                        else:
                            await self._read_bytes(peer)
                    except _CONN_ERRORS as e:
                        log.info("%s: peer %s: %s", self._where, peer.label, e)
                    nursery.cancel_scope.cancel()
        finally:
            stopping = trio.current_effective_deadline() == -math.inf
            if not (stopping and self.port.custody.handing_over):
                # At a hand-over the peer goes on with the successor, queue and all.
                self._count_lost(peer, stopping=stopping)
            peer.close()
            self._depart(peer)

    def _count_lost(self, peer: Peer, *, stopping: bool) -> None:
        """What a departing peer leaves behind, both ways (see the module doc)."""
        if len(peer.out):
            if peer.dropped == TOO_SLOW:
                reason = "drop-peer"
            elif peer.dropped is not None:
                reason = "malformed-frame"
            elif stopping:
                reason = "stopped"
            elif peer.closing and peer.scope.cancelled_caught:
                reason = "close-timeout"
            else:
                reason = "peer-gone"
            self._count_unsent(len(peer.out), reason, f"peer {peer.label}")
            peer.out.clear()
        # What a stream peer sent that was never taken (framed: a frame being delivered
        # counts its own rest, see _peer_frame) was read and dropped, as far as it knows.
        unread = peer.unread() if peer.inbox is None else 0
        if unread:
            self.counters.bytes_from_peers += unread
            self.counters.peer_bytes_dropped += unread
            log.info("%s: peer %s cut off: %d bytes it sent dropped", self._where, peer.label,
                     unread)

    async def _write_side(self, peer: Peer, cancel: trio.CancelScope) -> None:
        try:
            await peer.write_loop(self._sent)
        except _CONN_ERRORS as e:
            log.info("%s: peer %s: %s", self._where, peer.label, e)
            cancel.cancel()
        # After a flush-and-EOF the reader goes on until the peer hangs up (or the deadline).

    async def _drop_stale(self, peer: Peer) -> bool:
        """A peer closed at its session's end: what it still sends is for a session that is
        over (read and dropped, counted) until it hangs up (False)."""
        data = await peer.peek()
        if data:
            peer.consume(len(data))
            self.counters.stale_bytes += len(data)
            log.info("%s: peer %s: %d bytes after its session ended dropped",
                     self._where, peer.label, len(data))
        return bool(data)

    async def _wait_for_session(self, peer: Peer) -> bool:
        """Session mode, the peer not bound yet: what it sends waits in its socket until its
        session opens. False: it hung up meanwhile."""
        with trio.CancelScope() as wait:
            peer.wait_scope = wait
            if not await peer.peek(1):
                return False
            # It sent something: only a hang-up (which poll tells with the bytes unread)
            # ends the wait before the session opens.
            while not peer.hung_up():
                await trio.sleep(HANGUP_POLL)
            return False
        peer.wait_scope = None
        return True

    async def _read_bytes(self, peer: Peer) -> None:
        """stream and session modes."""
        session_mode = self.opts.mode == "session"
        while True:
            if peer.closing:
                if not await self._drop_stale(peer):
                    return
                continue
            if session_mode and peer.session is None:
                if not await self._wait_for_session(peer):
                    return
                continue
            data = await peer.peek()
            if not data:
                return
            if self._native:
                await self._native_off.wait()  # the native data plane reads them meanwhile
                continue
            if peer.closing:
                continue
            # Only ever into the session the bytes were read in (the port drops the rest of
            # them, counted stale, if that session ends while we wait for room).
            session = peer.session if session_mode else self.port.session
            await deliver(self.port, data, session, lambda n: self._took(peer, n))

    def _took(self, peer: Peer, n: int) -> None:
        peer.consume(n)
        self.counters.bytes_from_peers += n

    async def _read_framed(self, peer: Peer) -> None:
        inbox = peer.inbox
        assert inbox is not None
        while True:
            try:
                # Whole frames first: a predecessor's, or what the last read completed.
                while (size := frame_size(inbox.peek(5))) is not None and len(inbox) >= size:
                    await self._peer_frame(peer, inbox, size)
            except FrameError as e:
                self.counters.peers_malformed += 1
                log.warning("%s: peer %s sent a malformed frame, disconnecting it: %s",
                            self._where, peer.label, e)
                peer.dropped = MALFORMED
                return
            if peer.closing:
                if not await self._drop_stale(peer):
                    return
                continue
            data = await peer.peek(min(READ_CHUNK, inbox.room))
            if not data:
                if len(inbox):
                    log.info("%s: peer %s hung up in the middle of a frame", self._where,
                             peer.label)
                return
            if not peer.closing:
                inbox.append(data)
                peer.consume(len(data))

    async def _peer_frame(self, peer: Peer, inbox: Staging, size: int) -> None:
        """Handle the inbox's first frame (`size` bytes), then take it out of the inbox."""
        frame = decode(inbox.peek(size))
        start = inbox.consumed
        current = self.port.session
        if isinstance(frame, Data):
            if current is None or current.id != frame.session:
                self.counters.bytes_from_peers += len(frame.data)
                self.counters.stale_frames += 1
                self.counters.stale_bytes += len(frame.data)
                log.info("%s: peer %s: DATA of %d bytes for session %d dropped (open: %s)",
                         self._where, peer.label, len(frame.data), frame.session,
                         current.id if current else "none")
            else:
                # A hand-over in the middle of the frame: the successor goes on after what
                # was delivered (after a crash it delivers the whole frame again).
                done = peer.partial[1] if peer.partial and peer.partial[0] == start else 0
                if not done:
                    self.counters.bytes_from_peers += len(frame.data)
                peer.partial = (start, done)

                def sent(n: int) -> None:
                    peer.partial = (start, peer.partial[1] + n if peer.partial else n)

                try:
                    await deliver(self.port, memoryview(frame.data)[done:], current, sent)
                except BaseException:
                    if not self.port.custody.handing_over and peer.partial is not None:
                        left = len(frame.data) - peer.partial[1]
                        self.counters.peer_bytes_dropped += left
                        log.info("%s: peer %s cut off: %d bytes it sent dropped", self._where,
                                 peer.label, left)
                    raise
        elif isinstance(frame, Close):
            if current is None or current.id != frame.session:
                self.counters.stale_frames += 1
                log.info("%s: peer %s: CLOSE for session %d ignored (open: %s)",
                         self._where, peer.label, frame.session,
                         current.id if current else "none")
            else:
                log.info("%s: peer %s ends session %d (%s)", self._where, peer.label,
                         frame.session, frame.reason)
                self.port.end_session()
        else:  # frame_size refuses OPEN from peers; kept for exhaustiveness
            raise FrameError("peers may not send OPEN")
        peer.partial = None
        inbox.consume(size)
