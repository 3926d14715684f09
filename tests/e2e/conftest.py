"""The e2e tier: real QEMU 11 and a real Linux guest from ../shared/e2e against the daemon.

The rig is provisioned by `../shared/e2e/setup.sh` (bin/run-tests and .ci/run call it). Where
it truly cannot run (no rig directory, or its QEMU is missing), tests skip with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RIG_DIR = Path(os.environ.get("VHOSTSER_E2E_RIG", ROOT.parent / "shared" / "e2e"))
GUEST_TESTS = ROOT / "tests" / "guest"


def _rig():  # type: ignore[no-untyped-def]
    if not (RIG_DIR / "rig.py").exists():
        pytest.skip(f"e2e rig not found at {RIG_DIR} (set VHOSTSER_E2E_RIG)")
    sys.path.insert(0, str(RIG_DIR))
    import rig  # type: ignore[import-not-found]

    qemu = rig.qemu_binary()
    if not os.path.exists(qemu):
        pytest.skip(f"{qemu} missing: run {RIG_DIR}/setup.sh")
    return rig


@pytest.fixture(scope="session")
def rig():  # type: ignore[no-untyped-def]
    return _rig()


class Daemon:
    """`vhostser run` as a child process, the way a user starts it."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.socket = str(tmp / "vu.sock")
        self.stdout_path = tmp / "daemon.stdout"
        self.stderr_path = tmp / "daemon.stderr"
        cmd = [sys.executable, "-m", "vhostser", "run", "--socket", self.socket,
               "--log-level", "debug", *args]
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
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()
