"""Every example config passes `vhostser check`, and its QEMU/libvirt snippets match it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vhostser.config import load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.toml"))


def test_there_are_examples() -> None:
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_vhostser_check_accepts(path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vhostser", "check", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{path}: ok")


def test_check_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "web1.toml"
    broken.write_text((EXAMPLES / "web1.toml").read_text().replace('mode = "session"',
                                                                    'mode = "sesion"'))
    r = subprocess.run([sys.executable, "-m", "vhostser", "check", str(broken)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"{broken}:27: port 1 (org.qemu.guest_agent.0).backend.mode: expected one of" in r.stderr
    assert "'sesion'" in r.stderr


@pytest.mark.parametrize("snippet", ["web1.qemu.sh", "web1.libvirt.xml"])
def test_qemu_snippets_match_the_config(snippet: str) -> None:
    cfg = load(EXAMPLES / "web1.toml")
    text = (EXAMPLES / snippet).read_text()
    assert f"path={cfg.socket}" in text
    (num_vqs,) = re.findall(r"num_vqs=(\d+)", text)
    assert int(num_vqs) == 2 * cfg.max_ports + 2
    assert "config_size=12" in text and "virtio-id=3" in text
    assert "share=on" in text or "<access mode='shared'/>" in text


def test_vhost_user_backend_descriptor() -> None:
    """examples/50-vhostser-console.json, for /usr/share/qemu/vhost-user or
    /etc/qemu/vhost-user: a VhostUserBackend of QEMU's vhost-user.json (description, type,
    binary; tags optional), with the type --print-capabilities reports, and the binary the
    console script pyproject.toml installs."""
    import json
    import tomllib

    doc = json.loads((EXAMPLES / "50-vhostser-console.json").read_text())
    assert set(doc) == {"description", "type", "binary"}
    r = subprocess.run([sys.executable, "-m", "vhostser", "--print-capabilities"],
                       capture_output=True, text=True, timeout=60)
    assert doc["type"] == json.loads(r.stdout)["type"] == "console"
    scripts = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())["project"][
        "scripts"]
    name = Path(doc["binary"]).name
    assert scripts[name] == "vhostser.cli:backend_main"


VIRT_XML_VALIDATE = shutil.which("virt-xml-validate")
needs_validator = pytest.mark.skipif(
    VIRT_XML_VALIDATE is None or shutil.which("xmllint") is None,
    reason="virt-xml-validate (Debian: libvirt-clients, libxml2-utils) not installed; "
           "bin/run-tests installs them")


def validate_domain(path: Path) -> subprocess.CompletedProcess[str]:
    assert VIRT_XML_VALIDATE
    return subprocess.run([VIRT_XML_VALIDATE, str(path), "domain"],
                          capture_output=True, text=True, timeout=60)


@needs_validator
def test_the_libvirt_example_is_a_valid_domain() -> None:
    r = validate_domain(EXAMPLES / "web1.libvirt.xml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_validator
def test_the_validator_rejects_a_broken_domain(tmp_path: Path) -> None:
    """The check above can fail: libvirt's schema refuses a misspelt element."""
    broken = tmp_path / "web1.libvirt.xml"
    broken.write_text((EXAMPLES / "web1.libvirt.xml").read_text()
                      .replace("<vcpu>2</vcpu>", "<vcpus>2</vcpus>"))
    r = validate_domain(broken)
    assert r.returncode != 0, r.stdout
