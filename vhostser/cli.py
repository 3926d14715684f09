"""vhostser: a virtio-serial (virtio-console multiport) back end for QEMU over vhost-user.

`vhostser run | check | ctl | console | attach | bench | soak`: the command line. `run` follows the
vhost-user back-end program conventions (QEMU docs/interop/vhost-user.rst, "Backend program
conventions"): --socket-path, --fd, --print-capabilities, no daemonizing, a status != 0 and
one line on stderr when start-up fails, a clean exit on SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import trio

from . import __version__, admin, attach, systemd
from .config import (
    ConfigError,
    PortSpec,
    VMConfig,
    default,
    derived_admin_socket,
    load,
    port_label,
    unix_sockets,
)
from .config import check as check_config
from .daemon import DISK_PLACEHOLDER, qemu_command_line
from .service import SOCKET_UNIT_FDS, run_daemon
from .sockets import passed_unix

# `--print-capabilities`: the vhost-user.json schema's VHostUserBackendCapabilities for a
# virtio-console back end. The schema's union has members beyond `type` only for "input"
# and "gpu"; "console" has none, so there is no `features` list to print.
CAPABILITIES = {"type": "console"}
CONFIG_DIR = "/etc/vhostser"  # where `vhostser ctl --vm NAME` and `console NAME` look
LOG_LEVELS = ("debug", "info", "warning", "error")


# ---------------------------------------------------------------------------- logging


class JournalFormatter(logging.Formatter):
    """One line per record. Under systemd (stderr is the journal stream) with the kernel's
    <N> priority prefix and no timestamp, so journald keeps the level and its own time; on a
    terminal or in a file with a timestamp and the level spelled out."""

    PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelname, 6)}>{record.name}: {msg}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{when}.{int(record.msecs):03d} {record.levelname} {record.name}: {msg}"


def stderr_is_journal() -> bool:
    """JOURNAL_STREAM names the journal's stream as DEV:INODE; it is ours only if stderr is
    that stream (sd_journal_stream_fd(3)): a child that redirected stderr inherits the
    variable but writes somewhere else."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(stderr_is_journal()))
    logging.basicConfig(level=level.upper(), handlers=[handler])


# ---------------------------------------------------------------------------- errors


# sysexits' EX_CONFIG: `run` with a config it cannot use. The unit does not restart on it
# (RestartPreventExitStatus=): a crash is worth a restart, a bad config is not.
EX_CONFIG = 78


