"""A VM served by vhostser@NAME under a real systemd while the daemon is killed (SIGKILL, then
Restart=) and restarted (`systemctl restart`: a hand-over) again and again, with traffic on
every kind of port at once: QEMU never reconnects, the guest's requests on an echo port are
all answered, 64 MiB each way reach the other side whole through host peers that stay
connected, its console loses no line, and the fd store holds what the live daemon uses.

Seeded: VHOSTSER_SYSTEMD_SEED=N repeats a run's schedule (the seed is printed)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vhostser.backends.framing import Close, Data, FrameDecoder, Open

if TYPE_CHECKING:  # the fixtures' types (tests/systemd is no package: no import at run time)
    from conftest import VM, ContainedSystemd, Install

pytestmark = pytest.mark.systemd
ROOT = Path(__file__).resolve().parents[2]
GUEST_TESTS = ROOT / "tests" / "guest"
KILLS, RESTARTS = 5, 3
# Between two actions, after the unit is back: any moment, kills in quick succession too
# (the unit allows 30 starts in 30 s; systemd's default, 5 in 10 s, would fail it).
PAUSE = (0.2, 3.0)
# What one peer may see twice after a SIGKILL (README, "Restarts"): the chain the successor
# takes again, or the last write to its socket (backends.peers WRITE_CHUNK), whichever is
# longer.
PEER_REPEAT = 64 * 1024


def _connect(path: str, timeout: float = 30) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _gap_lines(g) -> int:  # type: ignore[no-untyped-def]
    """How many long waits the guest reported so far."""
    return len(re.findall(r"^E2E-GAP ", g.log(), re.M))


def _request_answered(g, vm: VM, what: str, waits: int) -> None:  # type: ignore[no-untyped-def]
    """The guest's request in flight at `what` was answered: its long wait is reported before
    the next action. A lost or wrong answer is said here, with what the daemon knew, not at
    the end (a lost one leaves the guest waiting forever)."""
    deadline = time.monotonic() + 20
    while True:
        log = g.log()
        error = re.search(r"^E2E-(ERROR|LOOP-END).*", log, re.M)
        if _gap_lines(g) > waits and not error:
            return
        if error or time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: " + (error.group(0) if error else "the request in flight was never "
                               "answered") + f"\n{log[-1500:]}\n{vm.journal()[-3000:]}\n"
                f"{vm.ctl('--json', 'stats')}\n(kept: {g.workdir})")
        time.sleep(0.05)


def _fd_counts(vm: VM) -> tuple[int, int]:
    """(systemd's NFileDescriptorStore, the daemon's own count), read while nothing moves:
    systemd's twice around the daemon's, until both readings agree."""
    for _ in range(5):
        before = int(vm.ns.show(vm.service, "NFileDescriptorStore")["NFileDescriptorStore"])
        daemon = json.loads(vm.ctl("--json", "status"))["fd_store"]
        after = int(vm.ns.show(vm.service, "NFileDescriptorStore")["NFileDescriptorStore"])
        if before == after:
            return after, daemon
    return after, daemon


def test_installed_units_name_what_was_installed(contained_systemd: ContainedSystemd,
                                                 installed: Install) -> None:
    """The one documented command left a venv on the system python, the link, the units
    pointing at the venv and at docs that exist."""
    assert (installed.prefix / "pyvenv.cfg").exists()
    assert os.path.realpath(installed.prefix / "bin" / "python") == os.path.realpath(
        "/usr/bin/python3")
    assert os.readlink(installed.link) == str(installed.binary)
    props = contained_systemd.show("vhostser@x.service", "ExecStart", "Documentation",
                                   "FileDescriptorStoreMax")
    assert f"path={installed.binary} " in props["ExecStart"], props
    doc = props["Documentation"].removeprefix('"').removesuffix('"')
    assert doc == f"file://{installed.doc_dir}/README.md"
    assert "Install for systemd" in Path(doc.removeprefix("file://")).read_text()
    assert props["FileDescriptorStoreMax"] == "1024"


class Budget:
    """How many bytes of a transfer the host lets through so far: raised step by step over
    the schedule, so that every kill and restart falls inside both transfers whatever the
    machine's speed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._allowed = 0
        self._cond = threading.Condition()

    def allow(self, fraction: float) -> None:
        with self._cond:
            self._allowed = max(self._allowed, int(self.total * min(fraction, 1.0)))
            self._cond.notify_all()

    def wait(self, n: int) -> None:
        """Until `n` bytes are allowed."""
        with self._cond:
            self._cond.wait_for(lambda: self._allowed >= min(n, self.total))


