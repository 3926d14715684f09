"""Per-VM config file (TOML) → validated objects, with errors that name the file, the line,
the key and what was expected, all of them at once:

    web1.toml:3: vm.max_port: unknown key (did you mean max_ports?)
    web1.toml:12: port 1 (org.qemu.guest_agent.0).backend.mode: expected one of "stream",
    "session", "framed", got 'sesion'

Unknown keys are errors: a typo must never be silently ignored.

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
    allow_uids = [64055]                   # who may connect to the vhost-user, admin and
    allow_gids = ["kvm"]                   # backend sockets besides the daemon's user
                                           # (SO_PEERCRED; a backend may have its own lists)
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

import ipaddress
import json
import os
import re
import string
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .backends import registry
from .console import DEFAULT_STAGING, PortBackend, PortConfig
from .options import OptionError, Options, collecting
from .sockets import PeerPolicy

T = TypeVar("T")


@dataclass(frozen=True)
class PortSpec:
    """A configured port: its device-side config and how to make its backend."""

    config: PortConfig
    backend_type: str
    backend_options: dict[str, Any]
    make_backend: BackendMaker


class BackendMaker(Protocol):
    """A new backend for a port; `peers`, who may connect to its unix sockets unless its own
    options say (the daemon passes the [vm] table's allow lists)."""

    def __call__(self, peers: PeerPolicy = ...) -> PortBackend: ...


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


class ConfigError(OptionError):
    """A config file is not valid: `errors`, one line each (`FILE:LINE: WHERE: problem`), in
    the file's order; `str()` is the first, for the one line `run` prints."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors[0])
        self.errors = errors


class _Lines:
    """Where each key of a (valid) TOML document is: tomllib gives no positions. Maps a key
    path like ("vm", "max_ports") or ("port", 2, "backend", "path") (the third [[port]]) to
    its line; a key inside an inline table or a multi-line array is placed at the line of the
    key that holds it, a table at its header."""

    _KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
    _DOTTED = re.compile(rf"\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*")
    _PART = re.compile(rf"\s*({_KEY})\s*\.?")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        arrays: dict[tuple[str, ...], int] = {}  # [[a.b]] by key path: its current index
        table: tuple[str | int, ...] = ()
        for number, line in self._logical_lines(text):
            stripped = line.lstrip()
            array = stripped.startswith("[[")
            if stripped.startswith("["):
                m = self._DOTTED.match(stripped, 2 if array else 1)
                if not m:
                    continue
                keys = self._parts(m.group(1))
                if array:
                    arrays[keys] = arrays.get(keys, -1) + 1
                table = self._resolve(keys, arrays)
                self.lines.setdefault(table, number)
            elif (m := self._DOTTED.match(stripped)) and stripped[m.end():].startswith("="):
                keys = self._parts(m.group(1))
                for k in range(1, len(keys) + 1):  # a.b = 1 defines the table a here too
                    self.lines.setdefault(table + keys[:k], number)

    @staticmethod
    def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
        """(number, text) of each line that starts outside any string, array or inline
        table: where a key or a header may be."""
        depth, quote, number, i, n = 0, "", 1, 0, len(text)
        start = True
        while i < n:
            if start and depth == 0 and not quote:
                end = text.find("\n", i)
                yield number, text[i:end if end >= 0 else n]
            start = False
            c = text[i]
            step = 1
            if quote:
                if c == "\\" and quote in ('"', '"""'):
                    step = 2
                elif text.startswith(quote, i):
                    quote, step = "", len(quote)
            elif c == "#":
                end = text.find("\n", i)
                step = (end if end >= 0 else n) - i
            elif c in "\"'":
                quote = c * 3 if text.startswith(c * 3, i) else c
                step = len(quote)
            elif c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            newlines = text.count("\n", i, i + step)
            if newlines:
                number += newlines
                start = text[i + step - 1] == "\n"
            i += step

    def _parts(self, dotted: str) -> tuple[str, ...]:
        return tuple(tomllib.loads(f"k = {p}")["k"] if p[0] in "\"'" else p
                     for p in (m.group(1) for m in self._PART.finditer(dotted)))

    @staticmethod
    def _resolve(keys: tuple[str, ...],
                 arrays: dict[tuple[str, ...], int]) -> tuple[str | int, ...]:
        """A header's key path with the index of each array of tables on the way."""
        path: list[str | int] = []
        for k in range(len(keys)):
            path.append(keys[k])
            if keys[:k + 1] in arrays:
                path.append(arrays[keys[:k + 1]])
        return tuple(path)

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        for k in range(len(path), 0, -1):
            if path[:k] in self.lines:
                return self.lines[path[:k]]
        return None


class _Errors:
    """The errors found in one document so far, each placed at its line."""

    def __init__(self, source: str, lines: _Lines | None) -> None:
        self.source, self.lines = source, lines
        self.found: list[tuple[int, str]] = []

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        return self.lines.line_of(path) if self.lines else None

    def add(self, path: tuple[str | int, ...], message: object) -> None:
        line = self.line_of(path)
        self.found.append((line or 0, f"{self.source}:{line}: {message}" if line
                           else f"{self.source}: {message}"))

    def read(self, path: tuple[str | int, ...], read: Callable[[], T], default: T) -> T:
        """`read()` (reading the table at `path`), or `default` with its error noted; unknown
        keys met on the way are noted too, and skipped."""
        unknown: list[OptionError] = []
        try:
            with collecting(unknown):
                return read()
        except OptionError as e:
            unknown.append(e)
            return default
        finally:
            for error in unknown:
                self.add(path + ((error.key,) if error.key else ()), error)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError([m for _, m in sorted(self.found, key=lambda f: f[0])])


def parse(text: str, source: str, *, default_name: str = "default") -> VMConfig:
    """Validate a config document; `source` names it in errors. ConfigError lists every
    error found (reading on past each one where the rest does not depend on it)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"]) from None
    except RecursionError:  # tomllib recurses per nesting level of arrays and inline tables
        raise ConfigError([f"{source}: arrays or tables nested too deeply"]) from None
    errors = _Errors(source, _Lines(text))
    top = errors.read((), lambda: Options(doc, "<top>", {"vm", "port"}, terse=True),
                      Options({}, "<top>", ()))
    vm = errors.read(("vm",), lambda: Options(top.get("vm", dict, {}), "vm", _VM_KEYS,
                                              terse=True), Options({}, "vm", ()))

    def read(key_read: Callable[[], T], default: T) -> T:
        return errors.read(("vm",), key_read, default)

    name = read(lambda: vm.string("name", default_name, nonempty=False), default_name)
    max_ports = read(lambda: vm.integer("max_ports", 4, lo=1, hi=31), None)
    ports: list[tuple[int, PortSpec]] = []
    tables: list[object] = errors.read((), lambda: top.get("port", list, []), [])
    for i, table in enumerate(tables):
        # A bad max_ports is its own error; the ports' ids are then checked against 31.
        spec = _port(errors, ("port", i), _port_label(i, table, max_ports or 31), table,
                     max_ports or 31)
        if spec is not None:
            ports.append((i, spec))
    _unique(errors, ports)
    order = read(lambda: vm.choice("resize_order", ("cols-rows", "rows-cols"), "cols-rows"),
                 "cols-rows")
    cfg = VMConfig(
        name=name,
        socket=read(lambda: vm.string("socket", f"/run/vhostser/{name}.sock", nonempty=False),
                    f"/run/vhostser/{name}.sock"),
        max_ports=max_ports or 4,
        state_dir=read(lambda: vm.string("state_dir", nonempty=False), None),
        admin_socket=read(lambda: vm.string("admin_socket", nonempty=False), None),
        metrics_listen=read(lambda: _metrics_listen(vm), None),
        frontend_grace=read(lambda: _grace(vm), 30.0),
        cols=read(lambda: vm.integer("cols", 80, lo=1, hi=0xFFFF), 80),
        rows=read(lambda: vm.integer("rows", 25, lo=1, hi=0xFFFF), 25),
        resize_rows_first=order == "rows-cols",
        ports=tuple(spec for _, spec in ports),
        source=source,
        socket_mode=read(lambda: vm.socket_mode("socket_mode", 0o600), 0o600),
        socket_group=read(lambda: vm.group("socket_group"), None),
        allow_uids=read(lambda: vm.users("allow_uids"), ()),
        allow_gids=read(lambda: vm.groups("allow_gids"), ()),
        allowed_dirs=read(lambda: _dirs(vm, "allowed_dirs"), None),
        allow_remote_bind=read(lambda: vm.boolean("allow_remote_bind", False), False),
    )
    errors.raise_any()
    return cfg


def _unique(errors: _Errors, ports: list[tuple[int, PortSpec]]) -> None:
    """Each id, and each name given, once. `ports`: (position in the file, port)."""
    for key, what in (("id", "a unique port id"), ("name", "a unique name")):
        seen: dict[object, int] = {}
        for i, p in ports:
            value = p.config.id if key == "id" else p.config.name
            if value == "":
                continue
            if value in seen:
                line = errors.line_of(("port", seen[value], key))
                errors.add(("port", i, key), f"{port_label(p.config.id, p.config.name)}.{key}: "
                           f"expected {what}, got {value!r} (also port #{seen[value] + 1}"
                           + (f", line {line})" if line else ")"))
            else:
                seen[value] = i


def _grace(vm: Options) -> float:
    grace = vm.get("frontend_grace", float, 30.0)
    if not grace >= 0 or grace == float("inf"):  # also NaN
        vm.fail("frontend_grace", "a number of seconds ≥ 0", grace)
    return grace


def _metrics_listen(vm: Options) -> tuple[str, int] | None:
    metrics = vm.string("metrics_listen", nonempty=False)
    if metrics is None:
        return None
    host, sep, port_text = metrics.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        vm.fail("metrics_listen", '"HOST:PORT", e.g. "127.0.0.1:9464"', metrics)
    return host.strip("[]"), int(port_text)


def _dirs(vm: Options, key: str) -> tuple[str, ...] | None:
    if key not in vm.table:
        return None
    dirs = vm.get(key, list, [])
    for d in dirs:
        if not isinstance(d, str) or not os.path.isabs(d) or "\0" in d:
            vm.fail(key, "a list of absolute directory paths", dirs)
    return tuple(os.path.normpath(d) for d in dirs)


def port_label(pid: int, name: str) -> str:
    """How errors and warnings name a port: `port 1 (org.qemu.guest_agent.0)`."""
    return f"port {pid}" + (f" ({name})" if name else "")


def _port_label(i: int, table: object, max_ports: int) -> str:
    """The label of the `i`th [[port]] before it is read: by its id if that is good, else by
    its position (`port #3 (no id)`)."""
    t = table if isinstance(table, Mapping) else {}
    pid, name = t.get("id"), t.get("name")
    good_name = name if isinstance(name, str) and name.isprintable() and \
        _name_problem(name) is None else ""
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < max_ports:
        return port_label(pid, good_name)
    return f"port #{i + 1} ({good_name or ('bad id' if 'id' in t else 'no id')})"


def _name_problem(name: str) -> str | None:
    if "/" in name or "\0" in name or len(name.encode()) > 255:
        return "a port name without '/' or NUL, of at most 255 bytes"
    return None


def _port_name(r: Options) -> str:
    name = r.string("name", "", nonempty=False)
    if (problem := _name_problem(name)) is not None:
        r.fail("name", problem, name)
    return name


def _port(errors: _Errors, path: tuple[str | int, ...], where: str, table: object,
          max_ports: int) -> PortSpec | None:
    """One port table, its errors noted; None if it has any."""
    before = len(errors.found)
    if not isinstance(table, Mapping):
        errors.add(path, f"{where}: expected a table, got {table!r}")
        return None
    r = errors.read(path, lambda: Options(table, where, _PORT_KEYS, terse=True),
                    Options({}, where, ()))

    def read(key_read: Callable[[], T], default: T) -> T:
        return errors.read(path, key_read, default)

    pid = read(lambda: r.required_integer("id", lo=0, hi=max_ports - 1), -1)
    config = PortConfig(
        id=pid,
        name=read(lambda: _port_name(r), ""),
        console=read(lambda: r.boolean("console", False), False),
        guest_writes_without_host=read(lambda: r.choice(
            "guest_writes_without_host", ("hold", "discard"), "hold"), "hold"),
        staging_limit=read(lambda: r.integer("staging", DEFAULT_STAGING, lo=4096, hi=64 << 20),
                           DEFAULT_STAGING),
    )
    table_read: dict[str, Any] | None = read(lambda: r.required("backend", dict), None)
    if table_read is None:
        return None
    backend = dict(table_read)
    bwhere = f"{where}.backend"
    bpath = (*path, "backend")
    btype = errors.read(bpath, lambda: registry.backend_type(backend.pop("type", None), bwhere),
                        None)
    if btype is None:
        return None
    make_backend = partial(registry.create, btype, backend, bwhere)
    errors.read(bpath, make_backend, None)  # validates now; makes no sockets or files
    if len(errors.found) > before:
        return None
    return PortSpec(config, btype, backend, make_backend)


def parse_port(source: str, where: str, table: object, max_ports: int) -> PortSpec:
    """One port table (an admin add-port's), its backend options validated. ConfigError
    lists its errors, each `{source}: {where}.key: ...`."""
    errors = _Errors(source, None)
    spec = _port(errors, (), where, table, max_ports)
    errors.raise_any()
    assert spec is not None
    return spec


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
            raise ConfigError([
                f"{where}.backend.{key}: {path!r} is not inside a directory admin requests "
                f"may name ({', '.join(cfg.admin_dirs) or 'none'}; [vm] allowed_dirs)"])
    if not cfg.allow_remote_bind:
        for host in backend.listen_hosts(options):
            if not _loopback(host):
                raise ConfigError([
                    f"{where}.backend.host: {host!r}: admin requests may listen on loopback "
                    "only (127.0.0.0/8, ::1, localhost) unless [vm] allow_remote_bind = true"])


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(p: Path) -> str:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 (as TOML must be): byte 0x{raw[e.start]:02x} at "
                           f"offset {e.start}"]) from None


def load(path: str | os.PathLike[str]) -> VMConfig:
    p = Path(path)
    return parse(_read(p), str(p), default_name=p.stem)


# A unix socket's path fits in sockaddr_un.sun_path (108 bytes) with its NUL.
SUN_PATH_MAX = 107


def derived_admin_socket(vhost_user_socket: str) -> str:
    """The admin socket beside a vhost-user socket when none is configured: web1.sock →
    web1.ctl (any other name gets .ctl appended), so every VM's daemon has its own."""
    base = vhost_user_socket.removesuffix(".sock")
    return base + ".ctl"


def unix_sockets(spec: PortSpec) -> list[tuple[str, str, bool]]:
    """The unix sockets a port's backend uses: (option, path, whether it listens there)."""
    o = spec.backend_options
    if spec.backend_type == "unix" and isinstance(path := o.get("path"), str):
        return [("path", path, o.get("role", "server") == "server")]
    if spec.backend_type == "console" and isinstance(path := o.get("socket"), str):
        return [("socket", path, True)]
    return []


def socket_problem(path: str, listens: bool) -> str | None:
    """Why the daemon could not bind (`listens`) or connect to a unix socket at `path`, as far
    as can be seen now; None if it could."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        return (f"expected a socket path of at most {SUN_PATH_MAX} bytes (sun_path), got "
                f"{path!r} ({size} bytes)")
    if not listens:
        return None
    # The daemon makes missing directories: the nearest one there must let it.
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"expected a directory for the socket, got {existing}, which is not one"
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=True):
        return (f"expected a socket directory this user (uid {os.geteuid()}) may write in, "
                f"got {existing}")
    return None


def check(path: str | os.PathLike[str]) -> VMConfig:
    """`load`, and the sockets the daemon could not make or reach (a directory it may not
    write in, a path too long for a unix socket): ConfigError, with their lines."""
    p = Path(path)
    text = _read(p)
    cfg = parse(text, str(p), default_name=p.stem)
    sockets: list[tuple[tuple[str | int, ...], str, str, bool]] = []
    if cfg.socket:
        sockets.append((("vm", "socket"), "vm.socket", cfg.socket, True))
    if cfg.admin_socket:
        sockets.append((("vm", "admin_socket"), "vm.admin_socket", cfg.admin_socket, True))
    elif cfg.admin_socket is None and cfg.socket:
        sockets.append((("vm", "socket"), "vm.socket (its admin socket, admin_socket unset)",
                        derived_admin_socket(cfg.socket), True))
    for i, spec in enumerate(cfg.ports):
        label = port_label(spec.config.id, spec.config.name)
        for key, sock, listens in unix_sockets(spec):
            sockets.append((("port", i, "backend", key), f"{label}.backend.{key}", sock, listens))
    errors = _Errors(str(p), _Lines(text))
    for where_path, where, sock, listens in sockets:
        if (problem := socket_problem(sock, listens)) is not None:
            errors.add(where_path, f"{where}: {problem}")
    errors.raise_any()
    return cfg


def default() -> VMConfig:
    runtime = json.dumps(default_runtime_dir())[1:-1]  # as the inside of a TOML string
    return parse(string.Template(DEFAULT_TOML).substitute(runtime_dir=runtime),
                 "<embedded default>")