class Fail(Exception):
    """A failure the user can act on: printed as one line, exit status 1 (or `status`)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _fail(message: str) -> NoReturn:
    raise Fail(message)


def _os_text(e: OSError) -> str:
    """An OSError as a sentence: its message and file, without the "[Errno N]"."""
    text = e.strerror or str(e)
    return f"{e.filename}: {text}" if e.filename else text


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested (trio) exception groups, else the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# ---------------------------------------------------------------------------- VMs and sockets


def admin_socket_of(cfg: VMConfig, vhost_user_socket: str | None = None) -> str | None:
    """The configured admin socket (`admin_socket = ""` turns it off), else derived from the
    vhost-user socket the daemon serves."""
    if cfg.admin_socket is not None:
        return cfg.admin_socket or None
    where = cfg.socket if vhost_user_socket is None else vhost_user_socket
    return derived_admin_socket(where) if where else None


@dataclass(frozen=True)
class Target:
    """A running daemon as the user named it: which VM (if known) and its admin socket."""

    vm: str | None
    admin: str | None

    @property
    def who(self) -> str:
        return f"the daemon for VM {self.vm}" if self.vm else f"the daemon at {self.admin}"


def resolve_vm(name: str) -> VMConfig:
    """A VM name → its config: a path (has a / or ends in .toml), NAME.toml in
    $VHOSTSER_CONFIG_DIR (default /etc/vhostser, where the systemd unit reads it), or the
    embedded default for "default"."""
    if "/" in name or name.endswith(".toml"):
        return load(name)
    directory = os.environ.get("VHOSTSER_CONFIG_DIR", CONFIG_DIR)
    path = Path(directory) / f"{name}.toml"
    if path.exists():
        return load(path)
    if name == "default":
        return default()
    _fail(f"no config for VM {name!r}: {path} does not exist (give --config FILE or "
          "--admin SOCKET)")


def target(vm: str | None = None, config: str | None = None,
           admin_path: str | None = None) -> Target:
    if admin_path:
        return Target(vm, admin_path)
    try:
        cfg = load(config) if config else resolve_vm(vm) if vm else default()
    except ConfigError as e:
        _fail(str(e))
    path = admin_socket_of(cfg)
    if not path:
        _fail(f"VM {cfg.name} has no admin socket (admin_socket = \"\" in {cfg.source})")
    return Target(cfg.name, path)


def ask(t: Target, req: dict[str, Any]) -> dict[str, Any]:
    """One admin request; Fail with one line saying why there is no answer."""
    path = t.admin
    assert path is not None
    try:
        return admin.request(path, req)
    except FileNotFoundError:
        _fail(f"{t.who} is not running (no socket at {path})")
    except ConnectionRefusedError:
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            is_socket = False
        if is_socket:
            _fail(f"{t.who} is not running (stale socket {path}: nobody accepts on it)")
        _fail(f"{path} is not a socket: is that the admin socket of {t.vm or 'the VM'}?")
    except PermissionError:
        _fail(f"cannot talk to {t.who}: {path}: permission denied (the admin socket is the "
              "daemon user's only: run as that user or root)")
    except TimeoutError:
        _fail(f"{t.who} did not answer on {path}")
    except OSError as e:
        _fail(f"cannot talk to {t.who} on {path}: {e.strerror or e}")
    except ValueError:
        _fail(f"{t.who} closed the connection on {path} without an answer")


SO_ACCEPTCON = 0x10000  # /proc/net/unix's Flags bit of a listening socket


def _listening_inode(path: str) -> int | None:
    """The inode of a socket listening at `path` in our network namespace, from
    /proc/net/unix: looked up, not connected to, so the listener notices nothing."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split(None, 7)  # Num RefCount Protocol Flags Type St Inode Path
        if (len(fields) == 8 and os.path.abspath(fields[7]) == os.path.abspath(path)
                and int(fields[3], 16) & SO_ACCEPTCON):
            return int(fields[6])
    return None


def _pid_holding(inode: int) -> int | None:
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
            if any(os.readlink(f"/proc/{entry.name}/fd/{fd}") == target for fd in fds):
                return int(entry.name)
        except OSError:  # gone, or not ours to look at
            continue
    return None


def _peer_pid(path: str) -> int | None:
    """The pid of whoever listens on the unix socket `path` (SO_PEERCRED of a probe
    connection: the listener's credentials), None if nobody does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def _listener(path: str, *, may_probe: bool) -> str | None:
    """Who listens at `path` ("pid N: command"), None if nobody (a stale socket file).
    /proc/net/unix first; a probe connection (SO_PEERCRED) only where the listener takes it
    for nothing worse than a front end coming and going (`may_probe`): a port's peer
    connecting would be a host open for the guest."""
    inode = _listening_inode(path)
    if inode is not None:
        pid = _pid_holding(inode)
        return _process(pid) if pid is not None else "a process this user cannot see"
    pid = _peer_pid(path) if may_probe else None  # another namespace, or no /proc
    return _process(pid) if pid is not None else None


def _process(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}: {' '.join(a.decode(errors='replace') for a in argv)[:80]}"


def _daemon_status(admin_path: str | None) -> dict[str, Any] | None:
    if not admin_path:
        return None
    try:
        resp = admin.request(admin_path, {"cmd": "status"}, timeout=2)
    except (OSError, ValueError):
        return None
    result = resp.get("result")
    return result if resp.get("ok") and isinstance(result, dict) else None


def _unwritable(what: str, path: str) -> str | None:
    """Why a socket cannot be made at `path` (a missing directory that cannot be created, one
    we may not write in), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot create the {what} {path}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"cannot create the {what} {path}: {existing} is not writable for this user "
                "(choose another path, or run as a user who may write there)")
    return None


def _same_file(a: object, b: str) -> bool:
    try:
        sa, sb = os.stat(str(a)), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _port_sockets(cfg: VMConfig) -> list[tuple[str, str, str]]:
    """The unix sockets the ports' backends will listen on: (what, path, how to change it)."""
    found = []
    for spec in cfg.ports:
        for _, path, listens in unix_sockets(spec):
            if listens:
                found.append((f"port {spec.config.id}'s socket", path,
                              f"change {_label(spec)}.backend in {cfg.source}"))
    return found


