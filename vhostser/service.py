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
import socket
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import trio

from . import systemd
from .admin import serve_admin, serve_metrics
from .config import ConfigError, VMConfig, load
from .continuity import RegionError, StateRegion
from .custody import FdStore
from .daemon import RESUMES_VERSIONS, Daemon
from .fds import close_fds
from .sockets import inherited_unix, is_listening, listen_unix

# The daemon's logger: these lines were always "vhostser.daemon: ..." in the journal.
log = logging.getLogger("vhostser.daemon")


# Socket units' fds, named by FileDescriptorName=; every other name is the daemon's own store.
SOCKET_UNIT_FDS = ("vhost-user", "admin")


class Recovered(NamedTuple):
    """What a daemon starts from: its fd store, state region, and a snapshot to resume."""

    store: FdStore
    region: StateRegion | None
    resume: dict[str, Any] | None


class NewerStateError(RuntimeError):
    """The state region was written by a daemon this one does not understand."""


def recover(
    cfg: VMConfig, recovered: dict[str, list[int]]
) -> tuple[FdStore, StateRegion | None, dict[str, Any] | None]:
    """The fd store and state region a predecessor left (or new ones), and its snapshot to
    resume from (None: start fresh)."""
    if not systemd.fd_store_available():
        if recovered:
            log.warning("fds %s passed without a service manager to keep them: ignored",
                        ", ".join(sorted(recovered)))
        return FdStore(enabled=False), None, None
    state_fds = recovered.get("state")
    if state_fds:
        try:
            region = StateRegion(state_fds[0])
            doc = region.read()
        except RegionError as e:
            if "layout" in str(e):
                raise NewerStateError(
                    f"vm {cfg.name}: {e}: leaving every fd in the store for a vhostser that "
                    "reads it") from None
            log.error("vm %s: the stored state region is unusable (%s): starting fresh",
                      cfg.name, e)
        else:
            version = doc.get("version")
            if version not in RESUMES_VERSIONS:
                versions = ", ".join(map(str, RESUMES_VERSIONS))
                raise NewerStateError(
                    f"vm {cfg.name}: the stored state is version {version!r}, this vhostser "
                    f"resumes versions {versions}: leaving every fd in the store for "
                    "a vhostser that reads it")
            aliases = doc.get("fd_aliases", {})
            store = FdStore.recovered(recovered, aliases if isinstance(aliases, dict) else {})
            log.info("vm %s: resuming from the fd store (%d fds: %s)", cfg.name,
                     store.stored, " ".join(store.names()))
            return store, region, doc
    # Nothing to go on from: whatever a predecessor left is dropped, and we start anew.
    store = FdStore(enabled=True)
    for name, fds in recovered.items():
        systemd.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
        close_fds(fds)
    region = StateRegion.create()
    store.keep("state", region.fd)
    return store, region, None


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)


def _release_sighup() -> None:
    """Start-up is over: a SIGHUP held since `vhostser run` began is delivered now."""
    if signal.SIGHUP in signal.sigpending():
        log.info("SIGHUP during start-up: reloading now that the daemon is ready")
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


async def _shutdown(daemon: Daemon, nursery: trio.Nursery, *, hand_over: bool = True) -> None:
    systemd.notify("STOPPING=1")
    if hand_over and daemon.store.enabled:
        # Under a service manager that keeps our fds, a stop is a hand-over: the guest, its
        # sessions and the peers notice nothing, and the next start (a restart, an
        # upgrade) goes on from here.
        daemon.hand_over()
    else:
        daemon.shut_down()
        await daemon.device.drain_backends()
    nursery.cancel_scope.cancel()


async def run_daemon(
    cfg: VMConfig,
    *,
    passed: socket.socket | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve one VM until SIGTERM/SIGINT; returns the exit status (1: it could not start).
    With `passed` (`run --fd`, `sockets.passed_unix`) the vhost-user socket is that one:
    listening, or one connection, and then the daemon stops when it ends (nobody can connect
    again)."""
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*watched) as signals:
        activated = systemd.listen_fds()
        units = {name: fds for name, fds in activated.items() if name in SOCKET_UNIT_FDS}
        recovered = {name: fds for name, fds in activated.items()
                     if name not in SOCKET_UNIT_FDS}
        try:
            store, region, resume = recover(cfg, recovered)
        except NewerStateError as e:
            log.error("%s", e)
            return 1
        admin_fds = units.get("admin")
        admin_fd = admin_fds[0] if admin_fds else None
        own_socket = connected = False
        try:
            if passed is not None:
                connected = not is_listening(passed)
                log.info("vm %s: serving %s passed as fd %d", cfg.name,
                         "a connection" if connected else "a listening socket",
                         passed.fileno())
                listener = trio.socket.from_stdlib_socket(passed)
            elif units.get("vhost-user"):
                listener = inherited_unix(units["vhost-user"][0])
                log.info("vm %s: socket-activated (%s)", cfg.name, ", ".join(units))
            else:
                listener = await listen_unix(cfg.socket, cfg.socket_mode,
                                             group=cfg.socket_group)
                own_socket = True
        except OSError as e:
            log.error("vm %s: cannot listen on %s: %s", cfg.name, cfg.socket, e)
            return 1
        with listener:
            status, handed_over = await _serve(
                cfg, listener, admin_fd, signals, task_status,
                Recovered(store, region, resume), own_socket=own_socket, connected=connected)
    if own_socket and not handed_over:
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
    continuity: Recovered,
    *,
    own_socket: bool,
    connected: bool,
) -> tuple[int, bool]:
    """(exit status, whether the daemon handed over to a successor)."""
    async with trio.open_nursery() as nursery:
        daemon = Daemon(cfg, nursery, store=continuity.store, region=continuity.region,
                        resume=continuity.resume)
        if not own_socket:  # what status shows: where the socket really is
            daemon.socket = listener.getsockname() or f"fd {listener.fileno()}"
        if continuity.resume is not None:
            await daemon.resume_connection(continuity.resume)
        if continuity.region is not None:
            daemon.checkpoint()
            nursery.start_soon(daemon.checkpoints)
        if connected:
            async def serve_then_stop() -> None:
                await daemon.serve_connected(listener)
                # Nothing to hand over: no front end can come back on that connection.
                await _shutdown(daemon, nursery, hand_over=False)

            nursery.start_soon(serve_then_stop)
        else:
            await nursery.start(daemon.serve, listener)
        try:
            if cfg.admin_socket or admin_fd is not None:
                await nursery.start(serve_admin, daemon, cfg.admin_socket, admin_fd)
            if cfg.metrics_listen:
                await nursery.start(serve_metrics, daemon, *cfg.metrics_listen)
        except OSError as e:
            log.error("vm %s: cannot listen: %s", cfg.name, e)
            nursery.cancel_scope.cancel()
            return 1, False
        interval = systemd.watchdog_interval()
        if interval:
            nursery.start_soon(_watchdog, interval)
        log.info("vm %s: %s %s", cfg.name,
                 "serving the connection on" if connected else "listening on", daemon.socket)
        systemd.notify("READY=1", f"STATUS=serving {len(cfg.ports)} ports on {daemon.socket}")
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
        await _shutdown(daemon, nursery)
    if not daemon.handing_over:
        daemon.backend.disconnected()
    return 0, daemon.handing_over
