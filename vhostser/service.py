"""The process around one VM's daemon: the listening socket (its own or systemd's), the
admin and metrics listeners, signals (SIGHUP reloads, SIGTERM/SIGINT stop), sd_notify and
the watchdog.

Signals are taken before anything else can take time: a SIGHUP's default action kills the
process, and one may come at any moment (`systemctl reload`, a logrotate script). The
`vhostser run` command blocks SIGHUP before it imports anything (`vhostser.__main__`); here
the signal receiver is installed first, and once the daemon is ready SIGHUP is unblocked, so
one that came during start-up is applied then (with a log line saying so)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator

import trio

from . import systemd
from .admin import serve_admin, serve_metrics
from .config import ConfigError, VMConfig, load
from .daemon import Daemon
from .sockets import inherited_unix, listen_unix

# The daemon's logger: these lines were always "vhostser.daemon: ..." in the journal.
log = logging.getLogger("vhostser.daemon")


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)


def _release_sighup() -> None:
    """Start-up is over: a SIGHUP held since `vhostser run` began is delivered now."""
    if signal.SIGHUP in signal.sigpending():
        log.info("SIGHUP during start-up: reloading now that the daemon is ready")
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


async def run_daemon(
    cfg: VMConfig,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve one VM until SIGTERM/SIGINT; returns the exit status (1: it could not start)."""
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*watched) as signals:
        activated = systemd.listen_fds()
        admin_fds = activated.get("admin")
        admin_fd = admin_fds[0] if admin_fds else None
        try:
            if activated:
                fds = activated.get("vhost-user") or next(iter(activated.values()))
                listener = inherited_unix(fds[0])
                log.info("vm %s: socket-activated (%s)", cfg.name, ", ".join(activated))
            else:
                listener = await listen_unix(cfg.socket, cfg.socket_mode,
                                             group=cfg.socket_group)
        except OSError as e:
            log.error("vm %s: cannot listen on %s: %s", cfg.name, cfg.socket, e)
            return 1
        with listener:
            status = await _serve(cfg, listener, admin_fd, signals, task_status)
    if not activated:
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass
    return status


async def _serve(
    cfg: VMConfig,
    listener: trio.socket.SocketType,
    admin_fd: int | None,
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[Daemon],
) -> int:
    async with trio.open_nursery() as nursery:
        daemon = Daemon(cfg, nursery)
        await nursery.start(daemon.serve, listener)
        try:
            if cfg.admin_socket or admin_fd is not None:
                await nursery.start(serve_admin, daemon, cfg.admin_socket, admin_fd)
            if cfg.metrics_listen:
                await nursery.start(serve_metrics, daemon, *cfg.metrics_listen)
        except OSError as e:
            log.error("vm %s: cannot listen: %s", cfg.name, e)
            nursery.cancel_scope.cancel()
            return 1
        interval = systemd.watchdog_interval()
        if interval:
            nursery.start_soon(_watchdog, interval)
        log.info("vm %s: listening on %s", cfg.name, cfg.socket)
        systemd.notify("READY=1", f"STATUS=serving {len(cfg.ports)} ports on {cfg.socket}")
        task_status.started(daemon)
        _release_sighup()
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
        daemon.shut_down()
        await daemon.device.drain_backends()
        nursery.cancel_scope.cancel()
    daemon.backend.disconnected()
    return 0
