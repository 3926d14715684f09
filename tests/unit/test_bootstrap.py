"""bin/bootstrap (sourced by bin/vhostser and bin/run-tests) keeps pip's chatter (the "new
release of pip" notice, the running-as-root warning, build-backend warnings) out of what the
user sees before the daemon's first lines: pip is told to keep its notices to itself, and
what it prints anyway goes to a log that is shown only when the install fails. Real bash on
the real script, with a stand-in for the venv's python that talks like pip."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/bin/bash
echo "[notice] A new release of pip is available: 1 -> 2" >&2
echo "WARNING: Running pip as the 'root' user can result in broken permissions" >&2
echo "$* | $PIP_ROOT_USER_ACTION $PIP_DISABLE_PIP_VERSION_CHECK" >> "$(dirname "$0")/../calls"
if [ -n "${FAIL:-}" ]; then echo "ERROR: no matching distribution" >&2; exit 1; fi
"""


def bootstrap(venv: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_ROOT_USER_ACTION", "PIP_DISABLE_PIP_VERSION_CHECK")}
    return subprocess.run(["bash", "-c", ". bin/bootstrap && bootstrap"], cwd=ROOT,
                          env={**env, "VHOSTSER_VENV": str(venv), **extra},
                          capture_output=True, text=True, timeout=120)


def test_pip_notices_stay_out_of_the_first_start(tmp_path: Path) -> None:
    r = bootstrap(tmp_path / "venv")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"bootstrap: installing this checkout into {tmp_path}/venv (once; pip's log: "
        f"{tmp_path}/venv/pip.log)"]
    calls = (tmp_path / "venv" / "calls").read_text().splitlines()
    assert [c.split(" | ")[1] for c in calls] == ["ignore 1", "ignore 1"]
    assert "Running pip as the 'root' user" in (tmp_path / "venv" / "pip.log").read_text()
    # Installed: the next start says nothing at all.
    again = bootstrap(tmp_path / "venv")
    assert again.returncode == 0 and again.stderr == ""


def test_a_failing_install_shows_what_pip_said(tmp_path: Path) -> None:
    r = bootstrap(tmp_path / "venv", FAIL="1")
    assert r.returncode == 1
    assert "ERROR: no matching distribution" in r.stderr
    assert r.stderr.rstrip().endswith(f"bootstrap: pip failed (its output above, also in "
                                      f"{tmp_path}/venv/pip.log)")
    assert not list((tmp_path / "venv").glob(".vhostser-installed*"))
