"""File descriptors the vhost-user peers hand each other: closing them, waiting on eventfds.

Depends on nothing else in vhostser, so the protocol core, the device side and the test
front end can all share it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import trio

__all__ = ["close_fd", "close_fds", "wait_eventfd"]


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
