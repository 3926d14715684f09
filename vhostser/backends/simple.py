"""The simplest built-in backends: null, echo, and a writer to an inherited fd (stdout)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..console.port import Counters, PortBackend, Session
from ..console.session import Reason

log = logging.getLogger("vhostser.backends")

SINK_LIMIT = 256 * 1024
SINK_CHUNK = 64 * 1024


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


@dataclass
class SinkCounters(Counters):
    bytes_written: int = 0
    bytes_dropped: int = 0  # taken after the fd failed (its reader went away...): counted


class SinkBackend(PortBackend):
    """Guest bytes written to an fd the daemon inherited (its stdout, for the embedded
    default's console), never blocking the event loop on it.

    Bytes wait in a buffer of at most `limit` bytes that a task drains as the fd takes them;
    when it is full, `guest_data` refuses (a data port's guest waits, a console port counts
    console-overflow). The fd's open file description is shared with whoever started the
    daemon (a shell's terminal, a pipe, journald's socket), so its flags are left alone where
    possible: a socket is written with MSG_DONTWAIT, a pipe, FIFO or tty through a description
    of our own (/proc/self/fd/N opened O_NONBLOCK), a regular file as it is (its writes do not
    wait for a reader). An fd that fails (EPIPE: its reader went away) is written no more:
    what was buffered and everything after is dropped, counted in `bytes_dropped`, logged
    once. Never attaches a host peer."""

    counters: SinkCounters

    def __init__(self, fd: int, name: str = "", *, limit: int = SINK_LIMIT) -> None:
        self.target = fd
        self.name = name or f"fd {fd}"
        self.limit = limit
        self.counters = SinkCounters()
        self._out = bytearray()
        self._wake = trio.Event()
        self._blocked: int | None = None  # size of the guest write we refused, if any
        self.failed: str | None = None  # why the fd is written no more

    def guest_data(self, data: bytes) -> bool:
        if self.failed is not None:
            self.counters.bytes_dropped += len(data)
            return True
        if self._out and len(self._out) + len(data) > self.limit:
            self._blocked = len(data)
            return False
        self._out += data
        self._wake.set()
        return True

    def _fail(self, why: str) -> None:
        self.failed = why
        self.counters.bytes_dropped += len(self._out)
        log.error("%s: %s: guest output dropped from now on, counted (%d bytes so far)",
                  self.name, why, self.counters.bytes_dropped)
        self._out.clear()
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if self._blocked is not None and (
            not self._out or len(self._out) + self._blocked <= self.limit
        ):
            self._blocked = None
            self.port.resume_guest_data()

    def _open(self) -> tuple[int, Callable[[bytes], int], Callable[[], None]]:
        """A non-blocking way to write to the target: (fd, write, close) of our own."""
        mode = os.fstat(self.target).st_mode
        if stat.S_ISSOCK(mode):
            sock = socket.socket(fileno=os.dup(self.target))
            return sock.fileno(), lambda b: sock.send(b, socket.MSG_DONTWAIT), sock.close
        if stat.S_ISREG(mode):
            fd = os.dup(self.target)
        else:
            flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                fd = os.open(f"/proc/self/fd/{self.target}", flags)
            except OSError as e:
                if e.errno == errno.ENXIO:  # a pipe or FIFO with no reader left
                    raise OSError(errno.EPIPE, "its reader went away") from None
                fd = os.dup(self.target)  # no /proc: the shared description it has to be
                os.set_blocking(fd, False)
                log.info("%s: made non-blocking for every process sharing it", self.name)
        return fd, lambda b: os.write(fd, b), lambda: os.close(fd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            fd, write, close = self._open()
        except OSError as e:
            self._fail(f"cannot write to it: {e.strerror or e}")
            task_status.started()
            return
        task_status.started()
        try:
            while True:
                if not self._out:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                try:
                    n = write(bytes(self._out[:SINK_CHUNK]))
                except BlockingIOError:
                    # Only an fd that can say EAGAIN is waited on: regular files and the
                    # like cannot be polled, and never need to be.
                    await trio.lowlevel.wait_writable(fd)
                    continue
                except OSError as e:
                    self._fail(f"write failed: {e.strerror or e}")
                    return
                del self._out[:n]
                self.counters.bytes_written += n
                self._maybe_resume()
        finally:
            trio.lowlevel.notify_closing(fd)
            close()

    async def drain(self) -> None:
        while self._out and self.failed is None:
            await trio.sleep(0.01)


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
