"""Sessions and data end to end: real QEMU 11 + a Linux 6.1 guest against `vhostser run`.

The daemon runs as a subprocess on conftest's E2E_CONFIG (port 0 console, 1 echo, 2 unix
stream `data.sock`, 3 unix framed `framed.sock`). Host peers are plain blocking sockets in
threads; the guest side is a busybox script from tests/guest/sess_*.sh that prints
`E2E-MARK` lines (for the host to wait on) and `E2E-METRIC` lines (results).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostser.backends import framing

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
GUEST_TESTS = HERE.parent / "guest"
MIB = 1 << 20


def _conftest() -> Any:
    """conftest's Daemon and E2E_CONFIG, whatever pytest's import mode (loaded by path)."""
    spec = importlib.util.spec_from_file_location("_vhostser_e2e_conftest", HERE / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CF = _conftest()
Daemon = _CF.Daemon
E2E_CONFIG: str = _CF.E2E_CONFIG


# ---------------------------------------------------------------------------- helpers


def tail(text: str, lines: int = 400) -> str:
    parts = text.splitlines()
    if len(parts) <= lines:
        return text
    return f"[... {len(parts) - lines} earlier lines ...]\n" + "\n".join(parts[-lines:])


def info_lines(log: str) -> str:
    """The daemon's log without its per-message DEBUG lines (after the timestamp)."""
    return "\n".join(line for line in log.splitlines() if not DEBUG_LINE.match(line))


DEBUG_LINE = re.compile(r"(\S+ \S+ )?DEBUG ")


def diag(g: Any, daemon: Any, what: str = "") -> str:
    """Everything needed to understand a failure: serial log, QEMU stderr, daemon stderr."""
    log = daemon.stderr()
    return (
        f"{what}\n--- guest serial log\n{g.log()}\n--- qemu stderr\n{g.stderr()}"
        f"\n--- daemon stderr (INFO and up)\n{tail(info_lines(log))}"
        f"\n--- daemon stderr (last lines)\n{tail(log, 60)}"
    )


def sessions(log: str, port: int) -> tuple[list[int], list[tuple[int, str]]]:
    """(ids opened, [(id, reason) closed]) of one port, from the daemon's INFO lines."""
    opened = [int(x) for x in re.findall(rf"port {port} '[^']*': session (\d+) open", log)]
    closed = [(int(i), r) for i, r in
              re.findall(rf"port {port} '[^']*': session (\d+) closed: (\S+)", log)]
    return opened, closed


def connect(path: Path | str, timeout: float = 20) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            s.settimeout(60)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Worker(threading.Thread):
    """Runs fn in a thread; `result()` re-raises its exception in the test."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:
            self.error = e

    def result(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"host peer still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.value


class FramedPeer:
    """A framed-mode client: frames in a list as they arrive (a reader thread)."""

    def __init__(self, path: Path | str) -> None:
        self.sock = connect(path)
        self.sock.settimeout(None)
        self.frames: list[framing.Frame] = []
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._dec = framing.FrameDecoder(accept_open=True)
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while data := self.sock.recv(1 << 16):
                self._dec.feed(data)
                for frame in self._dec:
                    with self._cv:
                        self.frames.append(frame)
                        self._cv.notify_all()
        except BaseException as e:
            self.error = e
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def wait(self, pred: Callable[[framing.Frame], bool], timeout: float = 30,
             start: int = 0) -> framing.Frame | None:
        """The first frame from index `start` on that matches."""
        with self._cv:
            found: list[framing.Frame] = []

            def ready() -> bool:
                found[:] = [f for f in self.frames[start:] if pred(f)][:1]
                return bool(found) or self._eof

            self._cv.wait_for(ready, timeout)
            return found[0] if found else None

    def send(self, frame: framing.Frame) -> None:
        self.sock.sendall(framing.encode(frame))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def summary(self) -> list[tuple[str, int, object]]:
        out: list[tuple[str, int, object]] = []
        for f in list(self.frames):
            if isinstance(f, framing.Open):
                out.append(("OPEN", f.session, f.name))
            elif isinstance(f, framing.Close):
                out.append(("CLOSE", f.session, f.reason))
            else:
                out.append(("DATA", f.session, f.data[:64]))
        if self.error is not None:
            out.append(("ERROR", 0, repr(self.error)))
        return out


def closes(session: int) -> Callable[[framing.Frame], bool]:
    return lambda f: isinstance(f, framing.Close) and f.session == session


def data_of(frames: list[framing.Frame], session: int) -> bytes:
    return b"".join(f.data for f in frames if isinstance(f, framing.Data) and f.session == session)


def make_guest(rig: Any, daemon: Any, test: str, params: dict[str, object] | None = None,
               *, max_ports: int = 4, timeout: float = 85, **kw: Any) -> Any:
    return rig.Guest(test, mode="vhost-user", vu_socket=daemon.socket, vu_max_ports=max_ports,
                     tests_dirs=[str(GUEST_TESTS)], params=params or {}, timeout=timeout, **kw)


@pytest.fixture
def guests() -> Iterator[list[Any]]:
    """Guests a test started: killed and their work dirs removed at the end whatever happens
    (a failure's message already carries the serial log and QEMU's stderr; the strict xfails
    would otherwise leave a work dir behind on every run)."""
    started: list[Any] = []
    yield started
    for g in started:
        g.cleanup()


def mark(g: Any, daemon: Any, name: str, timeout: float = 60) -> re.Match[str]:
    """Wait for the guest's `E2E-MARK name ...` line."""
    m: re.Match[str] | None = g.wait_for_line(rf"^E2E-MARK {name}\b(.*)$", timeout)
    assert m is not None, diag(g, daemon, f"guest never printed E2E-MARK {name}")
    return m


