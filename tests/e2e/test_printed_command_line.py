"""The QEMU command line `vhostser run` prints is what a user pastes: real QEMU boots a guest
with exactly that line, only its disk placeholder replaced by the rig's kernel and initrd (it
once carried reconnect-ms, which QEMU 11.1's generic vhost-user device cannot start with, and
once lacked a display and a disk: QEMU opened a VNC server and booted nothing)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from vhostser.daemon import DISK_PLACEHOLDER

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GUEST_TESTS = ROOT / "tests" / "guest"


def printed_argv(stdout: str) -> list[str]:
    """The command the daemon printed on its stdout, as the shell would split it."""
    m = re.search(r"^(qemu-system-x86_64 (?:.*\\\n)*.*)", stdout, re.M)
    assert m, stdout
    return shlex.split(m.group(1).replace("\\\n", " "))  # the shell drops "\\\n"


def example_argv(socket: str) -> list[str]:
    """examples/web1.qemu.sh for the test's daemon: the rig's socket, RAM and no KVM."""
    text = (ROOT / "examples" / "web1.qemu.sh").read_text()
    argv = shlex.split(text.split("exec ", 1)[1].replace("\\\n", " "), comments=True)
    out = [a.replace("/run/vhostser/web1.sock", socket).replace("size=2G", "size=1G")
           .replace("accel=kvm,", "accel=kvm:tcg,").replace("/var/lib/images/web1.qcow2",
                                                         DISK_PLACEHOLDER)
           for a in argv if a != "$@"]
    i = out.index("-cpu")
    del out[i:i + 2]  # `host` needs KVM
    out[out.index("2G")] = "1G"
    return [*out, "-nographic"]


@pytest.mark.parametrize("source", ["printed", "example"])
def test_the_documented_command_line_boots_a_guest(rig, daemon, source) -> None:  # type: ignore[no-untyped-def]
    """`vhostser run`'s printed line as is, and examples/web1.qemu.sh (same port count)."""
    argv = printed_argv(daemon.stdout().decode()) if source == "printed" else (
        example_argv(daemon.socket))
    assert any("vhost-user-test-device-pci" in a for a in argv), argv
    g = rig.Guest("bound", mode="none", tests_dirs=[str(GUEST_TESTS)],
                  params={"token": "printed"}, timeout=180)
    disk = argv.index(f"file={DISK_PLACEHOLDER},if=virtio")
    # The placeholder, and nothing else, becomes the rig's guest; the printed binary name is
    # the rig's QEMU; -nographic puts the guest's serial console on QEMU's stdout, which the
    # rig logs (so the rig reads its results from there).
    argv[disk - 1:disk + 1] = ["-kernel", g.kernel, "-initrd", g.initrd,
                               "-append", g.kernel_cmdline()]
    assert os.path.basename(argv[0]) == "qemu-system-x86_64"
    argv[0] = g.qemu
    # The build machines have a /dev/kvm that opens but runs no guest (the rig's accel is
    # tcg there, VHOSTSER_E2E_ACCEL): `kvm:tcg` would pick it. Elsewhere the line is as printed.
    argv = [a.replace("accel=kvm:tcg", f"accel={g.accel}") for a in argv]
    g.argv = lambda: argv
    g.serial_log = g.stderr_log
    try:
        g.start()
        result = g.wait()
    finally:
        g.kill()
    assert result.passed, f"{result.log}\n--- daemon\n{daemon.stderr()}"
    assert result.metrics[0]["driver"] == "virtio_console"
    g.cleanup()
