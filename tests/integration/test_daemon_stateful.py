"""A running daemon process under any sequence of good and hostile input (hypothesis.stateful).

One daemon process per example (daemon_process), serving three ports to a guest played by the
testing front end and console driver, with host peers on the ports' sockets, all of them in a
trio run in a thread of its own (the state machine is synchronous):

* port 1, clean: a unix stream peer that stays; traffic both ways, compared byte for byte.
* port 2, framed: a framed peer that connects, hangs up, sends data or malformed frames.
* port 3, echo: the hostile guest's, with tx chains aliasing one buffer (claiming more than a
  chain may carry), chains outside guest RAM and bad control messages.

The rules also send valid and malformed vhost-user requests with fds of every kind
(hostile.FD_MAKERS), requests that must be refused on a working connection and requests that
must make the daemon close it (the guest then reconnects), pause and resume the VM, reset the
device, restart the guest driver, reconnect the front end, open and close the guest's ports,
and SIGHUP the daemon with a config that adds or removes port 4.

After every step the daemon must be alive and answer `status` and `stats`, the clean port must
carry a probe both ways byte for byte, and once nothing is in flight (waited for, bounded)
every equality of the soak's (`soak.port_checks`: the sender's count, the daemon's ledger per
port and direction, the backend's counters, the receiver's count) and of the device's counters
holds, the clean port dropped nothing, every refusal was counted under its request, and the
daemon's VmHWM and open fds are within bounds of what they were after the setup (fds once the
connections a step undid are closed: a leak stays, a close in progress does not).
VHOSTSER_STATEFUL_EXAMPLES and VHOSTSER_STATEFUL_STEPS make a longer run.
"""

from __future__ import annotations

import operator
import os
import random
import signal
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vhostser.soak import Check, Events, Flow, Guest, HostPeer, PortPlan, device_checks, port_checks
from vhostser.testing import AckError, FrontEnd, open_frontend, sealed_memfd
from vhostser.testing.console_driver import (
    ConsoleDriver,
    PortClosedError,
    WouldBlockError,
    tx_queue,
)
from vhostser.testing.hostile import (
    FD_MAKERS,
    MALFORMED_FRAMES,
    add_aliased_tx_chain,
    bad_control_messages,
)
from vhostser.vhost_user import Request
from vhostser.vhost_user.messages import (
    HEADER,
    U64,
    MemoryTable,
    SingleMemoryRegion,
    VringFile,
    VringState,
    encode,
)
from virtqueue import Region

from .daemon_process import VM, DaemonProcess, daemon_process

EXAMPLES = int(os.environ.get("VHOSTSER_STATEFUL_EXAMPLES", "10"))
STEPS = int(os.environ.get("VHOSTSER_STATEFUL_STEPS", "25"))
MAX_PORTS = 5
CLEAN, FRAMED, ECHO, RELOAD = 1, 2, 3, 4
PLAN = (PortPlan(CLEAN, "unix", "clean"), PortPlan(FRAMED, "framed", "hostile-host"),
        PortPlan(ECHO, "echo", "hostile-guest"))
CONFIG = VM + """
[[port]]
id = 1
name = "org.test.clean"
backend = {{ type = "unix", path = "{tmp}/clean.sock" }}

[[port]]
id = 2
name = "org.test.framed"
backend = {{ type = "unix", path = "{tmp}/framed.sock", mode = "framed" }}

[[port]]
id = 3
name = "org.test.echo"
backend = {{ type = "echo" }}
"""
RELOADED = '\n[[port]]\nid = 4\nname = "org.test.reload"\nbackend = { type = "null" }\n'
GUEST_RAM = 32 << 20
PROBE = 3000  # bytes each way on the clean port after every step
STEP_TIMEOUT = 30.0  # any one step or check: past it, the daemon hangs
QUIESCE_TIMEOUT = 15.0  # for every count to agree once a step is done
ALIASED_PIECE, ALIASED_PIECES = 512 * 1024, 3  # a chain claiming 1.5 MiB of one 512 KiB
OUTSIDE_RAM = 0xDEAD_0000_0000
# An extra memory region far above the guest's RAM, guest-physically and in its address space.
EXTRA_REGION = Region(0x10_0000_0000, 4096, 0x7E00_0000_0000, 0)
# Bounds on the daemon's growth from right after the setup: fds it holds for the connections
# and peers the rules make and undo, plus a margin; memory well under any copy of an aliased
# chain (1.5 MiB each).
FD_SLACK = 4
HWM_SLACK_MB = 48.0