def finish(g: Any, daemon: Any, timeout: float = 60) -> Any:
    r = g.wait(timeout)
    assert r.passed, diag(g, daemon, f"guest test did not pass: rc={r.rc} test_rc={r.test_rc}")
    return r


def metric(g: Any, daemon: Any, r: Any, **match: str) -> dict[str, str]:
    """The guest's first E2E-METRIC line with these key=value pairs."""
    for m in r.metrics:
        if all(m.get(k) == v for k, v in match.items()):
            return m  # type: ignore[no-any-return]
    raise AssertionError(diag(g, daemon, f"no E2E-METRIC with {match} in {r.metrics}"))


def wait_peer_connected(daemon: Any, port: int, serial: int = 1) -> None:
    assert daemon.wait_log(rf"port {port} '[^']*': unix:\S+: peer #{serial} connected", 20), \
        tail(daemon.stderr())


# ---------------------------------------------------------------------------- 1. bulk


BULK_MIB = 64


def test_bulk_both_ways_byte_exact(rig, e2e_daemon, guests) -> None:  # type: ignore[no-untyped-def]
    """64 MiB guest→host then 64 MiB host→guest on org.vhostser.data in one session,
    sha256 on both sides; throughput measured on both sides."""
    daemon = e2e_daemon
    n = BULK_MIB * MIB
    h2g = random.Random(0x5EED).randbytes(n)
    h2g_sha = hashlib.sha256(h2g).hexdigest()
    sock = connect(daemon.tmp / "data.sock")  # before the guest boots: H=1 from the start
    wait_peer_connected(daemon, 2)

    def peer() -> dict[str, Any]:
        h = hashlib.sha256()
        buf = bytearray(MIB)
        got, t_first = 0, 0.0
        while got < n:
            k = sock.recv_into(buf, min(len(buf), n - got))
            if not k:
                raise EOFError(f"g2h: EOF after {got} bytes")
            if not got:
                t_first = time.monotonic()
            h.update(memoryview(buf)[:k])
            got += k
        t_last = time.monotonic()
        ready = recv_exact(sock, 1)
        t_send = time.monotonic()
        view = memoryview(h2g)
        for off in range(0, n, MIB):
            sock.sendall(view[off:off + MIB])
        ack = recv_exact(sock, 1)
        t_ack = time.monotonic()
        return {"g2h_sha": h.hexdigest(), "g2h_s": t_last - t_first, "ready": ready,
                "ack": ack, "h2g_s": t_ack - t_send}

    w = Worker(peer)
    w.start()
    g = make_guest(rig, daemon, "sess_bulk", {"mib": BULK_MIB})
    guests.append(g)
    g.start()
    try:
        res = w.result(80)
    except BaseException as e:
        raise AssertionError(diag(g, daemon, f"host peer failed: {e!r}")) from e
    finally:
        sock.close()
    r = finish(g, daemon)
    g2h, back = metric(g, daemon, r, dir="g2h"), metric(g, daemon, r, dir="h2g")
    assert (res["ready"], res["ack"]) == (b"R", b"A"), diag(g, daemon, repr(res))
    assert g2h["sha"] == res["g2h_sha"], diag(g, daemon, "guest→host bytes differ")
    assert back["bytes"] == str(n) and back["sha"] == h2g_sha, \
        diag(g, daemon, f"host→guest bytes differ: host sha {h2g_sha}")
    host_g2h = n / res["g2h_s"] / 1e6
    host_h2g = n / res["h2g_s"] / 1e6
    print(f"E2E-METRIC test=bulk mib={BULK_MIB} g2h_guest_MBps={g2h['guest_MBps']} "
          f"g2h_host_MBps={host_g2h:.1f} h2g_guest_MBps={back['guest_MBps']} "
          f"h2g_host_MBps={host_h2g:.1f}")
    log = daemon.stderr()
    assert sessions(log, 2) == ([1], [(1, "guest-close")]), diag(g, daemon)
    assert "dropped" not in info_lines(log), diag(g, daemon, "the daemon dropped bytes")
    g.cleanup()


