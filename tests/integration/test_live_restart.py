"""Live restart through the fd store: a real daemon process under the service manager in a
box (vhostser.testing.manager: systemd's notify socket, fd store and LISTEN_FDS hand-over),
the testing front end and guest driver as QEMU and Linux. The daemon is killed with SIGKILL
(and stopped with SIGTERM, as `systemctl restart` does) while the guest uses an echo port;
the front end never reconnects, the guest never re-probes, the session keeps its id, and
every request is answered."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vhostser.testing import open_frontend
from vhostser.testing.console_driver import MAX_WRITE, ConsoleDriver
from vhostser.testing.manager import ServiceManager

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
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "live.toml"
        self.config.write_text(CONFIG.format(tmp=tmp))
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
    tmp = Path(tempfile.mkdtemp(prefix="vhs-live-"))
    s = Service(tmp)
    try:
        yield s
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
                ["state", "vu.conn", "vu.req", "vu.mem.0", "port1.staging"]
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
