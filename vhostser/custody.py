"""fd custody: every fd the daemon needs to go on sits in systemd's file descriptor store under
a name, so a successor — after a crash, `kill -9`, `systemctl restart` or an upgrade — takes
them back from LISTEN_FDS / LISTEN_FDNAMES and the VM's vhost-user connection never closes.

QEMU's generic vhost-user device cannot reconnect to a back end (DESIGN.md, "Continuity"): the
connection must outlive the process, and so must everything it set up (guest memory, the
vrings' eventfds, the back-end channel). `FdStore.keep(name, fd)` hands an fd to the store as
soon as the daemon holds it (`FDSTORE=1`, `FDNAME=`, `FDPOLL=0`: kept until removed, not
dropped when the peer hangs up), `release(name)` takes it out (`FDSTOREREMOVE=1`) when the
daemon closes it. Names (at most 255 characters, no ':' — systemd's rules):

    vu.conn, vu.req          the vhost-user connection and its back-end request channel
    vu.mem.<n>               a guest memory region's fd (n: the region's slot)
    vu.kick.<i> .call.<i> .err.<i>   vring i's eventfds
    state                    the state region (a memfd; vhostser.continuity)

systemd keeps one copy of each open file: an fd that is the same open file as one already kept
(QEMU sends one memfd for every RAM region, once per message) is not stored twice but recorded
as an alias of the first name; the aliases travel in the state region.

Without a service manager (`vhostser run` in a terminal) the store is off and a restart is what
it always was: the front end's connection goes with the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re

from . import systemd

log = logging.getLogger("vhostser.custody")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
_SYS_KCMP = 312  # x86_64
_KCMP_FILE = 0


class CustodyError(ValueError):
    """A name systemd would not take."""


def _libc_syscall() -> ctypes._FuncPointer | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall
    except (OSError, AttributeError):
        return None


_syscall = _libc_syscall()


def same_file(a: int, b: int) -> bool:
    """Whether fds a and b are the same open file (what systemd's store dedups on)."""
    if _syscall is not None:
        pid = os.getpid()
        r: int = _syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)
        if r >= 0:
            return r == 0
    # No kcmp (seccomp, another architecture): the same inode of a regular file or memfd is
    # what matters for memory; eventfds all share one anonymous inode, so never say "same".
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and os.path.isfile(
        f"/proc/self/fd/{a}")


class FdStore:
    """The names of the fds in systemd's store, and the calls that put them there."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._fds: dict[str, int] = {}  # every name kept -> the caller's fd number
        self._stored: set[str] = set()  # the names systemd holds: one per open file
        self._alias: dict[str, str] = {}  # any other name -> the stored name of its file
        self.failures = 0

    @classmethod
    def recovered(cls, inherited: dict[str, list[int]], aliases: dict[str, str]) -> FdStore:
        """The store as a successor finds it: what LISTEN_FDNAMES named (already in the store,
        so nothing is sent again) and the aliases its predecessor recorded (each gets a dup
        of its file, so closing one name never closes another's)."""
        store = cls(enabled=True)
        for name, fds in inherited.items():
            if _NAME.fullmatch(name) and fds:
                store._fds[name] = fds[0]
                store._stored.add(name)
        for alias, name in aliases.items():
            if name in store._stored and alias not in store._fds:
                store._fds[alias] = os.dup(store._fds[name])
                store._alias[alias] = name
        return store

    def fd(self, name: str) -> int | None:
        return self._fds.get(name)

    def names(self) -> list[str]:
        """Every name kept, stored or alias."""
        return sorted(self._fds)

    @property
    def stored(self) -> int:
        """How many fds systemd holds for us."""
        return len(self._stored)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._alias)

    def keep(self, name: str, fd: int) -> None:
        """Hand `fd` to the store as `name`, replacing whatever had that name. The caller
        still owns `fd` (the store holds its own copy) and calls `release` before closing."""
        if not _NAME.fullmatch(name):
            raise CustodyError(f"fd store name {name!r}: 1-255 of A-Z a-z 0-9 . _ -")
        self.release(name)
        self._fds[name] = fd
        for stored in self._stored:
            if same_file(fd, self._fds[stored]):
                self._alias[name] = stored
                return
        self._store(name)

    def release(self, name: str) -> None:
        """The caller is about to close `name`'s fd: take it out of the store. If another
        name is the same open file, that one is stored in its place."""
        if self._fds.pop(name, None) is None:
            return
        if self._alias.pop(name, None) is not None:
            return
        self._stored.discard(name)
        if self.enabled:
            systemd.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
        heirs = [a for a, n in self._alias.items() if n == name]
        if heirs:
            # Removed first: systemd would take the same open file for one it holds already.
            for a in heirs:
                del self._alias[a]
            self._store(heirs[0])
            for a in heirs[1:]:
                self._alias[a] = heirs[0]

    def _store(self, name: str) -> None:
        self._stored.add(name)
        if self.enabled and not systemd.notify(
            "FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=[self._fds[name]]
        ):
            self.failures += 1
            log.error("fd %s could not be handed to the service manager: a restart loses it",
                      name)
