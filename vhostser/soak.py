"""`vhostser soak`: a daemon under load and abuse for a while, every byte accounted.

A real daemon process (testing.process) serves 8 ports of a guest played by the testing front
end and console driver in this process; host peers on the ports' sockets are this process too.
Every port carries traffic both ways, with a sha256 at each end, in epochs:

* traffic (`--epoch` seconds): both directions of every port at once; meanwhile port 4's host
  peer hangs up and comes back (it half-closes and reads to EOF, so nothing is lost in the
  sockets), port 5's guest closes and reopens its port, port 6's framed peer sends a malformed
  frame each time instead (the daemon cuts it off; it reconnects), port 7's guest adds tx
  chains claiming more than MAX_TX_CHAIN_BYTES, bad control messages and bad vhost-user
  requests; once an epoch the config is rewritten (port 8 comes or goes), the console log
  rotated, and the daemon sent SIGHUP.
* quiescence: the senders stop; the epoch ends once every byte is where the counters say
  (see `checks`), else that is a hang.
* a disruption, in turn: a device reset (port 7's tx ring broken first) and a guest driver
  reinit, both under load at the end of the traffic (the clean ports and port 7's abuse come
  to rest first, the host peers send on); a front end disconnect and reconnect and every port
  closed and reopened, after the quiescence.

Checks at every quiescence (`checks`), each an equality of counts taken at two places:
the sender's count, the daemon's ledger per port and direction (`ctl stats`: accepted =
delivered + dropped + pending), the backend's own counters, the receiver's count. Clean ports
(0-3) must drop nothing and the sha256 of what was sent in an epoch must equal the sha256 of
what was received in it (per epoch: each is a session segment, and nothing is in flight
between epochs). Every other port must balance: sent = received + dropped by reason. The
daemon's VmRSS, RssAnon and open fds are sampled every `--sample` seconds and at each
quiescence; growth from the first quiescence to the last is bounded (MAX_RSS_GROWTH_MB,
MAX_FD_GROWTH). The daemon must be alive and answer its admin socket at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import trio

from . import admin
from .backends.framing import Close, Data, FrameDecoder, Open, encode
from .testing import open_frontend
from .testing.console_driver import (
    ConsoleDriver,
    ConsoleDriverError,
    GuestPort,
    PortClosedError,
    PortGoneError,
    tx_queue,
)
from .testing.frontend import FrontEnd
from .testing.hostile import MALFORMED_FRAMES, add_aliased_tx_chain, bad_control_messages
from .testing.process import DaemonChild, daemon_child, memory_mb, open_fds
from .vhost_user import Request
from .vhost_user.messages import VringState

Kind = Literal["console", "unix", "tcp", "echo", "framed"]
Role = Literal["clean", "host-flaps", "guest-flaps", "hostile-host", "hostile-guest"]
MAX_PORTS = 9
RELOAD_PORT = 8  # comes and goes with the reloads (a null backend)
GUEST_RAM = 64 << 20
CHUNK = 16 * 1024  # largest write, either side
PACE = 0.01  # seconds between a sender's writes: a soak, not a benchmark
QUIESCE_TIMEOUT = 30.0
PHASE_TIMEOUT = 60.0  # any other step (a reload, a reset, opening the ports)
# Default bounds on growth from the first quiescence to the last.
MAX_RSS_GROWTH_MB = 32.0
MAX_FD_GROWTH = 4
ALIASED_PIECE, ALIASED_PIECES = 512 * 1024, 3  # a chain claiming 1.5 MiB


@dataclass(frozen=True)
class PortPlan:
    id: int
    kind: Kind
    role: Role

    @property
    def name(self) -> str:
        return f"org.vhostser.soak.{self.id}"

    @property
    def peer(self) -> bool:
        """A host peer of ours on the port's socket."""
        return self.kind in ("unix", "tcp", "framed")


PLAN = (
    PortPlan(0, "console", "clean"),
    PortPlan(1, "unix", "clean"),
    PortPlan(2, "tcp", "clean"),
    PortPlan(3, "echo", "clean"),
    PortPlan(4, "unix", "host-flaps"),
    PortPlan(5, "unix", "guest-flaps"),
    PortPlan(6, "framed", "hostile-host"),
    PortPlan(7, "unix", "hostile-guest"),
)
DISRUPTIONS = ("device-reset", "frontend-reconnect", "guest-reinit", "ports-reopen")
# Done while ports 4-7 carry traffic (once the clean ones are at rest): the rest between
# epochs, as a front end reconnecting without stopping the rings leaves no count of what was
# in them, and a port's reopen by the guest is what port 5 does all the time anyway.
UNDER_LOAD = ("device-reset", "guest-reinit")


