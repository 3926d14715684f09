"""The native data plane (console.fastpath over virtqueue.pump), opted into with
VHOSTSER_DATAPLANE=native, under a real daemon process: a stream peer and the guest move
4 MiB each way at once byte for byte, the port is engaged while they do, a guest close and
reopen takes it back to the Python path and onto the pump again (the close's drop of
unsent chains once took a lent ring at stale positions: the peer got old chains again),
and the ledger balances."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from .daemon_proc import DaemonProcess, daemon_process, running_guest

CONFIG = """
[vm]
name = "native"
socket = "{tmp}/vu.sock"
admin_socket = "{tmp}/ctl.sock"
max_ports = 4

[[port]]
id = 1
name = "org.test.peer"
backend = {{ type = "unix", path = "{tmp}/peer.sock" }}
"""


def test_a_stream_peer_on_the_native_data_plane(tmp_path: Path) -> None:
    with daemon_process(tmp_path, CONFIG, env={"VHOSTSER_DATAPLANE": "native"}) as d:
        d.ready()
        trio.run(_both_ways, d)
        stats = d.ctl_json("stats")["ports"]["1"]
        log = d.stderr()
        assert d.stop() == 0
    assert log.count("port 1: on the native data plane") >= 2, log[-3000:]
    assert "port 1: back on the Python path" in log
    for direction in ("to_guest", "from_guest"):
        entry = stats["ledger"][direction]
        assert entry["balanced"] and entry["pending"] == 0 and not entry["dropped"], stats
        assert entry["accepted"] == 2 * (4 << 20), stats
    assert stats["backend"]["bytes_sent"] == stats["backend"]["bytes_from_peers"] == 2 * (4 << 20)


async def _both_ways(d: DaemonProcess) -> None:
    async with running_guest(d.tmp / "vu.sock") as driver:
        port = await driver.wait_port("org.test.peer")
        peer = await trio.open_unix_socket(str(d.tmp / "peer.sock"))
        await driver.wait_for(lambda: port.host_connected)
        for session in range(2):  # a close and reopen between the two
            await port.open()
            rng = random.Random(session)
            g2h, h2g = rng.randbytes(4 << 20), rng.randbytes(4 << 20)
            got_g2h, got_h2g = bytearray(), bytearray()

            async def host_reader(into: bytearray = got_g2h, n: int = len(g2h)) -> None:
                while len(into) < n:
                    into.extend(await peer.receive_some(1 << 16))

            async def guest_reader(into: bytearray = got_h2g, n: int = len(h2g)) -> None:
                while len(into) < n:
                    into.extend(await port.read(timeout=None))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(host_reader)
                    nursery.start_soon(guest_reader)
                    nursery.start_soon(port.write_all, g2h)
                    nursery.start_soon(peer.send_all, h2g)
            assert bytes(got_g2h) == g2h and bytes(got_h2g) == h2g
            await port.close()
        await peer.aclose()
