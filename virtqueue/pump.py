"""The pump: a native thread that moves bytes between split virtqueues and stream sockets.

A `Pump` owns one C thread (pump.c) with its own epoll set; it never takes the GIL and never
touches a Python object. Python keeps the control plane and hands the thread *lanes*, one
direction of one port each:

- `attach_g2h(lane, queue, kick_fd, call_fd, sock_fd)`: the guest's tx ring to the socket. Chains
  are written with sendmsg straight from guest memory. A partial write keeps the chain and its
  offset and waits for EPOLLOUT (no copy is made). A chain is completed (its used element, then
  the used idx) as soon as its last byte is in the socket.
- `attach_h2g(lane, queue, kick_fd, call_fd, sock_fd)`: the socket to the guest's rx ring. With
  a chain held, bytes are peeked (MSG_PEEK) straight into its writable buffers, the chain is
  completed, and only then are those bytes consumed from the socket (TCP: MSG_TRUNC; AF_UNIX
  streams cannot discard, so through a scratch buffer).

Kicks are waited for only when the ring is empty, socket readiness only when there is work for
the socket. Kick and interrupt suppression are SplitQueue's (disable, drain, enable, check
again; EVENT_IDX or the NO_NOTIFY / NO_INTERRUPT flags), and so are the fences. The call
eventfd is written once per run of a lane, when need_event (or the flag) says so.

Delivery if the process dies with lanes attached (live restart resumes from the used idx):
g2h, at most the one chain being written per lane is sent again (it was written, wholly or in
part, and not yet used); h2g, at most the one buffer completed and not yet consumed is
delivered again; nothing is ever lost, since nothing is consumed before it is used.

Detach (`detach(lane)`, synchronous): when it returns the thread no longer touches that ring,
its memory or its fds (the pump uses dups of them, which detach closes). The queue gets its
positions back (SplitQueue.take_back) and a chain the lane held goes back to the avail side:
`LaneState.offset` says how many bytes of it (the chain at next_avail) were already written
to the socket (g2h). Whoever goes on must skip them: `attach_g2h(..., offset=...)` does, and
so must a Python path (pop, then send from that offset). Nothing is lost or duplicated.

Lanes stop by themselves on EOF, socket errors, a bad chain or ring, or a full call eventfd:
the thread leaves them alone, makes `notify_fd` readable and lists them in `stopped()` with a
`LaneStop` (the ChainError / RingError / OSError SplitQueue or the socket would have raised,
with the same messages). A stopped lane is still attached: detach it. After a chain error the
queue is past the bad chain and it is not completed (LaneStop.head: complete it empty, as the
daemon does, then attach again); after a ring error take_back marks the queue broken.

A queue is attached with every chain it took completed (next_avail == next_used), so that
completion stays in order.

Thread-safety contract: while a lane is attached its SplitQueue must not be used, nobody else
may read its kick eventfd (a kick read elsewhere is a kick the pump never sees), and guest
memory and the ring addresses must not change: detach every lane of a memory table before
unmapping or replacing any region, and re-attach afterwards. The pump's methods may be called
from any thread; each holds the pump's lock for its bookkeeping. The file descriptors may be
closed by the caller at any time after attach (the pump keeps its own dups).
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from virtqueue._native._common import chain_error
from virtqueue._native._ring import ffi, lib
from virtqueue.errors import ChainError, GuestMemoryError, RingError, VirtqueueError
from virtqueue.split import SplitQueue

__all__ = ["MAX_LANES", "Counters", "LaneState", "LaneStop", "Pump"]

# An editable install leaves the built module in the tree, where it outlives edits to pump.h.
if getattr(lib, "PUMP_API_VERSION", None) != 1:
    raise ImportError("virtqueue._native._ring is stale: rebuild it (virtqueue/_native/build.py)")

MAX_LANES: int = lib.PUMP_MAX_LANES


@dataclass(frozen=True, slots=True)
class LaneStop:
    """Why a lane stopped by itself."""

    kind: str  # "eof", "errno", "hangup", "chain", "ring", "writable", "readonly", "too-long",
    # "call-full"
    reason: str
    # What SplitQueue or the socket would have raised, when there is such an exception.
    error: VirtqueueError | OSError | None
    # The chain at fault (kinds chain, writable, readonly, too-long), not completed.
    head: int | None


@dataclass(frozen=True, slots=True)
class Counters:
    """What a lane did so far."""

    chains: int
    bytes: int
    wakeups: int  # runs on an epoll event
    calls: int  # call eventfd writes
    kicks: int  # kick eventfd reads that found a kick


@dataclass(frozen=True, slots=True)
class LaneState:
    """A detached lane: where its ring stands (already written back into the queue)."""

    next_avail: int
    next_used: int
    signalled: int
    offset: int  # g2h: bytes of the chain at next_avail already sent
    counters: Counters
    stop: LaneStop | None


class _Lane:
    """A lane's queue, and the cdata that must outlive its use by the thread."""

    __slots__ = ("keep", "queue")

    def __init__(self, queue: SplitQueue, keep: list[Any]) -> None:
        self.queue = queue
        self.keep = keep


