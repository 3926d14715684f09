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
import socket
from typing import Any

import trio

from .backends.unix import UnixEndpoint
from .config import ConfigError, load, parse_port
from .daemon import Daemon
from .sockets import BACKLOG, inherited_unix

log = logging.getLogger("vhostser.admin")

COMMANDS = ("status", "ports", "sessions", "stats", "metrics", "add-port", "remove-port",
            "close-session", "reload")
MAX_REQUEST = 64 * 1024


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
    metric("port_sessions_opened_total", "counter", "Sessions opened.",
           [({"port": pid, "name": p.name}, p.counters.sessions_opened) for pid, p in ports])
    metric("port_resets_total", "counter", "Device resets seen by the port.",
           [({"port": pid, "name": p.name}, p.counters.resets_seen) for pid, p in ports])
    dev = daemon.device.counters
    metric("control_messages_total", "counter", "Control messages, by direction.",
           [({"direction": "from_guest"}, dev.control_from_guest),
            ({"direction": "to_guest"}, dev.control_to_guest)])
    metric("bad_control_messages_total", "counter", "Control messages ignored as invalid.",
           [({}, dev.bad_control)])
    return "\n".join(out) + "\n"


async def _handle(daemon: Daemon, conn: trio.socket.SocketType) -> None:
    with conn:
        buf = b""
        while True:
            try:
                data = await conn.recv(65536)
            except OSError:
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
                    request = json.loads(line)
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
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(_handle, daemon, conn)
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
        await listener.bind((host, port))
        listener.listen(BACKLOG)
        address = listener.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", *address)
        task_status.started(address)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_serve_http, daemon, conn)


async def _serve_http(daemon: Daemon, conn: trio.socket.SocketType) -> None:
    with conn, trio.move_on_after(10):
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
