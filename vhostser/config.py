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
    socket_mode = 0o660                    # the vhost-user socket's mode (default 0o600)
    socket_group = "kvm"                   # and group: for a QEMU running as another user
    allow_uids = [64055]                   # who may connect to the vhost-user and admin
    allow_gids = ["kvm"]                   # sockets besides the daemon's user (SO_PEERCRED)
    allowed_dirs = ["/var/log/vhostser"]   # where admin add-port may name files, sockets
    allow_remote_bind = false              # admin add-port: tcp listeners on loopback only

    [[port]]
    id = 1
    name = "org.qemu.guest_agent.0"
    console = false
    guest_writes_without_host = "hold"     # or "discard"
    staging = 65536                        # host→guest bytes buffered per port
    backend = { type = "unix", path = "/run/vhostser/web1.qga.sock" }
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import string
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
    socket_mode: int = 0o600
    socket_group: int | None = None  # a gid
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    # Where admin add-port may name files, links and unix sockets (None: the directories of
    # state_dir, socket and admin_socket).
    allowed_dirs: tuple[str, ...] | None = None
    allow_remote_bind: bool = False

    @property
    def admin_dirs(self) -> tuple[str, ...]:
        """The directories admin add-port may name paths in."""
        if self.allowed_dirs is not None:
            return self.allowed_dirs
        dirs = [self.state_dir, os.path.dirname(self.socket),
                os.path.dirname(self.admin_socket) if self.admin_socket else None]
        return tuple(dict.fromkeys(d for d in dirs if d))


def default_runtime_dir() -> str:
    """Where the embedded default puts its sockets: $XDG_RUNTIME_DIR/vhostser when set (the
    user's own directory, 0700), else /tmp/vhostser-UID; never a directory another user
    could have made first (the daemon makes it 0700 or refuses it: `sockets`)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "vhostser")
    return f"/tmp/vhostser-{os.geteuid()}"


# $runtime_dir: default_runtime_dir().
DEFAULT_TOML = """\
# The embedded default: a console on port 0 (printed on stdout) and an echo port.
[vm]
name = "default"
socket = "$runtime_dir/default.sock"
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
    "socket_mode", "socket_group", "allow_uids", "allow_gids", "allowed_dirs",
    "allow_remote_bind",
}
_PORT_KEYS = {"id", "name", "console", "guest_writes_without_host", "staging", "backend"}


def parse(text: str, source: str, *, default_name: str = "default") -> VMConfig:
    """Validate a config document; `source` names it in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per nesting level of arrays and inline tables
        raise ConfigError(f"{source}: arrays or tables nested too deeply") from None
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
        socket_mode=_socket_mode(vm),
        socket_group=_id(vm, "socket_group", vm.table["socket_group"], _gid)
        if "socket_group" in vm.table else None,
        allow_uids=_ids(vm, "allow_uids", _uid),
        allow_gids=_ids(vm, "allow_gids", _gid),
        allowed_dirs=_dirs(vm, "allowed_dirs"),
        allow_remote_bind=vm.boolean("allow_remote_bind", False),
    )


def _socket_mode(vm: Options) -> int:
    value = vm.table.get("socket_mode", 0o600)
    if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{3}", value):
        value = int(value.removeprefix("0o"), 8)
    if not isinstance(value, int) or isinstance(value, bool) or (
        value & 0o600 != 0o600 or value & ~0o770
    ):
        vm.fail("socket_mode", "a file mode with read and write for the owner and no bits "
                "for others, like 0o600 or 0o660", value)
    return value


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _id(vm: Options, key: str, value: object, lookup: Callable[[str], int]) -> int:
    """A user or group: its number, or its name looked up now."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
        return value
    if isinstance(value, str) and "\0" not in value:
        try:
            return lookup(value)
        except KeyError:
            pass
    vm.fail(key, "a number or the name of an existing user/group", value)


def _ids(vm: Options, key: str, lookup: Callable[[str], int]) -> tuple[int, ...]:
    return tuple(_id(vm, key, v, lookup) for v in vm.get(key, list, []))


def _dirs(vm: Options, key: str) -> tuple[str, ...] | None:
    if key not in vm.table:
        return None
    dirs = vm.get(key, list, [])
    for d in dirs:
        if not isinstance(d, str) or not os.path.isabs(d) or "\0" in d:
            vm.fail(key, "a list of absolute directory paths", dirs)
    return tuple(os.path.normpath(d) for d in dirs)


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


def check_admin_port(cfg: VMConfig, spec: PortSpec, where: str = "admin request: port") -> None:
    """What an admin add-port may name (a config file, typed by whoever runs the daemon, may
    name anything): paths of files, links and unix sockets only inside `cfg.admin_dirs`, tcp
    listeners only on loopback unless `allow_remote_bind`. ConfigError naming the option, the
    path or address, and the rule."""
    backend = registry.BACKENDS[spec.backend_type]
    options = spec.backend_options
    dirs = [os.path.realpath(d) for d in cfg.admin_dirs]
    for key in backend.PATH_OPTIONS:
        path = options.get(key)
        if path is None:
            continue
        real = os.path.realpath(path)  # `..` and symlinks resolved: where it really goes
        if not (os.path.isabs(path) and any(
            os.path.commonpath([real, d]) == d for d in dirs
        )):
            raise ConfigError(
                f"{where}.backend.{key}: {path!r} is not inside a directory admin requests "
                f"may name ({', '.join(cfg.admin_dirs) or 'none'}; [vm] allowed_dirs)")
    if not cfg.allow_remote_bind:
        for host in backend.listen_hosts(options):
            if not _loopback(host):
                raise ConfigError(
                    f"{where}.backend.host: {host!r}: admin requests may listen on loopback "
                    "only (127.0.0.0/8, ::1, localhost) unless [vm] allow_remote_bind = true")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(path: str | os.PathLike[str]) -> VMConfig:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 (as TOML must be): byte 0x{raw[e.start]:02x} at "
                          f"offset {e.start}") from None
    return parse(text, str(p), default_name=p.stem)


def default() -> VMConfig:
    runtime = json.dumps(default_runtime_dir())[1:-1]  # as the inside of a TOML string
    return parse(string.Template(DEFAULT_TOML).substitute(runtime_dir=runtime),
                 "<embedded default>")
