"""Backends under the faults of the hardening issue, end to end: the console device behind a
real front end (`console_rig`) or a real daemon process, with real sockets, pipes and files."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import trio

from vhostser.backends.unix import UnixBackend
from vhostser.console import PortConfig

from .console_harness import console_rig, eventually


async def _unix_connect(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return trio.SocketStream(sock)


async def test_peer_flaps_while_the_vm_is_paused_leave_guest_and_host_agreeing(
    nursery: trio.Nursery,
) -> None:
    """1,000 peer connect/close cycles while the VM is paused (no control buffer is taken) used
    to overflow the 1024-entry control queue and leave the guest believing the host closed:
    the H changes the guest has not read collapse into one PORT_OPEN, the latest."""
    with tempfile.TemporaryDirectory(prefix="vhs-flap-") as tmp:
        path = str(Path(tmp) / "peer.sock")
        backend = UnixBackend.from_options({"path": path}, "test")
        async with console_rig(nursery, ports=[(PortConfig(3, "org.test.unix"), backend)]) as rig:
            drv, dev = rig.driver, rig.dev(3)
            port = await drv.wait_port("org.test.unix")
            await eventually(lambda: Path(path).exists())
            await port.open()
            await rig.fe.stop(pause=True)
            for _ in range(1000):
                peer = await _unix_connect(path)
                await eventually(lambda: dev.state.host_open)
                await peer.aclose()
                await eventually(lambda: not dev.state.host_open)
            peer = await _unix_connect(path)  # this one stays: the host is open at the end
            await eventually(lambda: dev.state.host_open)
            assert rig.device.counters.control_overflow == 0
            await rig.fe.resume()
            await drv.wait_for(lambda: port.host_connected)
            await port.write_all(b"through")
            got = bytearray()
            with trio.fail_after(5):
                while len(got) < 7:
                    got += await peer.receive_some(7 - len(got))
            assert bytes(got) == b"through"
            await peer.aclose()
