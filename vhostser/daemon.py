"""One VM's daemon: its device and ports, one front end at a time, the front-end grace
period, live reload, the state file, and what the admin socket reports. The process around
it (sockets, signals, systemd) is `service`."""

from __future__ import annotations

import logging
import os
import select
import shlex
import socket
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from . import state as state_mod
from . import systemd
from .config import PortSpec, VMConfig
from .console import ConsoleDevice, DeviceState, Port, PortBackend, PortConfig, PortState
from .console.port import Custody
from .console.session import Input, State
from .console.staging import Staging
from .continuity import RequestKind, SharedCells, SharedStaging, StateRegion
from .custody import FdStore
from .sockets import ListenerCounters, PeerPolicy, accept_connection
from .vhost_user import Header, VhostUserBackend, send_backend_request, serve_connection
from .vhost_user.backend import STATUS_NEEDS_RESET
from .vhost_user.messages import HEADER

log = logging.getLogger("vhostser.daemon")

# A front end connecting while the previous one, which hung up, is still being served (QEMU
# reconnecting at once): how long the new one waits for that conversation to end.
RECONNECT_WAIT = 1.0


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """Whether the peer of `sock` has closed its end (or the socket failed)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
               for _, events in poller.poll(0))

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


# The printed command line's one placeholder: the guest's disk, which the user replaces.
DISK_PLACEHOLDER = "DISK.qcow2"


def qemu_command_line(cfg: VMConfig, mem: str = "1G") -> str:
    """A complete QEMU (≥ 10.2) command line for a VM on this daemon, runnable as printed once
    DISK_PLACEHOLDER is replaced: KVM where there is one, else TCG; no window, the guest's
    serial console and QEMU's monitor on the terminal (Ctrl-a x quits)."""
    return " \\\n    ".join(
        [
            f"qemu-system-x86_64 -machine q35,accel=kvm:tcg,memory-backend=mem -m {mem}",
            f"-object memory-backend-memfd,id=mem,size={mem},share=on",
            # No reconnect-ms: with it, QEMU 11.1's vhost-user-test-device-pci fails to realize
            # ("Failed to set msg fds"): the chardev is still connecting in the background.
            "-chardev " + shlex.quote(f"socket,id=vhostser0,path={cfg.socket}"),
            "-device vhost-user-test-device-pci,chardev=vhostser0,virtio-id=3,"
            f"num_vqs={2 * cfg.max_ports + 2},config_size=12",
            "-nographic",
            f"-drive file={DISK_PLACEHOLDER},if=virtio",
        ]
    )


SNAPSHOT_VERSION = 2
# The snapshot versions this daemon resumes: 1 had no "backends" (its backends kept no fds).
RESUMES_VERSIONS = (1, 2)
# Counters and staged bytes change with every chain; they reach the state region this often
# (everything else as it changes).
CHECKPOINT_INTERVAL = 0.5


class PortCustody(Custody):
    """A port's custody in the daemon's fd store: names are "port<id>.<name>"."""

    def __init__(self, daemon: Daemon, port_id: int, saved: Mapping[str, Any],
                 inherited: set[str]) -> None:
        self._daemon = daemon
        self._prefix = f"port{port_id}."
        self.saved = saved
        self._inherited = inherited  # the predecessor's names not taken yet (shared)

    @property
    def enabled(self) -> bool:  # type: ignore[override]
        return self._daemon.store.enabled

    @property
    def handing_over(self) -> bool:
        return self._daemon.handing_over

    def keep(self, name: str, fd: int) -> None:
        self._daemon._custody(self._prefix + name, fd)

    def release(self, name: str) -> None:
        self._daemon._custody(self._prefix + name, None)

    def take(self, name: str) -> int | None:
        full = self._prefix + name
        if full not in self._inherited:
            return None
        self._inherited.discard(full)
        return self._daemon.store.fd(full)

    def kept(self, prefix: str) -> list[str]:
        start = self._prefix + prefix
        return sorted(n.removeprefix(self._prefix) for n in self._inherited
                      if n.startswith(start))

    def fifo(self, name: str, capacity: int) -> Staging:
        full = self._prefix + name
        fd = self.take(name)
        if fd is not None:
            try:
                shared = SharedStaging(fd, release=lambda: self.release(name))
                if shared.capacity == capacity:
                    return shared
                shared.close()
            except (OSError, ValueError) as e:
                log.error("%s: the stored FIFO is unusable (%s): a new one", full, e)
                self.release(name)
                os.close(fd)
        if not self.enabled:
            return super().fifo(name, capacity)
        return SharedStaging.create(capacity, keep=lambda fd: self.keep(name, fd),
                                    release=lambda: self.release(name))

    def changed(self) -> None:
        self._daemon.checkpoint()


