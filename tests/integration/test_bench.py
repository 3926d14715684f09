"""`vhostser bench local` runs end to end and reports what it measured (a smoke test: the
numbers themselves are for people, never asserted against a target here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_local_reports_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "vhostser", "bench", "local", "--mib", "2", "--runs", "1",
         "--rtt-n", "20", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out.read_text())
    assert [x["kind"] for x in results] == ["g2h", "h2g", "rtt"]
    assert results[0]["median_MBps"] > 0 and results[1]["median_MBps"] > 0
    assert results[2]["n"] == 20 and results[2]["median_us"] > 0
    assert "g2h: vhostser (no QEMU) median" in r.stdout


def test_bench_rejects_unknown_measurements() -> None:
    r = subprocess.run([sys.executable, "-m", "vhostser", "bench", "local", "--which", "g2h,x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--which 'x'" in r.stderr
