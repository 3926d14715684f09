"""The admin socket: one JSON object per line each way, a request and its response.

    → {"cmd": "status"}                      ← {"ok": true, "result": {...}}
    → {"cmd": "add-port", "port": {"id": 3, "name": "x", "backend": {"type": "null"}}}
    → {"cmd": "remove-port", "id": 3}        → {"cmd": "close-session", "port": 1}
    → {"cmd": "metrics"}                     ← {"ok": true, "result": "<Prometheus text>"}
    errors: {"ok": false, "error": "what went wrong"}

`dispatch` is the sans-io part (request dict → response dict); `serve_admin` moves lines.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import trio

from .backends.unix import UnixEndpoint
from .config import ConfigError, check_admin_port, load, parse_port
from .daemon import Daemon
from .sockets import BACKLOG, ListenerCounters, inherited_unix, serve_connections

log = logging.getLogger("vhostser.admin")

COMMANDS = ("status", "ports", "sessions", "stats", "metrics", "add-port", "remove-port",
            "close-session", "reload")
MAX_REQUEST = 64 * 1024
MAX_NESTING = 32  # arrays and objects in a request: a real one has 4
# What json.loads nests on, outside strings: counted before it parses (it recurses per level,
# and 60,000 `[` would raise RecursionError). An unterminated string runs to the end of the
# line, which keeps the scan linear.
_JSON_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]')
# Per listener (admin, metrics): connections served at once; more are closed at once, counted.
# Any local user can connect to the metrics port: without a cap, idle ones exhaust the fds.
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 60.0  # an admin connection that sends no request for this long is closed
HTTP_TIMEOUT = 10.0  # a metrics request, head to response


def nesting_depth(line: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings do not
    count; for text that is not JSON, a number json.loads would refuse anyway)."""
    depth = deepest = 0
    for m in _JSON_STRING_OR_BRACKET.finditer(line):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_request(line: bytes) -> Any:
    """One request line as JSON; ValueError saying why not."""
    if (depth := nesting_depth(line)) > MAX_NESTING:
        raise ValueError(f"nested {depth} deep, more than {MAX_NESTING}")
    return json.loads(line)


def dispatch(daemon: Daemon, request: Any) -> dict[str, Any]:
    try:
        if not isinstance(request, dict) or request.get("cmd") not in COMMANDS:
            raise ValueError(f"expected {{\"cmd\": one of {', '.join(COMMANDS)}}}")
        return {"ok": True, "result": _run(daemon, request["cmd"], request)}
    except (ValueError, KeyError, ConfigError) as e:
        # KeyError's str() adds quotes around its message; take the message itself.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return {"ok": False, "error": str(message)}


def _int_arg(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key}: expected an integer port id, got {value!r}")
    return value


def _run(daemon: Daemon, cmd: str, request: dict[str, Any]) -> Any:
    if cmd == "status":
        return daemon.status()
    if cmd == "ports":
        return daemon.ports()
    if cmd == "sessions":
        return daemon.sessions()
    if cmd == "stats":
        return daemon.stats()
    if cmd == "metrics":
        return prometheus(daemon)
    if cmd == "add-port":
        table = request.get("port")
        if not isinstance(table, dict):
            raise ValueError("port: expected a port table like the config file's [[port]]")
        spec = parse_port("admin request", "port", table, daemon.cfg.max_ports)
        check_admin_port(daemon.cfg, spec)
        port = daemon.add_port(spec)
        return {"id": port.id, "name": port.name}
    if cmd == "remove-port":
        pid = _int_arg(request, "id")
        if pid not in daemon.device.ports:
            raise ValueError(f"no port {pid}")
        daemon.remove_port(pid)
        return {"id": pid}
    if cmd == "close-session":
        pid = _int_arg(request, "port")
        if pid not in daemon.device.ports:
            raise ValueError(f"no port {pid}")
        closed = daemon.close_session(pid)
        if closed is None:
            raise ValueError(f"port {pid} has no open session")
        return {"port": pid, "session": closed}
    if cmd == "reload":
        return daemon.reload(load(daemon.cfg.source))
    raise AssertionError(cmd)


