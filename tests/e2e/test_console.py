"""The console device with a real Linux guest: named ports, data, sessions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
GUEST_TESTS = Path(__file__).resolve().parents[1] / "guest"


def test_echo_port_roundtrip_and_sessions(rig, daemon) -> None:  # type: ignore[no-untyped-def]
    g = rig.Guest("echo_port", mode="vhost-user", vu_socket=daemon.socket, vu_max_ports=4,
                  tests_dirs=[str(GUEST_TESTS)], params={"kib": 2048}, timeout=180)
    try:
        g.start()
        result = g.wait()
    finally:
        g.kill()
    log = daemon.stderr()
    assert result.passed, f"{result.log}\n--- qemu\n{g.stderr()}\n--- daemon\n{log}"
    assert result.ports.get("vport0p1") == "org.vhostser.echo"
    assert [m["cycle"] for m in result.metrics] == ["1", "2"]
    # Each guest open is one session, ids increasing, each closed by the guest.
    opened = re.findall(r"port 1 'org.vhostser.echo': session (\d+) open", log)
    closed = re.findall(r"port 1 'org.vhostser.echo': session (\d+) closed: (\S+)", log)
    assert opened == ["1", "2"], log
    assert closed == [("1", "guest-close"), ("2", "guest-close")], log
    g.cleanup()
