"""The `file` backend: the guest's bytes appended to a log file, rotate-safe.

    backend = { type = "file", path = "/var/log/vhostser/web1.serial.log" }

Options: `path` (required); `append` (default true; false truncates the file when the
backend starts — never on a reopen); `timestamps` (default false: each line gets an
ISO-8601 UTC prefix, `2025-01-31T12:00:00.000Z `); `attach` true | false | "auto".

The file is opened O_WRONLY|O_APPEND|O_CREAT with mode 0640. `reopen()` (the daemon calls it
on SIGHUP, after logrotate renamed the file) opens the path anew and only then closes the
old file; every write is complete before it returns, so no byte is lost or split between the
two files.

Only a regular file is written: the open is non-blocking and never makes a tty the daemon's
controlling terminal, and anything else found at the path (a FIFO, whose open would wait for
a reader and whose writes block; a device; a socket) is refused with a log line. A refused
reopen keeps the old file; with no file open, the guest's bytes are dropped, counted in
`bytes_lost` and logged (the open is retried every second, its failure logged once per
streak). `problems()` tells `vhostser check` what it can see in advance: a missing directory,
a path that is not a regular file.

`attach`: whether the backend attaches a host peer (H=1). A Linux guest blocks writes to a
(non-console) port while the host side is closed (virtio_console.c, will_write_block), so a
log of a data port must attach or it receives nothing; on a console port (hvc) H does not
matter and the log stays "nobody there" (H=0). "auto" (default) does exactly that: attach
unless the port is a console port. Host→guest: nothing; the guest reads nothing, ever.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Self

import trio

from ..console.port import Counters, Custody
from ..options import Options
from ..sockets import PeerPolicy
from .options import ANYONE, ConfigurableBackend

log = logging.getLogger("vhostser.backends")

FILE_MODE = 0o640
Attach = bool | Literal["auto"]


def format_timestamp(t: float) -> str:
    millis = int(t * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{millis:03d}Z "


class LineStamper:
    """Prefixes every line start with a timestamp, across chunk boundaries (sans-io)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.at_line_start = True

    def stamp(self, data: bytes) -> bytes:
        if not data:
            return data
        prefix = format_timestamp(self.clock()).encode()
        out = bytearray()
        parts = data.split(b"\n")
        last = len(parts) - 1
        for i, part in enumerate(parts):
            if i == last and not part:
                break  # the data ended with a newline: the next line starts later
            if self.at_line_start:
                out += prefix
            out += part
            if i < last:
                out += b"\n"
                self.at_line_start = True
            else:
                self.at_line_start = False
        return bytes(out)


@dataclass
class FileCounters(Counters):
    bytes_written: int = 0
    bytes_lost: int = 0  # could not be written (disk full, I/O error): counted and logged
    write_errors: int = 0
    open_errors: int = 0
    reopens: int = 0


