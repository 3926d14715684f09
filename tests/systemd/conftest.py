"""The systemd tier: vhostser installed the documented way (bin/install-systemd) and run by a
real systemd — the machine's own 252, booted by ../shared/e2e/systemd-ns.sh as PID 1 of a
contained PID + mount namespace — with QEMU and the e2e guest outside it, connected to the
socket unit's socket through /proc/PID/root.

Nothing a real install uses is touched: the install goes to /opt/vhostser-test-<random> (its
link to a temporary directory, its docs under the prefix), the units to the namespace's
private /run/systemd/system; each VM has a name of its own, and its config in /etc/vhostser,
its state in /var/lib/vhostser and its log files in /var/log/vhostser (the machine's, seen
from inside) are removed afterwards, with those directories if the tier created them.

Skips, with the reason, where it cannot run: not root, no systemd / unshare / nsenter, no
systemd-ns.sh, no e2e rig.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "bin" / "install-systemd"
CONFIG_DIR = Path("/etc/vhostser")
STATE_DIR = Path("/var/lib/vhostser")
LOGS_DIR = Path("/var/log/vhostser")


def _skip_unless_possible(systemd_ns: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the systemd tier needs root (it boots systemd in a namespace, installs "
                    "under /opt)")
    for tool in ("systemctl", "journalctl", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install systemd util-linux)")
    if not os.path.exists("/lib/systemd/systemd"):
        pytest.skip("no /lib/systemd/systemd (apt-get install systemd)")
    if not systemd_ns.exists():
        pytest.skip(f"{systemd_ns} not found (set VHOSTSER_E2E_RIG)")


class ContainedSystemd:
    """systemd as PID 1 of a namespace: `pid` as seen from here; `run` runs a command inside."""

    def __init__(self, script: Path) -> None:
        self.script = str(script)
        r = subprocess.run(["bash", self.script, "start"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"systemd-ns.sh start failed: {r.stderr}")
        self.pid = int(r.stdout.split()[-1])

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", self.script, "run", str(self.pid), *cmd],
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} (inside) exited {r.returncode}:\n"
                                 f"{r.stdout}{r.stderr}")
        return r

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run("systemctl", *args, check=check).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout

    def outside(self, inside: str) -> str:
        """The path of the namespace's file `inside` as seen from here."""
        return f"/proc/{self.pid}/root{inside}"

    def stop(self) -> None:
        subprocess.run(["bash", self.script, "stop", str(self.pid)], timeout=60,
                       check=False)


class Install:
    """What bin/install-systemd put where (a test prefix, never a real install's)."""

    def __init__(self, prefix: Path, bin_dir: Path, unit_dir: str, output: str) -> None:
        self.prefix = prefix
        self.binary = prefix / "bin" / "vhostser"
        self.link = bin_dir / "vhostser"
        self.doc_dir = prefix / "share" / "doc" / "vhostser"
        self.unit_dir = unit_dir
        self.output = output


@pytest.fixture(scope="session")
def contained_systemd(rig) -> Iterator[ContainedSystemd]:  # type: ignore[no-untyped-def]
    script = Path(rig.__file__).parent / "systemd-ns.sh"  # beside the rig, in ../shared/e2e
    _skip_unless_possible(script)
    ns = ContainedSystemd(script)
    try:
        yield ns
    finally:
        ns.stop()


@contextlib.contextmanager
def _removed_if_created(*dirs: Path) -> Iterator[None]:
    """Directories the tier makes (or the daemon's units make) on the machine go again,
    if this run created them and they are empty."""
    absent = [d for d in dirs if not d.exists()]
    try:
        yield
    finally:
        for d in absent:
            with contextlib.suppress(OSError):
                d.rmdir()


