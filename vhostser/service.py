"""The process around one VM's daemon: the listening socket (its own or systemd's), the
admin and metrics listeners, signals (SIGHUP reloads, SIGTERM/SIGINT stop), sd_notify and
the watchdog."""

from __future__ import annotations

import logging
import os
import signal
import socket

import trio

from . import systemd
from .admin import serve_admin, serve_metrics
from .config import ConfigError, VMConfig, load
from .console.session import Input
from .daemon import Daemon
from .sockets import inherited_unix, is_listening, listen_unix

# The daemon's logger: these lines were always "vhostser.daemon: ..." in the journal.
log = logging.getLogger("vhostser.daemon")


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _shutdown(daemon: Daemon, nursery: trio.Nursery) -> None:
    systemd.notify("STOPPING=1")
    # Saved before the sessions close: the guest closed nothing, so the next daemon
    # must know which sessions are still open in the guest.
    daemon.save_state()
    daemon.device.close_all(Input.SHUTDOWN)
    await daemon.device.drain_backends()
    nursery.cancel_scope.cancel()


async def run_daemon(
    cfg: VMConfig,
    *,
    passed: socket.socket | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve one VM until SIGTERM/SIGINT; returns the exit status. With `passed` (`run
    --fd`, `sockets.passed_unix`) the vhost-user socket is that one: listening, or one
    connection, and then the daemon stops when it ends (nobody can connect again)."""
    activated = systemd.listen_fds()
    own_socket = False
    connected = False
    if passed is not None:
        connected = not is_listening(passed)
        log.info("vm %s: serving %s passed as fd %d", cfg.name,
                 "a connection" if connected else "a listening socket", passed.fileno())
        listener = trio.socket.from_stdlib_socket(passed)
    elif activated:
        fds = activated.get("vhost-user") or next(iter(activated.values()))
        listener = inherited_unix(fds[0])
        log.info("vm %s: socket-activated (%s)", cfg.name, ", ".join(activated))
    else:
        listener = await listen_unix(cfg.socket)
        own_socket = True
    admin_fds = activated.get("admin")
    admin_fd = admin_fds[0] if admin_fds else None
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with listener, trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:
            daemon = Daemon(cfg, nursery)
            if not own_socket:  # what status shows: where the socket really is
                daemon.socket = listener.getsockname() or f"fd {listener.fileno()}"
            if connected:
                async def serve_then_stop() -> None:
                    await daemon.serve_connected(listener)
                    await _shutdown(daemon, nursery)

                nursery.start_soon(serve_then_stop)
            else:
                await nursery.start(daemon.serve, listener)
            if cfg.admin_socket or admin_fd is not None:
                await nursery.start(serve_admin, daemon, cfg.admin_socket, admin_fd)
            if cfg.metrics_listen:
                await nursery.start(serve_metrics, daemon, *cfg.metrics_listen)
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(_watchdog, interval)
            log.info("vm %s: %s %s", cfg.name,
                     "serving the connection on" if connected else "listening on", daemon.socket)
            systemd.notify("READY=1",
                           f"STATUS=serving {len(cfg.ports)} ports on {daemon.socket}")
            task_status.started(daemon)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
                    try:
                        daemon.reload(load(cfg.source))
                    except (ConfigError, ValueError) as e:
                        log.error("reload failed, keeping the running config: %s", e)
                    systemd.notify("READY=1", "STATUS=config reloaded")
                    continue
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                break
            await _shutdown(daemon, nursery)
        daemon.backend.disconnected()
    if own_socket:
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass
    return 0