def _tcp_ports(cfg: VMConfig) -> list[tuple[str, str, int, str]]:
    """TCP listeners in the daemon's own namespace: (what, host, port, how to change it)."""
    found = []
    if cfg.metrics_listen:
        found.append(("metrics_listen", *cfg.metrics_listen, f"choose another in {cfg.source}"))
    for spec in cfg.ports:
        o = spec.backend_options
        if (spec.backend_type == "tcp" and o.get("role", "server") == "server"
                and not o.get("netns") and o.get("port")):
            found.append((f"port {spec.config.id}'s tcp listener",
                          str(o.get("host", "127.0.0.1")), int(o["port"]),
                          f"change {_label(spec)}.backend in {cfg.source}"))
    return found


def _label(spec: PortSpec) -> str:
    return port_label(spec.config.id, spec.config.name)


def _socket_problem(cfg: VMConfig, what: str, path: str, fix: str) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return _unwritable(what, path)
    except OSError as e:
        return f"cannot use {path} for the {what}: {e.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} exists and is not a socket: remove it, or {fix}"
    # Asking the admin socket first: it has the answer without a probe connection, which
    # the other daemon would take for a front end coming and going.
    other = _daemon_status(cfg.admin_socket)
    if other is not None and (what == "admin socket" or _same_file(other.get("socket"), path)):
        if other.get("vm") == cfg.name or what == "vhost-user socket":
            return (f"another vhostser serves VM {other.get('vm')} on {other.get('socket')} "
                    f"(pid {other.get('pid')}): stop it first, or {fix}")
        return (f"the admin socket {path} is in use by the vhostser serving VM "
                f"{other.get('vm')} (pid {other.get('pid')}): {fix}")
    who = _listener(path, may_probe=not what.startswith("port "))
    if who is None:  # stale: it will be replaced, if we may
        return _unwritable(what, path)
    return f"the {what} {path} is in use ({who}): stop that, or {fix}"


def startup_problem(cfg: VMConfig, *, bind_vhost_user: bool = True,
                    bind_admin: bool = True) -> str | None:
    """What keeps `run` from making its sockets, said so the user knows what to do: another
    daemon serving this VM (its pid from its admin socket's status, else SO_PEERCRED of a
    probe connection), another process on a path or a TCP port, a path that cannot be
    written. None if nothing is in the way (a race may still lose: then run_daemon's own
    error, or a port's retry, is the backstop)."""
    sockets: list[tuple[str, str, str]] = []
    if bind_vhost_user:
        sockets.append(("vhost-user socket", cfg.socket, "give this one another --socket-path"))
    if bind_admin and cfg.admin_socket:
        sockets.append(("admin socket", cfg.admin_socket, "give this one another --admin"))
    for what, path, fix in [*sockets, *_port_sockets(cfg)]:
        problem = _socket_problem(cfg, what, path, fix)
        if problem:
            return problem
    for what, host, port, fix in _tcp_ports(cfg):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:  # anything else: the listener itself says
                    return f"{what} {host}:{port}: {e.strerror}: stop whoever has it, or {fix}"
    return None


# ---------------------------------------------------------------------------- output


def _yes(value: object) -> str:
    return "yes" if value else "no"


