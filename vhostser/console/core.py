"""The virtio-console multiport device, sans-io (the h11/h2 shape).

`ConsoleCore` owns the device's whole state (`state.DeviceState`, plain data) and makes every
decision: the control handshake (`handshake.TABLE`), the sessions (`session.TABLE`), which
chain is filled, completed, held or dropped, what is counted. It does no I/O: no trio, no fds,
no sockets. In go guest control messages and descriptor chains (through the rings the owner
attaches: views of guest memory), host events and host bytes; out come used-ring pushes (made
on the attached rings), guest bytes for the backends (the one question the core asks, through
`deliver`: "can the backend take these now?") and `Output`s the owner carries out: backend
session callbacks, queue wake-ups, credit for blocked senders, a config-space change.

Queue map (virtio 1.2 §5.3.2): port 0 rx=0 tx=1, control rx=2 tx=3, port n≥1 rx=2n+2
tx=2n+3; "rx" is host→guest. Config space: `le16 cols, le16 rows, le32 max_nr_ports,
le32 emerg_wr`.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from virtqueue import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Chain,
    ChainError,
    RingError,
    SplitQueue,
)

from ..logs import RateLimiter
from . import control, handshake
from .control import ControlError, ControlMessage, Event
from .handshake import Announce, HandshakeEffect, HandshakeInput
from .session import Effect, Input, Reason, State, transition
from .staging import Staging
from .state import MAX_PORTS, DeviceState, PortConfig, PortState, Session

log = logging.getLogger("vhostser.console")

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2
FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_EVENT_IDX
    | VIRTIO_F_RING_INDIRECT_DESC
    | VIRTIO_CONSOLE_F_SIZE
    | VIRTIO_CONSOLE_F_MULTIPORT
    | VIRTIO_CONSOLE_F_EMERG_WRITE
)

CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8
CONTROL_RX, CONTROL_TX = 2, 3
# Outgoing control messages wait here while the guest has no control buffer posted. 31 ports
# need at most ~4 messages each per (re)announcement; the bound only catches a runaway.
MAX_PENDING_CONTROL = 1024
# The most guest bytes one tx chain may carry; a longer one is completed unread and counted.
# Linux writes at most 32 KiB per chain; the walker only bounds a chain to 4 GiB, and its
# buffers may all alias the same guest page, so without this bound one chain could make the
# daemon copy gigabytes.
MAX_TX_CHAIN_BYTES = 1 << 20
# A guest's control messages are 8 bytes, in PAGE_SIZE buffers.
MAX_CONTROL_CHAIN_BYTES = 4096


def rx_queue(port_id: int) -> int:
    return 2 * port_id + 2 if port_id else 0


def tx_queue(port_id: int) -> int:
    return 2 * port_id + 3 if port_id else 1


def port_of_queue(index: int) -> tuple[int, bool] | None:
    """(port id, is_rx) for a data queue; None for the control queues."""
    if index in (CONTROL_RX, CONTROL_TX):
        return None
    port = 0 if index < 2 else (index - 2) // 2
    return port, index % 2 == 0


# ---------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class SessionOpened:
    port_id: int
    session: Session


@dataclass(frozen=True, slots=True)
class SessionClosed:
    port_id: int
    session: Session
    reason: Reason


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The port's session state moved (after the effects of the move were output)."""

    port_id: int
    old: State
    new: State


@dataclass(frozen=True, slots=True)
class Wake:
    """Queue `index` may make progress now: serve it (and notify the guest if it asks)."""

    index: int


@dataclass(frozen=True, slots=True)
class Credit:
    """The port's staging buffer gained room: wake senders waiting for it."""

    port_id: int


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """The config space changed (console size): the front end must tell the guest."""


@dataclass(frozen=True, slots=True)
class RingBroken:
    """The guest broke queue `index`; its port's queues are no longer served (the front end
    may be told through the ring's err eventfd)."""

    index: int


Output = SessionOpened | SessionClosed | StateChanged | Wake | Credit | ConfigChanged | RingBroken

# Asked for guest bytes of a port: True if the backend took them, False to hold them.
Deliver = Callable[[int, bytes], bool]