class Daemon:
    """One VM's vhostser: the device, its ports and the front-end connection.

    With fd custody (`store` enabled: under a service manager) every fd the VM's channels need
    is in systemd's store and the state in `region`; `resume` is a predecessor's snapshot to
    go on from (then `resume_connection` picks up its front end)."""

    def __init__(
        self,
        cfg: VMConfig,
        nursery: trio.Nursery,
        *,
        store: FdStore | None = None,
        region: StateRegion | None = None,
        resume: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.nursery = nursery
        self.started = time.time()
        self.store = store if store is not None else FdStore(enabled=False)
        self.region = region
        self.handing_over = False  # the state is final: nothing more goes to store or region
        self._store_changed = False  # an fd went into or out of the store since the barrier
        self.resumed = resume is not None
        self.device = ConsoleDevice(
            nursery, max_ports=cfg.max_ports, cols=cfg.cols, rows=cfg.rows,
            resize_rows_first=cfg.resize_rows_first, vm_name=cfg.name,
            resume=None if resume is None else DeviceState.from_dict(resume["console"]),
        )
        self.device.core.checkpoint = self.checkpoint
        self.device.core.new_staging = self._new_staging
        self.device.core.share_counters = self._share_counters
        # What the predecessor's backends kept (port<id>.* but the staging buffers), until
        # each is taken back; and each port's saved continuity.
        self._inherited = {n for n in self.store.names()
                           if n.startswith("port")
                           and not n.endswith((".staging", ".counters"))}
        saved = resume.get("backends", {}) if resume is not None else {}
        self.device.custody_for = lambda pid: PortCustody(
            self, pid, saved.get(str(pid), {}) if isinstance(saved, dict) else {},
            self._inherited)
        self.backend = VhostUserBackend(self.device)
        self.backend.custody = self._custody
        self.device.on_broken = self.backend.mark_needs_reset
        self.device.on_config_change = lambda: nursery.start_soon(
            send_backend_request, self.backend, self.backend.config_change_message()
        )
        self.specs: dict[int, PortSpec] = {}
        # Who may connect to the vhost-user and admin sockets; what each listener saw.
        self.peer_policy = PeerPolicy(frozenset(cfg.allow_uids), frozenset(cfg.allow_gids))
        self.listeners: dict[str, ListenerCounters] = {"vhost-user": ListenerCounters()}
        self.frontend_connected = False
        self.connections = 0
        # The front end's connection being served, its task's scope, and when it ended.
        self._conn: trio.socket.SocketType | None = None
        self._conn_scope = trio.CancelScope()
        self._conn_done = trio.Event()
        # Set at shutdown once the state is saved: what the guest has open must survive the
        # sessions closing for shutdown (and the front end's connection ending with them).
        self.stopping = False
        self.frontend_left: float | None = None  # when the last front end went away
        # What `status` calls the vhost-user socket: the config's path, or what the service
        # was handed instead (socket activation, --fd).
        self.socket = cfg.socket
        # Sessions taken back from the state file that no front end has confirmed yet (port
        # id -> session id): until one connects, nothing says the guest is still there.
        self.restored: dict[int, int] = {}
        self._grace_scope: trio.CancelScope | None = None
        self.state_path = Path(cfg.state_dir) / "state.json" if cfg.state_dir else None
        if resume is not None:
            self.next_ids = {int(k): int(v) for k, v in resume["next_ids"].items()}
            self._adopt_ports()
            return
        saved = state_mod.load(self.state_path) if self.state_path else state_mod.VMState()
        # The next session id per port id, kept across removal and re-adding of a port (and,
        # through the state file, across restarts): session ids are never reused.
        self.next_ids = {pid: p.next_session_id for pid, p in saved.ports.items()}
        for spec in cfg.ports:
            self.add_port(spec, saved.ports.get(spec.config.id))

    def _new_staging(self, config: PortConfig) -> Staging:
        if not self.store.enabled:
            return Staging.in_memory(config.staging_limit)
        name = f"port{config.id}.staging"
        return SharedStaging.create(config.staging_limit,
                                    keep=lambda fd: self._custody(name, fd),
                                    release=lambda: self._custody(name, None))

    def _share_counters(self, port: PortState, *, resumed: bool = False) -> None:
        """The port's ledger counters into a memfd in the store; resumed, into the one the
        predecessor counted in after its last snapshot, if it left one."""
        if not self.store.enabled:
            return
        name = f"port{port.config.id}.counters"
        fd = self.store.fd(name) if resumed else None
        if fd is not None:
            try:
                cells = SharedCells(fd, release=lambda: self._custody(name, None))
            except (OSError, ValueError) as e:
                log.error("port %d: the stored counters are unusable (%s): using the "
                          "snapshot's", port.config.id, e)
                self._custody(name, None)
                os.close(fd)
            else:
                port.counters.share(cells.cells, cells, newer=True)
                return
        cells = SharedCells.create(keep=lambda fd: self._custody(name, fd),
                                   release=lambda: self._custody(name, None))
        port.counters.share(cells.cells, cells, newer=False)

    def _resumed_staging(self, port: PortState) -> None:
        """The staging buffer the predecessor shared is newer than its last snapshot."""
        name = f"port{port.config.id}.staging"
        fd = self.store.fd(name)
        if fd is None:
            return
        try:
            shared = SharedStaging(fd, release=lambda: self._custody(name, None))
        except (OSError, ValueError) as e:
            log.error("port %d: the stored staging buffer is unusable (%s): using the "
                      "snapshot's", port.config.id, e)
            return
        if shared.capacity != port.config.staging_limit:
            shared.close()
            return
        port.staging = shared

    def _adopt_ports(self) -> None:
        """The resumed device has its ports: each gets its backend from the config. A port the
        config no longer has, or has changed, is removed (and re-added), as a reload would."""
        resumed = self.device.state.ports
        wanted = {s.config.id: s for s in self.cfg.ports}
        for pid in sorted(resumed):
            self._resumed_staging(resumed[pid])
            self._share_counters(resumed[pid], resumed=True)
            spec = wanted.get(pid)
            if spec is not None and spec.config == resumed[pid].config:
                make = self._maker(spec)
                self.device.adopt_port(spec.config, make(), make)
                self.specs[pid] = spec
            else:
                self.next_ids[pid] = resumed[pid].next_session_id
                self.device.core.remove_port(pid)
                self.device.settle()
                self._drop_inherited(f"port{pid}.")
        for pid, spec in wanted.items():
            if pid not in self.specs:
                self.add_port(spec)

    def _drop_inherited(self, prefix: str) -> None:
        """The predecessor's fds for a port that is gone (or not the same port any more)."""
        for name in sorted(n for n in self._inherited if n.startswith(prefix)):
            self._inherited.discard(name)
            fd = self.store.fd(name)
            self._custody(name, None)
            if fd is not None:
                os.close(fd)

    # -------------------------------------------------------------- ports

    def add_port(self, spec: PortSpec, saved: state_mod.PortState | None = None) -> Port:
        first = self.next_ids.get(spec.config.id, 1)
        make = self._maker(spec)
        port = self.device.add_port(spec.config, make(), first_session_id=first, remake=make)
        self.specs[spec.config.id] = spec
        if saved and saved.guest_open and saved.session_id is not None:
            # The guest had this port open when the previous daemon stopped: the session goes
            # on (a reconnecting QEMU brings the same guest back); tell the backend again.
            self.device.restore_session(spec.config.id, saved.session_id)
            self.restored[spec.config.id] = saved.session_id
        self.save_state()
        return port

    def _maker(self, spec: PortSpec) -> Callable[[], PortBackend]:
        """How `spec`'s backend is made, and made again after a failure: the VM's allow
        lists are its sockets' too unless it has its own."""
        return partial(spec.make_backend, self.peer_policy)

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
        self.device.reopen_backends()
        log.info("reload: added %s, removed %s, changed %s", added, removed, changed)
        return {"added": added, "removed": removed, "changed": changed}

    # -------------------------------------------------------------- state

    def shut_down(self) -> None:
        """SIGTERM: save the state, then close every session (reason shutdown). The state
        file keeps the sessions as the guest has them: the guest closed nothing, and the next
        daemon replays them to its backends."""
        self.save_state()
        self.stopping = True
        self.device.close_all(Input.SHUTDOWN)

    def save_state(self) -> None:
        if self.state_path is None or self.stopping:
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

    # -------------------------------------------------------------- continuity

    def _custody(self, name: str, fd: int | None) -> None:
        if self.handing_over:
            return  # the fds stay in the store for the successor
        self._store_changed = True
        if fd is None:
            self.store.release(name)
        else:
            self.store.keep(name, fd)

    def snapshot(self) -> dict[str, Any]:
        self.device.fastpath.sync()
        for pid, port in self.device.ports.items():
            self.next_ids[pid] = port.next_session_id
        return {
            "version": SNAPSHOT_VERSION,
            "vm": self.cfg.name,
            "connected": self.frontend_connected,
            "vhost_user": self.backend.snapshot(),
            "console": self.device.state.to_dict(),
            "next_ids": {str(k): v for k, v in sorted(self.next_ids.items())},
            "fd_aliases": self.store.aliases,
            "backends": {str(pid): port.backend.continuity()
                         for pid, port in sorted(self.device.ports.items())},
        }

    def checkpoint(self) -> int:
        """Make the current state the one a successor resumes from; its generation."""
        if self.region is None or self.handing_over:
            return 0
        return self.region.write(self.snapshot())

    async def checkpoints(self) -> None:
        """What changes with every chain (counters, staged bytes) reaches the region too."""
        while self.region is not None:
            await trio.sleep(CHECKPOINT_INTERVAL)
            self.checkpoint()

    def hand_over(self) -> None:
        """A planned restart: the state as it is now is final; everything stays in the store
        (no session closes, nothing is said to the guest or to the peers)."""
        self.device.core.freeze()
        self.checkpoint()
        self.handing_over = True
        self.store.enabled = False
        log.info("vm %s: state handed over (%d fds in the store)", self.cfg.name,
                 self.store.stored)

    # The Journal of serve_connection: a request the process dies in is finished by the
    # successor (see continuity.RequestKind).
    def received(self, raw: bytes, with_fds: bool) -> None:
        if self.region is not None and not self.handing_over:
            kind = RequestKind.RECEIVED_WITH_FDS if with_fds else RequestKind.RECEIVED
            self.region.record_request(kind, raw, self.region.generation)

    def handled(self, reply: bytes | None) -> None:
        generation = self.checkpoint()
        if reply is not None and self.region is not None and not self.handing_over:
            self.region.record_request(RequestKind.REPLY, reply, generation)

    async def durable(self) -> None:
        """The front end may act on the reply (and kill us) at once: an fd handed to the store
        must be in it first. A notification barrier says the manager has handled every
        FDSTORE/FDSTOREREMOVE sent so far (it may drop those of a process that died)."""
        if self._store_changed and self.store.enabled and not self.handing_over:
            self._store_changed = False
            await systemd.notify_barrier()

    def replied(self) -> None:
        if self.region is not None and not self.handing_over:
            self.region.request_done()

    async def resume_connection(self, doc: dict[str, Any]) -> bool:
        """Go on with the predecessor's front end, if it had one: no vhost-user message, the
        rings restart where they stand, and a request it died in is finished."""
        fd = self.store.fd("vu.conn")
        if fd is None or not doc.get("connected"):
            return False
        self.backend.resume(doc["vhost_user"], self.store.fd)
        self.device.core.resume_done()
        conn = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
        self.frontend_connected = True
        self.connections += 1
        await self._finish_request(conn)
        self.checkpoint()
        self._serve_connection(conn)
        log.info("vm %s: resumed the front end's connection (%d fds from the store)",
                 self.cfg.name, self.store.stored)
        return True

    async def _finish_request(self, conn: trio.socket.SocketType) -> None:
        assert self.region is not None
        request = self.region.request()
        if request.generation != self.region.generation:
            return
        reply: bytes | None = None
        if request.kind is RequestKind.REPLY:
            reply = request.data
        elif request.kind in (RequestKind.RECEIVED, RequestKind.RECEIVED_WITH_FDS):
            # Its fds (if it had any) went with the predecessor: the request table refuses it
            # then, with the answer the front end asked for.
            header = Header.unpack(request.data[: HEADER.size])
            reply = self.backend.receive(header, request.data[HEADER.size :], []).reply
        else:
            return
        log.info("vm %s: finishing the request the predecessor was handling (%s)",
                 self.cfg.name, request.kind.name)
        if reply is not None:
            await conn.send(reply)
        self.replied()

    # -------------------------------------------------------------- front end

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept front ends forever, one at a time: vhost-user has a single front end per
        device, so a second connection while one is active is refused with a log line. One
        that comes while the previous front end has hung up but its conversation is still
        being served (QEMU reconnecting at once) waits for that to end instead."""
        task_status.started()
        while True:
            conn = await accept_connection(listener, f"vm {self.cfg.name}: vhost-user socket",
                                           self.listeners["vhost-user"], self.peer_policy)
            if self.frontend_connected and not await self._previous_ended():
                log.warning("vm %s: refusing a second front-end connection (the first one is "
                            "still there)", self.cfg.name)
                conn.close()
                continue
            self._connected(conn)
            self._serve_connection(conn)

    def _serve_connection(self, conn: trio.socket.SocketType, *,
                          reconnectable: bool = True) -> None:
        self._conn, self._conn_scope, self._conn_done = conn, trio.CancelScope(), trio.Event()
        self.nursery.start_soon(partial(self._run_connection, conn, self._conn_scope,
                                        self._conn_done, reconnectable=reconnectable))

    async def serve_connected(self, conn: trio.socket.SocketType) -> None:
        """Serve the one connection the daemon was started on (`run --fd` with a connected
        socket, as libvirt and crosvm hand it) and return when it ends. Nobody can connect
        again, so the sessions close then (frontend-gone) instead of waiting for a grace
        period."""
        self._connected(conn)
        self._serve_connection(conn, reconnectable=False)
        await self._conn_done.wait()
        log.info("vm %s: the front end cannot come back on a passed connection: closing "
                 "sessions", self.cfg.name)
        self.device.close_all(Input.FRONTEND_GONE)
        self.save_state()

    def _connected(self, conn: trio.socket.SocketType) -> None:
        self.frontend_connected = True
        self.connections += 1
        self.restored.clear()
        if self._grace_scope is not None:
            self._grace_scope.cancel()
        self._custody("vu.conn", conn.fileno())
        log.info("vm %s: front end connected", self.cfg.name)

    async def _previous_ended(self) -> bool:
        """True once the connection being served has ended, if its front end hung up; False
        (at once) if that front end is still there."""
        if self._conn is not None and not _hung_up(self._conn):
            return False
        with trio.move_on_after(RECONNECT_WAIT):
            await self._conn_done.wait()
        if not self._conn_done.is_set():
            log.warning("vm %s: the previous front end hung up but its connection did not end "
                        "within %.0f s: ending it", self.cfg.name, RECONNECT_WAIT)
            self._conn_scope.cancel()
            await self._conn_done.wait()
        return True

    async def _run_connection(self, conn: trio.socket.SocketType, scope: trio.CancelScope,
                              done: trio.Event, *, reconnectable: bool = True) -> None:
        try:
            with scope, conn:
                try:
                    await serve_connection(conn, self.backend,
                                           self if self.region is not None else None)
                finally:
                    self._custody("vu.conn", None)
        finally:
            if self._conn is conn:
                self._conn = None
            # Handing over, the front end is not gone: the successor goes on with it.
            if not self.handing_over:
                self.frontend_connected = False
                self.frontend_left = time.time()
                self.save_state()
                if reconnectable:
                    log.info("vm %s: front end gone; sessions kept for %.0f s", self.cfg.name,
                             self.cfg.frontend_grace)
                    self.nursery.start_soon(self._grace_period, self.connections)
            done.set()

    async def _grace_period(self, connections: int) -> None:
        with trio.CancelScope() as scope:
            self._grace_scope = scope
            await trio.sleep(self.cfg.frontend_grace)
            # Not if a front end came (and maybe went) since: its own grace period counts.
            if not self.frontend_connected and self.connections == connections:
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
            "fd_store": self.store.stored,  # what systemd should hold for us (0: no store)
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
        self.device.fastpath.sync()
        ports = {}
        for pid, port in sorted(self.device.ports.items()):
            entry = port.counters.as_dict()
            entry["ledger"] = self.device.state.ports[pid].ledger()
            if backend_counters := self.device.backend_counters(pid):
                entry["backend"] = dict(backend_counters)
            ports[str(pid)] = entry
        return {"device": self.device.counters.as_dict(), "ports": ports,
                "vhost_user": self.backend.stats(),
                "listeners": {name: c.as_dict() for name, c in sorted(self.listeners.items())}}
