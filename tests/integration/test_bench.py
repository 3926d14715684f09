"""`vhostser bench local` runs every scenario end to end and reports every figure (a smoke
test: the numbers are for people, never asserted against a target here — only that each is
there, finite and of the right sign)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Per scenario, the figures `bench local` must report (no QEMU: the daemon's CPU only).
LOCAL_FIGURES = {
    "g2h": {"MBps", "daemon_cpu_s_per_GiB"},
    "h2g": {"MBps", "daemon_cpu_s_per_GiB"},
    "rtt": {"p50_us", "p99_us", "daemon_cpu_s_per_1k"},
    "ports8": {"aggregate_MBps", "slowest_share", "daemon_cpu_s_per_GiB"},
    "console": {"MBps", "daemon_cpu_s_per_GiB"},
    "idle": {"wakeups_per_s", "rss_idle_MB", "rss_load_MB", "hwm_MB", "anon_idle_MB",
             "anon_load_MB"},
}
# Figures that may truly be 0 (an idle daemon; CPU below the 10 ms tick of a tiny run).
MAY_BE_ZERO = {"wakeups_per_s", "daemon_cpu_s_per_GiB", "daemon_cpu_s_per_1k"}
# Taken once, after the whole load (the idle windows are one per run).
ONCE = {"rss_load_MB", "hwm_MB", "anon_load_MB"}


def check_sane(figures: dict[str, dict[str, object]], runs: int) -> None:
    for name, f in figures.items():
        samples = f["samples"]
        assert isinstance(samples, list), (name, f)
        assert len(samples) == (1 if name in ONCE else runs), (name, f)
        for x in [*samples, f["median"], f["min"], f["max"]]:
            assert isinstance(x, float | int) and math.isfinite(x), (name, f)
            assert x > 0 or (x == 0 and name in MAY_BE_ZERO), (name, f)
    if "slowest_share" in figures:
        assert figures["slowest_share"]["max"] <= 1  # type: ignore[operator]
    if "p99_us" in figures:
        assert figures["p99_us"]["median"] >= figures["p50_us"]["median"]  # type: ignore[operator]


def test_bench_local_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "vhostser", "bench", "local", "--mib", "2", "--runs", "2",
         "--rtt-n", "20", "--port-mib", "1", "--console-mib", "1", "--idle-s", "0.5",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    results = report["results"]
    assert [x["scenario"] for x in results] == list(LOCAL_FIGURES)
    for x in results:
        assert x["who"] == "vhostser-local"
        assert set(x["figures"]) == LOCAL_FIGURES[x["scenario"]], x
        check_sane(x["figures"], runs=2)
    assert report["ratios"] == []  # no reference without QEMU
    assert "g2h: vhostser-local" in r.stdout
    assert "scenario  figure" in r.stdout and "daemon wakeups/s idle, 31 ports" in r.stdout


def test_bench_rejects_unknown_measurements() -> None:
    r = subprocess.run([sys.executable, "-m", "vhostser", "bench", "local", "--which", "g2h,x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--which 'x'" in r.stderr
