"""A VM served by vhostser@NAME under a real systemd while the daemon is killed (SIGKILL, then
Restart=) and restarted (`systemctl restart`: a hand-over) again and again: QEMU never
reconnects, the guest's requests on an echo port are all answered, its console loses no
line, and the fd store holds what the live daemon uses.

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

if TYPE_CHECKING:  # the fixtures' types (tests/systemd is no package: no import at run time)
    from conftest import VM, ContainedSystemd, Install

pytestmark = pytest.mark.systemd
ROOT = Path(__file__).resolve().parents[2]
GUEST_TESTS = ROOT / "tests" / "guest"
KILLS, RESTARTS = 5, 3
# Between two actions, after the unit is back: at least 2 s, so that no 5 starts fall within
# systemd's default start limit (5 in 10 s), which would fail the unit.
PAUSE = (2.0, 3.5)


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


def _read_line(s: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        line += chunk
    return line


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


def test_guest_notices_no_restart(rig, vm: VM) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("VHOSTSER_SYSTEMD_SEED", random.randrange(1 << 32)))
    print(f"\nseed {seed} (VHOSTSER_SYSTEMD_SEED={seed} repeats this schedule)")
    rng = random.Random(seed)
    actions = ["kill"] * KILLS + ["restart"] * RESTARTS
    rng.shuffle(actions)
    pauses = [rng.uniform(*PAUSE) for _ in actions]
    console_log = vm.log_file("console")
    console_sock = f"{vm.run_dir}/console.sock"
    vm.start(f"""
[vm]
name = "{vm.name}"
max_ports = 2
admin_socket = "{vm.admin}"

[[port]]
id = 0
console = true
backend = {{ type = "console", path = "{console_log}", socket = "{console_sock}" }}

[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}
""")
    g = rig.Guest("live_restart", mode="vhost-user", vu_socket=vm.socket, vu_max_ports=2,
                  tests_dirs=[str(GUEST_TESTS)], params={"seconds": 120, "slow_ms": 150},
                  timeout=180)
    events: list[tuple[str, float, float]] = []  # (action, guest time at it, seconds to active)
    try:
        g.start()
        loop = g.wait_for_line(r"^E2E-LOOP-START at=(\d+)", timeout=90)
        assert loop, g.log() + g.stderr() + vm.journal()
        # Guest time (centiseconds of uptime) for a moment here: the loop's start, seen now.
        guest_t0, host_t0 = int(loop.group(1)) / 100, time.monotonic()
        pid = vm.wait_active()
        for action, pause in zip(actions, pauses, strict=True):
            time.sleep(pause)
            waits = _gap_lines(g)
            at = time.monotonic()
            if action == "kill":
                vm.ns.run("kill", "-9", str(pid))  # the PID as the namespace sees it
            else:
                vm.ns.systemctl("restart", vm.service)
            pid = vm.wait_active(not_pid=pid)
            events.append((action, guest_t0 + at - host_t0, time.monotonic() - at))
            _request_answered(g, vm, f"{action} #{len(events)}", waits)
        time.sleep(1.0)  # one more second of requests after the last restart
        in_store, daemon_count = _fd_counts(vm)
        # Stop the loop: the console's live reader types to the guest's hvc0.
        with _connect(vm.ns.outside(console_sock)) as reader:
            reader.sendall(b"STOP\n")
            r = g.wait(timeout=60)
        stderr = g.stderr()
        journal = vm.journal()
    finally:
        g.kill()
    assert r.passed, f"{r.log[-4000:]}{stderr}{journal[-4000:]}\n(kept: {g.workdir})"
    g.cleanup()
    (metric,) = [m for m in r.metrics if "requests" in m]
    gaps = [(int(m.group(2)) / 100, int(m.group(3)))
            for m in re.finditer(r"^E2E-GAP request=(\d+) at=(\d+) ms=(\d+)", r.log, re.M)]
    # The report the issue note needs.
    print(f"{len(events)} restarts ({KILLS} kill -9, {RESTARTS} systemctl restart); "
          f"{metric['requests']} requests, all answered; worst wait {metric['worst_gap_ms']} ms;"
          f" {metric['duplicates']} duplicate answers; counter 0..{metric['counter_last']}")
    dups = [int(t) / 100 for t in re.findall(r"^E2E-DUP request=\d+ at=(\d+)", r.log, re.M)]
    for action, at, back in events:
        # The guest's wait that the action fell into (guest time, ±0.1 s for the serial log).
        waits = [(start, ms) for start, ms in gaps if start - 0.1 <= at <= start + ms / 1000 + 0.1]
        waited = f"{waits[0][1]} ms" if waits else "< 150 ms"
        twice = any(start <= t <= start + ms / 1000 for start, ms in waits for t in dups)
        print(f"  {action:8s} at guest {at:7.2f} s: unit active again after {back * 1000:4.0f} ms,"
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
    # Every console line the guest wrote is in the log file.
    logged = {int(n) for n in re.findall(rb"^COUNTER (\d+)\r?$", console_log.read_bytes(),
                                         re.M)}
    last = int(metric["counter_last"])
    assert set(range(last + 1)) <= logged, sorted(set(range(last + 1)) - logged)[:20]
    # What systemd holds for the unit is what the live daemon counts as stored.
    print(f"fd store: {in_store} fds held by systemd, {daemon_count} by the daemon's count")
    assert in_store == daemon_count and in_store > 1


def test_host_peer_stays_connected_across_kill(rig, vm: VM) -> None:  # type: ignore[no-untyped-def]
    data_sock = f"{vm.run_dir}/data.sock"
    vm.start(f"""
[vm]
name = "{vm.name}"
max_ports = 2

[[port]]
id = 1
name = "org.test.data"
guest_writes_without_host = "discard"
backend = {{ type = "unix", path = "{data_sock}", mode = "stream" }}
""")
    mib = 64
    payload = random.Random(7).randbytes(mib << 20)
    digest = hashlib.sha256(payload).hexdigest()
    g = rig.Guest("peer_restart", mode="vhost-user", vu_socket=vm.socket, vu_max_ports=2,
                  tests_dirs=[str(GUEST_TESTS)], params={"mib": mib}, timeout=120)
    sent = threading.Event()
    errors: list[OSError] = []

    def send(peer: socket.socket) -> None:
        try:
            for off in range(0, len(payload), 1 << 20):
                peer.sendall(payload[off : off + (1 << 20)])
                if off >= len(payload) // 4:
                    sent.set()
        except OSError as e:
            errors.append(e)
        sent.set()

    peer: socket.socket | None = None
    try:
        g.start()
        pid = vm.wait_active()
        peer = _connect(vm.ns.outside(data_sock))
        peer.settimeout(60)
        assert _read_line(peer) == b"R\n", g.log()  # the guest opened the port
        sender = threading.Thread(target=send, args=(peer,))
        sender.start()
        sent.wait(60)
        vm.ns.run("kill", "-9", str(pid))  # a quarter of the way
        vm.wait_active(not_pid=pid)
        sender.join(60)
        # Failing here is quick: a peer that lost its connection leaves the guest waiting.
        assert not errors, f"the host peer lost its connection: {errors}"
        try:
            reply = _read_line(peer)
        except OSError as e:
            errors.append(e)
            reply = b""
        r = g.wait(timeout=60)
    finally:
        g.cleanup()
        if peer is not None:
            peer.close()
    assert not errors, f"the host peer lost its connection: {errors}"
    assert reply == f"SHA {digest}\n".encode(), reply
    assert r.passed, r.log[-3000:]