# ---------------------------------------------------------------------------- 2. framed sessions


def test_framed_peer_sees_each_guest_session(rig, e2e_daemon, guests) -> None:  # type: ignore[no-untyped-def]
    """Each guest open/write/close of org.vhostser.framed is OPEN(id)/DATA(id)/CLOSE(id,
    guest-close) on the framed peer, ids increasing; the peer's reply in DATA(id) reaches the
    guest, and a DATA frame naming the previous session is dropped, not delivered."""
    daemon = e2e_daemon
    peer = FramedPeer(daemon.tmp / "framed.sock")
    try:
        wait_peer_connected(daemon, 3)
        g = make_guest(rig, daemon, "sess_framed")
        guests.append(g)
        g.start()
        ids: list[int] = []
        start = 0
        for cycle in (1, 2):
            opened = peer.wait(lambda f: isinstance(f, framing.Open), 40, start)
            assert isinstance(opened, framing.Open), diag(g, daemon, f"no OPEN: {peer.summary()}")
            sid = opened.session
            ids.append(sid)
            want = f"ping {cycle}\n".encode()
            deadline = time.monotonic() + 20
            while data_of(peer.frames, sid) != want and time.monotonic() < deadline:
                time.sleep(0.02)
            assert data_of(peer.frames, sid) == want, diag(g, daemon, repr(peer.summary()))
            if cycle == 2:
                # Stale: names the session that is over; must never reach this one.
                peer.send(framing.Data(ids[0], b"STALE from session 1\n"))
            peer.send(framing.Data(sid, f"pong {cycle}\n".encode()))
            closed = peer.wait(closes(sid), 20, start)
            assert closed == framing.Close(sid, "guest-close"), \
                diag(g, daemon, f"frames: {peer.summary()}")
            start = peer.frames.index(closed) + 1
        r = finish(g, daemon)
        frames = list(peer.frames)
    finally:
        peer.close()
    assert [m["reply"] for m in r.metrics] == ["pong 1", "pong 2"], diag(g, daemon)
    assert ids[0] >= 1 and ids[1] > ids[0], diag(g, daemon, f"session ids {ids}")
    # The exact frame sequence (consecutive DATA frames of a session merged: a byte stream).
    seq: list[tuple[str, int, object]] = []
    for f in frames:
        if isinstance(f, framing.Data):
            if seq and seq[-1][:2] == ("DATA", f.session):
                seq[-1] = ("DATA", f.session, seq[-1][2] + f.data)  # type: ignore[operator]
            else:
                seq.append(("DATA", f.session, f.data))
        elif isinstance(f, framing.Open):
            seq.append(("OPEN", f.session, f.name))
        else:
            seq.append(("CLOSE", f.session, f.reason))
    a, b = ids
    assert seq == [
        ("OPEN", a, "org.vhostser.framed"), ("DATA", a, b"ping 1\n"), ("CLOSE", a, "guest-close"),
        ("OPEN", b, "org.vhostser.framed"), ("DATA", b, b"ping 2\n"), ("CLOSE", b, "guest-close"),
    ], diag(g, daemon, "framed peer saw the wrong sequence")
    log = daemon.stderr()
    assert sessions(log, 3) == (ids, [(a, "guest-close"), (b, "guest-close")]), diag(g, daemon)
    assert re.search(rf"DATA of 21 bytes for session {a} dropped \(open: {b}\)", log), \
        diag(g, daemon, "the stale DATA frame was not logged as dropped")
    g.cleanup()


# ---------------------------------------------------------------------------- 3. peer EOF


EOF_TAIL = 1 * MIB


