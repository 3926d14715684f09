"""Every vhost-user request code, flag, feature bit and payload struct, in one place.

Sans-io: this module turns bytes into typed messages and back, and checks each message against
the request table (payload type, exact size, how many fds it may carry) before any handler sees
it. The table also says what kind each fd must be; that takes system calls, so the back end
checks it (`VhostUserBackend.receive`, with `fds.accept_fd`) right after `decode`. Numbers
follow QEMU's docs/interop/vhost-user.rst.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from virtqueue import Region

from ..fds import FdKind
from .errors import FramingError, MessageError, UnknownRequestError


class Request(enum.IntEnum):
    """Front-end → back-end requests."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end → front-end requests, sent on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# The virtio feature bit that says "this back end speaks protocol features"; it shares the
# GET/SET_FEATURES word with the device's virtio features.
F_PROTOCOL_FEATURES = 1 << 30

FLAG_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
# Bits of the u64 vring-file payload (SET_VRING_KICK/CALL/ERR).
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

HEADER = struct.Struct("<III")
# Nothing we accept is longer than GET/SET_CONFIG with a full 256-byte config space; a length
# beyond this bound is not a message we could ever parse, so the stream is out of sync.
MAX_PAYLOAD_SIZE = 4096
MAX_CONFIG_SIZE = 256
# A message carries at most this many fds (SET_MEM_TABLE's baseline region count).
MAX_FDS = 8
MAX_MEM_REGIONS = 8


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed 12-byte message header."""

    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        request, flags, size = HEADER.unpack(data)
        if flags & FLAG_VERSION_MASK != FLAG_VERSION:
            raise FramingError(
                f"header of {request_name(request)}: version bits 0x{flags & 3:x}, want 0x1"
            )
        if size > MAX_PAYLOAD_SIZE:
            raise FramingError(
                f"header of {request_name(request)}: payload size {size} > {MAX_PAYLOAD_SIZE}"
            )
        return cls(request, flags, size)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def request_name(code: int) -> str:
    """A request's name for log lines, also for codes we do not know."""
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


# --------------------------------------------------------------------------- payloads


class Payload:
    """A message body with an exact wire format."""

    SIZE: ClassVar[int | None] = 0  # None: variable size, checked by unpack itself

    @classmethod
    def unpack(cls, body: bytes) -> Self:
        raise NotImplementedError

    def pack(self) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """No body."""

    SIZE: ClassVar[int | None] = 0

    @classmethod
    def unpack(cls, body: bytes) -> Empty:
        return cls()

    def pack(self) -> bytes:
        return b""


_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """A single little-endian u64 (features, status, acks, counts)."""

    SIZE: ClassVar[int | None] = 8
    value: int

    @classmethod
    def unpack(cls, body: bytes) -> U64:
        return cls(_U64.unpack(body)[0])

    def pack(self) -> bytes:
        return _U64.pack(self.value)


_VRING_STATE = struct.Struct("<II")
_TRANSFER = struct.Struct("<II")


class TransferDirection(enum.IntEnum):
    SAVE = 0  # the back end writes its state (migration source)
    LOAD = 1  # the back end reads it (destination)


class TransferPhase(enum.IntEnum):
    STOPPED = 0  # the only phase defined: every ring suspended


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(Payload):
    """SET_DEVICE_STATE_FD: `direction, phase` of the transfer over the fd that comes with it."""

    SIZE: ClassVar[int | None] = 8
    direction: int
    phase: int

    @classmethod
    def unpack(cls, body: bytes) -> DeviceStateTransfer:
        return cls(*_TRANSFER.unpack(body))

    def pack(self) -> bytes:
        return _TRANSFER.pack(self.direction, self.phase)


@dataclass(frozen=True, slots=True)
class VringState(Payload):
    """`index, num`: SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE."""

    SIZE: ClassVar[int | None] = 8
    index: int
    num: int

    @classmethod
    def unpack(cls, body: bytes) -> VringState:
        return cls(*_VRING_STATE.unpack(body))

    def pack(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)


_VRING_ADDR = struct.Struct("<IIQQQQ")


@dataclass(frozen=True, slots=True)
class VringAddr(Payload):
    """SET_VRING_ADDR: ring addresses in the front end's virtual address space."""

    SIZE: ClassVar[int | None] = 40
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    @classmethod
    def unpack(cls, body: bytes) -> VringAddr:
        return cls(*_VRING_ADDR.unpack(body))

    def pack(self) -> bytes:
        return _VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True, slots=True)
