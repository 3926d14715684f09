"""The process around one VM's daemon: the listening socket (its own or systemd's), the
admin and metrics listeners, signals (SIGHUP reloads, SIGTERM/SIGINT stop), sd_notify and
the watchdog."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

import trio

from . import systemd
from .admin import serve_admin, serve_metrics
from .config import ConfigError, VMConfig, load
from .console.session import Input
from .continuity import RegionError, StateRegion
from .custody import FdStore
from .daemon import SNAPSHOT_VERSION, Daemon
from .fds import close_fds
from .sockets import inherited_unix, is_listening, listen_unix

# The daemon's logger: these lines were always "vhostser.daemon: ..." in the journal.
log = logging.getLogger("vhostser.daemon")


# Socket units' fds, named by FileDescriptorName=; every other name is the daemon's own store.
SOCKET_UNIT_FDS = ("vhost-user", "admin")


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
            if version != SNAPSHOT_VERSION:
                raise NewerStateError(
                    f"vm {cfg.name}: the stored state is version {version!r}, this vhostser "
                    f"resumes version {SNAPSHOT_VERSION}: leaving every fd in the store for "
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


async def _shutdown(daemon: Daemon, nursery: trio.Nursery, *, hand_over: bool = True) -> None:
    systemd.notify("STOPPING=1")
    if hand_over and daemon.store.enabled:
        # Under a service manager that keeps our fds, a stop is a hand-over: the guest, its
        # sessions and the peers notice nothing, and the next start (a restart, an
        # upgrade) goes on from here.
        daemon.hand_over()
    else:
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
    units = {name: fds for name, fds in activated.items() if name in SOCKET_UNIT_FDS}
    recovered = {name: fds for name, fds in activated.items() if name not in SOCKET_UNIT_FDS}
    try:
        store, region, resume = recover(cfg, recovered)
    except NewerStateError as e:
        log.error("%s", e)
        return 1
    own_socket = False
    connected = False
    if passed is not None:
        connected = not is_listening(passed)
        log.info("vm %s: serving %s passed as fd %d", cfg.name,
                 "a connection" if connected else "a listening socket", passed.fileno())
        listener = trio.socket.from_stdlib_socket(passed)
    elif units.get("vhost-user"):
        listener = inherited_unix(units["vhost-user"][0])
        log.info("vm %s: socket-activated (%s)", cfg.name, ", ".join(units))
    else:
        listener = await listen_unix(cfg.socket)
        own_socket = True
    admin_fds = units.get("admin")
    admin_fd = admin_fds[0] if admin_fds else None
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with listener, trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:
            daemon = Daemon(cfg, nursery, store=store, region=region, resume=resume)
            if not own_socket:  # what status shows: where the socket really is
                daemon.socket = listener.getsockname() or f"fd {listener.fileno()}"
            if resume is not None:
                await daemon.resume_connection(resume)
            if region is not None:
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
        if not daemon.handing_over:
            daemon.backend.disconnected()
    if own_socket:
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass
    return 0