def test_host_peer_leaving_gives_guest_eof_same_session(rig, e2e_daemon, guests) -> None:  # type: ignore[no-untyped-def]
    """Stream mode: the host peer sends a line (and a 1 MiB tail) and hangs up → the guest's
    reads return all of it, then EOF. A new peer is the same guest session: the guest reads
    again and answers."""
    daemon = e2e_daemon
    # A line, then a tail much larger than the port's staging buffer, then the hang-up.
    round1 = b"line-one\n" + random.Random(7).randbytes(EOF_TAIL)
    sock = connect(daemon.tmp / "data.sock")
    wait_peer_connected(daemon, 2, 1)
    g = make_guest(rig, daemon, "sess_eof")
    guests.append(g)
    g.start()
    try:
        mark(g, daemon, "eof-open")
        sock.sendall(round1)
        sock.close()
        mark(g, daemon, "eof-1", 30)
        assert daemon.wait_log(r"peer #1 disconnected", 10), diag(g, daemon)
        sock = connect(daemon.tmp / "data.sock")
        wait_peer_connected(daemon, 2, 2)
        sock.sendall(b"line-two\n")
        ack = b""
        while not ack.endswith(b"\n"):
            chunk = sock.recv(256)
            assert chunk, diag(g, daemon, f"peer 2: EOF after {ack!r}")
            ack += chunk
        sock.close()
    except OSError as e:
        raise AssertionError(diag(g, daemon, f"host peer: {e!r}")) from e
    finally:
        sock.close()
    r = finish(g, daemon)
    one, two = metric(g, daemon, r, round="1"), metric(g, daemon, r, round="2")
    assert one["got"] == "line-one" and one["rc"] == "0", diag(g, daemon, repr(r.metrics))
    assert (one["bytes"], one["sha"]) == (str(len(round1)), hashlib.sha256(round1).hexdigest()), \
        diag(g, daemon, f"round 1: the guest read {one['bytes']} of {len(round1)} bytes "
                        "before EOF (or other bytes)")
    assert two["got"] == "line-two" and two["rest"] == "", diag(g, daemon, repr(r.metrics))
    assert ack == b"ack line-two\n", diag(g, daemon, repr(ack))
    log = daemon.stderr()
    # One guest open, one session, whatever the host peers did; it ended with the guest's close.
    assert sessions(log, 2) == ([1], [(1, "guest-close")]), diag(g, daemon)
    g.cleanup()


# ---------------------------------------------------------------------------- 4. driver rebind


def open_sessions(log: str, ports: range) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for port in ports:
        opened, closed = sessions(log, port)
        gone = {i for i, _ in closed}
        out[port] = [i for i in opened if i not in gone]
    return out


def recv_line(s: socket.socket, what: str) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise EOFError(f"{what}: EOF after {buf!r}")
        buf += chunk
    return buf


def test_driver_rebind_closes_sessions_with_reset(rig, e2e_daemon, guests) -> None:  # type: ignore[no-untyped-def]
    """Unbind + bind of virtio_console while ports are open: every open session closes with
    reason reset (daemon log; the framed peer gets CLOSE(id, "reset")); afterwards the echo
    port round-trips, the framed port opens a new session with a new id, and the data port's
    peer (connected throughout) talks to the guest again."""
    daemon = e2e_daemon
    data = connect(daemon.tmp / "data.sock")
    wait_peer_connected(daemon, 2)
    framed = FramedPeer(daemon.tmp / "framed.sock")
    try:
        wait_peer_connected(daemon, 3)
        g = make_guest(rig, daemon, "sess_rebind")
        guests.append(g)
        g.start()
        mark(g, daemon, "rebind-open")
        before = open_sessions(daemon.stderr(), range(4))
        assert all(len(before[p]) == 1 for p in (1, 2, 3)), diag(g, daemon, repr(before))
        first = framed.wait(lambda f: isinstance(f, framing.Open), 10)
        assert first == framing.Open(before[3][0], "org.vhostser.framed"), \
            diag(g, daemon, f"framed peer: {framed.summary()}")
        n_before = len(framed.frames)
        data.sendall(b"go\n")
        mark(g, daemon, "bound", 40)
        for port, ids in before.items():
            for sid in ids:
                m = daemon.wait_log(rf"port {port} '[^']*': session {sid} closed: (\S+)", 10)
                assert m is not None and m.group(1) == "reset", \
                    diag(g, daemon, f"port {port} session {sid}: {m and m.group(0)}")
        closed = framed.wait(lambda f: isinstance(f, framing.Close), 10, n_before)
        assert closed == framing.Close(first.session, "reset"), \
            diag(g, daemon, f"framed peer: {framed.summary()}")
        # After the rebind: a new framed session, with a new id.
        new = framed.wait(lambda f: isinstance(f, framing.Open), 30, n_before)
        assert isinstance(new, framing.Open) and new.session > first.session, \
            diag(g, daemon, f"framed peer: {framed.summary()}")
        deadline = time.monotonic() + 20
        while data_of(framed.frames, new.session) != b"framed-after\n":
            assert time.monotonic() < deadline, diag(g, daemon, repr(framed.summary()))
            time.sleep(0.02)
        framed.send(framing.Data(new.session, b"framed-reply\n"))
        got = recv_line(data, "data peer")
        assert got == b"data-after\n", diag(g, daemon, repr(got))
        data.sendall(b"data-reply\n")
        r = finish(g, daemon)
        end = framed.wait(closes(new.session), 10, n_before)
        assert end == framing.Close(new.session, "guest-close"), \
            diag(g, daemon, f"framed peer: {framed.summary()}")
    except OSError as e:
        raise AssertionError(diag(g, daemon, f"host peer: {e!r}")) from e
    finally:
        data.close()
        framed.close()
    after = metric(g, daemon, r, phase="after")
    assert (after["echo"], after["framed"], after["data"]) == \
        ("after", "framed-reply", "data-reply"), diag(g, daemon)
    log = daemon.stderr()
    for port in (1, 2, 3):
        ids, ends = sessions(log, port)
        # one session before the rebind (reset), one after (the guest closed it)
        assert len(ids) == 2 and ids[1] > ids[0], diag(g, daemon, f"port {port}")
        assert ends == [(ids[0], "reset"), (ids[1], "guest-close")], \
            diag(g, daemon, f"port {port}: {ends}")
    # The console port works again too: its line reached the console backend's log file.
    console = (daemon.tmp / "console.log").read_bytes()
    assert b"console-after-rebind" in console, diag(g, daemon, f"console.log: {console!r}")
    print(f"E2E-METRIC test=rebind dev={metric(g, daemon, r, phase='before')['dev']} "
          f"sessions_reset={sum(len(v) for v in before.values())}")
    g.cleanup()


