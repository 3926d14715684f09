"""A virtio-console guest driver in Python that behaves like Linux's.

`ConsoleDriver` plays the part of Linux's drivers/char/virtio_console.c on top of a
`FrontEnd` (the part QEMU plays): it probes the device, speaks the control protocol with it,
and gives each port a file-like `GuestPort` with the semantics a guest process sees through
/dev/vportNpM (or, for console ports, through hvc). It is written from the behaviour of the
Linux driver, not from its code, and independently of `vhostser.console` (the device under
test): the control message layout and event numbers are spelled out here again.

What it does as Linux does:

- probe (virtcons_probe): config space read (cols, rows, max_nr_ports, emerg_wr), features
  VERSION_1 | MULTIPORT | SIZE | EMERG_WRITE (| EVENT_IDX), DRIVER_OK (the front end starts
  the queues: all 2*max_nr_ports+2 with MULTIPORT, queues 0 and 1 without), the control rx
  queue filled with PAGE_SIZE buffers, then DEVICE_READY(1) sent with id 0xFFFFFFFF.
  Without MULTIPORT, port 0 is created at once as a console.
- Every control message the guest sends goes in the one control buffer and the driver waits
  until the device returns it before the next one (__send_control_msg spins on c_ovq).
- Control messages from the device (control_work_handler, handle_control_message): DEVICE_ADD
  creates the port, fills its rx queue with PAGE_SIZE buffers and answers PORT_READY(1) (a
  DEVICE_ADD for a port that exists is answered with PORT_READY(1) again; one for an id
  ≥ max_nr_ports is ignored); PORT_NAME sets the name once; CONSOLE_PORT makes the port a
  console, which is guest-open from then on and says so with PORT_OPEN(1) (init_port_console);
  PORT_OPEN sets host_connected; RESIZE of a console port records the size, read as
  (rows, cols) as Linux reads it; DEVICE_REMOVE unplugs the port. A message for a port that
  does not exist (other than DEVICE_ADD) is dropped. Each control rx buffer is re-posted after
  its message is handled.
- Port reads (port_fops_read): the data of used rx buffers, each re-posted once consumed; EOF
  (b"") when nothing is buffered and the host is not connected. Data arriving while the guest
  does not have the port open is discarded (in_intr), and so is unread data at close
  (port_fops_release) and at unplug.
- Port writes (port_fops_write): at most 32 KiB per write, copied into one buffer and made
  available as ONE descriptor; the write does not wait for the device to return it. A write
  blocks (or fails with EAGAIN when non-blocking) while the host is not connected, and while
  the out queue is full (no free descriptor after the previous write) until the device
  returns a buffer. Console ports are written as hvc does (put_chars): one buffer of at most
  PAGE_SIZE at a time, waiting until the device returns it.
- freeze/restore (virtcons_freeze/virtcons_restore): host_connected is forgotten, unread data
  and unhandled control messages are dropped, the queues stop and restart, then the rx queues
  are filled again, each port is re-announced with PORT_READY(1) and the ports the guest has
  open with PORT_OPEN(1); there is no new DEVICE_READY.
- Unplug (unplug_port) sends nothing to the host: the port's portdev goes away, so even a
  later close of a file still open sends no PORT_OPEN(0).

Where it differs (on purpose, see `ConsoleDriver` for the knobs): waits sleep on call
eventfds (with interrupts re-enabled) rather than spinning with them off; rx data is taken from
the used ring when a reader (or open/close) looks, which is when Linux's in_intr would have run
as far as anything observable goes; a read may return the data of several rx buffers at once;
freeze/restore and reinit keep the front end's rings (stop/resume, or a fresh start) where
Linux deletes and re-creates its virtqueues.

Guest RAM is allocated once and reused (rx buffers per queue, tx buffers per size class), so a
benchmark can run this driver for as long as it likes; there are no per-byte Python loops.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import struct
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from virtqueue import VIRTIO_F_VERSION_1, DriverQueue

from .frontend import FrontEnd, FrontEndError

__all__ = [
    "BAD_ID",
    "CONTROL_RX",
    "CONTROL_TX",
    "F_EMERG_WRITE",
    "F_MULTIPORT",
    "F_SIZE",
    "MAX_WRITE",
    "PAGE_SIZE",
    "ConsoleDriver",
    "ConsoleDriverError",
    "ControlEvent",
    "ControlMessage",
    "DriverStats",
    "GuestPort",
    "PortClosedError",
    "PortGoneError",
    "WouldBlockError",
    "rx_queue",
    "tx_queue",
]

log = logging.getLogger("vhostser.testing.console_driver")

PAGE_SIZE = 4096
#: port_fops_write copies at most this much per write() call.
MAX_WRITE = 32 * 1024
#: The id of DEVICE_READY, which concerns the device rather than a port.
BAD_ID = 0xFFFFFFFF
CONTROL_RX, CONTROL_TX = 2, 3
_CONTROL = struct.Struct("<IHH")
_CONFIG = struct.Struct("<HHII")
_RESIZE = struct.Struct("<HH")
_TX_CLASSES = (4096, 8192, 16384, MAX_WRITE)

F_SIZE = 1 << 0
F_MULTIPORT = 1 << 1
F_EMERG_WRITE = 1 << 2


class ControlEvent(enum.IntEnum):
    """virtio-console control events (virtio 1.2 §5.3.6.2)."""

    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """One control message: `le32 id, le16 event, le16 value` and a payload."""

    id: int
    event: int
    value: int = 0
    payload: bytes = b""

    def pack(self) -> bytes:
        return _CONTROL.pack(self.id, self.event, self.value) + self.payload

    @property
    def name(self) -> str:
        try:
            return ControlEvent(self.event).name
        except ValueError:
            return f"event {self.event}"

    def __repr__(self) -> str:
        extra = f" {self.payload!r}" if self.payload else ""
        return f"<{self.name} id={self.id} value={self.value}{extra}>"


class ConsoleDriverError(Exception):
    """The guest driver cannot do what was asked (the errno a guest process would see)."""


class WouldBlockError(ConsoleDriverError):
    """EAGAIN: a non-blocking read or write would block."""


class PortClosedError(ConsoleDriverError):
    """The guest does not have the port open (a read or write without an open fd)."""


class PortGoneError(ConsoleDriverError):
    """ENODEV/ENXIO: the port was unplugged (or the driver re-initialised)."""


def rx_queue(port_id: int) -> int:
    """The host→guest queue of a port."""
    return 2 * port_id + 2 if port_id else 0


def tx_queue(port_id: int) -> int:
    """The guest→host queue of a port."""
    return 2 * port_id + 3 if port_id else 1


@dataclass
class DriverStats:
    """What the driver dropped or saw that a test may want to check."""

    #: host bytes dropped by the guest, by reason (closed: in_intr while the port is not
    #: open; unread-at-close; unplug; freeze; reinit: unread when the driver started over)
    discarded: Counter[str] = field(default_factory=Counter)
    #: used elements whose head the driver did not post (a test's raw chains), per queue
    foreign_used: Counter[int] = field(default_factory=Counter)
    #: control messages from the device that were dropped, by reason
    ignored_control: Counter[str] = field(default_factory=Counter)
    #: times a queue had used buffers after a CALL_RECHECK sleep with no interrupt seen,
    #: per queue (a device that forgets to notify shows up here; 0 in a healthy run)
    missed_interrupts: Counter[int] = field(default_factory=Counter)


# How long a waiter sleeps on a call eventfd before looking at the used ring again.
CALL_RECHECK = 0.25


class _CallWaiter:
    """Lets several tasks sleep on one call eventfd: trio allows only one waiter per fd, so
    one task waits on it and wakes the others through an Event."""

    __slots__ = ("busy", "event")

    def __init__(self) -> None:
        self.busy = False
        self.event = trio.Event()


class _RxPool:
    """The PAGE_SIZE buffers of one device-writable queue, posted or free."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.free: list[int] = []
        self.posted: dict[int, int] = {}  # head -> gpa

    def reset(self) -> None:
        self.free.extend(self.posted.values())
        self.posted.clear()