def _labels(**kv: object) -> str:
    def esc(v: object) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in kv.items()) + "}"


Metric = Callable[[str, str, str, list[tuple[dict[str, object], float]]], None]


def backend_metrics(metric: Metric,
                    ports: list[tuple[int, str, Mapping[str, object]]]) -> None:
    """Each backend's own counters (`ctl stats` ports.N.backend) as
    `vhostser_backend_<counter>_total`: a counter by reason (a peer backend's
    `bytes_dropped_unsent`) gets a `reason` label. Every backend counter only grows."""
    samples: dict[str, list[tuple[dict[str, object], float]]] = {}
    for pid, name, counters in ports:
        for counter, value in counters.items():
            labels: dict[str, object] = {"port": pid, "name": name}
            if isinstance(value, dict):
                samples.setdefault(counter, []).extend(
                    ({**labels, "reason": r}, v) for r, v in sorted(value.items()))
            elif isinstance(value, int) and not isinstance(value, bool):
                samples.setdefault(counter, []).append((labels, value))
    for counter, values in sorted(samples.items()):
        metric(f"backend_{counter}_total", "counter",
               f"The port's backend's {counter} (ctl stats: ports.N.backend.{counter}).",
               values)


def prometheus(daemon: Daemon) -> str:
    """The counters in Prometheus text exposition format."""
    vm = daemon.cfg.name
    out: list[str] = []

    def metric(
        name: str, kind: str, help_: str, samples: list[tuple[dict[str, object], float]]
    ) -> None:
        out.append(f"# HELP vhostser_{name} {help_}")
        out.append(f"# TYPE vhostser_{name} {kind}")
        out.extend(f"vhostser_{name}{_labels(vm=vm, **lab)} {val}" for lab, val in samples)

    ports = sorted(daemon.device.ports.items())
    metric("frontend_connected", "gauge", "Whether QEMU is connected.",
           [({}, int(daemon.frontend_connected))])
    metric("port_session_open", "gauge", "Whether the port has an open session.",
           [({"port": pid, "name": p.name}, int(p.session is not None)) for pid, p in ports])
    metric("port_bytes_total", "counter", "Bytes moved, by direction.",
           [({"port": pid, "name": p.name, "direction": d}, v) for pid, p in ports
            for d, v in (("to_guest", p.counters.bytes_to_guest),
                         ("from_guest", p.counters.bytes_from_guest))])
    metric("port_buffers_total", "counter", "Virtqueue buffers moved, by direction.",
           [({"port": pid, "name": p.name, "direction": d}, v) for pid, p in ports
            for d, v in (("to_guest", p.counters.buffers_to_guest),
                         ("from_guest", p.counters.buffers_from_guest))])
    metric("port_discarded_bytes_total", "counter", "Bytes dropped, by reason.",
           [({"port": pid, "name": p.name, "reason": r}, v) for pid, p in ports
            for r, v in sorted(p.counters.discarded.items())])
    ledgers = [(pid, p, daemon.device.state.ports[pid].ledger()) for pid, p in ports]
    metric("port_ledger_bytes", "gauge",
           "Every byte of a port, by direction: accepted = delivered + dropped + pending.",
           [({"port": pid, "name": p.name, "direction": d, "entry": e},
             sum(led[d][e].values()) if e == "dropped" else led[d][e])
            for pid, p, led in ledgers for d in ("to_guest", "from_guest")
            for e in ("accepted", "delivered", "dropped", "pending")])
    metric("port_ledger_balanced", "gauge", "1 when the port's ledger balances, by direction.",
           [({"port": pid, "name": p.name, "direction": d}, int(led[d]["balanced"]))
            for pid, p, led in ledgers for d in ("to_guest", "from_guest")])
    metric("port_sessions_opened_total", "counter", "Sessions opened.",
           [({"port": pid, "name": p.name}, p.counters.sessions_opened) for pid, p in ports])
    metric("port_resets_total", "counter", "Device resets seen by the port.",
           [({"port": pid, "name": p.name}, p.counters.resets_seen) for pid, p in ports])
    metric("port_backend_failures_total", "counter", "Times the port's backend raised.",
           [({"port": pid, "name": p.name}, p.counters.backend_failures) for pid, p in ports])
    backend_metrics(metric, [(pid, p.name, daemon.device.backend_counters(pid))
                             for pid, p in ports])
    dev = daemon.device.counters
    metric("control_messages_total", "counter", "Control messages, by direction.",
           [({"direction": "from_guest"}, dev.control_from_guest),
            ({"direction": "to_guest"}, dev.control_to_guest)])
    metric("bad_control_messages_total", "counter", "Control messages ignored as invalid.",
           [({}, dev.bad_control)])
    listeners = sorted(daemon.listeners.items())
    metric("listener_connections_total", "counter",
           "Connections taken, and of those refused, by listener.",
           [({"listener": name, "outcome": outcome}, value) for name, c in listeners
            for outcome, value in (("accepted", c.accepted), ("refused-busy", c.refused_busy),
                                   ("refused-peer", c.refused_peer))])
    metric("listener_accept_errors_total", "counter",
           "accept() failures for lack of fds or memory, by listener.",
           [({"listener": name}, c.accept_errors) for name, c in listeners])
    return "\n".join(out) + "\n"