# ---------------------------------------------------------------------------- 5. pause/resume


PAUSE_MIB = 64


class ThrottledPeer:
    """The data port's host peer for the pause test: reads the guest's bytes (g2h) and then
    sends its own (h2g), slowly enough (about 3 s a direction) that the test can pause the VM
    in the middle; `progress` counts bytes read (g2h) or handed to the socket (h2g), `stall`
    (cleared) stops reading."""

    def __init__(self, sock: socket.socket, n: int, h2g: bytes) -> None:
        self.sock, self.n, self.h2g = sock, n, h2g
        self.phase = "g2h"
        self.progress = 0
        self.stall = threading.Event()
        self.stall.set()
        self.worker = Worker(self._run)

    def _run(self) -> dict[str, Any]:
        h = hashlib.sha256()
        buf = bytearray(MIB)
        next_nap = MIB
        while self.progress < self.n:
            self.stall.wait()
            k = self.sock.recv_into(buf, min(len(buf), self.n - self.progress))
            if not k:
                raise EOFError(f"g2h: EOF after {self.progress} bytes")
            h.update(memoryview(buf)[:k])
            self.progress += k
            if self.progress >= next_nap:
                next_nap += MIB
                time.sleep(0.04)
        ready = recv_exact(self.sock, 1)
        self.progress = 0  # before the phase: the test reads them unlocked
        self.phase = "h2g"
        view, chunk = memoryview(self.h2g), 256 << 10
        for off in range(0, self.n, chunk):
            self.sock.sendall(view[off:off + chunk])
            self.progress = off + len(view[off:off + chunk])
            time.sleep(0.01)
        ack = recv_exact(self.sock, 1)
        return {"g2h_sha": h.hexdigest(), "ready": ready, "ack": ack}