class VringFile(Payload):
    """SET_VRING_KICK/CALL/ERR: a vring index plus "no fd follows" (polling) bit."""

    SIZE: ClassVar[int | None] = 8
    index: int
    no_fd: bool

    @classmethod
    def unpack(cls, body: bytes) -> VringFile:
        (value,) = _U64.unpack(body)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise MessageError(f"vring file word 0x{value:x} has unknown bits set")
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK))

    def pack(self) -> bytes:
        return _U64.pack(self.index | (VRING_NOFD_MASK if self.no_fd else 0))


_REGION = struct.Struct("<QQQQ")
_U32_PAIR = struct.Struct("<II")


def _unpack_region(body: bytes, offset: int) -> Region:
    gpa, size, uva, mmap_offset = _REGION.unpack_from(body, offset)
    return Region(gpa, size, uva, mmap_offset)


def _pack_region(r: Region) -> bytes:
    return _REGION.pack(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)


@dataclass(frozen=True, slots=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE: `u32 nregions, u32 padding`, then nregions regions of 32 bytes."""

    SIZE: ClassVar[int | None] = None
    regions: tuple[Region, ...]

    @classmethod
    def unpack(cls, body: bytes) -> MemoryTable:
        if len(body) < 8:
            raise MessageError(f"memory table body is {len(body)} bytes, need at least 8")
        nregions, _padding = _U32_PAIR.unpack_from(body)
        if nregions > MAX_MEM_REGIONS:
            raise MessageError(f"memory table has {nregions} regions, at most {MAX_MEM_REGIONS}")
        if len(body) != 8 + 32 * nregions:
            raise MessageError(
                f"memory table of {nregions} regions is {len(body)} bytes, "
                f"want {8 + 32 * nregions}"
            )
        return cls(tuple(_unpack_region(body, 8 + 32 * i) for i in range(nregions)))

    def pack(self) -> bytes:
        return _U32_PAIR.pack(len(self.regions), 0) + b"".join(map(_pack_region, self.regions))


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion(Payload):
    """ADD_MEM_REG / REM_MEM_REG: `u64 padding` then one region."""

    SIZE: ClassVar[int | None] = 40
    region: Region

    @classmethod
    def unpack(cls, body: bytes) -> SingleMemoryRegion:
        return cls(_unpack_region(body, 8))

    def pack(self) -> bytes:
        return _U64.pack(0) + _pack_region(self.region)


_CONFIG_HEAD = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class ConfigSpace(Payload):
    """GET/SET_CONFIG: `u32 offset, u32 size, u32 flags` then `size` bytes of config space."""

    SIZE: ClassVar[int | None] = None
    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def unpack(cls, body: bytes) -> ConfigSpace:
        if len(body) < 12:
            raise MessageError(f"config body is {len(body)} bytes, need at least 12")
        offset, size, flags = _CONFIG_HEAD.unpack_from(body)
        if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
            raise MessageError(f"config range offset {offset} size {size} exceeds 256 bytes")
        if len(body) != 12 + size:
            raise MessageError(
                f"config body is {len(body)} bytes for size {size}, want {12 + size}"
            )
        return cls(offset, size, flags, bytes(body[12:]))

    def pack(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data


# --------------------------------------------------------------------------- request table


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What one request may look like on the wire, checked before its handler runs."""

    payload: type[Payload]
    max_fds: int = 0
    min_fds: int = 0
    # What each fd must be, checked (and the fd made non-blocking) at receipt; None: any,
    # for an fd that is only closed.
    fd_kind: FdKind | None = None
    # The payload type of the request's own reply; None: only a REPLY_ACK ack, if asked for.
    reply: type[Payload] | None = None


# Requests we do not list are answered as unknown: the table is the whole supported surface.
REQUESTS: dict[Request, RequestSpec] = {
    Request.GET_FEATURES: RequestSpec(Empty, reply=U64),
    Request.SET_FEATURES: RequestSpec(U64),
    Request.SET_OWNER: RequestSpec(Empty),
    Request.RESET_OWNER: RequestSpec(Empty),
    Request.SET_MEM_TABLE: RequestSpec(MemoryTable, max_fds=MAX_MEM_REGIONS,
                                       fd_kind=FdKind.MEMORY),
    Request.SET_VRING_NUM: RequestSpec(VringState),
    Request.SET_VRING_ADDR: RequestSpec(VringAddr),
    Request.SET_VRING_BASE: RequestSpec(VringState),
    Request.GET_VRING_BASE: RequestSpec(VringState, reply=VringState),
    Request.SET_VRING_KICK: RequestSpec(VringFile, max_fds=1, fd_kind=FdKind.EVENTFD),
    Request.SET_VRING_CALL: RequestSpec(VringFile, max_fds=1, fd_kind=FdKind.EVENTFD),
    Request.SET_VRING_ERR: RequestSpec(VringFile, max_fds=1, fd_kind=FdKind.EVENTFD),
    Request.GET_PROTOCOL_FEATURES: RequestSpec(Empty, reply=U64),
    Request.SET_PROTOCOL_FEATURES: RequestSpec(U64),
    Request.GET_QUEUE_NUM: RequestSpec(Empty, reply=U64),
    Request.SET_VRING_ENABLE: RequestSpec(VringState),
    Request.SET_BACKEND_REQ_FD: RequestSpec(Empty, min_fds=1, max_fds=1,
                                            fd_kind=FdKind.UNIX_STREAM),
    Request.GET_CONFIG: RequestSpec(ConfigSpace, reply=ConfigSpace),
    Request.SET_CONFIG: RequestSpec(ConfigSpace),
    Request.RESET_DEVICE: RequestSpec(Empty),
    Request.GET_MAX_MEM_SLOTS: RequestSpec(Empty, reply=U64),
    Request.ADD_MEM_REG: RequestSpec(SingleMemoryRegion, min_fds=1, max_fds=1,
                                     fd_kind=FdKind.MEMORY),
    # Older QEMUs attach the region's fd to REM_MEM_REG too; it is accepted and closed.
    Request.REM_MEM_REG: RequestSpec(SingleMemoryRegion, max_fds=1),
    Request.SET_STATUS: RequestSpec(U64),
    Request.GET_STATUS: RequestSpec(Empty, reply=U64),
    Request.SET_DEVICE_STATE_FD: RequestSpec(DeviceStateTransfer, max_fds=1, min_fds=1,
                                             fd_kind=FdKind.STREAM, reply=U64),
    Request.CHECK_DEVICE_STATE: RequestSpec(Empty, reply=U64),
}


@dataclass(frozen=True, slots=True)
class Message:
    """One validated front-end request. `fds` are owned by whoever holds the message."""

    request: Request
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def spec(self) -> RequestSpec:
        return REQUESTS[self.request]


def decode(header: Header, body: bytes, fds: Sequence[int]) -> Message:
    """Check one framed request against the table and parse its payload.

    Raises UnknownRequestError for codes outside the table and MessageError for a body size or
    fd count the request does not allow. Never closes fds: the caller owns them either way.
    """
    try:
        request = Request(header.request)
        spec = REQUESTS[request]
    except (ValueError, KeyError):
        raise UnknownRequestError(header.request) from None
    name = request.name
    if header.flags & FLAG_REPLY:
        raise MessageError(f"{name}: the front end sent a message flagged as a reply")
    if spec.payload.SIZE is not None and len(body) != spec.payload.SIZE:
        raise MessageError(f"{name}: body is {len(body)} bytes, want {spec.payload.SIZE}")
    if not spec.min_fds <= len(fds) <= spec.max_fds:
        want = (
            str(spec.max_fds) if spec.min_fds == spec.max_fds else f"{spec.min_fds}..{spec.max_fds}"
        )
        raise MessageError(f"{name}: carries {len(fds)} fds, want {want}")
    try:
        payload = spec.payload.unpack(body)
    except MessageError as e:
        raise MessageError(f"{name}: {e}") from None
    if isinstance(payload, MemoryTable) and len(payload.regions) != len(fds):
        raise MessageError(
            f"{name}: {len(payload.regions)} regions but {len(fds)} fds; each region needs its fd"
        )
    if isinstance(payload, VringFile) and len(fds) != (0 if payload.no_fd else 1):
        raise MessageError(
            f"{name}: vring {payload.index} no-fd bit is {int(payload.no_fd)} "
            f"but {len(fds)} fds came with it"
        )
    return Message(request, header.flags, payload, tuple(fds))


def encode(request: int, payload: Payload | bytes = b"", *, flags: int = 0) -> bytes:
    """One message on the wire: header (version bits added) and body."""
    body = payload if isinstance(payload, bytes) else payload.pack()
    return HEADER.pack(request, FLAG_VERSION | flags, len(body)) + body


def encode_reply(request: int, payload: Payload) -> bytes:
    return encode(request, payload, flags=FLAG_REPLY)
