"""A daemon as a child process, started the way a user or systemd starts it: `python -m
vhostser run --config FILE`, with a real NOTIFY_SOCKET (READY=1 says when it serves), its
stderr kept in a file, and `vhostser ctl` against its admin socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from vhostser.testing import open_frontend
from vhostser.testing.console_driver import ConsoleDriver

ROOT = Path(__file__).resolve().parents[2]


def notifications(sock: socket.socket, want: str, timeout: float,
                  stderr: Callable[[], str]) -> list[str]:
    """Datagrams received on the NOTIFY_SOCKET `sock` until one contains `want`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if want in got[-1]:
            return got
    raise AssertionError(f"no {want!r} from the daemon; got {got}\n{stderr()}")


class DaemonProcess:
    def __init__(self, tmp: Path, config: str, *, name: str = "vm",
                 stdout: int | None = subprocess.DEVNULL,
                 preexec_fn: Callable[[], None] | None = None, admin: str = "ctl.sock",
                 env: Mapping[str, str] | None = None) -> None:
        """Start a daemon on `config` (a TOML text; {tmp} → `tmp`) without waiting for it;
        `admin`: its admin socket, relative to `tmp`; `env`: added to its environment."""
        self.tmp = tmp
        self.admin = str(tmp / admin)
        self.config = tmp / f"{name}.toml"
        self.config.write_text(config.format(tmp=tmp))
        self.stderr_path = tmp / f"{name}.stderr"
        notify_path = tmp / f"{name}.notify"
        notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        environ = dict(os.environ, NOTIFY_SOCKET=str(notify_path), **(env or {}))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vhostser", "run", "--config", str(self.config),
                 "--log-level", "debug"],
                cwd=ROOT, env=environ, stdout=stdout, stderr=err, preexec_fn=preexec_fn,
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def notifications(self, want: str, timeout: float = 20) -> list[str]:
        """sd_notify datagrams received until one contains `want`."""
        return notifications(self.notify, want, timeout, self.stderr)

    def ready(self) -> DaemonProcess:
        self.notifications("READY=1")
        return self

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vhostser", "ctl", "--admin", self.admin, *args],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )

    def ctl_json(self, *args: str) -> Any:
        r = self.ctl("--json", *args)
        assert r.returncode == 0, (r.stdout, r.stderr, self.stderr())
        return json.loads(r.stdout)

    def wait_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.stderr()}"
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


@contextmanager
def daemon_process(tmp: Path, config: str, **kwargs: Any) -> Iterator[DaemonProcess]:
    """A started daemon, killed at the end if it is still running."""
    d = DaemonProcess(tmp, config, **kwargs)
    try:
        yield d
    finally:
        d.close()


@asynccontextmanager
async def running_guest(path: str | os.PathLike[str],
                        max_ports: int = 4) -> AsyncIterator[ConsoleDriver]:
    """A guest driver up and running behind a front end on the vhost-user socket `path`,
    until the block ends."""
    async with open_frontend(path) as fe:
        driver = ConsoleDriver(fe, max_ports=max_ports)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            yield driver
            nursery.cancel_scope.cancel()


async def guest_echo(path: str, payload: bytes) -> bytes:
    """A guest that writes `payload` to port org.test.echo and reads as much back."""
    async with running_guest(path) as driver:
        port = await driver.wait_port("org.test.echo")
        await driver.wait_for(lambda: port.host_connected)
        await port.open()
        await port.write_all(payload)
        return await port.read_exactly(len(payload), timeout=10)
