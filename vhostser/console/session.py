"""Per-port session state machine, as a transition table (h2's stream.py is the model).

Two facts per port: G (the guest has it open: guest PORT_OPEN) and H (a host peer is
attached: sent to the guest as host PORT_OPEN). A *session* is one guest open: it starts at
G 0→1 (or when a host peer attaches to a guest open whose session the host ended) and ends at
G 1→0, a device reset, port removal, an explicit host close, the front end staying away past
its grace period, or daemon shutdown.

States (seeds/001's matrix, plus one):
    B: ¬G ¬H        C: ¬G H         D: G ¬H, session open      A: G H, session open
    E: G ¬H, no session — the host ended the session; the guest's fd is still open and gets
       EOF. A peer attaching again starts a new session, so no byte of the old one is ever
       handed to it.

`transition(state, input)` returns the next state and the effects, in order. A pair that is
not in the table is a SessionError: the caller's bug, never the guest's (the guest's
redundant messages, like the PORT_OPEN(1) Linux re-sends after freeze/restore, have explicit
entries with the REDUNDANT effect).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    A = "A"  # G H, session
    B = "B"  # ¬G ¬H
    C = "C"  # ¬G H
    D = "D"  # G ¬H, session
    E = "E"  # G ¬H, session ended by the host

    @property
    def guest_open(self) -> bool:
        return self in (State.A, State.D, State.E)

    @property
    def host_open(self) -> bool:
        return self in (State.A, State.C)

    @property
    def in_session(self) -> bool:
        return self in (State.A, State.D)


class Input(enum.Enum):
    GUEST_OPEN = "guest-open"  # guest PORT_OPEN(1)
    GUEST_CLOSE = "guest-close"  # guest PORT_OPEN(0)
    HOST_OPEN = "host-open"  # a host peer attached
    HOST_CLOSE = "host-close"  # the host peer left; the session goes on (classic chardev)
    HOST_END = "host-end"  # the host ends the session (backend, admin API)
    RESET = "reset"  # the guest driver re-initialised the device, or RESET_DEVICE
    REMOVE = "port-removed"  # the port is hot-unplugged
    FRONTEND_GONE = "frontend-gone"  # the front end stayed away past the grace period
    SHUTDOWN = "shutdown"  # the daemon stops


class Reason(enum.Enum):
    """Why a session closed, as backends and log lines see it."""

    GUEST_CLOSE = "guest-close"
    RESET = "reset"
    PORT_REMOVED = "port-removed"
    HOST_CLOSE = "host-close"
    FRONTEND_GONE = "frontend-gone"
    SHUTDOWN = "shutdown"


class Effect(enum.Enum):
    OPEN_SESSION = "open-session"  # new id, backend open(session)
    CLOSE_SESSION = "close-session"  # backend close(session, reason); drop its queued bytes
    TELL_GUEST_OPEN = "tell-guest-open"  # host PORT_OPEN(1)
    TELL_GUEST_CLOSED = "tell-guest-closed"  # host PORT_OPEN(0)
    REDUNDANT = "redundant"  # nothing changes; counted


class SessionError(RuntimeError):
    """An input the state machine has no transition for."""


@dataclass(frozen=True, slots=True)
class Step:
    state: State
    effects: tuple[Effect, ...] = ()
    reason: Reason | None = None  # set with CLOSE_SESSION


S, In, X = State, Input, Effect
_OPEN, _CLOSE = X.OPEN_SESSION, X.CLOSE_SESSION
_TELL1, _TELL0, _NOP = X.TELL_GUEST_OPEN, X.TELL_GUEST_CLOSED, X.REDUNDANT


def _closed(state: State, reason: Reason, *extra: Effect) -> Step:
    return Step(state, (*extra, _CLOSE), reason)


# REMOVE leads to B: the port object is dropped by the caller afterwards.
TABLE: dict[tuple[State, Input], Step] = {
    # B: nobody
    (S.B, In.GUEST_OPEN): Step(S.D, (_OPEN,)),
    (S.B, In.GUEST_CLOSE): Step(S.B, (_NOP,)),
    (S.B, In.HOST_OPEN): Step(S.C, (_TELL1,)),
    (S.B, In.HOST_CLOSE): Step(S.B, (_NOP,)),
    (S.B, In.HOST_END): Step(S.B, (_NOP,)),
    (S.B, In.RESET): Step(S.B),
    (S.B, In.REMOVE): Step(S.B),
    (S.B, In.FRONTEND_GONE): Step(S.B),
    (S.B, In.SHUTDOWN): Step(S.B),
    # C: host peer waiting for the guest
    (S.C, In.GUEST_OPEN): Step(S.A, (_OPEN,)),
    (S.C, In.GUEST_CLOSE): Step(S.C, (_NOP,)),
    (S.C, In.HOST_OPEN): Step(S.C, (_NOP,)),
    (S.C, In.HOST_CLOSE): Step(S.B, (_TELL0,)),
    (S.C, In.HOST_END): Step(S.B, (_TELL0,)),
    (S.C, In.RESET): Step(S.C),
    (S.C, In.REMOVE): Step(S.B),
    (S.C, In.FRONTEND_GONE): Step(S.C),
    (S.C, In.SHUTDOWN): Step(S.C),
    # D: guest open, no host peer (its writes are held or discarded, per port policy)
    (S.D, In.GUEST_OPEN): Step(S.D, (_NOP,)),
    (S.D, In.GUEST_CLOSE): _closed(S.B, Reason.GUEST_CLOSE),
    (S.D, In.HOST_OPEN): Step(S.A, (_TELL1,)),
    (S.D, In.HOST_CLOSE): Step(S.D, (_NOP,)),
    (S.D, In.HOST_END): _closed(S.E, Reason.HOST_CLOSE),
    (S.D, In.RESET): _closed(S.B, Reason.RESET),
    (S.D, In.REMOVE): _closed(S.B, Reason.PORT_REMOVED),
    (S.D, In.FRONTEND_GONE): _closed(S.B, Reason.FRONTEND_GONE),
    (S.D, In.SHUTDOWN): _closed(S.E, Reason.SHUTDOWN),
    # A: both sides open
    (S.A, In.GUEST_OPEN): Step(S.A, (_NOP,)),
    (S.A, In.GUEST_CLOSE): _closed(S.C, Reason.GUEST_CLOSE),
    (S.A, In.HOST_OPEN): Step(S.A, (_NOP,)),
    (S.A, In.HOST_CLOSE): Step(S.D, (_TELL0,)),
    (S.A, In.HOST_END): _closed(S.E, Reason.HOST_CLOSE, _TELL0),
    (S.A, In.RESET): _closed(S.C, Reason.RESET),
    (S.A, In.REMOVE): _closed(S.B, Reason.PORT_REMOVED),
    (S.A, In.FRONTEND_GONE): _closed(S.C, Reason.FRONTEND_GONE),
    (S.A, In.SHUTDOWN): _closed(S.E, Reason.SHUTDOWN, _TELL0),
    # E: the host ended the session; the guest still holds the port open
    (S.E, In.GUEST_OPEN): Step(S.E, (_NOP,)),
    (S.E, In.GUEST_CLOSE): Step(S.B),
    (S.E, In.HOST_OPEN): Step(S.A, (_TELL1, _OPEN)),
    (S.E, In.HOST_CLOSE): Step(S.E, (_NOP,)),
    (S.E, In.HOST_END): Step(S.E, (_NOP,)),
    (S.E, In.RESET): Step(S.B),
    (S.E, In.REMOVE): Step(S.B),
    (S.E, In.FRONTEND_GONE): Step(S.B),
    (S.E, In.SHUTDOWN): Step(S.E),
}


def transition(state: State, event: Input) -> Step:
    try:
        return TABLE[(state, event)]
    except KeyError:
        raise SessionError(f"no transition from {state.name} on {event.value}") from None
