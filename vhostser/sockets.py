"""Listening sockets, made and served the same way for the vhost-user socket, the admin and
metrics listeners and the backends' peers.

Making one (`listen_unix`). Whoever can replace a socket file can receive what connects to
it — QEMU hands the vhost-user socket the guest's RAM as a memfd — so the directory a socket
goes in must be this daemon's:

- a missing directory is made by the daemon itself, mode 0700 (0710 with a socket group:
  its members may reach the socket, not list or change the directory);
- an existing one must be owned by this user or root and writable by nobody else;
- every directory on the way must either be writable only by this user and root, or be
  sticky (as /tmp) with the next component owned by this user or root; a symlink on the
  way is followed only under the same rule (one another user made is refused).

Anything else is refused with `SocketPathError`, naming the path and what is wrong. A stale
socket file is replaced, nothing else is (a second daemon for the same VM must fail, not
steal the first one's socket). Sockets are made mode 0600 unless told otherwise.

Serving one (`accept_connection`, `serve_connections`): accept() failing for lack of fds or
memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged (rate-limited), counted and waited out
with a short backoff, and the listener goes on; a connection that went away before it was
taken is skipped. An optional `PeerPolicy` (SO_PEERCRED) refuses unix peers by uid/gid, and
`serve_connections` caps how many connections a listener serves at once: beyond the cap a
new connection is closed at once and counted.

This module imports nothing of vhostser but the other leaf helpers, so every layer may use
it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import trio

from .logs import RateLimiter
from .pacing import backoff_delays

log = logging.getLogger("vhostser.sockets")

SOCKET_MODE = 0o600  # the daemon's user only, unless the config opens it to a group
# sockaddr_un.sun_path: a path must fit with its NUL.
_SUN_PATH_MAX = 108
BACKLOG = 16
MAX_SYMLINKS = 40  # as Linux's path walk

# accept() failing for the process (out of fds or memory), not for the listener: wait, retry.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() failing for one connection that went away before it was taken: take the next.
_GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR})
ACCEPT_BACKOFF = (0.05, 1.0)  # seconds: first and longest wait while accept() lacks fds

_log_limit = RateLimiter(log, burst=1, interval=10.0)


class SocketPathError(OSError):
    """A socket path this daemon must not listen on: the message says which part of it and
    why."""


# ================================================================== where sockets go


def _others_may_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & 0o022)


def _ours(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), 0)


def _check_entry(parent: str, parent_st: os.stat_result, entry: str,
                 st: os.stat_result) -> None:
    """`entry` (a directory or symlink in `parent`) can only be what it is by our doing."""
    if not _others_may_write(parent_st):
        return
    if not parent_st.st_mode & stat.S_ISVTX:
        raise SocketPathError(
            f"{entry}: its directory {parent} is writable by others (mode "
            f"{stat.S_IMODE(parent_st.st_mode):04o}, not sticky): anyone could replace it")
    if not _ours(st):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory"
        raise SocketPathError(
            f"{entry}: {kind} owned by uid {st.st_uid} (not this user, uid {os.geteuid()}, "
            f"nor root) in {parent}, which others can write: it may be theirs")


def _walk(path: str) -> tuple[str, os.stat_result, list[str]]:
    """Follow absolute `path` component by component, checking each (see the module doc):
    the deepest existing directory (symlinks resolved), its stat, and the names below it
    that do not exist yet."""
    todo = list(PurePosixPath(path).parts[1:])
    cur, cur_st = "/", os.lstat("/")
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            cur = os.path.dirname(cur)
            cur_st = os.lstat(cur)
            continue
        entry = os.path.join(cur, name)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            return cur, cur_st, [name, *todo]
        if stat.S_ISLNK(st.st_mode):
            _check_entry(cur, cur_st, entry, st)
            hops += 1
            if hops > MAX_SYMLINKS:
                raise SocketPathError(f"{path}: more than {MAX_SYMLINKS} symlinks")
            target = PurePosixPath(os.readlink(entry))
            if target.is_absolute():
                cur, cur_st = "/", os.lstat("/")
                todo = [*target.parts[1:], *todo]
            else:
                todo = [*target.parts, *todo]
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise SocketPathError(f"{entry}: not a directory")
        _check_entry(cur, cur_st, entry, st)
        cur, cur_st = entry, st
    return cur, cur_st, []


def socket_directory(path: str, *, group: int | None = None) -> str:
    """Make the directory `path` for sockets, or check the one there (see the module doc);
    its resolved path. `group`: directories made here are mode 0710 and of that group."""
    path = os.path.abspath(path)
    parent, _, missing = _walk(path)
    mode = 0o700 if group is None else 0o710
    for name in missing:
        made = os.path.join(parent, name)
        try:
            os.mkdir(made, mode)
        except FileExistsError:
            pass  # someone was quicker: checked below like any directory found there
        else:
            os.chmod(made, mode)  # whatever the umask
            if group is not None:
                os.chown(made, -1, group)
        parent = made
    where, st, missing = _walk(path)
    if missing:
        raise SocketPathError(f"{path}: {os.path.join(where, missing[0])} vanished while "
                              "being made")
    if not _ours(st):
        raise SocketPathError(
            f"{where}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) or "
            "root: its owner could swap the socket")
    if _others_may_write(st):
        raise SocketPathError(
            f"{where}: writable by others (mode {stat.S_IMODE(st.st_mode):04o}): another "
            "user could swap the socket; use a directory of its own, mode 0700 or 0750")
    return where


def prepare_socket_path(path: str, *, group: int | None = None) -> None:
    """Make room for a listening socket at `path`: its directory made or checked
    (`socket_directory`), a stale socket file (nobody accepts on it) removed. A live socket
    or a non-socket file there is an error."""
    socket_directory(os.path.dirname(os.path.abspath(path)), group=group)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: left by a process that is gone
        return
    except BlockingIOError:
        pass  # alive, its backlog is full
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on it")


async def listen_unix(path: str, mode: int = SOCKET_MODE, *,
                      group: int | None = None) -> trio.socket.SocketType:
    """A unix stream socket listening at `path`, its file given `mode` (and `group`).

    It is bound under a temporary name beside `path`, given its mode and made to listen, and
    only then renamed into place: nobody can connect while it still has the umask's mode, and
    whoever sees the file finds a socket that accepts."""
    prepare_socket_path(path, group=group)
    staged = f"{path}.{os.getpid()}.new"
    if len(os.fsencode(staged)) >= _SUN_PATH_MAX:
        staged = path  # no room for a longer name: bound in place
    # Bound here, not in a worker thread as trio's bind would: a unix bind is one quick
    # syscall, and a thread would let a test's mock clock run ahead while it runs.
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = trio.socket.from_stdlib_socket(plain)
    try:
        plain.bind(staged)
        if group is not None:
            os.chown(staged, -1, group)
        os.chmod(staged, mode)
        sock.listen(BACKLOG)
        if staged != path:
            os.rename(staged, path)
    except BaseException:
        sock.close()
        if staged != path:
            with contextlib.suppress(OSError):
                os.unlink(staged)
        raise
    return sock


def inherited_unix(fd: int) -> trio.socket.SocketType:
    """The listening unix socket a service manager passed as `fd` (socket activation); the
    returned socket owns it, `fd` itself is closed."""
    sock = trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    os.close(fd)
    return sock


# ================================================================== who comes in


@dataclass(frozen=True)
class PeerPolicy:
    """Who may connect to a unix socket, by its SO_PEERCRED: this daemon's own user always,
    the users in `uids` and whoever's primary group is in `gids`. With neither set, anyone
    the socket file's mode lets in."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def permits(self, uid: int, gid: int) -> bool:
        if not (self.uids or self.gids):
            return True
        return uid == os.geteuid() or uid in self.uids or gid in self.gids


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of a unix socket's peer, as the kernel saw it at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def refuses(policy: PeerPolicy, conn: trio.socket.SocketType, label: str) -> bool:
    """Whether `policy` refuses the peer of unix socket `conn`; a refusal is logged
    (rate-limited), the caller counts it and closes `conn`."""
    pid, uid, gid = peer_credentials(conn)
    if policy.permits(uid, gid):
        return False
    _log_limit.log(logging.WARNING, (label, "peer"),
                   "%s: refused a connection from uid %d gid %d (pid %d): not this user nor "
                   "in allow_uids/allow_gids", label, uid, gid, pid)
    return True


