"""systemd/vhostser@.service and .socket pass `systemd-analyze verify` as an instance."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def _vhostser_binary() -> str:
    found = shutil.which("vhostser") or str(Path(sys.executable).parent / "vhostser")
    if not Path(found).exists():
        pytest.skip("the vhostser console script is not installed (pip install -e .)")
    return found


def test_units_verify_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    binary = _vhostser_binary()
    for unit in ("vhostser@.service", "vhostser@.socket"):
        text = (UNITS / unit).read_text()
        # The units name the installed path; verify against where this checkout installed it.
        (tmp_path / unit.replace("@", "@web1")).write_text(
            text.replace("/opt/vhostser/bin/vhostser", binary)
        )
    r = subprocess.run(
        [analyze, "verify", "--man=no", "vhostser@web1.service", "vhostser@web1.socket"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # And the check can fail: a typo in a directive is reported.
    bad = tmp_path / "vhostser@web1.service"
    bad.write_text(bad.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter"))
    r = subprocess.run(
        [analyze, "verify", "--man=no", "vhostser@web1.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert "stricter" in r.stderr


def test_service_settings_the_issue_asks_for() -> None:
    service = (UNITS / "vhostser@.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "RuntimeDirectory=", "StateDirectory=",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "--config /etc/vhostser/%i.toml"):
        assert line in service
    socket = (UNITS / "vhostser@.socket").read_text()
    assert "ListenStream=/run/vhostser/%i.sock" in socket
    assert "SocketMode=0660" in socket
    assert "FileDescriptorName=vhost-user" in socket
