"""The console device's whole state, as plain data with one owner (`ConsoleCore`).

Everything the device knows of the guest and its ports is here: the negotiated features and
status, whether the guest driver is up, the control messages waiting for a guest buffer, and
per port its config, where its control handshake stands, its session state (G/H, the open
session's id, the next id), the host bytes staged for the guest and its counters. No trio, no
fds, no backend objects: `to_dict`/`from_dict` turn it into JSON-able data and back, which is
what a restarted daemon or a migration destination resumes from.

A port's ledger counters (the bytes and buffers that move with every chain, and the drop
totals) are stored in `PortCounters.cells`, eight i64s the daemon puts in a memfd of their
own in the fd store: like the staging buffer and the rings' positions they are stores into
a shared mapping, so a successor after a SIGKILL finds them exact, not as the last snapshot
had them. What the snapshot missed of the drops' reasons then shows as `unrecorded`.

Not here, on purpose: chains taken from the rings. A tx chain held while its port's backend
cannot take the bytes is given back to its ring when the ring stops, so it is the ring's
position (the vhost-user layer's state) that carries it.
"""

from __future__ import annotations

import base64
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol, overload

from .control import HEADER, ControlMessage, Event
from .handshake import Announce
from .session import State
from .staging import Staging

GuestWritePolicy = Literal["hold", "discard"]
Direction = Literal["to_guest", "from_guest"]
_COUNTS_BY_REASON = ("discarded", "bad_chains", "dropped_to_guest", "dropped_from_guest")
DEFAULT_STAGING = 64 * 1024
MAX_PORTS = 31  # virtio-console's multiport limit as QEMU's num_vqs allows (2 * 31 + 2)
VERSION = 1


class StateError(ValueError):
    """A serialized device state that is not one this version can resume."""


@dataclass(frozen=True, slots=True)
class Session:
    """One guest open of a port. Ids are monotonic per port and never reused."""

    port_id: int
    port_name: str
    id: int


@dataclass(frozen=True, slots=True)
class PortConfig:
    """What a port is: from the per-VM config file or the hotplug API."""

    id: int
    name: str = ""
    console: bool = False
    # Guest writes while no host peer is attached: `hold` blocks the guest's write,
    # `discard` drops the bytes (counted).
    guest_writes_without_host: GuestWritePolicy = "hold"
    staging_limit: int = DEFAULT_STAGING


# The counters in `PortCounters.cells`, in this order (a stored layout: append only).
CELLS = ("bytes_to_guest", "buffers_to_guest", "bytes_from_guest", "buffers_from_guest",
         "bytes_from_host", "bytes_guest_wrote", "dropped_to_guest_total",
         "dropped_from_guest_total")
CELLS_SIZE = 8 * len(CELLS)


