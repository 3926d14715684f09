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
from functools import partial
from pathlib import Path
from typing import Any

from .backends import registry
from .console import DEFAULT_STAGING, PortBackend, PortConfig
from .options import OptionError, Options

# One error for a bad key wherever it is read (this file's tables, a backend's options, an
# admin add-port), so a backend's error needs no rewrapping on its way out of `parse`.
ConfigError = OptionError


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


def parse(text: str, source: str, *, default_name: str = "default") -> VMConfig:
    """Validate a config document; `source` names it in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    top = Options(doc, f"{source}: <top>", {"vm", "port"}, terse=True)
    vm = Options(top.get("vm", dict, {}), f"{source}: vm", _VM_KEYS, terse=True)
    name = vm.string("name", default_name, nonempty=False)
    max_ports = vm.integer("max_ports", 4, lo=1, hi=31)
    grace = vm.get("frontend_grace", float, 30.0)
    if not grace >= 0 or grace == float("inf"):  # also NaN
        vm.fail("frontend_grace", "a number of seconds ≥ 0", grace)
    order = vm.choice("resize_order", ("cols-rows", "rows-cols"), "cols-rows")
    metrics = vm.string("metrics_listen", nonempty=False)
    metrics_listen = None
    if metrics is not None:
        host, sep, port_text = metrics.rpartition(":")
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            vm.fail("metrics_listen", '"HOST:PORT", e.g. "127.0.0.1:9464"', metrics)
        metrics_listen = (host.strip("[]"), int(port_text))
    ports = [parse_port(source, f"port[{i}]", table, max_ports)
             for i, table in enumerate(top.get("port", list, []))]
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
        socket=vm.string("socket", f"/run/vhostser/{name}.sock", nonempty=False),
        max_ports=max_ports,
        state_dir=vm.string("state_dir", nonempty=False),
        admin_socket=vm.string("admin_socket", nonempty=False),
        metrics_listen=metrics_listen,
        frontend_grace=grace,
        cols=vm.integer("cols", 80, lo=1, hi=0xFFFF),
        rows=vm.integer("rows", 25, lo=1, hi=0xFFFF),
        resize_rows_first=order == "rows-cols",
        ports=tuple(ports),
        source=source,
    )


def parse_port(source: str, where: str, table: object, max_ports: int) -> PortSpec:
    """One port table ([[port]], or an admin add-port's), its backend options validated.
    Errors read `{source}: {where}.key: ...`, e.g. `web1.toml: port[1].id: ...`."""
    r = Options(table, f"{source}: {where}", _PORT_KEYS, terse=True)
    pid = r.required_integer("id", lo=0, hi=max_ports - 1)
    name = r.string("name", "", nonempty=False)
    if "/" in name or len(name.encode()) > 255:  # (the reader refuses NUL in any string)
        r.fail("name", "a port name without '/' or NUL, of at most 255 bytes", name)
    config = PortConfig(
        id=pid,
        name=name,
        console=r.boolean("console", False),
        guest_writes_without_host=r.choice(
            "guest_writes_without_host", ("hold", "discard"), "hold"
        ),
        staging_limit=r.integer("staging", DEFAULT_STAGING, lo=4096, hi=64 << 20),
    )
    backend = dict(r.required("backend", dict))
    bwhere = f"{r.where}.backend"
    btype = registry.backend_type(backend.pop("type", None), bwhere)
    make_backend = partial(registry.create, btype, backend, bwhere)
    make_backend()  # validates now; makes no sockets or files
    return PortSpec(config, btype, backend, make_backend)


def load(path: str | os.PathLike[str]) -> VMConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return parse(text, str(p), default_name=p.stem)


def default() -> VMConfig:
    return parse(DEFAULT_TOML, "<embedded default>")
