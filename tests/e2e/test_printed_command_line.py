"""The QEMU command line `vhostser run` prints is what a user pastes: real QEMU must boot a
guest with exactly those device options (it once carried reconnect-ms, which QEMU 11.1's
generic vhost-user device cannot start with)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
GUEST_TESTS = Path(__file__).resolve().parents[1] / "guest"


def printed_options(stderr: str) -> list[str]:
    m = re.search(r"Connect QEMU \(>= 10\.2\) with:\n((?:.*\\\n)*.*)", stderr)
    assert m, stderr
    argv = shlex.split(m.group(1).replace("\\\n", " "))
    assert argv[0] == "qemu-system-x86_64"
    return argv[1:]


def example_options(socket: str) -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "examples" / "web1.qemu.sh").read_text()
    argv = shlex.split(text.split("exec ", 1)[1].replace("\\\n", " "), comments=True)
    return [a.replace("/run/vhostser/web1.sock", socket).replace("size=2G", "size=1G")
            for a in argv[1:] if a != "$@"]


@pytest.mark.parametrize("source", ["printed", "example"])
def test_the_documented_command_line_boots_a_guest(rig, daemon, source) -> None:  # type: ignore[no-untyped-def]
    """`vhostser run`'s printed line, and examples/web1.qemu.sh (same port count)."""
    if source == "printed":
        options = printed_options(daemon.stderr())
    else:
        options = example_options(daemon.socket)
    # The rig supplies kernel, console, RAM size and accel; keep the printed device options
    # (memory backend, chardev, device, machine's memory-backend) and size RAM to the rig's.
    options = [o.replace("size=1G", "size=512M") for o in options]
    keep: list[str] = []
    it = iter(options)
    for flag in it:
        value = next(it)
        if flag in ("-object", "-chardev") or (
            flag == "-device" and "vhost-user" in value
        ) or (
            flag == "-machine" and "memory-backend=mem" in value
        ):
            keep += [flag, value.replace("q35,", "").replace("accel=kvm,", "")]
    assert any("vhost-user-test-device-pci" in k for k in keep), keep
    g = rig.Guest("bound", mode="none", mem_mb=512, extra_args=keep, tests_dirs=[str(GUEST_TESTS)],
                  params={"token": "printed"}, timeout=120)
    try:
        g.start()
        result = g.wait()
    finally:
        g.kill()
    assert result.passed, f"{result.log}\n--- qemu\n{g.stderr()}\n--- daemon\n{daemon.stderr()}"
    assert result.metrics[0]["driver"] == "virtio_console"
    g.cleanup()
