"""The console device's trio layer: tasks, fds and runners around the sans-io `ConsoleCore`.

It implements the vhost-user `Device` interface by handing each call to the core, runs one
`VringRunner` per started queue (kick eventfd in, call eventfd out) whose service is the
core's, runs each port's backend in its own task, and carries out what the core outputs:
backend session callbacks, queue wake-ups, credit for blocked senders, config changes. It
decides nothing itself.

Every call into a backend is made here, through one helper (`_contained`), and what a backend
raises is its port's failure alone — never the device's, the control ring's or the process's
(a `stdout` backend whose reader went away raises BrokenPipeError in `guest_data`). Whichever
call it was (`guest_data`, `session_opened`, `session_closed`, `state_changed`, `reopen`,
`counter_values`, `drain`, or `run` itself):

- it is logged (rate-limited per port) and counted: `backend_failures` on the device and on
  the port;
- the backend is not called again; its `run` is cancelled and the port's host side detached
  (the guest sees host PORT_OPEN 0, its session goes on);
- a new backend, made from the port's spec like the first one, starts after a backoff of
  0.1 s doubling to 5 s (back to 0.1 s once a backend ran that long); it hears the open
  session, if there is one, as `session_opened` (a replay, as after a daemon restart), and
  guest writes held meanwhile are offered to it;
- the guest bytes of a `guest_data` that raised are dropped, counted as discarded with reason
  `backend-failed`, and their chain completed: nobody can be asked to take them again. While
  the backend is down a data port holds the guest's writes (they go to the new backend); a
  console port, which never holds the guest, drops them (`backend-failed`, counted).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import trio

from ..logs import RateLimiter
from ..pacing import BACKOFF_MAX, backoff_delays
from ..vhost_user.runner import VringRunner
from ..vhost_user.vring import Vring
from .core import (
    ConfigChanged,
    ConsoleCore,
    Output,
    RingBroken,
    SessionClosed,
    SessionOpened,
    StateChanged,
    Wake,
    port_of_queue,
)
from .fastpath import FastPath
from .port import Custody, Port, PortBackend
from .session import Input
from .state import DeviceCounters, DeviceState, PortConfig, StateError

log = logging.getLogger("vhostser.console")

MIGRATION_VERSION = 1
# How long a backend may take to flush its peers when its port goes away or the daemon stops.
BACKEND_DRAIN_GRACE = 1.0

# The backend callback each core output is.
_CALLBACKS: dict[type[Output], str] = {
    SessionOpened: "session_opened", SessionClosed: "session_closed",
    StateChanged: "state_changed",
}


@dataclass
class _Keeper:
    """The device's hold on one port's backend (see the module doc)."""

    port: Port
    remake: Callable[[], PortBackend] | None  # a new backend after a failure (None: none)
    scope: trio.CancelScope  # the port's: cancelled when the port goes away
    run_scope: trio.CancelScope | None = None  # the running backend's
    down: bool = False  # the backend failed: not called again; its successor is coming
    failures: int = 0  # in a row: since a backend last ran BACKOFF_MAX seconds


class _Contained:
    """ConsoleDevice._contained: `except* Exception` around the block, as a class because it
    wraps every guest write (a generator context manager costs several times as much)."""

    __slots__ = ("call", "device", "port")

    def __init__(self, device: ConsoleDevice, port: Port, call: str) -> None:
        self.device, self.port, self.call = device, port, call

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if error is None:
            return False
        if not isinstance(error, BaseExceptionGroup):
            if not isinstance(error, Exception):
                return False  # cancellation, KeyboardInterrupt...
            self.device._backend_failed(self.port, self.call, error)
            return True
        failed, rest = error.split(Exception)
        if failed is not None:
            # One exception in a group: log that one, not its wrapper.
            errors = failed.exceptions
            self.device._backend_failed(self.port, self.call,
                                        errors[0] if len(errors) == 1 else failed)
        if rest is None:
            return True
        if failed is None:
            return False
        raise rest


class ConsoleDevice:
    """A virtio-console device with up to `max_ports` ports (MULTIPORT)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        max_ports: int = 1,
        cols: int = 80,
        rows: int = 25,
        resize_rows_first: bool = False,
        vm_name: str = "",
        resume: DeviceState | None = None,
    ) -> None:
        """With `resume`, the device goes on from a predecessor's state: its ports are
        `adopt_port`ed, not added, and its rings start where they were."""
        self._nursery = nursery
        self.vm_name = vm_name
        state = resume or DeviceState(max_ports, cols=cols, rows=rows,
                                      resize_rows_first=resize_rows_first)
        self.core = ConsoleCore(state, self._deliver, resumed=resume is not None)
        self.ports: dict[int, Port] = {}
        self._keepers: dict[int, _Keeper] = {}
        self._failure_log = RateLimiter(log, burst=1, interval=10.0)
        self._runners: dict[int, tuple[trio.CancelScope, VringRunner]] = {}
        self._vrings: dict[int, Vring] = {}  # started ones
        self.fastpath = FastPath(self.core, nursery, self._vrings.get, self._stop_runner,
                                 self._start_runner)
        self.core.before_change = self.fastpath.disengage
        self._settling = 0
        # Called when the device itself cannot go on (a broken control queue): NEEDS_RESET.
        self.on_broken: Callable[[Vring | None, str], None] = lambda vring, reason: None
        # Called when the config space changed (console size) so the front end tells the guest.
        self.on_config_change: Callable[[], None] = lambda: None
        # Where a port's backend keeps what outlives the process (the daemon: the fd store).
        self.custody_for: Callable[[int], Custody] = lambda port_id: Custody()

    @property
    def state(self) -> DeviceState:
        return self.core.state

    @property
    def counters(self) -> DeviceCounters:
        return self.core.state.counters

    @property
    def max_ports(self) -> int:
        return self.core.state.max_ports

    @property
    def driver_ready(self) -> bool:
        return self.core.state.driver_ready

    @property
    def multiport(self) -> bool:
        return self.core.multiport

    # ================================================================== ports (Python API)

    def add_port(
        self, config: PortConfig, backend: PortBackend, *, first_session_id: int = 1,
        remake: Callable[[], PortBackend] | None = None,
    ) -> Port:
        """Create a port (hotplug if the guest driver is up: DEVICE_ADD). `remake` makes a
        new backend like `backend` when one fails; without it a failed backend leaves the
        port with no host side."""
        self.core.add_port(config, first_session_id=first_session_id)
        return self._attach(config, backend, remake)

    def adopt_port(
        self, config: PortConfig, backend: PortBackend,
        remake: Callable[[], PortBackend] | None = None,
    ) -> Port:
        """Give a port of the resumed state its backend. The guest knows nothing of a
        restart, so nothing is sent; the backend hears the open session again (a replay, as
        after a state-file restore)."""
        if config.id not in self.core.state.ports or config.id in self.ports:
            raise ValueError(f"port {config.id} is not a resumed port without a backend")
        port = self._attach(config, backend, remake)
        if (session := port.session) is not None:
            with self._contained(port, "session_opened"):
                backend.session_opened(session)
        return port

    def _attach(self, config: PortConfig, backend: PortBackend,
                remake: Callable[[], PortBackend] | None) -> Port:
        port = self.ports[config.id] = Port(self.core, config, backend, self.settle,
                                            self.custody_for(config.id))
        keeper = self._keepers[config.id] = _Keeper(port, remake, trio.CancelScope())
        self._nursery.start_soon(self._keep_backend, keeper)
        self.settle()
        return port

    def remove_port(self, port_id: int) -> None:
        """Hot-unplug: the session closes (port-removed), the guest gets DEVICE_REMOVE."""
        port = self.ports.get(port_id)
        if port is None:
            raise KeyError(f"no port {port_id}")
        self.core.remove_port(port_id)
        self.settle()  # the backend hears its session close while the port is still listed
        del self.ports[port_id]
        port.credit()  # senders blocked on the staging buffer find the port gone
        self._nursery.start_soon(self._retire_backend, self._keepers.pop(port_id))

    def restore_session(self, port_id: int, session_id: int) -> None:
        """After a daemon restart: the guest still has the port open in this session."""
        self.core.restore_session(port_id, session_id)
        self.settle()

    def resize(self, port_id: int, cols: int, rows: int) -> None:
        self.core.resize(port_id, cols, rows)
        self.settle()

    def close_all(self, reason: Input) -> None:
        """Close every open session (FRONTEND_GONE, SHUTDOWN)."""
        self.core.close_all(reason)
        self.settle()

    async def _retire_backend(self, keeper: _Keeper) -> None:
        """Let a removed port's backend send what it queued (the CLOSE frame of the session
        that just ended), then stop it."""
        with trio.move_on_after(BACKEND_DRAIN_GRACE):
            await self._drain(keeper)
        keeper.scope.cancel()

    async def drain_backends(self) -> None:
        """At shutdown, after close_all: give every backend a moment to send what it queued."""
        with trio.move_on_after(BACKEND_DRAIN_GRACE):
            for keeper in list(self._keepers.values()):
                await self._drain(keeper)

    async def _drain(self, keeper: _Keeper) -> None:
        if not keeper.down:
            with self._contained(keeper.port, "drain"):
                await keeper.port.backend.drain()

    def reopen_backends(self) -> None:
        """SIGHUP: every backend reopens its files."""
        for keeper in list(self._keepers.values()):
            if not keeper.down:
                with self._contained(keeper.port, "reopen"):
                    keeper.port.backend.reopen()

    def backend_counters(self, port_id: int) -> Mapping[str, object]:
        """The backend's own counters of port `port_id` ({} if it cannot tell)."""
        port = self.ports[port_id]
        with self._contained(port, "counter_values"):
            return port.backend.counter_values()
        return {}

    # ================================================================== backends

    def _contained(self, port: Port, call: str) -> _Contained:
        """Around every call into `port`'s backend: what it raises is the port's failure
        (see the module doc), handled here and not raised on. Cancellation passes."""
        return _Contained(self, port, call)

    def _backend_failed(self, port: Port, call: str, error: BaseException) -> None:
        self.counters.backend_failures += 1
        port.counters.backend_failures += 1
        keeper = self._keepers.get(port.id)
        current = keeper is not None and keeper.port is port and not port.removed
        self._failure_log.log(
            logging.ERROR, port.id,
            "port %d %r: backend %r failed in %s (failure %d on this port)%s", port.id,
            port.name, port.backend, call, port.counters.backend_failures,
            "; its host side is detached and a new backend starts" if current else "",
            exc_info=error,
        )
        if keeper is not None and current and not keeper.down:
            keeper.down = True
            keeper.failures += 1
            if keeper.run_scope is not None:
                keeper.run_scope.cancel()

    async def _keep_backend(self, keeper: _Keeper) -> None:
        """Run the port's backend until the port goes away, and a new one each time it fails,
        after a backoff (see the module doc)."""
        port = keeper.port
        delays = backoff_delays()
        with keeper.scope:
            while True:
                if not keeper.down:
                    started = trio.current_time()
                    with trio.CancelScope() as keeper.run_scope, self._contained(port, "run"):
                        await port.backend.run()
                        await trio.sleep_forever()  # run() is done; the callbacks go on
                    if trio.current_time() - started >= BACKOFF_MAX:
                        delays, keeper.failures = backoff_delays(), 1
                if port.state.host_open:
                    port.host_detach()
                if keeper.remake is None:
                    log.error("port %d %r: no new backend can be made; the port has no host "
                              "side now", port.id, port.name)
                    return
                await trio.sleep(next(delays))
                self._start_new_backend(keeper, keeper.remake)

    def _start_new_backend(self, keeper: _Keeper, remake: Callable[[], PortBackend]) -> None:
        port = keeper.port
        with self._contained(port, "a new backend's start"):
            backend = remake()
            port.backend = backend
            backend.bind(port)
            keeper.down = False
            log.info("port %d %r: backend restarted (failure %d in a row)", port.id,
                     port.name, keeper.failures)
            if (session := port.session) is not None:
                backend.session_opened(session)  # as after a daemon restart: a replay
            port.resume_guest_data()  # guest writes held for the failed backend go to this one

    # ================================================================== core outputs

    def settle(self) -> None:
        """Carry out what the core decided, in order (a callback may add more); then hand
        the ports whose bytes need no decision to the native data plane."""
        self._settling += 1
        try:
            self._carry_out()
        finally:
            self._settling -= 1
        if not self._settling:
            self.fastpath.consider(self.ports)

    def _carry_out(self) -> None:
        while outputs := self.core.outputs():
            for out in outputs:
                if isinstance(out, Wake):
                    entry = self._runners.get(out.index)
                    if entry is not None:
                        entry[1].poke()
                elif isinstance(out, ConfigChanged):
                    self.on_config_change()
                elif isinstance(out, RingBroken):
                    if (entry := self._runners.get(out.index)) is not None:
                        entry[1].vring.signal_error()
                elif (port := self.ports.get(out.port_id)) is not None:
                    callback = _CALLBACKS.get(type(out))
                    if callback is None:
                        port.carry_out(out)  # credit: no backend call
                    elif not self._keepers[out.port_id].down:
                        with self._contained(port, callback):
                            port.carry_out(out)

    def _deliver(self, port_id: int, data: bytes) -> bool:
        port = self.ports[port_id]
        down = self._keepers[port_id].down
        if down and not port.config.console:
            return False  # held: offered to the new backend
        if not down:
            with self._contained(port, "guest_data"):
                return port.backend.guest_data(data)
        # The backend raised on these bytes, or a console's backend is down (a console never
        # holds the guest): dropped and counted, and the chain completed.
        counters = port.counters
        counters.drop("from_guest", "backend-failed", len(data))
        # The core counts what it is told was taken as delivered; these bytes were not.
        counters.bytes_from_guest -= len(data)
        counters.buffers_from_guest -= 1
        return True

    # ================================================================== Device protocol

    @property
    def num_queues(self) -> int:
        return self.core.num_queues

    @property
    def max_queue_size(self) -> int:
        return self.core.max_queue_size

    @property
    def features(self) -> int:
        return self.core.features

    def get_config(self, offset: int, size: int) -> bytes:
        return self.core.get_config(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        self.core.set_config(offset, data)
        self.settle()

    def features_acked(self, features: int) -> None:
        self.core.features_acked(features)

    def queue_started(self, vring: Vring) -> None:
        assert vring.queue is not None
        self._vrings[vring.index] = vring
        self._start_runner(vring)
        self.core.ring_started(vring.index, vring.queue)
        self.settle()

    def _start_runner(self, vring: Vring) -> None:
        index = vring.index
        scope = trio.CancelScope()
        runner = VringRunner(vring, lambda: self._serve(index), self._ring_broken)
        self._runners[index] = (scope, runner)

        async def run() -> None:
            with scope:
                await runner.run()

        self._nursery.start_soon(run)
        runner.poke()  # what came while it was not watched

    def _stop_runner(self, index: int) -> None:
        entry = self._runners.pop(index, None)
        if entry is not None:
            entry[1].stop()
            entry[0].cancel()

    def queue_stopped(self, vring: Vring) -> None:
        if (where := port_of_queue(vring.index)) is not None:
            self.fastpath.disengage(where[0])
        self._vrings.pop(vring.index, None)
        self._stop_runner(vring.index)
        self.core.ring_stopped(vring.index)
        self.settle()

    def save_state(self) -> bytes:
        return json.dumps({"version": MIGRATION_VERSION,
                           "console": self.core.state.to_dict()}).encode()

    def load_state(self, data: bytes) -> None:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != MIGRATION_VERSION:
            raise StateError(f"migration state version {doc.get('version')!r} "
                             f"(this daemon loads {MIGRATION_VERSION})")
        self.core.adopt(DeviceState.from_dict(doc["console"]))
        self.settle()

    def status_changed(self, status: int) -> None:
        self.core.status_changed(status)

    def reset(self) -> None:
        self.core.reset()
        self.settle()

    def _ring_broken(self, vring: Vring, reason: str) -> None:
        # The core applies the containment rule: a port's ring is the port's alone.
        if self.core.ring_broken(vring.index, reason):
            self.on_broken(vring, reason)
        self.settle()

    def _serve(self, index: int) -> bool:
        try:
            return self.core.service(index)
        finally:
            self.fastpath.served(index)
            self.settle()
