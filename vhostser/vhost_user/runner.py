"""Running a started vring from trio: wait for kicks, drain chains, notify.

The one loop every device queue uses, so the notification dance (disable, drain, re-enable,
re-check) is written once. It waits on its own dup of the kick fd: the protocol core may close
the original at any moment (a new SET_VRING_KICK, GET_VRING_BASE), and trio must never be
left polling an fd number that was closed under it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from virtqueue import RingError

from ..fds import wait_eventfd
from .vring import Vring


class VringRunner:
    """Serves one started vring until cancelled.

    `service()` does the device's work on the ring (pop, fill or consume, push) and returns
    True if it stopped because the ring ran out of buffers (so kicks are wanted), False if it
    stopped because the device side is blocked (no host data, a slow peer): then the device
    calls `poke()` once it can go on, and the ring is not polled meanwhile. When the guest
    breaks the ring (RingError, wherever the runner touches it) the runner calls
    `on_broken(vring, reason)` and stops; the device decides what else stops with it.
    """

    def __init__(
        self,
        vring: Vring,
        service: Callable[[], bool],
        on_broken: Callable[[Vring, str], None],
    ) -> None:
        assert vring.queue is not None and vring.kick_fd is not None
        self.vring = vring
        self.queue = vring.queue
        self._service = service
        self._on_broken = on_broken
        # Dup'd now, synchronously: by the time run() starts, the protocol core may already
        # have closed vring.kick_fd and its number may belong to another file.
        self._kick = os.dup(vring.kick_fd)
        self._wake = trio.Event()
        self._done = False  # the ring stopped or broke: no round runs any more

    def stop(self) -> None:
        """Touch the ring no more, from now (another server takes it): a task already woken
        would otherwise serve it once more before a cancellation reaches it."""
        self._done = True

    def poke(self) -> None:
        """The device can make progress again: run `service` soon."""
        self._wake.set()

    async def run(self) -> None:
        """Serve until cancelled (or the ring breaks); must be called once, as it owns the
        kick fd dup."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_kicks, self._kick)
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            # Through trio, so its epoll registration goes too: trio only disarms an fd whose
            # waiter left, and a stale kernel entry could outlive the close (the eventfd stays
            # open in the front end) and confuse a later fd with the same number.
            trio.lowlevel.notify_closing(self._kick)
            os.close(self._kick)

    async def _watch_kicks(self, kick: int) -> None:
        # A kick is served here, in the task that saw it, rather than handed to _serve's task
        # through the event: one trio task switch less per kick (a round trip has one).
        while True:
            await wait_eventfd(kick)
            if not self._round():
                return

    async def _serve(self) -> None:
        while True:
            # Made before the round: a poke during it (the service settles its outputs) is
            # for this round's successor and must not be lost.
            self._wake = trio.Event()
            if not self._round():
                return
            await self._wake.wait()

    def _round(self) -> bool:
        """Serve until the ring wants kicks or the device side blocks (the notification
        dance); False once the ring stopped or broke (then the runner ends)."""
        queue = self.queue
        while not self._done and self.vring.queue is queue:
            try:
                queue.disable_notifications()
                wants_kicks = self._service()
                if self.vring.queue is not queue:
                    break  # stopped while serving
                if queue.should_notify():
                    self.vring.notify()
                if wants_kicks and queue.enable_notifications():
                    continue  # buffers arrived between the drain and re-enabling
                return True
            except RingError as e:
                # Nothing on this ring can be trusted until the driver sets it up again.
                self._on_broken(self.vring, str(e))
                break
        self._done = True
        self._wake.set()  # _serve's task ends the runner, whichever task saw the end
        return False
