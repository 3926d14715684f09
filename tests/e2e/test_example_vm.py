"""examples/web1.toml on a real VM: console log and live reader, the guest agent and spice
channels, the log port, and SIGTERM closing every session with reason shutdown."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GUEST_TESTS = ROOT / "tests" / "guest"


def _connect(path: Path, timeout: float = 20) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            s.settimeout(30)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _read_until(s: socket.socket, needle: bytes, timeout: float = 30) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: keep the tree short.
    d = Path(tempfile.mkdtemp(prefix="vs-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_example_vm(rig, daemon_class, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    text = (ROOT / "examples" / "web1.toml").read_text()
    for prefix, sub in (("/run/vhostser", "run"), ("/var/log/vhostser", "log"),
                        ("/var/lib/vhostser", "lib")):
        text = text.replace(prefix, str(short_tmp / sub))
    for d in ("run/web1", "log", "lib"):
        (short_tmp / d).mkdir(parents=True, exist_ok=True)
    d = daemon_class(short_tmp, text.replace("{", "{{").replace("}", "}}"),
                     socket=str(short_tmp / "run" / "web1.sock"),
                     admin=str(short_tmp / "run" / "web1" / "ctl.sock"))
    run = short_tmp / "run" / "web1"
    qga = _connect(run / "qga.sock")
    spice = _connect(run / "spice.sock")
    g = rig.Guest("example_vm", mode="vhost-user", vu_socket=d.socket, vu_max_ports=4,
                  tests_dirs=[str(GUEST_TESTS)], quiet=False,
                  # hvc0 gets kernel messages live once virtio_console registers it; ttyS0
                  # stays /dev/console (the last console=) for the rig's markers.
                  cmdline_extra="console=hvc0 console=ttyS0", timeout=120)
    try:
        g.start()
        assert g.wait_for_line(r"^E2E-READY", timeout=90), g.log() + g.stderr() + d.stderr()
        # The guest agent channel carries the guest's bytes to the management peer.
        assert b'{"execute":"guest-ping"}' in _read_until(qga, b"guest-ping")
        # The console: the boot log and the guest's line, in the log file and to a reader.
        log_file = short_tmp / "log" / "web1.console.log"
        deadline = time.monotonic() + 20
        while b"hello console" not in log_file.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        console_log = log_file.read_bytes()
        assert re.search(rb"Linux version 6\.", console_log), console_log[:2000]
        assert b"clocksource: Switched to clocksource" in console_log  # live kernel output
        assert b"hello console from the example VM" in console_log
        reader = _connect(run / "console.sock")
        scrollback = _read_until(reader, b"hello console from the example VM")
        assert re.search(rb"Linux version 6\.", scrollback)
        assert b"hello console from the example VM" in scrollback
        # The log-only port, with timestamps.
        guest_log = (short_tmp / "log" / "web1.guest.log").read_text()
        assert "log line from the guest" in guest_log
        # SIGTERM: exit 0, every open session closed with reason shutdown, state saved.
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0, d.stderr()
        log = d.stderr()
        for port in ("''", "'org.qemu.guest_agent.0'", "'com.redhat.spice.0'"):
            assert re.search(rf"port \d {re.escape(port)}: session \d+ closed: shutdown", log), log
        assert re.search(r"port 3 'org.example.log': session 1 closed: guest-close", log), log
        state = (short_tmp / "lib" / "web1" / "state.json").read_text()
        assert '"guest_open": true' in state
        # The session-mode peer sees its session end as EOF.
        assert _read_until(qga, b"never", timeout=10) == b""
    finally:
        g.kill()
        d.stop()
        for s in (qga, spice):
            s.close()
