"""File descriptors the vhost-user peers hand each other: checking what they are, closing
them, waiting on eventfds.

The rule for an fd from outside (the front end, a peer): it is checked for its kind and made
non-blocking when it is received (`accept_fd`), before anything polls, reads or writes it.
A regular file or a dead pipe where an eventfd belongs would make epoll fail, and a blocking
eventfd or socket would put the whole event loop to sleep in read(2) or write(2). O_NONBLOCK is
a flag of the open file, shared with every dup of it (trio waits on a dup of the kick fd) and
with the sender's copy; a sender that clears it again afterwards can still stall a read, which
only the front end (semi-trusted), never the guest, can do.

Depends on nothing else in vhostser, so the protocol core, the device side and the test
front end can all share it.
"""

from __future__ import annotations

import enum
import os
import socket
import stat
from collections.abc import Iterable

import trio

__all__ = ["FdKind", "FdKindError", "accept_fd", "close_fd", "close_fds", "describe_fd",
           "wait_eventfd"]


class FdKind(enum.Enum):
    """What an fd from outside must be."""

    EVENTFD = "an eventfd"
    UNIX_STREAM = "a unix stream socket"
    # Guest memory: mmap'ed, never read or polled; a regular file is what has a size to check
    # against the region (a memfd, a hugetlbfs or tmpfs file). Device DAX is not supported.
    MEMORY = "a regular file (memfd, hugetlbfs, tmpfs)"
    # A device-state transfer channel: read or written sequentially to its end.
    STREAM = "a pipe or a stream socket"


class FdKindError(ValueError):
    """An fd is not of the kind it must be."""


def _socket_of(fd: int) -> tuple[int, int] | None:
    """(family, type) of socket `fd` (which stays open), or None if it cannot be told."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return sock.family, sock.type
    finally:
        sock.detach()


_MODES = ((stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a pipe"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"))


def describe_fd(fd: int) -> str:
    """What `fd` is, for an error message ("a pipe", "an eventfd", "a socket (...)")."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        return f"unusable ({e.strerror})"
    for test, what in _MODES:
        if test(mode):
            return what
    if stat.S_ISSOCK(mode):
        which = _socket_of(fd)
        # AddressFamily and SocketKind when Python knows the numbers, else plain ints.
        names = [getattr(n, "name", str(n)) for n in which or ()]
        return f"a socket ({', '.join(names)})" if names else "a socket"
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"a file of mode 0o{mode:o}"
    return "an eventfd" if link == "anon_inode:[eventfd]" else link


def _is_kind(fd: int, kind: FdKind) -> bool:
    if kind is FdKind.EVENTFD:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            return False
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if kind is FdKind.MEMORY:
        return stat.S_ISREG(mode)
    if kind is FdKind.STREAM:
        return stat.S_ISFIFO(mode) or (
            stat.S_ISSOCK(mode) and (_socket_of(fd) or (0, 0))[1] == socket.SOCK_STREAM)
    return stat.S_ISSOCK(mode) and _socket_of(fd) == (socket.AF_UNIX, socket.SOCK_STREAM)


def accept_fd(fd: int, kind: FdKind) -> None:
    """Check that `fd`, received from outside, is of `kind` (else FdKindError saying what it
    is instead) and make it non-blocking if it is ever read or written (see the module doc)."""
    if not _is_kind(fd, kind):
        raise FdKindError(f"the fd is {describe_fd(fd)}, not {kind.value}")
    if kind is not FdKind.MEMORY:
        os.set_blocking(fd, False)


def close_fd(fd: int | None) -> None:
    """Close `fd` if there is one. A failed close is ignored: the fd is gone either way and
    the peer that sent it cannot be told."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def close_fds(fds: Iterable[int]) -> None:
    """close_fd each of `fds`."""
    for fd in fds:
        close_fd(fd)


async def wait_eventfd(fd: int) -> int:
    """Wait until the eventfd is signalled and consume its count."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:  # another reader drained it first
            continue