def config(tmp: Path, tcp_port: int, reload_port: bool) -> str:
    lines = ["[vm]", 'name = "soak"', f'socket = "{tmp}/vu.sock"',
             f'admin_socket = "{tmp}/ctl.sock"', f"max_ports = {MAX_PORTS}"]
    for p in PLAN:
        lines += ["[[port]]", f"id = {p.id}"]
        if p.kind == "console":
            lines += ["console = true",
                      f'backend = {{ type = "console", path = "{tmp}/console.log" }}']
            continue
        lines.append(f'name = "{p.name}"')
        if p.kind == "echo":
            lines.append('backend = { type = "echo" }')
        elif p.kind == "tcp":
            lines.append(f'backend = {{ type = "tcp", port = {tcp_port} }}')
        else:
            mode = "framed" if p.kind == "framed" else "stream"
            lines.append(f'backend = {{ type = "unix", path = "{tmp}/port{p.id}.sock", '
                         f'mode = "{mode}" }}')
    if reload_port:
        lines += ["[[port]]", f"id = {RELOAD_PORT}", 'name = "org.vhostser.soak.reload"',
                  'backend = { type = "null" }']
    return "\n".join(lines) + "\n"


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------ counting


class Flow:
    """One direction of one port: bytes and sha256 at the sending end and the receiving end,
    the hashes per epoch."""

    def __init__(self) -> None:
        self.sent = self.received = 0
        self._tx, self._rx = hashlib.sha256(), hashlib.sha256()
        self.epochs_equal = 0
        self.epochs_differ: list[int] = []

    def send(self, data: bytes | memoryview) -> None:
        self.sent += len(data)
        self._tx.update(data)

    def receive(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        self._rx.update(data)

    def close_epoch(self, epoch: int) -> None:
        """Compare this epoch's hashes (nothing is in flight now) and start the next."""
        if self._tx.digest() == self._rx.digest():
            self.epochs_equal += 1
        else:
            self.epochs_differ.append(epoch)
        self._tx, self._rx = hashlib.sha256(), hashlib.sha256()


@dataclass
class Events:
    """What was done to the daemon, counted where it was done."""

    epochs: int = 0
    disruptions: Counter[str] = field(default_factory=Counter)
    reloads: int = 0
    host_flaps: int = 0
    guest_flaps: int = 0
    malformed_frames: int = 0
    aliased_chains: int = 0
    aliased_bytes: int = 0
    bad_control: int = 0
    bad_requests: int = 0
    rings_broken: int = 0


# ------------------------------------------------------------------------ host side


class HostPeer:
    """Our peer on one port's socket: reads whenever connected; writes when told to."""

    def __init__(self, plan: PortPlan, where: str | tuple[str, int], rng: random.Random,
                 h2g: Flow, g2h: Flow) -> None:
        self.plan, self.where, self.rng, self.h2g, self.g2h = plan, where, rng, h2g, g2h
        self.sock: trio.socket.SocketType | None = None
        self.wire_received = 0  # framed: frame bytes read, headers included
        self.partial_at_cut = 0  # framed: bytes of a frame cut off by a hang-up
        self.session: int | None = None  # framed: the open session, from OPEN/CLOSE
        self._eof = trio.Event()

    async def connect(self, nursery: trio.Nursery) -> None:
        family = socket.AF_UNIX if isinstance(self.where, str) else socket.AF_INET
        with trio.fail_after(PHASE_TIMEOUT):
            while True:
                sock = trio.socket.socket(family, socket.SOCK_STREAM)
                try:
                    await sock.connect(self.where)
                    break
                except OSError:
                    sock.close()
                    await trio.sleep(0.05)
        self.sock, self._eof, self.session = sock, trio.Event(), None
        nursery.start_soon(self._read, sock, self._eof)

    async def _read(self, sock: trio.socket.SocketType, eof: trio.Event) -> None:
        decoder = FrameDecoder(accept_open=True)
        try:
            while data := await sock.recv(65536):
                if self.plan.kind != "framed":
                    self.g2h.receive(data)
                    continue
                self.wire_received += len(data)
                decoder.feed(data)
                for frame in decoder:
                    if isinstance(frame, Open):
                        self.session = frame.session
                    elif isinstance(frame, Data):
                        self.g2h.receive(frame.data)
                    elif isinstance(frame, Close):
                        self.session = None
        finally:
            self.partial_at_cut += decoder.buffered
            eof.set()

    async def write_until(self, stop: Callable[[], bool]) -> None:
        """Random chunks until `stop()` (looked at between chunks: a chunk is sent whole)."""
        while not stop():
            await self.send(self.rng.randbytes(self.rng.randint(1, CHUNK)))
            await trio.sleep(PACE)

    async def send(self, payload: bytes) -> bool:
        """`payload` sent whole and counted (framed: in one DATA frame of the open session);
        False when a framed peer has no session to send it in."""
        if self.plan.kind != "framed":
            await self._send_all(payload, count=True)
            return True
        if self.session is None:
            return False
        await self._send_all(encode(Data(self.session, payload)))
        self.h2g.send(payload)
        return True

    async def _send_all(self, data: bytes, *, count: bool = False) -> None:
        view = memoryview(data)
        assert self.sock is not None
        while view:
            n = await self.sock.send(view)
            if count:
                self.h2g.send(view[:n])
            view = view[n:]

    async def hang_up(self, *, malformed: bytes | None = None) -> None:
        """Leave without losing a byte in the sockets: half-close (or send a malformed frame,
        which makes the daemon close), read to EOF, close."""
        assert self.sock is not None
        if malformed is not None:
            await self._send_all(malformed)
        else:
            self.sock.shutdown(socket.SHUT_WR)
        with trio.fail_after(PHASE_TIMEOUT):
            await self._eof.wait()
        self.sock.close()
        self.sock = None


# ------------------------------------------------------------------------ guest side


class Guest:
    """The guest's processes on the ports: what they wrote and read, over every GuestPort the
    driver ever had (each reinit or reconnect makes new ones)."""

    def __init__(self, rng: random.Random, plan: tuple[PortPlan, ...] = PLAN) -> None:
        self.rng, self.plan = rng, plan
        self.driver: ConsoleDriver | None = None
        self.fe: FrontEnd | None = None
        self.seen: dict[int, list[GuestPort]] = {p.id: [] for p in plan}
        self._aliased_gpa: int | None = None

    def attach(self, fe: FrontEnd, driver: ConsoleDriver) -> None:
        self.fe, self.driver, self._aliased_gpa = fe, driver, None

    def totals(self, port_id: int) -> dict[str, Any]:
        ports = self.seen[port_id]
        for p in ports:
            if not p.unplugged:
                p.reclaim()  # what the device returned since the last write
        discarded: Counter[str] = Counter()
        for p in ports:
            discarded.update(p.discarded)
        return {"written": sum(p.bytes_written for p in ports),
                "read": sum(p.bytes_read for p in ports), "discarded": discarded,
                "unsent_at_reinit": sum(p.unsent_at_reinit for p in ports),
                "in_flight": sum(p.tx_in_flight for p in ports if not p.unplugged)}

    async def open_ports(self) -> dict[int, GuestPort]:
        driver = self.driver
        assert driver is not None
        out = {}
        with trio.fail_after(PHASE_TIMEOUT):
            for p in self.plan:
                port = await driver.wait_port(p.id, timeout=PHASE_TIMEOUT)
                await driver.wait_for(partial(_usable, port), timeout=PHASE_TIMEOUT)
                if p.kind != "console" and not port.guest_open:
                    await port.open()
                if port not in self.seen[p.id]:
                    self.seen[p.id].append(port)
                out[p.id] = port
        return out

    async def read(self, port: GuestPort, flow: Flow) -> None:
        """A reader process: reads all it can; waits out closes and host hang-ups."""
        while not port.unplugged:
            try:
                data = await port.read(65536, timeout=None)
            except PortClosedError:
                await _until(lambda: port.guest_open or port.unplugged)
                continue
            if data:
                flow.receive(data)
            elif not port.unplugged:  # the host hung up: it comes back
                await _until(lambda: port.host_connected or not port.guest_open
                             or port.unplugged)

    async def write_until(self, port: GuestPort, flow: Flow, stop: Callable[[], bool]) -> None:
        while not stop():
            view = memoryview(self.rng.randbytes(self.rng.randint(1, CHUNK)))
            while view:
                try:
                    n = await port.write(view, timeout=None)
                except PortClosedError:
                    await _until(lambda: port.guest_open)
                    continue
                flow.send(view[:n])
                view = view[n:]
            await trio.sleep(PACE)

    async def flap(self, port: GuestPort, events: Events, stop: Callable[[], bool]) -> None:
        while not stop():
            await trio.sleep(self.rng.uniform(0.3, 1.2))
            await port.close()
            await trio.sleep(self.rng.uniform(0.05, 0.3))
            await port.open()
            events.guest_flaps += 1

    async def abuse(self, port: GuestPort, events: Events, stop: Callable[[], bool]) -> None:
        """Port 7's guest: tx chains claiming more than a chain may carry, control messages
        the device must ignore, vhost-user requests it must reject."""
        fe, driver = self.fe, self.driver
        assert fe is not None and driver is not None
        if self._aliased_gpa is None:
            self._aliased_gpa = fe.alloc(ALIASED_PIECE)
        q = fe.queue(port.tx_queue)
        while True:
            await trio.sleep(self.rng.uniform(0.2, 0.6))
            if stop():
                return
            if q.free_descriptors >= ALIASED_PIECES:
                add_aliased_tx_chain(fe, port.tx_queue, self._aliased_gpa, ALIASED_PIECE,
                                     ALIASED_PIECES)
                events.aliased_chains += 1
                events.aliased_bytes += ALIASED_PIECE * ALIASED_PIECES
            bad = bad_control_messages(port.id, MAX_PORTS)
            await driver.send_raw_control(*bad, timeout=PHASE_TIMEOUT)
            events.bad_control += len(bad)
            await fe.request(Request.SET_VRING_NUM, VringState(0, 3))  # not a power of 2
            events.bad_requests += 1


def _usable(port: GuestPort) -> bool:
    """A console is open from the start; a port can be opened once its host is there."""
    return port.guest_open if port.console else port.host_connected


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


# ------------------------------------------------------------------------ checks


@dataclass
class Check:
    port: int | None
    what: str
    left: int
    right: int

    @property
    def ok(self) -> bool:
        return self.left == self.right


def port_checks(plan: PortPlan, s: dict[str, Any], guest: dict[str, Any],
                host: HostPeer | None, console_bytes: int, events: Events) -> list[Check]:
    """Every equality that holds for port `plan` once nothing is in flight."""
    led, backend = s["ledger"], s.get("backend", {})
    tg, fg = led["to_guest"], led["from_guest"]
    pid = plan.id
    out = [Check(pid, "ledger to_guest pending", tg["pending"], 0),
           Check(pid, "ledger to_guest balanced", int(tg["balanced"]), 1),
           Check(pid, "ledger from_guest balanced", int(fg["balanced"]), 1),
           Check(pid, "guest tx buffers not returned", guest["in_flight"], 0)]
    injected = events.aliased_bytes if plan.role == "hostile-guest" else 0
    out.append(Check(pid, "guest wrote = device took + lost at reinit",
                     guest["written"] + injected,
                     fg["accepted"] + guest["unsent_at_reinit"]))
    if plan.kind != "console":
        out.append(Check(pid, "device delivered to guest = guest read + guest discarded",
                         tg["delivered"], guest["read"] + sum(guest["discarded"].values())))
    if plan.kind == "console":
        out.append(Check(pid, "console delivered = log file bytes", fg["delivered"],
                         console_bytes))
    elif plan.kind == "echo":
        out.append(Check(pid, "echo: delivered from guest = accepted to guest",
                         fg["delivered"], tg["accepted"]))
    if host is not None:
        unsent = sum(backend["bytes_dropped_unsent"].values())
        out += [Check(pid, "backend: delivered from guest = queued to peers",
                      fg["delivered"], backend["bytes_to_peers"]),
                Check(pid, "host sent = backend read from peers", host.h2g.sent,
                      backend["bytes_from_peers"]),
                Check(pid, "backend read = to guest accepted + peer-dropped + stale",
                      backend["bytes_from_peers"],
                      tg["accepted"] + backend["peer_bytes_dropped"] + backend["stale_bytes"])]
        if plan.kind == "framed":
            out.append(Check(pid, "host read (frame bytes) = backend sent",
                             host.wire_received, backend["bytes_sent"]))
        else:
            out += [Check(pid, "backend queued = sent + dropped unsent",
                          backend["bytes_to_peers"], backend["bytes_sent"] + unsent),
                    Check(pid, "host read = backend sent", host.g2h.received,
                          backend["bytes_sent"])]
    if plan.role == "hostile-guest":
        out.append(Check(pid, "too-long drops = aliased chain bytes",
                         fg["dropped"].get("too-long", 0), events.aliased_bytes))
    if plan.role == "hostile-host":
        out.append(Check(pid, "peers cut off = malformed frames sent",
                         backend["peers_malformed"], events.malformed_frames))
    return out


def at_rest(check: Check) -> bool:
    """What must hold before a disruption under load: the clean ports at rest, and port 7's
    abuse (which stopped with them) all counted."""
    return (check.port is None or PLAN[check.port].role == "clean"
            or check.what.startswith("too-long"))


def device_checks(stats: dict[str, Any], events: Events) -> list[Check]:
    dev = stats["device"]
    return [Check(None, "bad control messages counted = sent", dev["bad_control"],
                  events.bad_control),
            Check(None, "rejected SET_VRING_NUM = sent",
                  stats["vhost_user"]["rejected"].get("SET_VRING_NUM", 0), events.bad_requests),
            Check(None, "rings broken = broken", dev["rings_broken"], events.rings_broken)]


def accounts(plan: PortPlan, s: dict[str, Any], guest: dict[str, Any],
             host: HostPeer | None, flows: tuple[Flow, Flow], console_bytes: int,
             events: Events) -> list[dict[str, Any]]:
    """Per direction: sent, received, dropped by reason (where), and what is left over."""
    led, backend = s["ledger"], s.get("backend", {})
    g2h, h2g = flows
    port_g2h = {f"port:{r}": n for r, n in led["from_guest"]["dropped"].items()}
    port_h2g = {f"port:{r}": n for r, n in led["to_guest"]["dropped"].items()}
    guest_h2g = {f"guest:{r}": n for r, n in guest["discarded"].items()}
    reinit = {"guest:unsent-at-reinit": guest["unsent_at_reinit"]}
    rows = []
    if plan.kind == "echo":
        rows.append(("loop", g2h.sent, g2h.received,
                     {**reinit, **port_g2h, **port_h2g, **guest_h2g}))
    elif plan.kind == "console":
        rows.append(("g2h", g2h.sent, console_bytes, {**reinit, **port_g2h}))
    else:
        assert host is not None
        sent = g2h.sent + (events.aliased_bytes if plan.role == "hostile-guest" else 0)
        if plan.kind == "framed":
            # The backend counts what it could not send in frame bytes (headers included):
            # the payload lost with them is what is left, at most those bytes and the
            # fragment of a frame cut off.
            unsent = {"backend:unsent-in-frames": led["from_guest"]["delivered"]
                      - g2h.received}
        else:
            unsent = {f"backend:{r}": n for r, n in backend["bytes_dropped_unsent"].items()}
        rows.append(("g2h", sent, g2h.received, {**reinit, **port_g2h, **unsent}))
        rows.append(("h2g", h2g.sent, h2g.received,
                     {"backend:peer-cut-off": backend["peer_bytes_dropped"],
                      "backend:stale": backend["stale_bytes"], **port_h2g, **guest_h2g}))
    out = []
    for direction, sent, received, dropped in rows:
        dropped = {k: v for k, v in dropped.items() if v}
        out.append({"port": plan.id, "kind": plan.kind, "role": plan.role,
                    "direction": direction, "sent": sent, "received": received,
                    "dropped": dropped,
                    "unaccounted": sent - received - sum(dropped.values())})
    return out


# ------------------------------------------------------------------------ the soak


@dataclass
class Options:
    duration: float
    epoch: float
    sample: float
    seed: int
    max_rss_growth_mb: float = MAX_RSS_GROWTH_MB
    max_fd_growth: int = MAX_FD_GROWTH


class Soak:
    def __init__(self, d: DaemonChild, opts: Options, tcp_port: int) -> None:
        self.d, self.opts, self.tcp_port = d, opts, tcp_port
        self.rng = random.Random(opts.seed)
        self.events = Events()
        self.flows = {p.id: (Flow(), Flow()) for p in PLAN}  # (g2h, h2g)
        self.guest = Guest(random.Random(self.rng.random()))
        self.hosts: dict[int, HostPeer] = {}
        self.samples: list[dict[str, float]] = []
        self.quiet_samples: list[dict[str, float]] = []
        self.failures: list[str] = []
        self.reload_port = False
        self.rotated: list[Path] = []
        self.last_checks: list[Check] = []
        self.console_seen = 0  # console log bytes hashed so far
        self.responsive = False  # the daemon answered at the end
        self.final_stats: dict[str, Any] | None = None
        self.t0 = self.t_epoch = time.monotonic()

    # -------------------------------------------------------------- the daemon

    async def ask(self, cmd: str) -> Any:
        """One admin request: an answer within 10 s, or the daemon is hung."""
        path = str(self.d.dir / "ctl.sock")
        try:
            reply = await trio.to_thread.run_sync(
                lambda: admin.request(path, {"cmd": cmd}, timeout=10.0))
        except (OSError, ValueError) as e:
            raise SoakFailure(f"the daemon did not answer `ctl {cmd}`: {e!r}") from None
        if not reply.get("ok"):
            raise SoakFailure(f"ctl {cmd}: {reply}")
        return reply["result"]

    def sample(self) -> dict[str, float]:
        rss, anon = memory_mb(self.d.pid, ("VmRSS", "RssAnon"))
        return {"t": round(time.monotonic() - self.t0, 1), "rss_MB": rss, "anon_MB": anon,
                "fds": open_fds(self.d.pid)}

    async def sampler(self) -> None:
        while True:
            if not self.d.alive():
                raise SoakFailure(f"the daemon died: exit status {self.d.proc.returncode}")
            self.samples.append(self.sample())
            await trio.sleep(self.opts.sample)

    def console_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in [*self.rotated, self.d.dir / "console.log"]
                        if p.exists())

    async def reload(self) -> None:
        """Rotate the console log, add or remove port 8 in the config, SIGHUP; wait until
        the daemon has it."""
        log = self.d.dir / "console.log"
        if log.exists():
            self.rotated.append(log.rename(self.d.dir / f"console.log.{len(self.rotated)}"))
        self.reload_port = not self.reload_port
        (self.d.dir / "daemon.toml").write_text(
            config(self.d.dir, self.tcp_port, self.reload_port))
        os.kill(self.d.pid, signal.SIGHUP)
        with trio.fail_after(PHASE_TIMEOUT):
            while (RELOAD_PORT in {p["id"] for p in await self.ask("ports")}
                   ) != self.reload_port:
                await trio.sleep(0.05)
        self.events.reloads += 1

    # -------------------------------------------------------------- checks

    async def checks(self) -> list[Check]:
        stats = await self.ask("stats")
        console = len(self.console_bytes())
        out = device_checks(stats, self.events)
        for p in PLAN:
            out += port_checks(p, stats["ports"][str(p.id)], self.guest.totals(p.id),
                               self.hosts.get(p.id), console, self.events)
        return out

    async def quiesce(self, epoch: int, only: Callable[[Check], bool] | None = None) -> None:
        """Until every check (or those `only` picks) holds twice in a row with the receivers'
        counts unchanged."""
        deadline = trio.current_time() + QUIESCE_TIMEOUT
        before: tuple[Any, ...] | None = None
        while True:
            checks = [c for c in await self.checks() if only is None or only(c)]
            # Only the ports at rest must stop moving: the others carry traffic meanwhile.
            watched = {p.id for p in PLAN if only is None or p.role == "clean"}
            now = (tuple((c.left, c.right) for c in checks),
                   tuple(f.received for pid, pair in self.flows.items() if pid in watched
                         for f in pair))
            if all(c.ok for c in checks) and now == before:
                self.last_checks = checks
                return
            before = now
            if trio.current_time() > deadline:
                self.last_checks = checks
                bad = "; ".join(f"port {c.port}: {c.what}: {c.left} != {c.right}"
                                for c in checks if not c.ok)
                raise SoakFailure(f"epoch {epoch}: not quiescent after {QUIESCE_TIMEOUT:.0f} "
                                  f"s (a hang, or bytes unaccounted): {bad}")
            await trio.sleep(0.2)

    # -------------------------------------------------------------- epochs

    async def epoch(self, epoch: int, ports: dict[int, GuestPort], nursery: trio.Nursery,
                    kind: str) -> None:
        """Traffic, a reload; then, for a disruption under load, the clean ports and port 7's
        abuse come to rest, the guest's processes stop and the disruption is done while the
        host peers go on; the senders stop; quiescence."""
        calm_event, stop_event = trio.Event(), trio.Event()
        calm, stop = calm_event.is_set, stop_event.is_set
        guest = self.guest
        readers: list[trio.CancelScope] = []

        async def read(port: GuestPort, flow: Flow) -> None:
            with trio.CancelScope() as scope:
                readers.append(scope)
                await guest.read(port, flow)

        with trio.fail_after(self.opts.epoch + 4 * PHASE_TIMEOUT):
            async with trio.open_nursery() as reader_tasks:
                for p in PLAN:
                    g2h, h2g = self.flows[p.id]
                    reader_tasks.start_soon(read, ports[p.id], g2h if p.kind == "echo" else h2g)
                async with trio.open_nursery() as host_tasks:
                    for p in PLAN:
                        if p.peer:
                            host_tasks.start_soon(self.host_side, p,
                                                  calm if p.role == "clean" else stop, nursery)
                    async with trio.open_nursery() as guest_tasks:
                        for p in PLAN:
                            port, (g2h, _) = ports[p.id], self.flows[p.id]
                            guest_tasks.start_soon(guest.write_until, port, g2h,
                                                   calm if p.role == "clean" else stop)
                            if p.role == "guest-flaps":
                                guest_tasks.start_soon(guest.flap, port, self.events, stop)
                            if p.role == "hostile-guest":
                                guest_tasks.start_soon(guest.abuse, port, self.events, calm)
                        await trio.sleep(self.rng.uniform(0.3, 0.7) * self.opts.epoch)
                        await self.reload()
                        await trio.sleep_until(self.t_epoch + self.opts.epoch)
                        calm_event.set()
                        if kind in UNDER_LOAD:
                            await self.quiesce(epoch, at_rest)
                            if kind == "device-reset":
                                await self.break_ring()
                            guest_tasks.cancel_scope.cancel()  # the guest's processes stop
                        else:
                            stop_event.set()
                    if kind in UNDER_LOAD:
                        for scope in readers:
                            scope.cancel()
                        await self.disrupt(kind)
                        stop_event.set()
                await self.quiesce(epoch)
                reader_tasks.cancel_scope.cancel()
        log = self.console_bytes()
        self.flows[0][0].receive(log[self.console_seen:])
        self.console_seen = len(log)
        for g2h, h2g in self.flows.values():
            g2h.close_epoch(epoch)
            h2g.close_epoch(epoch)
        self.quiet_samples.append(self.sample())
        self.events.epochs += 1

    async def break_ring(self) -> None:
        """Port 7's guest breaks its tx ring (a head out of range, which its writes after it
        cannot undo as they would an avail idx) while it writes on: the daemon stops that
        ring only; what is in it is lost at the reset."""
        assert self.guest.driver is not None
        fe = self.guest.driver.fe
        index = tx_queue(7)
        q = fe.queue(index)
        q.publish(q.size)
        fe.kick(index, force=True)
        await fe.wait_err(index, timeout=PHASE_TIMEOUT)
        self.events.rings_broken += 1
        await trio.sleep(0.2)

    async def host_side(self, p: PortPlan, stop: Callable[[], bool],
                        nursery: trio.Nursery) -> None:
        host = self.hosts[p.id]
        if p.role not in ("host-flaps", "hostile-host"):
            await host.write_until(stop)
            return
        while not stop():
            until = trio.current_time() + self.rng.uniform(0.3, 1.5)

            def connection_done(until: float = until) -> bool:
                return stop() or trio.current_time() > until

            await host.write_until(connection_done)
            if p.role == "hostile-host":
                bad = MALFORMED_FRAMES[self.events.malformed_frames % len(MALFORMED_FRAMES)]
                await host.hang_up(malformed=bad[0])
                self.events.malformed_frames += 1
            else:
                await host.hang_up()
                self.events.host_flaps += 1
            await trio.sleep(self.rng.uniform(0.05, 0.3))
            await host.connect(nursery)

    async def disrupt(self, kind: str) -> bool:
        """One disruption between epochs; True when the front end must reconnect."""
        self.events.disruptions[kind] += 1
        driver = self.guest.driver
        assert driver is not None
        if kind == "frontend-reconnect":
            return True
        with trio.fail_after(PHASE_TIMEOUT):
            if kind == "device-reset":
                await driver.reinit(reset_device=True)
            elif kind == "guest-reinit":
                await driver.reinit()
            else:
                for p in PLAN:
                    port = driver.port(p.id)
                    if p.kind != "console":
                        await port.close()
        return False

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sampler)
            for p in PLAN:
                if p.peer:
                    where: str | tuple[str, int] = (
                        ("127.0.0.1", self.tcp_port) if p.kind == "tcp"
                        else str(self.d.dir / f"port{p.id}.sock"))
                    g2h, h2g = self.flows[p.id]
                    self.hosts[p.id] = HostPeer(p, where, random.Random(self.rng.random()),
                                                h2g, g2h)
                    await self.hosts[p.id].connect(nursery)
            deadline = time.monotonic() + self.opts.duration
            epoch = 0
            while True:
                async with open_frontend(str(self.d.dir / "vu.sock"), mem_size=GUEST_RAM) as fe:
                    driver = ConsoleDriver(fe, max_ports=MAX_PORTS)
                    await driver.probe()
                    self.guest.attach(fe, driver)
                    async with trio.open_nursery() as guest_tasks:
                        guest_tasks.start_soon(driver.run)
                        reconnect = False
                        while not reconnect:
                            self.t_epoch = trio.current_time()
                            ports = await self.guest.open_ports()
                            kind = DISRUPTIONS[epoch % len(DISRUPTIONS)]
                            await self.epoch(epoch, ports, nursery, kind)
                            epoch += 1
                            if time.monotonic() >= deadline and epoch >= 2:
                                await self.finish()
                                nursery.cancel_scope.cancel()
                                return
                            if kind not in UNDER_LOAD:
                                reconnect = await self.disrupt(kind)
                        guest_tasks.cancel_scope.cancel()
                with trio.fail_after(PHASE_TIMEOUT):  # the daemon notices the front end left
                    while (await self.ask("status"))["frontend_connected"]:
                        await trio.sleep(0.05)

    async def finish(self) -> None:
        status = await self.ask("status")
        if status["pid"] != self.d.pid:
            raise SoakFailure(f"the admin socket answers for pid {status['pid']}")
        self.final_stats = await self.ask("stats")
        self.responsive = True

    # -------------------------------------------------------------- the report

    def report(self) -> dict[str, Any]:
        stats = self.final_stats
        rows = []
        if stats is not None:
            console = len(self.console_bytes())
            for p in PLAN:
                rows += accounts(p, stats["ports"][str(p.id)], self.guest.totals(p.id),
                                 self.hosts.get(p.id), self.flows[p.id], console, self.events)
        for p in PLAN:
            g2h, h2g = self.flows[p.id]
            for r in rows:
                if r["port"] == p.id:
                    flow = h2g if r["direction"] == "h2g" else g2h
                    r["epochs_equal"], r["epochs_differ"] = flow.epochs_equal, flow.epochs_differ
        failures = list(self.failures)
        if not self.responsive:
            failures.append("the soak did not reach its end with the daemon answering")
        failures += [f"port {c.port}: {c.what}: {c.left} != {c.right}"
                     for c in self.last_checks if not c.ok]
        for r in rows:
            if r["unaccounted"] and r["kind"] != "framed":
                failures.append(f"port {r['port']} {r['direction']}: {r['unaccounted']} bytes "
                                "unaccounted")
            if r["role"] == "clean" and (r["dropped"] or r["epochs_differ"]):
                failures.append(f"port {r['port']} {r['direction']} (clean): dropped "
                                f"{r['dropped']}, sha256 differs in epochs {r['epochs_differ']}")
        framed = [r for r in rows if r["kind"] == "framed" and r["direction"] == "g2h"]
        if framed and stats is not None:
            wire = sum(stats["ports"]["6"]["backend"]["bytes_dropped_unsent"].values())
            lost = framed[0]["dropped"].get("backend:unsent-in-frames", 0)
            if not 0 <= lost <= wire + self.hosts[6].partial_at_cut:
                failures.append(f"port 6 g2h: {lost} payload bytes lost, more than the "
                                f"{wire} frame bytes dropped unsent")
        growth = self.growth()
        bounds = {"rss_MB": self.opts.max_rss_growth_mb, "fds": self.opts.max_fd_growth}
        if growth["rss_MB"] > bounds["rss_MB"]:
            failures.append(f"VmRSS grew {growth['rss_MB']:.1f} MB from the first quiescence "
                            f"to the last (bound {bounds['rss_MB']:g} MB)")
        if growth["fds"] > bounds["fds"]:
            failures.append(f"open fds grew by {growth['fds']} from the first quiescence to the "
                            f"last (bound {bounds['fds']})")
        return {"seed": self.opts.seed, "duration_s": round(time.monotonic() - self.t0, 1),
                "daemon_alive": self.d.alive(), "responsive": self.responsive,
                "events": _events(self.events),
                "ports": rows, "memory": self.memory(), "growth": growth,
                "bounds": bounds,
                "samples": self.samples, "quiescent_samples": self.quiet_samples,
                "failures": failures, "ok": not failures}

    def growth(self) -> dict[str, float]:
        q = self.quiet_samples
        if len(q) < 2:
            return {"rss_MB": 0.0, "anon_MB": 0.0, "fds": 0}
        return {"rss_MB": round(q[-1]["rss_MB"] - q[0]["rss_MB"], 1),
                "anon_MB": round(q[-1]["anon_MB"] - q[0]["anon_MB"], 1),
                "fds": q[-1]["fds"] - q[0]["fds"]}

    def memory(self) -> dict[str, dict[str, float]]:
        out = {}
        for key in ("rss_MB", "anon_MB", "fds"):
            values = [s[key] for s in self.samples if not math.isnan(s[key])]
            if values:
                out[key] = {"min": min(values), "max": max(values), "last": values[-1]}
        return out


