"""The front-end grace period: QEMU going away is not a reset. Sessions stay open while a
front end may come back; only when none does within `frontend_grace` do they close with
reason frontend-gone. Driven through the real Daemon, a real socket and a guest driver."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
import trio

from vhostser import config
from vhostser.daemon import Daemon
from vhostser.sockets import listen_unix
from vhostser.testing import open_frontend
from vhostser.testing.console_driver import ConsoleDriver

CONFIG = """
[vm]
name = "grace"
socket = "{tmp}/vu.sock"
max_ports = 2
frontend_grace = {grace}

[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}
"""


async def _open_session(path: str) -> None:
    """A guest that opens the echo port, then its QEMU goes away (the guest closed nothing)."""
    async with open_frontend(path) as fe:
        driver = ConsoleDriver(fe, max_ports=2)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            port = await driver.wait_port("org.test.echo")
            await port.open()
            await port.write_all(b"ping")
            assert await port.read_exactly(4, timeout=5) == b"ping"
            nursery.cancel_scope.cancel()


async def _daemon(grace: float, nursery: trio.Nursery) -> tuple[Daemon, str]:
    tmp = Path(tempfile.mkdtemp(prefix="vhs-grace-"))
    cfg = config.parse(CONFIG.format(tmp=tmp, grace=grace), "grace.toml")
    daemon = Daemon(cfg, nursery)
    listener = await listen_unix(cfg.socket)
    await nursery.start(daemon.serve, listener)
    return daemon, cfg.socket


async def test_sessions_close_frontend_gone_after_the_grace_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "vhostser")
    async with trio.open_nursery() as nursery:
        daemon, path = await _daemon(0.3, nursery)
        await _open_session(path)
        port = daemon.device.ports[1]
        with trio.fail_after(2):
            while daemon.frontend_connected:
                await trio.sleep(0.01)
        assert port.session is not None and port.session.id == 1  # gone, but within grace
        await trio.sleep(0.15)
        assert port.session is not None
        with trio.fail_after(2):
            while port.session is not None:
                await trio.sleep(0.01)
        assert port.counters.sessions_opened == 1
        assert port.state.guest_open is False  # frontend-gone: the guest is taken as gone
        assert "port 1 'org.test.echo': session 1 closed: frontend-gone" in caplog.text
        nursery.cancel_scope.cancel()


async def test_a_front_end_back_within_the_grace_period_keeps_sessions() -> None:
    async with trio.open_nursery() as nursery:
        daemon, path = await _daemon(0.3, nursery)
        await _open_session(path)
        port = daemon.device.ports[1]
        with trio.fail_after(2):
            while daemon.frontend_connected:
                await trio.sleep(0.01)
        # QEMU reconnects (reconnect-ms) and only realizes the device: the guest is the same.
        async with open_frontend(path) as fe:
            await fe.realize(daemon.device.num_queues)
            await trio.sleep(0.6)  # twice the grace period
            assert port.session is not None and port.session.id == 1
        nursery.cancel_scope.cancel()