def _common_prefix(a: memoryview, b: memoryview) -> int:
    """Length of the longest common prefix of a and b (block compares, then a bisection)."""
    n, limit = 0, min(len(a), len(b))
    while n < limit:
        k = min(1 << 20, limit - n)
        if a[n:n + k] == b[n:n + k]:
            n += k
            continue
        lo, hi = 0, k  # a[n:n+lo] matches, a[n:n+hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[n:n + mid] == b[n:n + mid]:
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def _repeats(received: bytes, sent: bytes, window: int) -> list[int]:
    """Where (offsets in `received`) a stretch of at most `window` bytes came again right
    after its first copy; AssertionError if a byte of `sent` is missing or out of order.
    `received` may end early by what its repeats pushed out (the guest reads exactly as
    many bytes as were sent)."""
    r, s = memoryview(received), memoryview(sent)
    i = j = 0
    at: list[int] = []
    while i < len(s) and j < len(r):
        n = _common_prefix(r[j:], s[i:])
        i, j = i + n, j + n
        if i == len(s) or j == len(r):
            break
        for back in range(1, min(window, j) + 1):
            if r[j:j + back] == r[j - back:j]:
                at.append(j)
                j += back
                break
        else:
            raise AssertionError(f"byte {i} of {len(s)} sent is missing at byte {j} of "
                                 f"{len(r)} received")
    if i < len(s):  # cut short: by no more than the repeats added
        assert len(r) == len(s) and at, f"{len(s) - i} bytes sent never arrived"
    else:
        tail = len(r) - j  # beyond what was sent: only a repeat of what came just before
        assert tail == 0 or r[j:] == r[j - tail:j], f"{tail} bytes arrived beyond the sent"
        if tail:
            at.append(j)
    return at


def _in_a_kill_window(offset: int, marks: list[tuple[str, int]], total: int,
                      slack: int) -> bool:
    """Whether `offset` (bytes into a transfer) lies between a kill and the next action:
    marks are (action, bytes of the transfer at its start); `slack` bytes earlier count too
    (what was in flight, between the socket and the guest, at the kill)."""
    ends = [at for _, at in marks[1:]] + [total]
    return any(action == "kill" and start - slack <= offset <= end
               for (action, start), end in zip(marks, ends, strict=True))


