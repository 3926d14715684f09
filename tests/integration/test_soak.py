"""`vhostser soak` as a user runs it, for half a minute: every invariant it checks holds, and
its report shows that everything it claims to do was done (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLEAN = {0, 1, 2, 3}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    r = subprocess.run(
        [sys.executable, "-m", "vhostser", "soak", "--duration", "30", "--epoch", "3",
         "--seed", "9", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    report: dict[str, Any] = json.loads(out.read_text())
    assert r.returncode == 0, (report["failures"], r.stderr[-3000:])
    assert "failures: none" in r.stdout and "daemon alive and answering at the end: yes" in r.stdout
    return report


def test_every_invariant_holds(report: dict[str, Any]) -> None:
    assert report["failures"] == [] and report["ok"]
    assert report["daemon_alive"] and report["responsive"]


def test_every_byte_is_accounted_per_port_and_direction(report: dict[str, Any]) -> None:
    rows = {(r["port"], r["direction"]): r for r in report["ports"]}
    # 8 ports: the console guest to host only, the echo port one loop, the others both ways.
    assert set(rows) == {(0, "g2h"), (3, "loop")} | {
        (p, d) for p in (1, 2, 4, 5, 6, 7) for d in ("g2h", "h2g")}
    for key, r in rows.items():
        assert r["sent"] > 0 and r["received"] > 0, key
        assert r["received"] + sum(r["dropped"].values()) == r["sent"], key
        assert r["unaccounted"] == 0, key
        if r["port"] in CLEAN:
            assert r["dropped"] == {} and r["epochs_differ"] == [], key
            assert r["epochs_equal"] == report["events"]["epochs"], key
    # The abuse is in the drops, with its reason: all of it, and nothing else on that path.
    assert rows[7, "g2h"]["dropped"]["port:too-long"] == report["events"]["aliased_bytes"]
    # Flaps and resets under load lose bytes, each with its reason.
    lost = [reason for r in rows.values() if r["port"] not in CLEAN for reason in r["dropped"]]
    assert any(x.startswith("port:") for x in lost) and any(x.startswith("guest:") for x in lost)


def test_everything_it_says_it_does_was_done(report: dict[str, Any]) -> None:
    ev = report["events"]
    assert ev["epochs"] >= 4
    assert set(ev["disruptions"]) == {"device-reset", "frontend-reconnect", "guest-reinit",
                                      "ports-reopen"}
    assert ev["reloads"] == ev["epochs"]
    assert ev["rings_broken"] == ev["disruptions"]["device-reset"]
    for name in ("host_flaps", "guest_flaps", "malformed_frames", "aliased_chains",
                 "bad_control", "bad_requests"):
        assert ev[name] > 0, name


def test_memory_and_fds_are_sampled_and_bounded(report: dict[str, Any]) -> None:
    assert len(report["quiescent_samples"]) == report["events"]["epochs"]
    assert len(report["samples"]) >= 5
    for key in ("rss_MB", "anon_MB", "fds"):
        m = report["memory"][key]
        assert 0 < m["min"] <= m["last"] <= m["max"], key
    assert report["growth"]["rss_MB"] <= report["bounds"]["rss_MB"]
    assert report["growth"]["fds"] <= report["bounds"]["fds"]


def test_a_failed_invariant_is_exit_status_1(tmp_path: Path) -> None:
    # A bound no daemon can meet (VmRSS shrinking by a GB): the failure path, end to end.
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, "-m", "vhostser", "soak", "--duration", "1", "--epoch", "1",
         "--max-rss-growth-mb", "-1000", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    report = json.loads(out.read_text())
    assert r.returncode == 1, r.stdout + r.stderr
    assert not report["ok"] and any("VmRSS grew" in f for f in report["failures"])
    assert "failures: none" not in r.stdout
