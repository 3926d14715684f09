"""vhostser.fds: closing fds that may be gone already, and waiting on an eventfd."""

from __future__ import annotations

import os

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from vhostser.fds import close_fd, close_fds, wait_eventfd


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