class _TxPool:
    """Guest buffers for writes, by size class, and the ones the device holds."""

    def __init__(self) -> None:
        self.free: dict[int, list[int]] = {size: [] for size in _TX_CLASSES}
        # head -> (gpa, size class, bytes written into it)
        self.in_flight: dict[int, tuple[int, int, int]] = {}

    def reset(self) -> None:
        for gpa, size, _ in self.in_flight.values():
            self.free[size].append(gpa)
        self.in_flight.clear()


class GuestPort:
    """One port as a guest process sees it (a /dev/vportNpM file, or hvc for a console).

    Made by the driver on DEVICE_ADD; get it with `ConsoleDriver.port`. `open`/`close` send
    PORT_OPEN(1/0); `read` and `write` behave like the Linux file operations (see the module
    docstring), with `timeout` standing in for a process that gives up.
    """

    def __init__(self, driver: ConsoleDriver, port_id: int) -> None:
        self._driver = driver
        self.id = port_id
        self._name: str | None = None
        self._console = False
        self._guest_open = False
        self._host_connected = False
        self._unplugged = False
        self.outvq_full = False
        #: (rows, cols) from the last RESIZE, as Linux reads the payload; None before one.
        self.size: tuple[int, int] | None = None
        #: The raw 4-byte payload of the last RESIZE.
        self.resize_payload: bytes | None = None
        #: Bytes read and written by guest processes.
        self.bytes_read = 0
        self.bytes_written = 0
        #: Host bytes this port dropped, by reason (its share of DriverStats.discarded).
        self.discarded: Counter[str] = Counter()
        #: Written bytes whose buffers the device had not taken when the driver started over
        #: (reinit): gone with the rings, never seen by the device.
        self.unsent_at_reinit = 0
        # Used rx buffers not yet (fully) read: [gpa, offset, length].
        self._inbufs: deque[list[int]] = deque()
        self._changed = trio.Event()

    # ------------------------------------------------------------------ state

    @property
    def name(self) -> str | None:
        """The port's name from PORT_NAME (None until one came)."""
        return self._name

    @property
    def console(self) -> bool:
        """Whether the device made it a console (CONSOLE_PORT): an hvc, not a vport file."""
        return self._console

    @property
    def guest_open(self) -> bool:
        """Whether the guest has it open (a process opened it, or it is a console)."""
        return self._guest_open

    @property
    def host_connected(self) -> bool:
        """The host side's state from the device's last PORT_OPEN."""
        return self._host_connected

    @property
    def unplugged(self) -> bool:
        """Whether the port is gone (DEVICE_REMOVE, or the driver re-initialised)."""
        return self._unplugged

    @property
    def rx_queue(self) -> int:
        return rx_queue(self.id)

    @property
    def tx_queue(self) -> int:
        return tx_queue(self.id)

    @property
    def buffered(self) -> int:
        """Host bytes taken from the ring and not read yet."""
        return sum(length - offset for _, offset, length in self._inbufs)

    @property
    def tx_in_flight(self) -> int:
        """Write buffers the device has not returned yet."""
        return len(self._driver._tx_pool(self.id).in_flight)

    @property
    def rx_posted(self) -> int:
        """Receive buffers posted on the port's rx queue."""
        return len(self._driver._rx_pool(self.rx_queue).posted)

    def __repr__(self) -> str:
        flags = "".join(
            c for c, on in (("G", self._guest_open), ("H", self._host_connected),
                            ("c", self._console), ("x", self._unplugged)) if on
        )
        return f"<GuestPort {self.id} {self._name!r} {flags or '-'}>"

    def _wake(self) -> None:
        """Wake everything waiting on this port (Linux's port->waitqueue)."""
        self._changed.set()
        self._changed = trio.Event()

    def _check_file(self) -> None:
        if self._unplugged:
            raise PortGoneError(f"port {self.id} was unplugged")
        if not self._guest_open:
            raise PortClosedError(f"port {self.id} is not open in the guest")

    # ------------------------------------------------------------------ file operations

    async def open(self) -> None:
        """port_fops_open: mark the port open, then tell the host (PORT_OPEN 1)."""
        if self._unplugged:
            raise PortGoneError(f"port {self.id} was unplugged")
        if self._console:
            raise ConsoleDriverError(f"port {self.id} is a console: it is opened through hvc")
        if self._guest_open:
            raise ConsoleDriverError(f"port {self.id} is already open (EBUSY)")
        # What arrived while the port was closed is dropped, as in_intr would have done.
        self._take_rx()
        self._guest_open = True
        self.reclaim()
        await self._driver.send_control(self.id, ControlEvent.PORT_OPEN, 1)

    async def close(self) -> None:
        """port_fops_release: tell the host (PORT_OPEN 0), then drop unread data. After an
        unplug it only lets go of the port (the host is not told, as in Linux)."""
        if self._unplugged:
            self._guest_open = False
            return
        if not self._guest_open:
            raise PortClosedError(f"port {self.id} is not open in the guest")
        if self._console:
            raise ConsoleDriverError(f"port {self.id} is a console: hvc keeps it open")
        await self._driver.send_control(self.id, ControlEvent.PORT_OPEN, 0)
        self._guest_open = False
        self._discard_data("unread-at-close")
        self.reclaim()
        self._wake()

    async def read(
        self, n: int = 1 << 20, *, timeout: float | None = 5.0, nonblock: bool = False
    ) -> bytes:
        """Up to `n` bytes of host data; b"" (EOF) when none is buffered and the host is not
        connected (not for consoles), and on an unplugged port. Waits for data otherwise;
        trio.TooSlowError after `timeout` seconds, WouldBlockError at once with `nonblock`."""
        if n <= 0:
            return b""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        while True:
            if self._unplugged:
                return b""  # no data, no host: port_fops_read returns 0
            self._check_file()
            self._take_rx()
            if self._inbufs:
                return self._fill_readbuf(n)
            if not self._console and not self._host_connected:
                return b""
            if nonblock:
                raise WouldBlockError(f"port {self.id}: no data")
            await self._driver._wait_port(self, self.rx_queue, deadline)

    async def read_exactly(self, n: int, *, timeout: float | None = 5.0) -> bytes:
        """Read until `n` bytes came; ConsoleDriverError at EOF before that."""
        out = bytearray()
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        while len(out) < n:
            left = max(0.0, deadline - trio.current_time()) if timeout is not None else None
            chunk = await self.read(n - len(out), timeout=left)
            if not chunk:
                raise ConsoleDriverError(f"port {self.id}: EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    async def write(
        self,
        data: bytes | bytearray | memoryview,
        *,
        nonblock: bool = False,
        ignore_host: bool = False,
        timeout: float | None = 5.0,
    ) -> int:
        """One write() call: returns how many bytes were queued (at most 32 KiB, or a page
        for a console). `ignore_host` writes even while the host is not connected, which
        Linux never does (for tests of what a device does with such writes)."""
        if not data:
            return 0
        if self._console:
            self._check_file()
            return await self._hvc_write(memoryview(data)[:PAGE_SIZE], timeout)
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        while True:
            # will_write_block / wait_port_writable
            if self._unplugged:
                raise PortGoneError(f"port {self.id} was unplugged")
            self._check_file()
            self.reclaim()
            if (self._host_connected or ignore_host) and not self.outvq_full:
                break
            if nonblock:
                raise WouldBlockError(
                    f"port {self.id}: "
                    + ("out queue full" if self.outvq_full else "host not connected")
                )
            await self._driver._wait_port(self, self.tx_queue, deadline)
        chunk = memoryview(data)[:MAX_WRITE]
        self._submit(chunk)
        return len(chunk)

    async def write_all(
        self,
        data: bytes | bytearray | memoryview,
        *,
        ignore_host: bool = False,
        timeout: float | None = 5.0,
    ) -> None:
        """write() until all of `data` is queued (a process looping on write)."""
        view = memoryview(data)
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        while view:
            left = max(0.0, deadline - trio.current_time()) if timeout is not None else None
            n = await self.write(view, ignore_host=ignore_host, timeout=left)
            view = view[n:]

    async def drain(self, *, timeout: float | None = 5.0) -> None:
        """Wait until the device has returned every write buffer (tcdrain, roughly)."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        while True:
            self.reclaim()
            if not self._driver._tx_pool(self.id).in_flight:
                return
            await self._driver._wait_port(self, self.tx_queue, deadline)

    def post_rx(self, count: int | None = None) -> int:
        """Post `count` more rx buffers (None: fill the queue); returns how many."""
        return self._driver._fill(self.rx_queue, count)

    def _fill_rx(self) -> int:
        """fill_queue on the port's rx queue, up to the driver's `rx_buffers` in all."""
        want = self._driver.rx_buffers
        if want is None:
            return self._driver._fill(self.rx_queue, None)
        return self._driver._fill(self.rx_queue, max(0, want - self.rx_posted))

    def reclaim(self) -> int:
        """reclaim_consumed_buffers: take back the write buffers the device returned."""
        drv = self._driver
        try:
            q = drv.fe.queue(self.tx_queue)
        except FrontEndError:
            return 0
        pool = drv._tx_pool(self.id)
        n = 0
        while (item := q.get_used()) is not None:
            slot = pool.in_flight.pop(item[0], None)
            if slot is None:
                drv.stats.foreign_used[self.tx_queue] += 1
                continue
            pool.free[slot[1]].append(slot[0])
            n += 1
        if n:
            self.outvq_full = False
            self._wake()
        return n

    # ------------------------------------------------------------------ internals

    def _submit(self, chunk: memoryview) -> int:
        """Copy `chunk` into a guest buffer and make it available as one descriptor."""
        drv = self._driver
        q = drv.fe.queue(self.tx_queue)
        pool = drv._tx_pool(self.id)
        size = next(s for s in _TX_CLASSES if s >= len(chunk))
        free = pool.free[size]
        gpa = free.pop() if free else drv.fe.alloc(size, align=64)
        drv.fe.write(gpa, chunk)
        head = q.add([(gpa, len(chunk))])
        pool.in_flight[head] = (gpa, size, len(chunk))
        drv.fe.kick(self.tx_queue)
        if q.free_descriptors == 0:
            self.outvq_full = True
        self.bytes_written += len(chunk)
        return head

    async def _hvc_write(self, chunk: memoryview, timeout: float | None) -> int:
        """put_chars: send one buffer and spin until the device returned it."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        self.reclaim()
        head = self._submit(chunk)
        pool = self._driver._tx_pool(self.id)
        while True:
            self.reclaim()
            if head not in pool.in_flight:
                return len(chunk)
            await self._driver._wait_port(self, self.tx_queue, deadline)

    def _take_rx(self, *, keep: bool | None = None) -> None:
        """in_intr: move used rx buffers to the port, or drop them if it is not open
        (`keep` overrides whether the port counts as open)."""
        drv = self._driver
        try:
            q = drv.fe.queue(self.rx_queue)
        except FrontEndError:
            return
        pool = drv._rx_pool(self.rx_queue)
        repost: list[int] = []
        while (item := q.get_used()) is not None:
            head, written = item
            gpa = pool.posted.pop(head, None)
            if gpa is None:
                drv.stats.foreign_used[self.rx_queue] += 1
                continue
            length = min(written, PAGE_SIZE)
            if not (self._guest_open if keep is None else keep) or length == 0:
                if length:
                    drv.stats.discarded["closed"] += length
                    self.discarded["closed"] += length
                repost.append(gpa)
            else:
                self._inbufs.append([gpa, 0, length])
        if repost:
            drv._repost(self.rx_queue, repost)

    def _fill_readbuf(self, n: int) -> bytes:
        drv = self._driver
        parts: list[bytes] = []
        done: list[int] = []
        want = n
        while want and self._inbufs:
            buf = self._inbufs[0]
            gpa, offset, length = buf
            take = min(want, length - offset)
            parts.append(drv.fe.read(gpa + offset, take))
            want -= take
            buf[1] += take
            if buf[1] == length:
                self._inbufs.popleft()
                done.append(gpa)
        if done:
            drv._repost(self.rx_queue, done)
        data = b"".join(parts)
        self.bytes_read += len(data)
        return data

    def _discard_data(self, reason: str) -> None:
        """discard_port_data: drop what was received and not read, re-posting the buffers."""
        self._take_rx(keep=True)
        if not self._inbufs:
            return
        self._driver.stats.discarded[reason] += self.buffered
        self.discarded[reason] += self.buffered
        gpas = [buf[0] for buf in self._inbufs]
        self._inbufs.clear()
        self._driver._repost(self.rx_queue, gpas)