@pytest.fixture(scope="session")
def installed(contained_systemd: ContainedSystemd) -> Iterator[Install]:
    """`bin/install-systemd`, exactly as the README says, with the paths moved aside: the
    units go to the namespace's /run/systemd/system."""
    prefix = Path(f"/opt/vhostser-test-{secrets.token_hex(4)}")
    bin_dir = Path(tempfile.mkdtemp(prefix="vhostser-sd-bin-"))
    unit_dir = contained_systemd.outside("/run/systemd/system")
    with _removed_if_created(CONFIG_DIR, STATE_DIR, LOGS_DIR):
        try:
            r = subprocess.run(
                [str(INSTALLER), "--prefix", str(prefix), "--unit-dir", unit_dir,
                 "--bin-dir", str(bin_dir), "--doc-dir", str(prefix / "share/doc/vhostser")],
                capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout + r.stderr
            contained_systemd.systemctl("daemon-reload")
            yield Install(prefix, bin_dir, unit_dir, r.stdout)
        finally:
            # Before the namespace goes: the manifest names /proc/PID/root/..., which must
            # still be that namespace's.
            subprocess.run([str(INSTALLER), "--uninstall", "--prefix", str(prefix)],
                           capture_output=True, text=True, timeout=120, check=False)
            shutil.rmtree(prefix, ignore_errors=True)
            shutil.rmtree(bin_dir, ignore_errors=True)


class VM:
    """One VM's units in the namespace: /etc/vhostser/NAME.toml, vhostser@NAME.socket; the
    vhost-user socket as QEMU outside sees it."""

    def __init__(self, ns: ContainedSystemd, install: Install) -> None:
        self.ns = ns
        self.install = install
        self.name = f"vhs-{secrets.token_hex(4)}"
        self.config = CONFIG_DIR / f"{self.name}.toml"
        self.service = f"vhostser@{self.name}.service"
        self.socket_unit = f"vhostser@{self.name}.socket"
        self.socket = ns.outside(f"/run/vhostser/{self.name}.sock")
        self.run_dir = f"/run/vhostser/{self.name}"  # RuntimeDirectory=, inside
        self.admin = f"{self.run_dir}/ctl.sock"
        self.log_files: list[Path] = []

    def log_file(self, what: str) -> Path:
        """A log file under the unit's LogsDirectory, removed after the test."""
        path = LOGS_DIR / f"{self.name}.{what}.log"
        self.log_files.append(path)
        return path

    def start(self, config: str) -> None:
        self.config.write_text(config)
        r = subprocess.run([str(self.install.binary), "check", str(self.config)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        self.ns.systemctl("start", self.socket_unit)

    def main_pid(self) -> int:
        return int(self.ns.show(self.service, "MainPID")["MainPID"])

    def wait_active(self, not_pid: int = 0, timeout: float = 30) -> int:
        """Until the service is active with a main PID other than `not_pid`; that PID."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.ns.show(self.service, "ActiveState", "SubState", "MainPID")
            pid = int(s.get("MainPID", "0"))
            if s.get("ActiveState") == "active" and pid not in (0, not_pid):
                return pid
            if s.get("ActiveState") == "failed" or time.monotonic() > deadline:
                raise AssertionError(f"{self.service} did not come back: {s}\n"
                                     f"{self.journal()[-3000:]}")
            time.sleep(0.02)

    def ctl(self, *args: str) -> str:
        r = subprocess.run([str(self.install.binary), "ctl", "--admin",
                            self.ns.outside(self.admin), *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def journal(self) -> str:
        return self.ns.journal(self.service)

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.journal()))

    def teardown(self) -> None:
        self.ns.systemctl("stop", self.socket_unit, self.service, check=False)
        self.ns.systemctl("reset-failed", self.socket_unit, self.service, check=False)
        self.config.unlink(missing_ok=True)
        for path in self.log_files:
            path.unlink(missing_ok=True)
        # StateDirectory=vhostser/%i: the machine's /var/lib, seen from inside.
        shutil.rmtree(STATE_DIR / self.name, ignore_errors=True)


@pytest.fixture
def vm(contained_systemd: ContainedSystemd, installed: Install) -> Iterator[VM]:
    v = VM(contained_systemd, installed)
    try:
        yield v
    finally:
        v.teardown()
