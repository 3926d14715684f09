"""Harness for the console integration tests: the real `VhostUserBackend` + `ConsoleDevice`
served in-process on a unix socket (as tests/integration/conftest.py serves its EchoDevice, and
as the daemon wires them), a `FrontEnd` connected to it, and the `ConsoleDriver` on top.

Use it as `async with console_rig(nursery, ports=[...]) as rig:` with pytest-trio's `nursery`
fixture: the device's tasks run in that nursery until the test ends.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vhostser.backends.simple import EchoBackend, RecordingBackend
from vhostser.console import ConsoleDevice, Port, PortBackend, PortConfig
from vhostser.testing import FrontEnd, open_frontend
from vhostser.testing.console_driver import ConsoleDriver, ControlMessage, GuestPort
from vhostser.vhost_user import VhostUserBackend, send_backend_request, serve_connection

log = logging.getLogger("tests.console")

ECHO = PortConfig(1, "org.test.echo")
REC = PortConfig(2, "org.test.rec")
CONSOLE0 = PortConfig(0, "", console=True)


@dataclass
class Rig:
    """Everything of one test: the device side and the guest side."""

    device: ConsoleDevice
    backend: VhostUserBackend
    fe: FrontEnd
    driver: ConsoleDriver
    path: str
    nursery: trio.Nursery
    served: int = 0

    def dev(self, port_id: int) -> Port:
        """The device's port."""
        return self.device.ports[port_id]

    def guest(self, key: int | str) -> GuestPort:
        """The guest's port."""
        return self.driver.port(key)

    def received(self, port_id: int | None = None) -> list[tuple[str, int, int]]:
        """(event name, id, value) of the control messages the guest got (for one port)."""
        return [
            (m.name, m.id, m.value)
            for m in self.driver.received
            if isinstance(m, ControlMessage) and (port_id is None or m.id == port_id)
        ]

    def sent(self, port_id: int | None = None) -> list[tuple[str, int, int]]:
        return [
            (m.name, m.id, m.value)
            for m in self.driver.sent
            if isinstance(m, ControlMessage) and (port_id is None or m.id == port_id)
        ]


async def _serve(
    listener: trio.socket.SocketType, backend: VhostUserBackend, rig_box: list[Rig]
) -> None:
    with listener:
        while True:
            sock, _ = await listener.accept()
            with sock:
                await serve_connection(sock, backend)
            if rig_box:
                rig_box[0].served += 1


