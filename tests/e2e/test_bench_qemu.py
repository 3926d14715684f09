"""`vhostser bench qemu` boots the rig's guest with QEMU's in-process virtio-serial and
against vhostser in the same run, and reports both, every figure and their ratios (smoke-sized:
the two scenarios with guest scripts and QEMU devices of their own, 8 ports and the console)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

QEMU_FIGURES = {
    "ports8": {"aggregate_MBps", "slowest_share", "qemu_cpu_s_per_GiB", "total_cpu_s_per_GiB"},
    "console": {"MBps", "qemu_cpu_s_per_GiB", "total_cpu_s_per_GiB"},
}


def test_bench_qemu_reports_reference_figures_and_ratios(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "vhostser", "bench", "qemu", "--which", "ports8,console",
         "--port-mib", "1", "--console-mib", "1", "--runs", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    got = {(x["scenario"], x["who"]): x["figures"] for x in report["results"]}
    assert set(got) == {(s, w) for s in QEMU_FIGURES for w in ("qemu", "vhostser")}
    for (sc, who), figures in got.items():
        want = QEMU_FIGURES[sc] | ({"daemon_cpu_s_per_GiB"} if who == "vhostser" else set())
        assert set(figures) == want, (sc, who, figures)
        for name, f in figures.items():
            assert len(f["samples"]) == 1 and all(math.isfinite(x) for x in f["samples"])
            # CPU of a 1 MiB run can be below the 10 ms tick; throughput cannot be 0.
            assert f["median"] > 0 or (f["median"] == 0 and "cpu" in name), (sc, who, name, f)
    ratios = {(x["scenario"], x["figure"]) for x in report["ratios"]}
    assert ratios == {(s, n) for s in QEMU_FIGURES for n in QEMU_FIGURES[s]}
    assert "of QEMU's in-process virtio-serial" in r.stdout and "ratio" in r.stdout