T = TypeVar("T")
Step = Callable[[FrontEnd], Awaitable[Any]]


class TrioThread:
    """A trio run in a thread of its own, for a synchronous caller (the state machine): `run`
    calls an async function there, each call a task of its own, bounded by STEP_TIMEOUT;
    tasks that outlive a call (the guest, the peers' readers) go in `nursery`."""

    def __init__(self) -> None:
        self._up = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._up.wait()

    def _main(self) -> None:
        try:
            trio.run(self._root)
        except BaseException as e:  # a background task failed: the next `run` says so
            self.failure = e
        finally:
            self._up.set()

    async def _root(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery, self.token = nursery, trio.lowlevel.current_trio_token()
            self._up.set()
            await trio.sleep_forever()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            with trio.fail_after(STEP_TIMEOUT):
                return await fn(*args)

        try:
            return trio.from_thread.run(bounded, trio_token=self.token)
        except trio.RunFinishedError:
            raise AssertionError(f"a background task failed: {self.failure!r}") from self.failure

    def close(self) -> None:
        try:
            trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self.token)
        except trio.RunFinishedError:
            pass
        self._thread.join(STEP_TIMEOUT)


class RecordedFlow(Flow):
    """A Flow that also keeps what was received, to compare byte for byte."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def receive(self, data: bytes | memoryview) -> None:
        super().receive(data)
        self.data += data


@dataclass
class Session:
    """One front-end connection with its guest driver running."""

    fe: FrontEnd
    driver: ConsoleDriver
    scope: trio.CancelScope
    done: trio.Event
    aliased_gpa: int | None = None


async def _session(path: str, *, task_status: trio.TaskStatus[Session]) -> None:
    done = trio.Event()
    try:
        async with open_frontend(path, mem_size=GUEST_RAM) as fe:
            driver = ConsoleDriver(fe, max_ports=MAX_PORTS)
            await driver.probe()
            async with trio.open_nursery() as tasks:
                tasks.start_soon(driver.run)
                task_status.started(Session(fe, driver, tasks.cancel_scope, done))
                await trio.sleep_forever()
    finally:
        done.set()


# ------------------------------------------------------------------ vhost-user requests


def _with_eventfd(request: Request, payload: bytes | VringFile | VringState) -> Step:
    async def send(fe: FrontEnd) -> None:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            await fe.request(request, payload, fds=[fd], need_reply=True)
        finally:
            os.close(fd)

    return send


async def _two_regions_one_fd(fe: FrontEnd) -> None:
    memfd = sealed_memfd("extra", 4096)
    try:
        await fe.request(Request.SET_MEM_TABLE, MemoryTable((fe.region, fe.region)),
                         fds=[memfd], need_reply=True)
    finally:
        os.close(memfd)


def _plain(request: int, payload: Any = b"") -> Step:
    async def send(fe: FrontEnd) -> None:
        await fe.request(request, payload, need_reply=True)

    return send


# Refused (nacked) on a working connection, which goes on: the request they count under.
REFUSED: dict[str, tuple[Step, str]] = {
    "unknown-code": (_plain(99), "unknown"),
    "unsupported-code": (_plain(Request.SEND_RARP, bytes(8)), "SEND_RARP"),
    "body-size": (_plain(Request.SET_VRING_NUM, bytes(12)), "SET_VRING_NUM"),
    "queue-size-3": (_plain(Request.SET_VRING_NUM, VringState(0, 3)), "SET_VRING_NUM"),
    "vring-index": (_plain(Request.SET_VRING_NUM, VringState(99, 64)), "SET_VRING_NUM"),
    "second-set-owner": (_plain(Request.SET_OWNER), "SET_OWNER"),
    "features-not-offered": (_plain(Request.SET_FEATURES, U64(1 << 63)), "SET_FEATURES"),
    "enable-value-2": (_plain(Request.SET_VRING_ENABLE, VringState(1, 2)), "SET_VRING_ENABLE"),
    "status-too-big": (_plain(Request.SET_STATUS, U64(0x100)), "SET_STATUS"),
    "remove-unknown-region": (_plain(Request.REM_MEM_REG, SingleMemoryRegion(EXTRA_REGION)),
                              "REM_MEM_REG"),
    "config-out-of-range": (_plain(Request.SET_CONFIG, struct.pack("<III", 250, 10, 0)
                                   + bytes(10)), "SET_CONFIG"),
    "vring-file-index": (_with_eventfd(Request.SET_VRING_CALL, VringFile(255, False)),
                         "SET_VRING_CALL"),
    "nofd-bit-and-an-fd": (_with_eventfd(Request.SET_VRING_KICK, struct.pack("<Q", 5 | 0x100)),
                           "SET_VRING_KICK"),
    "unexpected-fd": (_with_eventfd(Request.SET_VRING_NUM, VringState(0, 64)), "SET_VRING_NUM"),
    "mem-table-2-regions-1-fd": (_two_regions_one_fd, "SET_MEM_TABLE"),
}


def _raw(data: bytes, nfds: int = 0) -> Step:
    async def send(fe: FrontEnd) -> None:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        try:
            await fe.send_raw(data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    return send


# Input after which the daemon closes the connection: the request it counts under, if any.
CLOSING: dict[str, tuple[Step, str | None]] = {
    "bad-version-bits": (_raw(HEADER.pack(Request.GET_FEATURES, 0x2, 0)), None),
    "nine-fds": (_raw(encode(Request.SET_VRING_NUM, VringState(0, 64)), 9), None),
    "oversize-body": (_raw(HEADER.pack(Request.SET_CONFIG, 0x1, 1 << 20) + bytes(64)), None),
    "get-vring-base-bad-index": (_raw(encode(Request.GET_VRING_BASE, VringState(77, 0))),
                                 "GET_VRING_BASE"),
    "get-with-a-body": (_raw(encode(Request.GET_FEATURES, U64(0))), "GET_FEATURES"),
    "reply-flag": (_raw(encode(Request.GET_QUEUE_NUM, flags=0x4)), "GET_QUEUE_NUM"),
    "get-config-oversize": (_raw(encode(Request.GET_CONFIG, struct.pack("<III", 0, 300, 0)
                                        + bytes(300))), "GET_CONFIG"),
}
VALID: dict[str, Step] = {
    name: _plain(request) for name, request in (
        ("GET_FEATURES", Request.GET_FEATURES),
        ("GET_PROTOCOL_FEATURES", Request.GET_PROTOCOL_FEATURES),
        ("GET_QUEUE_NUM", Request.GET_QUEUE_NUM),
        ("GET_MAX_MEM_SLOTS", Request.GET_MAX_MEM_SLOTS),
        ("GET_STATUS", Request.GET_STATUS))
} | {"GET_CONFIG": _plain(Request.GET_CONFIG, struct.pack("<III", 0, 12, 0) + bytes(12))}
FD_REQUESTS = (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR,
               Request.SET_BACKEND_REQ_FD, Request.ADD_MEM_REG)
VRING_FDS = FD_REQUESTS[:3]
# The fd kind each request accepts; the rest are refused as of the wrong kind, but a regular
# file given as memory (it has the kind, not the seals) is refused for what it is.
ACCEPTS = {Request.SET_BACKEND_REQ_FD: "stream-socket", Request.ADD_MEM_REG: "memfd"} | {
    r: "eventfd" for r in VRING_FDS}
PAYLOAD = st.builds(operator.mul, st.binary(min_size=1, max_size=256), st.integers(1, 256))


class DaemonUnderAttack(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        try:
            self.d: DaemonProcess = self._exit.enter_context(daemon_process(MAX_PORTS, CONFIG))
            self.loop = TrioThread()
            self._exit.callback(self.loop.close)
            self.events = Events()
            self.rejected: Counter[str] = Counter()
            self.bad_fds: Counter[str] = Counter()
            self.bad_chains: Counter[str] = Counter()
            self.guest = Guest(random.Random(0), PLAN)
            self.clean_g2h = RecordedFlow()
            self.hosts = {
                CLEAN: HostPeer(PLAN[0], str(self.d.tmp / "clean.sock"), random.Random(1),
                                Flow(), self.clean_g2h),
                FRAMED: HostPeer(PLAN[1], str(self.d.tmp / "framed.sock"), random.Random(2),
                                 Flow(), Flow())}
            for host in self.hosts.values():
                self.loop.run(host.connect, self.loop.nursery)
            self.framed_up = True
            self.reload_port = False
            self.guest_open: set[int] = set()
            self.probes = 0
            self.session = self.loop.run(self._attach)
            self._exit.callback(self._leave)
            self.bounds: tuple[float, int] | None = None
            self.loop.run(self._quiesce)
            _, hwm, fds = self.d.usage()
            self.bounds = hwm + HWM_SLACK_MB, fds + FD_SLACK
        except BaseException:
            self._exit.close()
            raise

    def teardown(self) -> None:
        self._exit.close()

    def _leave(self) -> None:
        if self.loop.failure is None:
            self.loop.run(self._leave_async)

    async def _leave_async(self) -> None:
        await self._detach()
        for host in self.hosts.values():
            if host.sock is not None:
                host.sock.close()

    # -------------------------------------------------------------- the guest

    @property
    def driver(self) -> ConsoleDriver:
        return self.session.driver

    async def _attach(self) -> Session:
        """A new front end and guest driver; the ports found, the clean one opened."""
        session: Session = await self.loop.nursery.start(_session, self.d.socket)
        self.session = session
        self.guest.attach(session.fe, session.driver)
        await self._find_ports()
        return session

    async def _detach(self) -> None:
        """The front end goes away; the daemon notices."""
        self.session.scope.cancel()
        await self.session.done.wait()
        while (await self.d.ask("status"))["frontend_connected"]:
            await trio.sleep(0.01)
        self.guest_open.clear()

    async def _find_ports(self) -> None:
        """After a probe: the device's ports are there, and the guest's processes open them."""
        driver = self.driver
        self.guest_open.clear()
        for p in PLAN:
            port = await driver.wait_port(p.id, timeout=STEP_TIMEOUT)
            if port not in self.guest.seen[p.id]:
                self.guest.seen[p.id].append(port)
            await self._open(p.id)
        if self.reload_port:
            await driver.wait_port(RELOAD, timeout=STEP_TIMEOUT)

    async def _open(self, pid: int) -> None:
        port = self.driver.port(pid)
        await port.open()
        self.guest_open.add(pid)

    async def _reconnect(self) -> None:
        await self._detach()
        await self._attach()

    # -------------------------------------------------------------- traffic

    @precondition(lambda self: CLEAN in self.guest_open)
    @rule(g2h=PAYLOAD, h2g=PAYLOAD)
    def clean_traffic(self, g2h: bytes, h2g: bytes) -> None:
        self.loop.run(self._clean_traffic, g2h, h2g)

    async def _clean_traffic(self, g2h: bytes, h2g: bytes) -> None:
        port, host = self.driver.port(CLEAN), self.hosts[CLEAN]
        await self.driver.wait_for(lambda: port.host_connected, timeout=STEP_TIMEOUT)
        start = len(self.clean_g2h.data)
        got = bytearray()

        async def guest_reads() -> None:
            got.extend(await port.read_exactly(len(h2g), timeout=None))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest_reads)
            nursery.start_soon(host.send, h2g)
            await port.write_all(g2h, timeout=None)
            while len(self.clean_g2h.data) < start + len(g2h):
                await trio.sleep(0.005)
        _same(bytes(self.clean_g2h.data[start:]), g2h, "guest to host")
        _same(bytes(got), h2g, "host to guest")

    @precondition(lambda self: ECHO in self.guest_open)
    @rule(payload=PAYLOAD)
    def echo_traffic(self, payload: bytes) -> None:
        self.loop.run(self._echo, payload)

    async def _echo(self, payload: bytes) -> None:
        port = self.driver.port(ECHO)
        got = bytearray()

        async def read() -> None:
            got.extend(await port.read_exactly(len(payload), timeout=None))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await port.write_all(payload, timeout=None)
        _same(bytes(got), payload, "echo")

    @rule(pid=st.sampled_from([CLEAN, FRAMED, ECHO]))
    def guest_opens_or_closes(self, pid: int) -> None:
        self.loop.run(self._toggle, pid)

    async def _toggle(self, pid: int) -> None:
        if pid in self.guest_open:
            await self.driver.port(pid).close()
            self.guest_open.discard(pid)
        else:
            await self._open(pid)

    # -------------------------------------------------------------- the framed peer

    @precondition(lambda self: not self.framed_up)
    @rule()
    def framed_peer_connects(self) -> None:
        self.loop.run(self.hosts[FRAMED].connect, self.loop.nursery)
        self.framed_up = True

    @precondition(lambda self: self.framed_up)
    @rule()
    def framed_peer_hangs_up(self) -> None:
        self.loop.run(self.hosts[FRAMED].hang_up)
        self.framed_up = False

    @precondition(lambda self: self.framed_up)
    @rule(frame=st.sampled_from([f for f, _ in MALFORMED_FRAMES]))
    def framed_peer_sends_a_malformed_frame(self, frame: bytes) -> None:
        # The daemon cuts the peer off: hang_up reads to the EOF that says so.
        self.loop.run(lambda: self.hosts[FRAMED].hang_up(malformed=frame))
        self.events.malformed_frames += 1
        self.framed_up = False

    @precondition(lambda self: self.framed_up and FRAMED in self.guest_open)
    @rule(payload=PAYLOAD)
    def framed_peer_sends_data(self, payload: bytes) -> None:
        self.loop.run(self._framed_data, payload)

    async def _framed_data(self, payload: bytes) -> None:
        host = self.hosts[FRAMED]
        while not await host.send(payload):  # the session's OPEN is on its way to the peer
            await trio.sleep(0.005)

    # -------------------------------------------------------------- vhost-user

    @rule(name=st.sampled_from(sorted(VALID)))
    def valid_request(self, name: str) -> None:
        self.loop.run(VALID[name], self.session.fe)

    @rule(request=st.sampled_from(FD_REQUESTS), kind=st.sampled_from(sorted(FD_MAKERS)),
          index=st.integers(0, 2 * MAX_PORTS + 1))
    def request_with_an_fd(self, request: Request, kind: str, index: int) -> None:
        self.loop.run(self._with_fd, request, kind, index)

    async def _with_fd(self, request: Request, kind: str, index: int) -> None:
        fe = self.session.fe
        fd = FD_MAKERS[kind](self.d.tmp)
        accepted = ACCEPTS[request] == kind
        if accepted and request in VRING_FDS:
            await fe.set_vring_fd(request, index, fd)  # the front end's from now on
            return
        payload: Any = (VringFile(index, False) if request in VRING_FDS
                        else SingleMemoryRegion(EXTRA_REGION) if request is Request.ADD_MEM_REG
                        else b"")
        try:
            if accepted:
                await fe.request(request, payload, fds=[fd], need_reply=True)
            else:
                try:
                    await fe.request(request, payload, fds=[fd], need_reply=True)
                except AckError:
                    pass
                else:
                    raise AssertionError(f"{request.name} took {kind}")
        finally:
            os.close(fd)
        if accepted and request is Request.ADD_MEM_REG:
            await fe.request(Request.REM_MEM_REG, payload, need_reply=True)
        if not accepted:
            self.rejected[request.name] += 1
            if not (request is Request.ADD_MEM_REG and kind == "regular-file"):
                self.bad_fds[request.name] += 1

    @rule(case=st.sampled_from(sorted(REFUSED)))
    def refused_request(self, case: str) -> None:
        send, counted = REFUSED[case]
        self.loop.run(self._refused, send)
        self.rejected[counted] += 1

    async def _refused(self, send: Step) -> None:
        try:
            await send(self.session.fe)
        except AckError:
            await self.session.fe.barrier()  # the same connection answers on
            return
        raise AssertionError("not refused")

    @rule(case=st.sampled_from(sorted(CLOSING)))
    def request_that_closes_the_connection(self, case: str) -> None:
        send, counted = CLOSING[case]
        self.loop.run(self._closing, send)
        if counted is not None:
            self.rejected[counted] += 1

    async def _closing(self, send: Step) -> None:
        fe = self.session.fe
        await send(fe)
        message = await fe.receive_raw(timeout=STEP_TIMEOUT)
        assert message is None, f"an answer instead of a close: {message}"
        await self._reconnect()

    @rule()
    def front_end_reconnects(self) -> None:
        self.loop.run(self._reconnect)

    # -------------------------------------------------------------- hostile guest

    @rule(what=st.sampled_from(["aliased-tx-chain", "tx-chain-outside-ram", "bad-control"]))
    def hostile_guest(self, what: str) -> None:
        """On the echo port's tx ring: a chain of descriptors naming one buffer again and
        again (claiming more than a chain may carry), or one outside guest RAM; or control
        messages the device must ignore."""
        self.loop.run(self._hostile_guest, what)

    async def _hostile_guest(self, what: str) -> None:
        s, index = self.session, tx_queue(ECHO)
        if what == "bad-control":
            bad = bad_control_messages(ECHO, MAX_PORTS)
            await self.driver.send_raw_control(*bad, timeout=STEP_TIMEOUT)
            self.events.bad_control += len(bad)
        elif what == "aliased-tx-chain":
            if s.aliased_gpa is None:
                s.aliased_gpa = s.fe.alloc(ALIASED_PIECE)
            add_aliased_tx_chain(s.fe, index, s.aliased_gpa, ALIASED_PIECE, ALIASED_PIECES)
            self.events.aliased_chains += 1
            self.events.aliased_bytes += ALIASED_PIECE * ALIASED_PIECES
            self.bad_chains["tx-too-long"] += 1
        else:
            s.fe.queue(index).add([(OUTSIDE_RAM, 4096)])
            s.fe.kick(index, force=True)
            self.bad_chains["descriptor"] += 1

    # -------------------------------------------------------------- the VM, the daemon

    @rule()
    def vm_pauses_and_resumes(self) -> None:
        self.loop.run(lambda: self.driver.freeze_restore(pause=True))

    @rule(reset=st.booleans())
    def guest_driver_starts_over(self, reset: bool) -> None:
        """A reboot (with `reset`: RESET_DEVICE first): every port comes anew, closed."""
        self.loop.run(self._reinit, reset)

    async def _reinit(self, reset: bool) -> None:
        await self.driver.reinit(reset_device=reset)
        await self._find_ports()

    @rule()
    def sighup_reload(self) -> None:
        self.reload_port = not self.reload_port
        text = CONFIG.format(tmp=self.d.tmp, max_ports=MAX_PORTS)
        self.d.config.write_text(text + (RELOADED if self.reload_port else ""))
        os.kill(self.d.proc.pid, signal.SIGHUP)
        self.loop.run(self._reloaded)

    async def _reloaded(self) -> None:
        while (RELOAD in {p["id"] for p in await self.d.ask("ports")}) != self.reload_port:
            await trio.sleep(0.02)
        await self.driver.wait_for(lambda: (RELOAD in self.driver.ports) == self.reload_port,
                                   timeout=STEP_TIMEOUT)

    # -------------------------------------------------------------- invariants

    @invariant()
    def daemon_alive_responsive_and_every_byte_accounted(self) -> None:
        assert self.d.alive(), self.d.log()[-3000:]
        if CLEAN in self.guest_open:
            # Whatever the step did elsewhere, the clean port carries bytes both ways.
            self.probes += 1
            rng = random.Random(self.probes)
            self.loop.run(self._clean_traffic, rng.randbytes(PROBE), rng.randbytes(PROBE))
        self.loop.run(self._quiesce)
        assert "Traceback" not in self.d.log(), self.d.log()[-3000:]

    async def _quiesce(self) -> None:
        """Until every check holds and the daemon is within its bounds, once nothing is in
        flight and the connections undone are closed (or the step fails)."""
        status = await self.d.ask("status")
        assert status["pid"] == self.d.proc.pid
        deadline = trio.current_time() + QUIESCE_TIMEOUT
        while True:
            await self._drain()
            bad = [f"port {c.port}: {c.what}: {c.left} != {c.right}"
                   for c in self._checks(await self.d.stats()) if not c.ok]
            bad += self._over_bounds()
            if not bad:
                return
            if trio.current_time() > deadline:
                raise AssertionError("; ".join(bad))
            await trio.sleep(0.02)

    def _over_bounds(self) -> list[str]:
        if self.bounds is None:  # the setup's own quiescence: what they are measured from
            return []
        _, hwm, fds = self.d.usage()
        max_hwm, max_fds = self.bounds
        out = []
        if fds > max_fds:
            out.append(f"the daemon has {fds} fds open, more than {max_fds}")
        if hwm > max_hwm:
            out.append(f"the daemon's VmHWM is {hwm} MB, more than {max_hwm} MB")
        return out

    async def _drain(self) -> None:
        """The guest's processes read what the device delivered on their open ports."""
        for pid in self.guest_open:
            port = self.driver.port(pid)
            while True:
                try:
                    data = await port.read(1 << 20, nonblock=True)
                except (WouldBlockError, PortClosedError):
                    break
                assert pid != CLEAN or not data, f"{len(data)} bytes no host peer sent"
                if not data:
                    break

    def _checks(self, stats: dict[str, Any]) -> list[Check]:
        ports = stats["ports"]
        self.events.bad_requests = self.rejected["SET_VRING_NUM"]
        out = device_checks(stats, self.events)
        for p in PLAN:
            out += port_checks(p, ports[str(p.id)], self.guest.totals(p.id),
                               self.hosts.get(p.id), 0, self.events)
        for pid, s in ports.items():  # the soak's checks have those of PLAN
            if int(pid) in {p.id for p in PLAN}:
                continue
            for direction, led in s["ledger"].items():
                out.append(Check(int(pid), f"ledger {direction} balanced", int(led["balanced"]),
                                 1))
        clean, guest = ports[str(CLEAN)]["ledger"], self.guest.totals(CLEAN)
        out += [Check(CLEAN, "clean: dropped to the guest",
                      sum(clean["to_guest"]["dropped"].values()), 0),
                Check(CLEAN, "clean: dropped from the guest",
                      sum(clean["from_guest"]["dropped"].values()), 0),
                Check(CLEAN, "clean: discarded in the guest", sum(guest["discarded"].values()), 0),
                Check(CLEAN, "clean: guest wrote = host read", guest["written"],
                      self.clean_g2h.received),
                Check(CLEAN, "clean: host wrote = guest read", self.hosts[CLEAN].h2g.sent,
                      guest["read"])]
        vu = stats["vhost_user"]
        out += _counts("rejected", vu["rejected"], self.rejected)
        out += _counts("bad fds", vu["bad_fds"], self.bad_fds)
        out += _counts("bad chains", stats["device"]["bad_chains"], self.bad_chains)
        return out


def _counts(what: str, got: dict[str, int], want: Counter[str]) -> Iterator[Check]:
    for key in sorted(set(got) | set(want)):
        yield Check(None, f"{what} {key}", got.get(key, 0), want[key])


def _same(got: bytes, want: bytes, what: str) -> None:
    """Byte for byte, or where the first difference is."""
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                  min(len(got), len(want)))
        raise AssertionError(f"{what}: {len(got)} bytes for {len(want)} sent, first "
                             f"difference at byte {at}")


DaemonUnderAttack.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=list(HealthCheck))
TestDaemonUnderAttack = DaemonUnderAttack.TestCase
