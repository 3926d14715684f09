"""Per-VM config file (TOML) → validated objects, with errors that name the file, the key and
what was expected. Unknown keys are errors: a typo must never be silently ignored.

    [vm]
    name = "web1"                          # default: the file's stem
    socket = "/run/vhostser/web1.sock"     # vhost-user socket (unless socket-activated)
    max_ports = 4                          # 1..31; QEMU's num_vqs = 2 * max_ports + 2
    state_dir = "/var/lib/vhostser/web1"   # session ids and open state survive restarts
    admin_socket = "/run/vhostser/web1.ctl"
    metrics_listen = "127.0.0.1:9464"      # optional: Prometheus scrapes GET /metrics here
    frontend_grace = 30.0                  # seconds QEMU may stay away before sessions close
    cols = 80                              # console size in the config space
    rows = 25
    resize_order = "cols-rows"             # RESIZE payload order: spec's, or "rows-cols"

    [[port]]
    id = 1
    name = "org.qemu.guest_agent.0"
    console = false
    guest_writes_without_host = "hold"     # or "discard"
    staging = 65536                        # host→guest bytes buffered per port
    backend = { type = "unix", path = "/run/vhostser/web1.qga.sock" }
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.registry import BACKENDS, OptionError
from .console import DEFAULT_STAGING, PortBackend, PortConfig


class ConfigError(ValueError):
    """The config file is not valid; the message names the file and the key."""


@dataclass(frozen=True)
class PortSpec:
    """A configured port: its device-side config and how to make its backend."""

    config: PortConfig
    backend_type: str
    backend_options: dict[str, Any]
    make_backend: Callable[[], PortBackend]


@dataclass(frozen=True)
class VMConfig:
    name: str
    socket: str
    max_ports: int = 4
    state_dir: str | None = None
    admin_socket: str | None = None
    metrics_listen: tuple[str, int] | None = None
    frontend_grace: float = 30.0
    cols: int = 80
    rows: int = 25
    resize_rows_first: bool = False
    ports: tuple[PortSpec, ...] = field(default_factory=tuple)
    source: str = "<embedded default>"


DEFAULT_TOML = """\
# The embedded default: a console on port 0 (printed on stdout) and an echo port.
[vm]
name = "default"
socket = "/tmp/vhostser/default.sock"
max_ports = 4
admin_socket = "/tmp/vhostser/default.ctl"

[[port]]
id = 0
console = true
backend = { type = "stdout" }

