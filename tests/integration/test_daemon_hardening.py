"""The daemon process against what used to kill it or lose state: a backend raising, floods
of connections, deeply nested input, signals at awkward moments, a front end reconnecting at
once, sockets in directories others control, admin requests naming paths they should not.
Each test drives a real daemon process over its real sockets and signals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

from vhostser.testing import open_frontend
from vhostser.testing.console_driver import ConsoleDriver

from .daemon_proc import daemon_process

ECHO_AND_STDOUT = """
[vm]
name = "hard"
socket = "{tmp}/vu.sock"
max_ports = 4
admin_socket = "{tmp}/ctl.sock"

[[port]]
id = 0
console = true
backend = {{ type = "stdout" }}

[[port]]
id = 1
name = "org.test.echo"
backend = {{ type = "echo" }}
"""


async def _console_then_echo(path: str, console_writes: int) -> bytes:
    """A guest that writes to its console `console_writes` times, then echoes through port
    1; what came back."""
    async with open_frontend(path) as fe:
        driver = ConsoleDriver(fe, max_ports=4)
        await driver.probe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            console = await driver.wait_port(0)
            for i in range(console_writes):
                await console.write_all(b"console line %d\n" % i)
                await trio.sleep(0.05)  # let the restarted backend fail again: several rounds
            echo = await driver.wait_port("org.test.echo")
            await driver.wait_for(lambda: echo.host_connected)
            await echo.open()
            await echo.write_all(b"still echoing")
            got = await echo.read_exactly(13, timeout=10)
            nursery.cancel_scope.cancel()
    return got


# ------------------------------------------------------------------ A: backend containment


def test_stdout_backend_whose_reader_went_away_fails_alone(tmp_path: Path) -> None:
    """The embedded default's console backend writes to stdout; with its reader gone it
    raises BrokenPipeError from guest_data. Only port 0 notices."""
    with daemon_process(tmp_path, ECHO_AND_STDOUT, stdout=subprocess.PIPE) as d:
        assert d.proc.stdout is not None
        d.proc.stdout.close()  # the reader goes away
        d.ready()
        assert trio.run(_console_then_echo, str(tmp_path / "vu.sock"), 10) == b"still echoing"
        stats = d.ctl_json("stats")
        console = stats["ports"]["0"]
        assert console["backend_failures"] >= 1
        assert stats["device"]["backend_failures"] == console["backend_failures"]
        assert console["discarded"]["backend-failed"] > 0
        assert console["bytes_from_guest"] + console["discarded"]["backend-failed"] == sum(
            len(b"console line %d\n" % i) for i in range(10))
        assert stats["ports"]["1"]["backend_failures"] == 0
        log = d.stderr()
        assert "port 0 '': backend <vhostser.backends.registry.Stdout" in log
        assert "failed in guest_data (failure 1 on this port)" in log
        assert "BrokenPipeError" in log
        assert "port 0 '': backend restarted" in log
        assert d.stop() == 0