def _state_cell(row: dict[str, Any]) -> str:
    cell = f"{row.get('state')} {row.get('state_name') or ''}".strip()
    if row.get("restored"):
        cell += " (restored, no front end yet)"
    return cell


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _status_text(s: dict[str, Any]) -> str:
    connected = s.get("frontend_connected")
    # While no front end is connected the device's status is the last one's (reconnect is
    # not reset: the guest driver is still there if the same VM comes back).
    last = "" if connected or not s.get("connections") else " (last front end)"
    if connected:
        front = f"connected (connection {s.get('connections')})"
    elif s.get("connections"):
        front = f"not connected: the last one left {s.get('frontend_left')} s ago"
    else:
        front = "not connected: none since the daemon started"
    bits = " ".join(s.get("status_bits") or []) or "none"
    sessions = f"{s.get('sessions_open')} open"
    if s.get("sessions_restored"):
        sessions += (f", {s['sessions_restored']} of them restored from the state file "
                     "(no front end has come back yet)")
    rows = [
        ("vm", s.get("vm")), ("pid", s.get("pid")), ("config", s.get("config")),
        ("socket", s.get("socket")), ("uptime", f"{s.get('uptime')} s"),
        ("front end", front),
        ("device status", f"0x{int(s.get('status') or 0):02x} {bits}{last}"),
        ("driver_ready", _yes(s.get("driver_ready")) + last),
        ("multiport", _yes(s.get("multiport")) + last),
        ("ports", f"{s.get('ports')} (max {s.get('max_ports')})"),
        ("sessions", sessions),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _human(cmd: str, result: Any) -> str:
    if cmd == "metrics":
        return str(result).rstrip("\n")
    if cmd == "status":
        return _status_text(result)
    if cmd == "ports":
        rows = [{**r, "state": _state_cell(r), "endpoint": attach.describe(r.get("endpoint"))}
                for r in result]
        return _table(rows, ["id", "name", "console", "backend", "state", "session",
                             "endpoint"])
    if cmd == "sessions":
        if not result:
            return "no open sessions"
        return _table([{**r, "state": _state_cell(r)} for r in result],
                      ["port", "name", "session", "state"])
    if cmd == "stats":
        rows = []
        for pid, c in result["ports"].items():
            rows.append({"port": pid, "to_guest": c["bytes_to_guest"],
                         "from_guest": c["bytes_from_guest"],
                         "discarded": sum(c["discarded"].values()),
                         "sessions": c["sessions_opened"], "resets": c["resets_seen"]})
        dev = result["device"]
        return (_table(rows, ["port", "to_guest", "from_guest", "discarded", "sessions", "resets"])
                + f"\ncontrol messages: {dev['control_from_guest']} from guest, "
                f"{dev['control_to_guest']} to guest, {dev['bad_control']} bad")
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in result.items())
    return json.dumps(result)


# ---------------------------------------------------------------------------- the parser


