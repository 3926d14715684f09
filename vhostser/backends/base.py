"""The backend interface, modelled on spice-server's char device.

A port hands its backend session events and guest bytes; the backend hands the port host
bytes (`port.send`) and host open/close (`port.host_attach` / `host_detach` /
`end_session`). Credit both ways: `guest_data` may refuse bytes it cannot queue (the guest's
write then blocks until `port.resume_guest_data()`), and `port.send` accepts only what fits
the port's bounded staging buffer (`await port.wait_writable()` for more).

The port applies one input at a time: a backend never calls `host_attach`, `host_detach` or
`end_session` from inside one of the callbacks below; it does so from its own task (`run`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..console.port import Port
    from ..console.session import Reason, State


@dataclass(frozen=True, slots=True)
class Session:
    """One guest open of a port. Ids are monotonic per port and never reused."""

    port_id: int
    port_name: str
    id: int


@dataclass
class Counters:
    """A backend's own counters (the port counts its own): subclasses add the fields."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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

    async def drain(self) -> None:
        """Return once what this backend has queued for its peers went out (the last frames
        of a session that just closed). The port is being removed or the daemon stops; the
        caller bounds the wait and cancels `run` afterwards."""

    async def run(self) -> None:
        """Long-running work (listening for peers...), cancelled when the port goes away."""

    def reopen(self) -> None:
        """Reopen files, after log rotation (SIGHUP). A backend without files has none."""

    def counter_values(self) -> Mapping[str, object]:
        """The backend's own counters by name, for `stats`; by default its `counters`."""
        return {} if self.counters is None else self.counters.as_dict()
