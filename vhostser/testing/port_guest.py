"""A guest in a box for one port, without virtqueues: drives `ConsoleCore` the way the device
does, for unit tests of the core's port decisions and of backends.

`PortGuest` owns a core with one port (MULTIPORT negotiated, the driver up, the port set up
with PORT_READY unless `ready=False`) and the port's real `Port` handle. It opens and closes
the port with real control messages, writes like a tx queue (a refused write is held and
offered again when the core wakes the tx queue, exactly as the device keeps a held chain),
and reads like an rx queue (`take_staged` / `consumed`). The control messages the device
queued for the guest are in `control`: taken from the core's queue as a guest with control
buffers posted takes them, as soon as they are queued; with `reads_control` False (a paused
VM) they wait in `core.state.control_out` until `control` is read.
"""

from __future__ import annotations

import trio

from ..console import control
from ..console.control import ControlMessage, Event
from ..console.core import (
    VIRTIO_CONSOLE_F_MULTIPORT,
    ConfigChanged,
    ConsoleCore,
    Wake,
    rx_queue,
    tx_queue,
)
from ..console.port import Port, PortBackend
from ..console.session import Input, State
from ..console.state import DeviceState, PortConfig

TIMEOUT = 3.0


class PortGuest:
    def __init__(
        self,
        backend: PortBackend,
        config: PortConfig | None = None,
        *,
        ready: bool = True,
        first_session_id: int = 1,
        resume: DeviceState | None = None,
    ) -> None:
        """With `resume`, the device goes on from that state (a successor's), which has the
        port already: nothing is sent."""
        config = config or PortConfig(1, name="org.test.0")
        fresh = resume is None
        state = DeviceState(max_ports=max(config.id + 1, 2)) if resume is None else resume
        self.core = ConsoleCore(state, self._deliver)
        if fresh:
            self.core.features_acked(VIRTIO_CONSOLE_F_MULTIPORT)
            self.core.add_port(config, first_session_id=first_session_id)
        self.port = Port(self.core, config, backend, self.settle)
        self._sent: list[ControlMessage] = []
        self.reads_control = True
        self.pending = bytearray()
        self.written = 0  # bytes the port took from us (delivered or dropped)
        self._tx = trio.Event()
        self._rx = trio.Event()
        self.pokes = {"tx": 0, "rx": 0}
        self.config_changes = 0
        if fresh:
            self.control_from_guest(ControlMessage(control.BAD_ID, Event.DEVICE_READY, 1))
            if ready:
                self.set_up()
            self.control.clear()

    @property
    def id(self) -> int:
        return self.port.id

    # -- the device side of the harness
    def _deliver(self, port_id: int, data: bytes) -> bool:
        return self.port.backend.guest_data(data)

    def settle(self) -> None:
        while outputs := self.core.outputs():
            for out in outputs:
                if isinstance(out, Wake):
                    if out.index == tx_queue(self.id):
                        self.pokes["tx"] += 1
                        self._tx.set()
                        self._flush()
                    elif out.index == rx_queue(self.id):
                        self.pokes["rx"] += 1
                        self._rx.set()
                elif isinstance(out, ConfigChanged):
                    self.config_changes += 1
                else:
                    self.port.carry_out(out)
        if self.reads_control:
            self._take_control()

    @property
    def control(self) -> list[ControlMessage]:
        """Every control message the device queued for the guest so far (clear() to forget)."""
        self._take_control()
        return self._sent

    def _take_control(self) -> None:
        self._sent.extend(self.core.state.control_out)
        self.core.state.control_out.clear()

    # -- control
    def control_from_guest(self, msg: ControlMessage) -> None:
        self.core.control_from_guest(msg)
        self.settle()

    def set_up(self) -> None:
        """The guest answers DEVICE_ADD with PORT_READY(1)."""
        self.control_from_guest(ControlMessage(self.id, Event.PORT_READY, 1))

    def open(self) -> None:
        if not self.port.guest_ready:
            self.set_up()  # a guest opens only a port it set up
        self.control_from_guest(control.port_open(self.id, True))

    def close(self) -> None:
        self.control_from_guest(control.port_open(self.id, False))

    def reset(self) -> None:
        """The guest driver initialises the device again; the port is not set up again
        until `set_up()`."""
        self.control_from_guest(ControlMessage(control.BAD_ID, Event.DEVICE_READY, 1))

    def apply(self, event: Input) -> None:
        """Any session input, through the mechanism that produces it in the device."""
        if event is Input.GUEST_OPEN:
            self.open()
        elif event is Input.GUEST_CLOSE:
            self.close()
        elif event is Input.RESET:
            self.reset()
        elif event is Input.REMOVE:
            if not self.port.removed:
                self.core.remove_port(self.id)
                self.settle()
                self.port.credit()
        elif event in (Input.FRONTEND_GONE, Input.SHUTDOWN):
            self.core.close_all(event)
            self.settle()
        elif event is Input.HOST_OPEN:
            self.port.host_attach()
        elif event is Input.HOST_CLOSE:
            self.port.host_detach()
        else:
            self.port.end_session()

    def restore_session(self, session_id: int) -> None:
        """As after a daemon restart: the guest still has the port open in `session_id`."""
        self.core.restore_session(self.id, session_id)
        self.settle()

    @property
    def state(self) -> State:
        return self.port.state

    @property
    def host_open(self) -> bool:
        return self.port.state.host_open

    def host_opens(self) -> list[int]:
        """The host PORT_OPEN values the guest was sent, in order."""
        return [m.value for m in self.control if m.event is Event.PORT_OPEN]

    # -- tx (guest → host)
    def _flush(self) -> None:
        while self.pending and not self.port.removed:
            if not self.core.guest_may_write(self.id):
                return
            chunk = bytes(self.pending[:4096])
            if not self.core.guest_bytes(self.id, chunk):
                return
            del self.pending[: len(chunk)]
            self.written += len(chunk)

    def write(self, data: bytes) -> None:
        """Queue bytes to write, in 4 KiB chains; they move as far as the port takes them."""
        self.pending += data
        self._flush()
        self.settle()

    def write_chain(self, data: bytes) -> bool:
        """One tx chain of exactly `data`: True if the device is done with it."""
        done = self.core.guest_bytes(self.id, data)
        self.settle()
        return done

    async def drain(self, timeout: float = TIMEOUT) -> None:
        """Until every queued byte was taken by the port."""
        with trio.fail_after(timeout):
            while self.pending:
                self._tx = trio.Event()
                self._flush()
                self.settle()
                if self.pending:
                    await self._tx.wait()

    # -- rx (host → guest)
    @property
    def staged(self) -> int:
        return self.port.staged

    def read(self, n: int | None = None) -> bytes:
        """What is staged for the guest (at most n bytes), as one rx buffer would take it."""
        n = self.port.staged if n is None else min(n, self.port.staged)
        data = bytes(self.core.take_staged(self.id, n))
        if n:
            self.core.consumed(self.id, n)
            self.settle()
        return data

    def consume(self, n: int) -> None:
        """n staged bytes went into a guest rx buffer (after looking at them with
        `core.take_staged`)."""
        self.core.consumed(self.id, n)
        self.settle()

    async def read_exactly(self, n: int, timeout: float = TIMEOUT) -> bytes:
        out = bytearray()
        with trio.fail_after(timeout):
            while len(out) < n:
                self._rx = trio.Event()
                chunk = self.read(n - len(out))
                if chunk:
                    out += chunk
                    continue
                await self._rx.wait()
        return bytes(out)
