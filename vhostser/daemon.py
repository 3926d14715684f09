"""Process wiring: the listening socket, one front end at a time, signals."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .backends.base import PortBackend
from .backends.simple import EchoBackend, SinkBackend
from .console import ConsoleDevice
from .console.port import PortConfig
from .console.session import Input
from .vhost_user import Backend, send_backend_request, serve_connection

log = logging.getLogger("vhostser.daemon")

DEFAULT_SOCKET = "/tmp/vhostser/default.sock"


def write_console(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@dataclass
class DaemonConfig:
    """What `vhostser run` needs (the per-VM config file fills this in a later step).

    The embedded default: port 0 is the guest's console (hvc0), printed on stdout; port 1,
    `org.vhostser.echo`, sends back whatever the guest writes."""

    socket_path: str = DEFAULT_SOCKET
    max_ports: int = 4
    vm_name: str = "default"
    ports: list[tuple[PortConfig, Callable[[], PortBackend]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ports:
            self.ports = [
                (PortConfig(0, console=True), lambda: SinkBackend(write_console)),
                (PortConfig(1, name="org.vhostser.echo"), EchoBackend),
            ]


def qemu_command_line(cfg: DaemonConfig, mem: str = "1G") -> str:
    """The QEMU options that connect a VM to this daemon (QEMU ≥ 10.2)."""
    return " \\\n    ".join(
        [
            "qemu-system-x86_64 -machine q35,memory-backend=mem -m " + mem,
            f"-object memory-backend-memfd,id=mem,size={mem},share=on",
            f"-chardev socket,id=vhostser0,path={cfg.socket_path},reconnect-ms=1000",
            "-device vhost-user-test-device-pci,chardev=vhostser0,virtio-id=3,"
            f"num_vqs={2 * cfg.max_ports + 2},config_size=12",
        ]
    )


async def listen_unix(path: str) -> trio.socket.SocketType:
    """A listening unix socket at `path`, replacing a stale socket file but nothing else."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(4)
    return sock


async def serve(
    listener: trio.socket.SocketType,
    backend: Backend,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept front ends forever, one at a time: vhost-user has a single front end per device,
    so a second connection while one is active is refused with a log line."""
    task_status.started()
    busy = False
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            if busy:
                log.warning("refusing a second front-end connection while one is active")
                conn.close()
                continue
            busy = True

            async def run(conn: trio.socket.SocketType = conn) -> None:
                nonlocal busy
                log.info("front end connected")
                try:
                    with conn:
                        await serve_connection(conn, backend)
                finally:
                    busy = False
                    log.info("front end gone; waiting for the next connection")

            nursery.start_soon(run)


async def run_daemon(
    cfg: DaemonConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve the device until SIGTERM/SIGINT; returns the exit status."""
    listener = await listen_unix(cfg.socket_path)
    with listener, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            device = ConsoleDevice(nursery, max_ports=cfg.max_ports)
            backend = Backend(device)
            device.on_broken = backend.mark_needs_reset
            device.on_config_change = lambda: nursery.start_soon(
                send_backend_request, backend, backend.config_change_message()
            )
            for port_config, make_backend in cfg.ports:
                device.add_port(port_config, make_backend())
            await nursery.start(serve, listener, backend)
            log.info("vm %s: listening on %s", cfg.vm_name, cfg.socket_path)
            task_status.started(cfg.socket_path)
            async for signum in signals:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                break
            device.close_all(Input.SHUTDOWN)
            nursery.cancel_scope.cancel()
        backend.disconnected()
    try:
        os.unlink(cfg.socket_path)
    except OSError:
        pass
    return 0