class ConsoleCore:
    """The device's state and every decision about it; see the module doc."""

    def __init__(
        self,
        state: DeviceState,
        deliver: Deliver,
        *,
        resumed: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`resumed`: `state` is a predecessor's, and the rings about to start are the ones
        it ran (until `resume_done`)."""
        if not 1 <= state.max_ports <= MAX_PORTS:
            raise ValueError(f"max_ports {state.max_ports} not in 1..{MAX_PORTS}")
        self.state = state
        self._deliver = deliver
        self._resuming = resumed
        # Where a new port's staged host bytes live (the daemon: a memfd in the fd store).
        self.new_staging: Callable[[PortConfig], Staging] = (
            lambda config: Staging.in_memory(config.staging_limit))
        # Where a new port's ledger counters live (the daemon: `PortCounters.share` them
        # into a memfd in the fd store); in memory unless told.
        self.share_counters: Callable[[PortState], None] = lambda port: None
        # Called once a guest control message is handled, before its buffer is completed:
        # the owner makes the state durable there (the state region).
        self.checkpoint: Callable[[], object] = lambda: None
        self._outputs: deque[Output] = deque()
        # Every line the guest can make us log again and again goes through this.
        self._limit = RateLimiter(log, clock=clock)
        # Runtime only, never serialized: the started rings, per port the tx chain whose
        # bytes its backend refused (given back to its ring when the ring stops), and the
        # rings the guest broke (not served until started again).
        self._rings: dict[int, SplitQueue] = {}
        self._held: dict[int, tuple[Chain, bytes]] = {}
        self._broken: dict[int, str] = {}
        # Handed over (see `freeze`): nothing moves any more.
        self.frozen = False
        # Rings lent to the native data plane (console.fastpath): not served here. Before
        # anything about a port changes, `before_change(port_id)` takes its rings back.
        self.lent: set[int] = set()
        self.before_change: Callable[[int], None] = lambda port_id: None
        # Per port: bytes of the next tx chain the native data plane already sent.
        self._skip: dict[int, int] = {}

    def freeze(self) -> None:
        """The state as it is now goes to a successor (a planned restart): from here no ring
        is served, no host byte or event taken, so nothing changes behind the snapshot that
        the successor resumes from (a task already woken would otherwise move bytes, and
        count them, after it)."""
        for pid in list(self.state.ports):
            self.before_change(pid)
        self.frozen = True

    # ================================================================== native data plane

    def native_ok(self, port_id: int) -> bool:
        """Whether port `port_id`'s bytes need no decision now: its session is open on both
        sides, nothing is staged, held or half sent, and both its rings run unbroken."""
        port = self.state.ports.get(port_id)
        rings = (tx_queue(port_id), rx_queue(port_id))
        return (port is not None and not self.frozen and not port.config.console
                and port.session is State.A and not port.staging
                and port_id not in self._held and port_id not in self._skip
                and all(i in self._rings and i not in self._broken and i not in self.lent
                        for i in rings))

    def lend(self, index: int) -> None:
        self.lent.add(index)

    def take_back(self, index: int) -> None:
        self.lent.discard(index)

    def resume_chain(self, port_id: int, offset: int) -> None:
        """The next tx chain of the port was sent in part (`offset` bytes, counted)."""
        self._skip[port_id] = offset

    def retake(self, index: int) -> None:
        """Ring `index`'s last chain taken is to be taken again (the native data plane
        stopped at it without completing it: the core decides what it is)."""
        self._rings[index].unpop()

    @property
    def held_ports(self) -> list[int]:
        """Ports whose backend refused the bytes of the tx chain now held."""
        return sorted(self._held)

    def outputs(self) -> list[Output]:
        """What the owner must do now, in order; each output is returned once."""
        out = list(self._outputs)
        self._outputs.clear()
        return out

    # ================================================================== description

    @property
    def multiport(self) -> bool:
        return bool(self.state.acked_features & VIRTIO_CONSOLE_F_MULTIPORT)

    @property
    def num_queues(self) -> int:
        return 2 * self.state.max_ports + 2

    @property
    def max_queue_size(self) -> int:
        return MAX_QUEUE_SIZE

    @property
    def features(self) -> int:
        return FEATURES

    def get_config(self, offset: int, size: int) -> bytes:
        s = self.state
        space = CONFIG.pack(s.cols, s.rows, s.max_ports, 0)
        return (space + bytes(max(0, offset + size - len(space))))[offset : offset + size]

    # ================================================================== ports

    def add_port(self, config: PortConfig, *, first_session_id: int = 1) -> None:
        """Create a port (hotplug if the guest driver is up: DEVICE_ADD)."""
        ports = self.state.ports
        if not 0 <= config.id < self.state.max_ports:
            raise ValueError(f"port id {config.id} not in 0..{self.state.max_ports - 1}")
        if config.id in ports:
            raise ValueError(f"port {config.id} exists")
        if config.name and any(p.config.name == config.name for p in ports.values()):
            raise ValueError(f"a port is already named {config.name!r}")
        port = ports[config.id] = PortState(config, next_session_id=first_session_id,
                                            staging=self.new_staging(config))
        self.share_counters(port)
        if self.state.driver_ready and self.multiport:
            self._handshake(port, HandshakeInput.DRIVER_READY)
        elif not self.multiport and config.id == 0 and tx_queue(0) in self._rings:
            self._apply(port, Input.GUEST_OPEN)
        log.info("port %d %r added", config.id, config.name)

    def remove_port(self, port_id: int) -> None:
        """Hot-unplug: the session closes (port-removed), the guest gets DEVICE_REMOVE."""
        port = self.state.ports.get(port_id)
        if port is None:
            raise KeyError(f"no port {port_id}")
        self._apply(port, Input.REMOVE)
        self._handshake(port, HandshakeInput.REMOVE)
        del self.state.ports[port_id]
        port.staging.close()
        port.counters.close()
        # Counted on the device: the port and its counters are gone.
        self._drop_held(port_id, "port-removed")
        log.info("port %d %r removed", port_id, port.config.name)

    def restore_session(self, port_id: int, session_id: int) -> None:
        """After a daemon restart: the guest still has the port open in this session (from the
        state file); the backend hears `session_opened` again, as a replay."""
        port = self.state.ports[port_id]
        if port.session is not State.B:
            raise ValueError(f"port {port_id}: restore in state {port.session.name}")
        port.session = State.D
        port.session_id = session_id
        port.next_session_id = max(port.next_session_id, session_id + 1)
        session = port.current_session
        assert session is not None
        log.info("%s: session %d restored (guest had it open)", self._who(port), session_id)
        self._outputs.append(SessionOpened(port_id, session))

    def adopt(self, source: DeviceState) -> None:
        """Go on from a migration source's state (VHOST_USER_SET_DEVICE_STATE_FD): the guest's
        side of every port — handshake, open session and its id, what it was told — comes from
        `source`; the host side (which backends have a peer) stays this daemon's, and the guest
        is told where that differs. The guest's open sessions are replayed to the backends; no
        session id is reused. A port only the source had is removed (DEVICE_REMOVE), one only
        this daemon has is hot-plugged."""
        if source.max_ports != self.state.max_ports:
            raise ValueError(f"the source has max_ports {source.max_ports}, this device "
                             f"{self.state.max_ports}")
        local, mine = self.state, self.state.ports
        for field_name in ("cols", "rows", "acked_features", "status", "driver_ready",
                           "control_tx_handled"):
            setattr(local, field_name, getattr(source, field_name))
        local.control_out = deque(m for m in source.control_out if m.id in mine)
        for pid, theirs in sorted(source.ports.items()):
            port = mine.get(pid)
            if port is None:
                if theirs.announce in (Announce.ADDED, Announce.READY):
                    self._queue_control(control.device_remove(pid))
                continue
            host = port.session.host_open
            port.announce = theirs.announce
            port.session_id = theirs.session_id
            port.next_session_id = max(port.next_session_id, theirs.next_session_id)
            if theirs.session is State.E:
                port.session = State.E
            elif theirs.session.in_session:
                port.session = State.A if host else State.D
            else:
                port.session = State.C if host else State.B
            if port.session_id is not None:
                port.counters.bytes_from_host += port.staging.append(theirs.staging.data())
                session = port.current_session
                assert session is not None
                self._outputs.append(SessionOpened(pid, session))
            if port.guest_ready and theirs.session.host_open != port.session.host_open:
                self._queue_control(control.port_open(pid, port.session.host_open))
        for pid, port in sorted(mine.items()):
            if pid not in source.ports:
                port.announce = Announce.UNKNOWN
                if local.driver_ready and self.multiport:
                    self._handshake(port, HandshakeInput.DRIVER_READY)
        log.info("device state adopted from a migration source (%d ports)", len(mine))

    def resize(self, port_id: int, cols: int, rows: int) -> None:
        """A console port's size changed: RESIZE (multiport) or the config space (port 0)."""
        port = self.state.ports[port_id]
        if self.multiport and port.guest_ready:
            self._queue_control(
                control.resize(port_id, cols, rows, rows_first=self.state.resize_rows_first)
            )
        if port_id == 0:
            self.state.cols, self.state.rows = cols, rows
            self._outputs.append(ConfigChanged())

    def close_all(self, reason: Input) -> None:
        """Close every open session (FRONTEND_GONE, SHUTDOWN)."""
        for port in list(self.state.ports.values()):
            self._apply(port, reason)

    # ================================================================== host side

    def host_event(self, port_id: int, event: Input) -> None:
        """HOST_OPEN, HOST_CLOSE or HOST_END from the port's backend."""
        if event not in (Input.HOST_OPEN, Input.HOST_CLOSE, Input.HOST_END):
            raise ValueError(f"{event.value} is not a host event")
        if self.frozen:
            return
        self._apply(self.state.ports[port_id], event)

    def host_send(self, port_id: int, data: bytes | memoryview,
                  session: Session | None = None) -> int:
        """Stage host bytes for the guest; how many were taken (all of them if they are
        dropped: the guest has the port closed, or `session` — the one they were meant for —
        is over). Never more than the staging room; nothing once frozen."""
        if self.frozen:
            return 0
        port = self.state.ports[port_id]
        if not port.session.in_session:
            reason = "no-session" if port.session.guest_open else "guest-closed"
            port.counters.bytes_from_host += len(data)
            port.counters.drop("to_guest", reason, len(data))
            return len(data)
        if session is not None and session != port.current_session:
            port.counters.bytes_from_host += len(data)
            port.counters.drop("to_guest", "stale", len(data))
            return len(data)
        taken = min(self.staging_room(port_id), len(data))
        port.counters.bytes_from_host += taken
        if taken > 0:
            port.staging.append(data[:taken])
            self._outputs.append(Wake(rx_queue(port_id)))
        return taken

    def staging_room(self, port_id: int) -> int:
        return self.state.ports[port_id].staging.room

    def resume_guest_data(self, port_id: int) -> None:
        """The backend can take guest bytes again."""
        self._outputs.append(Wake(tx_queue(port_id)))

    # ================================================================== front end

    def features_acked(self, features: int) -> None:
        self.state.acked_features = features

    def status_changed(self, status: int) -> None:
        # SET_STATUS 0 is a stop (pause, migration), not a reset: sessions stay.
        self.state.status = status

    def reset(self) -> None:
        log.info("device reset by the front end")
        self._reset_sessions()
        self.state.acked_features = 0
        self.state.status = 0

    def set_config(self, offset: int, data: bytes) -> None:
        if offset != EMERG_WR_OFFSET or len(data) != 4:
            self._limit.warning("config writes", "config write of %d bytes at %d ignored: "
                                "only emerg_wr is writable", len(data), offset)
            return
        # Emergency write: one character, usable before the queues exist (virtio §5.3.6).
        port = self.state.ports.get(0)
        if port is None:
            self.state.counters.bytes_on_missing_ports += 1
            self._limit.warning("emergency writes", "emergency write of 0x%02x with no port 0: "
                                "dropped", data[0])
        elif not self.guest_bytes(0, bytes([data[0]])):
            # Nothing may wait here (there is no chain to hold): what cannot be taken is lost.
            port.counters.bytes_guest_wrote += 1
            port.counters.drop("from_guest", "no-host", 1)

    def resume_done(self) -> None:
        """Every ring the predecessor ran is running again."""
        self._resuming = False

    def ring_started(self, index: int, ring: SplitQueue) -> None:
        """Queue `index` runs on `ring` from now on (a ring broken before is set up anew)."""
        self._rings[index] = ring
        self._broken.pop(index, None)
        if self._resuming:
            return  # the state says where everything stands already
        if index == CONTROL_TX:
            self.state.control_tx_handled = ring.next_avail
        if not self.multiport and index == tx_queue(0) and 0 in self.state.ports:
            # Without MULTIPORT port 0 is a console the guest never announces: it is open
            # from the moment the driver runs its queues.
            self._apply(self.state.ports[0], Input.GUEST_OPEN)

    def ring_stopped(self, index: int) -> None:
        """Queue `index` stops: a held chain goes back to its ring, which resumes at it, so
        the guest's bytes are offered again after the stop (exactly once)."""
        ring = self._rings.pop(index, None)
        where = port_of_queue(index)
        if ring is None or where is None or where[1]:
            return
        held = self._held.pop(where[0], None)
        if held is not None:
            ring.give_back(held[0])

    def ring_broken(self, index: int, reason: str) -> bool:
        """The guest broke queue `index` (a RingError: nothing on it can be trusted). The
        containment rule: a broken control queue is the device's (True: the caller marks it
        NEEDS_RESET); a broken port queue is that port's alone (False): both its queues stop
        being served until started again, counted and logged, and the control queue and the
        other ports go on."""
        where = port_of_queue(index)
        if where is None:
            return True
        port_id = where[0]
        if index in self._broken:
            return False
        for i in (rx_queue(port_id), tx_queue(port_id)):
            self._broken.setdefault(i, reason)
        self.state.counters.rings_broken += 1
        self._limit.error(f"port {port_id}: broken rings",
                          "vring %d (port %d) broken by the guest, the port's queues are no "
                          "longer served (the control queue and other ports go on): %s",
                          index, port_id, reason)
        self._outputs.append(RingBroken(index))
        return False

    # ================================================================== queue service

    def service(self, index: int) -> bool:
        """Serve the started queue `index`: True if it stopped for lack of guest buffers (so
        kicks are wanted), False if the device side is blocked (a Wake output follows when it
        can go on). RingError propagates: the ring cannot be trusted any more (see
        `ring_broken`). A broken port queue is not served, nor a lent one, nor any once
        frozen."""
        if index in self._broken or index in self.lent or self.frozen:
            return False
        ring = self._rings[index]
        if index == CONTROL_TX:
            return self._serve_control_tx(ring)
        if index == CONTROL_RX:
            return self._serve_control_rx(ring)
        where = port_of_queue(index)
        assert where is not None
        port_id, is_rx = where
        return self._serve_rx(ring, port_id) if is_rx else self._serve_tx(ring, port_id)

    def _pop(self, index: int, ring: SplitQueue) -> Chain | None:
        """The next good chain, or None. A bad chain is logged, counted and given back empty,
        as rust-vmm's virtio-queue does."""
        if index in self.lent and (where := port_of_queue(index)) is not None:
            # The one place the core takes chains: a lent ring comes back first, at its
            # positions (a guest close drops the port's unsent chains, say).
            self.before_change(where[0])
        while True:
            try:
                return ring.pop()
            except ChainError as e:
                self._count_bad_chain("descriptor")
                self._limit.warning(f"vring {index}: bad descriptor chains",
                                    "vring %d: bad descriptor chain %d skipped: %s",
                                    index, e.head, e)
                ring.push(e.head, 0)

    # -- control queues

    def _queue_control(self, msg: ControlMessage) -> None:
        pending = self.state.control_out
        if msg.event is Event.PORT_OPEN:
            # H flaps the guest has not read yet (a paused VM, peers coming and going) collapse
            # into the one pending PORT_OPEN of the port, carrying the latest H: the guest ends
            # with the final value, in its place among the port's messages, and the queue
            # cannot fill with them.
            for i, queued in enumerate(pending):
                if queued.event is Event.PORT_OPEN and queued.id == msg.id:
                    pending[i] = msg
                    return
        if len(pending) >= MAX_PENDING_CONTROL:
            self.state.counters.control_overflow += 1
            self._limit.error("control queue full", "control queue to the guest full (%d): "
                              "%s for port %d dropped", MAX_PENDING_CONTROL, msg.event.name,
                              msg.id)
            return
        pending.append(msg)
        self._outputs.append(Wake(CONTROL_RX))

    def _serve_control_rx(self, ring: SplitQueue) -> bool:
        pending = self.state.control_out
        while pending:
            chain = self._pop(CONTROL_RX, ring)
            if chain is None:
                return True
            data = pending[0].pack()
            if chain.writable_len < len(data):
                self._count_bad_chain("control-rx-too-small")
                self._limit.warning(f"vring {CONTROL_RX}: small control buffers",
                                    "vring %d: control buffer of %d bytes < message of %d",
                                    CONTROL_RX, chain.writable_len, len(data))
                ring.push(chain.head, 0)
                continue
            msg = pending.popleft()
            ring.push(chain.head, chain.write(data))
            self.state.counters.control_to_guest += 1
            port = self.state.ports.get(msg.id)
            if msg.event is Event.DEVICE_ADD and port is not None:
                self._handshake(port, HandshakeInput.ADD_DELIVERED)
        return False

    def _serve_control_tx(self, ring: SplitQueue) -> bool:
        # The guest busy-waits for each control buffer to come back: complete them at once,
        # once handled and made durable.
        while (chain := self._pop(CONTROL_TX, ring)) is not None:
            if chain.readable_len > MAX_CONTROL_CHAIN_BYTES:
                self._count_bad_chain("control-tx-too-long")
                self._limit.warning(f"vring {CONTROL_TX}: long control chains",
                                    "vring %d: control chain %d of %d bytes (> %d) skipped",
                                    CONTROL_TX, chain.head, chain.readable_len,
                                    MAX_CONTROL_CHAIN_BYTES)
                ring.push(chain.head, 0)
                continue
            at = (ring.next_avail - 1) & 0xFFFF
            if 0 < (self.state.control_tx_handled - at) & 0xFFFF <= ring.size:
                log.info("control message %d was handled before the restart: completed", at)
            else:
                self._control_chain(chain.read())
                self.state.control_tx_handled = (at + 1) & 0xFFFF
                self.checkpoint()
            ring.push(chain.head, 0)
        return True

    def _control_chain(self, data: bytes) -> None:
        self.state.counters.control_from_guest += 1
        try:
            msg = control.parse(data)
        except ControlError as e:
            self.state.counters.bad_control += 1
            self._limit.warning("bad control messages",
                                "vring %d: bad control message ignored: %s", CONTROL_TX, e)
            return
        self.control_from_guest(msg)

    def control_from_guest(self, msg: ControlMessage) -> None:
        """One control message the guest sent (DEVICE_READY, PORT_READY, PORT_OPEN)."""
        if msg.event is Event.DEVICE_READY:
            self._device_ready(msg.value)
            return
        port = self.state.ports.get(msg.id)
        if port is None:
            self.state.counters.bad_control += 1
            self._limit.warning("control for missing ports",
                                "control %s for port %d ignored: no such port "
                                "(max_nr_ports %d)", msg.event.name, msg.id,
                                self.state.max_ports)
            return
        if msg.event is Event.PORT_READY:
            self._handshake(port, HandshakeInput.PORT_READY if msg.value == 1
                            else HandshakeInput.PORT_FAILED)
        elif self._handshake(port, HandshakeInput.GUEST_PORT_OPEN):
            if msg.value:
                self._apply(port, Input.GUEST_OPEN)
            else:
                self._flush_guest_tx(port)
                self._apply(port, Input.GUEST_CLOSE)
        else:
            self._limit.warning("early PORT_OPEN", "port %d: PORT_OPEN(%d) before PORT_READY "
                                "ignored", msg.id, msg.value)

    def _device_ready(self, value: int) -> None:
        self.state.counters.device_ready += 1
        if value != 1:
            self._limit.warning("DEVICE_READY failed", "the guest driver failed to initialise "
                                "the device (DEVICE_READY %d)", value)
            return
        if self.state.driver_ready:
            # The driver initialised the device again (reboot, driver reload) without a front-end
            # reset: every session of the old driver instance ends here.
            self._limit.info("DEVICE_READY again", "DEVICE_READY again: the guest driver "
                             "restarted; resetting sessions")
            self._reset_sessions()
        self.state.driver_ready = True
        for port_id in sorted(self.state.ports):
            self._handshake(self.state.ports[port_id], HandshakeInput.DRIVER_READY)

    def _reset_sessions(self) -> None:
        self.state.driver_ready = False
        self.state.control_out.clear()
        self._held.clear()
        for port in self.state.ports.values():
            self._apply(port, Input.RESET)

    # -- port data queues

    def _serve_rx(self, ring: SplitQueue, port_id: int) -> bool:
        port = self.state.ports.get(port_id)
        if port is None:
            return False
        index = rx_queue(port_id)
        staging = port.staging
        filled = False
        try:
            while staging:
                chain = self._pop(index, ring)
                if chain is None:
                    return True
                if not chain.writable:
                    self._count_bad_chain("rx-readonly")
                    self._limit.warning(f"vring {index}: read-only rx chains",
                                        "vring %d (port %d): rx chain %d has no writable "
                                        "buffer", index, port_id, chain.head)
                    ring.push(chain.head, 0)
                    continue
                n = chain.write(staging.peek(chain.writable_len))
                self._consumed(port, n)
                filled = True
                ring.push(chain.head, n)
            return False
        finally:
            if filled:  # once for the whole drain, not per buffer: senders wake once
                self._outputs.append(Credit(port_id))

    def take_staged(self, port_id: int, n: int) -> memoryview | bytes:
        """The first n staged host bytes, to copy into a guest rx buffer (then `consumed`)."""
        return self.state.ports[port_id].staging.peek(n)

    def consumed(self, port_id: int, n: int) -> None:
        """n staged bytes went into one guest rx buffer."""
        self._consumed(self.state.ports[port_id], n)
        self._outputs.append(Credit(port_id))

    def _consumed(self, port: PortState, n: int) -> None:
        port.staging.consume(n)
        port.counters.bytes_to_guest += n
        port.counters.buffers_to_guest += 1

    def _serve_tx(self, ring: SplitQueue, port_id: int) -> bool:
        index = tx_queue(port_id)
        while True:
            port = self.state.ports.get(port_id)
            held = self._held.pop(port_id, None)
            if held is None:
                if port is not None and not self.guest_may_write(port_id):
                    return False  # leave the chains in the ring: the guest's write blocks
                chain = self._pop(index, ring)
                if chain is None:
                    return True
                if not self._tx_chain_usable(index, port_id, chain):
                    ring.push(chain.head, 0)
                    continue
                held = (chain, chain.read())
                if skip := self._skip.pop(port_id, 0):
                    # Sent (and counted) by the native data plane before it stopped.
                    held = (chain, held[1][skip:])
            chain, data = held
            if not self.guest_bytes(port_id, data):
                self._held[port_id] = held
                return False
            ring.push(chain.head, 0)

    def _tx_chain_usable(self, index: int, port_id: int, chain: Chain) -> bool:
        """Whether the bytes of a tx chain may be read (copied) at all; if not, the chain is
        to be completed empty, and what it held is counted here. Decided from the descriptor
        lengths, before any copy."""
        if chain.writable:
            self._count_bad_chain("tx-writable")
            self._limit.warning(f"vring {index}: writable tx chains",
                                "vring %d (port %d): tx chain %d has device-writable buffers",
                                index, port_id, chain.head)
            return False
        port = self.state.ports.get(port_id)
        if port is None:
            self._count_missing(port_id, index, chain.readable_len)
            return False
        if chain.readable_len > MAX_TX_CHAIN_BYTES:
            self._count_bad_chain("tx-too-long")
            port.counters.bytes_guest_wrote += chain.readable_len
            port.counters.drop("from_guest", "too-long", chain.readable_len)
            self._limit.warning(f"vring {index}: long tx chains",
                                "vring %d (port %d): tx chain %d of %d bytes (> %d) dropped "
                                "unread", index, port_id, chain.head, chain.readable_len,
                                MAX_TX_CHAIN_BYTES)
            return False
        return True

    def _flush_guest_tx(self, port: PortState) -> None:
        """Before a guest close ends the session, deliver what the guest wrote before closing
        (its tx chains precede the PORT_OPEN(0) on another queue)."""
        index = tx_queue(port.config.id)
        ring = self._rings.get(index)
        if ring is None:
            return
        if index not in self._broken:
            try:
                self._serve_tx(ring, port.config.id)
                self._drop_held(port.config.id, "stale")
                self._drop_unsent(port, index, ring)
            except RingError as e:
                # This runs for the control queue: the port's broken ring stays the port's.
                self.ring_broken(index, str(e))
        self._drop_held(port.config.id, "stale")  # what a broken ring left held, if anything
        self._outputs.append(Wake(index))  # its runner tells the guest of the used buffers

    def _drop_unsent(self, port: PortState, index: int, ring: SplitQueue) -> None:
        """Chains still in the ring were written in the closing session and could not be taken
        (a slow or absent host peer): they must never reach the next session. Linux's close
        waits for the device to consume PORT_OPEN(0), so nothing of a later open is there."""
        dropped = 0
        while (chain := self._pop(index, ring)) is not None:
            # What the native data plane sent of it was counted then.
            n = chain.readable_len - self._skip.pop(port.config.id, 0)
            port.counters.bytes_guest_wrote += n
            port.counters.drop("from_guest", "stale", n)
            dropped += n
            ring.push(chain.head, 0)
        if dropped:
            self._limit.info(f"port {port.config.id}: unsent bytes dropped",
                             "port %d: %d unsent guest bytes of the closed session dropped "
                             "(stale)", port.config.id, dropped)

    def _drop_held(self, port_id: int, reason: str) -> None:
        """Drop a held tx chain's bytes (counted) and give the guest its buffer back."""
        held = self._held.pop(port_id, None)
        if held is None:
            return
        chain, data = held
        port = self.state.ports.get(port_id)
        if port is not None:
            port.counters.bytes_guest_wrote += len(data)
            port.counters.drop("from_guest", reason, len(data))
        else:
            self.state.counters.bytes_on_missing_ports += len(data)
        self._limit.info(f"port {port_id}: held bytes dropped",
                         "port %d: %d held guest bytes dropped (%s)", port_id, len(data), reason)
        index = tx_queue(port_id)
        ring = self._rings.get(index)
        if ring is not None:
            ring.push(chain.head, 0)
            self._outputs.append(Wake(index))

    def _count_missing(self, port_id: int, index: int, nbytes: int) -> None:
        """Guest bytes on the queue of a port that does not exist (removed, never added)."""
        counters = self.state.counters
        counters.bytes_on_missing_ports += nbytes
        self._limit.warning(f"vring {index}: bytes for a missing port",
                            "vring %d: guest bytes for port %d, which does not exist, dropped "
                            "(%d bytes so far)", index, port_id, counters.bytes_on_missing_ports)

    def _count_bad_chain(self, kind: str) -> None:
        bad = self.state.counters.bad_chains
        bad[kind] = bad.get(kind, 0) + 1

    # ================================================================== one port

    def _who(self, port: PortState) -> str:
        return f"port {port.config.id} {port.config.name!r}"

    def _handshake(self, port: PortState, event: HandshakeInput) -> bool:
        """Feed the port's handshake; True if a guest PORT_OPEN is accepted."""
        step = handshake.transition(port.announce, event)
        port.announce = step.announce
        pid = port.config.id
        accepted = False
        for effect in step.effects:
            if effect is HandshakeEffect.QUEUE_DEVICE_ADD:
                self._queue_control(control.device_add(pid))
            elif effect is HandshakeEffect.ANNOUNCE:
                # The port's console flag, name and host state, in QEMU's order.
                if port.config.console:
                    self._queue_control(control.console_port(pid))
                if port.config.name:
                    self._queue_control(control.port_name(pid, port.config.name))
                if port.session.host_open:
                    self._queue_control(control.port_open(pid, True))
            elif effect is HandshakeEffect.ACCEPT_OPEN:
                accepted = True
            elif effect is HandshakeEffect.REJECT_OPEN:
                self.state.counters.bad_control += 1
            elif effect is HandshakeEffect.SETUP_FAILED:
                self._limit.warning("PORT_READY failed",
                                    "port %d: the guest failed to set it up (PORT_READY 0)", pid)
            elif effect is HandshakeEffect.DROP_QUEUED:
                # Messages for the port not yet delivered must not reach the guest after it
                # is gone.
                self.state.control_out = deque(m for m in self.state.control_out if m.id != pid)
            elif effect is HandshakeEffect.QUEUE_DEVICE_REMOVE:
                self._queue_control(control.device_remove(pid))
        return accepted

    def _apply(self, port: PortState, event: Input) -> None:
        """Feed one input to the port's session machine and carry out its effects."""
        self.before_change(port.config.id)
        step = transition(port.session, event)
        old = port.session
        port.session = step.state
        pid = port.config.id
        for effect in step.effects:
            if effect is Effect.OPEN_SESSION:
                port.session_id = port.next_session_id
                port.next_session_id += 1
                port.counters.sessions_opened += 1
                session = port.current_session
                assert session is not None
                log.info("%s: session %d open", self._who(port), session.id)
                self._outputs.append(SessionOpened(pid, session))
            elif effect is Effect.CLOSE_SESSION:
                assert step.reason is not None
                closed = port.current_session
                assert closed is not None
                port.session_id = None
                self._discard_staging(port, "stale")
                log.info("%s: session %d closed: %s", self._who(port), closed.id,
                         step.reason.value)
                self._outputs.append(SessionClosed(pid, closed, step.reason))
            elif effect in (Effect.TELL_GUEST_OPEN, Effect.TELL_GUEST_CLOSED):
                # The guest learns H when it announces the port (PORT_READY); until then the
                # state only remembers it.
                if port.guest_ready:
                    self._queue_control(
                        control.port_open(pid, effect is Effect.TELL_GUEST_OPEN))
            elif effect is Effect.REDUNDANT:
                port.counters.redundant_events += 1
                log.debug("port %d: %s in state %s changes nothing", pid, event.value, old.name)
        if event is Input.RESET:
            port.counters.resets_seen += 1
            self._handshake(port, HandshakeInput.RESET)
        if old != port.session:
            log.debug("port %d: %s → %s on %s", pid, old.name, port.session.name, event.value)
            self._outputs.append(StateChanged(pid, old, port.session))
            # Whatever was blocked on the old state may move now (held writes, staged bytes).
            self._outputs.append(Wake(tx_queue(pid)))
            self._outputs.append(Wake(rx_queue(pid)))

    def _discard_staging(self, port: PortState, reason: str) -> None:
        if port.staging:
            dropped = port.staging.clear()
            port.counters.drop("to_guest", reason, dropped)
            self._limit.info(f"port {port.config.id}: staged bytes dropped",
                             "port %d: %d queued bytes dropped (%s)", port.config.id,
                             dropped, reason)
            self._outputs.append(Credit(port.config.id))

    def guest_may_write(self, port_id: int) -> bool:
        """Whether taking another tx chain of the port can make progress (else the chains
        stay in the ring, so the guest's writes block)."""
        port = self.state.ports[port_id]
        if port.config.console or port.session is not State.D:
            return True
        return port.config.guest_writes_without_host == "discard"

    def guest_bytes(self, port_id: int, data: bytes) -> bool:
        """Bytes of one guest tx chain: True if done with them (delivered or dropped and
        counted), False if they must be held (the chain stays uncompleted)."""
        port = self.state.ports[port_id]
        if port.config.console:
            # hvc spins waiting for its buffers: a console never holds the guest. And its
            # output is delivered also outside a session: Linux's hvc writes (the replayed
            # kernel log) before the driver sends PORT_OPEN for the console port.
            if not self._deliver(port.config.id, data):
                port.counters.bytes_guest_wrote += len(data)
                port.counters.drop("from_guest", "console-overflow", len(data))
                return True
        elif port.session is State.A:
            if not self._deliver(port.config.id, data):
                return False
        elif port.session is State.D and port.config.guest_writes_without_host == "hold":
            return False
        else:
            reason = "no-host" if port.session is State.D else "no-session"
            port.counters.bytes_guest_wrote += len(data)
            port.counters.drop("from_guest", reason, len(data))
            return True
        port.counters.bytes_guest_wrote += len(data)
        port.counters.bytes_from_guest += len(data)
        port.counters.buffers_from_guest += 1
        return True

