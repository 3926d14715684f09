"""The `pty` backend: the port on a pseudo-terminal, for `screen`, `minicom`, `picocom`...

    backend = { type = "pty", link = "/run/vhostser/web1.console" }

Options: `link` (optional: a symlink to the slave device, e.g. /dev/pts/7, made at start,
replacing an older symlink but nothing else, removed at exit), `queue` (bytes of guest
output buffered towards the pty, default 64 KiB).

Whether a process has the slave open cannot be told portably, so the pty counts as always
attached (H=1 from the start). The backend holds the slave open itself (so the master never
reports EIO or hang-up while nobody is connected) and puts it in raw mode: bytes pass
unchanged both ways, no echo. The slave is made 0600 (devpts gives 0620, group tty: any
member could type into the guest). The slave's path is logged and kept in `path`. While nobody
reads the slave, guest output fills the tty's buffer and then `queue`, after which the
guest's writes block (a console port drops instead: consoles never hold the guest).

A hang-up of the slave (`vhangup()`, as getty and login do) resets its termios to the
defaults, ECHO and ICANON included: the guest's output would come back to it as echo. The
hang-up also makes our own slave fd dead, which is how it is noticed at once (an epoll set
watching only that fd's hang-up, so no traffic wakes it): the raw settings are put back
through the master (on Linux a pty master's termios calls act on the slave side), before
the slave is reopened, so that input still waiting is never processed in cooked mode, and
once more after (the reopen waits for the hang-up to finish, the reset included). Counted in
`hangups`, logged. A program that changes the slave's modes itself later keeps them.

Continuity: the master, our slave fd, the queue towards the pty (`ptyq`) and the bytes read
from it but not yet staged for the guest (`ptyin`) are in the port's custody, so that under
a service manager's fd store a restart keeps the same /dev/pts/N, and a `screen` attached
to it sees nothing. Bytes written to the master are consumed from the queue after the
write (a SIGKILL in between writes up to one chunk again); bytes are read from the master
straight into `ptyin` (a pty cannot be peeked, so a SIGKILL in the instant between the read
and its count's store loses that read: at most one chunk, the only window there is).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import termios
import tty
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import trio

from ..console.core import MAX_TX_CHAIN_BYTES
from ..console.port import Counters, Custody
from ..console.staging import Staging
from ..options import Options
from ..sockets import PeerPolicy
from .options import ANYONE, ConfigurableBackend

log = logging.getLogger("vhostser.backends")

READ_CHUNK = 4096
DEFAULT_QUEUE = 64 * 1024


@dataclass
class PtyCounters(Counters):
    bytes_to_pty: int = 0
    bytes_from_pty: int = 0
    hangups: int = 0  # the slave was hung up (vhangup): raw mode restored


def make_symlink(target: str, link: str) -> None:
    """Point `link` at `target`, atomically, replacing a symlink but never another file."""
    try:
        if not stat.S_ISLNK(os.lstat(link).st_mode):
            raise OSError(errno.EEXIST, f"{link} exists and is not a symlink")
    except FileNotFoundError:
        pass
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_symlink(target: str, link: str) -> None:
    """Remove `link` if it still points at `target`."""
    try:
        if os.readlink(link) == target:
            os.unlink(link)
    except OSError:
        pass


class PtyBackend(ConfigurableBackend):
    """The port on a pseudo-terminal (see the module doc)."""

    counters: PtyCounters
    PATH_OPTIONS = ("link",)

    def __init__(self, *, link: str | None = None, queue: int = DEFAULT_QUEUE) -> None:
        self.link = link
        self.limit = queue
        self.path: str | None = None  # the slave device, once open
        self.counters = PtyCounters()
        self._master = -1
        self._slave = -1  # ours: keeps the master alive, and tells of a hang-up
        self._raw: list[Any] = []  # the slave's termios as we set it
        # Towards the pty, and read from it (both in the port's custody once run() starts).
        self._out = Staging.in_memory(1)
        self._in = Staging.in_memory(1)
        self._wake = trio.Event()
        self._blocked: int | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        o = Options(options, where, {"link", "queue"})
        return cls(link=o.string("link"), queue=o.size("queue", DEFAULT_QUEUE, lo=1,
                                                          hi=64 << 20))

    def _label(self) -> str:
        return f"port {self.port.id} {self.port.name!r}"

    def endpoint_info(self) -> dict[str, object]:
        return {"kind": "pty", "path": self.path, "link": self.link}

    def guest_data(self, data: bytes) -> bool:
        if self._master < 0 or (len(self._out) and len(self._out) + len(data) > self.limit):
            self._blocked = len(data)
            return False
        self._out.append(data)  # fits: the queue has a chain's room beyond `limit`
        self.counters.bytes_to_pty += len(data)
        self._wake.set()
        return True

    def continuity(self) -> dict[str, Any]:
        return {"counters": self.counters.as_dict(), "path": self.path}

    def _maybe_resume(self) -> None:
        if self._blocked is not None and self._master >= 0 and (
            not len(self._out) or len(self._out) + self._blocked <= self.limit
        ):
            self._blocked = None
            self.port.resume_guest_data()

    def _open(self, custody: Custody) -> tuple[int, bool]:
        """The master and our slave: the predecessor's (True), or a new pty."""
        master, slave = custody.take("pty"), custody.take("pty.slave")
        if master is not None and slave is not None:
            try:
                if os.isatty(master) and os.isatty(slave):
                    self._slave = slave
                    return master, True
            except OSError:
                pass
            log.error("%s: the kept pty is unusable: making a new one", self._label())
        for name, fd in (("pty", master), ("pty.slave", slave)):
            custody.release(name)
            if fd is not None:
                os.close(fd)
        master, self._slave = os.openpty()
        # devpts makes the slave 0620, group tty: any member could write into the guest's
        # input (wall, write). The daemon's user only, as for its sockets.
        os.fchmod(self._slave, 0o600)
        custody.keep("pty", master)
        custody.keep("pty.slave", self._slave)
        return master, False

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        custody = self.port.custody
        try:
            self.counters = PtyCounters(**custody.saved.get("counters", {}))
        except TypeError as e:
            log.error("%s: the predecessor's counters are unusable (%s): starting at 0",
                      self._label(), e)
        master, adopted = self._open(custody)
        self._out = custody.fifo("ptyq", self.limit + MAX_TX_CHAIN_BYTES)
        self._in = custody.fifo("ptyin", READ_CHUNK)
        hangup = select.epoll()
        try:
            if not adopted:
                tty.setraw(self._slave)
            self._raw = termios.tcgetattr(self._slave)
            # Registered for no event: epoll reports only the fd's hang-up (and errors).
            hangup.register(self._slave, 0)
            os.set_blocking(master, False)
            self.path = path = os.ttyname(self._slave)
            self._master = master
            if self.link:
                try:
                    make_symlink(path, self.link)
                except OSError as e:
                    log.error("%s: cannot link %s to %s: %s", self._label(), self.link, path, e)
            log.info("%s: pty %s%s%s", self._label(), path,
                     f" (link {self.link})" if self.link else "",
                     f", taken back from the predecessor ({len(self._out)} bytes queued for"
                     f" it)" if adopted else "")
            custody.changed()
            self.port.host_attach()
            self._maybe_resume()
            task_status.started(path)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, master)
                nursery.start_soon(self._watch_hangups, master, path, hangup)
                await self._read_loop(master)
        finally:
            self._master = -1
            trio.lowlevel.notify_closing(master)
            trio.lowlevel.notify_closing(hangup.fileno())
            hangup.close()
            if not custody.handing_over:
                if self.link and self.path:
                    remove_symlink(self.path, self.link)
                for name in ("pty", "pty.slave", "ptyq", "ptyin"):
                    custody.release(name)
            os.close(master)
            os.close(self._slave)
            self._out.close()
            self._in.close()

    async def _watch_hangups(self, master: int, path: str, hangup: select.epoll) -> None:
        while True:
            await trio.lowlevel.wait_readable(hangup.fileno())
            if not hangup.poll(0):
                continue
            # Raw again before anyone's reopen lets the line discipline see pending input.
            termios.tcsetattr(master, termios.TCSANOW, self._raw)
            try:
                slave = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as e:
                log.warning("%s: pty %s hung up, cannot reopen it: %s (retrying)",
                            self._label(), path, e)
                await trio.sleep(1.0)
                continue
            termios.tcsetattr(master, termios.TCSANOW, self._raw)
            hangup.unregister(self._slave)
            self.port.custody.release("pty.slave")
            os.close(self._slave)
            self._slave = slave
            self.port.custody.keep("pty.slave", slave)
            hangup.register(slave, 0)
            self.counters.hangups += 1
            log.info("%s: pty %s was hung up (vhangup): raw mode restored", self._label(), path)

    async def _read_loop(self, master: int) -> None:
        inbox = self._in
        while True:
            # What a predecessor read and did not stage goes first; it is counted already.
            while len(inbox):
                n = self.port.send(inbox.peek(len(inbox)), self.port.session)
                inbox.consume(n)
                if len(inbox):
                    await self.port.wait_writable()
            await trio.lowlevel.wait_readable(master)
            try:
                n = os.readv(master, [inbox.free_view(READ_CHUNK)])
            except BlockingIOError:
                continue
            except OSError as e:  # EIO: only between a hang-up and our reopen of the slave
                log.warning("%s: reading the pty: %s", self._label(), e)
                await trio.sleep(0.1)
                continue
            if not n:
                await trio.sleep(0.1)
                continue
            inbox.commit(n)
            self.counters.bytes_from_pty += n

    async def _write_loop(self, master: int) -> None:
        out = self._out
        while True:
            if not len(out):
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            await trio.lowlevel.wait_writable(master)
            try:
                n = os.write(master, out.peek(READ_CHUNK))
            except BlockingIOError:
                continue
            out.consume(n)
            self._maybe_resume()