def _counters(st: Any) -> Counters:
    return Counters(st.chains, st.bytes, st.wakeups, st.calls, st.kicks)


def _stop_of(st: Any, size: int) -> LaneStop | None:
    kind: int = st.stop_kind
    head: int = st.stop_head
    error: VirtqueueError | OSError | None = None
    if kind == lib.PUMP_RUNNING:
        return None
    if kind == lib.PUMP_STOP_EOF:
        return LaneStop("eof", "the peer closed the connection", None, None)
    if kind == lib.PUMP_STOP_HUP:
        return LaneStop("hangup", "the socket hung up", None, None)
    if kind == lib.PUMP_STOP_CALL_FULL:
        return LaneStop("call-full", "the call eventfd counter is full", None, None)
    if kind == lib.PUMP_STOP_ERRNO:
        error = OSError(st.stop_errno, os.strerror(st.stop_errno))
        name = errno_mod.errorcode.get(st.stop_errno, str(st.stop_errno))
        return LaneStop("errno", f"{name}: {error.strerror}", error, None)
    if kind == lib.PUMP_STOP_AVAIL:
        error = RingError.avail_ahead(st.stop_value, size)
    elif kind == lib.PUMP_STOP_HEAD:
        error = RingError.head_out_of_range(st.stop_index, st.stop_value, size)
    if isinstance(error, RingError):
        return LaneStop("ring", str(error), error, None)
    if kind == lib.PUMP_STOP_CHAIN:
        error = chain_error(head, st.stop_code, st.stop_index, st.stop_value, st.stop_n,
                            bool(st.stop_indirect))
    elif kind == lib.PUMP_STOP_MEMORY:
        outside = GuestMemoryError.outside(st.stop_addr, st.stop_len)
        error = (ChainError.indirect_outside(head, st.stop_index, outside) if st.stop_indirect
                 else ChainError.buffer_outside(head, outside))
    if isinstance(error, ChainError):
        return LaneStop("chain", str(error), error, head)
    if kind == lib.PUMP_STOP_WRITABLE:
        return LaneStop("writable", f"tx chain {head} has device-writable buffers", None, head)
    if kind == lib.PUMP_STOP_READONLY:
        return LaneStop("readonly", f"rx chain {head} has no writable buffer", None, head)
    if kind == lib.PUMP_STOP_TOO_LONG:
        return LaneStop("too-long", f"tx chain {head} of {st.stop_value} bytes is too long",
                        None, head)
    raise AssertionError(f"unknown pump stop kind {kind}")


