"""Migration through VHOST_USER_PROTOCOL_F_DEVICE_STATE: the testing front end moves a running
device from one daemon process to another, as QEMU's migration would (stop the rings, save
the source's state through a pipe, realize the destination, load it, start the rings where
they stopped). The guest does nothing: on the destination its open ports are replayed to the
backends with the same session ids, data flows, and a new open gets a new id.

QEMU 11.1's generic vhost-user device cannot migrate, so there is no e2e of this."""

from __future__ import annotations

from pathlib import Path

import trio

from vhostser.backends.framing import Data, FrameDecoder, Open
from vhostser.testing import open_frontend
from vhostser.testing.console_driver import ConsoleDriver

from .daemon_proc import daemon_process

CONFIG = """
[vm]
name = "{name}"
socket = "{{tmp}}/{name}.sock"
max_ports = 3
admin_socket = "{{tmp}}/{name}.ctl"

[[port]]
id = 1
name = "org.test.echo"
backend = {{{{ type = "echo" }}}}

[[port]]
id = 2
name = "org.test.framed"
backend = {{{{ type = "unix", path = "{{tmp}}/{name}.framed", mode = "framed" }}}}
"""


class FramedPeer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(accept_open=True)

    @classmethod
    async def connect(cls, path: Path) -> FramedPeer:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(trio.SocketStream(sock))

    async def frames_until(self, n: int) -> list[object]:
        """Frames until their DATA adds up to n bytes (OPEN/CLOSE frames included)."""
        frames: list[object] = []
        got = 0
        with trio.fail_after(10):
            while got < n or not frames:
                self.decoder.feed(await self.stream.receive_some(65536))
                for frame in self.decoder:
                    frames.append(frame)
                    if isinstance(frame, Data):
                        got += len(frame.data)
        return frames


async def test_a_running_device_moves_to_another_daemon(tmp_path: Path) -> None:
    with daemon_process(tmp_path, CONFIG.format(name="src"), name="src", admin="src.ctl") as src, \
            daemon_process(tmp_path, CONFIG.format(name="dst"), name="dst",
                           admin="dst.ctl") as dst:
        src.ready()
        dst.ready()
        source_peer = await FramedPeer.connect(tmp_path / "src.framed")
        dest_peer = await FramedPeer.connect(tmp_path / "dst.framed")
        async with open_frontend(tmp_path / "src.sock") as fe:
            driver = ConsoleDriver(fe, max_ports=3)
            await driver.probe()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(driver.run)
                echo = await driver.wait_port("org.test.echo")
                framed = await driver.wait_port("org.test.framed")
                await driver.wait_for(lambda: echo.host_connected and framed.host_connected)
                await echo.open()
                await framed.open()
                await framed.write_all(b"before;")
                assert await source_peer.frames_until(7) == [
                    Open(1, "org.test.framed"), Data(1, b"before;")]
                await echo.write_all(b"ping")
                assert await echo.read_exactly(4) == b"ping"
                controls = len(driver.received)

                await fe.migrate_to(tmp_path / "dst.sock")

                # The destination's backends hear the guest's open sessions, same ids.
                await framed.write_all(b"after;")
                assert await dest_peer.frames_until(6) == [
                    Open(1, "org.test.framed"), Data(1, b"after;")]
                await echo.write_all(b"pong")
                assert await echo.read_exactly(4) == b"pong"
                # The guest was told nothing: no re-probe, no port events.
                assert driver.received[controls:] == []
                # A new open after the move is a new session: no id is reused.
                await framed.close()
                await framed.open()
                await framed.write_all(b"again")
                frames = await dest_peer.frames_until(5)
                assert frames[-2:] == [Open(2, "org.test.framed"), Data(2, b"again")]
                nursery.cancel_scope.cancel()
        # Every byte accounted on both daemons, both ways (the destination's ledger starts
        # from what it adopted).
        for d in (src, dst):
            for port in d.ctl_json("stats")["ports"].values():
                ledger = port["ledger"]
                assert ledger["to_guest"]["balanced"] and ledger["from_guest"]["balanced"], ledger
        sessions = dst.ctl_json("sessions")
        assert [(s["port"], s["session"]) for s in sessions] == [(1, 1), (2, 2)]
        assert "device state adopted from a migration source" in dst.stderr()
        assert "device state transfer: SAVE" in src.stderr()
