"""Live restart through the fd store: a real daemon process under the service manager in a
box (vhostser.testing.manager: systemd's notify socket, fd store and LISTEN_FDS hand-over),
the testing front end and guest driver as QEMU and Linux. The daemon is killed with SIGKILL
(and stopped with SIGTERM, as `systemctl restart` does) while the guest uses an echo port;
the front end never reconnects, the guest never re-probes, the session keeps its id, and
every request is answered."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import termios
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostser.backends.framing import Close, Data, FrameDecoder, Open, encode_data
from vhostser.continuity import StateRegion
from vhostser.testing import open_frontend
from vhostser.testing.console_driver import MAX_WRITE, ConsoleDriver
from vhostser.testing.manager import ServiceManager

from .daemon_proc import running_guest

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[vm]
name = "live"
max_ports = 2
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}
"""


class Service:
    def __init__(self, tmp: Path, config: str = CONFIG) -> None:
        self.tmp = tmp
        self.config = tmp / "live.toml"
        self.config.write_text(config.format(tmp=tmp))
        self.vhost_path = str(tmp / "live.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.vhost_path)
        self.listener.listen(8)
        self.manager = ServiceManager(tmp, {"vhost-user": self.listener.fileno()})
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start(self) -> float:
        self.manager.start(
            [sys.executable, "-m", "vhostser", "run", "--config", str(self.config),
             "--log-level", "debug"], self.env, self.tmp / "stderr")
        return self.manager.wait_ready()

    def stderr(self) -> str:
        return (self.tmp / "stderr").read_text(errors="replace")

    def ctl(self, *args: str) -> object:
        r = subprocess.run([sys.executable, "-m", "vhostser", "ctl", "--admin",
                            str(self.tmp / "ctl.sock"), "--json", *args],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


@pytest.fixture
def service() -> Iterator[Service]:
    with a_service() as s:
        yield s


@contextmanager
def a_service(config: str = CONFIG) -> Iterator[Service]:
    """A Service in a directory of its own (its daemon's stderr printed on failure with
    LIVE_DEBUG=1), gone afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="vhs-live-"))
    s = Service(tmp, config)
    try:
        yield s
    except BaseException:
        if os.environ.get("LIVE_DEBUG"):
            print(s.stderr()[-20000:])
        raise
    finally:
        s.manager.close()
        s.listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_the_guest_notices_no_restart(service: Service) -> None:
    service.start()
    async with open_frontend(service.vhost_path) as fe:
        driver = ConsoleDriver(fe, max_ports=2)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            port = await driver.wait_port("org.test.echo")
            await driver.wait_for(lambda: port.host_connected)
            await port.open()
            controls = len(driver.received)
            gaps: list[float] = []
            for restart in range(6):
                message = f"ping {restart} ".encode() * 100
                await port.write_all(message)
                assert await port.read_exactly(len(message), timeout=10) == message
                if restart % 3 == 2:
                    assert service.manager.terminate() == 0  # systemctl restart
                else:
                    service.manager.kill()  # kill -9
                # Written while no daemon runs: the ring holds it for the next one.
                t0 = trio.current_time()
                await port.write_all(b"while away;")
                await trio.to_thread.run_sync(service.start)
                assert await port.read_exactly(11, timeout=10) == b"while away;"
                gaps.append(trio.current_time() - t0)
            # What the store holds is exactly what the live daemon uses: no fd leaked
            # across six restarts.
            assert service.manager.names() == sorted(
                ["state", "vu.conn", "vu.req", "vu.mem.0", "port1.staging",
                 "port1.counters"]
                + [f"vu.{kind}.{i}" for kind in ("kick", "call", "err") for i in range(6)])
            nursery.cancel_scope.cancel()
        # The guest saw no control message since it opened the port: no re-probe, no
        # host close, nothing.
        assert driver.received[controls:] == []
    print(f"restart to echo: {', '.join(f'{g * 1000:.0f} ms' for g in gaps)}")
    sessions = service.ctl("sessions")
    assert sessions == [{"port": 1, "name": "org.test.echo", "session": 1, "state": "A",
                         "state_name": "open (guest+host)", "restored": False}]
    # The daemon's own count of what the store holds (what tests/systemd compares with
    # systemd's NFileDescriptorStore).
    status = service.ctl("status")
    assert isinstance(status, dict) and status["fd_store"] == len(service.manager.names())
    log = service.stderr()
    assert log.count("resumed the front end's connection") == 6
    assert log.count("front end connected") == 1  # one connection, never a second
    assert "session 1 closed" not in log and "session 2" not in log


def one_chain_repeated_at_most(received: bytes, sent: bytes, chain: int) -> int:
    """How many chains `received` repeats of `sent` (0 or 1), where a repeat is one guest
    write of `chain` bytes delivered twice in a row; AssertionError for anything else (a byte
    lost, reordered, or more repeated)."""
    if received == sent:
        return 0
    for start in range(0, len(sent), chain):
        end = min(start + chain, len(sent))
        if received == sent[:end] + sent[start:end] + sent[end:]:
            return 1
    raise AssertionError(f"{len(received)} bytes received are not the {len(sent)} sent "
                         "with at most one write repeated")


async def test_kill_mid_transfer_loses_nothing(service: Service) -> None:
    """SIGKILL while the echo port has guest writes in flight and echoed bytes staged: after
    the restart every byte comes back, at most one write (one chain) twice per kill."""
    service.start()
    repeats = 0
    async with open_frontend(service.vhost_path) as fe:
        driver = ConsoleDriver(fe, max_ports=2)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            port = await driver.wait_port("org.test.echo")
            await driver.wait_for(lambda: port.host_connected)
            await port.open()
            for kill in range(5):
                sent = bytes([65 + kill]) * (3 * MAX_WRITE) + os.urandom(MAX_WRITE)
                received = bytearray()

                async def reader(n: int, into: bytearray) -> None:
                    while len(into) < n:
                        into.extend(await port.read(timeout=10))

                async with trio.open_nursery() as io:
                    io.start_soon(reader, len(sent), received)
                    await port.write_all(sent)
                    await trio.sleep(0.001 * kill)  # kill at different moments
                    service.manager.kill()
                    await trio.to_thread.run_sync(service.start)
                # A repeated write arrives after its first copy: collect what may follow.
                with trio.move_on_after(0.5):
                    while True:
                        received.extend(await port.read(timeout=None))
                repeats += one_chain_repeated_at_most(bytes(received), sent, MAX_WRITE)
            nursery.cancel_scope.cancel()
    print(f"{repeats} writes repeated over 5 kills")
    assert service.ctl("sessions") == [
        {"port": 1, "name": "org.test.echo", "session": 1, "state": "A",
         "state_name": "open (guest+host)", "restored": False}]


def test_a_newer_state_is_left_for_a_daemon_that_reads_it(service: Service) -> None:
    """An upgrade in place goes forward only: a daemon that finds a state region of a version
    it does not know refuses it with one line and exits, and the store keeps every fd for a
    daemon that reads it (the one that wrote it, put back)."""
    service.start()
    service.manager.terminate()  # a hand-over: the state region stays in the store
    names = service.manager.names()
    (state_fd,) = [fd for n, fd in service.manager.store if n == "state"]
    region = StateRegion(os.dup(state_fd))
    doc = region.read()
    doc["version"] = 99  # what a newer vhostser would write
    region.write(doc)
    region.close()
    service.manager.start(
        [sys.executable, "-m", "vhostser", "run", "--config", str(service.config)],
        service.env, service.tmp / "stderr")
    assert service.manager.proc is not None and service.manager.proc.wait(20) == 1
    assert ("the stored state is version 99, this vhostser resumes versions 1, 2: leaving "
            "every fd in the store for a vhostser that reads it") in service.stderr()
    assert service.manager.names() == names


def test_an_older_state_is_resumed(service: Service) -> None:
    """An upgrade from the previous release: its state (version 1, no backends' continuity)
    is resumed, not refused."""
    service.start()
    service.manager.terminate()
    (state_fd,) = [fd for n, fd in service.manager.store if n == "state"]
    region = StateRegion(os.dup(state_fd))
    doc = region.read()
    doc["version"] = 1
    del doc["backends"]
    region.write(doc)
    region.close()
    service.start()  # the successor's stderr
    log = service.stderr()
    assert service.manager.terminate() == 0
    assert "resuming from the fd store" in log and "leaving every fd" not in log, log


ACTIONS = st.lists(
    st.one_of(
        st.integers(1, 3 * MAX_WRITE).map(lambda n: ("write", n)),
        st.just(("kill", 0)),
        st.just(("term", 0)),
        st.just(("read", 0)),
        st.just(("pause", 0)),
    ),
    min_size=3, max_size=10,
)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=ACTIONS)
def test_any_traffic_script_survives_any_kills(script: list[tuple[str, int]]) -> None:
    """A traffic script with kills, planned restarts and VM pauses at arbitrary points: in the
    end every byte the guest wrote came back, in order, with at most one write repeated per
    SIGKILL (none for a planned restart), and the session never changed."""
    with a_service() as service:
        trio.run(_run_script, service, script)


async def _run_script(service: Service, script: list[tuple[str, int]]) -> None:
    service.start()
    sent = bytearray()
    received = bytearray()
    kills = 0
    async with open_frontend(service.vhost_path) as fe:
        driver = ConsoleDriver(fe, max_ports=2)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            port = await driver.wait_port("org.test.echo")
            await driver.wait_for(lambda: port.host_connected)
            await port.open()

            async def read_all() -> None:
                while True:
                    received.extend(await port.read(timeout=None))

            nursery.start_soon(read_all)
            for i, (action, n) in enumerate(script):
                if action == "write":
                    data = random.Random(i).randbytes(n)
                    sent.extend(data)
                    with trio.fail_after(30):
                        await port.write_all(data)
                elif action in ("kill", "term"):
                    if action == "kill":
                        service.manager.kill()
                        kills += 1
                    else:
                        assert service.manager.terminate() == 0
                    await trio.to_thread.run_sync(service.start)
                elif action == "pause":
                    await fe.stop(pause=True)
                    await fe.resume()
                else:
                    await trio.sleep(0.05)
            with trio.move_on_after(20):
                while len(received) < len(sent):
                    await trio.sleep(0.01)
            await trio.sleep(0.3)  # a repeated write arrives after its first copy
            nursery.cancel_scope.cancel()
    assert _repeats_within(bytes(received), bytes(sent), MAX_WRITE) <= kills
    sessions = service.ctl("sessions")
    assert isinstance(sessions, list) and [s["session"] for s in sessions] == [1]
    # The ledger is exact across kills too: its counts are stores into a memfd in the store.
    stats = service.ctl("stats")
    assert isinstance(stats, dict)
    ledger = stats["ports"]["1"]["ledger"]
    for direction in ("to_guest", "from_guest"):
        entry = ledger[direction]
        assert entry["balanced"] and entry["pending"] == 0 and not entry["dropped"], ledger
        assert len(sent) <= entry["accepted"] <= len(sent) + kills * MAX_WRITE, ledger


def _repeats_within(received: bytes, sent: bytes, chain: int) -> int:
    """How many guest writes (chains of at most `chain` bytes) `received` repeats of `sent`,
    each repeat right after its first copy; AssertionError if a byte is missing or out of
    order beyond that."""
    i = j = repeats = 0
    while i < len(sent):
        if received[j:j + 1] == sent[i:i + 1]:
            i += 1
            j += 1
            continue
        # A repeat: some suffix of what came before, at most one chain long, came again.
        for back in range(1, min(chain, j) + 1):
            if received[j:j + back] == received[j - back:j]:
                j += back
                repeats += 1
                break
        else:
            raise AssertionError(f"byte {i} of {len(sent)} sent missing at {j} of "
                                 f"{len(received)} received")
    assert j == len(received) or received[j:] == received[j - (len(received) - j):j], (
        f"{len(received) - j} bytes received beyond what was sent")
    return repeats + (j < len(received))


PEERS_CONFIG = """
[vm]
name = "live"
max_ports = 3
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.test.stream"
backend = {{ type = "unix", path = "{tmp}/stream.sock" }}

[[port]]
id = 2
name = "org.test.framed"
backend = {{ type = "unix", path = "{tmp}/framed.sock", mode = "framed" }}
"""

# What one peer may see twice after a SIGKILL: the chain the successor takes again, or the
# last write to its socket (backends.peers WRITE_CHUNK) — whichever is longer.
PEER_REPEAT = 64 * 1024


async def test_host_peers_stay_connected_across_restarts() -> None:
    """A stream peer and a framed peer, both ways, across two `systemctl restart`s and two
    SIGKILLs: the peers' connections are the same throughout (never an EOF or a reset),
    the framed peer sees one OPEN and no CLOSE, and every byte arrives both ways: exactly
    after a planned restart, with at most one stretch repeated per kill and direction."""
    with a_service(PEERS_CONFIG) as service:
        await _peers_across_restarts(service)


async def _peers_across_restarts(service: Service) -> None:
    service.start()
    async with open_frontend(service.vhost_path) as fe:
        driver = ConsoleDriver(fe, max_ports=3)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            stream_port = await driver.wait_port("org.test.stream")
            framed_port = await driver.wait_port("org.test.framed")
            stream_peer = await _connect(str(service.tmp / "stream.sock"))
            framed_peer = await _connect(str(service.tmp / "framed.sock"))
            await driver.wait_for(lambda: stream_port.host_connected
                                  and framed_port.host_connected)
            await stream_port.open()
            await framed_port.open()
            frames = FrameDecoder(accept_open=True)
            seen: list[Open | Data | Close] = []

            async def framed_reader() -> None:
                while data := await framed_peer.receive_some(1 << 16):
                    frames.feed(data)
                    seen.extend(frames)
                raise AssertionError("the framed peer's connection ended")

            with trio.fail_after(10):
                while not seen:
                    frames.feed(await framed_peer.receive_some(1 << 16))
                    seen.extend(frames)
            assert seen == [Open(1, "org.test.framed")]
            nursery.start_soon(framed_reader)
            for phase, action in enumerate(["term", "kill", "term", "kill"]):
                rng = random.Random(phase)
                g2h, h2g = rng.randbytes(1 << 20), rng.randbytes(1 << 20)
                got_g2h, got_h2g, got_framed_h2g = bytearray(), bytearray(), bytearray()
                seen_before = len(seen)

                async def host_reader(into: bytearray = got_g2h) -> None:
                    while True:
                        data = await stream_peer.receive_some(1 << 16)
                        assert data, "the stream peer's connection ended"
                        into.extend(data)

                async def guest_reader(port: Any, into: bytearray) -> None:
                    while True:
                        into.extend(await port.read(timeout=None))

                async with trio.open_nursery() as io:
                    io.start_soon(host_reader)
                    io.start_soon(guest_reader, stream_port, got_h2g)
                    io.start_soon(guest_reader, framed_port, got_framed_h2g)
                    io.start_soon(stream_port.write_all, g2h)
                    io.start_soon(framed_port.write_all, g2h)
                    io.start_soon(stream_peer.send_all, h2g)
                    io.start_soon(framed_peer.send_all, b"".join(encode_data(1, h2g)))
                    await trio.sleep(0.05 + 0.05 * phase)  # mid-transfer
                    if action == "kill":
                        service.manager.kill()
                    else:
                        assert service.manager.terminate() == 0
                    await trio.to_thread.run_sync(service.start)

                    def framed_g2h(start: int = seen_before) -> bytes:
                        return b"".join(f.data for f in seen[start:]
                                        if isinstance(f, Data))

                    with trio.fail_after(60):
                        while min(len(got_g2h), len(got_h2g), len(got_framed_h2g),
                                  len(framed_g2h())) < len(g2h):
                            await trio.sleep(0.02)
                    await trio.sleep(0.3)  # a repeated stretch arrives after its first copy
                    io.cancel_scope.cancel()
                allowed = 1 if action == "kill" else 0
                for what, got, sent in [("stream g2h", got_g2h, g2h),
                                        ("stream h2g", got_h2g, h2g),
                                        ("framed g2h", framed_g2h(), g2h),
                                        ("framed h2g", got_framed_h2g, h2g)]:
                    repeats = _repeats_within(bytes(got), sent, PEER_REPEAT)
                    assert repeats <= allowed, f"{action} #{phase}: {what} repeated {repeats}"
            assert all(isinstance(f, Data) for f in seen[1:]), "a second OPEN or a CLOSE"
            names = service.manager.names()
            status = await trio.to_thread.run_sync(service.ctl, "status")
            nursery.cancel_scope.cancel()
    expected = {"port1.listen", "port1.peer.1", "port1.peerq.1", "port1.staging",
                "port1.counters", "port2.listen", "port2.peer.1", "port2.peerq.1",
                "port2.peerin.1", "port2.staging", "port2.counters"}
    assert expected <= set(names), names
    assert not {n for n in names if n.startswith("port")} - expected, names
    assert isinstance(status, dict) and status["fd_store"] == len(names)
    log = service.stderr()
    assert log.count("taken back from the predecessor") == 8
    assert log.count("front end connected") == 1


async def _connect(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return trio.SocketStream(sock)


PTY_CONFIG = """
[vm]
name = "live"
max_ports = 2
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.test.pty"
backend = {{ type = "pty", link = "{tmp}/pty" }}
"""


async def _pty_write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(fd)
        try:
            view = view[os.write(fd, view[:4096]):]
        except BlockingIOError:
            pass


async def test_a_pty_is_the_same_across_restarts() -> None:
    """A terminal attached to a pty port (the slave, opened once) goes on through two
    `systemctl restart`s and two SIGKILLs: the same /dev/pts/N behind the link, never a
    hang-up or EIO, every byte both ways (a chunk repeated at most once per kill and
    direction, exactly after a planned restart), raw mode kept."""
    with a_service(PTY_CONFIG) as service:
        service.start()
        async with running_guest(service.vhost_path, max_ports=2) as driver:
            port = await driver.wait_port("org.test.pty")
            await port.open()
            path = os.readlink(service.tmp / "pty")
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                await _pty_across_restarts(service, port, fd, path)
                assert termios.tcgetattr(fd)[3] & (termios.ECHO | termios.ICANON) == 0
            finally:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
            names = service.manager.names()
        assert service.stderr().count("taken back from the predecessor") == 4
    assert {n for n in names if n.startswith("port")} == {
        "port1.pty", "port1.pty.slave", "port1.ptyq", "port1.ptyin", "port1.staging",
        "port1.counters"}, names


async def _pty_across_restarts(service: Service, port: Any, fd: int, path: str) -> None:
    async def terminal_read() -> bytes:
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, 1 << 16)
            except BlockingIOError:
                continue

    for phase, action in enumerate(["term", "kill", "term", "kill"]):
        await _both_ways_across(service, action, phase, port, terminal_read,
                                functools.partial(_pty_write_all, fd), 256 << 10, MAX_WRITE)
        assert os.readlink(service.tmp / "pty") == path


async def _both_ways_across(service: Service, action: str, phase: int, port: Any,
                            host_receive: Callable[[], Awaitable[bytes]],
                            host_send: Callable[[bytes], Awaitable[object]], size: int,
                            window: int) -> bytes:
    """`size` random bytes each way at once, between the guest's `port` and a host side,
    with `action` ("kill": SIGKILL, "term": a planned restart) in the middle: every byte
    arrives, a stretch of at most `window` bytes repeated at most once per direction for a
    kill, never for a planned restart. What the host side received."""
    rng = random.Random(phase)
    g2h, h2g = rng.randbytes(size), rng.randbytes(size)
    got_g2h, got_h2g = bytearray(), bytearray()

    async def host_reader() -> None:
        while True:
            data = await host_receive()
            assert data, "the host side's connection ended"
            got_g2h.extend(data)

    async def guest_reader() -> None:
        while True:
            got_h2g.extend(await port.read(timeout=None))

    async with trio.open_nursery() as io:
        io.start_soon(host_reader)
        io.start_soon(guest_reader)
        io.start_soon(port.write_all, g2h)
        io.start_soon(host_send, h2g)
        await trio.sleep(0.05 + 0.05 * phase)  # mid-transfer
        if action == "kill":
            service.manager.kill()
        else:
            assert service.manager.terminate() == 0
        await trio.to_thread.run_sync(service.start)
        with trio.fail_after(60):
            while min(len(got_g2h), len(got_h2g)) < size:
                await trio.sleep(0.02)
        await trio.sleep(0.3)  # a repeated stretch arrives after its first copy
        io.cancel_scope.cancel()
    allowed = 1 if action == "kill" else 0
    for what, got, sent in [("g2h", got_g2h, g2h), ("h2g", got_h2g, h2g)]:
        repeats = _repeats_within(bytes(got), sent, window)
        assert repeats <= allowed, f"{action} #{phase}: {what} repeated {repeats}"
    return bytes(got_g2h)


CONSOLE_CONFIG = """
[vm]
name = "live"
max_ports = 2
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.test.console"
[port.backend]
type = "console"
path = "{tmp}/console.log"
socket = "{tmp}/console.sock"
scrollback = 4
reader_queue = "1M"
"""


async def test_console_readers_stay_attached_across_restarts() -> None:
    """A console reader that is the writer stays connected through two `systemctl
    restart`s and two SIGKILLs: it gets every byte the guest writes and the guest every
    byte it types (a stretch repeated at most once per kill and direction, exactly after a
    planned restart), and stays the writer; a reader arriving afterwards gets the
    scrollback, which outlived the processes too."""
    with a_service(CONSOLE_CONFIG) as service:
        service.start()
        async with running_guest(service.vhost_path, max_ports=2) as driver:
            port = await driver.wait_port("org.test.console")
            await port.open()
            reader = await _connect(str(service.tmp / "console.sock"))
            seen = bytearray()
            for phase, action in enumerate(["term", "kill", "term", "kill"]):
                seen += await _both_ways_across(
                    service, action, phase, port, functools.partial(reader.receive_some,
                                                                    1 << 16),
                    reader.send_all, 128 << 10, PEER_REPEAT)
            late = await _connect(str(service.tmp / "console.sock"))
            scrollback = bytearray()
            with trio.fail_after(10):
                while len(scrollback) < 4096:
                    scrollback.extend(await late.receive_some(1 << 16))
            assert scrollback == seen[-4096:]
            stats = await trio.to_thread.run_sync(service.ctl, "stats")
        assert service.stderr().count("taken back from the predecessor") == 4
    assert isinstance(stats, dict)
    backend = stats["ports"]["1"]["backend"]
    assert backend["writers"] == 1 and backend["input_dropped"] == 0, backend


FILE_CONFIG = """
[vm]
name = "live"
max_ports = 2
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.test.log"
backend = {{ type = "file", path = "{tmp}/guest.log", append = false }}
"""


async def test_a_log_file_is_the_same_file_across_restarts() -> None:
    """The open log file is in the store: a successor writes on to the very file — not
    truncated again (append = false truncates once, at the first start), and the renamed
    one if it was renamed since (the path is taken anew only at SIGHUP)."""
    with a_service(FILE_CONFIG) as service:
        log_path = service.tmp / "guest.log"
        log_path.write_bytes(b"from before the first start\n")
        service.start()
        async with running_guest(service.vhost_path, max_ports=2) as driver:
            port = await driver.wait_port("org.test.log")
            await port.open()
            written = b""
            for i, action in enumerate(["kill", "term", "rename", "kill"]):
                line = f"line {i}\n".encode()
                await port.write_all(line)
                written += line
                with trio.fail_after(10):
                    while not log_path.read_bytes().endswith(line):
                        await trio.sleep(0.02)
                if action == "rename":
                    log_path.rename(service.tmp / "guest.log.1")
                    log_path = service.tmp / "guest.log.1"
                    continue
                if action == "kill":
                    service.manager.kill()
                else:
                    assert service.manager.terminate() == 0
                await trio.to_thread.run_sync(service.start)
            await port.write_all(b"last\n")
            with trio.fail_after(10):
                while not log_path.read_bytes().endswith(b"last\n"):
                    await trio.sleep(0.02)
        assert log_path.read_bytes() == written + b"last\n"
        assert not (service.tmp / "guest.log").exists()