class ConsoleDriver:
    """The guest's virtio-console driver on a `FrontEnd` (see the module docstring).

    `max_ports` is the device's port count as QEMU realized it (2*max_ports+2 queues);
    `multiport` whether the guest negotiates MULTIPORT; `event_idx` whether it negotiates
    EVENT_IDX; `queue_size` the size of every ring. Test knobs: `rx_buffers` posts that many
    buffers per port rx queue instead of filling it (0: none, which Linux would refuse);
    `control_paused` stops control message processing (a guest whose control work has not
    run yet).

    Control messages from the device are handled by `poll()`, by the background task `run()`,
    and by every read/write that has to wait. What the device sent is in `received`, what
    the guest sent in `sent`, in order.
    """

    def __init__(
        self,
        fe: FrontEnd,
        *,
        max_ports: int,
        multiport: bool = True,
        event_idx: bool = False,
        queue_size: int = 128,
        rx_buffers: int | None = None,
    ) -> None:
        if max_ports < 1:
            raise ValueError(f"max_ports {max_ports} < 1")
        self.fe = fe
        self.max_ports = max_ports
        self.multiport_wanted = multiport
        self.event_idx = event_idx
        self.queue_size = queue_size
        self.rx_buffers = rx_buffers
        self.control_paused = False
        #: What probe() read from the config space and negotiated.
        self.cols = self.rows = 0
        self.max_nr_ports = 0
        self.emerg_wr = 0
        self.features = 0
        self.multiport = False
        self.ports: dict[int, GuestPort] = {}
        #: Control messages from the device, in order (unparsable ones included as raw bytes).
        self.received: list[ControlMessage | bytes] = []
        #: Control messages the guest sent, in order.
        self.sent: list[ControlMessage | bytes] = []
        self.stats = DriverStats()
        self._rx_pools: dict[int, _RxPool] = {}
        self._tx_pools: dict[int, _TxPool] = {}
        self._waiters: dict[int, _CallWaiter] = {}
        self._control_lock = trio.Lock()  # control_work: one handler at a time
        self._control_tx_lock = trio.Lock()  # c_ovq_lock
        self._cpkt: int | None = None  # the one control buffer (portdev->cpkt)
        self._scratch: int | None = None  # raw control messages of tests
        self._ready = trio.Event()  # the queues are started (run() may watch them)

    # ================================================================== probe and friends

    async def probe(self, *, fill_control: bool = True, prefill_ports: bool = False) -> None:
        """virtcons_probe: config, features, DRIVER_OK, control rx buffers, DEVICE_READY.

        `fill_control=False` leaves the control rx queue empty (post with `fill_control()`);
        `prefill_ports` also posts rx buffers on every port's rx queue before DEVICE_READY
        (Linux only fills a port's queue when DEVICE_ADD creates the port)."""
        fe = self.fe
        if fe.num_queues == 0:
            await fe.realize(2 * self.max_ports + 2)
        cols, rows, max_nr_ports, emerg_wr = _CONFIG.unpack(await fe.get_config(0, _CONFIG.size))
        offered = fe.device_features
        self.multiport = self.multiport_wanted and bool(offered & F_MULTIPORT)
        if self.multiport:
            if not 1 <= max_nr_ports <= self.max_ports:
                raise ConsoleDriverError(
                    f"config max_nr_ports {max_nr_ports}: the front end has queues for "
                    f"{self.max_ports} ports"
                )
            self.max_nr_ports = max_nr_ports
        else:
            self.max_nr_ports = 1
        self.cols, self.rows, self.emerg_wr = cols, rows, emerg_wr
        wanted = VIRTIO_F_VERSION_1 | F_SIZE | F_EMERG_WRITE
        if self.multiport:
            wanted |= F_MULTIPORT
        self.features = wanted & offered
        nr_queues = 2 * self.max_nr_ports + 2 if self.multiport else 2
        await fe.start(
            range(nr_queues), size=self.queue_size, features=self.features,
            event_idx=self.event_idx,
        )
        self._ready.set()
        if self._cpkt is None:
            self._cpkt = fe.alloc(_CONTROL.size, align=16)
        if self.multiport:
            if fill_control:
                self.fill_control()
            if prefill_ports:
                for port_id in range(self.max_nr_ports):
                    GuestPort(self, port_id)._fill_rx()
            await self.send_control(BAD_ID, ControlEvent.DEVICE_READY, 1)
        else:
            # An older host: port 0 is a console from the start (add_port in probe).
            await self._add_port(0)

    def fill_control(self, count: int | None = None) -> int:
        """fill_queue(c_ivq): post PAGE_SIZE buffers on the control rx queue."""
        return self._fill(CONTROL_RX, count)

    async def freeze_restore(self, *, pause: bool = True) -> None:
        """virtcons_freeze then virtcons_restore around a stop and resume of the rings.

        Freeze forgets host_connected, drops unread data and unhandled control messages;
        restore fills the rx queues, sends PORT_READY(1) for every port and PORT_OPEN(1) for
        those the guest has open; no DEVICE_READY."""
        async with self._control_lock:
            if self.multiport:
                self._drop_used_control("freeze")
            for port in self._port_list():
                port._host_connected = False
                port._discard_data("freeze")
                port.reclaim()
            await self.fe.stop(pause=pause)
            await self.fe.resume()
            if self.multiport:
                self.fill_control()
            for port in self._port_list():
                port._fill_rx()
                await self.send_control(port.id, ControlEvent.PORT_READY, 1)
                if port.guest_open:
                    await self.send_control(port.id, ControlEvent.PORT_OPEN, 1)
                port._wake()

    async def reinit(self, *, reset_device: bool = False) -> None:
        """The guest driver starts over (reboot, unbind + bind): the rings stop, and with
        `reset_device` the front end sends RESET_DEVICE; then a fresh probe on the same
        connection, which sends DEVICE_READY again. Every GuestPort of before is gone.

        What the rings held is accounted per port, as after the stop the used rings are
        final: host bytes not read are `discarded["reinit"]`, written bytes the device never
        took are `unsent_at_reinit`."""
        async with self._control_lock:
            self._ready = trio.Event()
            if self.fe.running:
                await self.fe.stop()
                for port in self._port_list():
                    port._discard_data("reinit")
                    port.reclaim()
                    port.unsent_at_reinit += sum(
                        n for _, _, n in self._tx_pool(port.id).in_flight.values())
            if reset_device:
                await self.fe.reset_device()
            for port in self._port_list():
                port._unplugged = True
                port._guest_open = port._host_connected = False
                port._inbufs.clear()
                port._wake()
            self.ports.clear()
            for rx in self._rx_pools.values():
                rx.reset()
            for tx in self._tx_pools.values():
                tx.reset()
        await self.probe()

    async def emergency_write(self, char: int | bytes) -> None:
        """Write one character to emerg_wr (config offset 8), as an early console does."""
        value = char if isinstance(char, int) else char[0]
        await self.fe.set_config(8, struct.pack("<I", value))

    # ================================================================== ports

    def port(self, key: int | str) -> GuestPort:
        """The port with this id or name (KeyError if the guest has none)."""
        if isinstance(key, int):
            return self.ports[key]
        for p in self.ports.values():
            if p.name == key:
                return p
        raise KeyError(f"no port named {key!r}")

    async def wait_port(self, key: int | str, *, timeout: float = 5.0) -> GuestPort:
        """Handle control messages until the port exists (with its name, for a name)."""
        with trio.fail_after(timeout):
            while True:
                await self.poll()
                try:
                    return self.port(key)
                except KeyError:
                    pass
                await self._wait_control()

    async def wait_for(self, predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
        """Handle control messages until `predicate()` holds."""
        with trio.fail_after(timeout):
            while True:
                await self.poll()
                if predicate():
                    return
                await self._wait_control()

    # ================================================================== control queue

    async def poll(self) -> int:
        """control_work_handler: handle every control message the device returned, re-posting
        each buffer; return how many were handled."""
        if not self.multiport or self.control_paused:
            return 0
        async with self._control_lock:
            if self.control_paused:
                return 0
            try:
                q = self.fe.queue(CONTROL_RX)
            except FrontEndError:
                return 0
            pool = self._rx_pool(CONTROL_RX)
            n = 0
            while (item := q.get_used()) is not None:
                head, written = item
                gpa = pool.posted.pop(head, None)
                if gpa is None:
                    self.stats.foreign_used[CONTROL_RX] += 1
                    continue
                data = self.fe.read(gpa, min(written, PAGE_SIZE))
                await self._handle_control(data)
                self._repost(CONTROL_RX, [gpa])
                n += 1
            return n

    async def run(self) -> None:
        """Handle control messages as they come (control_intr), until cancelled."""
        if not self.multiport:
            await trio.sleep_forever()
        while True:
            await self._ready.wait()
            try:
                await self.poll()
                await self._wait_used(CONTROL_RX, math.inf)
            except FrontEndError:
                await trio.sleep(0.01)

    @contextmanager
    def control_held(self) -> Iterator[None]:
        """Control messages from the device wait in the ring while inside."""
        self.control_paused = True
        try:
            yield
        finally:
            self.control_paused = False

    async def send_control(
        self, port_id: int, event: int, value: int = 0, payload: bytes = b""
    ) -> None:
        """__send_control_msg: one message in the control buffer, wait until it is back."""
        if not self.multiport:
            return
        await self._send_raw_control([ControlMessage(port_id, event, value, payload).pack()])

    async def send_raw_control(self, *messages: bytes, timeout: float = 5.0) -> None:
        """Make every one of `messages` (any bytes: truncated, unknown events...) available on
        the control tx queue at once, kick once, and wait until the device returned them."""
        await self._send_raw_control(list(messages), timeout=timeout, batch=True)

    async def _send_raw_control(
        self, messages: list[bytes], *, timeout: float = 5.0, batch: bool = False
    ) -> None:
        fe = self.fe
        deadline = trio.current_time() + timeout
        async with self._control_tx_lock:
            q = fe.queue(CONTROL_TX)
            if batch:
                size = sum(max(len(m), 1) for m in messages)
                if self._scratch is None or size > PAGE_SIZE * 4:
                    self._scratch = fe.alloc(max(size, PAGE_SIZE * 4))
                where = self._scratch
            else:
                assert self._cpkt is not None and len(messages) == 1
                where = self._cpkt
            heads: set[int] = set()
            for m in messages:
                fe.write(where, m)
                heads.add(q.add([(where, len(m))]))
                where += max(len(m), 1)
                self.sent.append(_parse_or_raw(m))
            fe.kick(CONTROL_TX)
            while heads:
                while (item := q.get_used()) is not None:
                    if item[0] in heads:
                        heads.discard(item[0])
                    else:
                        self.stats.foreign_used[CONTROL_TX] += 1
                if heads:
                    await self._wait_used(CONTROL_TX, deadline)

    async def _handle_control(self, data: bytes) -> None:
        """handle_control_message."""
        if len(data) < _CONTROL.size:
            # Linux reads past what the device wrote; a model can say so instead.
            self.received.append(data)
            self._ignore(f"truncated control message of {len(data)} bytes")
            return
        msg = _parse_or_raw(data)
        assert isinstance(msg, ControlMessage)
        self.received.append(msg)
        log.debug("control from the device: %r", msg)
        port = self.ports.get(msg.id)
        if port is None and msg.event != ControlEvent.DEVICE_ADD:
            self._ignore(f"{msg.name} for port {msg.id}, which the guest does not have")
            return
        if msg.event == ControlEvent.DEVICE_ADD:
            if port is not None:
                await self.send_control(port.id, ControlEvent.PORT_READY, 1)
            elif msg.id >= self.max_nr_ports:
                self._ignore(f"DEVICE_ADD for port {msg.id} ≥ max_nr_ports {self.max_nr_ports}")
            else:
                await self._add_port(msg.id)
            return
        assert port is not None
        if msg.event == ControlEvent.DEVICE_REMOVE:
            self._unplug(port)
        elif msg.event == ControlEvent.CONSOLE_PORT:
            if msg.value and not port.console:
                # init_port_console: an hvc, open from now on, and the host is told so.
                port._console = True
                port._guest_open = True
                port._wake()
                await self.send_control(port.id, ControlEvent.PORT_OPEN, 1)
        elif msg.event == ControlEvent.RESIZE:
            if not port.console:
                self._ignore(f"RESIZE for port {port.id}, which is not a console")
            elif len(msg.payload) < _RESIZE.size:
                self._ignore(f"RESIZE for port {port.id} with {len(msg.payload)} payload bytes")
            else:
                port.resize_payload = msg.payload[: _RESIZE.size]
                port.size = _RESIZE.unpack(port.resize_payload)  # rows first, as Linux reads
        elif msg.event == ControlEvent.PORT_OPEN:
            port._host_connected = bool(msg.value)
            port.reclaim()
            port._wake()
        elif msg.event == ControlEvent.PORT_NAME:
            if port.name is None:  # after a restore it comes again: kept from the first
                port._name = msg.payload.split(b"\0", 1)[0].decode("utf-8", "replace")
                port._wake()
        else:
            self._ignore(f"{msg.name} is not an event the guest handles")

    async def _add_port(self, port_id: int) -> None:
        """add_port: the port, its rx buffers, PORT_READY(1)."""
        port = GuestPort(self, port_id)
        port._fill_rx()
        if not self.multiport:
            port._console = True
            port._guest_open = True
        self.ports[port_id] = port
        await self.send_control(port_id, ControlEvent.PORT_READY, 1)

    def _unplug(self, port: GuestPort) -> None:
        """unplug_port: gone from the list, woken, data dropped; nothing sent to the host."""
        del self.ports[port.id]
        port._unplugged = True
        port._guest_open = False
        port._host_connected = False
        port._discard_data("unplug")
        port.reclaim()
        port._wake()

    def _ignore(self, reason: str) -> None:
        self.stats.ignored_control[reason.split(" ", 1)[0]] += 1
        log.info("control message ignored: %s", reason)

    def _drop_used_control(self, reason: str) -> None:
        try:
            q = self.fe.queue(CONTROL_RX)
        except FrontEndError:
            return
        pool = self._rx_pool(CONTROL_RX)
        dropped: list[int] = []
        while (item := q.get_used()) is not None:
            gpa = pool.posted.pop(item[0], None)
            if gpa is not None:
                dropped.append(gpa)
                self.stats.ignored_control[reason] += 1
        if dropped:
            self._repost(CONTROL_RX, dropped)

    # ================================================================== buffers and waits

    def _port_list(self) -> list[GuestPort]:
        return [self.ports[i] for i in sorted(self.ports)]

    def _rx_pool(self, index: int) -> _RxPool:
        pool = self._rx_pools.get(index)
        if pool is None:
            pool = self._rx_pools[index] = _RxPool(index)
        return pool

    def _tx_pool(self, port_id: int) -> _TxPool:
        pool = self._tx_pools.get(port_id)
        if pool is None:
            pool = self._tx_pools[port_id] = _TxPool()
        return pool

    def _fill(self, index: int, count: int | None) -> int:
        """fill_queue: post PAGE_SIZE device-writable buffers until the queue is full (or
        `count` of them); kick once."""
        q = self.fe.queue(index)
        pool = self._rx_pool(index)
        n = 0
        while q.free_descriptors and (count is None or n < count):
            gpa = pool.free.pop() if pool.free else self.fe.alloc(PAGE_SIZE, align=PAGE_SIZE)
            pool.posted[q.add([], [(gpa, PAGE_SIZE)])] = gpa
            n += 1
        if n:
            self.fe.kick(index)
        return n

    def _repost(self, index: int, gpas: Iterable[int]) -> None:
        """add_inbuf for buffers done with, then one kick."""
        q: DriverQueue = self.fe.queue(index)
        pool = self._rx_pool(index)
        for gpa in gpas:
            pool.posted[q.add([], [(gpa, PAGE_SIZE)])] = gpa
        self.fe.kick(index)

    async def _wait_used(self, index: int, deadline: float) -> None:
        """Sleep until queue `index` may have new used buffers: interrupts re-enabled and
        rechecked, then its call eventfd (shared by every task waiting on that queue)."""
        q = self.fe.queue(index)
        if q.enable_interrupts():
            return
        waiter = self._waiters.get(index)
        if waiter is None:
            waiter = self._waiters[index] = _CallWaiter()
        with trio.fail_at(deadline):
            if waiter.busy:
                await waiter.event.wait()
                return
            waiter.busy = True
            try:
                # Bounded: an interrupt can slip between this harness's eventfd swaps in
                # resume() (the device and this front end share one process and one epoll);
                # a used buffer found after the timeout is counted, never silently absorbed.
                with trio.move_on_after(CALL_RECHECK):
                    await self.fe.wait_call(index, math.inf)
                    return
                if q.used_pending():
                    self.stats.missed_interrupts[index] += 1
            except trio.ClosedResourceError:
                pass  # start/resume gave the back end a fresh call eventfd: look again
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
                # The eventfd was closed as it became readable (the front end closing).
                raise trio.ClosedResourceError("the call eventfd was closed") from None
            finally:
                waiter.busy = False
                event, waiter.event = waiter.event, trio.Event()
                event.set()

    async def _wait_control(self) -> None:
        if self.multiport:
            await self._wait_used(CONTROL_RX, math.inf)
        else:
            await trio.sleep_forever()

    async def _wait_port(self, port: GuestPort, index: int, deadline: float) -> None:
        """Sleep until something may have changed for `port`: a call on its queue `index`,
        a control message (handled here), or the port's waitqueue; TooSlowError at deadline."""
        changed = port._changed
        waits: list[Callable[[], Awaitable[object]]] = [
            lambda: self._wait_used(index, math.inf),
            changed.wait,
        ]
        if self.multiport and not self.control_paused:
            waits.append(self._wait_control)
        with trio.fail_at(deadline):
            await _first_of(waits)
        await self.poll()


def _parse_or_raw(data: bytes) -> ControlMessage | bytes:
    if len(data) < _CONTROL.size:
        return data
    id_, event, value = _CONTROL.unpack_from(data)
    return ControlMessage(id_, event, value, bytes(data[_CONTROL.size :]))


async def _first_of(waits: list[Callable[[], Awaitable[object]]]) -> None:
    """Return when the first of `waits` returns (or fails: the caller looks again)."""
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            try:
                await wait()
            except (FrontEndError, trio.ClosedResourceError):
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)
