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
class SessionStep:
    state: State
    effects: tuple[Effect, ...] = ()
    reason: Reason | None = None  # set with CLOSE_SESSION


_OPEN, _CLOSE = Effect.OPEN_SESSION, Effect.CLOSE_SESSION
_TELL1, _TELL0, _NOP = Effect.TELL_GUEST_OPEN, Effect.TELL_GUEST_CLOSED, Effect.REDUNDANT


def _closed(state: State, reason: Reason, *extra: Effect) -> SessionStep:
    return SessionStep(state, (*extra, _CLOSE), reason)


# REMOVE leads to B: the port object is dropped by the caller afterwards.
TABLE: dict[tuple[State, Input], SessionStep] = {
    # B: nobody
    (State.B, Input.GUEST_OPEN): SessionStep(State.D, (_OPEN,)),
    (State.B, Input.GUEST_CLOSE): SessionStep(State.B, (_NOP,)),
    (State.B, Input.HOST_OPEN): SessionStep(State.C, (_TELL1,)),
    (State.B, Input.HOST_CLOSE): SessionStep(State.B, (_NOP,)),
    (State.B, Input.HOST_END): SessionStep(State.B, (_NOP,)),
    (State.B, Input.RESET): SessionStep(State.B),
    (State.B, Input.REMOVE): SessionStep(State.B),
    (State.B, Input.FRONTEND_GONE): SessionStep(State.B),
    (State.B, Input.SHUTDOWN): SessionStep(State.B),
    # C: host peer waiting for the guest
    (State.C, Input.GUEST_OPEN): SessionStep(State.A, (_OPEN,)),
    (State.C, Input.GUEST_CLOSE): SessionStep(State.C, (_NOP,)),
    (State.C, Input.HOST_OPEN): SessionStep(State.C, (_NOP,)),
    (State.C, Input.HOST_CLOSE): SessionStep(State.B, (_TELL0,)),
    (State.C, Input.HOST_END): SessionStep(State.B, (_TELL0,)),
    (State.C, Input.RESET): SessionStep(State.C),
    (State.C, Input.REMOVE): SessionStep(State.B),
    (State.C, Input.FRONTEND_GONE): SessionStep(State.C),
    (State.C, Input.SHUTDOWN): SessionStep(State.C),
    # D: guest open, no host peer (its writes are held or discarded, per port policy)
    (State.D, Input.GUEST_OPEN): SessionStep(State.D, (_NOP,)),
    (State.D, Input.GUEST_CLOSE): _closed(State.B, Reason.GUEST_CLOSE),
    (State.D, Input.HOST_OPEN): SessionStep(State.A, (_TELL1,)),
    (State.D, Input.HOST_CLOSE): SessionStep(State.D, (_NOP,)),
    (State.D, Input.HOST_END): _closed(State.E, Reason.HOST_CLOSE),
    (State.D, Input.RESET): _closed(State.B, Reason.RESET),
    (State.D, Input.REMOVE): _closed(State.B, Reason.PORT_REMOVED),
    (State.D, Input.FRONTEND_GONE): _closed(State.B, Reason.FRONTEND_GONE),
    (State.D, Input.SHUTDOWN): _closed(State.E, Reason.SHUTDOWN),
    # A: both sides open
    (State.A, Input.GUEST_OPEN): SessionStep(State.A, (_NOP,)),
    (State.A, Input.GUEST_CLOSE): _closed(State.C, Reason.GUEST_CLOSE),
    (State.A, Input.HOST_OPEN): SessionStep(State.A, (_NOP,)),
    (State.A, Input.HOST_CLOSE): SessionStep(State.D, (_TELL0,)),
    (State.A, Input.HOST_END): _closed(State.E, Reason.HOST_CLOSE, _TELL0),
    (State.A, Input.RESET): _closed(State.C, Reason.RESET),
    (State.A, Input.REMOVE): _closed(State.B, Reason.PORT_REMOVED),
    (State.A, Input.FRONTEND_GONE): _closed(State.C, Reason.FRONTEND_GONE),
    (State.A, Input.SHUTDOWN): _closed(State.E, Reason.SHUTDOWN, _TELL0),
    # E: the host ended the session; the guest still holds the port open
    (State.E, Input.GUEST_OPEN): SessionStep(State.E, (_NOP,)),
    (State.E, Input.GUEST_CLOSE): SessionStep(State.B),
    (State.E, Input.HOST_OPEN): SessionStep(State.A, (_TELL1, _OPEN)),
    (State.E, Input.HOST_CLOSE): SessionStep(State.E, (_NOP,)),
    (State.E, Input.HOST_END): SessionStep(State.E, (_NOP,)),
    (State.E, Input.RESET): SessionStep(State.B),
    (State.E, Input.REMOVE): SessionStep(State.B),
    (State.E, Input.FRONTEND_GONE): SessionStep(State.B),
    (State.E, Input.SHUTDOWN): SessionStep(State.E),
}


def transition(state: State, event: Input) -> SessionStep:
    try:
        return TABLE[(state, event)]
    except KeyError:
        raise SessionError(f"no transition from {state.name} on {event.value}") from None
