"""The console device's trio layer: tasks, fds and runners around the sans-io `ConsoleCore`.

It implements the vhost-user `Device` interface by handing each call to the core, runs one
`VringRunner` per started queue (kick eventfd in, call eventfd out) whose service is the
core's, runs each port's backend in its own task (a backend that fails takes only its port's
host side with it), and carries out what the core outputs: backend session callbacks, queue
wake-ups, credit for blocked senders, config changes. It decides nothing itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import trio

from ..vhost_user.runner import VringRunner
from ..vhost_user.vring import Vring
from .core import ConfigChanged, ConsoleCore, RingBroken, Wake
from .port import Port, PortBackend
from .session import Input
from .state import DeviceCounters, DeviceState, PortConfig, StateError

log = logging.getLogger("vhostser.console")

MIGRATION_VERSION = 1
# How long a backend may take to flush its peers when its port goes away or the daemon stops.
BACKEND_DRAIN_GRACE = 1.0


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
        self._backend_scopes: dict[int, trio.CancelScope] = {}
        self._runners: dict[int, tuple[trio.CancelScope, VringRunner]] = {}
        # Called when the device itself cannot go on (a broken control queue): NEEDS_RESET.
        self.on_broken: Callable[[Vring | None, str], None] = lambda vring, reason: None
        # Called when the config space changed (console size) so the front end tells the guest.
        self.on_config_change: Callable[[], None] = lambda: None

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
        self, config: PortConfig, backend: PortBackend, *, first_session_id: int = 1
    ) -> Port:
        """Create a port (hotplug if the guest driver is up: DEVICE_ADD)."""
        self.core.add_port(config, first_session_id=first_session_id)
        return self._attach(config, backend)

    def adopt_port(self, config: PortConfig, backend: PortBackend) -> Port:
        """Give a port of the resumed state its backend. The guest knows nothing of a
        restart, so nothing is sent; the backend hears the open session again (a replay, as
        after a state-file restore)."""
        if config.id not in self.core.state.ports or config.id in self.ports:
            raise ValueError(f"port {config.id} is not a resumed port without a backend")
        port = self._attach(config, backend)
        session = port.session
        if session is not None:
            backend.session_opened(session)
        return port

    def _attach(self, config: PortConfig, backend: PortBackend) -> Port:
        port = self.ports[config.id] = Port(self.core, config, backend, self.settle)
        scope = self._backend_scopes[config.id] = trio.CancelScope()

        async def run_backend() -> None:
            # A backend that fails must not take the device (and every other port) down.
            with scope:
                try:
                    await backend.run()
                except Exception:
                    self.counters.backend_failures += 1
                    log.exception("port %d %r: backend failed; the port has no host side now",
                                  config.id, config.name)
                    if port.state.host_open:
                        port.host_detach()

        self._nursery.start_soon(run_backend)
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
        self._nursery.start_soon(self._retire_backend, port.backend,
                                 self._backend_scopes.pop(port_id))

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

    async def _retire_backend(self, backend: PortBackend, scope: trio.CancelScope) -> None:
        """Let a removed port's backend send what it queued (the CLOSE frame of the session
        that just ended), then stop it."""
        with trio.move_on_after(BACKEND_DRAIN_GRACE):
            await backend.drain()
        scope.cancel()

    async def drain_backends(self) -> None:
        """At shutdown, after close_all: give every backend a moment to send what it queued."""
        with trio.move_on_after(BACKEND_DRAIN_GRACE):
            for port in list(self.ports.values()):
                await port.backend.drain()

    # ================================================================== core outputs

    def settle(self) -> None:
        """Carry out what the core decided, in order (a callback may add more)."""
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
                    port.carry_out(out)

    def _deliver(self, port_id: int, data: bytes) -> bool:
        return self.ports[port_id].backend.guest_data(data)

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
        index = vring.index
        scope = trio.CancelScope()
        runner = VringRunner(vring, lambda: self._serve(index), self._ring_broken)
        self._runners[index] = (scope, runner)

        async def run() -> None:
            with scope:
                await runner.run()

        self._nursery.start_soon(run)
        self.core.ring_started(index, vring.queue)
        self.settle()

    def queue_stopped(self, vring: Vring) -> None:
        entry = self._runners.pop(vring.index, None)
        if entry is not None:
            entry[0].cancel()
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
            self.settle()
