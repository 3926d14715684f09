"""The virtio-console device served over vhost-user.

Queue map (virtio 1.2 §5.3.2): port 0 rx=0 tx=1, control rx=2 tx=3, port n≥1 rx=2n+2
tx=2n+3; "rx" is host→guest. Config space: `le16 cols, le16 rows, le32 max_nr_ports,
le32 emerg_wr`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import trio

from virtqueue import SplitQueue

from ..vhost_user.runner import VringRunner, pop_chain
from ..vhost_user.vring import Vring

log = logging.getLogger("vhostser.console")

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

CONFIG = struct.Struct("<HHII")
MAX_QUEUE_SIZE = 32768


class ConsoleDevice:
    """A virtio-console with port 0 as its console.

    Port 0's tx bytes go to `output`; its tx buffers are completed at once, because the
    guest's hvc driver spins under a lock until they come back.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        max_ports: int = 1,
        cols: int = 80,
        rows: int = 25,
        output: Callable[[bytes], None] | None = None,
    ) -> None:
        if not 1 <= max_ports <= 31:
            raise ValueError(f"max_ports {max_ports} not in 1..31")
        self._nursery = nursery
        self.max_ports = max_ports
        self.cols, self.rows = cols, rows
        self.output = output or (lambda data: None)
        self.on_broken: Callable[[Vring | None, str], None] = lambda vring, reason: None
        self.acked_features = 0
        self.status = 0
        self._runners: dict[int, tuple[trio.CancelScope, VringRunner]] = {}

    # -- Device protocol

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
            | VIRTIO_CONSOLE_F_EMERG_WRITE
        )

    def get_config(self, offset: int, size: int) -> bytes:
        space = CONFIG.pack(self.cols, self.rows, self.max_ports, 0)
        return (space + bytes(max(0, offset + size - len(space))))[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        emerg = CONFIG.size - 4
        if offset <= emerg and offset + len(data) >= CONFIG.size:
            char = data[emerg - offset : emerg - offset + 4]
            (value,) = struct.unpack("<I", char)
            # Emergency write: one character, before the queues exist (virtio 1.2 §5.3.6).
            self.output(bytes([value & 0xFF]))
        else:
            log.warning("config write at %d of %d bytes ignored", offset, len(data))

    def features_acked(self, features: int) -> None:
        self.acked_features = features

    def queue_started(self, vring: Vring) -> None:
        if vring.index == 1:
            service = self._port0_tx(vring)
        else:
            return  # other queues are not served by this device yet
        scope = trio.CancelScope()
        runner = VringRunner(vring, service, self.on_broken)
        self._runners[vring.index] = (scope, runner)

        async def run() -> None:
            with scope:
                await runner.run()

        self._nursery.start_soon(run)

    def queue_stopped(self, vring: Vring) -> None:
        entry = self._runners.pop(vring.index, None)
        if entry is not None:
            entry[0].cancel()

    def status_changed(self, status: int) -> None:
        self.status = status

    def reset(self) -> None:
        self.acked_features = 0
        self.status = 0

    # -- queues

    def _port0_tx(self, vring: Vring) -> Callable[[], bool]:
        def service() -> bool:
            queue: SplitQueue | None = vring.queue
            assert queue is not None
            while (chain := pop_chain(vring, queue)) is not None:
                self.output(chain.read())
                queue.push(chain.head, 0)
            return True

        return service
