"""What `ctl status`, `ctl ports` and `ctl sessions` tell about a real daemon process: the
device status by bit name, whether the front end is there (and that the device state shown
after it left is the last front end's, not a live one), session states by letter and name,
sessions restored from the state file that no front end has confirmed yet; and the
daemon's foreground log lines: timestamps on a terminal or file, journald's <N> without
them when stderr is the journal stream, admin requests at debug only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vhostser.testing import open_frontend
from vhostser.testing.console_driver import ConsoleDriver

from .procs import ROOT, DaemonProc, env, vhostser

CONFIG = """
[vm]
name = "st"
socket = "{tmp}/st.sock"
max_ports = 4
state_dir = "{tmp}/state"

[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}

[[port]]
id = 2
name = "org.test.null"
backend = {{ type = "null" }}
"""


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vhs-st-"))
    (path / "st.toml").write_text(CONFIG.format(tmp=path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ctl(tmp: Path, *args: str) -> str:
    r = vhostser("ctl", "--admin", str(tmp / "st.ctl"), *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def rows(table: str) -> dict[str, str]:
    """A ctl table by its first column, each row as its text."""
    return {line.split()[0]: line for line in table.splitlines()[1:]}


async def guest_opens_both(tmp: Path) -> None:
    """A guest opens ports 1 and 2, then its front end goes away (sessions stay)."""
    async with open_frontend(tmp / "st.sock") as fe:
        driver = ConsoleDriver(fe, max_ports=4)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            echo = await driver.wait_port("org.test.echo")
            null = await driver.wait_port("org.test.null")
            await driver.wait_for(lambda: echo.host_connected)
            await echo.open()
            await null.open()
            await echo.write_all(b"ping")
            assert await echo.read_exactly(4) == b"ping"
            nursery.cancel_scope.cancel()


def test_status_ports_sessions_and_restored_sessions(tmp: Path) -> None:
    d = DaemonProc(tmp, ["--config", str(tmp / "st.toml")])
    try:
        d.wait_ready()
        status = ctl(tmp, "status")
        assert re.search(r"^front end\s+not connected: none since the daemon started$", status,
                         re.M), status
        assert re.search(r"^device status\s+0x00 none$", status, re.M), status

        trio.run(guest_opens_both, tmp)
        status_json = json.loads(ctl(tmp, "--json", "status"))
        assert status_json["frontend_connected"] is False
        assert status_json["frontend_left"] >= 0
        # JSON keys as they were, the names beside them. (The testing front end sets only
        # FEATURES_OK, at SET_FEATURES time; QEMU adds ACKNOWLEDGE|DRIVER|DRIVER_OK at start.)
        assert status_json["status"] == 0x08
        assert status_json["status_bits"] == ["FEATURES_OK"]
        assert status_json["driver_ready"] is True
        # What the last front end left, not a live device: said so.
        status = ctl(tmp, "status")
        assert re.search(r"^front end\s+not connected: the last one left [\d.]+ s ago$",
                         status, re.M), status
        assert re.search(r"^device status\s+0x08 FEATURES_OK \(last front end\)$", status,
                         re.M), status
        assert re.search(r"^driver_ready\s+yes \(last front end\)$", status, re.M), status

        ports = rows(ctl(tmp, "ports"))
        assert "A open (guest+host)" in ports["1"]
        assert "D guest open, no host" in ports["2"]
        sessions = rows(ctl(tmp, "sessions"))
        assert set(sessions) == {"1", "2"} and "A open (guest+host)" in sessions["1"]
        by_id = {p["id"]: p for p in json.loads(ctl(tmp, "--json", "ports"))}
        assert (by_id[1]["state"], by_id[1]["state_name"]) == ("A", "open (guest+host)")
        assert by_id[2]["restored"] is False
    finally:
        assert d.stop() == 0, d.stderr()

    # A new daemon takes the open sessions back from the state file; until a front end
    # comes back, nothing says the guest still has them: shown as restored.
    d = DaemonProc(tmp, ["--config", str(tmp / "st.toml")], name="second")
    try:
        d.wait_ready()
        sessions = rows(ctl(tmp, "sessions"))
        assert "(restored, no front end yet)" in sessions["1"]
        assert "D guest open, no host (restored, no front end yet)" in sessions["2"]
        assert json.loads(ctl(tmp, "--json", "status"))["sessions_restored"] == 2
        assert re.search(r"^sessions\s+2 open, 2 of them restored from the state file",
                         ctl(tmp, "status"), re.M)

        async def front_end_comes_back() -> None:
            async with open_frontend(tmp / "st.sock") as fe:
                await fe.realize(10)

        trio.run(front_end_comes_back)
        by_id = {p["id"]: p for p in json.loads(ctl(tmp, "--json", "ports"))}
        assert by_id[1]["restored"] is False and by_id[2]["restored"] is False
        assert "restored" not in ctl(tmp, "sessions")
    finally:
        assert d.stop() == 0, d.stderr()


LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")


def test_log_lines_timestamps_and_admin_requests_at_debug(tmp: Path) -> None:
    d = DaemonProc(tmp, ["--config", str(tmp / "st.toml")])
    try:
        d.wait_ready()
        ctl(tmp, "status")
        ctl(tmp, "ports")
    finally:
        assert d.stop() == 0
    lines = [ln for ln in d.stderr().splitlines() if ln and not ln.startswith(("vhostser: ",
                                                                               "    "))]
    assert lines and all(LINE.match(ln) for ln in lines), lines
    assert not any("admin" in ln for ln in lines), lines  # info: no admin request lines

    d = DaemonProc(tmp, ["--config", str(tmp / "st.toml"), "--log-level", "debug"], name="dbg")
    try:
        d.wait_ready()
        ctl(tmp, "status")
    finally:
        assert d.stop() == 0
    assert re.search(r"^\S+ \S+ DEBUG vhostser.admin: admin status: ok$", d.stderr(), re.M)


def test_journal_stream_keeps_priorities_without_timestamps(tmp: Path) -> None:
    """JOURNAL_STREAM counts only when stderr is that stream (sd_journal_stream_fd)."""
    script = ("import logging, sys; from vhostser.cli import _setup_logging; "
              "_setup_logging('info'); logging.getLogger('vhostser.t').warning('hello')")
    err = tmp / "err"
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        for stream, expect in ((f"{st.st_dev}:{st.st_ino}", "journal"),
                               (f"{st.st_dev}:{st.st_ino + 1}", "file"), ("", "file")):
            f.seek(0)
            f.truncate()
            subprocess.run([sys.executable, "-c", script], stderr=f, cwd=ROOT, timeout=60,
                           env=env(JOURNAL_STREAM=stream), check=True)
            text = err.read_text()
            if expect == "journal":
                assert text == "<4>vhostser.t: hello\n", text
            else:
                assert LINE.match(text) and text.endswith("WARNING vhostser.t: hello\n"), text