async def _handle(daemon: Daemon, conn: trio.socket.SocketType) -> None:
    with conn:
        buf = b""
        while True:
            with trio.move_on_after(IDLE_TIMEOUT) as idle:
                try:
                    data = await conn.recv(65536)
                except OSError:
                    return
            if idle.cancelled_caught:
                log.info("admin: connection idle for %.0f s: closed", IDLE_TIMEOUT)
                return
            if not data:
                return
            buf += data
            if len(buf) > MAX_REQUEST:
                await conn.send(b'{"ok": false, "error": "request too long"}\n')
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    request = parse_request(line)
                except ValueError as e:
                    response: dict[str, Any] = {"ok": False, "error": f"not JSON: {e}"}
                else:
                    response = dispatch(daemon, request)
                    # Debug: `ctl status` in a loop must not fill the journal; what a
                    # command changes is logged where it is done, at info.
                    log.debug("admin %s: %s", request.get("cmd") if isinstance(request, dict)
                              else "?", "ok" if response["ok"] else response["error"])
                try:
                    await conn.send(json.dumps(response).encode() + b"\n")
                except OSError:
                    return


async def serve_admin(
    daemon: Daemon,
    path: str | None,
    fd: int | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    endpoint = None
    if fd is not None:
        listener = inherited_unix(fd)
    else:
        assert path is not None
        endpoint = UnixEndpoint(path, 0o600)  # admin commands: the daemon's user only
        listener = await endpoint.listen()
    try:
        with listener:
            task_status.started()
            await serve_connections(
                listener, partial(_handle, daemon), label="admin socket",
                max_connections=MAX_CONNECTIONS, policy=daemon.peer_policy,
                counters=daemon.listeners.setdefault("admin", ListenerCounters()),
            )
    finally:
        if endpoint is not None:  # our socket file only, not a successor's
            endpoint.cleanup()


async def serve_metrics(
    daemon: Daemon,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A minimal HTTP listener for Prometheus: GET /metrics, nothing else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with listener:
        try:
            await listener.bind((host, port))
        except OSError as e:
            raise OSError(f"metrics_listen {host}:{port}: {e.strerror}") from None
        listener.listen(BACKLOG)
        address = listener.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", *address)
        task_status.started(address)
        await serve_connections(
            listener, partial(_serve_http, daemon), label="metrics listener",
            max_connections=MAX_CONNECTIONS,
            counters=daemon.listeners.setdefault("metrics", ListenerCounters()),
        )


async def _serve_http(daemon: Daemon, conn: trio.socket.SocketType) -> None:
    with conn, trio.move_on_after(HTTP_TIMEOUT):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            try:
                chunk = await conn.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
            status, ctype, body = "200 OK", "text/plain; version=0.0.4", prometheus(daemon)
        else:
            status, ctype, body = "404 Not Found", "text/plain", "only GET /metrics here\n"
        payload = body.encode()
        response = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        try:
            await conn.send(response + payload)
        except OSError:
            pass


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Blocking client for `vhostser ctl`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    result: dict[str, Any] = json.loads(buf)
    return result