def test_pause_resume_keeps_sessions_and_bytes(rig, e2e_daemon, guests) -> None:  # type: ignore[no-untyped-def]
    """QMP stop/cont in the middle of a 64 MiB transfer each way (three pauses guest→host, one
    of them while the host peer is not reading so the guest's write is held in the ring; two
    host→guest): no session closes (no "closed:" line, no framed CLOSE), the bytes arrive
    exactly once (sha256), and nothing moves guest→host while the VM is stopped."""
    daemon = e2e_daemon
    n = PAUSE_MIB * MIB
    h2g = random.Random(0xC0FFEE).randbytes(n)
    h2g_sha = hashlib.sha256(h2g).hexdigest()
    sock = connect(daemon.tmp / "data.sock")
    wait_peer_connected(daemon, 2)
    framed = FramedPeer(daemon.tmp / "framed.sock")
    wait_peer_connected(daemon, 3)
    peer = ThrottledPeer(sock, n, h2g)
    g = make_guest(rig, daemon, "sess_bulk", {"mib": PAUSE_MIB, "hold": "org.vhostser.framed"})
    guests.append(g)
    pauses: list[dict[str, Any]] = []

    def pause_at(phase: str, fraction: float, *, stalled: bool = False) -> None:
        deadline = time.monotonic() + 40
        while not (peer.phase == phase and peer.progress >= fraction * n):
            assert peer.worker.is_alive() and time.monotonic() < deadline, \
                diag(g, daemon, f"{phase} never reached {fraction:.0%}: {peer.progress}")
            time.sleep(0.005)
        if stalled:
            peer.stall.clear()
            time.sleep(0.5)  # the guest's writes back up: the ring fills, a chain is held
        qmp = g.qmp()
        assert qmp.cmd("stop") == {"return": {}}
        at = peer.progress
        status = qmp.cmd("query-status")["return"]["status"]
        time.sleep(0.3)  # what was already on its way drains
        drained = 0
        if stalled:
            # The host reads again while the VM is stopped: it gets what the daemon took from
            # the ring before the stop (its peer queue, the socket buffers), then nothing.
            before = peer.progress
            peer.stall.set()
            time.sleep(0.5)
            drained = peer.progress - before
        p0 = peer.progress
        time.sleep(0.7)
        p1 = peer.progress
        assert qmp.cmd("cont") == {"return": {}}
        pauses.append({"phase": phase, "at": at, "status": status, "moved": p1 - p0,
                       "drained": drained, "stalled": stalled})
        assert status == "paused", diag(g, daemon, repr(pauses))
        assert at < n, diag(g, daemon, f"the {phase} transfer was over before the pause")

    try:
        peer.worker.start()
        g.start()
        mark(g, daemon, "g2h-start", 60)
        pause_at("g2h", 0.2)
        pause_at("g2h", 0.45)
        pause_at("g2h", 0.7, stalled=True)
        pause_at("h2g", 0.25)
        pause_at("h2g", 0.6)
        res = peer.worker.result(60)
        r = finish(g, daemon)
        end = framed.wait(lambda f: isinstance(f, framing.Close), 10)
        frames = framed.summary()
    except (OSError, TimeoutError, EOFError) as e:
        raise AssertionError(diag(g, daemon, f"host side: {e!r}; pauses {pauses}")) from e
    finally:
        sock.close()
        framed.close()
    info = f"pauses: {pauses}"
    g2h, back = metric(g, daemon, r, dir="g2h"), metric(g, daemon, r, dir="h2g")
    assert (res["ready"], res["ack"]) == (b"R", b"A"), diag(g, daemon, info)
    assert g2h["sha"] == res["g2h_sha"], diag(g, daemon, f"guest→host bytes differ; {info}")
    assert back["bytes"] == str(n) and back["sha"] == h2g_sha, \
        diag(g, daemon, f"host→guest bytes differ; {info}")
    for p in pauses:
        if p["phase"] == "g2h":
            # The guest is stopped: not a byte of it may reach the host (the stalled case
            # included: the held chain is given back to the ring, not delivered behind
            # QEMU's back).
            assert p["moved"] == 0, diag(g, daemon, f"bytes moved while stopped; {info}")
    # No session closed: the only closes are the guest's own at the end.
    log = daemon.stderr()
    assert sessions(log, 2) == ([1], [(1, "guest-close")]), diag(g, daemon, info)
    assert sessions(log, 3) == ([1], [(1, "guest-close")]), diag(g, daemon, info)
    assert sessions(log, 0)[1] in ([], [(1, "shutdown")]), diag(g, daemon, info)
    assert frames == [("OPEN", 1, "org.vhostser.framed"), ("CLOSE", 1, "guest-close")], \
        diag(g, daemon, f"framed peer saw {frames}; {info}")
    assert end == framing.Close(1, "guest-close"), diag(g, daemon, f"framed peer saw {frames}")
    print(f"E2E-METRIC test=pause pauses={len(pauses)} "
          + " ".join(f"{p['phase']}@{p['at'] * 100 // n}%moved={p['moved']}"
                   f"/drained={p['drained']}" for p in pauses))
    g.cleanup()


# ---------------------------------------------------------------------------- 6. hotplug


HOT_PORTS = 6
HOT_CONFIG = E2E_CONFIG.replace("max_ports = 4", f"max_ports = {HOT_PORTS}")


@pytest.fixture
def hot_daemon(tmp_path: Path) -> Iterator[Any]:
    """The daemon on E2E_CONFIG with room for hotplug (max_ports = 6: ids 4 and 5 free)."""
    assert f"max_ports = {HOT_PORTS}" in HOT_CONFIG, "E2E_CONFIG changed shape"
    d = Daemon(tmp_path, HOT_CONFIG)
    try:
        yield d
    finally:
        d.stop()


def ctl_ok(daemon: Any, g: Any, *args: str) -> str:
    res = daemon.ctl(*args)
    assert res.returncode == 0, diag(g, daemon, f"ctl {args}: rc={res.returncode}\n"
                                               f"{res.stdout}\n{res.stderr}")
    return res.stdout  # type: ignore[no-any-return]