class _Cell:
    """A PortCounters count stored in its `cells` (which a shared mapping may back)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._i = CELLS.index(name)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> int: ...
    @overload
    def __get__(self, obj: PortCounters, owner: type | None = None) -> int: ...
    def __get__(self, obj: PortCounters | None, owner: type | None = None) -> int:
        return 0 if obj is None else obj.cells[self._i]  # the default, for the dataclass

    def __set__(self, obj: PortCounters, value: int) -> None:
        obj.cells[self._i] = value


class _Closable(Protocol):
    def close(self) -> None: ...


@dataclass
class PortCounters:
    """Per-port counters, readable through the API."""

    bytes_to_guest: _Cell = _Cell()
    buffers_to_guest: _Cell = _Cell()
    bytes_from_guest: _Cell = _Cell()
    buffers_from_guest: _Cell = _Cell()
    sessions_opened: int = 0
    resets_seen: int = 0
    redundant_events: int = 0
    backend_failures: int = 0  # the port's backend raised (see console.device)
    # bytes dropped, by reason: guest-closed (host→guest while ¬G), no-host (guest→host with
    # the discard policy), stale (queued for a session that ended), console-overflow,
    # no-session (guest wrote after the host ended its session), too-long (a tx chain over
    # MAX_TX_CHAIN_BYTES, completed unread), backend-failed (the backend raised taking them,
    # or a console's backend was down)
    discarded: Counter[str] = field(default_factory=Counter)
    # The ledger, per direction (see `ledger`): what the port took in, what it dropped.
    bytes_from_host: _Cell = _Cell()  # host bytes accepted: staged, or dropped at once
    bytes_guest_wrote: _Cell = _Cell()  # guest bytes of every tx chain completed
    dropped_to_guest: Counter[str] = field(default_factory=Counter)
    dropped_from_guest: Counter[str] = field(default_factory=Counter)
    dropped_to_guest_total: _Cell = _Cell()
    dropped_from_guest_total: _Cell = _Cell()

    def __post_init__(self) -> None:
        self._backing: _Closable | None = None

    @property
    def cells(self) -> memoryview:
        try:
            return self.__dict__["cells"]  # type: ignore[no-any-return]
        except KeyError:  # the dataclass's __init__ sets the first count: made then
            self.__dict__["cells"] = view = memoryview(bytearray(CELLS_SIZE)).cast("q")
            return view

    def share(self, cells: memoryview, backing: _Closable, *, newer: bool) -> None:
        """Keep the cells in `cells` (eight i64s of a shared mapping; `backing.close()` at
        the end): with `newer` they hold the counts (a predecessor's, after its last
        snapshot), else they are given these."""
        if not newer:
            cells[:] = self.cells
        self.__dict__["cells"] = cells
        self._backing = backing

    def close(self) -> None:
        """The port is gone: its cells too."""
        self.__dict__["cells"] = memoryview(bytearray(self.cells)).cast("q")
        if self._backing is not None:
            self._backing.close()
            self._backing = None

    def drop(self, direction: Direction, reason: str, n: int) -> None:
        """`n` bytes going `direction` dropped for `reason` (counted both ways: by reason
        as ever, and in the direction's ledger)."""
        self.discarded[reason] += n
        if direction == "to_guest":
            self.dropped_to_guest[reason] += n
            self.dropped_to_guest_total += n
        else:
            self.dropped_from_guest[reason] += n
            self.dropped_from_guest_total += n

    def dropped(self, direction: Direction) -> Counter[str]:
        """What went `direction` and was dropped, by reason; bytes whose reason a SIGKILL
        took before a snapshot recorded it (the total is exact) as `unrecorded`."""
        by_reason, total = ((self.dropped_to_guest, self.dropped_to_guest_total)
                            if direction == "to_guest" else
                            (self.dropped_from_guest, self.dropped_from_guest_total))
        out = Counter(by_reason)
        if total > sum(by_reason.values()):
            out["unrecorded"] += total - sum(by_reason.values())
        return out

    def as_dict(self) -> dict[str, object]:
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v
                for f in fields(self)}


@dataclass
class PortState:
    config: PortConfig
    session: State = State.B
    announce: Announce = Announce.UNKNOWN
    session_id: int | None = None  # the open session (states A and D)
    next_session_id: int = 1
    staging: Staging = None  # type: ignore[assignment]  # host bytes for the guest
    counters: PortCounters = field(default_factory=PortCounters)

    def __post_init__(self) -> None:
        if self.staging is None:
            self.staging = Staging.in_memory(self.config.staging_limit)

    @property
    def guest_ready(self) -> bool:
        """The guest answered DEVICE_ADD with PORT_READY(1)."""
        return self.announce is Announce.READY

    def ledger(self) -> dict[str, dict[str, Any]]:
        """Every byte accounted, per direction: what came in is what went out, was dropped
        (by reason) or is still on its way."""
        c = self.counters

        def entry(accepted: int, delivered: int, dropped: Counter[str],
                  pending: int) -> dict[str, Any]:
            return {"accepted": accepted, "delivered": delivered, "dropped": dict(dropped),
                    "pending": pending,
                    "balanced": accepted == delivered + sum(dropped.values()) + pending}

        return {
            "to_guest": entry(c.bytes_from_host, c.bytes_to_guest, c.dropped("to_guest"),
                              len(self.staging)),
            "from_guest": entry(c.bytes_guest_wrote, c.bytes_from_guest,
                                c.dropped("from_guest"), 0),
        }

    @property
    def current_session(self) -> Session | None:
        if self.session_id is None:
            return None
        return Session(self.config.id, self.config.name, self.session_id)


