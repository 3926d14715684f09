"""The process around one VM's daemon: the listening socket (its own or systemd's), the
admin and metrics listeners, signals (SIGHUP reloads, SIGTERM/SIGINT stop), sd_notify and
the watchdog."""

from __future__ import annotations

import logging
import os
import signal

import trio

from . import systemd
from .admin import serve_admin, serve_metrics
from .config import ConfigError, VMConfig, load
from .console.session import Input
from .daemon import Daemon
from .sockets import inherited_unix, listen_unix

# The daemon's logger: these lines were always "vhostser.daemon: ..." in the journal.
log = logging.getLogger("vhostser.daemon")


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)


async def run_daemon(
    cfg: VMConfig,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve one VM until SIGTERM/SIGINT; returns the exit status."""
    activated = systemd.listen_fds()
    own_socket = False
    if activated:
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
            await nursery.start(daemon.serve, listener)
            if cfg.admin_socket or admin_fd is not None:
                await nursery.start(serve_admin, daemon, cfg.admin_socket, admin_fd)
            if cfg.metrics_listen:
                await nursery.start(serve_metrics, daemon, *cfg.metrics_listen)
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(_watchdog, interval)
            log.info("vm %s: listening on %s", cfg.name, cfg.socket)
            systemd.notify("READY=1", f"STATUS=serving {len(cfg.ports)} ports on {cfg.socket}")
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
            systemd.notify("STOPPING=1")
            # Saved before the sessions close: the guest closed nothing, so the next daemon
            # must know which sessions are still open in the guest.
            daemon.save_state()
            daemon.device.close_all(Input.SHUTDOWN)
            await daemon.device.drain_backends()
            nursery.cancel_scope.cancel()
        daemon.backend.disconnected()
    if own_socket:
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass
    return 0
