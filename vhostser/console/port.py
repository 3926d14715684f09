"""The port interface: what a port's backend implements (`PortBackend`) and the handle it
uses to talk to its port (`Port`), modelled on spice-server's char device.

A port hands its backend session events and guest bytes; the backend hands the port host
bytes (`port.send`) and host open/close (`port.host_attach` / `host_detach` /
`end_session`). Credit both ways: `guest_data` may refuse bytes it cannot queue (the guest's
write then blocks until `port.resume_guest_data()`), and `port.send` accepts only what fits
the port's bounded staging buffer (`await port.wait_writable()` for more).

The port applies one input at a time: a backend never calls `host_attach`, `host_detach` or
`end_session` from inside one of the callbacks below; it does so from its own task (`run`).

`Port` holds no state of its own but the trio event blocked senders wait on: it reads and
changes the device's state through `ConsoleCore`, and hands what the core decided to the
device layer (`settle`) before returning.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import trio

from .core import ConsoleCore, Credit, Output, SessionClosed, SessionOpened, StateChanged
from .session import Input, Reason, State
from .staging import HEADER_SIZE, Staging
from .state import PortConfig, PortCounters, Session

__all__ = ["Counters", "Custody", "Port", "PortBackend", "Reason", "Session", "State"]

log = logging.getLogger("vhostser.console")


@dataclass
class Counters:
    """A backend's own counters (the port counts its own): subclasses add the fields."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Custody:
    """Where a port's backend keeps what must outlive the daemon's process: its own fds (a
    listening socket, connected peers) and the FIFOs of bytes in flight, under names local to
    the port. The daemon's subclass puts them in the service manager's fd store and gives a
    successor back what its predecessor kept; this base keeps nothing, which is what a
    restart without a service manager is: the backend starts anew.

    The rules: `keep` an fd as soon as it is held and `release` it before closing it; a name
    the predecessor kept is `take`n once (None: it kept none); `saved` is the predecessor's
    `PortBackend.continuity()`, and `changed()` says the backend's own has changed (so it
    reaches the state region before anything can depend on it). While `handing_over` the
    process is stopping for a successor: nothing may be closed for good (a socket file
    unlinked, queued bytes dropped), since the successor goes on with it."""

    enabled = False
    saved: Mapping[str, Any] = {}

    @property
    def handing_over(self) -> bool:
        return False

    def keep(self, name: str, fd: int) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def take(self, name: str) -> int | None:
        return None

    def kept(self, prefix: str) -> list[str]:
        """The names under `prefix` the predecessor kept and nobody took yet."""
        return []

    def fifo(self, name: str, capacity: int) -> Staging:
        """A FIFO of `capacity` bytes (the predecessor's, if it kept one under `name` of that
        capacity, with what it still held). `release(name)` when done with it. Here: anonymous
        memory, whose pages are only made as the FIFO first reaches them."""
        return Staging(memoryview(mmap.mmap(-1, HEADER_SIZE + capacity)))

    def changed(self) -> None:
        pass


class PortBackend:
    """Base class: `guest_data` is the one method a backend must write."""

    port: Port
    counters: Counters | None = None

    def bind(self, port: Port) -> None:
        """Called once when the port is created, before any other call."""
        self.port = port

    def guest_data(self, data: bytes) -> bool:
        """Bytes the guest wrote in the current session. Return False to refuse them for now
        (nothing is taken); the port offers the same bytes again after `resume_guest_data`."""
        raise NotImplementedError

    def session_opened(self, session: Session) -> None:
        """A session started (the guest opened the port)."""

    def session_closed(self, session: Session, reason: Reason) -> None:
        """The session ended; nothing of it will be delivered either way any more."""

    def state_changed(self, old: State, new: State) -> None:
        """The port's session state moved (e.g. E→B: the guest closed a port whose session
        the host had ended, so a peer may attach again). Called after the effects ran."""

    def reopen(self) -> None:
        """The daemon was asked to reload (SIGHUP): reopen files (log rotation)."""

    def endpoint_info(self) -> dict[str, object] | None:
        """Where a host user reaches this backend (`ctl ports`, `vhostser attach`): a dict
        with a "kind" ("unix", "tcp", "console", "pty", "file") and its address; None for a
        backend nothing on the host attaches to."""
        return None

    def problems(self) -> list[str]:
        """What can be seen before `run` that will make the backend drop bytes or fail (a
        missing log directory...), one message each, for `vhostser check`: warnings, since
        the condition may be gone when the daemon runs."""
        return []

    def counter_values(self) -> Mapping[str, object]:
        """The backend's own counters by name, for `stats`; by default its `counters`."""
        return {} if self.counters is None else self.counters.as_dict()

    def native_socket(self) -> int | None:
        """A stream socket the port's bytes may move through both ways, as they come,
        without this backend (the device's native data plane, console.fastpath): only when
        nothing the backend does would differ. None here: the backend sees every byte."""
        return None

    def native_engaged(self, engaged: bool) -> None:
        """The native data plane took `native_socket()` (True: read it no more) or gave it
        back (False)."""

    def native_moved(self, *, to_host: int, from_host: int) -> None:
        """What the native data plane moved through the socket since it last said."""

    async def drain(self) -> None:
        """Return once what this backend has queued for its peers went out (the last frames
        of a session that just closed). The port is being removed or the daemon stops; the
        caller bounds the wait and cancels `run` afterwards."""

    async def run(self) -> None:
        """Long-running work (listening for peers...), cancelled when the port goes away."""

    def continuity(self) -> dict[str, Any]:
        """What a successor needs besides the fds in `port.custody` to go on where this
        backend stands (JSON-able; `custody.saved` gives it back)."""
        return {}


