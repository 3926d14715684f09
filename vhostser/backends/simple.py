"""The simplest built-in backends: null, echo, and a writer to a byte sink."""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..console.port import PortBackend, Session
from ..console.session import Reason


class NullBackend(PortBackend):
    """Takes every guest byte and drops it; never attaches a host peer."""

    def guest_data(self, data: bytes) -> bool:
        return True


class EchoBackend(PortBackend):
    """A host peer that is always attached and sends every guest byte straight back, in the
    same session.

    A guest write is taken only once all of it fits the port's staging buffer (the guest's
    write waits meanwhile), so an echoed byte is never only in this process: staged bytes
    outlive a restart (`console.staging`), and a write not yet taken is still in the guest's
    ring. Only a write larger than the whole staging buffer is taken in parts, holding the
    rest here (and refusing more until it is sent): a guest that writes faster than it reads
    is slowed down, never buffered without bound."""

    def __init__(self) -> None:
        self._rest = b""
        self._rest_session: Session | None = None
        self._waiting_for = 0  # room the refused write needs
        self._wake = trio.Event()

    def guest_data(self, data: bytes) -> bool:
        if self._rest or self._waiting_for:
            return False
        if len(data) <= self.port.config.staging_limit and self.port.staging_room < len(data):
            self._waiting_for = len(data)
            self._wake.set()
            return False
        taken = self.port.send(data)
        if taken < len(data):
            self._rest, self._rest_session = data[taken:], self.port.session
            self._wake.set()
        return True

    def session_closed(self, session: Session, reason: Reason) -> None:
        if self._rest_session == session:
            self._rest = b""  # never echoed into the next session (send_all drops it too)

    async def run(self) -> None:
        self.port.host_attach()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._waiting_for:
                await self.port.wait_room(self._waiting_for)
                self._waiting_for = 0
            if self._rest:
                await self.port.send_all(self._rest, self._rest_session)
                self._rest, self._rest_session = b"", None
            self.port.resume_guest_data()


class SinkBackend(PortBackend):
    """Hands guest bytes to a callable (stdout for the embedded default's console)."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink

    def guest_data(self, data: bytes) -> bool:
        self._sink(data)
        return True


class RecordingBackend(PortBackend):
    """Keeps what happens, for tests: events, and bytes per session id (0: bytes a console
    port delivered outside any session). `accept` may be switched off for backpressure."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []
        self.data: dict[int, bytearray] = {}
        self.accept = True

    def guest_data(self, data: bytes) -> bool:
        if not self.accept:
            return False
        session = self.port.session
        self.data.setdefault(session.id if session else 0, bytearray()).extend(data)
        return True

    def session_opened(self, session: Session) -> None:
        self.events.append(("open", session.id, ""))

    def session_closed(self, session: Session, reason: Reason) -> None:
        self.events.append(("close", session.id, reason.value))
