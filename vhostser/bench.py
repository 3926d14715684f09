"""`vhostser bench`: throughput, latency, CPU and memory of the data path, as numbers to compare.

Every scenario has a guest side and a host side. The host side (peers on the ports' sockets,
this process's threads) is the same code whatever the guest is:

* `vhostser bench qemu`: the e2e rig (../shared/e2e) boots its Linux guest under QEMU once
  with QEMU's own in-process virtio-serial (`virtserialport`s and a `virtconsole` on socket
  chardevs: the reference) and once against a vhostser daemon (a child process), with the same
  guest scripts (the rig's tput_g2h, tput_h2g, rtt; tests/guest/bench_*.sh);
* `vhostser bench local`: no QEMU, no TCG: the testing front end and console driver in a
  thread of this process (memfd guest RAM, eventfds, SCM_RIGHTS) run the same guest programs
  against the daemon.

Scenarios (`--which`): g2h, h2g (one port, one direction), rtt (1-byte round trips), ports8
(8 ports, both directions at once), console (the guest writes to hvc0), idle (31 ports
configured: wakeups and memory idle, then under an 8-port load; vhostser only).

CPU is utime+stime of a process from /proc/PID/stat (all its threads), sampled when a
measured transfer starts and when it ends; wakeups are the context switches of all the
daemon's threads (/proc/PID/task/*/status); memory is VmRSS and VmHWM (/proc/PID/status).
Every figure is taken per run; the report gives medians, and the vhostser/QEMU ratio of each
figure both have.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .testing.process import DaemonChild, context_switches, cpu_seconds, daemon_child, memory_mb

if TYPE_CHECKING:
    from .testing.console_driver import ConsoleDriver, GuestPort

SCENARIOS = ("g2h", "h2g", "rtt", "ports8", "console", "idle")
GUEST_TESTS = Path(__file__).resolve().parents[1] / "tests" / "guest"
GIB = 1 << 30
MIB = 1 << 20
# A settling pause before idle windows: the guest's last writes and the daemon's bookkeeping
# after the ports opened are not idleness.
_SETTLE_S = 1.0


def port_name(k: int) -> str:
    return f"org.vhostser.bench.{k}"


# ------------------------------------------------------------------------ /proc


class Meter:
    """The CPU seconds of named processes ("daemon", "qemu"), read together."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snap(self) -> dict[str, float]:
        return {who: cpu_seconds(pid) for who, pid in self.pids.items()}

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        out = {who: after[who] - before[who] for who in before}
        if "qemu" in out:  # what the whole VM costs: QEMU's own, or QEMU's and the daemon's
            out["total"] = sum(out.values())
        return out


# ------------------------------------------------------------------------ results


@dataclass
class Result:
    """One scenario on one data path: figure name -> one value per run."""

    scenario: str
    who: str  # "qemu" (the reference), "vhostser" (under QEMU), "vhostser-local"
    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for name, v in values.items():
            self.figures.setdefault(name, []).append(v)

    def median(self, name: str) -> float:
        return statistics.median(self.figures[name])

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "who": self.who,
                "figures": {name: {"median": _round(statistics.median(v)),
                                   "min": _round(min(v)), "max": _round(max(v)),
                                   "samples": [_round(x) for x in v]}
                            for name, v in self.figures.items()}}


def _round(x: float) -> float:
    return round(x, 4 if abs(x) < 10 else 1)


# What each figure is and whether more is better (for the table's ratio column).
FIGURES: dict[str, tuple[str, bool]] = {
    "MBps": ("MB/s", True),
    "aggregate_MBps": ("MB/s, 8 ports, both ways", True),
    "slowest_share": ("slowest port / fastest", True),
    "p50_us": ("µs round trip p50", False),
    "p99_us": ("µs round trip p99", False),
    "daemon_cpu_s_per_GiB": ("daemon CPU s/GiB", False),
    "qemu_cpu_s_per_GiB": ("QEMU CPU s/GiB (guest incl.)", False),
    "total_cpu_s_per_GiB": ("QEMU+daemon CPU s/GiB", False),
    "daemon_cpu_s_per_1k": ("daemon CPU s/1000 round trips", False),
    "qemu_cpu_s_per_1k": ("QEMU CPU s/1000 round trips", False),
    "total_cpu_s_per_1k": ("QEMU+daemon CPU s/1000 round trips", False),
    "wakeups_per_s": ("daemon wakeups/s idle, 31 ports", False),
    "rss_idle_MB": ("daemon VmRSS idle MB, 31 ports", False),
    "rss_load_MB": ("daemon VmRSS peak under load MB", False),
    "hwm_MB": ("daemon VmHWM MB after load", False),
    "anon_idle_MB": ("daemon RssAnon idle MB (no guest RAM)", False),
    "anon_load_MB": ("daemon RssAnon MB after load", False),
}


def ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """vhostser median / QEMU median of every figure both have, per scenario."""
    out = []
    ref = {r.scenario: r for r in results if r.who == "qemu"}
    for r in results:
        if r.who != "vhostser" or r.scenario not in ref:
            continue
        for name in r.figures:
            if name in ref[r.scenario].figures and ref[r.scenario].median(name) > 0:
                out.append({"scenario": r.scenario, "figure": name,
                            "ratio": round(r.median(name) / ref[r.scenario].median(name), 3)})
    return out


def table(results: Sequence[Result]) -> str:
    """Every figure's median, one row each; with the reference: QEMU, vhostser and ratio."""
    whos = [w for w in ("qemu", "vhostser", "vhostser-local") if any(r.who == w for r in results)]
    by = {(r.scenario, r.who): r for r in results}
    ratio = {(x["scenario"], x["figure"]): x["ratio"] for x in ratios(results)}
    head = ["scenario", "figure", *whos] + (["ratio"] if "qemu" in whos else [])
    rows = [head]
    for sc in SCENARIOS:
        names = [n for n in FIGURES if any(n in r.figures for r in results if r.scenario == sc)]
        for name in names:
            row = [sc, FIGURES[name][0]]
            for w in whos:
                r = by.get((sc, w))
                row.append(_fmt(r.median(name)) if r and name in r.figures else "-")
            if "qemu" in whos:
                x = ratio.get((sc, name))
                row.append(f"x{x:.2f}" + ("" if FIGURES[name][1] else " (lower is better)")
                           if x is not None else "-")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _fmt(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


# ------------------------------------------------------------------------ host side


class GuestRun(Protocol):
    """A started guest: rig.Guest under QEMU, or LocalGuest."""

    pid: int | None

    def wait_for_line(self, pattern: str, timeout: float = ...) -> object: ...
    def wait(self, timeout: float | None = ...) -> Any: ...
    def kill(self) -> None: ...
    def log(self) -> str: ...


@dataclass
class Sizes:
    run_bytes: int  # g2h, h2g: bytes per run
    port_bytes: int  # ports8, idle: bytes per port per direction per run
    console_bytes: int  # console: bytes per run
    runs: int
    rtt_n: int
    idle_s: float


def _connect(path: Path, timeout: float = 30) -> socket.socket:
    """Connect to a port's unix socket (retrying while QEMU has not made it yet)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    # A scenario that stalls (a lost byte, a guest that died) ends as an error, not a hang.
    s.settimeout(120)
    return s


def _recv_exact(s: socket.socket, n: int, buf: memoryview) -> bytes:
    """Read `n` bytes; returns the last byte (b"" for n == 0)."""
    last = b""
    while n:
        got = s.recv_into(buf[: min(n, len(buf))])
        if not got:
            raise EOFError(f"the port's socket closed {n} bytes short")
        last = bytes(buf[got - 1: got])
        n -= got
    return last


def _cpu_figures(spent: dict[str, float], per: float, unit: str) -> dict[str, float]:
    return {f"{who}_cpu_s_per_{unit}": s / per for who, s in spent.items()}


def host_g2h(result: Result, peer: socket.socket, meter: Meter, run_bytes: int,
             runs: int) -> None:
    """Per run: read `run_bytes`; time and CPU from the first byte to the last."""
    buf = memoryview(bytearray(1 << 20))
    for _ in range(runs):
        first = peer.recv_into(buf[:1])
        if not first:
            raise EOFError("the port's socket closed before the run")
        t0, c0 = time.perf_counter(), meter.snap()
        _recv_exact(peer, run_bytes - 1, buf)
        t1, c1 = time.perf_counter(), meter.snap()
        result.add(MBps=run_bytes / (t1 - t0) / 1e6,
                   **_cpu_figures(Meter.spent(c0, c1), run_bytes / GIB, "GiB"))


def host_h2g(result: Result, peer: socket.socket, meter: Meter, run_bytes: int,
             runs: int) -> None:
    """Per run: wait for the guest's "R", send `run_bytes`, wait for its "A"."""
    chunk = b"\x5a" * (1 << 20)
    buf = memoryview(bytearray(1))
    for _ in range(runs):
        if _recv_exact(peer, 1, buf) != b"R":
            raise RuntimeError("h2g: expected the guest's R")
        t0, c0 = time.perf_counter(), meter.snap()
        left = run_bytes
        while left:
            n = min(left, len(chunk))
            peer.sendall(chunk if n == len(chunk) else chunk[:n])
            left -= n
        if _recv_exact(peer, 1, buf) != b"A":
            raise RuntimeError("h2g: expected the guest's A")
        t1, c1 = time.perf_counter(), meter.snap()
        result.add(MBps=run_bytes / (t1 - t0) / 1e6,
                   **_cpu_figures(Meter.spent(c0, c1), run_bytes / GIB, "GiB"))


def host_rtt(result: Result, peer: socket.socket, meter: Meter, guest: GuestRun, n: int,
             runs: int, warmup: int = 50) -> None:
    """1-byte ping-pong against the guest's echo loop: per run `warmup` untimed round trips,
    then `n` timed; p50, p99 and CPU per 1000."""
    # Bytes sent before the guest opens the port belong to no session and vhostser drops
    # them (QEMU leaves them in the socket): ping only once the guest's echo loop runs.
    if not guest.wait_for_line(r"^E2E-RTT-READY", 120):
        raise RuntimeError("the guest's echo loop did not start")
    buf = memoryview(bytearray(1))
    for _ in range(runs):
        for _ in range(warmup):
            peer.sendall(b"x")
            _recv_exact(peer, 1, buf)
        lat = []
        c0 = meter.snap()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            peer.sendall(b"x")
            _recv_exact(peer, 1, buf)
            lat.append((time.perf_counter_ns() - t0) / 1000)
        c1 = meter.snap()
        lat.sort()
        result.add(p50_us=lat[len(lat) // 2], p99_us=lat[min(len(lat) - 1, len(lat) * 99 // 100)],
                   **_cpu_figures(Meter.spent(c0, c1), n / 1000, "1k"))
    peer.close()  # the guest's echo loop ends at EOF


def _port_run(peer: socket.socket, nbytes: int, out: list[float],
              errors: list[BaseException]) -> None:
    """One port's run of bench_ports.sh (a thread): "G", then both ways at once; the guest's
    "A" follows its last byte once it has read all of ours. Seconds to `out`."""
    try:
        sender = threading.Thread(target=lambda: peer.sendall(b"\0" * nbytes), daemon=True)
        t0 = time.perf_counter()
        peer.sendall(b"G")
        sender.start()
        last = _recv_exact(peer, nbytes + 1, memoryview(bytearray(1 << 20)))
        sender.join()
        if last != b"A":
            raise RuntimeError("ports: expected the guest's A after its bytes")
        out.append(time.perf_counter() - t0)
    except BaseException as e:
        errors.append(e)


def await_opens(peers: list[socket.socket]) -> None:
    """bench_ports.sh writes "O" on each port once it has it open."""
    buf = memoryview(bytearray(1))
    for p in peers:
        if _recv_exact(p, 1, buf) != b"O":
            raise RuntimeError("ports: expected the guest's O")


def host_ports(result: Result, peers: list[socket.socket], meter: Meter, nbytes: int,
               runs: int) -> None:
    """Per run, every port at once, `nbytes` each way: aggregate MB/s over the whole run, and
    the slowest port's MB/s as a share of the fastest's."""
    for _ in range(runs):
        times: list[list[float]] = [[] for _ in peers]
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_port_run, args=(p, nbytes, t, errors), daemon=True)
                   for p, t in zip(peers, times, strict=True)]
        t0, c0 = time.perf_counter(), meter.snap()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t1, c1 = time.perf_counter(), meter.snap()
        if errors:
            raise errors[0]
        moved = 2 * nbytes * len(peers)
        per_port = [2 * nbytes / t[0] for t in times]
        result.add(aggregate_MBps=moved / (t1 - t0) / 1e6,
                   slowest_share=min(per_port) / max(per_port),
                   **_cpu_figures(Meter.spent(c0, c1), moved / GIB, "GiB"))


