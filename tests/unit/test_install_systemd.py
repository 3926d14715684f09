"""bin/install-systemd refuses what would not work before touching anything, and the units it
installs name the paths a default install gives (the install itself, under a real systemd:
tests/systemd)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "bin" / "install-systemd"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INSTALLER), *args], capture_output=True, text=True, timeout=60)


def test_unknown_argument_is_refused_with_the_usage() -> None:
    r = _run("--prefixx", "/opt/x")
    assert r.returncode == 2
    assert "unknown argument --prefixx" in r.stderr and "--uninstall" in r.stdout


@pytest.mark.parametrize("prefix", ["/home/someone/vhostser", "/root/venv", "/tmp/vhostser",
                                    "/var/tmp/v", "/opt", "/usr"])
def test_a_prefix_the_unit_cannot_see_is_refused(prefix: str, tmp_path: Path) -> None:
    r = _run("--prefix", prefix, "--unit-dir", str(tmp_path / "units"))
    assert r.returncode == 1
    if os.geteuid() != 0:
        assert "run it as root" in r.stderr
    else:
        assert f"--prefix {prefix}:" in r.stderr, r.stderr
    assert not (tmp_path / "units").exists()  # refused before doing anything


@pytest.mark.skipif(os.geteuid() != 0, reason="the installer runs as root only")
def test_uninstall_touches_only_what_an_install_recorded() -> None:
    prefix = Path(tempfile.mkdtemp(prefix="vhostser-unit-", dir="/opt"))  # where installs go
    try:
        (prefix / "keep").write_text("not a vhostser install")
        r = _run("--uninstall", "--prefix", str(prefix))
        assert r.returncode == 1 and "was not installed by install-systemd" in r.stderr
        assert (prefix / "keep").exists()
    finally:
        shutil.rmtree(prefix)


def test_the_units_name_what_a_default_install_gives() -> None:
    text = INSTALLER.read_text()
    service = (ROOT / "systemd" / "vhostser@.service").read_text()
    # The installer rewrites these two paths for another --prefix / --doc-dir.
    assert "UNIT_BINARY=/opt/vhostser/bin/vhostser" in text and "PREFIX=/opt/vhostser" in text
    assert "UNIT_DOC=/usr/share/doc/vhostser" in text
    assert "DOC_DIR=/usr/share/doc/vhostser" in text
    assert "ExecStart=/opt/vhostser/bin/vhostser run --config /etc/vhostser/%i.toml" in service
    assert "RestartPreventExitStatus=78" in service  # cli.EX_CONFIG
    assert "Documentation=file:///usr/share/doc/vhostser/README.md" in service
