"""A real daemon process for hostile-input tests: `python -m vhostser run --config ...` in a
child process with its stderr in a file, an admin socket to ask it how it is, and a guest
(the testing FrontEnd plus ConsoleDriver) to drive it through its real vhost-user socket.

Whatever a test throws at it, the test then asks: is the process still there, does it still
answer (the admin socket, a valid vhost-user request, a new front-end connection), which log
line did it write, which counter moved, how much memory did it ever use (VmHWM)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vhostser import admin
from vhostser.testing import FrontEnd, open_frontend
from vhostser.testing.console_driver import ConsoleDriver, GuestPort
from vhostser.testing.process import memory_mb, open_fds

ROOT = Path(__file__).resolve().parents[2]
MAX_PORTS = 4
# The [vm] table of every config here (a template of {tmp} and {max_ports}); ports follow.
VM = """
[vm]
name = "hostile"
socket = "{tmp}/vu.sock"
max_ports = {max_ports}
admin_socket = "{tmp}/ctl.sock"
"""
CONFIG = VM + """
[[port]]
id = 1
name = "org.test.one"
backend = {{ type = "echo" }}

[[port]]
id = 2
name = "org.test.two"
backend = {{ type = "echo" }}
"""


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    tmp: Path

    @property
    def socket(self) -> str:
        return str(self.tmp / "vu.sock")

    def log(self) -> str:
        return (self.tmp / "stderr").read_text(errors="replace")

    def log_lines(self, *needles: str) -> list[str]:
        """The log lines that contain every one of `needles`."""
        return [line for line in self.log().splitlines() if all(n in line for n in needles)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def ask(self, cmd: str) -> Any:
        """One admin command, answered (or the test fails: a frozen daemon answers nothing)."""
        reply = await trio.to_thread.run_sync(
            lambda: admin.request(str(self.tmp / "ctl.sock"), {"cmd": cmd}, timeout=10.0)
        )
        assert reply.get("ok"), reply
        return reply["result"]

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.ask("stats")
        return result

    async def assert_responsive(self) -> None:
        assert self.alive(), self.log()
        status = await self.ask("status")
        assert status["vm"] == "hostile" and status["pid"] == self.proc.pid

    @property
    def config(self) -> Path:
        return self.tmp / "hostile.toml"

    def usage(self) -> tuple[float, float, int]:
        """VmRSS and VmHWM in MB, and the number of open fds, of the process now."""
        rss, hwm = memory_mb(self.proc.pid, ("VmRSS", "VmHWM"))
        return rss, hwm, open_fds(self.proc.pid)

    def vm_hwm(self) -> int:
        """The most resident memory the process ever had, in bytes (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/PID/status")


@contextmanager
def daemon_process(max_ports: int = MAX_PORTS,
                   config_text: str = CONFIG) -> Iterator[DaemonProcess]:
    """A daemon on `config_text` (VM and its ports; by default two echo ports, 1 and 2), up
    and answering its admin socket."""
    tmp = Path(tempfile.mkdtemp(prefix="vhs-hostile-"))
    config = tmp / "hostile.toml"
    config.write_text(config_text.format(tmp=tmp, max_ports=max_ports))
    with open(tmp / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostser", "run", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
    d = DaemonProcess(proc, tmp)
    try:
        deadline = time.monotonic() + 20
        while not (tmp / "ctl.sock").exists() or not Path(d.socket).exists():
            assert d.alive() and time.monotonic() < deadline, d.log()
            time.sleep(0.02)
        yield d
    finally:
        if d.alive():
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@asynccontextmanager
async def guest(
    d: DaemonProcess, *, mem_size: int = 16 << 20, **driver_args: Any
) -> AsyncIterator[tuple[FrontEnd, ConsoleDriver]]:
    """A front end connected to the daemon and a guest driver up on it (control task
    running), until the block ends."""
    async with open_frontend(d.socket, mem_size=mem_size) as fe:
        driver = ConsoleDriver(fe, max_ports=MAX_PORTS, **driver_args)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            yield fe, driver
            nursery.cancel_scope.cancel()


async def open_ports(driver: ConsoleDriver, *names: str) -> list[GuestPort]:
    """Open each named port in the guest, once its host side (the echo backend) is there."""
    ports = []
    for name in names:
        port = await driver.wait_port(name)
        await driver.wait_for(lambda port=port: port.host_connected)
        await port.open()
        ports.append(port)
    return ports


async def echo_works(d: DaemonProcess, payload: bytes = b"still here" * 100) -> None:
    """A new front end and guest get their bytes echoed on port 1: the daemon serves on."""
    with trio.fail_after(20):
        while (await d.ask("status"))["frontend_connected"]:
            await trio.sleep(0.01)
    async with guest(d) as (_, driver):
        (port,) = await open_ports(driver, "org.test.one")
        await port.write_all(payload)
        assert await port.read_exactly(len(payload), timeout=10) == payload