class Pump:
    """One data-plane thread and its lanes; see the module doc for the contract."""

    def __init__(self) -> None:
        p = lib.pump_new()
        if p == ffi.NULL:
            e = ffi.errno
            raise OSError(e, f"cannot start the pump thread: {os.strerror(e)}")
        self._p: Any = p
        self._lock = threading.Lock()
        self._lanes: dict[int, _Lane] = {}

    @property
    def notify_fd(self) -> int:
        """An eventfd that is readable while stopped() has lanes to report (do not read it)."""
        self._check()
        fd: int = lib.pump_notify_fd(self._p)
        return fd

    def attach_g2h(
        self,
        lane: int,
        queue: SplitQueue,
        kick_fd: int,
        call_fd: int,
        sock_fd: int,
        *,
        offset: int = 0,
        max_chain: int = 0,
    ) -> None:
        """Move the guest's tx `queue` to stream socket `sock_fd` from now on, skipping
        `offset` bytes of the chain at next_avail (a detached lane's LaneState.offset); a
        chain of more than `max_chain` bytes (0: no limit) stops the lane unsent."""
        self._attach(lane, lib.PUMP_G2H, queue, kick_fd, call_fd, sock_fd, offset, max_chain)

    def attach_h2g(
        self, lane: int, queue: SplitQueue, kick_fd: int, call_fd: int, sock_fd: int
    ) -> None:
        """Move what stream socket `sock_fd` receives into the guest's rx `queue`."""
        self._attach(lane, lib.PUMP_H2G, queue, kick_fd, call_fd, sock_fd, 0, 0)

    def detach(self, lane: int) -> LaneState:
        """Take lane `lane` back (running or stopped) and write its positions into its queue."""
        self._check()
        with self._lock:
            entry = self._lanes.get(lane)
            if entry is None:
                raise KeyError(f"lane {lane} is not attached")
            st = ffi.new("struct pump_state *")
            rc = lib.pump_detach(self._p, lane, st)
            if rc < 0:
                raise OSError(-rc, f"cannot detach lane {lane}: {os.strerror(-rc)}")
            del self._lanes[lane]
        q = entry.queue
        stop = _stop_of(st, q.size)
        q.take_back(st.next_avail, st.next_used, st.signalled,
                    stop.reason if stop is not None and stop.kind == "ring" else None)
        return LaneState(st.next_avail, st.next_used, st.signalled, st.offset, _counters(st),
                         stop)

    def counters(self, lane: int) -> Counters:
        """What lane `lane` moved so far (while it runs, too)."""
        return _counters(self._peek(lane))

    def stop_of(self, lane: int) -> LaneStop | None:
        """Why attached lane `lane` stopped, or None while it runs."""
        with self._lock:
            entry = self._lanes.get(lane)
            if entry is None:
                raise KeyError(f"lane {lane} is not attached")
            return _stop_of(self._peek(lane), entry.queue.size)

    def stopped(self) -> list[tuple[int, LaneStop]]:
        """Lanes that stopped by themselves since the last call, with why; clears notify_fd."""
        self._check()
        out = ffi.new("int[]", MAX_LANES)
        result = []
        # Under the lock, so that no lane listed is detached before it is read.
        with self._lock:
            for i in range(lib.pump_stopped(self._p, out, MAX_LANES)):
                stop = _stop_of(self._peek(out[i]), self._lanes[out[i]].queue.size)
                assert stop is not None, "a lane reported stopped runs"
                result.append((out[i], stop))
        return result

    def lanes(self) -> list[int]:
        """The attached lanes, running or stopped."""
        with self._lock:
            return sorted(self._lanes)

    def close(self) -> None:
        """Detach every lane (their queues get their positions back), then end the thread."""
        if self._p is None:
            return
        for lane in self.lanes():
            self.detach(lane)
        with self._lock:
            p, self._p = self._p, None
        lib.pump_free(p)

    def __enter__(self) -> Pump:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check(self) -> None:
        if self._p is None:
            raise ValueError("the pump is closed")

    def _peek(self, lane: int) -> Any:
        self._check()
        st = ffi.new("struct pump_state *")
        if lib.pump_peek(self._p, lane, st) < 0:
            raise KeyError(f"lane {lane} is not attached")
        return st

    def _attach(
        self,
        lane: int,
        direction: int,
        queue: SplitQueue,
        kick_fd: int,
        call_fd: int,
        sock_fd: int,
        offset: int,
        max_chain: int,
    ) -> None:
        self._check()
        if not 0 <= lane < MAX_LANES:
            raise ValueError(f"lane {lane} is not below {MAX_LANES}")
        with self._lock:
            if lane in self._lanes:
                raise ValueError(f"lane {lane} is attached already")
            if any(e.queue is queue for e in self._lanes.values()):
                raise ValueError("the queue is attached to another lane")
            lent = queue.lend()
            if lent.next_avail != lent.next_used:
                # The pump completes in order from next_used: a chain taken before would be
                # completed by nobody, and live restart's "resume from used idx" would break.
                raise ValueError(
                    f"{(lent.next_avail - lent.next_used) % 65536} chains were taken and not "
                    "completed: push or give them back before attaching"
                )
            regions = lent.memory.host_regions()
            table = ffi.new("struct pump_region[]", len(regions))
            # Each from_buffer pins its view (and so the mapping) until the lane is detached.
            keep: list[Any] = [table]
            for i, (gpa, buf) in enumerate(regions):
                host = ffi.from_buffer(buf, require_writable=True)
                keep.append(host)
                table[i].gpa = gpa
                table[i].size = len(buf)
                table[i].host = ffi.cast("uint8_t *", host)
            cfg = ffi.new("struct pump_lane_cfg *")
            for name, view in (("desc", lent.desc), ("avail", lent.avail), ("used", lent.used)):
                ptr = ffi.from_buffer(view, require_writable=True)
                keep.append(ptr)
                setattr(cfg, name, ffi.cast("uint8_t *", ptr))
            cfg.dir = direction
            cfg.size = lent.size
            cfg.next_avail = lent.next_avail
            cfg.next_used = lent.next_used
            cfg.signalled = lent.signalled
            cfg.event_idx = lent.event_idx
            cfg.indirect = lent.indirect
            cfg.kick_fd, cfg.call_fd, cfg.sock_fd = kick_fd, call_fd, sock_fd
            cfg.regions = table
            cfg.nregions = len(regions)
            cfg.offset = offset
            cfg.max_chain = max_chain
            rc = lib.pump_attach(self._p, lane, cfg)
            if rc < 0:
                raise OSError(-rc, f"cannot attach lane {lane}: {os.strerror(-rc)}")
            self._lanes[lane] = _Lane(queue, keep)
