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
    same session. It holds at most one guest write that did not fit the port's staging buffer
    and refuses more until that is sent, so a guest that writes faster than it reads is slowed
    down, never buffered without bound."""

    def __init__(self) -> None:
        self._rest = b""
        self._rest_session: Session | None = None
        self._has_rest = trio.Event()

    def guest_data(self, data: bytes) -> bool:
        if self._rest:
            return False
        taken = self.port.send(data)
        if taken < len(data):
            self._rest, self._rest_session = data[taken:], self.port.session
            self._has_rest.set()
        return True

    def session_closed(self, session: Session, reason: Reason) -> None:
        if self._rest_session == session:
            self._rest = b""  # never echoed into the next session (send_all drops it too)

    async def run(self) -> None:
        self.port.host_attach()
        while True:
            await self._has_rest.wait()
            self._has_rest = trio.Event()
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