@dataclass
class DeviceCounters:
    control_from_guest: int = 0
    control_to_guest: int = 0
    control_overflow: int = 0  # control messages dropped because MAX_PENDING_CONTROL was hit
    bad_control: int = 0  # unparsable, unknown port, out of order
    device_ready: int = 0
    bytes_on_missing_ports: int = 0
    backend_failures: int = 0
    bad_chains: dict[str, int] = field(default_factory=dict)  # by kind, completed unread
    rings_broken: int = 0  # port rings the guest broke (RingError), contained to the port

    def as_dict(self) -> dict[str, object]:
        return dict(vars(self))


@dataclass
class DeviceState:
    max_ports: int
    cols: int = 80
    rows: int = 25
    resize_rows_first: bool = False
    acked_features: int = 0
    status: int = 0
    driver_ready: bool = False  # the guest sent DEVICE_READY(1) since the last reset
    # The control tx ring's avail position after the last message handled: a successor that
    # takes a message again from before it completes it without handling it twice (a second
    # DEVICE_READY would be a reset).
    control_tx_handled: int = 0
    control_out: deque[ControlMessage] = field(default_factory=deque)
    ports: dict[int, PortState] = field(default_factory=dict)
    counters: DeviceCounters = field(default_factory=DeviceCounters)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ints, strings, bools, lists and dicts only."""
        return {
            "version": VERSION,
            "max_ports": self.max_ports,
            "cols": self.cols,
            "rows": self.rows,
            "resize_rows_first": self.resize_rows_first,
            "acked_features": self.acked_features,
            "status": self.status,
            "driver_ready": self.driver_ready,
            "control_tx_handled": self.control_tx_handled,
            "control_out": [_b64(m.pack()) for m in self.control_out],
            "ports": {str(pid): _port_to_dict(p) for pid, p in sorted(self.ports.items())},
            "counters": asdict(self.counters),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> DeviceState:
        """The state `to_dict` made; StateError names what does not fit."""
        r = _Fields(doc, "device state")
        if r.get("version", int) != VERSION:
            raise StateError(f"device state version {doc.get('version')!r}, this daemon "
                             f"resumes version {VERSION}")
        max_ports = r.get("max_ports", int)
        if not 1 <= max_ports <= MAX_PORTS:
            raise StateError(f"device state: max_ports {max_ports} not in 1..{MAX_PORTS}")
        state = cls(
            max_ports=max_ports,
            cols=r.get("cols", int),
            rows=r.get("rows", int),
            resize_rows_first=r.get("resize_rows_first", bool),
            acked_features=r.get("acked_features", int),
            status=r.get("status", int),
            driver_ready=r.get("driver_ready", bool),
            control_tx_handled=r.get("control_tx_handled", int) & 0xFFFF,
            counters=_counters(DeviceCounters, r.get("counters", dict), "device counters"),
        )
        for i, raw in enumerate(r.get("control_out", list)):
            state.control_out.append(_control(raw, f"control_out[{i}]"))
        for key, value in r.get("ports", dict).items():
            port = _port_from_dict(value, f"port {key}")
            if str(port.config.id) != key or port.config.id >= max_ports:
                raise StateError(f"device state: port {key} has id {port.config.id}")
            state.ports[port.config.id] = port
        return state


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except ValueError:
        raise StateError(f"device state: {where}: not base64") from None


def _port_to_dict(p: PortState) -> dict[str, Any]:
    return {
        "config": asdict(p.config),
        "session": p.session.value,
        "announce": p.announce.value,
        "session_id": p.session_id,
        "next_session_id": p.next_session_id,
        "staging": _b64(p.staging.data()),
        "counters": p.counters.as_dict(),
    }


class _Fields:
    """Typed reads from one dict of a serialized state, with errors naming the field."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise StateError(f"{where}: expected an object, got {type(doc).__name__}")
        self.doc, self.where = doc, where

    def get(self, key: str, kind: type, *, optional: bool = False) -> Any:
        value = self.doc.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StateError(f"{self.where}: {key}: expected {kind.__name__}, got {value!r}")
        return value