class FileSink:
    """Appends bytes to a file; survives rotation through `reopen`. The open file is kept in
    `custody` ("log"): a successor writes on to the very file (even one renamed since, or
    opened with truncation, which a successor must not repeat)."""

    RETRY_OPEN = 1.0  # seconds between attempts to open a file that would not open

    def __init__(self, path: str, *, truncate: bool = False, timestamps: bool = False,
                 label: str = "") -> None:
        self.path = path
        self.label = label or path
        self.counters = FileCounters()
        self.stamper = LineStamper() if timestamps else None
        self._truncate = truncate
        self._fd = -1
        self._next_open = 0.0
        self._failing_since: int | None = None  # bytes_lost when opening began to fail
        self.custody = Custody()

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def _open_fd(self, truncate: bool) -> int:
        """The path opened for appending, if it is a regular file; else OSError."""
        # O_NONBLOCK: a FIFO at the path fails with ENXIO instead of waiting for a reader
        # (regular files ignore the flag). O_NOCTTY: a tty there never becomes ours.
        flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
                 | os.O_NOCTTY)
        if truncate:
            flags |= os.O_TRUNC
        try:
            fd = os.open(self.path, flags, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ENXIO and (kind := self._kind()):  # a FIFO nobody reads
                raise OSError(e.errno, f"it is {kind}, not a regular file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            kind = self._kind() or "something else"
            raise OSError(errno.EINVAL, f"it is {kind}, not a regular file")
        return fd

    def _kind(self) -> str | None:
        """What is at the path, if something other than a regular file (for messages)."""
        try:
            mode = os.stat(self.path).st_mode
        except OSError:
            return None
        if stat.S_ISREG(mode):
            return None
        return ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")

    def problems(self) -> list[str]:
        """What would make this sink drop the guest's bytes, as far as can be seen now."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            return [f"{self.path}: directory {directory} does not exist: the guest's output "
                    "will be dropped (counted) until it does"]
        kind = self._kind()
        return [f"{self.path} is {kind}, not a regular file: it will be refused"] if kind else []

    def open(self) -> bool:
        """Open the file if it is not open; False (logged, counted) if it cannot be."""
        if self._fd >= 0:
            return True
        if (kept := self.custody.take("log")) is not None:
            if stat.S_ISREG(os.fstat(kept).st_mode):
                self._fd, self._truncate = kept, False
                return True
            self.custody.release("log")
            os.close(kept)
        now = time.monotonic()
        if now < self._next_open:
            return False
        try:
            self._fd = self._open_fd(self._truncate)
        except OSError as e:
            self.counters.open_errors += 1
            self._next_open = now + self.RETRY_OPEN
            if self._failing_since is None:
                self._failing_since = self.counters.bytes_lost
                log.error("%s: cannot open %s: %s (retrying every %.0f s; the guest's bytes "
                          "are dropped and counted meanwhile)", self.label, self.path,
                          e.strerror or e, self.RETRY_OPEN)
            return False
        self.custody.keep("log", self._fd)
        self._opened()
        self._truncate = False  # only the first open of a backend truncates
        return True

    def _opened(self) -> None:
        if self._failing_since is not None:
            log.info("%s: opened %s; %d bytes were dropped while it would not open",
                     self.label, self.path, self.counters.bytes_lost - self._failing_since)
            self._failing_since = None

    def write(self, data: bytes) -> None:
        if self.stamper is not None:
            data = self.stamper.stamp(data)
        if not self.open():
            self._lost(len(data), "file not open")
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                self.counters.write_errors += 1
                self._lost(len(view), str(e))
                return
            view = view[n:]
            self.counters.bytes_written += n

    def _lost(self, n: int, why: str) -> None:
        self.counters.bytes_lost += n
        if self.counters.bytes_lost == n or self.counters.write_errors % 100 == 1:
            log.error("%s: %d bytes for %s lost: %s (%d lost so far)",
                      self.label, n, self.path, why, self.counters.bytes_lost)

    def reopen(self) -> None:
        """Open the path anew (after a rename by logrotate), then close the old file."""
        try:
            fd = self._open_fd(False)
        except OSError as e:
            self.counters.open_errors += 1
            log.error("%s: reopen of %s failed, %s: %s", self.label, self.path,
                      "writing on to the old file" if self._fd >= 0 else "still no file",
                      e.strerror or e)
            return
        old, self._fd = self._fd, fd
        if old >= 0:
            self.custody.release("log")
            os.close(old)
        self.custody.keep("log", fd)
        self.counters.reopens += 1
        log.info("%s: reopened %s", self.label, self.path)
        self._opened()

    def close(self) -> None:
        if self._fd >= 0:
            if not self.custody.handing_over:
                self.custody.release("log")
            os.close(self._fd)
            self._fd = -1


def read_attach(o: Options) -> Attach:
    value = o.table.get("attach", "auto")
    if value is True or value is False or value == "auto":
        return value  # type: ignore[no-any-return]
    o.fail("attach", 'true, false or "auto"', value)


class FileBackend(ConfigurableBackend):
    """Guest bytes appended to a file (see the module doc)."""

    counters: FileCounters
    PATH_OPTIONS = ("path",)

    def __init__(self, path: str, *, append: bool = True, timestamps: bool = False,
                 attach: Attach = "auto") -> None:
        self.sink = FileSink(path, truncate=not append, timestamps=timestamps)
        self.attach = attach
        self.counters = self.sink.counters

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        o = Options(options, where, {"path", "append", "timestamps", "attach"})
        return cls(
            o.required_string("path"),
            append=o.boolean("append", True),
            timestamps=o.boolean("timestamps", False),
            attach=read_attach(o),
        )

    @property
    def path(self) -> str:
        return self.sink.path

    def endpoint_info(self) -> dict[str, object]:
        return {"kind": "file", "path": self.path}

    def _label(self) -> str:
        return f"port {self.port.id} {self.port.name!r}"

    def guest_data(self, data: bytes) -> bool:
        self.sink.write(data)
        return True

    def reopen(self) -> None:
        """After log rotation (SIGHUP)."""
        self.sink.reopen()

    def problems(self) -> list[str]:
        return self.sink.problems()

    def should_attach(self) -> bool:
        return (not self.port.config.console) if self.attach == "auto" else bool(self.attach)

    def continuity(self) -> dict[str, Any]:
        return {"counters": self.counters.as_dict()}

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        self.sink.label = self._label()
        self.sink.custody = self.port.custody
        try:
            self.counters = self.sink.counters = FileCounters(
                **self.port.custody.saved.get("counters", {}))
        except TypeError as e:
            log.error("%s: the predecessor's counters are unusable (%s): starting at 0",
                      self.sink.label, e)
        self.sink.open()
        log.info("%s: logging to %s", self.sink.label, self.path)
        if self.should_attach():
            self.port.host_attach()
        task_status.started(self.path)
        try:
            await trio.sleep_forever()
        finally:
            self.sink.close()