@asynccontextmanager
async def console_rig(
    nursery: trio.Nursery,
    *,
    ports: Sequence[tuple[PortConfig, PortBackend]] = (),
    max_ports: int = 4,
    device_args: dict[str, Any] | None = None,
    driver_args: dict[str, Any] | None = None,
    mem_size: int = 32 << 20,
    probe: bool = True,
    fill_control: bool = True,
    run: bool = True,
) -> AsyncIterator[Rig]:
    """Device with `ports`, a front end, a driver; probed and its control task running
    unless told otherwise."""
    tmp = tempfile.mkdtemp(prefix="vhs-c-")
    path = str(Path(tmp) / "vhost.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    device = ConsoleDevice(nursery, max_ports=max_ports, **(device_args or {}))
    backend = VhostUserBackend(device)
    device.on_broken = backend.mark_needs_reset
    device.on_config_change = lambda: nursery.start_soon(
        send_backend_request, backend, backend.config_change_message()
    )
    for config, port_backend in ports:
        device.add_port(config, port_backend)
    box: list[Rig] = []
    serve_scope = trio.CancelScope()

    async def serve() -> None:
        with serve_scope:
            await _serve(listener, backend, box)

    nursery.start_soon(serve)
    run_scope = trio.CancelScope()
    run_done = trio.Event()
    try:
        async with open_frontend(path, mem_size=mem_size) as fe:
            driver = ConsoleDriver(fe, max_ports=max_ports, **(driver_args or {}))
            rig = Rig(device, backend, fe, driver, path, nursery)
            box.append(rig)
            if probe:
                await driver.probe(fill_control=fill_control)
            if run:

                async def run_driver() -> None:
                    try:
                        with run_scope:
                            await driver.run()
                    finally:
                        run_done.set()

                nursery.start_soon(run_driver)
            else:
                run_done.set()
            try:
                yield rig
            finally:
                run_scope.cancel()
                with trio.CancelScope(shield=True):
                    await run_done.wait()
    finally:
        serve_scope.cancel()
        shutil.rmtree(tmp, ignore_errors=True)


def echo_ports(
    *extra: tuple[PortConfig, PortBackend], console: bool = False
) -> list[tuple[PortConfig, PortBackend]]:
    """An echo port (id 1) and a recording port (id 2), plus a console port 0 if asked."""
    ports: list[tuple[PortConfig, PortBackend]] = []
    if console:
        ports.append((CONSOLE0, RecordingBackend()))
    ports += [(ECHO, EchoBackend()), (REC, RecordingBackend()), *extra]
    return ports


async def echo_roundtrip(port: GuestPort, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Write `data` and read as much back, concurrently (the echo needs both)."""
    received = bytearray()

    async def reader() -> None:
        while len(received) < len(data):
            chunk = await port.read(len(data) - len(received), timeout=timeout)
            assert chunk, f"EOF after {len(received)} of {len(data)} bytes"
            received.extend(chunk)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await port.write_all(data, timeout=timeout)
    return bytes(received)


class Streamer:
    """Keeps an echo port busy in the background: writes pseudo-random blocks and checks
    every byte that comes back, until stopped; `check()` then proves nothing was lost,
    duplicated or reordered."""

    def __init__(self, port: GuestPort, *, block: int = 8192) -> None:
        self.port = port
        self.block = block
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.nsent = 0
        self.nrecv = 0
        self._stop = False
        self.progress = trio.Event()

    def _pattern(self, i: int) -> bytes:
        return hashlib.sha256(i.to_bytes(8, "little")).digest() * (self.block // 32)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as n:
            n.start_soon(self._reader)
            i = 0
            while not self._stop:
                data = self._pattern(i)
                i += 1
                await self.port.write_all(data)
                self.sent.update(data)
                self.nsent += len(data)
            await self._wait_echoed()
            n.cancel_scope.cancel()

    async def _wait_echoed(self) -> None:
        with trio.fail_after(5):
            while self.nrecv < self.nsent:
                await trio.sleep(0.001)

    async def _reader(self) -> None:
        while True:
            chunk = await self.port.read(1 << 16)
            assert chunk, "echo port EOF"
            self.got.update(chunk)
            self.nrecv += len(chunk)
            if self.nrecv >= 4 * self.block:
                self.progress.set()

    def stop(self) -> None:
        self._stop = True

    def moved_since(self, nrecv: int) -> Callable[[], bool]:
        """A predicate: more bytes came back than `nrecv`."""
        return lambda: self.nrecv > nrecv

    def check(self) -> None:
        assert self.nsent > 0
        assert self.nrecv == self.nsent
        assert self.got.hexdigest() == self.sent.hexdigest()


@asynccontextmanager
async def streaming(port: GuestPort) -> AsyncIterator[Streamer]:
    """Run a Streamer on `port` for the duration of the block; checked at the end."""
    streamer = Streamer(port)
    async with trio.open_nursery() as n:
        await n.start(streamer.run)
        with trio.fail_after(5):
            await streamer.progress.wait()
        yield streamer
        before = streamer.nrecv
        # Traffic keeps flowing after whatever the block did.
        with trio.fail_after(5):
            while streamer.nrecv < before + 4 * streamer.block:
                await trio.sleep(0.001)
        streamer.stop()
    streamer.check()


async def eventually(predicate: Callable[[], bool], *, timeout: float = 2.0) -> None:
    """Wait (polling) until `predicate()` holds: for device-side state no guest event tells."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


def messages(caplog: Any, level: int = logging.WARNING) -> list[str]:
    """The vhostser.console log lines at `level` or above."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("vhostser") and r.levelno >= level
    ]