@dataclass
class ListenerCounters:
    """What happened on one listener, for `stats` and the metrics."""

    accepted: int = 0  # taken from accept() and let in by the peer policy
    refused_busy: int = 0  # of those, over the listener's connection cap: closed at once
    refused_peer: int = 0  # SO_PEERCRED not allowed
    accept_errors: int = 0  # accept() out of fds or memory (EMFILE, ...): waited out

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


async def accept_connection(
    listener: trio.socket.SocketType, label: str,
    counters: ListenerCounters | None = None, policy: PeerPolicy | None = None,
) -> trio.socket.SocketType:
    """The next connection on `listener` (see the module doc for what is waited out, skipped
    and refused). `label` names the listener in log lines."""
    counters = counters if counters is not None else ListenerCounters()
    delays = backoff_delays(*ACCEPT_BACKOFF)
    while True:
        try:
            conn, _ = await listener.accept()
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                continue
            if e.errno not in _RESOURCE_ERRNOS:
                raise
            counters.accept_errors += 1
            delay = next(delays)
            _log_limit.log(logging.ERROR, (label, "accept"),
                           "%s: accept failed: %s (%d times so far; retrying in %.2f s)",
                           label, e.strerror, counters.accept_errors, delay)
            await trio.sleep(delay)
            continue
        delays = backoff_delays(*ACCEPT_BACKOFF)
        if policy is not None and refuses(policy, conn, label):
            counters.refused_peer += 1
            conn.close()
            continue
        counters.accepted += 1
        return conn


