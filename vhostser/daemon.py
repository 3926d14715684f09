"""One VM's daemon: its device and ports, one front end at a time, the front-end grace
period, live reload, the state file, and what the admin socket reports. The process around
it (sockets, signals, systemd) is `service`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import trio

from . import state as state_mod
from .config import PortSpec, VMConfig
from .console import ConsoleDevice, Port
from .console.session import Input, State
from .vhost_user import VhostUserBackend, send_backend_request, serve_connection
from .vhost_user.backend import STATUS_NEEDS_RESET

log = logging.getLogger("vhostser.daemon")

# The virtio device status bits (virtio 1.2 §2.1), low to high, as `ctl status` names them.
STATUS_BITS = (
    (0x01, "ACKNOWLEDGE"), (0x02, "DRIVER"), (0x08, "FEATURES_OK"), (0x04, "DRIVER_OK"),
    (STATUS_NEEDS_RESET, "NEEDS_RESET"), (0x80, "FAILED"),
)
# Session states by name, next to the letter the JSON keeps (console/session.py).
STATE_NAMES = {
    State.A: "open (guest+host)",
    State.B: "closed",
    State.C: "host waiting",
    State.D: "guest open, no host",
    State.E: "ended by host",
}


def status_names(status: int) -> list[str]:
    """The set bits of a virtio device status, in the order a driver sets them."""
    return [name for bit, name in STATUS_BITS if status & bit]


def qemu_command_line(cfg: VMConfig, mem: str = "1G") -> str:
    """The QEMU options that connect a VM to this daemon (QEMU ≥ 10.2)."""
    return " \\\n    ".join(
        [
            "qemu-system-x86_64 -machine q35,memory-backend=mem -m " + mem,
            f"-object memory-backend-memfd,id=mem,size={mem},share=on",
            # No reconnect-ms: with it, QEMU 11.1's vhost-user-test-device-pci fails to realize
            # ("Failed to set msg fds"): the chardev is still connecting in the background.
            f"-chardev socket,id=vhostser0,path={cfg.socket}",
            "-device vhost-user-test-device-pci,chardev=vhostser0,virtio-id=3,"
            f"num_vqs={2 * cfg.max_ports + 2},config_size=12",
        ]
    )


class Daemon:
    """One VM's vhostser: the device, its ports and the front-end connection."""

    def __init__(self, cfg: VMConfig, nursery: trio.Nursery) -> None:
        self.cfg = cfg
        self.nursery = nursery
        self.started = time.time()
        self.device = ConsoleDevice(
            nursery, max_ports=cfg.max_ports, cols=cfg.cols, rows=cfg.rows,
            resize_rows_first=cfg.resize_rows_first, vm_name=cfg.name,
        )
        self.backend = VhostUserBackend(self.device)
        self.device.on_broken = self.backend.mark_needs_reset
        self.device.on_config_change = lambda: nursery.start_soon(
            send_backend_request, self.backend, self.backend.config_change_message()
        )
        self.specs: dict[int, PortSpec] = {}
        self.frontend_connected = False
        self.connections = 0
        self.frontend_left: float | None = None  # when the last front end went away
        # What `status` calls the vhost-user socket: the config's path, or what the service
        # was handed instead (socket activation, --fd).
        self.socket = cfg.socket
        # Sessions taken back from the state file that no front end has confirmed yet (port
        # id -> session id): until one connects, nothing says the guest is still there.
        self.restored: dict[int, int] = {}
        self._grace_scope: trio.CancelScope | None = None
        self.state_path = Path(cfg.state_dir) / "state.json" if cfg.state_dir else None
        saved = state_mod.load(self.state_path) if self.state_path else state_mod.VMState()
        # The next session id per port id, kept across removal and re-adding of a port (and,
        # through the state file, across restarts): session ids are never reused.
        self.next_ids = {pid: p.next_session_id for pid, p in saved.ports.items()}
        for spec in cfg.ports:
            self.add_port(spec, saved.ports.get(spec.config.id))

    # -------------------------------------------------------------- ports

    def add_port(self, spec: PortSpec, saved: state_mod.PortState | None = None) -> Port:
        first = self.next_ids.get(spec.config.id, 1)
        port = self.device.add_port(spec.config, spec.make_backend(), first_session_id=first)
        self.specs[spec.config.id] = spec
        if saved and saved.guest_open and saved.session_id is not None:
            # The guest had this port open when the previous daemon stopped: the session goes
            # on (a reconnecting QEMU brings the same guest back); tell the backend again.
            self.device.restore_session(spec.config.id, saved.session_id)
            self.restored[spec.config.id] = saved.session_id
        self.save_state()
        return port

    def remove_port(self, port_id: int) -> None:
        self.next_ids[port_id] = self.device.ports[port_id].next_session_id
        self.device.remove_port(port_id)
        del self.specs[port_id]
        self.restored.pop(port_id, None)
        self.save_state()

    def close_session(self, port_id: int) -> int | None:
        port = self.device.ports[port_id]
        session = port.session
        if session is None:
            return None
        port.end_session()
        return session.id

    def reload(self, new: VMConfig) -> dict[str, list[int]]:
        """Apply a new config file live: ports added, removed or changed (re-created)."""
        if new.max_ports != self.cfg.max_ports or new.socket != self.cfg.socket:
            log.warning("reload: max_ports and socket changes need a restart; keeping %d, %s",
                        self.cfg.max_ports, self.cfg.socket)
        wanted = {s.config.id: s for s in new.ports if s.config.id < self.cfg.max_ports}
        removed = [pid for pid in self.specs if pid not in wanted]
        changed = [
            pid for pid, s in wanted.items()
            if pid in self.specs and (s.config, s.backend_type, s.backend_options)
            != (self.specs[pid].config, self.specs[pid].backend_type,
                self.specs[pid].backend_options)
        ]
        added = [pid for pid in wanted if pid not in self.specs]
        for pid in removed + changed:
            self.remove_port(pid)
        for pid in changed + added:
            self.add_port(wanted[pid])
        for port in self.device.ports.values():
            port.backend.reopen()
        log.info("reload: added %s, removed %s, changed %s", added, removed, changed)
        return {"added": added, "removed": removed, "changed": changed}

    # -------------------------------------------------------------- state

    def save_state(self) -> None:
        if self.state_path is None:
            return
        for pid, port in self.device.ports.items():
            self.next_ids[pid] = port.next_session_id
        snapshot = state_mod.VMState({
            pid: state_mod.PortState(next_session_id=nxt) for pid, nxt in self.next_ids.items()
        })
        for pid, port in self.device.ports.items():
            snapshot.ports[pid].guest_open = port.state.guest_open
            snapshot.ports[pid].session_id = port.session.id if port.session else None
        try:
            state_mod.save(self.state_path, snapshot)
        except OSError as e:
            log.error("cannot save state to %s: %s", self.state_path, e)

    # -------------------------------------------------------------- front end

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept front ends forever, one at a time: vhost-user has a single front end per
        device, so a second connection while one is active is refused with a log line."""
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            if self.frontend_connected:
                log.warning("vm %s: refusing a second front-end connection", self.cfg.name)
                conn.close()
                continue
            self._connected()
            self.nursery.start_soon(self._run_connection, conn)

    async def serve_connected(self, conn: trio.socket.SocketType) -> None:
        """Serve the one connection the daemon was started on (`run --fd` with a connected
        socket, as libvirt and crosvm hand it) and return when it ends. Nobody can connect
        again, so the sessions close then (frontend-gone) instead of waiting for a grace
        period."""
        self._connected()
        await self._run_connection(conn, reconnectable=False)
        log.info("vm %s: the front end cannot come back on a passed connection: closing "
                 "sessions", self.cfg.name)
        self.device.close_all(Input.FRONTEND_GONE)
        self.save_state()

    def _connected(self) -> None:
        self.frontend_connected = True
        self.connections += 1
        self.restored.clear()
        if self._grace_scope is not None:
            self._grace_scope.cancel()

    async def _run_connection(
        self, conn: trio.socket.SocketType, *, reconnectable: bool = True
    ) -> None:
        log.info("vm %s: front end connected", self.cfg.name)
        try:
            with conn:
                await serve_connection(conn, self.backend)
        finally:
            self.frontend_connected = False
            self.frontend_left = time.time()
            self.save_state()
            if reconnectable:
                log.info("vm %s: front end gone; sessions kept for %.0f s", self.cfg.name,
                         self.cfg.frontend_grace)
                self.nursery.start_soon(self._grace_period)

    async def _grace_period(self) -> None:
        with trio.CancelScope() as scope:
            self._grace_scope = scope
            await trio.sleep(self.cfg.frontend_grace)
            if not self.frontend_connected:
                log.info("vm %s: no front end for %.0f s: closing sessions", self.cfg.name,
                         self.cfg.frontend_grace)
                self.device.close_all(Input.FRONTEND_GONE)
                self.save_state()
        if self._grace_scope is scope:
            self._grace_scope = None

    # -------------------------------------------------------------- reporting

    def status(self) -> dict[str, Any]:
        """What `ctl status` shows. `status` and `driver_ready` are the device's last known
        state: they stay what the last front end left while none is connected (reconnect is
        not reset), so `frontend_connected` / `frontend_left` say whether they are live."""
        status = self.backend.status | (STATUS_NEEDS_RESET if self.backend.needs_reset else 0)
        return {
            "vm": self.cfg.name,
            "config": self.cfg.source,
            "socket": self.socket,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "frontend_connected": self.frontend_connected,
            "frontend_left": None if self.frontend_connected or self.frontend_left is None
            else round(time.time() - self.frontend_left, 1),
            "connections": self.connections,
            "driver_ready": self.device.driver_ready,
            "multiport": self.device.multiport,
            "status": self.backend.status,
            "status_bits": status_names(status),
            "needs_reset": self.backend.needs_reset,
            "max_ports": self.cfg.max_ports,
            "ports": len(self.device.ports),
            "sessions_open": sum(1 for p in self.device.ports.values() if p.session),
            "sessions_restored": sum(1 for pid in self.device.ports if self._restored(pid)),
        }

    def _restored(self, pid: int) -> bool:
        """The port's open session is one taken back from the state file, unconfirmed."""
        session = self.device.ports[pid].session
        return session is not None and self.restored.get(pid) == session.id

    def ports(self) -> list[dict[str, Any]]:
        return [
            {
                "id": pid,
                "name": port.name,
                "console": port.config.console,
                "backend": self.specs[pid].backend_type if pid in self.specs else "?",
                "endpoint": port.backend.endpoint_info(),
                "state": port.state.name,
                "state_name": STATE_NAMES[port.state],
                "guest_open": port.state.guest_open,
                "host_open": port.state.host_open,
                "guest_ready": port.guest_ready,
                "session": port.session.id if port.session else None,
                "restored": self._restored(pid),
            }
            for pid, port in sorted(self.device.ports.items())
        ]

    def sessions(self) -> list[dict[str, Any]]:
        return [
            {"port": pid, "name": port.name, "session": port.session.id,
             "state": port.state.name, "state_name": STATE_NAMES[port.state],
             "restored": self._restored(pid)}
            for pid, port in sorted(self.device.ports.items())
            if port.session is not None
        ]

    def stats(self) -> dict[str, Any]:
        ports = {}
        for pid, port in sorted(self.device.ports.items()):
            entry = port.counters.as_dict()
            if backend_counters := port.backend.counter_values():
                entry["backend"] = dict(backend_counters)
            ports[str(pid)] = entry
        return {"device": self.device.counters.as_dict(), "ports": ports}