class SoakFailure(Exception):
    """The daemon died, hung, or a step could not be done: the soak stops here."""


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def _events(e: Events) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(e).items()}


# ------------------------------------------------------------------------ output


def table(report: dict[str, Any]) -> str:
    head = ["port", "kind", "role", "dir", "sent", "received", "dropped (by reason)",
            "unaccounted", "sha256 per epoch"]
    rows = [head]
    for r in report["ports"]:
        sha = (f"{r['epochs_equal']} equal" + (f", differ in {r['epochs_differ']}"
                                               if r["epochs_differ"] else "")
               if r["role"] == "clean" else "-")
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items())) or "0"
        rows.append([str(r["port"]), r["kind"], r["role"], r["direction"], str(r["sent"]),
                     str(r["received"]), dropped, str(r["unaccounted"]), sha])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    m = report["memory"]
    for key, what in (("rss_MB", "daemon VmRSS MB"), ("anon_MB", "daemon RssAnon MB"),
                      ("fds", "daemon open fds")):
        if key in m:
            lines.append(f"{what}: min {m[key]['min']:g}, max {m[key]['max']:g}, "
                         f"last {m[key]['last']:g}")
    g = report["growth"]
    b = report["bounds"]
    lines.append(f"growth first to last quiescence: VmRSS {g['rss_MB']:+g} MB, RssAnon "
                 f"{g['anon_MB']:+g} MB, fds {g['fds']:+d} (bounds {b['rss_MB']:g} MB, "
                 f"{b['fds']})")
    ev = report["events"]
    lines.append("events: " + ", ".join(
        f"{k} {v}" if not isinstance(v, dict) else
        f"{k} {' '.join(f'{a}={b}' for a, b in v.items())}" for k, v in ev.items()))
    alive = report["daemon_alive"] and report["responsive"]
    lines.append(f"daemon alive and answering at the end: {'yes' if alive else 'no'}")
    lines.append("failures: " + ("none" if not report["failures"] else
                                 "\n  " + "\n  ".join(report["failures"])))
    return "\n".join(lines)


