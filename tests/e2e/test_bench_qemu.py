"""`vhostser bench qemu` boots the rig's guest with QEMU's in-process virtio-serial and
against vhostser in the same run, and reports both and their ratio (smoke-sized here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_bench_qemu_reports_reference_and_ratio(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "vhostser", "bench", "qemu", "--which", "g2h", "--count", "256",
         "--runs", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    results = {x["who"]: x for x in json.loads(out.read_text())}
    assert results["qemu"]["median_MBps"] > 0 and results["vhostser"]["median_MBps"] > 0
    assert "of QEMU's in-process virtio-serial" in r.stdout
