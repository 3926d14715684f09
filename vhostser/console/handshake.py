"""The control handshake of one port, as a transition table (beside the session table).

Linux's virtio_console learns of a port only through the control queue: the guest sends
DEVICE_READY, the device answers DEVICE_ADD per port, the guest sets the port up and answers
PORT_READY(1), and only then may either side speak of the port being open (PORT_OPEN). This
table is the device's view of where each port stands in that conversation:

    UNKNOWN      the guest driver has not been told of the port (no driver yet, or a reset)
    ADD_QUEUED   DEVICE_ADD waits in the control queue for a guest buffer
    ADDED        the guest has DEVICE_ADD; its PORT_READY is due
    READY        the guest set the port up: host open/close is told, guest PORT_OPEN counts

`transition(announce, input)` returns the next state and the effects, in order; the table is
total (a test checks every pair), so a pair missing is a bug here, never the guest's.

Leniency that Linux needs: PORT_READY(1) is answered in every state, also again in READY —
Linux re-sends it after freeze/restore without a new DEVICE_READY, and expects the port's
name, console flag and host state once more.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Announce(enum.Enum):
    UNKNOWN = "unknown"
    ADD_QUEUED = "add-queued"
    ADDED = "added"
    READY = "ready"


class HandshakeInput(enum.Enum):
    DRIVER_READY = "driver-ready"  # guest DEVICE_READY(1), or hotplug while the driver runs
    ADD_DELIVERED = "add-delivered"  # DEVICE_ADD went into a guest control buffer
    PORT_READY = "port-ready"  # guest PORT_READY(1)
    PORT_FAILED = "port-failed"  # guest PORT_READY(0)
    GUEST_PORT_OPEN = "guest-port-open"  # guest PORT_OPEN(0 or 1)
    REMOVE = "remove"  # the port is hot-unplugged
    RESET = "reset"  # the driver re-initialises the device, or the front end resets it


class HandshakeEffect(enum.Enum):
    QUEUE_DEVICE_ADD = "queue-device-add"
    ANNOUNCE = "announce"  # CONSOLE_PORT, PORT_NAME, PORT_OPEN(H), in QEMU's order
    ACCEPT_OPEN = "accept-open"  # hand the guest's PORT_OPEN to the session machine
    REJECT_OPEN = "reject-open"  # PORT_OPEN before PORT_READY: counted as bad control
    SETUP_FAILED = "setup-failed"  # logged: the guest could not set the port up
    DROP_QUEUED = "drop-queued"  # control messages for the port not yet delivered
    QUEUE_DEVICE_REMOVE = "queue-device-remove"  # the guest knows the port: undo its ADD


@dataclass(frozen=True, slots=True)
class HandshakeStep:
    announce: Announce
    effects: tuple[HandshakeEffect, ...] = ()


class HandshakeError(RuntimeError):
    """An input the handshake table has no transition for."""


_A, _I, _E = Announce, HandshakeInput, HandshakeEffect


def _step(announce: Announce, *effects: HandshakeEffect) -> HandshakeStep:
    return HandshakeStep(announce, effects)


_GONE = (_E.DROP_QUEUED, _E.QUEUE_DEVICE_REMOVE)

TABLE: dict[tuple[Announce, HandshakeInput], HandshakeStep] = {
    (_A.UNKNOWN, _I.DRIVER_READY): _step(_A.ADD_QUEUED, _E.QUEUE_DEVICE_ADD),
    (_A.UNKNOWN, _I.ADD_DELIVERED): _step(_A.UNKNOWN),
    (_A.UNKNOWN, _I.PORT_READY): _step(_A.READY, _E.ANNOUNCE),
    (_A.UNKNOWN, _I.PORT_FAILED): _step(_A.UNKNOWN, _E.SETUP_FAILED),
    (_A.UNKNOWN, _I.GUEST_PORT_OPEN): _step(_A.UNKNOWN, _E.REJECT_OPEN),
    (_A.UNKNOWN, _I.REMOVE): _step(_A.UNKNOWN, _E.DROP_QUEUED),
    (_A.UNKNOWN, _I.RESET): _step(_A.UNKNOWN),
    # DEVICE_ADD waits for a guest buffer
    (_A.ADD_QUEUED, _I.DRIVER_READY): _step(_A.ADD_QUEUED),
    (_A.ADD_QUEUED, _I.ADD_DELIVERED): _step(_A.ADDED),
    (_A.ADD_QUEUED, _I.PORT_READY): _step(_A.READY, _E.ANNOUNCE),
    (_A.ADD_QUEUED, _I.PORT_FAILED): _step(_A.ADD_QUEUED, _E.SETUP_FAILED),
    (_A.ADD_QUEUED, _I.GUEST_PORT_OPEN): _step(_A.ADD_QUEUED, _E.REJECT_OPEN),
    # Never delivered: the guest never learns the port existed.
    (_A.ADD_QUEUED, _I.REMOVE): _step(_A.UNKNOWN, _E.DROP_QUEUED),
    (_A.ADD_QUEUED, _I.RESET): _step(_A.UNKNOWN),
    # the guest has DEVICE_ADD
    (_A.ADDED, _I.DRIVER_READY): _step(_A.ADDED),
    (_A.ADDED, _I.ADD_DELIVERED): _step(_A.ADDED),
    (_A.ADDED, _I.PORT_READY): _step(_A.READY, _E.ANNOUNCE),
    (_A.ADDED, _I.PORT_FAILED): _step(_A.ADDED, _E.SETUP_FAILED),
    (_A.ADDED, _I.GUEST_PORT_OPEN): _step(_A.ADDED, _E.REJECT_OPEN),
    (_A.ADDED, _I.REMOVE): _step(_A.UNKNOWN, *_GONE),
    (_A.ADDED, _I.RESET): _step(_A.UNKNOWN),
    # set up by the guest
    (_A.READY, _I.DRIVER_READY): _step(_A.READY),
    (_A.READY, _I.ADD_DELIVERED): _step(_A.READY),
    (_A.READY, _I.PORT_READY): _step(_A.READY, _E.ANNOUNCE),
    (_A.READY, _I.PORT_FAILED): _step(_A.READY, _E.SETUP_FAILED),
    (_A.READY, _I.GUEST_PORT_OPEN): _step(_A.READY, _E.ACCEPT_OPEN),
    (_A.READY, _I.REMOVE): _step(_A.UNKNOWN, *_GONE),
    (_A.READY, _I.RESET): _step(_A.UNKNOWN),
}


def transition(announce: Announce, event: HandshakeInput) -> HandshakeStep:
    try:
        return TABLE[(announce, event)]
    except KeyError:
        raise HandshakeError(f"no handshake transition from {announce.value} on "
                             f"{event.value}") from None