def main(args: Any) -> int:
    opts = Options(duration=args.duration, epoch=args.epoch, sample=args.sample,
                   seed=args.seed if args.seed is not None else random.randrange(1 << 32),
                   max_rss_growth_mb=MAX_RSS_GROWTH_MB if args.max_rss_growth_mb is None
                   else args.max_rss_growth_mb,
                   max_fd_growth=MAX_FD_GROWTH if args.max_fd_growth is None
                   else args.max_fd_growth)
    tcp_port = _free_tcp_port()
    sockets = ["vu.sock", "ctl.sock", *(f"port{p.id}.sock" for p in PLAN
                                        if p.kind in ("unix", "framed"))]
    with daemon_child(lambda tmp: config(tmp, tcp_port, False), sockets,
                      prefix="vhostser-soak-") as d:
        soak = Soak(d, opts, tcp_port)
        try:
            trio.run(soak.run)
        except* SoakFailure as group:
            soak.failures += [str(e) for e in _leaves(group)]
        except* (trio.TooSlowError, ConsoleDriverError, PortGoneError, OSError) as group:
            soak.failures += [f"{type(e).__name__} (a hang, or the daemon went away): "
                              f"{e}\n{''.join(traceback.format_exception(e)[-6:])}"
                              for e in _leaves(group)]
        if not d.alive():
            soak.failures.append(f"the daemon died: exit status {d.proc.returncode}; its "
                                 f"log ends:\n{d.log()[-2000:]}")
        report = soak.report()
        report["daemon_log_tail"] = d.log()[-4000:]
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1