def _control(raw: Any, where: str) -> ControlMessage:
    if not isinstance(raw, str):
        raise StateError(f"device state: {where}: expected base64 text")
    data = _unb64(raw, where)
    if len(data) < HEADER.size:
        raise StateError(f"device state: {where}: {len(data)} bytes, need {HEADER.size}")
    id_, event, value = HEADER.unpack_from(data)
    try:
        return ControlMessage(id_, Event(event), value, data[HEADER.size:])
    except ValueError:
        raise StateError(f"device state: {where}: unknown event {event}") from None


def _counters(cls: type[Any], doc: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    if not set(doc) <= known:
        raise StateError(f"device state: {where}: unknown counters {sorted(set(doc) - known)}")
    out = cls()
    for key, value in doc.items():
        if key in _COUNTS_BY_REASON:
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in value.items()
            ):
                raise StateError(f"device state: {where}: {key}: expected counts by reason")
            setattr(out, key, dict(value) if key == "bad_chains" else Counter(value))
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            setattr(out, key, value)
        else:
            raise StateError(f"device state: {where}: {key}: expected a count, got {value!r}")
    return out


def _port_from_dict(doc: Any, where: str) -> PortState:
    r = _Fields(doc, f"device state: {where}")
    c = _Fields(r.get("config", dict), f"device state: {where}: config")
    policy = c.get("guest_writes_without_host", str)
    if policy not in ("hold", "discard"):
        raise StateError(f"device state: {where}: guest_writes_without_host {policy!r}")
    config = PortConfig(
        id=c.get("id", int), name=c.get("name", str), console=c.get("console", bool),
        guest_writes_without_host=policy, staging_limit=c.get("staging_limit", int),
    )
    try:
        session, announce = State(r.get("session", str)), Announce(r.get("announce", str))
    except ValueError as e:
        raise StateError(f"device state: {where}: {e}") from None
    session_id = r.get("session_id", int, optional=True)
    next_id = r.get("next_session_id", int)
    if session.in_session != (session_id is not None) or next_id < 1 or (
        session_id is not None and not 1 <= session_id < next_id
    ):
        raise StateError(f"device state: {where}: session {session.name} with id "
                         f"{session_id!r} and next id {next_id}")
    staged = _unb64(r.get("staging", str), f"{where}: staging")
    if len(staged) > config.staging_limit:
        raise StateError(f"device state: {where}: {len(staged)} staged bytes over the "
                         f"port's limit {config.staging_limit}")
    return PortState(
        config=config, session=session, announce=announce, session_id=session_id,
        next_session_id=next_id, staging=Staging.in_memory(config.staging_limit, staged),
        counters=_port_counters(r.get("counters", dict), f"{where} counters"),
    )


def _port_counters(doc: dict[str, Any], where: str) -> PortCounters:
    c: PortCounters = _counters(PortCounters, doc, where)
    # A predecessor from before the drop totals: its reasons are all there was.
    if "dropped_to_guest_total" not in doc:
        c.dropped_to_guest_total = sum(c.dropped_to_guest.values())
    if "dropped_from_guest_total" not in doc:
        c.dropped_from_guest_total = sum(c.dropped_from_guest.values())
    return c
