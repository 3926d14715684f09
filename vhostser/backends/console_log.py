"""The `console` backend: a guest console kept in a log file and shared with live readers.

    backend = { type = "console", path = "/var/log/vhostser/web1.console.log",
                socket = "/run/vhostser/web1.console.sock", scrollback = 64 }

Options (at least one of `path` and `socket`): `path` a log file, appended like the `file`
backend (rotate-safe `reopen()`), `timestamps` (default false) prefixes its lines; `socket` a
unix socket where any number of readers (up to `max_readers`, default 32) attach, e.g. with
`socat - UNIX-CONNECT:/run/vhostser/web1.console.sock`; `scrollback` KiB (default 64, 0..16384)
of recent output each new reader gets first, then live output; `reader_queue` bytes buffered
per reader (default 256 KiB). Who may connect: `socket_mode` (default 0o600), `socket_group`,
`allow_uids`, `allow_gids`, as for the `unix` backend; a reader they refuse is counted in
`readers_not_allowed`.

One writer at a time: the first reader that sends bytes becomes the writer until it
disconnects; bytes from the other readers are dropped and counted. The writer's bytes go to
the guest's current session (if none is open the port drops and counts them).

A console never pushes back on the guest: a reader whose queue is full is disconnected
(counted), and the guest's output is always taken. The backend counts as an attached host
peer (H=1) from the start: the log is always there. A socket path that cannot be listened on
(taken by another file...) is retried with backoff (0.1 s doubling to 5 s), counted in
`listen_failures` and logged once per streak. A reader that shuts down its sending side
stays a reader (and gives up being the writer).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import trio

from ..console.port import Counters, Custody
from ..options import Options
from ..sockets import PeerPolicy, accept_connection, refuses
from .file import FileSink
from .options import ANYONE, ConfigurableBackend
from .peers import READ_CHUNK, Peer, listen_retrying
from .unix import SOCKET_KEYS, UnixEndpoint

log = logging.getLogger("vhostser.backends")

DEFAULT_SCROLLBACK_KIB = 64
DEFAULT_READER_QUEUE = 256 * 1024
DEFAULT_MAX_READERS = 32


@dataclass
class ConsoleCounters(Counters):
    bytes_from_guest: int = 0
    readers_accepted: int = 0
    readers_refused: int = 0  # over max_readers
    readers_not_allowed: int = 0  # refused by allow_uids/allow_gids (SO_PEERCRED)
    readers_dropped_slow: int = 0  # queue full: disconnected
    listen_failures: int = 0  # the readers' socket could not be made (retried)
    writers: int = 0  # readers that became the writer
    input_dropped: int = 0  # bytes from readers that are not the writer
    bytes_to_guest: int = 0  # bytes from the writer handed to the port


class ConsoleBackend(ConfigurableBackend):
    """Log file + live readers with scrollback + one writer (see the module doc)."""

    counters: ConsoleCounters
    PATH_OPTIONS = ("path", "socket")

    def __init__(
        self,
        *,
        path: str | None = None,
        socket: UnixEndpoint | None = None,
        scrollback: int = DEFAULT_SCROLLBACK_KIB * 1024,
        reader_queue: int = DEFAULT_READER_QUEUE,
        max_readers: int = DEFAULT_MAX_READERS,
        timestamps: bool = False,
    ) -> None:
        self.sink = FileSink(path, timestamps=timestamps) if path else None
        self.endpoint = socket
        self.scrollback_limit = scrollback
        self.reader_queue = reader_queue
        self.max_readers = max_readers
        self.scrollback = bytearray()
        self.readers: list[Peer] = []
        self.writer: Peer | None = None
        self.counters = ConsoleCounters()
        self._serial = 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        o = Options(options, where, {"path", "socket", "scrollback", "reader_queue",
                                     "max_readers", "timestamps", *SOCKET_KEYS})
        path, socket = o.string("path"), o.string("socket")
        if path is None and socket is None:
            o.fail("socket", "a unix socket path for readers and/or a log file `path`")
        if socket is None:
            UnixEndpoint.not_with(o, "without a readers' `socket`")
        return cls(
            path=path,
            socket=UnixEndpoint.read(o, socket, peers) if socket is not None else None,
            scrollback=o.integer("scrollback", DEFAULT_SCROLLBACK_KIB, lo=0, hi=16384) * 1024,
            reader_queue=o.size("reader_queue", DEFAULT_READER_QUEUE, lo=1024, hi=64 << 20),
            max_readers=o.integer("max_readers", DEFAULT_MAX_READERS, lo=1, hi=1024),
            timestamps=o.boolean("timestamps", False),
        )

    def _label(self) -> str:
        return f"port {self.port.id} {self.port.name!r}"

    def endpoint_info(self) -> dict[str, object]:
        return {"kind": "console", "path": self.endpoint.path if self.endpoint else None,
                "log": self.sink.path if self.sink else None,
                "readers": sum(r.live for r in self.readers),
                "scrollback": len(self.scrollback)}

    # ------------------------------------------------------------------ guest output

    def guest_data(self, data: bytes) -> bool:
        self.counters.bytes_from_guest += len(data)
        if self.sink is not None:
            self.sink.write(data)
        if self.scrollback_limit:
            self.scrollback += data
            excess = len(self.scrollback) - self.scrollback_limit
            if excess > 0:
                del self.scrollback[:excess]
        for reader in self.readers:
            if not reader.live:
                continue
            if reader.can_take(len(data)):
                reader.push(data)
            else:
                self.counters.readers_dropped_slow += 1
                log.warning("%s: console reader %s too slow (%d bytes queued): disconnecting it",
                            self._label(), reader.label, len(reader.out))
                reader.kill("too slow")
        return True

    def reopen(self) -> None:
        """After log rotation (SIGHUP)."""
        if self.sink is not None:
            self.sink.reopen()

    def problems(self) -> list[str]:
        return [] if self.sink is None else self.sink.problems()

    # ------------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        if self.sink is not None:
            self.sink.label = self._label()
            self.sink.open()
        self.port.host_attach()
        try:
            if self.endpoint is None:
                task_status.started(None)
                await trio.sleep_forever()
            listener = await listen_retrying(self.endpoint, self._label(), self._listen_failed)
            try:
                with listener:
                    log.info("%s: console readers on %s", self._label(), self.endpoint.path)
                    task_status.started(self.endpoint.path)
                    async with trio.open_nursery() as nursery:
                        await self._accept(listener, nursery, self.endpoint.policy)
            finally:
                self.endpoint.cleanup()
        finally:
            if self.sink is not None:
                self.sink.close()

    def _listen_failed(self) -> None:
        self.counters.listen_failures += 1

    async def _accept(self, listener: trio.socket.SocketType, nursery: trio.Nursery,
                      policy: PeerPolicy) -> None:
        label = f"{self._label()}: console readers"
        while True:
            sock = await accept_connection(listener, label)
            if refuses(policy, sock, label):
                self.counters.readers_not_allowed += 1
                sock.close()
                continue
            if sum(r.live for r in self.readers) >= self.max_readers:
                self.counters.readers_refused += 1
                log.warning("%s: console reader refused: max_readers %d reached",
                            self._label(), self.max_readers)
                sock.close()
                continue
            self._serial += 1
            # Readers are not kept across a restart (they reconnect, scrollback and all).
            reader = Peer(sock, self._serial, f"#{self._serial}", self.reader_queue, Custody(),
                          framed=False)
            if self.scrollback:
                reader.push(self.scrollback)
            self.readers.append(reader)
            self.counters.readers_accepted += 1
            log.info("%s: console reader %s attached (%d bytes of scrollback)",
                     self._label(), reader.label, len(self.scrollback))
            nursery.start_soon(self._run_reader, reader)

    async def _run_reader(self, reader: Peer) -> None:
        try:
            with reader.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_side, reader, nursery.cancel_scope)
                    try:
                        await self._read_side(reader)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        log.info("%s: console reader %s: %s", self._label(), reader.label, e)
                        nursery.cancel_scope.cancel()
        finally:
            reader.close()
            self.readers.remove(reader)
            self._release(reader)
            log.info("%s: console reader %s detached%s", self._label(), reader.label,
                     f" ({reader.dropped})" if reader.dropped else "")

    async def _write_side(self, reader: Peer, cancel: trio.CancelScope) -> None:
        try:
            await reader.write_loop(lambda n: None)  # returns only when closing: never here
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.info("%s: console reader %s: %s", self._label(), reader.label, e)
        cancel.cancel()

    def _release(self, reader: Peer) -> None:
        if self.writer is reader:
            self.writer = None
            log.info("%s: console reader %s is no longer the writer", self._label(),
                     reader.label)

    async def _read_side(self, reader: Peer) -> None:
        while True:
            data = await reader.stream.receive_some(READ_CHUNK)
            if not data:
                # Half-closed: it reads on, but writes no more.
                self._release(reader)
                await trio.sleep_forever()
            if self.writer is None:
                self.writer = reader
                self.counters.writers += 1
                log.info("%s: console reader %s is the writer", self._label(), reader.label)
            if self.writer is not reader:
                self.counters.input_dropped += len(data)
                continue
            self.counters.bytes_to_guest += len(data)
            await self.port.send_all(data, self.port.session)