class Parser(argparse.ArgumentParser):
    """An option a (sub)command does not know is that command's error, shown with its usage:
    argparse's default hands unknown options up, to be reported with the top level's."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def _json_option(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On `ctl` and on each of its commands, so `ctl --json ports` and `ctl ports --json` both
    # work; a command's own default must not undo the one given before it.
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print the daemon's answer as JSON, for scripts")


CTL_COMMANDS = {
    "status": "the daemon, the front end and the device status",
    "ports": "every port: backend, where to reach it, session state",
    "sessions": "the open sessions",
    "stats": "byte and message counters per port",
    "metrics": "the counters in Prometheus text format",
    "reload": "re-read the config file and apply it live (as SIGHUP does)",
}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="vhostser", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", "-V", action="version", version=f"%(prog)s {__version__}",
                   help="print the version and exit")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back end's vhost-user capabilities as JSON and exit "
                   "(same as `run --print-capabilities`)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="serve one VM's virtio-console over vhost-user",
                         description="Serve one VM's virtio-console over vhost-user, in the "
                         "foreground, until SIGTERM.")
    run.add_argument("--config", "-c", metavar="FILE",
                     help="the VM's config file (default: the embedded one)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--socket-path", "--socket", "-s", dest="socket_path", metavar="PATH",
                       help="listen on this vhost-user socket (overrides [vm] socket)")
    where.add_argument("--fd", type=int, metavar="FD",
                       help="serve the vhost-user socket passed as this open fd: a listening "
                       "socket, or one connection (the daemon then stops when it ends)")
    run.add_argument("--admin", metavar="PATH",
                     help="the admin socket (default: [vm] admin_socket, else the vhost-user "
                     "socket's name with .ctl for .sock)")
    run.add_argument("--print-capabilities", action="store_true",
                     help="print the vhost-user back-end capabilities as JSON and exit; other "
                     "options are ignored")
    run.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                     help="the least severe log lines written to stderr (default: info)")
    run.add_argument("--version", "-V", action="version", version=f"vhostser {__version__}",
                     help="print the version and exit")

    check = sub.add_parser("check", help="validate config files",
                           description="Validate config files; exit 1 if one is wrong.")
    check.add_argument("files", nargs="+", metavar="FILE", help="a VM config file")

    ctl = sub.add_parser("ctl", help="talk to a running daemon's admin socket",
                         description="Ask a running daemon through its admin socket.")
    target_options(ctl, with_config=True)
    _json_option(ctl, top=True)
    cmds = ctl.add_subparsers(dest="cmd", metavar="CMD", required=True)
    for name, text in CTL_COMMANDS.items():
        _json_option(cmds.add_parser(name, help=text, description=text), top=False)
    add = cmds.add_parser("add-port", help="hot-plug a port", description="Hot-plug a port.")
    _json_option(add, top=False)
    add.add_argument("--id", type=int, required=True, help="the port id, 0..max_ports-1")
    add.add_argument("--name", default="", help="the guest's /dev/virtio-ports/NAME")
    add.add_argument("--console", action="store_true", help="an hvc console port")
    add.add_argument("--backend", required=True, help="backend type (null, echo, unix, ...)")
    add.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="backend option; VALUE is read as JSON when it parses, else a string")
    rm = cmds.add_parser("remove-port", help="hot-unplug a port",
                         description="Hot-unplug a port (its session closes: port-removed).")
    _json_option(rm, top=False)
    rm.add_argument("id", type=int, help="the port id")
    close = cmds.add_parser("close-session", help="end a port's session from the host side",
                            description="End a port's session from the host side (the guest "
                            "reads EOF).")
    _json_option(close, top=False)
    close.add_argument("port", type=int, help="the port id")

    console = sub.add_parser(
        "console", help="attach this terminal to a VM's console port (like virsh console)",
        description="Attach this terminal to a console port's live socket: the scrollback "
        "first, then live output; what you type goes to the guest. Ctrl-] leaves.")
    console.add_argument("vm", metavar="VM",
                         help="the VM: a name (NAME.toml in $VHOSTSER_CONFIG_DIR, default "
                         "/etc/vhostser; 'default' is the embedded one) or a config file")
    console.add_argument("port", nargs="?", metavar="PORT",
                         help="port id or name (default: the first console port)")
    _attach_options(console)
    att = sub.add_parser(
        "attach", help="join stdin/stdout to a port's unix or tcp socket",
        description="Join stdin/stdout to a port's host socket. On a terminal as `console`; "
        "from a pipe, bytes pass untouched and EOF on stdin half-closes the connection.")
    att.add_argument("vm", metavar="VM", help="the VM, as for `console`")
    att.add_argument("port", metavar="PORT", help="port id or name")
    _attach_options(att)

    bench = sub.add_parser(
        "bench", help="throughput, latency, CPU and memory (see vhostser/bench.py)",
        description="Throughput, latency, CPU and memory of the data path, against QEMU's own "
        "virtio-serial in the same run or locally; medians of --runs runs, one table at the end.")
    bench.add_argument("where", choices=["qemu", "local"],
                       help="qemu: against QEMU's in-process virtio-serial in the same run "
                       "(needs the e2e rig); local: no QEMU, the testing front end")
    bench.add_argument("--which", default="g2h,h2g,rtt,ports8,console,idle",
                       help="scenarios, comma-separated: g2h, h2g, rtt, ports8, console, idle")
    bench.add_argument("--runs", type=int, default=3, help="runs per scenario")
    bench.add_argument("--bs", type=int, default=65536, help="qemu: guest dd block size")
    bench.add_argument("--count", type=int, default=2048, help="qemu g2h/h2g: blocks per run")
    bench.add_argument("--mib", type=int, default=64, help="local g2h/h2g: MiB per run")
    bench.add_argument("--port-mib", type=int, default=16,
                       help="ports8, idle: MiB per port each way per run")
    bench.add_argument("--console-mib", type=int, default=16, help="console: MiB per run")
    bench.add_argument("--rtt-n", type=int, default=1000, help="round trips per run")
    bench.add_argument("--idle-s", type=float, default=5.0,
                       help="idle: seconds per idle window (one per run)")
    bench.add_argument("--rig", help="the e2e rig directory (default ../shared/e2e)")
    bench.add_argument("--json", help="also write every figure here")

    soak = sub.add_parser(
        "soak", help="a daemon under load, resets, reloads and hostile input; every byte "
        "accounted (see vhostser/soak.py)",
        description="Run a daemon for a while with traffic both ways on 8 ports, resets, "
        "reloads, flapping peers and hostile input; account every byte per port and "
        "direction, sample its memory and fds. Exit status 1 when an invariant fails.")
    soak.add_argument("--duration", type=float, default=60.0,
                      help="seconds of soak (default 60; whole epochs, at least 2)")
    soak.add_argument("--epoch", type=float, default=5.0,
                      help="seconds of traffic between two disruptions (default 5)")
    soak.add_argument("--sample", type=float, default=2.0,
                      help="seconds between two samples of the daemon's RSS and fds (default 2)")
    soak.add_argument("--seed", type=int, help="the random seed (default: a random one, "
                      "printed in the JSON report)")
    soak.add_argument("--max-rss-growth-mb", type=float,
                      help="fail if the daemon's VmRSS grows more from the first quiescence "
                      "to the last (default 32)")
    soak.add_argument("--max-fd-growth", type=int,
                      help="fail if the daemon's open fds grow more (default 4)")
    soak.add_argument("--json", help="also write the whole report here")
    return p


def target_options(p: argparse.ArgumentParser, *, with_config: bool) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--admin", metavar="PATH", help="the daemon's admin socket")
    if with_config:
        where.add_argument("--config", "-c", metavar="FILE",
                           help="take the admin socket from this config file")
        where.add_argument("--vm", metavar="NAME",
                           help="the VM by name (NAME.toml in $VHOSTSER_CONFIG_DIR, default "
                           "/etc/vhostser)")


def _attach_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", metavar="PATH",
                   help="the daemon's admin socket (default: from the VM's config)")
    p.add_argument("--escape", "-e", default=attach.DEFAULT_ESCAPE, metavar="KEY",
                   help="on a terminal, the key that detaches: ^X, one character, or none "
                   "(default ^], Ctrl-])")


# ---------------------------------------------------------------------------- commands


def _run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    try:
        cfg = load(args.config) if args.config else default()
    except ConfigError as e:
        raise Fail(str(e), EX_CONFIG) from None
    passed = None
    if args.fd is not None:
        try:
            passed = passed_unix(args.fd)
        except OSError as e:
            _fail(_os_text(e))
        except ValueError as e:
            _fail(str(e))
    if args.socket_path:
        cfg = replace(cfg, socket=args.socket_path)
    served = cfg.socket if passed is None else passed.getsockname()
    cfg = replace(cfg, admin_socket=args.admin or admin_socket_of(
        cfg, served if isinstance(served, str) else ""))
    activated = systemd.listen_fds(unset=False)  # a peek: run_daemon takes them
    # Fds a predecessor left in the service manager's store (a restart under systemd): its
    # sockets, held there, are this VM's own, not in the way.
    resuming = any(name not in SOCKET_UNIT_FDS for name in activated)
    problem = None if resuming else startup_problem(
        cfg, bind_vhost_user=passed is None and "vhost-user" not in activated,
        bind_admin="admin" not in activated)
    if problem:
        _fail(problem)
    if passed is None and not activated:
        _print_qemu_line(cfg)
    try:
        return trio.run(partial(run_daemon, cfg, passed=passed))
    except (OSError, BaseExceptionGroup) as e:
        error = _single(e)  # what failed inside trio's nurseries
        if not isinstance(error, OSError):
            raise
        _fail(f"VM {cfg.name}: cannot start: {_os_text(error)}")


def _print_qemu_line(cfg: VMConfig) -> None:
    """On stdout, as shell: a user copies it apart from the daemon's logs (stderr). Straight
    to fd 1, unbuffered: with stdout's reader gone the daemon says so on stderr and serves on
    (Python's buffer would fail again at exit, and the exit status with it)."""
    data = (f"# vhostser: VM {cfg.name!r} from {cfg.source}. Connect QEMU (>= 10.2) with\n"
            f"# (replace {DISK_PLACEHOLDER} with the guest's disk image):\n"
            f"{qemu_command_line(cfg)}\n").encode()
    try:
        while data:
            data = data[os.write(1, data):]
    except OSError as e:
        print(f"vhostser: cannot print the QEMU command line on stdout: {_os_text(e)}",
              file=sys.stderr)


def _ctl(args: argparse.Namespace) -> int:
    t = target(args.vm, args.config, args.admin)
    req: dict[str, Any] = {"cmd": args.cmd}
    if args.cmd == "add-port":
        backend: dict[str, Any] = {"type": args.backend}
        for opt in args.option:
            key, sep, value = opt.partition("=")
            if not sep:
                _fail(f"--option {opt!r}: expected KEY=VALUE")
            try:
                backend[key] = json.loads(value)
            except ValueError:
                backend[key] = value
        req["port"] = {"id": args.id, "name": args.name, "console": args.console,
                       "backend": backend}
    elif args.cmd == "remove-port":
        req["id"] = args.id
    elif args.cmd == "close-session":
        req["port"] = args.port
    resp = ask(t, req)
    if args.json:
        print(json.dumps(resp.get("result") if resp["ok"] else resp, indent=1))
    elif resp["ok"]:
        print(_human(args.cmd, resp["result"]))
    if not resp["ok"]:
        if not args.json:
            print(f"vhostser ctl {args.cmd}: {resp['error']}", file=sys.stderr)
        return 1
    return 0


def _pick_port(ports: list[dict[str, Any]], key: str | None, vm: str) -> dict[str, Any]:
    if key is None:
        for p in ports:
            if p.get("console"):
                return p
        for p in ports:
            if (p.get("endpoint") or {}).get("kind") == "console":
                return p
        _fail(f"VM {vm} has no console port: name one (vhostser console {vm} PORT)")
    for p in ports:
        if str(p.get("id")) == key or (p.get("name") and p.get("name") == key):
            return p
    known = ", ".join(f"{p['id']}" + (f" ({p['name']})" if p.get("name") else "")
                      for p in ports)
    _fail(f"VM {vm} has no port {key!r} (ports: {known or 'none'})")


def _attach(args: argparse.Namespace, *, console: bool) -> int:
    terminal = os.isatty(0)
    if console and not terminal:
        _fail("`vhostser console` needs a terminal on stdin; for pipes and scripts use "
              "`vhostser attach VM PORT`")
    try:
        escape = attach.parse_escape(args.escape)
    except ValueError as e:
        _fail(str(e))
    t = target(args.vm, None, args.admin)
    vm = t.vm or args.vm
    resp = ask(t, {"cmd": "ports"})
    if not resp.get("ok"):
        _fail(f"{t.who}: {resp.get('error')}")
    port = _pick_port(resp["result"], args.port, vm)
    label = f"VM {vm!r} port {port['id']}" + (f" ({port['name']})" if port.get("name") else "")
    try:
        sock = attach.connect(port)
    except attach.AttachError as e:
        _fail(f"{label}: {e}")
    return attach.run(sock, escape=escape, label=label)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The convention: with --print-capabilities, other options and arguments are ignored,
    # so this comes before anything could fail on them.
    if argv[:1] == ["--print-capabilities"] or (
        argv[:1] == ["run"] and "--print-capabilities" in argv
    ):
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    args = parser().parse_args(argv)
    try:
        if args.command == "check":
            bad = 0
            for f in args.files:
                try:
                    cfg = check_config(f)
                except ConfigError as e:
                    for error in e.errors:
                        print(error, file=sys.stderr)
                    bad += 1
                else:
                    print(f"{f}: ok: vm {cfg.name}, {len(cfg.ports)} ports, socket {cfg.socket}")
                    # Warnings, not errors: a log directory may appear by the time the daemon
                    # runs.
                    for spec in cfg.ports:
                        for problem in spec.make_backend().problems():
                            print(f"{f}: warning: {_label(spec)}: {problem}",
                                  file=sys.stderr)
            return 1 if bad else 0
        if args.command == "ctl":
            return _ctl(args)
        if args.command in ("console", "attach"):
            return _attach(args, console=args.command == "console")
        if args.command == "bench":
            from . import bench as bench_mod

            return bench_mod.main(args)
        if args.command == "soak":
            from . import soak as soak_mod

            return soak_mod.main(args)
        return _run(args)
    except Fail as e:
        prog = "vhostser ctl" if args.command == "ctl" else "vhostser"
        print(f"{prog}: {e}", file=sys.stderr)
        return e.status


def backend_main() -> int:
    """`vhost-user-console`: `vhostser run` under the name the vhost-user back-end
    conventions give a virtio-console back end (vhost-user-$device, virtio_ids.h's name)."""
    return main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
