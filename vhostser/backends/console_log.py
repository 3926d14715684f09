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

Continuity: the readers' socket, each reader's socket and queue and the scrollback are in
the port's custody (under a service manager: its fd store), so readers stay attached across
a restart and the writer stays the writer; what a reader types is peeked and consumed only
once staged for the guest. The log file is reopened by path.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import trio

from ..console.port import Counters
from ..console.staging import Staging
from ..options import Options
from ..sockets import PeerPolicy, accept_connection, refuses
from .file import FileSink
from .options import ANYONE, ConfigurableBackend
from .peers import READ_CHUNK, Peer, deliver, listen_retrying
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
        # The port's custody holds it once run() starts (then it outlives the process).
        self.scrollback = Staging.in_memory(max(scrollback, 1))
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

    def continuity(self) -> dict[str, Any]:
        return {"serial": self._serial, "counters": self.counters.as_dict(),
                "writer": self.writer.serial if self.writer is not None else None}

    # ------------------------------------------------------------------ guest output

    def guest_data(self, data: bytes) -> bool:
        self.counters.bytes_from_guest += len(data)
        if self.sink is not None:
            self.sink.write(data)
        if self.scrollback_limit:
            tail = memoryview(data)[-self.scrollback_limit:]
            excess = len(tail) - self.scrollback.room
            if excess > 0:
                self.scrollback.consume(excess)
            self.scrollback.append(tail)
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
        custody = self.port.custody
        try:
            self.counters = ConsoleCounters(**custody.saved.get("counters", {}))
            self._serial = int(custody.saved.get("serial", 0))
        except (TypeError, ValueError) as e:
            log.error("%s: the predecessor's counters are unusable (%s): starting at 0",
                      self._label(), e)
        if self.sink is not None:
            self.sink.label = self._label()
            self.sink.custody = custody
            self.sink.open()
        if self.scrollback_limit:
            self.scrollback = custody.fifo("scrollback", self.scrollback_limit)
        self.port.host_attach()
        try:
            if self.endpoint is None:
                task_status.started(None)
                await trio.sleep_forever()
            kept = custody.take("listen")
            if kept is not None:
                listener = trio.socket.socket(fileno=kept)
                self.endpoint.adopted(listener)
            else:
                listener = await listen_retrying(self.endpoint, self._label(),
                                                 self._listen_failed)
                custody.keep("listen", listener.fileno())
            try:
                with listener:
                    log.info("%s: console readers on %s", self._label(), self.endpoint.path)
                    task_status.started(self.endpoint.path)
                    async with trio.open_nursery() as nursery:
                        for reader in self._adopt():
                            nursery.start_soon(self._run_reader, reader)
                        await self._accept(listener, nursery, self.endpoint.policy)
            finally:
                custody.release("listen")
                if not custody.handing_over:
                    self.endpoint.cleanup()
        finally:
            if self.sink is not None:
                self.sink.close()
            if not custody.handing_over:
                custody.release("scrollback")
            self.scrollback.close()

    def _adopt(self) -> list[Peer]:
        """The readers a predecessor kept, with what was queued for them; the writer stays
        the writer."""
        custody = self.port.custody
        for name in custody.kept("peer."):
            fd = custody.take(name)
            serial = name.removeprefix("peer.")
            if fd is None or not serial.isdigit():
                continue
            reader = Peer(trio.socket.socket(fileno=fd), int(serial), f"#{serial}",
                          self.reader_queue, custody, framed=False)
            self._serial = max(self._serial, reader.serial)
            self.readers.append(reader)
            if custody.saved.get("writer") == reader.serial:
                self.writer = reader
            log.info("%s: console reader %s taken back from the predecessor (%d bytes "
                     "queued for it)", self._label(), reader.label, len(reader.out))
        for name in custody.kept("peerq."):  # queues whose socket did not make it
            fd = custody.take(name)
            custody.release(name)
            if fd is not None:
                os.close(fd)
        return list(self.readers)

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
            reader = Peer(sock, self._serial, f"#{self._serial}", self.reader_queue,
                          self.port.custody, framed=False)
            self.port.custody.keep(reader.name, sock.fileno())
            if len(self.scrollback):
                reader.push(self.scrollback.data())
            self.readers.append(reader)
            self.port.custody.changed()
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
            if trio.current_effective_deadline() != -math.inf:  # not the backend stopping
                self.port.custody.changed()
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
            # Peeked, consumed once staged (as a unix port's peers): a restart loses none.
            data = await reader.peek(READ_CHUNK)
            if not data:
                # Half-closed: it reads on, but writes no more.
                self._release(reader)
                await trio.sleep_forever()
            if self.writer is None:
                self.writer = reader
                self.counters.writers += 1
                log.info("%s: console reader %s is the writer", self._label(), reader.label)
            if self.writer is not reader:
                reader.consume(len(data))
                self.counters.input_dropped += len(data)
                continue
            await deliver(self.port, data, self.port.session,
                          functools.partial(self._took, reader))

    def _took(self, reader: Peer, n: int) -> None:
        reader.consume(n)
        self.counters.bytes_to_guest += n