[[port]]
id = 1
name = "org.vhostser.echo"
backend = { type = "echo" }
"""

_VM_KEYS = {
    "name", "socket", "max_ports", "state_dir", "admin_socket", "metrics_listen",
    "frontend_grace",
    "cols", "rows", "resize_order",
}
_PORT_KEYS = {"id", "name", "console", "guest_writes_without_host", "staging", "backend"}


class _Reader:
    """Typed access to one table, recording which keys were used."""

    def __init__(self, source: str, where: str, table: dict[str, Any], allowed: set[str]) -> None:
        self.source, self.where, self.table = source, where, table
        for key in table:
            if key not in allowed:
                self.fail(key, f"one of {', '.join(sorted(allowed))} (unknown key)", table[key])

    def fail(self, key: str, expected: str, got: object) -> None:
        raise ConfigError(f"{self.source}: {self.where}.{key}: expected {expected}, got {got!r}")

    def get(self, key: str, kind: type, default: Any = None, *, required: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise ConfigError(f"{self.source}: {self.where}.{key}: required key missing")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(key, kind.__name__, value)
        return value

    def int_in(self, key: str, lo: int, hi: int, default: int | None = None, **kw: Any) -> Any:
        value = self.get(key, int, default, **kw)
        if value is not None and not lo <= value <= hi:
            self.fail(key, f"an integer in {lo}..{hi}", value)
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            self.fail(key, f"one of {', '.join(choices)}", value)
        return value


def parse(text: str, source: str, *, default_name: str = "default") -> VMConfig:
    """Validate a config document; `source` names it in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    top = _Reader(source, "<top>", doc, {"vm", "port"})
    vm_table = top.get("vm", dict, {})
    vm = _Reader(source, "vm", vm_table, _VM_KEYS)
    name = vm.get("name", str, default_name)
    max_ports = vm.int_in("max_ports", 1, 31, 4)
    grace = vm.get("frontend_grace", float, 30.0)
    if not grace >= 0 or grace == float("inf"):  # also NaN
        vm.fail("frontend_grace", "a number of seconds ≥ 0", grace)
    order = vm.choice("resize_order", ("cols-rows", "rows-cols"), "cols-rows")
    metrics = vm.get("metrics_listen", str)
    metrics_listen = None
    if metrics is not None:
        host, sep, port_text = metrics.rpartition(":")
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            vm.fail("metrics_listen", '"HOST:PORT", e.g. "127.0.0.1:9464"', metrics)
        metrics_listen = (host.strip("[]"), int(port_text))
    ports: list[PortSpec] = []
    port_list = top.get("port", list, [])
    for i, table in enumerate(port_list):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: port[{i}]: expected a table, got {table!r}")
        ports.append(_port(source, f"port[{i}]", table, max_ports))
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for i, p in enumerate(ports):
        if p.config.id in seen_ids:
            raise ConfigError(f"{source}: port[{i}].id: expected a unique port id, got "
                              f"{p.config.id} (also port[{seen_ids[p.config.id]}].id)")
        seen_ids[p.config.id] = i
        if p.config.name and p.config.name in seen_names:
            raise ConfigError(f"{source}: port[{i}].name: expected a unique name, got "
                              f"{p.config.name!r} (also port[{seen_names[p.config.name]}].name)")
        if p.config.name:
            seen_names[p.config.name] = i
    return VMConfig(
        name=name,
        socket=vm.get("socket", str, f"/run/vhostser/{name}.sock"),
        max_ports=max_ports,
        state_dir=vm.get("state_dir", str),
        admin_socket=vm.get("admin_socket", str),
        metrics_listen=metrics_listen,
        frontend_grace=grace,
        cols=vm.int_in("cols", 1, 0xFFFF, 80),
        rows=vm.int_in("rows", 1, 0xFFFF, 25),
        resize_rows_first=order == "rows-cols",
        ports=tuple(ports),
        source=source,
    )


def _port(source: str, where: str, table: dict[str, Any], max_ports: int) -> PortSpec:
    r = _Reader(source, where, table, _PORT_KEYS)
    pid = r.int_in("id", 0, max_ports - 1, required=True)
    name = r.get("name", str, "")
    if "/" in name or "\0" in name or len(name.encode()) > 255:
        r.fail("name", "a port name without '/' or NUL, of at most 255 bytes", name)
    config = PortConfig(
        id=pid,
        name=name,
        console=r.get("console", bool, False),
        guest_writes_without_host=r.choice(  # type: ignore[arg-type]
            "guest_writes_without_host", ("hold", "discard"), "hold"
        ),
        staging_limit=r.int_in("staging", 4096, 64 << 20, DEFAULT_STAGING),
    )
    backend = dict(r.get("backend", dict, required=True))
    btype = backend.pop("type", None)
    if not isinstance(btype, str) or btype not in BACKENDS:
        r.fail("backend.type", f"one of {', '.join(sorted(BACKENDS))}", btype)
    cls, bwhere = BACKENDS[btype], f"{source}: {where}.backend"
    try:
        cls.from_options(backend, bwhere)  # validates; makes no sockets or files
    except OptionError as e:
        raise ConfigError(str(e)) from None
    return PortSpec(config, btype, backend, lambda: cls.from_options(backend, bwhere))


def load(path: str | os.PathLike[str]) -> VMConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return parse(text, str(p), default_name=p.stem)


def default() -> VMConfig:
    return parse(DEFAULT_TOML, "<embedded default>")