def host_idle(result: Result, peers: list[socket.socket], meter: Meter, pid: int,
              sizes: Sizes) -> None:
    """31 ports, the guest idle with 8 of them open: the daemon's wakeups per second over
    `runs` windows of `idle_s` and its RSS; then an 8-port load (host_ports) and its RSS."""
    await_opens(peers)
    time.sleep(_SETTLE_S)
    for _ in range(sizes.runs):
        n0, t0 = context_switches(pid), time.perf_counter()
        time.sleep(sizes.idle_s)
        n1, t1 = context_switches(pid), time.perf_counter()
        rss, anon = memory_mb(pid, ("VmRSS", "RssAnon"))
        result.add(wakeups_per_s=(n1 - n0) / (t1 - t0), rss_idle_MB=rss, anon_idle_MB=anon)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], memory_mb(pid)[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        host_ports(Result("idle-load", result.who), peers, meter, sizes.port_bytes, sizes.runs)
    finally:
        done.set()
        sampler.join()
    rss, hwm, anon = memory_mb(pid, ("VmRSS", "VmHWM", "RssAnon"))
    result.add(rss_load_MB=max(peak[0], rss), hwm_MB=hwm, anon_load_MB=anon)


# ------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Spec:
    """What a scenario needs of the device and which ports the host side talks to."""

    guest_test: str  # the rig's guest-tests/NAME.sh or tests/guest/NAME.sh
    ports: int  # unix stream ports 1..ports
    max_ports: int
    console: str | None = None  # port 0: "stream" (a console on a unix socket), "log"
    peer_ports: int | None = None  # the ports with a host peer (default all)

    @property
    def sockets(self) -> list[str]:
        if self.console == "stream":
            return ["console.sock"]
        n = self.ports if self.peer_ports is None else self.peer_ports
        return [f"port{k}.sock" for k in range(1, n + 1)]


SPECS = {
    "g2h": Spec("tput_g2h", 1, 2),
    "h2g": Spec("tput_h2g", 1, 2),
    "rtt": Spec("rtt", 1, 2),
    "ports8": Spec("bench_ports", 8, 9),
    "console": Spec("bench_console", 0, 2, console="stream"),
    "idle": Spec("bench_ports", 30, 31, console="log", peer_ports=8),
}


def guest_params(sc: str, sizes: Sizes, bs: int) -> dict[str, object]:
    one: dict[str, object] = {"port": port_name(1)}
    if sc in ("g2h", "h2g"):
        return {**one, "bs": bs, "count": sizes.run_bytes // bs, "runs": sizes.runs}
    if sc == "rtt":
        return one
    if sc == "console":
        return {"bs": bs, "count": sizes.console_bytes // bs, "runs": sizes.runs}
    return {"bs": bs, "count": sizes.port_bytes // bs, "runs": sizes.runs, "nports": 8}


def host_side(sc: str, result: Result, peers: list[socket.socket], meter: Meter,
              guest: GuestRun, sizes: Sizes, daemon_pid: int | None) -> None:
    if sc == "g2h":
        host_g2h(result, peers[0], meter, sizes.run_bytes, sizes.runs)
    elif sc == "h2g":
        host_h2g(result, peers[0], meter, sizes.run_bytes, sizes.runs)
    elif sc == "rtt":
        host_rtt(result, peers[0], meter, guest, sizes.rtt_n, sizes.runs)
    elif sc == "console":
        host_g2h(result, peers[0], meter, sizes.console_bytes, sizes.runs)
    elif sc == "ports8":
        await_opens(peers)
        host_ports(result, peers, meter, sizes.port_bytes, sizes.runs)
    else:
        assert daemon_pid is not None
        host_idle(result, peers, meter, daemon_pid, sizes)


def drive(sc: str, who: str, guest: GuestRun, peers: list[socket.socket],
          pids: dict[str, int], sizes: Sizes, daemon_pid: int | None) -> Result:
    """Run the host side against a started guest, then check that the guest's side passed."""
    result = Result(sc, who)
    try:
        host_side(sc, result, peers, Meter(pids), guest, sizes, daemon_pid)
    except Exception as e:
        guest.kill()
        raise RuntimeError(f"{who} {sc}: {e!r}; the guest's log:\n{guest.log()[-3000:]}") from e
    finally:
        for p in peers:
            p.close()
    r = guest.wait()
    if not r.passed:
        raise RuntimeError(f"{who} {sc}: the guest's side failed:\n{r.log[-3000:]}")
    return result


# ------------------------------------------------------------------------ the daemon


def daemon_config(tmp: Path, spec: Spec) -> str:
    lines = ['[vm]', 'name = "bench"', f'socket = "{tmp}/vu.sock"', 'admin_socket = ""',
             f"max_ports = {spec.max_ports}"]
    if spec.console == "stream":
        # A console never holds the guest: what its peer is too slow for is dropped, so
        # give the peer room for a whole burst of hvc writes.
        lines += ["[[port]]", "id = 0", "console = true",
                  f'backend = {{ type = "unix", path = "{tmp}/console.sock", mode = "stream", '
                  'peer_queue = 16777216 }']
    elif spec.console == "log":
        lines += ["[[port]]", "id = 0", "console = true",
                  f'backend = {{ type = "console", path = "{tmp}/console.log", '
                  f'socket = "{tmp}/console-readers.sock" }}']
    for k in range(1, spec.ports + 1):
        lines += ["[[port]]", f"id = {k}", f'name = "{port_name(k)}"',
                  f'backend = {{ type = "unix", path = "{tmp}/port{k}.sock", mode = "stream" }}']
    return "\n".join(lines) + "\n"


@contextmanager
def bench_daemon(spec: Spec) -> Iterator[DaemonChild]:
    """`vhostser run` (a child process) on the scenario's config, its sockets made."""
    with daemon_child(lambda tmp: daemon_config(tmp, spec), ["vu.sock", *spec.sockets],
                      prefix="vhostser-bench-") as d:
        yield d


# ------------------------------------------------------------------------ local guest


@dataclass
class LocalResult:
    passed: bool
    log: str


GuestProgram = Callable[["ConsoleDriver", "LocalGuest"], Awaitable[None]]


class LocalGuest:
    """The testing front end and console driver in a thread of their own (trio), running a
    guest program that mirrors the guest script of the scenario under QEMU."""

    pid: int | None = None

    def __init__(self, vu_socket: Path, max_ports: int, program: GuestProgram) -> None:
        self.vu_socket, self.max_ports, self.program = vu_socket, max_ports, program
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._error = ""
        self._thread = threading.Thread(target=self._main, daemon=True)
        # Set by wait(): the host side is done. Until then the front end stays up after the
        # program returned, as a guest kernel does after its process exited: what the program
        # queued is still the device's to take.
        self._host_done = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    def start(self) -> LocalGuest:
        self._thread.start()
        return self

    def say(self, line: str) -> None:
        """What a guest script prints on its serial console."""
        with self._lock:
            self._lines.append(line)

    def log(self) -> str:
        with self._lock:
            return "\n".join(self._lines) + ("\n" + self._error if self._error else "")

    def wait_for_line(self, pattern: str, timeout: float = 60) -> object:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log(), re.M):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return True

    def wait(self, timeout: float | None = 300) -> LocalResult:
        self._host_done.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.kill()
            self._thread.join()
            self._error = self._error or "the guest program timed out"
        return LocalResult(not self._error, self.log())

    def kill(self) -> None:
        if self._token is not None and self._scope is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException:
            self._error = traceback.format_exc()

    async def _run(self) -> None:
        from .testing import open_frontend
        from .testing.console_driver import ConsoleDriver

        with trio.CancelScope() as scope:
            self._scope, self._token = scope, trio.lowlevel.current_trio_token()
            async with open_frontend(str(self.vu_socket), mem_size=256 << 20) as fe:
                driver = ConsoleDriver(fe, max_ports=self.max_ports)
                await driver.probe()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(driver.run)
                    await self.program(driver, self)
                    await trio.to_thread.run_sync(self._host_done.wait, abandon_on_cancel=True)
                    nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            self._error = "the guest program was stopped"


async def _open(driver: ConsoleDriver, k: int) -> GuestPort:
    port = await driver.wait_port(port_name(k), timeout=30)
    await driver.wait_for(lambda: port.host_connected, timeout=30)
    await port.open()
    return port


_ZEROS = bytes(32 * 1024)


async def _write_zeros(port: GuestPort, n: int) -> None:
    while n:
        k = min(n, len(_ZEROS))
        await port.write_all(memoryview(_ZEROS)[:k], timeout=120)
        n -= k


async def _read_n(port: GuestPort, n: int) -> None:
    while n:
        got = await port.read(min(n, 1 << 20), timeout=120)
        if not got:
            raise EOFError(f"port {port.id}: EOF {n} bytes short")
        n -= len(got)


def local_program(sc: str, sizes: Sizes) -> GuestProgram:
    """The guest side of scenario `sc` for LocalGuest (what the guest script does in QEMU)."""

    async def g2h(driver: ConsoleDriver, guest: LocalGuest) -> None:  # tput_g2h.sh
        port = await _open(driver, 1)
        for _ in range(sizes.runs):
            await _write_zeros(port, sizes.run_bytes)

    async def h2g(driver: ConsoleDriver, guest: LocalGuest) -> None:  # tput_h2g.sh
        port = await _open(driver, 1)
        for _ in range(sizes.runs):
            await port.write_all(b"R")
            await _read_n(port, sizes.run_bytes)
            await port.write_all(b"A")

    async def rtt(driver: ConsoleDriver, guest: LocalGuest) -> None:  # rtt.sh: cat <&3 >&3
        port = await _open(driver, 1)
        guest.say("E2E-RTT-READY")
        while True:
            data = await port.read(4096, timeout=None)
            if not data:  # the host hung up
                return
            await port.write_all(data, timeout=30)

    async def console(driver: ConsoleDriver, guest: LocalGuest) -> None:  # bench_console.sh
        port = await driver.wait_port(0, timeout=30)
        await driver.wait_for(lambda: port.console and port.guest_open, timeout=30)
        for _ in range(sizes.runs):
            await _write_zeros(port, sizes.console_bytes)

    async def ports(driver: ConsoleDriver, guest: LocalGuest) -> None:  # bench_ports.sh
        async def one(k: int) -> None:
            port = await _open(driver, k)
            await port.write_all(b"O")
            for _ in range(sizes.runs):
                await port.read_exactly(1, timeout=None)  # the host's G
                async with trio.open_nursery() as both:
                    both.start_soon(_write_zeros, port, sizes.port_bytes)
                    both.start_soon(_read_n, port, sizes.port_bytes)
                await port.write_all(b"A")
            await port.drain(timeout=30)

        async with trio.open_nursery() as nursery:
            for k in range(1, 9):
                nursery.start_soon(one, k)

    programs: dict[str, GuestProgram] = {"g2h": g2h, "h2g": h2g, "rtt": rtt,
                                         "console": console, "ports8": ports, "idle": ports}
    return programs[sc]


# ------------------------------------------------------------------------ runners


def load_rig(rig_dir: str | None) -> ModuleType:
    """The e2e rig module (../shared/e2e/rig.py next to this checkout by default)."""
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "e2e"
    path = Path(rig_dir or os.environ.get("VHOSTSER_E2E_RIG") or beside_checkout)
    if not (path / "rig.py").exists():
        raise SystemExit(f"vhostser bench qemu: no e2e rig at {path} (--rig DIR)")
    sys.path.insert(0, str(path))
    import rig  # type: ignore[import-not-found]

    return rig  # type: ignore[no-any-return]


def qemu_device_args(workdir: Path, spec: Spec) -> list[str]:
    """QEMU's in-process device with the ports vhostser serves in the same scenario: the same
    names, the same port numbers, each on a socket chardev QEMU listens on."""
    a = ["-device", "virtio-serial-pci,id=vser0"]
    if spec.console:
        a += ["-chardev", f"socket,id=con,path={workdir}/console.sock,server=on,wait=off",
              "-device", "virtconsole,bus=vser0.0,chardev=con,nr=0"]
    for k in range(1, spec.ports + 1):
        a += ["-chardev", f"socket,id=c{k},path={workdir}/port{k}.sock,server=on,wait=off",
              "-device", f"virtserialport,bus=vser0.0,chardev=c{k},nr={k},name={port_name(k)}"]
    return a


def _qemu_guest(rig: ModuleType, sc: str, sizes: Sizes, bs: int, **kw: Any) -> Any:
    return rig.Guest(SPECS[sc].guest_test, params=guest_params(sc, sizes, bs),
                     tests_dirs=[str(GUEST_TESTS)], timeout=900, **kw)


def run_reference(rig: ModuleType, sc: str, sizes: Sizes, bs: int) -> Result:
    """The scenario on QEMU's own virtio-serial."""
    spec = SPECS[sc]
    g = _qemu_guest(rig, sc, sizes, bs, mode="none")
    g.extra_args += qemu_device_args(Path(g.workdir), spec)
    g.start()
    try:
        peers = [_connect(Path(g.workdir) / s) for s in spec.sockets]
    except BaseException:
        g.kill()
        raise
    result = drive(sc, "qemu", g, peers, {"qemu": g.pid}, sizes, None)
    g.cleanup()
    return result


def run_vhostser(rig: ModuleType | None, sc: str, sizes: Sizes, bs: int) -> Result:
    """The scenario on a vhostser daemon: under QEMU with `rig`, else the local guest."""
    spec = SPECS[sc]
    with bench_daemon(spec) as d:
        # Connected before the guest boots: its writes wait for the host side.
        peers = [_connect(d.dir / s) for s in spec.sockets]
        if rig is None:
            g: Any = LocalGuest(d.dir / "vu.sock", spec.max_ports, local_program(sc, sizes))
            pids, who = {"daemon": d.pid}, "vhostser-local"
        else:
            g = _qemu_guest(rig, sc, sizes, bs, mode="vhost-user",
                            vu_socket=str(d.dir / "vu.sock"), vu_max_ports=spec.max_ports)
            who = "vhostser"
        try:
            g.start()
        except BaseException:
            for p in peers:
                p.close()
            raise
        if rig is not None:
            pids = {"daemon": d.pid, "qemu": g.pid}
        result = drive(sc, who, g, peers, pids, sizes, d.pid)
        if rig is not None:
            g.cleanup()
    return result


_HEADLINE = {"g2h": "MBps", "h2g": "MBps", "console": "MBps", "rtt": "p50_us",
             "ports8": "aggregate_MBps", "idle": "wakeups_per_s"}


def _say(results: list[Result]) -> None:
    """One line as soon as a scenario is done (the table comes at the end)."""
    r = results[-1]
    name = _HEADLINE[r.scenario]
    what = FIGURES[name][0]
    ref = next((x for x in results if x.scenario == r.scenario and x.who == "qemu"), None)
    line = f"{r.scenario}: {r.who} {_fmt(r.median(name))} {what}"
    if ref is not None and ref is not r:
        line = (f"{r.scenario}: QEMU {_fmt(ref.median(name))}, vhostser {_fmt(r.median(name))} "
                f"{what}: vhostser x{r.median(name) / ref.median(name):.2f} of QEMU's "
                "in-process virtio-serial")
    if ref is not r:
        print(line, flush=True)


def main(args: Any) -> int:
    kinds = [k for k in args.which.split(",") if k]
    for k in kinds:
        if k not in SCENARIOS:
            print(f"vhostser bench: --which {k!r}: expected some of {', '.join(SCENARIOS)}",
                  file=sys.stderr)
            return 2
    qemu = args.where == "qemu"
    sizes = Sizes(run_bytes=args.bs * args.count if qemu else args.mib * MIB,
                  port_bytes=args.port_mib * MIB, console_bytes=args.console_mib * MIB,
                  runs=args.runs, rtt_n=args.rtt_n, idle_s=args.idle_s)
    rig = load_rig(args.rig) if qemu else None
    results: list[Result] = []
    notes = []
    for sc in kinds:
        if rig is not None and sc != "idle":
            results.append(run_reference(rig, sc, sizes, args.bs))
            _say(results)
        results.append(run_vhostser(rig, sc, sizes, args.bs))
        _say(results)
    if rig is not None and "idle" in kinds:
        notes.append("idle: vhostser only (QEMU's own wakeups and RSS are the whole TCG VM's)")
    print("\n" + table(results))
    for n in notes:
        print(n)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"where": args.where, "bs": args.bs, "sizes": sizes.__dict__, "notes": notes,
             "results": [r.as_dict() for r in results], "ratios": ratios(results)}, indent=1))
    return 0
