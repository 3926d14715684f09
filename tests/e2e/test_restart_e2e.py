"""Live restart with real QEMU 11 and a real Linux guest: the daemon under the service manager
in a box (vhostser.testing.manager: systemd's fd store and hand-over), killed with SIGKILL and
stopped with SIGTERM between transfers and during one, while the guest keeps its echo port
open. QEMU never sees the back end go: no vhost error, one connection, the guest passes."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from vhostser.testing.manager import ServiceManager

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GUEST_TESTS = ROOT / "tests" / "guest"

CONFIG = """
[vm]
name = "restart"
max_ports = 2
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.vhostser.echo"
backend = {{ type = "echo" }}
"""


def test_qemu_notices_no_restart(rig) -> None:  # type: ignore[no-untyped-def]
    tmp = Path(tempfile.mkdtemp(prefix="vhs-e2e-restart-"))
    (tmp / "vm.toml").write_text(CONFIG.format(tmp=tmp))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp / "vu.sock"))
    listener.listen(4)
    manager = ServiceManager(tmp, {"vhost-user": listener.fileno()})
    argv = [sys.executable, "-m", "vhostser", "run", "--config", str(tmp / "vm.toml"),
            "--log-level", "debug"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start() -> None:
        manager.start(argv, env, tmp / "stderr")
        manager.wait_ready()

    start()
    g = rig.Guest("restart_echo", mode="vhost-user", vu_socket=str(tmp / "vu.sock"),
                  vu_max_ports=2, tests_dirs=[str(GUEST_TESTS)],
                  params={"kib": 2048, "rounds": 6, "idle": 2}, timeout=240)
    restarts = []
    try:
        g.start()
        # Between rounds: kill -9 or a planned restart, alternating; and once mid-transfer.
        for i, how in enumerate(["kill", "term", "kill", "term", "kill"], start=1):
            assert g.wait_for_line(rf"^E2E-IDLE {i}\b", 120), g.log()[-3000:]
            if how == "kill":
                manager.kill()
            else:
                assert manager.terminate() == 0
            start()
            restarts.append(how)
            if i == 2:
                assert g.wait_for_line(r"^E2E-ROUND 3\b", 60)
                assert manager.terminate() == 0  # a planned restart mid-transfer
                start()
                restarts.append("term mid-transfer")
        result = g.wait()
    finally:
        g.kill()
        manager.close()
        listener.close()
    log = (tmp / "stderr").read_text(errors="replace")
    qemu = g.stderr()
    assert result.passed, f"{result.log[-3000:]}\n--- qemu\n{qemu}\n--- daemon\n{log[-5000:]}"
    assert [m["same"] for m in result.metrics] == ["1"] * 6
    assert "vhost" not in qemu.lower() and "failed" not in qemu.lower(), qemu
    assert log.count("front end connected") == 1, log[-5000:]
    assert log.count("resumed the front end's connection") == len(restarts) == 6
    assert "session 1 open" in log and "session 1 closed" in log  # one session, the guest's
    assert "session 2" not in log
    g.cleanup()
