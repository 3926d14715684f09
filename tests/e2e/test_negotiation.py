"""Real QEMU 11 negotiates with the daemon and the Linux guest's virtio driver binds it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

GUEST_TESTS = Path(__file__).resolve().parents[1] / "guest"

pytestmark = pytest.mark.e2e

PORTS = 4
QUEUES = 2 * PORTS + 2


def qemu_order(queues: int) -> list[str]:
    """What QEMU 11.1 sends to a back end offering vhostser's protocol features and MULTIPORT,
    from device realize to guest poweroff. The testing front end replays the same order."""
    realize = [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES",
    ] + ["SET_VRING_CALL", "SET_VRING_ERR"] * queues
    driver_ok = (
        ["GET_CONFIG", "SET_FEATURES", "GET_STATUS", "SET_STATUS", "ADD_MEM_REG"]
        + ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
           "SET_VRING_CALL"] * queues
        + ["SET_VRING_ENABLE"] * queues
        + ["SET_VRING_CALL"] * queues
    )
    poweroff = ["SET_VRING_ENABLE"] * queues + ["GET_VRING_BASE"] * queues
    return realize + driver_ok + poweroff


def requests_seen(log: str) -> list[str]:
    return re.findall(r"DEBUG vhostser\.vhost_user: ([A-Z_]+) flags=", log)


def test_qemu_negotiates_and_guest_driver_binds(rig, daemon) -> None:  # type: ignore[no-untyped-def]
    g = rig.Guest("bound", mode="vhost-user", vu_socket=daemon.socket, vu_max_ports=PORTS,
                  tests_dirs=[str(GUEST_TESTS)], params={"token": "e2e-negotiation"},
                  timeout=120)
    try:
        g.start()
        result = g.wait()
    finally:
        g.kill()
    log = daemon.stderr()
    assert result.passed, f"{result.log}\n--- qemu\n{g.stderr()}\n--- daemon\n{log}"
    metric = result.metrics[0]
    assert metric["driver"] == "virtio_console"
    assert int(metric["status"], 16) & 0x4  # DRIVER_OK
    assert requests_seen(log) == qemu_order(QUEUES)
    assert "rejected" not in log
    for q in range(QUEUES):
        assert f"vring {q} started" in log
    # The console line the guest wrote through hvc0 came out of port 0's tx queue.
    assert b"e2e-negotiation from the guest console" in daemon.stdout()
    g.cleanup()