def control_to_guest(daemon: Any, g: Any) -> int:
    stats = json.loads(ctl_ok(daemon, g, "--json", "stats"))
    return int(stats["device"]["control_to_guest"])


def test_hotplug_add_remove_port(rig, hot_daemon, guests) -> None:  # type: ignore[no-untyped-def]
    """`ctl add-port` makes a port appear in the running guest (echo round trip through it);
    `ctl remove-port` while the guest holds it open makes it disappear and closes the session
    with reason port-removed; added again under the same id, its next session has a new id."""
    daemon = hot_daemon
    name = "org.vhostser.hot"
    g = make_guest(rig, daemon, "sess_hotplug", {"name": name, "rounds": 2},
                   max_ports=HOT_PORTS)
    guests.append(g)
    g.start()
    ids: list[int] = []
    for rnd in (1, 2):
        mark(g, daemon, f"hot-wait round={rnd}")
        ctl_ok(daemon, g, "add-port", "--id", "4", "--name", name, "--backend", "echo")
        mark(g, daemon, f"hot-open round={rnd}", 40)
        deadline = time.monotonic() + 10
        while len(opened := sessions(daemon.stderr(), 4)[0]) < rnd:
            assert time.monotonic() < deadline, diag(g, daemon, "no session open on the hot port")
            time.sleep(0.05)
        sid = opened[-1]
        ids.append(sid)
        assert name in ctl_ok(daemon, g, "ports")
        ctl_ok(daemon, g, "remove-port", "4")
        closed = daemon.wait_log(rf"port 4 '{re.escape(name)}': session {sid} closed: (\S+)", 10)
        assert closed is not None and closed.group(1) == "port-removed", \
            diag(g, daemon, f"session {sid} of the removed port: {closed and closed.group(0)}")
        mark(g, daemon, f"hot-gone round={rnd}", 40)
        assert name not in ctl_ok(daemon, g, "ports")
    r = finish(g, daemon)
    assert [m["echo"] for m in r.metrics if "echo" in m] == ["hot-1", "hot-2"], diag(g, daemon)
    removed = [m for m in r.metrics if m.get("removed") == "1"]
    assert len(removed) == 2, diag(g, daemon)
    assert ids[0] >= 1 and ids[1] > ids[0], diag(g, daemon, f"session ids {ids} (never reused)")
    assert sessions(daemon.stderr(), 4) == (ids, [(i, "port-removed") for i in ids]), \
        diag(g, daemon)
    print(f"E2E-METRIC test=hotplug ids={ids} reader_rc={removed[0]['reader_rc']} "
          f"devnode={removed[0]['devnode']}")
    g.cleanup()


@pytest.mark.parametrize("check", ["close-frame", "quiet-after-remove"])
def test_hotplug_framed_port_removed(rig, hot_daemon, guests, check) -> None:  # type: ignore[no-untyped-def]
    """A hot-added framed unix port: the framed peer sees OPEN and the guest's DATA (it echoes
    it back in the session); then `ctl remove-port` while the guest holds it open.
    close-frame: the peer gets CLOSE(id, "port-removed") — the framing contract names
    port-removed as a close reason a peer is told. quiet-after-remove: the removed port's
    session machine does not move any more (no host PORT_OPEN for a port that is gone)."""
    daemon = hot_daemon
    name = "org.vhostser.hotframed"
    path = daemon.tmp / "hot.sock"
    g = make_guest(rig, daemon, "sess_hotplug", {"name": name}, max_ports=HOT_PORTS)
    guests.append(g)
    g.start()
    mark(g, daemon, "hot-wait round=1")
    ctl_ok(daemon, g, "add-port", "--id", "5", "--name", name, "--backend", "unix",
           "-o", f"path={path}", "-o", "mode=framed")
    peer = FramedPeer(path)
    try:
        wait_peer_connected(daemon, 5)
        opened = peer.wait(lambda f: isinstance(f, framing.Open), 40)
        assert isinstance(opened, framing.Open) and opened.name == name, \
            diag(g, daemon, f"framed peer: {peer.summary()}")
        sid = opened.session
        deadline = time.monotonic() + 20
        while data_of(peer.frames, sid) != b"hot-1\n":
            assert time.monotonic() < deadline, diag(g, daemon, repr(peer.summary()))
            time.sleep(0.02)
        peer.send(framing.Data(sid, b"hot-1\n"))
        mark(g, daemon, "hot-open round=1", 30)
        sent_before = control_to_guest(daemon, g)
        ctl_ok(daemon, g, "remove-port", "5")
        closed = daemon.wait_log(rf"port 5 '{re.escape(name)}': session {sid} closed: (\S+)", 10)
        assert closed is not None and closed.group(1) == "port-removed", diag(g, daemon)
        mark(g, daemon, "hot-gone round=1", 40)
        got = peer.wait(lambda f: isinstance(f, framing.Close), 10)
        time.sleep(0.5)
        sent = control_to_guest(daemon, g) - sent_before
        r = finish(g, daemon)
    finally:
        peer.close()
    assert metric(g, daemon, r, round="1", echo="hot-1")
    if check == "close-frame":
        assert got == framing.Close(sid, "port-removed"), \
            diag(g, daemon, f"framed peer saw {peer.summary()} (no CLOSE for the removed port)")
    else:
        log = daemon.stderr()
        after = log[log.index(f"port 5 '{name}' removed"):]
        moves = re.findall(r"^DEBUG vhostser\.console: port 5: [A-E] → .*$", after, re.M)
        assert not moves, diag(g, daemon, f"the removed port still changes state: {moves}; "
                                          f"{sent} control messages sent since remove-port")
        # DEVICE_REMOVE is the only control message the removal should send the guest.
        assert sent == 1, diag(g, daemon, f"{sent} control messages sent since remove-port")
    g.cleanup()


