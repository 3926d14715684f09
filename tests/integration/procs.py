"""Real `vhostser` processes for the command-line tests: a daemon started as a user starts
it (`python -m vhostser run`), known ready by its READY=1 on a real NOTIFY_SOCKET, the other
commands run to completion; and a guest echoing through the daemon's echo port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from vhostser.testing import FrontEnd, open_frontend
from vhostser.testing.console_driver import ConsoleDriver

ROOT = Path(__file__).resolve().parents[2]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    for var in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        if var not in extra:
            out.pop(var, None)
    return out


def vhostser(*args: str, timeout: float = 60, extra_env: dict[str, str] | None = None,
             stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """One command to completion, output captured as text."""
    return subprocess.run([sys.executable, "-m", "vhostser", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, stdin=stdin,
                          env=env(**(extra_env or {})))


class DaemonProc:
    """`vhostser run ARGS` in the background, its stderr in a file."""

    def __init__(self, tmp: Path, args: Sequence[str], *, name: str = "daemon",
                 pass_fds: Sequence[int] = ()) -> None:
        self.tmp = tmp
        self.stderr_path = tmp / f"{name}.stderr"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / f"{name}.notify"))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vhostser", "run", *args], cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                pass_fds=tuple(pass_fds),
                env=env(NOTIFY_SOCKET=str(tmp / f"{name}.notify")),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if b"READY=1" in self.notify.recv(4096):
                    return
            except TimeoutError:
                break
        raise AssertionError(f"the daemon did not get ready:\n{self.stderr()}")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.notify.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


async def echo_through(fe: FrontEnd, payload: bytes, port: str = "org.test.echo") -> bytes:
    """A guest on `fe` opens the echo port, writes `payload` and reads it back."""
    driver = ConsoleDriver(fe, max_ports=4)
    await driver.probe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.run)
        gport = await driver.wait_port(port)
        await driver.wait_for(lambda: gport.host_connected)
        await gport.open()
        await gport.write_all(payload)
        got = await gport.read_exactly(len(payload), timeout=10)
        nursery.cancel_scope.cancel()
    return got


async def guest_echo(path: str, payload: bytes) -> bytes:
    """`echo_through` a front end connecting to the vhost-user socket at `path`."""
    async with open_frontend(path) as fe:
        return await echo_through(fe, payload)
