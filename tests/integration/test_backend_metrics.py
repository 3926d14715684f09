"""A backend's own ledger is in the Prometheus metrics as it is in `ctl stats`: a real daemon
process, a guest writing to a unix port whose peer stops reading and hangs up, and the bytes
it never got counted (peer-gone) the same in both, adding up with what it did get."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import trio

from .daemon_proc import DaemonProcess, daemon_process, running_guest

CONFIG = """
[vm]
name = "metrics"
socket = "{tmp}/vu.sock"
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 1
name = "org.test.peer"
backend = {{ type = "unix", path = "{tmp}/peer.sock" }}
"""


def sample(metrics: str, metric: str, /, **labels: object) -> int:
    """The value of the one sample of `metric` with exactly these labels (besides vm)."""
    want = ",".join(['vm="metrics"', *(f'{k}="{v}"' for k, v in labels.items())])
    found = re.findall(rf"^vhostser_{metric}\{{{re.escape(want)}\}} (\d+)$", metrics, re.M)
    assert len(found) == 1, (metric, labels, metrics)
    return int(found[0])


async def _write_into_a_peer_that_leaves(d: DaemonProcess) -> None:
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    async with running_guest(d.tmp / "vu.sock") as driver:
        port = await driver.wait_port("org.test.peer")
        peer.connect(str(d.tmp / "peer.sock"))
        await driver.wait_for(lambda: port.host_connected)
        await port.open()
        async with trio.open_nursery() as nursery:
            # Far more than the socket buffers and peer_queue hold: the guest's write waits.
            nursery.start_soon(port.write_all, b"w" * (4 << 20))
            with trio.fail_after(20):
                while d.ctl_json("stats")["ports"]["1"]["backend"]["bytes_sent"] < 1:
                    await trio.sleep(0.02)
            peer.close()  # ... then goes, what was queued for it unsent
            with trio.fail_after(20):
                while not d.ctl_json("stats")["ports"]["1"]["backend"]["bytes_dropped_unsent"]:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


def test_peer_backend_ledger_is_in_the_metrics(tmp_path: Path) -> None:
    # The Python data path: it queues guest bytes for the peer, which are dropped (counted)
    # when the peer leaves. The native one queues none (a guest write waits in its ring).
    with daemon_process(tmp_path, CONFIG, env={"VHOSTSER_DATAPLANE": "python"}) as d:
        d.ready()
        trio.run(_write_into_a_peer_that_leaves, d)
        stats = d.ctl_json("stats")["ports"]["1"]
        metrics = d.ctl("metrics").stdout
        backend = stats["backend"]
        labels = {"port": 1, "name": "org.test.peer"}
        unsent = backend["bytes_dropped_unsent"]
        assert set(unsent) == {"peer-gone"} and unsent["peer-gone"] > 0
        assert sample(metrics, "backend_bytes_dropped_unsent_total", **labels,
                      reason="peer-gone") == unsent["peer-gone"]
        for counter in ("bytes_sent", "bytes_to_peers", "peer_bytes_dropped",
                        "peers_accepted"):
            assert sample(metrics, f"backend_{counter}_total", **labels) == backend[counter]
        assert "# TYPE vhostser_backend_bytes_sent_total counter" in metrics
        # With the peer gone nothing is queued: every guest byte the backend took was sent or
        # dropped with its reason.
        assert stats["bytes_from_guest"] == backend["bytes_to_peers"] == (
            backend["bytes_sent"] + unsent["peer-gone"])
        assert stats["ledger"]["from_guest"]["balanced"]
        assert d.stop() == 0
