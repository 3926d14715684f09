"""The e2e tier: real QEMU 11 and a real Linux guest from ../shared/e2e against the daemon.

The rig is provisioned by `../shared/e2e/setup.sh` (bin/run-tests and .ci/run call it); the
`rig` fixture (tests/conftest.py) skips with the reason where it truly cannot run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST_TESTS = ROOT / "tests" / "guest"


# A VM config for the e2e tier: {tmp} is replaced by the test's directory.
E2E_CONFIG = """
[vm]
name = "e2e"
socket = "{tmp}/vu.sock"
max_ports = 4
state_dir = "{tmp}/state"
admin_socket = "{tmp}/ctl.sock"
frontend_grace = 30

[[port]]
id = 0
console = true
backend = {{ type = "console", path = "{tmp}/console.log", socket = "{tmp}/console.sock" }}

[[port]]
id = 1
name = "org.vhostser.echo"
backend = {{ type = "echo" }}

[[port]]
id = 2
name = "org.vhostser.data"
backend = {{ type = "unix", path = "{tmp}/data.sock", mode = "stream" }}

[[port]]
id = 3
name = "org.vhostser.framed"
backend = {{ type = "unix", path = "{tmp}/framed.sock", mode = "framed" }}
"""


class Daemon:
    """`vhostser run` as a child process, the way a user starts it: with the embedded default
    config (socket overridden), or with `config` (a TOML text; {tmp} → the test's dir)."""

    def __init__(self, tmp: Path, config: str | None = None, *args: str,
                 socket: str | None = None, admin: str | None = None) -> None:
        self.tmp = tmp
        self.socket = socket or str(tmp / "vu.sock")
        self.admin = admin or str(tmp / "ctl.sock")
        self.stdout_path = tmp / "daemon.stdout"
        self.stderr_path = tmp / "daemon.stderr"
        cmd = [sys.executable, "-m", "vhostser", "run", "--log-level", "debug", *args]
        if config is None:
            cmd += ["--socket", self.socket]
        else:
            path = tmp / "vm.toml"
            path.write_text(config.format(tmp=tmp))
            cmd += ["--config", str(path)]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.stderr()}")
            time.sleep(0.05)

    def stdout(self) -> bytes:
        return self.stdout_path.read_bytes()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`vhostser ctl --admin ... ARGS`, as a user runs it."""
        return subprocess.run(
            [sys.executable, "-m", "vhostser", "ctl", "--admin", self.admin, *args],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )

    def wait_log(self, pattern: str, timeout: float = 30) -> re.Match[str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.stderr(), re.M)
            if m:
                return m
            time.sleep(0.05)
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def daemon_class() -> type[Daemon]:
    """For tests that start daemons of their own (import-mode independent)."""
    return Daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The daemon on its embedded default config."""
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def e2e_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The daemon on E2E_CONFIG: console, echo, a unix stream port and a framed port."""
    d = Daemon(tmp_path, E2E_CONFIG)
    try:
        yield d
    finally:
        d.stop()
