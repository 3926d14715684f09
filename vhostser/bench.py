"""`vhostser bench`: throughput and latency of the data path, as numbers to compare.

`vhostser bench qemu` measures against the reference in the same run: the e2e rig
(../shared/e2e) boots its guest once with QEMU's own in-process virtio-serial and once against
a vhostser daemon (a child process, a unix stream port), with the same guest scripts
(tput_g2h, tput_h2g, rtt) and the same host peer code, and prints medians and the
vhostser/QEMU ratio per measurement.

`vhostser bench local` takes QEMU and TCG out: the daemon in a child process, the testing
front end and console driver in this one (memfd guest RAM, eventfds, SCM_RIGHTS), a host
peer on the port's unix socket. Absolute numbers of vhostser's own path only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

PORT_NAME = "org.vhostser.bench"
KINDS = ("g2h", "h2g", "rtt")
_CONFIG = """
[vm]
name = "bench"
socket = "{tmp}/vu.sock"
max_ports = 2

[[port]]
id = 1
name = "{name}"
backend = {{ type = "unix", path = "{tmp}/port.sock", mode = "stream" }}
"""


@dataclass
class Result:
    """One measurement: MB/s per run (throughput) or µs per round trip (rtt)."""

    kind: str
    who: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        unit = "us" if self.kind == "rtt" else "MBps"
        return {"kind": self.kind, "who": self.who, f"median_{unit}": round(self.median, 1),
                f"min_{unit}": round(min(self.samples), 1),
                f"max_{unit}": round(max(self.samples), 1), "n": len(self.samples)}


@contextmanager
def bench_daemon() -> Iterator[Path]:
    """A vhostser daemon (child process) with one unix stream port; yields its directory."""
    tmp = Path(tempfile.mkdtemp(prefix="vhostser-bench-"))
    (tmp / "bench.toml").write_text(_CONFIG.format(tmp=tmp, name=PORT_NAME))
    with open(tmp / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostser", "run", "--config", str(tmp / "bench.toml"),
             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while not (tmp / "port.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {(tmp / 'daemon.log').read_text()}")
            time.sleep(0.02)
        yield tmp
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return s


# ------------------------------------------------------------------------ against QEMU


def load_rig(rig_dir: str | None) -> ModuleType:
    """The e2e rig module (../shared/e2e/rig.py next to this checkout by default)."""
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "e2e"
    path = Path(rig_dir or os.environ.get("VHOSTSER_E2E_RIG") or beside_checkout)
    if not (path / "rig.py").exists():
        raise SystemExit(f"vhostser bench qemu: no e2e rig at {path} (--rig DIR)")
    sys.path.insert(0, str(path))
    import rig  # type: ignore[import-not-found]

    return rig  # type: ignore[no-any-return]


def _measure(rig: ModuleType, kind: str, peer: socket.socket, guest: Any, run_bytes: int,
             runs: int, rtt_n: int) -> list[float]:
    if kind == "g2h":
        return [b / t / 1e6 for b, t in rig.peer_g2h(peer, run_bytes, runs)]
    if kind == "h2g":
        return [b / t / 1e6 for b, t in rig.peer_h2g(peer, run_bytes, runs)]
    # Bytes sent before the guest opens the port belong to no session and vhostser drops
    # them (QEMU leaves them in the socket): ping only once the guest's echo loop runs.
    if not guest.wait_for_line(r"^E2E-RTT-READY", 120):
        raise RuntimeError("the guest's rtt loop did not start:\n" + guest.log()[-2000:])
    lat: list[float] = rig.peer_rtt(peer, rtt_n)
    peer.close()
    return lat


def run_qemu(rig: ModuleType, kinds: list[str], bs: int, count: int, runs: int,
             rtt_n: int) -> list[Result]:
    tests = {"g2h": "tput_g2h", "h2g": "tput_h2g", "rtt": "rtt"}
    params = {"count": count, "bs": bs, "runs": runs}
    results = []
    for kind in kinds:
        g = rig.Guest(tests[kind], params=params, timeout=900).start()
        try:
            samples = _measure(rig, kind, g.connect_port(), g, bs * count, runs, rtt_n)
        finally:
            r = g.wait()
        _check(r, "QEMU", kind)
        results.append(Result(kind, "qemu", samples))
        with bench_daemon() as tmp:
            peer = _connect(tmp / "port.sock")  # before boot: the guest's writes wait for H
            g = rig.Guest(tests[kind], mode="vhost-user", vu_socket=str(tmp / "vu.sock"),
                          vu_max_ports=2, params={**params, "port": PORT_NAME},
                          timeout=900).start()
            try:
                samples = _measure(rig, kind, peer, g, bs * count, runs, rtt_n)
            finally:
                r = g.wait()
            _check(r, "vhostser", kind)
        results.append(Result(kind, "vhostser", samples))
        _report_pair(results[-2], results[-1])
    return results


def _check(r: Any, who: str, kind: str) -> None:
    if not r.passed:
        raise RuntimeError(f"{who} {kind}: the guest test failed:\n{r.log[-3000:]}")


def _report_pair(ref: Result, ours: Result) -> None:
    if ours.kind == "rtt":
        ratio = f"{ours.median / ref.median:.2f}x the latency"
    else:
        ratio = f"{ours.median / ref.median:.2f}x the throughput"
    unit = "µs" if ours.kind == "rtt" else "MB/s"
    print(f"{ours.kind}: QEMU {ref.median:.1f} {unit}, vhostser {ours.median:.1f} {unit}: "
          f"vhostser has {ratio} of QEMU's in-process virtio-serial", flush=True)


# ------------------------------------------------------------------------ local


async def _local(kind: str, tmp: Path, total: int, rtt_n: int) -> Result:
    from .testing import open_frontend
    from .testing.console_driver import ConsoleDriver

    peer = _connect(tmp / "port.sock")
    async with open_frontend(str(tmp / "vu.sock"), mem_size=64 << 20) as fe:
        driver = ConsoleDriver(fe, max_ports=2)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            port = await driver.wait_port(PORT_NAME)
            await driver.wait_for(lambda: port.host_connected)
            await port.open()
            result = Result(kind, "vhostser-local")
            block = os.urandom(32 * 1024)
            if kind == "g2h":
                got: list[float] = []
                reader = _in_thread(lambda: got.append(_read_n(peer, total)))
                t0 = time.perf_counter()
                for _ in range(total // len(block)):
                    await port.write_all(block, timeout=30)
                await trio.to_thread.run_sync(reader.join)
                result.samples.append(total / (time.perf_counter() - t0) / 1e6)
            elif kind == "h2g":
                def send_all() -> None:
                    for _ in range(total // len(block)):
                        peer.sendall(block)

                writer = _in_thread(send_all)
                t0 = time.perf_counter()
                left = total
                while left:
                    left -= len(await port.read(min(left, 1 << 20), timeout=30))
                result.samples.append(total / (time.perf_counter() - t0) / 1e6)
                await trio.to_thread.run_sync(writer.join)
            else:
                # The guest echoes, the host pings from its own thread (as rig.py's peer).
                lat: list[float] = []
                pinger = _in_thread(lambda: lat.extend(_ping(peer, rtt_n)))
                while pinger.is_alive():
                    with trio.move_on_after(0.5):
                        data = await port.read(4096, timeout=None)
                        await port.write_all(data, timeout=10)
                result.samples.extend(lat)
            nursery.cancel_scope.cancel()
    peer.close()
    return result


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _ping(s: socket.socket, n: int) -> list[float]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(b"x")
        _read_n(s, 1)
        lat.append((time.perf_counter() - t0) * 1e6)
    return lat


def _read_n(s: socket.socket, n: int) -> float:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n:
        got = s.recv_into(view[: min(n, len(buf))])
        if not got:
            raise EOFError(f"{n} bytes short")
        n -= got
    return 0.0


def run_local(kinds: list[str], mib: int, runs: int, rtt_n: int) -> list[Result]:
    results = []
    for kind in kinds:
        merged = Result(kind, "vhostser-local")
        for _ in range(1 if kind == "rtt" else runs):
            with bench_daemon() as tmp:
                merged.samples += trio.run(_local, kind, tmp, mib << 20, rtt_n).samples
        results.append(merged)
        unit = "µs" if kind == "rtt" else "MB/s"
        print(f"{kind}: vhostser (no QEMU) median {merged.median:.1f} {unit}", flush=True)
    return results


def main(args: Any) -> int:
    kinds = [k for k in args.which.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            print(f"vhostser bench: --which {k!r}: expected some of {', '.join(KINDS)}",
                  file=sys.stderr)
            return 2
    if args.where == "qemu":
        results = run_qemu(load_rig(args.rig), kinds, args.bs, args.count, args.runs, args.rtt_n)
    else:
        results = run_local(kinds, args.mib, args.runs, args.rtt_n)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=1))
    return 0
