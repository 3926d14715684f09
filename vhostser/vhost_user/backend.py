"""The device-independent vhost-user back-end state machine (sans-io).

`VhostUserBackend.receive(header, body, fds)` takes one framed message and returns an
`Outcome`: the bytes to send back (if any) and whether the connection must close. No sockets and
no trio in here; the only system calls are the ones the state itself is made of (mmap of guest
memory, closing received fds, eventfd writes through `Vring`). The trio layer in `connection.py`
only moves bytes and fds in and out.

Error policy, in one place (see `receive`):
- a message that cannot be framed or trusted → close the connection (FramingError);
- a well-framed but invalid request → log a line naming it (rate-limited), count it, answer a
  failure ack when the front end asked for one (REPLY_ACK + NEED_REPLY), ignore it otherwise
  and carry on; an fd of the wrong kind (the request table says which kind) is such a request,
  rejected before any handler, poll or read sees the fd;
- an invalid request the front end waits a real answer for (GET_*) → close the connection,
  since no answer we could give would be true.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from virtqueue import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    GuestMemoryError,
    MappedMemory,
    Region,
    VirtqueueError,
)

from ..fds import FdKindError, accept_fd, close_fd, close_fds
from ..logs import RateLimiter
from .errors import MessageError, ResumeError, UnknownRequestError
from .interface import Device
from .messages import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    REQUESTS,
    U64,
    BackendRequest,
    ConfigSpace,
    DeviceStateTransfer,
    Header,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    TransferDirection,
    TransferPhase,
    VringAddr,
    VringFile,
    VringState,
    decode,
    encode,
    encode_reply,
    request_name,
)
from .vring import Vring

log = logging.getLogger("vhostser.vhost_user")

STATUS_NEEDS_RESET = 0x40

# What this back end implements, whatever the device: the protocol features the issue lists.
PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.DEVICE_STATE
)
# SET_DEVICE_STATE_FD's reply: bits 0-7 an error, bit 8 "no fd of the back end's own comes".
TRANSFER_NO_FD = 1 << 8
MAX_DEVICE_STATE = 64 << 20
# KVM's memory-slot limit, which is also what QEMU and libvhost-user use.
MAX_MEM_SLOTS = 509


def _known_name(code: int) -> str:
    """A request's name, or "unknown": a bounded set of keys for counters and log limits."""
    try:
        return Request(code).name
    except ValueError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Transfer:
    """A device-state transfer the connection carries out after the reply: write `data` to
    `fd` (SAVE) or read `fd` to its end (LOAD, `data` None), then close `fd` and tell
    `VhostUserBackend.transfer_done`."""

    fd: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the connection does after one message."""

    reply: bytes | None = None
    close: bool = False
    transfer: Transfer | None = None


class VhostUserBackend:
    """vhost-user protocol state for one device, across front-end connections.

    One instance lives as long as the device: a reconnecting front end meets the same device
    (its sessions survive); `disconnected()` drops what belonged to the old connection.
    """

    def __init__(self, device: Device, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        # Requests rejected and fds of the wrong kind, by request name ("unknown" for codes
        # outside the Request enum, so a front end cannot grow these without bound).
        self.rejected: Counter[str] = Counter()
        self.bad_fds: Counter[str] = Counter()
        self._limit = RateLimiter(log, clock=clock)
        self.memory: MappedMemory | None = None
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = ProtocolFeature(0)
        self.status = 0
        self.needs_reset = False
        self.backend_req_fd: int | None = None
        # The fds of the memory regions, kept open (not only mapped) so that a successor can
        # map them again: region -> (fd store name, fd).
        self.region_fds: dict[Region, tuple[str, int]] = {}
        self._region_serial = 0
        # Told of every fd this back end keeps (name, fd) and lets go of (name, None).
        self.custody: Callable[[str, int | None], None] = lambda name, fd: None
        for v in self.vrings:
            v.custody = lambda name, fd: self.custody(name, fd)
        self._handlers: dict[Request, Callable[[Message], Payload | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_device,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_file,
            Request.SET_VRING_CALL: self._set_vring_file,
            Request.SET_VRING_ERR: self._set_vring_file,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            Request.CHECK_DEVICE_STATE: self._check_device_state,
        }
        self._transfer: Transfer | None = None
        self._transfer_ok: bool | None = None  # None: none finished since the last request
        assert self._handlers.keys() == REQUESTS.keys(), "request table and handlers disagree"

    # ------------------------------------------------------------------ entry point

    def receive(self, header: Header, body: bytes, fds: Sequence[int]) -> Outcome:
        """Handle one framed message; takes ownership of `fds` (closed unless kept)."""
        name = request_name(header.request)
        try:
            msg = decode(header, body, fds)
            self._accept_fds(msg)
            log.debug("%s flags=0x%x %s fds=%d", name, msg.flags, msg.payload, len(msg.fds))
            # A handler owns the fds once it returns; if it raises, it has kept none of them.
            result = self._handlers[msg.request](msg)
        except Exception as e:
            if not isinstance(e, MessageError):
                # A bug in the device or in here: it must not take the daemon down. The
                # device's state is now unknown, so ask the driver for a reset.
                log.exception("%s: failed inside the back end", name)
                self.mark_needs_reset(None, f"{name} failed: {e!r}")
                e = MessageError(f"internal error: {e!r}")
            close_fds(fds)
            kind = _known_name(header.request)
            self.rejected[kind] += 1
            expects_answer = not isinstance(e, UnknownRequestError) and (
                REQUESTS[Request(header.request)].reply is not None
            )
            if expects_answer:
                self._limit.warning(f"{kind} rejected", "%s: rejected, closing the connection: "
                                    "%s", name, e)
                return Outcome(close=True)
            self._limit.warning(f"{kind} rejected", "%s: rejected: %s", name, e)
            if header.need_reply and self._reply_ack:
                return Outcome(encode_reply(header.request, U64(1)))
            return Outcome()
        if msg.spec.reply is not None:
            assert result is not None
            transfer, self._transfer = self._transfer, None
            return Outcome(encode_reply(msg.request, result), transfer=transfer)
        if msg.need_reply and self._reply_ack:
            return Outcome(encode_reply(msg.request, U64(0)))
        return Outcome()

    @property
    def _reply_ack(self) -> bool:
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    def stats(self) -> dict[str, Any]:
        """The protocol's counters, for the daemon's stats."""
        return {
            "rejected": dict(self.rejected),
            "bad_fds": dict(self.bad_fds),
            "eventfd_failures": {
                str(v.index): dict(v.eventfd_failures) for v in self.vrings if v.eventfd_failures
            },
        }

    # ------------------------------------------------------------------ helpers

    def _accept_fds(self, msg: Message) -> None:
        """Every fd of the message checked for the kind the request table names, and made
        non-blocking, before a handler keeps it (the containment rule of fds.py)."""
        kind = msg.spec.fd_kind
        if kind is None:
            return
        for i, fd in enumerate(msg.fds):
            try:
                accept_fd(fd, kind)
            except FdKindError as e:
                self.bad_fds[msg.request.name] += 1
                where = f"vring {msg.payload.index}: " if isinstance(msg.payload, VringFile) else ""
                if len(msg.fds) > 1:
                    where += f"fd {i + 1} of {len(msg.fds)}: "
                raise MessageError(f"{where}{e}") from None

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise MessageError(f"vring index {index} ≥ the device's {len(self.vrings)} queues")
        return self.vrings[index]

    @property
    def _protocol_features_negotiated(self) -> bool:
        return bool(self.acked_features & F_PROTOCOL_FEATURES)

    def _update(self, vring: Vring) -> None:
        """Start or stop the vring so that it runs exactly when everything it needs is there."""
        ready = (
            vring.kick_fd is not None
            and vring.size > 0
            and vring.addr is not None
            and self.memory is not None
            and (vring.enabled or not self._protocol_features_negotiated)
        )
        if ready and not vring.started:
            assert self.memory is not None
            try:
                vring.build_queue(
                    self.memory,
                    event_idx=bool(self.acked_features & VIRTIO_F_RING_EVENT_IDX),
                    indirect=bool(self.acked_features & VIRTIO_F_RING_INDIRECT_DESC),
                )
            except VirtqueueError as e:
                self._limit.warning(f"vring {vring.index} cannot start",
                                    "vring %d: cannot start: %s", vring.index, e)
                return
            log.debug("vring %d started at avail %d", vring.index, vring.base)
            self.device.queue_started(vring)
        elif not ready and vring.started:
            self._stop(vring)

    def _stop(self, vring: Vring) -> None:
        if vring.started:
            self.device.queue_stopped(vring)
            vring.drop_queue()
            log.debug("vring %d stopped at avail %d", vring.index, vring.base)

    def _stop_all(self) -> list[Vring]:
        running = [v for v in self.vrings if v.started]
        for v in running:
            self._stop(v)
        return running

    def mark_needs_reset(self, vring: Vring | None, reason: str) -> None:
        """The device found the driver's state unusable: DEVICE_NEEDS_RESET, per virtio."""
        self._limit.error("device needs reset", "device needs reset%s: %s",
                          f" (vring {vring.index})" if vring else "", reason)
        self.needs_reset = True
        if vring is not None:
            vring.signal_error()

    def config_change_message(self) -> bytes:
        """CONFIG_CHANGE_MSG for the back-end channel (NEED_REPLY when acks are on)."""
        # No payload (vhost-user spec); the ack, when asked for, is the usual u64.
        return encode(
            BackendRequest.CONFIG_CHANGE_MSG, flags=FLAG_NEED_REPLY if self._reply_ack else 0
        )

    def disconnected(self) -> None:
        """The front end went away: stop every ring and drop what belonged to its connection.
        Device state (and so sessions) stays: a reconnecting front end continues it."""
        self._stop_all()
        for v in self.vrings:
            for which in ("kick", "call", "err"):
                v.set_fd(which, None)
            v.enabled = False
        self._set_backend_req(None)
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self._forget_regions(list(self.region_fds))
        self.owned = False
        self.acked_protocol_features = ProtocolFeature(0)

    # ------------------------------------------------------------------ continuity

    def snapshot(self) -> dict[str, Any]:
        """What a successor needs to go on with the same front end without one message
        (JSON-able; the fds themselves are in the fd store under the names given here)."""
        return {
            "acked_features": self.acked_features,
            "acked_protocol_features": int(self.acked_protocol_features),
            "owned": self.owned,
            "status": self.status,
            "needs_reset": self.needs_reset,
            "region_serial": self._region_serial,
            "regions": [
                {"gpa": r.guest_phys_addr, "size": r.size, "uva": r.userspace_addr,
                 "offset": r.mmap_offset, "fd": name}
                for r, (name, _) in self.region_fds.items()
            ],
            "backend_req": self.backend_req_fd is not None,
            "vrings": [
                {
                    "size": v.size,
                    "addr": None if v.addr is None else [
                        v.addr.flags, v.addr.desc, v.addr.used, v.addr.avail, v.addr.log],
                    "base": v.base,
                    "used_base": v.used_base,
                    "enabled": v.enabled,
                    "started": v.started,
                    **{which: getattr(v, f"{which}_fd") is not None
                       for which in ("kick", "call", "err")},
                }
                for v in self.vrings
            ],
        }

    def resume(self, doc: Any, fd_of: Callable[[str], int | None]) -> None:
        """Go on from a predecessor's `snapshot` with the fds it kept (`fd_of(name)`), on the
        same connection: no message is exchanged and the guest notices nothing.

        Every ring that was running starts again at the used index in guest memory, for both
        its avail and used positions. That is exact because this device completes chains in
        the order it takes them (a held chain is the last one taken): what lies between the
        used index and the predecessor's avail position is at most one chain per queue, taken
        but not completed, and it is taken again. Each such ring's call eventfd is signalled
        once, in case the predecessor died between completing a chain and interrupting."""
        try:
            self._resume(doc, fd_of)
        except (KeyError, TypeError, ValueError, GuestMemoryError) as e:
            raise ResumeError(f"cannot resume the vhost-user state: {e!r}") from None

    def _resume(self, doc: dict[str, Any], fd_of: Callable[[str], int | None]) -> None:
        def need(name: str) -> int:
            fd = fd_of(name)
            if fd is None:
                raise ValueError(f"fd {name} is not in the store")
            return fd

        if len(doc["vrings"]) != len(self.vrings):
            raise ValueError(f"{len(doc['vrings'])} vrings, the device has {len(self.vrings)}")
        self.acked_features = int(doc["acked_features"])
        self.acked_protocol_features = ProtocolFeature(int(doc["acked_protocol_features"]))
        self.owned, self.status = bool(doc["owned"]), int(doc["status"])
        self.needs_reset = bool(doc["needs_reset"])
        self._region_serial = int(doc["region_serial"])
        memory = MappedMemory()
        for r in doc["regions"]:
            region = Region(int(r["gpa"]), int(r["size"]), int(r["uva"]), int(r["offset"]))
            fd = need(str(r["fd"]))
            memory.add(region, fd)
            self.region_fds[region] = (str(r["fd"]), fd)
        self.memory = memory if self.region_fds else None
        if doc["backend_req"]:
            self.backend_req_fd = need("vu.req")
        running = []
        for v, d in zip(self.vrings, doc["vrings"], strict=True):
            v.size, v.base, v.used_base = int(d["size"]), int(d["base"]), int(d["used_base"])
            v.enabled = bool(d["enabled"])
            v.addr = None if d["addr"] is None else VringAddr(v.index, *map(int, d["addr"]))
            for which in ("kick", "call", "err"):
                kept = fd_of(v.fd_name(which)) if d[which] else None
                if d[which] and kept is None:
                    # The manager lost it (a process killed just after handing it over):
                    # without a kick the ring waits for the front end's next start; without
                    # a call or err the guest is not interrupted until then.
                    log.error("vring %d: its %s eventfd is not in the store", v.index, which)
                    if which == "kick" and d["started"]:
                        d = {**d, "started": False}
                setattr(v, f"{which}_fd", kept)
            if d["started"]:
                running.append(v)
        for v in running:
            assert self.memory is not None and v.addr is not None
            used = self.memory.translate_uva(v.addr.used, 6 + 8 * v.size)
            v.base = v.used_base = int.from_bytes(self.memory.view(used + 2, 2), "little")
            self._update(v)
            if not v.started:
                raise ValueError(f"vring {v.index} was running and does not start again")
            log.info("vring %d resumed at %d", v.index, v.base)
            v.notify()

    # ------------------------------------------------------------------ handlers

    def _get_features(self, msg: Message) -> Payload:
        return U64(self.device.features | F_PROTOCOL_FEATURES)

    def _set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        offered = self.device.features | F_PROTOCOL_FEATURES
        if msg.payload.value & ~offered:
            raise MessageError(
                f"features 0x{msg.payload.value:x} include bits never offered "
                f"(0x{msg.payload.value & ~offered:x})"
            )
        self.acked_features = msg.payload.value
        self.device.features_acked(msg.payload.value & ~F_PROTOCOL_FEATURES)
        for v in self.vrings:
            self._update(v)

    def _set_owner(self, msg: Message) -> None:
        if self.owned:
            raise MessageError("the session already has an owner")
        self.owned = True

    def _reset_device(self, msg: Message) -> None:
        self._stop_all()
        self.device.reset()
        for v in self.vrings:
            v.reset()
        self.acked_features = 0
        self.status = 0
        self.needs_reset = False

    def _get_protocol_features(self, msg: Message) -> Payload:
        return U64(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        if msg.payload.value & ~PROTOCOL_FEATURES:
            raise MessageError(
                f"protocol features 0x{msg.payload.value:x} include bits never offered"
            )
        self.acked_protocol_features = ProtocolFeature(msg.payload.value)

    def _get_queue_num(self, msg: Message) -> Payload:
        return U64(len(self.vrings))

    def _get_max_mem_slots(self, msg: Message) -> Payload:
        return U64(MAX_MEM_SLOTS)

    def _replace_memory(self, change: Callable[[MappedMemory], None]) -> None:
        """Apply a memory-table change with every ring stopped around it, since rings hold views
        into the mappings; they restart at the same position once the change is done, and a
        ring that was only waiting for its memory starts."""
        self._stop_all()
        mem = self.memory if self.memory is not None else MappedMemory()
        try:
            change(mem)
        finally:
            self.memory = mem
            for v in self.vrings:
                self._update(v)

    def _set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        fresh = MappedMemory()
        try:
            for region, fd in zip(msg.payload.regions, msg.fds, strict=True):
                fresh.add(region, fd)
        except GuestMemoryError as e:
            fresh.close()
            raise MessageError(f"cannot map region: {e}") from None
        self._stop_all()
        if self.memory is not None:
            self.memory.close()
        self._forget_regions(list(self.region_fds))
        for region, fd in zip(msg.payload.regions, msg.fds, strict=True):
            self._keep_region(region, fd)
        self.memory = fresh
        for v in self.vrings:
            self._update(v)

    def _add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemoryRegion)
        region, fd = msg.payload.region, msg.fds[0]
        if self.memory is not None and len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise MessageError(
                f"region at guest 0x{region.guest_phys_addr:x}: all {MAX_MEM_SLOTS} memory "
                "slots (GET_MAX_MEM_SLOTS) are in use"
            )

        def add(mem: MappedMemory) -> None:
            try:
                mem.add(region, fd)
            except GuestMemoryError as e:
                raise MessageError(f"cannot map region: {e}") from None
            self._keep_region(region, fd)

        self._replace_memory(add)

    def _rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemoryRegion)
        region = msg.payload.region

        def remove(mem: MappedMemory) -> None:
            try:
                removed = mem.remove(region.guest_phys_addr, region.size,
                                     region.userspace_addr)
            except GuestMemoryError as e:
                raise MessageError(f"no such region: {e}") from None
            self._forget_regions([removed])

        self._replace_memory(remove)
        close_fds(msg.fds)

    def _set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        num = msg.payload.num
        limit = min(MAX_QUEUE_SIZE, self.device.max_queue_size)
        if num == 0 or num & (num - 1) or num > limit:
            raise MessageError(
                f"vring {vring.index}: size {num} is not a power of two in 1..{limit}"
            )
        if vring.started:
            raise MessageError(f"vring {vring.index}: cannot resize a started ring")
        vring.size = num
        self._update(vring)

    def _set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddr)
        vring = self._vring(msg.payload.index)
        addr = msg.payload
        if self.memory is not None and vring.size:
            # Refuse what can be checked now, rather than ack it and leave the ring dead.
            try:
                self.memory.translate_uva(addr.desc, 16 * vring.size)
                self.memory.translate_uva(addr.avail, 6 + 2 * vring.size)
                self.memory.translate_uva(addr.used, 6 + 8 * vring.size)
            except GuestMemoryError as e:
                raise MessageError(f"vring {vring.index}: ring outside guest memory: {e}") from None
        # A new address for a running ring moves it: stop, take the address, restart.
        self._stop(vring)
        vring.addr = addr
        self._update(vring)

    def _set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        if msg.payload.num > 0xFFFF:
            raise MessageError(
                f"vring {vring.index}: base {msg.payload.num} > 65535 (packed rings not offered)"
            )
        if vring.started:
            raise MessageError(f"vring {vring.index}: cannot set the base of a started ring")
        vring.base = vring.used_base = msg.payload.num

    def _get_vring_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        self._stop(vring)
        # The spec: the ring is stopped until the next SET_VRING_KICK.
        vring.set_fd("kick", None)
        return VringState(vring.index, vring.base)

    def _set_vring_file(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringFile)
        vring = self._vring(msg.payload.index)
        fd = msg.fds[0] if msg.fds else None
        if msg.request is Request.SET_VRING_KICK:
            if fd is None:
                raise MessageError(f"vring {vring.index}: polling mode (no kick fd) not supported")
            # A new kick fd for a running ring: the device must wait on the new one.
            self._stop(vring)
            vring.set_fd("kick", fd)
            self._update(vring)
        elif msg.request is Request.SET_VRING_CALL:
            vring.set_fd("call", fd)
        else:
            vring.set_fd("err", fd)

    def _set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        if msg.payload.num not in (0, 1):
            raise MessageError(f"vring {vring.index}: enable value {msg.payload.num} is not 0/1")
        vring.enabled = bool(msg.payload.num)
        self._update(vring)

    def _set_backend_req_fd(self, msg: Message) -> None:
        self._set_backend_req(msg.fds[0])

    def _set_backend_req(self, fd: int | None) -> None:
        if self.backend_req_fd is not None:
            self.custody("vu.req", None)
            close_fd(self.backend_req_fd)
        self.backend_req_fd = fd
        if fd is not None:
            self.custody("vu.req", fd)

    def _keep_region(self, region: Region, fd: int) -> None:
        name = f"vu.mem.{self._region_serial}"
        self._region_serial += 1
        self.region_fds[region] = (name, fd)
        self.custody(name, fd)

    def _forget_regions(self, regions: list[Region]) -> None:
        for region in regions:
            name, fd = self.region_fds.pop(region)
            self.custody(name, None)
            close_fd(fd)

    def _get_config(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, ConfigSpace)
        p = msg.payload
        data = self.device.get_config(p.offset, p.size)
        return ConfigSpace(p.offset, p.size, p.flags, data)

    def _set_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, ConfigSpace)
        self.device.set_config(msg.payload.offset, msg.payload.data)

    def _set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        if msg.payload.value > 0xFF:
            raise MessageError(f"status 0x{msg.payload.value:x} does not fit the status byte")
        self.status = msg.payload.value
        self.device.status_changed(self.status)

    def _set_device_state_fd(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, DeviceStateTransfer)
        fd = msg.fds[0]
        try:
            direction = TransferDirection(msg.payload.direction)
            TransferPhase(msg.payload.phase)
        except ValueError:
            close_fd(fd)
            raise MessageError(f"device state transfer {msg.payload}: unknown direction or "
                               "phase") from None
        running = [v.index for v in self.vrings if v.started]
        if running:
            close_fd(fd)
            log.warning("SET_DEVICE_STATE_FD: vrings %s still run; the device must be "
                        "suspended", running)
            return U64(TRANSFER_NO_FD | 1)
        data = self.device.save_state() if direction is TransferDirection.SAVE else None
        self._transfer, self._transfer_ok = Transfer(fd, data), None
        log.info("device state transfer: %s", direction.name)
        return U64(TRANSFER_NO_FD)

    def transfer_done(self, loaded: bytes | None, error: str | None = None) -> None:
        """The connection finished a Transfer: `loaded` is what a LOAD read."""
        if error is None and loaded is not None:
            try:
                self.device.load_state(loaded)
            except (ValueError, KeyError, TypeError) as e:
                error = f"the state does not load: {e}"
        if error is not None:
            log.error("device state transfer failed: %s", error)
        self._transfer_ok = error is None

    def _check_device_state(self, msg: Message) -> Payload:
        return U64(0 if self._transfer_ok else 1)

    def _get_status(self, msg: Message) -> Payload:
        return U64(self.status | (STATUS_NEEDS_RESET if self.needs_reset else 0))
