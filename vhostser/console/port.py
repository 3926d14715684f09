"""One port of the console device: its session state, its bounded buffers, its counters.

The port sits between the device (guest side: control events, tx chains, rx buffers) and its
backend (host side). It owns the session state machine and applies its effects; the device
owns the queues and asks the port what to do with each chain.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import trio

from ..backends.base import PortBackend, Session
from . import control
from .session import Effect, Input, Reason, State, transition

log = logging.getLogger("vhostser.console")

GuestWritePolicy = Literal["hold", "discard"]
DEFAULT_STAGING = 64 * 1024


@dataclass(frozen=True, slots=True)
class PortConfig:
    """What a port is: from the per-VM config file or the hotplug API."""

    id: int
    name: str = ""
    console: bool = False
    # Guest writes while no host peer is attached: `hold` blocks the guest's write,
    # `discard` drops the bytes (counted).
    guest_writes_without_host: GuestWritePolicy = "hold"
    staging_limit: int = DEFAULT_STAGING


@dataclass
class PortCounters:
    """Per-port counters, readable through the API."""

    bytes_to_guest: int = 0
    buffers_to_guest: int = 0
    bytes_from_guest: int = 0
    buffers_from_guest: int = 0
    sessions_opened: int = 0
    resets_seen: int = 0
    redundant_events: int = 0
    # bytes dropped, by reason: guest-closed (host→guest while ¬G), no-host (guest→host with
    # the discard policy), stale (queued for a session that ended), console-overflow,
    # no-session (guest wrote after the host ended its session)
    discarded: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        d = {k: v for k, v in vars(self).items() if k != "discarded"}
        d["discarded"] = dict(self.discarded)
        return d


class Port:
    """A port and its current session."""

    def __init__(
        self,
        config: PortConfig,
        backend: PortBackend,
        send_control: Callable[[control.ControlMessage], None],
        *,
        first_session_id: int = 1,
        vm: str = "",
    ) -> None:
        self.config = config
        # Session event lines name the VM: journald gathers many VMs' daemons in one place.
        self._who = f"vm {vm} port {config.id} {config.name!r}" if vm else (
            f"port {config.id} {config.name!r}")
        self.backend = backend
        self._send_control = send_control
        self.state = State.B
        self.guest_ready = False  # the guest answered DEVICE_ADD with PORT_READY(1)
        self.removed = False
        self.session: Session | None = None
        self.next_session_id = first_session_id
        self.counters = PortCounters()
        self._staging = bytearray()
        self._writable = trio.Event()
        self._writable.set()
        # Set by the device: wake the port's rx / tx queue service.
        self.poke_rx: Callable[[], None] = lambda: None
        self.poke_tx: Callable[[], None] = lambda: None
        backend.bind(self)

    @property
    def id(self) -> int:
        return self.config.id

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"<Port {self.id} {self.name!r} {self.state.name}>"

    # ------------------------------------------------------------------ session machine

    def apply(self, event: Input) -> None:
        """Feed one input to the session state machine and carry out its effects."""
        if self.removed:
            # The port is gone from the device and the guest: a backend still winding down
            # (attaching a peer, ending a session) changes nothing any more.
            log.debug("port %d: %s after removal ignored", self.id, event.value)
            return
        step = transition(self.state, event)
        old = self.state
        self.state = step.state
        for effect in step.effects:
            if effect is Effect.OPEN_SESSION:
                self._open_session()
            elif effect is Effect.CLOSE_SESSION:
                assert step.reason is not None
                self._close_session(step.reason)
            elif effect is Effect.TELL_GUEST_OPEN:
                self._tell_guest(True)
            elif effect is Effect.TELL_GUEST_CLOSED:
                self._tell_guest(False)
            elif effect is Effect.REDUNDANT:
                self.counters.redundant_events += 1
                log.debug("port %d: %s in state %s changes nothing", self.id, event.value, old.name)
        if event is Input.REMOVE:
            self.removed = True
        if event is Input.RESET:
            self.counters.resets_seen += 1
            self.guest_ready = False
        if old != self.state:
            log.debug("port %d: %s → %s on %s", self.id, old.name, self.state.name, event.value)
            self.backend.state_changed(old, self.state)
            # Whatever was blocked on the old state may move now (held writes, staged bytes).
            self.poke_tx()
            self.poke_rx()

    def _open_session(self) -> None:
        self.session = Session(self.id, self.name, self.next_session_id)
        self.next_session_id += 1
        self.counters.sessions_opened += 1
        log.info("%s: session %d open", self._who, self.session.id)
        self.backend.session_opened(self.session)

    def restore_session(self, session_id: int) -> None:
        """After a daemon restart: the guest still has the port open in this session (from the
        state file); the backend hears `session_opened` again, as a replay."""
        if self.state is not State.B:
            raise ValueError(f"port {self.id}: restore in state {self.state.name}")
        self.state = State.D
        self.session = Session(self.id, self.name, session_id)
        self.next_session_id = max(self.next_session_id, session_id + 1)
        log.info("%s: session %d restored (guest had it open)", self._who, session_id)
        self.backend.session_opened(self.session)

    def _close_session(self, reason: Reason) -> None:
        session = self.session
        assert session is not None
        self.session = None
        self._discard_staging("stale")
        log.info("%s: session %d closed: %s", self._who, session.id, reason.value)
        self.backend.session_closed(session, reason)

    def _tell_guest(self, is_open: bool) -> None:
        # The guest learns H when it announces the port (PORT_READY); until then only remember.
        if self.guest_ready:
            self._send_control(control.port_open(self.id, is_open))

    def announce(self) -> None:
        """Answer PORT_READY(1), also a repeated one (Linux re-sends it after restore): the
        port's console flag, name and host state, in QEMU's order."""
        self.guest_ready = True
        if self.config.console:
            self._send_control(control.console_port(self.id))
        if self.name:
            self._send_control(control.port_name(self.id, self.name))
        if self.state.host_open:
            self._send_control(control.port_open(self.id, True))

    # ------------------------------------------------------------------ host side (backends)

    def host_attach(self) -> None:
        """A host peer is there (H 0→1)."""
        self.apply(Input.HOST_OPEN)

    def host_detach(self) -> None:
        """The host peer left (H 1→0); the guest's session goes on."""
        self.apply(Input.HOST_CLOSE)

    def end_session(self) -> None:
        """The host ends the current session (reason host-close); the guest reads EOF."""
        self.apply(Input.HOST_END)

    def send(self, data: bytes | memoryview, session: Session | None = None) -> int:
        """Queue host bytes for the guest; returns how many were taken (all of them if they are
        discarded: the guest has the port closed, or `session` — the session the bytes were
        meant for — is over). Never more than the staging bound."""
        if not self.state.in_session:
            reason = "no-session" if self.state.guest_open else "guest-closed"
            self.counters.discarded[reason] += len(data)
            return len(data)
        if session is not None and session != self.session:
            self.counters.discarded["stale"] += len(data)
            return len(data)
        room = self.config.staging_limit - len(self._staging)
        taken = min(room, len(data))
        if taken > 0:
            self._staging += data[:taken]
            self.poke_rx()
        if len(self._staging) >= self.config.staging_limit and self._writable.is_set():
            self._writable = trio.Event()
        return taken

    async def wait_writable(self) -> None:
        """Until `send` would take at least one byte again."""
        await self._writable.wait()

    async def send_all(self, data: bytes | memoryview, session: Session | None = None) -> None:
        """Queue all of `data`, waiting for room as the guest reads. With `session`, bytes
        still unsent when that session ends are dropped (counted stale), never handed to the
        next one."""
        view = memoryview(data)
        while view:
            n = self.send(view, session)
            view = view[n:]
            if view:
                await self.wait_writable()

    def resume_guest_data(self) -> None:
        """The backend can take guest bytes again."""
        self.poke_tx()

    # ------------------------------------------------------------------ guest side (device)

    @property
    def staged(self) -> int:
        return len(self._staging)

    def take_staged(self, n: int) -> memoryview:
        """The first n staged bytes, to copy into a guest rx buffer (then `consumed`)."""
        return memoryview(self._staging)[:n]

    def consumed(self, n: int) -> None:
        del self._staging[:n]
        self.counters.bytes_to_guest += n
        self.counters.buffers_to_guest += 1
        if len(self._staging) < self.config.staging_limit:
            self._writable.set()

    def _discard_staging(self, reason: str) -> None:
        if self._staging:
            self.counters.discarded[reason] += len(self._staging)
            log.info("port %d: %d queued bytes dropped (%s)", self.id, len(self._staging), reason)
            self._staging.clear()
        self._writable.set()

    def guest_bytes(self, data: bytes) -> bool:
        """Bytes of one guest tx chain: True if done with them (delivered or dropped and
        counted), False if they must be held (the chain stays uncompleted)."""
        if self.config.console:
            # hvc spins waiting for its buffers: a console never holds the guest. And its
            # output is delivered also outside a session: Linux's hvc writes (the replayed
            # kernel log) before the driver sends PORT_OPEN for the console port.
            if not self.backend.guest_data(data):
                self.counters.discarded["console-overflow"] += len(data)
                return True
        elif self.state is State.A:
            if not self.backend.guest_data(data):
                return False
        elif self.state is State.D and self.config.guest_writes_without_host == "hold":
            return False
        else:
            reason = "no-host" if self.state is State.D else "no-session"
            self.counters.discarded[reason] += len(data)
            return True
        self.counters.bytes_from_guest += len(data)
        self.counters.buffers_from_guest += 1
        return True

    def guest_may_write(self) -> bool:
        """Whether popping another tx chain can make progress (else leave them in the ring,
        so the guest's writes block)."""
        if self.config.console:
            return True
        if self.state is State.D:
            return self.config.guest_writes_without_host == "discard"
        return True