async def serve_connections(
    listener: trio.socket.SocketType,
    handler: Callable[[trio.socket.SocketType], Awaitable[None]],
    *,
    label: str,
    max_connections: int,
    counters: ListenerCounters | None = None,
    policy: PeerPolicy | None = None,
) -> None:
    """Accept forever, each connection handled by `handler` in a task of its own (which
    must close it), at most `max_connections` at once."""
    counters = counters if counters is not None else ListenerCounters()
    active = 0

    async def run(conn: trio.socket.SocketType) -> None:
        nonlocal active
        try:
            await handler(conn)
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        while True:
            conn = await accept_connection(listener, label, counters, policy)
            if active >= max_connections:
                counters.refused_busy += 1
                _log_limit.log(logging.WARNING, (label, "busy"),
                               "%s: connection refused: %d connections open, the most it "
                               "serves at once (%d refused so far)", label, active,
                               counters.refused_busy)
                conn.close()
                continue
            active += 1
            nursery.start_soon(run, conn)

def passed_unix(fd: int) -> socket.socket:
    """The unix stream socket a parent passed as `fd` (`run --fd`, the vhost-user back-end
    convention), listening or already connected: libvirt passes virtiofsd a listening socket,
    its vhost-user-gpu and crosvm a connected one (SO_ACCEPTCONN tells them apart). The
    returned socket owns `fd`; OSError/ValueError say what `fd` is instead."""
    try:
        sock = socket.socket(fileno=fd)  # the family and type are read from the fd itself
    except OSError as e:
        raise OSError(e.errno, f"--fd {fd}: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        kind = f"{sock.family.name} {sock.type.name}"
        sock.detach()  # not ours to close: the caller passed it
        raise ValueError(f"--fd {fd}: a {kind} socket, not a unix stream socket")
    sock.set_inheritable(False)
    return sock


def is_listening(sock: socket.socket | trio.socket.SocketType) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
