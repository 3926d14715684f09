"""The native data plane under the console device: a port whose bytes need no decision moves
them in the pump's thread (virtqueue.pump), not in trio.

A port is *engaged* while everything about it is settled: its session is open on both sides,
nothing is staged or held, both its rings run, and its backend names one stream socket that
may take the guest's bytes as they come and give the guest what it sends
(`PortBackend.native_socket`: a `unix`/`tcp` port in stream mode with one peer and nothing
queued for it). Then the port's two rings are lent to the pump (the core serves neither, the
rings' runners are stopped: the pump alone reads their kicks) and the backend stops reading
that socket. Every decision stays in Python: before the core changes anything about the
port (a session event, a reset, a port removal, the hand-over freeze) and before its rings
stop (a new kick or call fd, a memory table change, GET_VRING_BASE), it is disengaged — a
synchronous detach that hands the rings back at their exact positions; a new call fd
(Vring.fd_changing) too — and the Python
path goes on from there; once everything is settled again it is engaged again.

What a lane moved is counted into the port's ledger and the backend's counters whenever the
device is asked (`sync`: stats, snapshots) and at detach. A lane that stops by itself (the
peer hung up, a bad chain, a broken ring) is disengaged and its ring is served once by the
Python path, which decides as it always does (counts the bad chain, breaks the ring, sees
the EOF) before the port may be engaged again.

Delivery across a SIGKILL is as the pump's module doc says (at most one chain per ring
again, nothing lost): the live restart resumes from the used index in guest memory, which
the pump publishes per chain.

Not yet the default: VHOSTSER_DATAPLANE=native turns it on. With it, `vhostser soak`
(resets, driver reinits, hostile rings and flapping peers at once) stalls within its first
epochs; until that is understood every port stays on the Python path unless asked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .core import MAX_TX_CHAIN_BYTES, port_of_queue, rx_queue, tx_queue

if TYPE_CHECKING:
    from virtqueue.pump import Pump

    from ..vhost_user.vring import Vring
    from .core import ConsoleCore
    from .port import Port

log = logging.getLogger("vhostser.console")


def _available() -> bool:
    # Opt-in until the stateful daemon test passes with it (see the module doc).
    if os.environ.get("VHOSTSER_DATAPLANE", "python") != "native":
        return False
    try:
        import virtqueue.pump  # noqa: F401  (the compiled helper may be missing)
    except ImportError:
        return False
    return True


@dataclass
class _Moved:
    """What a lane had moved when last counted."""

    chains: int = 0
    bytes: int = 0


def _nothing() -> None:
    pass


class FastPath:
    """The device's engaged ports and the pump that serves them."""

    def __init__(self, core: ConsoleCore, nursery: trio.Nursery,
                 vrings: Callable[[int], Vring | None],
                 stop_runner: Callable[[int], None],
                 start_runner: Callable[[Vring], None]) -> None:
        self._core = core
        self._nursery = nursery
        self._vrings = vrings
        self._stop_runner = stop_runner
        self._start_runner = start_runner
        self.enabled = _available()
        self._pump: Pump | None = None
        self.engaged: dict[int, Port] = {}
        self._sockets: dict[int, int] = {}  # per engaged port: the socket it was given
        self._moved: dict[int, _Moved] = {}  # per lane (queue index)
        # Rings a lane gave back after stopping by itself: the Python path serves each once
        # (and decides) before its port may be engaged again.
        self._python_first: set[int] = set()

    # ------------------------------------------------------------------ decisions

    def consider(self, ports: dict[int, Port]) -> None:
        """Engage every port that can be (cheap: called after every settle)."""
        if not self.enabled:
            return
        for pid, port in list(self.engaged.items()):
            if port.backend.native_socket() != self._sockets[pid]:
                self.disengage(pid)  # a second peer came, say: the backend decides again
        for pid, port in ports.items():
            if pid not in self.engaged and self._eligible(pid, port):
                self._engage(pid, port)

    def _eligible(self, pid: int, port: Port) -> bool:
        tx, rx = tx_queue(pid), rx_queue(pid)
        if tx in self._python_first or rx in self._python_first:
            return False
        if not self._core.native_ok(pid):
            return False
        return port.backend.native_socket() is not None and all(
            (v := self._vrings(i)) is not None and v.queue is not None
            and v.kick_fd is not None and v.call_fd is not None for i in (tx, rx))

    def _engage(self, pid: int, port: Port) -> None:
        sock = port.backend.native_socket()
        tx, rx = self._vrings(tx_queue(pid)), self._vrings(rx_queue(pid))
        assert sock is not None and tx is not None and rx is not None
        assert tx.queue is not None and rx.queue is not None
        assert tx.kick_fd is not None and tx.call_fd is not None
        assert rx.kick_fd is not None and rx.call_fd is not None
        pump = self._start_pump()
        self._stop_runner(tx.index)
        self._stop_runner(rx.index)
        self._core.lend(tx.index)
        self._core.lend(rx.index)
        try:
            pump.attach_g2h(tx.index, tx.queue, tx.kick_fd, tx.call_fd, sock,
                            max_chain=MAX_TX_CHAIN_BYTES)
            try:
                pump.attach_h2g(rx.index, rx.queue, rx.kick_fd, rx.call_fd, sock)
            except BaseException:
                pump.detach(tx.index)
                raise
        except (OSError, ValueError) as e:
            log.warning("port %d: the native data plane cannot take it (%s): staying on "
                        "the Python path", pid, e)
            self._python_first.update((tx.index, rx.index))
            self._give_back(tx)
            self._give_back(rx)
            return
        self._moved[tx.index], self._moved[rx.index] = _Moved(), _Moved()
        self.engaged[pid] = port
        self._sockets[pid] = sock
        tx.fd_changing = rx.fd_changing = lambda: self.disengage(pid)
        port.backend.native_engaged(True)
        log.debug("port %d: on the native data plane", pid)

    def disengage(self, pid: int) -> None:
        """Take port `pid` back onto the Python path now (its rings at their positions)."""
        port = self.engaged.get(pid)
        if port is None or self._pump is None:
            return
        for index in (tx_queue(pid), rx_queue(pid)):
            state = self._pump.detach(index)
            self._count(pid, index, state.counters.chains, state.counters.bytes)
            del self._moved[index]
            if state.offset:
                self._core.resume_chain(pid, state.offset)
            if state.stop is not None:
                log.debug("port %d: lane %d stopped: %s", pid, index, state.stop.reason)
                self._python_first.add(index)
                if state.stop.head is not None:
                    self._core.retake(index)  # the Python path decides on that chain
        del self.engaged[pid], self._sockets[pid]
        for index in (tx_queue(pid), rx_queue(pid)):
            if (vring := self._vrings(index)) is not None:
                vring.fd_changing = _nothing
                self._give_back(vring)
        port.backend.native_engaged(False)
        log.debug("port %d: back on the Python path", pid)

    def disengage_all(self) -> None:
        for pid in list(self.engaged):
            self.disengage(pid)

    def served(self, index: int) -> None:
        """The Python path served ring `index` (after a lane gave it back)."""
        self._python_first.discard(index)

    def sync(self) -> None:
        """Count what the engaged lanes moved since last asked."""
        if self._pump is None:
            return
        for pid in self.engaged:
            for index in (tx_queue(pid), rx_queue(pid)):
                c = self._pump.counters(index)
                self._count(pid, index, c.chains, c.bytes)

    # ------------------------------------------------------------------ mechanics

    def _give_back(self, vring: Vring) -> None:
        self._core.take_back(vring.index)
        if vring.queue is not None:
            self._start_runner(vring)

    def _count(self, pid: int, index: int, chains: int, nbytes: int) -> None:
        moved = self._moved[index]
        d_chains, d_bytes = chains - moved.chains, nbytes - moved.bytes
        moved.chains, moved.bytes = chains, nbytes
        if not (d_chains or d_bytes):
            return
        port = self.engaged.get(pid)
        counters = self._core.state.ports[pid].counters
        if index == tx_queue(pid):
            counters.bytes_guest_wrote += d_bytes
            counters.bytes_from_guest += d_bytes
            counters.buffers_from_guest += d_chains
            if port is not None:
                port.backend.native_moved(to_host=d_bytes, from_host=0)
        else:
            counters.bytes_from_host += d_bytes
            counters.bytes_to_guest += d_bytes
            counters.buffers_to_guest += d_chains
            if port is not None:
                port.backend.native_moved(to_host=0, from_host=d_bytes)

    def _start_pump(self) -> Pump:
        if self._pump is None:
            from virtqueue.pump import Pump

            self._pump = Pump()
            self._nursery.start_soon(self._watch, self._pump)
        return self._pump

    async def _watch(self, pump: Pump) -> None:
        """Lanes that stopped by themselves go back to the Python path."""
        try:
            while True:
                # Readable while lanes are to be reported; stopped() clears it (not ours
                # to read).
                await trio.lowlevel.wait_readable(pump.notify_fd)
                for index, stop in pump.stopped():
                    where = port_of_queue(index)
                    assert where is not None
                    log.debug("lane %d stopped by itself: %s", index, stop.reason)
                    self.disengage(where[0])
        finally:
            self.disengage_all()
            trio.lowlevel.notify_closing(pump.notify_fd)
            pump.close()
            self._pump = None