def test_guest_notices_no_restart(rig, vm: VM) -> None:  # type: ignore[no-untyped-def]
    """All at once, while systemd's units kill (5 x SIGKILL, then Restart=) and restart
    (3 x `systemctl restart`) the daemon at random moments: requests on an echo port,
    64 MiB guest→host on a framed port, 64 MiB host→guest on a stream port, a counter on
    hvc0. QEMU never sees the back end go, every request is answered, both transfers arrive
    whole (a repeated stretch only right after a kill, at most one per kill and direction,
    none for a restart), the host peers' connections last throughout (one OPEN, no CLOSE
    on the framed one), every counter line is in the console's log, and the fd store holds
    what the live daemon uses."""
    seed = int(os.environ.get("VHOSTSER_SYSTEMD_SEED", random.randrange(1 << 32)))
    print(f"\nseed {seed} (VHOSTSER_SYSTEMD_SEED={seed} repeats this schedule)")
    rng = random.Random(seed)
    actions = ["kill"] * KILLS + ["restart"] * RESTARTS
    rng.shuffle(actions)
    pauses = [rng.uniform(*PAUSE) for _ in actions]
    console_log = vm.log_file("console")
    console_sock = f"{vm.run_dir}/console.sock"
    data_sock, framed_sock = f"{vm.run_dir}/data.sock", f"{vm.run_dir}/framed.sock"
    vm.start(f"""
[vm]
name = "{vm.name}"
max_ports = 4
admin_socket = "{vm.admin}"

[[port]]
id = 0
console = true
backend = {{ type = "console", path = "{console_log}", socket = "{console_sock}" }}

[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}

[[port]]
id = 2
name = "org.test.data"
backend = {{ type = "unix", path = "{data_sock}", mode = "stream" }}

[[port]]
id = 3
name = "org.test.framed"
backend = {{ type = "unix", path = "{framed_sock}", mode = "framed" }}
""")
    mib = 64
    h2g = random.Random(seed).randbytes(mib << 20)
    h2g_budget, g2h_budget = Budget(len(h2g)), Budget(mib << 20)
    h2g_sent = [0]
    frames: list[Open | Data | Close] = []
    g2h = bytearray()  # the framed peer's DATA, in order
    back = bytearray()  # what the guest sends on org.test.data after "R\n"
    opened = threading.Event()
    errors: list[str] = []

    def send(peer: socket.socket) -> None:
        opened.wait(120)
        try:
            for off in range(0, len(h2g), 1 << 16):
                h2g_budget.wait(off + (1 << 16))
                peer.sendall(h2g[off:off + (1 << 16)])
                h2g_sent[0] = off + (1 << 16)
        except OSError as e:
            errors.append(f"the stream peer's send: {e!r}")

    def read_stream(peer: socket.socket) -> None:
        seen = bytearray()
        try:
            while data := peer.recv(1 << 20):
                if opened.is_set():
                    back.extend(data)
                    continue
                seen.extend(data)
                if seen.startswith(b"R\n"):
                    back.extend(seen[2:])
                    opened.set()
            errors.append("the stream peer's connection ended")
        except OSError as e:
            errors.append(f"the stream peer's recv: {e!r}")

    def read_framed(peer: socket.socket) -> None:
        decoder = FrameDecoder(accept_open=True)
        try:
            while True:
                g2h_budget.wait(len(g2h) + 1)
                data = peer.recv(1 << 16)
                if not data:
                    errors.append("the framed peer's connection ended")
                    return
                decoder.feed(data)
                for frame in decoder:
                    frames.append(frame)
                    if isinstance(frame, Data):
                        g2h.extend(frame.data)
        except (OSError, ValueError) as e:
            errors.append(f"the framed peer: {e!r}")

    g = rig.Guest("live_restart", mode="vhost-user", vu_socket=vm.socket, vu_max_ports=4,
                  tests_dirs=[str(GUEST_TESTS)],
                  params={"seconds": 240, "slow_ms": 150, "mib": mib}, timeout=300)
    events: list[tuple[str, float, float]] = []  # (action, guest time at it, seconds to active)
    marks: list[tuple[str, int, int]] = []  # (action, g2h bytes at it, h2g bytes sent)
    threads: list[threading.Thread] = []
    peers: list[socket.socket] = []
    try:
        g.start()
        pid = vm.wait_active()
        stream_peer = _connect(vm.ns.outside(data_sock))
        framed_peer = _connect(vm.ns.outside(framed_sock))
        peers += [stream_peer, framed_peer]
        threads = [threading.Thread(target=f, args=(p,), daemon=True) for f, p in
                   [(send, stream_peer), (read_stream, stream_peer),
                    (read_framed, framed_peer)]]
        for t in threads:
            t.start()
        loop = g.wait_for_line(r"^E2E-LOOP-START at=(\d+)", timeout=120)
        assert loop, g.log() + g.stderr() + vm.journal()
        assert opened.wait(60), f"the guest never opened org.test.data\n{g.log()}"
        # Guest time (centiseconds of uptime) for a moment here: the loop's start, seen now.
        guest_t0, host_t0 = int(loop.group(1)) / 100, time.monotonic()
        steps = len(actions) + 1
        for k, (action, pause) in enumerate(zip(actions, pauses, strict=True)):
            for step in range(1, 11):  # the transfers move on during the pause
                for budget in (h2g_budget, g2h_budget):
                    budget.allow((k + step / 10) / steps)
                time.sleep(pause / 10)
            waits = _gap_lines(g)
            at = time.monotonic()
            marks.append((action, len(g2h), h2g_sent[0]))
            if action == "kill":
                vm.ns.run("kill", "-9", str(pid))  # the PID as the namespace sees it
            else:
                vm.ns.systemctl("restart", vm.service)
            pid = vm.wait_active(not_pid=pid)
            events.append((action, guest_t0 + at - host_t0, time.monotonic() - at))
            _request_answered(g, vm, f"{action} #{len(events)}", waits)
            assert not errors, f"{action} #{len(events)}: {errors}"
        for budget in (h2g_budget, g2h_budget):
            budget.allow(1.0)
        time.sleep(1.0)  # one more second of requests after the last restart
        # Stop the loop: the console's live reader types to the guest's hvc0.
        with _connect(vm.ns.outside(console_sock)) as reader:
            reader.sendall(b"STOP\n")
            g.wait_for_line(r"^E2E-METRIC in_bytes=", timeout=120)
            # "BACK\n", then what the guest received and what it sent.
            deadline = time.monotonic() + 120
            while len(back) < 5 + 2 * len(h2g) and time.monotonic() < deadline and not errors:
                time.sleep(0.05)
            time.sleep(0.5)  # a repeat on the framed peer arrives after its first copy
            frames_before_end = list(frames)
            in_store, daemon_count = _fd_counts(vm)
            reader.sendall(b"END\n")
            r = g.wait(timeout=60)
        stderr = g.stderr()
        journal = vm.journal()
    finally:
        g.kill()
        for p in peers:
            p.close()
    assert r.passed, f"{r.log[-4000:]}{stderr}{journal[-4000:]}\n(kept: {g.workdir})"
    g.cleanup()
    assert not errors, errors
    (metric,) = [m for m in r.metrics if "requests" in m]
    (hashes,) = [m for m in r.metrics if "in_sha" in m]
    gaps = [(int(m.group(2)) / 100, int(m.group(3)))
            for m in re.finditer(r"^E2E-GAP request=(\d+) at=(\d+) ms=(\d+)", r.log, re.M)]
    # The report the issue note needs.
    print(f"{len(events)} restarts ({KILLS} kill -9, {RESTARTS} systemctl restart); "
          f"{metric['requests']} requests, all answered; worst wait {metric['worst_gap_ms']} ms;"
          f" {metric['duplicates']} duplicate answers; counter 0..{metric['counter_last']}")
    dups = [int(t) / 100 for t in re.findall(r"^E2E-DUP request=\d+ at=(\d+)", r.log, re.M)]
    for (action, at, up), (_, g2h_at, h2g_at) in zip(events, marks, strict=True):
        # The guest's wait that the action fell into (guest time, ±0.1 s for the serial log).
        waits = [(start, ms) for start, ms in gaps if start - 0.1 <= at <= start + ms / 1000 + 0.1]
        waited = f"{waits[0][1]} ms" if waits else "< 150 ms"
        twice = any(start <= t <= start + ms / 1000 for start, ms in waits for t in dups)
        print(f"  {action:8s} at guest {at:7.2f} s (g2h {g2h_at >> 20:2d} MiB, h2g "
              f"{h2g_at >> 20:2d} MiB): unit active again after {up * 1000:4.0f} ms,"
              f" the guest's request waited {waited}"
              + (", then one answer came twice" if twice else ""))
    print(f"successors finished a request the predecessor died in: "
          f"{journal.count('finishing the request the predecessor was handling')}")
    # QEMU saw nothing: no vhost error, one connection, resumed by every successor.
    assert "vhost" not in stderr and "Failed" not in stderr, stderr
    assert journal.count("front end connected") == 1, journal
    assert journal.count("resumed the front end's connection") == len(events), journal
    assert journal.count("state handed over") == RESTARTS, journal
    # Every request answered with its own line; across a crash one chain may come twice.
    assert metric["answered"] == metric["requests"] and int(metric["requests"]) > 0
    assert int(metric["duplicates"]) <= KILLS
    # Both transfers whole, byte for byte: what the guest sent (and said it sent) reached
    # the framed peer, what the host sent reached the guest; a stretch came twice only in a
    # kill's window (from the kill to the next action), at most once per kill.
    assert back[:5] == b"BACK\n", bytes(back[:64])
    got_h2g, sent_g2h = bytes(back[5:5 + len(h2g)]), bytes(back[5 + len(h2g):])
    assert hashlib.sha256(sent_g2h).hexdigest() == hashes["out_sha"]
    assert hashlib.sha256(got_h2g).hexdigest() == hashes["in_sha"]
    for what, got, sent, d in [("g2h", bytes(g2h), sent_g2h, 1), ("h2g", got_h2g, h2g, 2)]:
        at = _repeats(got, sent, PEER_REPEAT)
        print(f"{what}: {len(got)} bytes, sha256 {'equal' if got == sent else 'differs'}; "
              f"stretches repeated at {at}")
        points = [(m[0], m[d]) for m in marks]
        assert all(_in_a_kill_window(j, points, len(sent), 1 << 20) for j in at), (what, at,
                                                                                   points)
        assert len(at) <= KILLS, (what, at)
    # One session on the framed peer throughout: its OPEN first, no CLOSE until the guest
    # closed the port at the end.
    assert isinstance(frames_before_end[0], Open), frames_before_end[:2]
    assert all(isinstance(f, Data) for f in frames_before_end[1:]), [
        f for f in frames_before_end[1:] if not isinstance(f, Data)]
    # Every console line the guest wrote is in the log file.
    logged = {int(n) for n in re.findall(rb"^COUNTER (\d+)\r?$", console_log.read_bytes(),
                                         re.M)}
    last = int(metric["counter_last"])
    assert set(range(last + 1)) <= logged, sorted(set(range(last + 1)) - logged)[:20]
    # What systemd holds for the unit is what the live daemon counts as stored.
    print(f"fd store: {in_store} fds held by systemd, {daemon_count} by the daemon's count")
    assert in_store == daemon_count and in_store > 1
