"""What the tiers that boot a real guest share (tests/e2e, tests/systemd): the e2e rig of
../shared/e2e (stock QEMU 11 and a small Linux guest), provisioned by its setup.sh, which
bin/run-tests and .ci/run call. Where it truly cannot run (no rig directory, or its QEMU is
missing), the tests that need it skip with the reason."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RIG_DIR = Path(os.environ.get("VHOSTSER_E2E_RIG", ROOT.parent / "shared" / "e2e"))


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
