"""One vring as the vhost-user front end configured it, and its notification fds."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable

from virtqueue import GuestMemory, SplitQueue

from ..fds import close_fd
from .messages import VringAddr

log = logging.getLogger("vhostser.vhost_user")


class Vring:
    """Configuration and run state of one virtqueue.

    The front end sets it piece by piece (NUM, ADDR, BASE, KICK, CALL, ERR, ENABLE); `queue`
    exists only while the ring is started, and `base`/`used_base` hold the ring position while it
    is not, so a stop and a restart continue exactly where the ring was.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.addr: VringAddr | None = None
        self.base = 0
        self.used_base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.queue: SplitQueue | None = None
        # Told of every fd the vring keeps (and None when it closes one): the fd store.
        self.custody: Callable[[str, int | None], None] = lambda name, fd: None
        # Failed call/err eventfd writes, by which; each fd's first failure is logged.
        self.eventfd_failures: Counter[str] = Counter()
        self._failure_logged: set[str] = set()
        # Told just before the kick or call fd changes: whoever serves the ring with its own
        # copy of them (the native data plane) gives the ring back first.
        self.fd_changing: Callable[[], None] = lambda: None

    @property
    def started(self) -> bool:
        return self.queue is not None

    def build_queue(self, mem: GuestMemory, *, event_idx: bool, indirect: bool) -> SplitQueue:
        """Translate the ring addresses and make the queue (VirtqueueError if they are bad)."""
        assert self.addr is not None
        desc = mem.translate_uva(self.addr.desc, 16 * self.size)
        avail = mem.translate_uva(self.addr.avail, 6 + 2 * self.size)
        used = mem.translate_uva(self.addr.used, 6 + 8 * self.size)
        self.queue = SplitQueue(
            mem, self.size, desc, avail, used,
            event_idx=event_idx, indirect=indirect, next_avail=self.base,
            next_used=self.used_base,
        )
        return self.queue

    def drop_queue(self) -> None:
        """Remember where the ring stands and let go of guest memory."""
        if self.queue is not None:
            self.base = self.queue.next_avail
            self.used_base = self.queue.next_used
            self.queue.release()
            self.queue = None

    def notify(self) -> None:
        """Interrupt the driver (the call eventfd); without one the front end polls."""
        self._signal("call", self.call_fd)

    def signal_error(self) -> None:
        """Tell the front end this ring hit an error it cannot recover from (the err eventfd)."""
        self._signal("err", self.err_fd)

    def _signal(self, which: str, fd: int | None) -> None:
        if fd is None:
            return
        try:
            # Non-blocking since receipt: a count at its maximum is EAGAIN, never a sleep.
            os.eventfd_write(fd, 1)
        except OSError as e:
            # At the maximum count a signal is pending already, unread by the front end:
            # nothing is lost by dropping this one, but it is counted.
            self.eventfd_failures[which] += 1
            if which not in self._failure_logged:
                self._failure_logged.add(which)
                log.warning("vring %d: %s eventfd write failed (%s); counted, logged once "
                            "per eventfd", self.index, which, e)

    def fd_name(self, which: str) -> str:
        """The fd store's name of the kick, call or err fd."""
        return f"vu.{which}.{self.index}"

    def set_fd(self, which: str, fd: int | None) -> None:
        """Replace the kick, call or err fd, closing the one it replaces."""
        attr = f"{which}_fd"
        old = getattr(self, attr)
        if which != "err" and old != fd:
            self.fd_changing()
        if old is not None and old != fd:
            self.custody(self.fd_name(which), None)
            close_fd(old)
            self._failure_logged.discard(which)
        setattr(self, attr, fd)
        if fd is not None and fd != old:
            self.custody(self.fd_name(which), fd)

    def reset(self) -> None:
        """Back to the state of a vring that was never configured, but for the call and err
        eventfds: they are the front end's interrupt and error lines, set when it realized
        the device, and a front end need not send them again after a reset (QEMU sends the
        err eventfd once, in vhost_virtqueue_init). The kick goes: a ring waits for a new
        SET_VRING_KICK before it runs again."""
        self.drop_queue()
        self.set_fd("kick", None)
        self.size = 0
        self.addr = None
        self.base = self.used_base = 0
        self.enabled = False
