"""The virtio-console multiport device served over vhost-user.

Queue map (virtio 1.2 §5.3.2): port 0 rx=0 tx=1, control rx=2 tx=3, port n≥1 rx=2n+2
tx=2n+3; "rx" is host→guest. Config space: `le16 cols, le16 rows, le32 max_nr_ports,
le32 emerg_wr`. The control protocol is in control.py, the session machine in session.py,
the per-port buffers and counters in port.py; this module connects them to the vrings.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from virtqueue import Chain

from ..backends.base import PortBackend
from ..vhost_user.runner import VringRunner, pop_chain
from ..vhost_user.vring import Vring
from . import control
from .control import ControlError, ControlMessage, Event
from .port import Port, PortConfig
from .session import Input

log = logging.getLogger("vhostser.console")

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8
MAX_QUEUE_SIZE = 32768
CONTROL_RX, CONTROL_TX = 2, 3
# Outgoing control messages wait here while the guest has no control buffer posted. 31 ports
# need at most ~4 messages each per (re)announcement; the bound only catches a runaway.
MAX_PENDING_CONTROL = 1024
# How long a backend may take to flush its peers when its port goes away or the daemon stops.
BACKEND_DRAIN_GRACE = 1.0


def rx_queue(port_id: int) -> int:
    return 2 * port_id + 2 if port_id else 0


def tx_queue(port_id: int) -> int:
    return 2 * port_id + 3 if port_id else 1


def port_of_queue(index: int) -> tuple[int, bool] | None:
    """(port id, is_rx) for a data queue; None for the control queues."""
    if index in (CONTROL_RX, CONTROL_TX):
        return None
    port = 0 if index < 2 else (index - 2) // 2
    return port, index % 2 == 0


@dataclass
class DeviceCounters:
    control_from_guest: int = 0
    control_to_guest: int = 0
    control_overflow: int = 0  # control messages dropped because MAX_PENDING_CONTROL was hit
    bad_control: int = 0  # unparsable, unknown port, out of order
    device_ready: int = 0
    bytes_on_missing_ports: int = 0
    backend_failures: int = 0
    bad_chains: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(vars(self))


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
    ) -> None:
        if not 1 <= max_ports <= 31:
            raise ValueError(f"max_ports {max_ports} not in 1..31")
        self._nursery = nursery
        self.max_ports = max_ports
        self.vm_name = vm_name
        self.cols, self.rows = cols, rows
        self.resize_rows_first = resize_rows_first
        self.ports: dict[int, Port] = {}
        self._backend_scopes: dict[int, trio.CancelScope] = {}
        self.counters = DeviceCounters()
        self.acked_features = 0
        self.status = 0
        self.driver_ready = False  # the guest sent DEVICE_READY(1) since the last reset
        self._control_out: deque[ControlMessage] = deque()
        # Ports whose DEVICE_ADD the guest has received (since the last driver init).
        self._announced: set[int] = set()
        self._runners: dict[int, tuple[trio.CancelScope, VringRunner]] = {}
        self._pending_tx: dict[int, tuple[Chain, bytes]] = {}
        self.on_broken: Callable[[Vring | None, str], None] = lambda vring, reason: None
        # Called when the config space changed (console size) so the front end tells the guest.
        self.on_config_change: Callable[[], None] = lambda: None

    # ================================================================== ports (Python API)

    def add_port(
        self, config: PortConfig, backend: PortBackend, *, first_session_id: int = 1
    ) -> Port:
        """Create a port (hotplug if the guest driver is up: DEVICE_ADD)."""
        if not 0 <= config.id < self.max_ports:
            raise ValueError(f"port id {config.id} not in 0..{self.max_ports - 1}")
        if config.id in self.ports:
            raise ValueError(f"port {config.id} exists")
        if config.name and any(p.name == config.name for p in self.ports.values()):
            raise ValueError(f"a port is already named {config.name!r}")
        port = Port(config, backend, self._queue_control, first_session_id=first_session_id,
                    vm=self.vm_name)
        port.poke_rx = lambda: self._poke(rx_queue(config.id))
        port.poke_tx = lambda: self._poke(tx_queue(config.id))
        self.ports[config.id] = port
        scope = trio.CancelScope()
        self._backend_scopes[config.id] = scope

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
        if self.driver_ready and self.multiport:
            self._queue_control(control.device_add(config.id))
        elif not self.multiport and config.id == 0 and self._port0_running():
            port.apply(Input.GUEST_OPEN)
        log.info("port %d %r added", config.id, config.name)
        return port

    def remove_port(self, port_id: int) -> None:
        """Hot-unplug: the session closes (port-removed), the guest gets DEVICE_REMOVE."""
        port = self.ports.pop(port_id, None)
        if port is None:
            raise KeyError(f"no port {port_id}")
        port.apply(Input.REMOVE)
        pending = self._pending_tx.pop(port_id, None)
        if pending is not None:
            self._complete_pending(port_id, pending[0], len(pending[1]), "port-removed")
        self._nursery.start_soon(self._retire_backend, port.backend,
                                 self._backend_scopes.pop(port_id))
        # Messages for the port not yet delivered must not reach the guest after it is gone;
        # a DEVICE_ADD the guest already has is undone with DEVICE_REMOVE.
        self._control_out = deque(m for m in self._control_out if m.id != port_id)
        if port_id in self._announced:
            self._announced.discard(port_id)
            self._queue_control(control.device_remove(port_id))
        log.info("port %d %r removed", port_id, port.name)

    def resize(self, port_id: int, cols: int, rows: int) -> None:
        """A console port's size changed: RESIZE (multiport) or the config space (port 0)."""
        port = self.ports[port_id]
        if self.multiport:
            if port.guest_ready:
                self._queue_control(
                    control.resize(port_id, cols, rows, rows_first=self.resize_rows_first)
                )
        if port_id == 0:
            self.cols, self.rows = cols, rows
            self.on_config_change()

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

    def close_all(self, reason: Input) -> None:
        """Close every open session (FRONTEND_GONE, SHUTDOWN)."""
        for port in list(self.ports.values()):
            port.apply(reason)

    # ================================================================== Device protocol

    @property
    def multiport(self) -> bool:
        return bool(self.acked_features & VIRTIO_CONSOLE_F_MULTIPORT)

    @property
    def num_queues(self) -> int:
        return 2 * self.max_ports + 2

    @property
    def max_queue_size(self) -> int:
        return MAX_QUEUE_SIZE

    @property
    def features(self) -> int:
        return (
            VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_CONSOLE_F_SIZE
            | VIRTIO_CONSOLE_F_MULTIPORT
            | VIRTIO_CONSOLE_F_EMERG_WRITE
        )

    def get_config(self, offset: int, size: int) -> bytes:
        space = CONFIG.pack(self.cols, self.rows, self.max_ports, 0)
        return (space + bytes(max(0, offset + size - len(space))))[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        if offset != EMERG_WR_OFFSET or len(data) != 4:
            log.warning("config write of %d bytes at %d ignored: only emerg_wr is writable",
                        len(data), offset)
            return
        # Emergency write: one character, usable before the queues exist (virtio §5.3.6).
        char = bytes([data[0]])
        port = self.ports.get(0)
        if port is None:
            self.counters.bytes_on_missing_ports += 1
            log.warning("emergency write of 0x%02x with no port 0: dropped", data[0])
        elif not port.guest_bytes(char):
            # Nothing may wait here (there is no chain to hold): what cannot be taken is lost.
            port.counters.discarded["no-host"] += 1

    def features_acked(self, features: int) -> None:
        self.acked_features = features

    def queue_started(self, vring: Vring) -> None:
        service = self._service_for(vring)
        if service is None:
            return
        scope = trio.CancelScope()
        runner = VringRunner(vring, service, self._broken)
        self._runners[vring.index] = (scope, runner)

        async def run() -> None:
            with scope:
                await runner.run()

        self._nursery.start_soon(run)
        if not self.multiport and vring.index == 1 and 0 in self.ports:
            # Without MULTIPORT port 0 is a console the guest never announces: it is open
            # from the moment the driver runs its queues.
            self.ports[0].apply(Input.GUEST_OPEN)

    def queue_stopped(self, vring: Vring) -> None:
        entry = self._runners.pop(vring.index, None)
        if entry is not None:
            entry[0].cancel()
        where = port_of_queue(vring.index)
        if where is not None and not where[1]:
            pending = self._pending_tx.pop(where[0], None)
            if pending is not None and vring.queue is not None:
                # A held chain was popped but not completed: give it back so the ring resumes
                # at it and the guest's bytes are offered again after the stop.
                vring.queue.next_avail = (vring.queue.next_avail - 1) & 0xFFFF

    def status_changed(self, status: int) -> None:
        # SET_STATUS 0 is a stop (pause, migration), not a reset: sessions stay.
        self.status = status

    def reset(self) -> None:
        log.info("device reset by the front end")
        self._reset_sessions()
        self.acked_features = 0
        self.status = 0

    # ================================================================== internals

    def _reset_sessions(self) -> None:
        self.driver_ready = False
        self._control_out.clear()
        self._announced.clear()
        self._pending_tx.clear()
        for port in self.ports.values():
            port.apply(Input.RESET)

    def _port0_running(self) -> bool:
        return 1 in self._runners

    def _poke(self, queue_index: int) -> None:
        entry = self._runners.get(queue_index)
        if entry is not None:
            entry[1].poke()

    def _broken(self, vring: Vring, reason: str) -> None:
        self.on_broken(vring, reason)

    def _service_for(self, vring: Vring) -> Callable[[], bool] | None:
        if vring.index == CONTROL_TX:
            return lambda: self._service_control_tx(vring)
        if vring.index == CONTROL_RX:
            return lambda: self._service_control_rx(vring)
        where = port_of_queue(vring.index)
        assert where is not None
        port_id, is_rx = where
        if is_rx:
            return lambda: self._service_port_rx(vring, port_id)
        return lambda: self._service_port_tx(vring, port_id)

    # -- control queues

    def _queue_control(self, msg: ControlMessage) -> None:
        if len(self._control_out) >= MAX_PENDING_CONTROL:
            self.counters.control_overflow += 1
            log.error("control queue to the guest full (%d): %s for port %d dropped",
                      MAX_PENDING_CONTROL, msg.event.name, msg.id)
            return
        self._control_out.append(msg)
        self._poke(CONTROL_RX)

    def _service_control_rx(self, vring: Vring) -> bool:
        queue = vring.queue
        assert queue is not None
        while self._control_out:
            chain = pop_chain(vring, queue)
            if chain is None:
                return True
            data = self._control_out[0].pack()
            if chain.writable_len < len(data):
                self._count_bad_chain("control-rx-too-small")
                log.warning("vring %d: control buffer of %d bytes < message of %d",
                            vring.index, chain.writable_len, len(data))
                queue.push(chain.head, 0)
                continue
            msg = self._control_out.popleft()
            if msg.event is Event.DEVICE_ADD:
                self._announced.add(msg.id)
            queue.push(chain.head, chain.write(data))
            self.counters.control_to_guest += 1
        return False

    def _service_control_tx(self, vring: Vring) -> bool:
        queue = vring.queue
        assert queue is not None
        # The guest busy-waits for each control buffer to come back: complete them at once.
        while (chain := pop_chain(vring, queue)) is not None:
            data = chain.read()
            queue.push(chain.head, 0)
            self.counters.control_from_guest += 1
            try:
                msg = control.parse(data)
            except ControlError as e:
                self.counters.bad_control += 1
                log.warning("vring %d: bad control message ignored: %s", vring.index, e)
                continue
            self._handle_control(msg)
        return True

    def _handle_control(self, msg: ControlMessage) -> None:
        if msg.event is Event.DEVICE_READY:
            self._device_ready(msg.value)
            return
        port = self.ports.get(msg.id)
        if port is None:
            self.counters.bad_control += 1
            log.warning("control %s for port %d ignored: no such port (max_nr_ports %d)",
                        msg.event.name, msg.id, self.max_ports)
            return
        if msg.event is Event.PORT_READY:
            if msg.value != 1:
                log.warning("port %d: the guest failed to set it up (PORT_READY 0)", msg.id)
                return
            port.announce()
        elif msg.event is Event.PORT_OPEN:
            if not port.guest_ready:
                self.counters.bad_control += 1
                log.warning("port %d: PORT_OPEN(%d) before PORT_READY ignored", msg.id, msg.value)
                return
            if msg.value:
                port.apply(Input.GUEST_OPEN)
            else:
                self._flush_guest_tx(port)
                port.apply(Input.GUEST_CLOSE)

    def _device_ready(self, value: int) -> None:
        self.counters.device_ready += 1
        if value != 1:
            log.warning("the guest driver failed to initialise the device (DEVICE_READY %d)", value)
            return
        if self.driver_ready:
            # The driver initialised the device again (reboot, driver reload) without a front-end
            # reset: every session of the old driver instance ends here.
            log.info("DEVICE_READY again: the guest driver restarted; resetting sessions")
            self._reset_sessions()
        self.driver_ready = True
        for port_id in sorted(self.ports):
            self._queue_control(control.device_add(port_id))

    # -- port data queues

    def _service_port_rx(self, vring: Vring, port_id: int) -> bool:
        queue = vring.queue
        assert queue is not None
        port = self.ports.get(port_id)
        if port is None:
            return False
        while port.staged:
            chain = pop_chain(vring, queue)
            if chain is None:
                return True
            if not chain.writable:
                self._count_bad_chain("rx-readonly")
                log.warning("vring %d (port %d): rx chain %d has no writable buffer",
                            vring.index, port_id, chain.head)
                queue.push(chain.head, 0)
                continue
            n = chain.write(port.take_staged(chain.writable_len))
            port.consumed(n)
            queue.push(chain.head, n)
        return False

    def _service_port_tx(self, vring: Vring, port_id: int) -> bool:
        queue = vring.queue
        assert queue is not None
        while True:
            port = self.ports.get(port_id)
            pending = self._pending_tx.pop(port_id, None)
            if pending is None:
                if port is not None and not port.guest_may_write():
                    return False  # leave the chains in the ring: the guest's write blocks
                chain = pop_chain(vring, queue)
                if chain is None:
                    return True
                if chain.writable:
                    self._count_bad_chain("tx-writable")
                    log.warning("vring %d (port %d): tx chain %d has device-writable buffers",
                                vring.index, port_id, chain.head)
                    queue.push(chain.head, 0)
                    continue
                pending = (chain, chain.read())
            chain, data = pending
            if port is None:
                self._count_missing(port_id, vring, len(data))
                queue.push(chain.head, 0)
                continue
            if not port.guest_bytes(data):
                self._pending_tx[port_id] = pending
                return False
            queue.push(chain.head, 0)

    def _flush_guest_tx(self, port: Port) -> None:
        """Before a guest close ends the session, deliver what the guest wrote before closing
        (its tx chains precede the PORT_OPEN(0) on another queue)."""
        entry = self._runners.get(tx_queue(port.id))
        if entry is None or entry[1].vring.queue is None:
            return
        vring = entry[1].vring
        self._service_port_tx(vring, port.id)
        pending = self._pending_tx.pop(port.id, None)
        if pending is not None:
            self._complete_pending(port.id, pending[0], len(pending[1]), "stale")
        # Chains still in the ring were written in the closing session and could not be taken
        # (a slow or absent host peer): they must never reach the next session. Linux's close
        # waits for the device to consume PORT_OPEN(0), so nothing of a later open is there.
        queue = vring.queue
        if queue is None:
            return
        dropped = 0
        while (chain := pop_chain(vring, queue)) is not None:
            dropped += chain.readable_len
            queue.push(chain.head, 0)
        if dropped:
            port.counters.discarded["stale"] += dropped
            log.info("port %d: %d unsent guest bytes of the closed session dropped (stale)",
                     port.id, dropped)
        if queue.should_notify():
            vring.notify()

    def _complete_pending(self, port_id: int, chain: Chain, nbytes: int, reason: str) -> None:
        """Drop a held tx chain's bytes (counted) and give the guest its buffer back."""
        port = self.ports.get(port_id)
        if port is not None:
            port.counters.discarded[reason] += nbytes
        else:
            self.counters.bytes_on_missing_ports += nbytes
        log.info("port %d: %d held guest bytes dropped (%s)", port_id, nbytes, reason)
        entry = self._runners.get(tx_queue(port_id))
        if entry is not None and (queue := entry[1].vring.queue) is not None:
            queue.push(chain.head, 0)
            if queue.should_notify():
                entry[1].vring.notify()

    def _count_missing(self, port_id: int, vring: Vring, nbytes: int) -> None:
        """Guest bytes on the queue of a port that does not exist (removed, never added)."""
        before = self.counters.bytes_on_missing_ports
        self.counters.bytes_on_missing_ports += nbytes
        # A log line for the first bytes and then one per MiB, not one per chain.
        if before == 0 or before >> 20 != self.counters.bytes_on_missing_ports >> 20:
            log.warning("vring %d: guest bytes for port %d, which does not exist, dropped "
                        "(%d bytes so far)", vring.index, port_id,
                        self.counters.bytes_on_missing_ports)

    def _count_bad_chain(self, kind: str) -> None:
        self.counters.bad_chains[kind] = self.counters.bad_chains.get(kind, 0) + 1
