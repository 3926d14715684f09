"""The parts of systemd's service protocol vhostser speaks: socket activation (LISTEN_FDS,
LISTEN_FDNAMES) and sd_notify (READY, STATUS, STOPPING, RELOADING, WATCHDOG). Standard
library only; outside systemd every call is a quiet no-op."""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from collections.abc import Sequence

log = logging.getLogger("vhostser.systemd")

SD_LISTEN_FDS_START = 3
NOTIFY_TIMEOUT = 2.0


def listen_fds(*, unset: bool = True) -> dict[str, list[int]]:
    """The sockets systemd passed us, by name (LISTEN_FDNAMES; unnamed ones are "unknown").
    Empty when not socket-activated or when the fds were meant for another process."""
    env = {var: os.environ.get(var) for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    if unset:  # as sd_listen_fds does, on every path: children must not inherit them
        for var in env:
            os.environ.pop(var, None)
    try:
        pid = int(env["LISTEN_PID"] or "")
        count = int(env["LISTEN_FDS"] or "")
    except ValueError:
        return {}
    names = env["LISTEN_FDNAMES"].split(":") if env["LISTEN_FDNAMES"] is not None else []
    if pid != os.getpid() or count <= 0:
        return {}
    fds: dict[str, list[int]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        fds.setdefault(name, []).append(fd)
    return fds


def notify(*lines: str, fds: Sequence[int] = ()) -> bool:
    """Send `KEY=value` lines (and `fds`, for FDSTORE=1) to $NOTIFY_SOCKET; False if there
    is none or it failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # The manager reads promptly; a bound keeps a stuck one from freezing the daemon.
            s.settimeout(NOTIFY_TIMEOUT)
            s.connect(address)
            s.sendmsg(["\n".join(lines).encode()], ancillary if fds else [])
        return True
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", path, e)
        return False


async def notify_barrier(timeout: float = NOTIFY_TIMEOUT) -> bool:
    """Wait until the service manager has handled every notification sent before
    (BARRIER=1, as sd_notify_barrier: it closes the pipe end it gets once it has); False if
    it did not within `timeout` (or there is no manager)."""
    import trio  # the rest of this module is synchronous and needs no trio

    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        sent = notify("BARRIER=1", fds=[w])
        os.close(w)
        w = -1
        if not sent:
            return False
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(r)  # EOF: every copy of the write end is closed
            return True
        log.warning("the service manager did not confirm a notification barrier in %.0f s",
                    timeout)
        return False
    finally:
        if w >= 0:
            os.close(w)
        trio.lowlevel.notify_closing(r)
        os.close(r)


def fd_store_available() -> bool:
    """Whether the service manager keeps fds for us: systemd ≥ 254 says so in $FDSTORE (its
    FileDescriptorStoreMax=); older ones do not, so the unit says it (VHOSTSER_FDSTORE=1)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    for var in ("FDSTORE", "VHOSTSER_FDSTORE"):
        try:
            if int(os.environ.get(var, "0")) > 0:
                return True
        except ValueError:
            pass
    return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None if not asked for."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, as RELOADING=1 wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