# ---------------------------------------------------------------------------- 4b. guest reboot


def test_guest_reboot_closes_sessions_with_reset(rig, e2e_daemon, guests) -> None:  # type: ignore[no-untyped-def]
    """A real guest reboot while ports are open: the rig runs QEMU with -no-reboot, but QMP
    `set-action reboot=reset` undoes that at run time, and `system_reset` then reboots the
    guest (a new kernel boots, the same test script runs again). Every session open before
    closes with reason reset, the framed peer gets CLOSE(id, "reset") then OPEN(new id), and
    the rebooted guest's ports work (echo round trip; the data peer, connected throughout,
    tells the second boot to finish)."""
    daemon = e2e_daemon
    data = connect(daemon.tmp / "data.sock")
    wait_peer_connected(daemon, 2)
    framed = FramedPeer(daemon.tmp / "framed.sock")
    try:
        wait_peer_connected(daemon, 3)
        g = make_guest(rig, daemon, "sess_reboot")
        guests.append(g)
        g.start()
        first_boot = mark(g, daemon, "reboot-holding").group(1)
        before = open_sessions(daemon.stderr(), range(4))
        assert all(len(before[p]) == 1 for p in (1, 2, 3)), diag(g, daemon, repr(before))
        first = framed.wait(lambda f: isinstance(f, framing.Open), 10)
        assert isinstance(first, framing.Open), diag(g, daemon, f"framed: {framed.summary()}")
        n_before = len(framed.frames)
        qmp = g.qmp()
        assert qmp.cmd("set-action", reboot="reset") == {"return": {}}
        assert qmp.cmd("system_reset") == {"return": {}}
        deadline = time.monotonic() + 60
        while len(re.findall(r"^E2E-MARK reboot-holding", g.log(), re.M)) < 2:
            assert g.running() and time.monotonic() < deadline, \
                diag(g, daemon, "the guest did not come back after system_reset")
            time.sleep(0.1)
        second_boot = re.findall(r"^E2E-MARK reboot-holding(.*)$", g.log(), re.M)[1]
        for port, ids in before.items():
            for sid in ids:
                m = daemon.wait_log(rf"port {port} '[^']*': session {sid} closed: (\S+)", 10)
                assert m is not None and m.group(1) == "reset", \
                    diag(g, daemon, f"port {port} session {sid}: {m and m.group(0)}")
        closed = framed.wait(lambda f: isinstance(f, framing.Close), 10, n_before)
        assert closed == framing.Close(first.session, "reset"), \
            diag(g, daemon, f"framed peer: {framed.summary()}")
        new = framed.wait(lambda f: isinstance(f, framing.Open), 10, n_before)
        assert isinstance(new, framing.Open) and new.session > first.session, \
            diag(g, daemon, f"framed peer: {framed.summary()}")
        data.sendall(b"done\n")
        r = finish(g, daemon)
    except OSError as e:
        raise AssertionError(diag(g, daemon, f"host peer: {e!r}")) from e
    finally:
        data.close()
        framed.close()
    assert first_boot != second_boot, diag(g, daemon, "not a new boot")
    assert metric(g, daemon, r, cmd="done", echo="ping")
    assert len(re.findall(r"^E2E-BOOT ", r.log, re.M)) == 2, diag(g, daemon)
    log = daemon.stderr()
    for port in (1, 2, 3):
        ids, ends = sessions(log, port)
        assert len(ids) == 2 and ids[1] > ids[0], diag(g, daemon, f"port {port}")
        assert ends[:1] == [(ids[0], "reset")], diag(g, daemon, f"port {port}: {ends}")
    g.cleanup()