class Port:
    """One port as its backend sees it; see the module doc."""

    def __init__(
        self,
        core: ConsoleCore,
        config: PortConfig,
        backend: PortBackend,
        settle: Callable[[], None],
        custody: Custody | None = None,
    ) -> None:
        self._core = core
        self.config = config
        self.backend = backend
        self._settle = settle
        self.custody = custody if custody is not None else Custody()
        # This port's state; a port re-added under the same id later is another one.
        self._state = core.state.ports[config.id]
        self._writable = trio.Event()
        self._writable.set()
        self._room = trio.Event()  # set whenever the staging buffer gains room
        backend.bind(self)

    @property
    def id(self) -> int:
        return self.config.id

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"<Port {self.id} {self.name!r} {self.state.name}>"

    @property
    def removed(self) -> bool:
        """The port is gone: this handle changes nothing any more."""
        return self._core.state.ports.get(self.id) is not self._state

    @property
    def state(self) -> State:
        return State.B if self.removed else self._state.session

    @property
    def session(self) -> Session | None:
        return None if self.removed else self._state.current_session

    @property
    def guest_ready(self) -> bool:
        return not self.removed and self._state.guest_ready

    @property
    def next_session_id(self) -> int:
        return self._state.next_session_id

    @property
    def counters(self) -> PortCounters:
        return self._state.counters

    @property
    def staged(self) -> int:
        return len(self._state.staging)

    # ------------------------------------------------------------------ host side

    def host_attach(self) -> None:
        """A host peer is there (H 0→1)."""
        self._host_event(Input.HOST_OPEN)

    def host_detach(self) -> None:
        """The host peer left (H 1→0); the guest's session goes on."""
        self._host_event(Input.HOST_CLOSE)

    def end_session(self) -> None:
        """The host ends the current session (reason host-close); the guest reads EOF."""
        self._host_event(Input.HOST_END)

    def _host_event(self, event: Input) -> None:
        if self.removed:
            # The port is gone from the device and the guest: a backend still winding down
            # (attaching a peer, ending a session) changes nothing any more.
            log.debug("port %d: %s after removal ignored", self.id, event.value)
            return
        self._core.host_event(self.id, event)
        self._settle()

    def settle(self) -> None:
        """Something the device decides on changed in the backend (a peer came or went)."""
        self._settle()

    def send(self, data: bytes | memoryview, session: Session | None = None) -> int:
        """Queue host bytes for the guest; returns how many were taken (all of them if they are
        discarded: the guest has the port closed, or `session` — the session the bytes were
        meant for — is over). Never more than the staging bound."""
        if self.removed:
            self._core.state.counters.bytes_on_missing_ports += len(data)
            return len(data)
        taken = self._core.host_send(self.id, data, session)
        if self._core.staging_room(self.id) == 0 and self._writable.is_set():
            self._writable = trio.Event()
        self._settle()
        return taken

    def carry_out(self, out: Output) -> None:
        """Do what the core decided for this port: a backend callback, or credit."""
        if isinstance(out, Credit):
            self.credit()
        elif isinstance(out, SessionOpened):
            self.backend.session_opened(out.session)
        elif isinstance(out, SessionClosed):
            self.backend.session_closed(out.session, out.reason)
        elif isinstance(out, StateChanged):
            self.backend.state_changed(out.old, out.new)

    @property
    def staging_room(self) -> int:
        """How many bytes `send` would take now."""
        return 0 if self.removed else self._core.staging_room(self.id)

    async def wait_room(self, n: int) -> None:
        """Until `send` would take n bytes at once (or the port is gone)."""
        while not self.removed and self._core.staging_room(self.id) < n:
            self._room = trio.Event()
            await self._room.wait()

    def credit(self) -> None:
        """The staging buffer gained room, or the port is gone (the device layer calls
        this): wake the senders."""
        self._writable.set()
        self._room.set()

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
        if not self.removed:
            self._core.resume_guest_data(self.id)
            self._settle()
