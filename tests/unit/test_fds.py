"""vhostser.fds: checking the kind of fds from outside, closing fds that may be gone already,
and waiting on an eventfd."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from vhostser.fds import (
    FdKind,
    FdKindError,
    accept_fd,
    close_fd,
    close_fds,
    describe_fd,
    wait_eventfd,
)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_fd_closes_and_ignores_none_and_closed_fds() -> None:
    r, w = os.pipe()
    close_fd(r)
    assert not _is_open(r)
    close_fd(r)  # already closed: EBADF is ignored
    close_fd(None)
    os.close(w)


def test_close_fds_closes_every_one_even_past_a_bad_one() -> None:
    r, w = os.pipe()
    os.close(r)
    close_fds([r, w])
    assert not _is_open(w)


async def test_wait_eventfd_returns_the_count_and_consumes_it() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.eventfd_write(fd, 2)
        os.eventfd_write(fd, 3)
        assert await wait_eventfd(fd) == 5
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    finally:
        os.close(fd)


async def test_wait_eventfd_waits_for_the_signal() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        async with trio.open_nursery() as nursery:
            got: list[int] = []

            async def waiter() -> None:
                got.append(await wait_eventfd(fd))

            nursery.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert got == []
            os.eventfd_write(fd, 1)
        assert got == [1]
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ kinds at receipt


def _regular_file(tmp_path: Path) -> int:
    return os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)


def _dead_pipe(tmp_path: Path) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _udp(tmp_path: Path) -> int:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()


def _unix_dgram(tmp_path: Path) -> int:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()


def _unix_stream(tmp_path: Path) -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _blocking_eventfd(tmp_path: Path) -> int:
    return os.eventfd(0)


def _memfd(tmp_path: Path) -> int:
    return os.memfd_create("kind")


def _directory(tmp_path: Path) -> int:
    return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)


def _epoll(tmp_path: Path) -> int:
    with select.epoll() as ep:
        return os.dup(ep.fileno())


MAKERS: dict[str, tuple[Callable[[Path], int], str]] = {
    "regular-file": (_regular_file, "a regular file"),
    "memfd": (_memfd, "a regular file"),
    "dead-pipe": (_dead_pipe, "a pipe"),
    "udp": (_udp, "a socket (AF_INET, SOCK_DGRAM)"),
    "unix-dgram": (_unix_dgram, "a socket (AF_UNIX, SOCK_DGRAM)"),
    "unix-stream": (_unix_stream, "a socket (AF_UNIX, SOCK_STREAM)"),
    "eventfd": (_blocking_eventfd, "an eventfd"),
    "directory": (_directory, "a directory"),
    "epoll": (_epoll, "anon_inode:[eventpoll]"),
}
FITS = {FdKind.EVENTFD: {"eventfd"}, FdKind.UNIX_STREAM: {"unix-stream"},
        FdKind.MEMORY: {"regular-file", "memfd"}, FdKind.STREAM: {"dead-pipe", "unix-stream"}}


@pytest.mark.parametrize("kind", list(FdKind), ids=[k.name for k in FdKind])
@pytest.mark.parametrize("what", sorted(MAKERS))
def test_accept_fd_takes_its_kind_only(kind: FdKind, what: str, tmp_path: Path) -> None:
    make, described = MAKERS[what]
    fd = make(tmp_path)
    try:
        assert describe_fd(fd) == described
        if what in FITS[kind]:
            accept_fd(fd, kind)
            # What is read, written or polled can never block the event loop.
            assert os.get_blocking(fd) is (kind is FdKind.MEMORY)
        else:
            with pytest.raises(FdKindError) as info:
                accept_fd(fd, kind)
            assert str(info.value) == f"the fd is {described}, not {kind.value}"
            assert os.get_blocking(fd)  # a refused fd is left as it came
    finally:
        os.close(fd)


def test_non_blocking_is_shared_with_the_senders_copy() -> None:
    # The flag belongs to the open file: the front end's copy and the runner's dup see it.
    fd = os.eventfd(0)
    theirs, dup = os.dup(fd), os.dup(fd)
    try:
        accept_fd(fd, FdKind.EVENTFD)
        assert not os.get_blocking(theirs) and not os.get_blocking(dup)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(dup)
    finally:
        close_fds([fd, theirs, dup])


def test_a_closed_fd_is_no_kind() -> None:
    r, w = os.pipe()
    close_fds([r, w])
    with pytest.raises(FdKindError, match="unusable"):
        accept_fd(r, FdKind.EVENTFD)
