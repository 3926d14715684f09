"""The interface a virtio device implements to be served over vhost-user.

Deliberately small (after rust-vmm's VhostUserBackend trait): the back-end state machine owns
the protocol, the memory table and the vrings; a device only describes itself and reacts to
its queues starting and stopping. Calls are synchronous and made from the protocol core, so a
device that needs to do I/O schedules it (the console device spawns trio tasks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .vring import Vring


class Device(Protocol):
    """A virtio device behind the vhost-user back end."""

    @property
    def num_queues(self) -> int:
        """How many virtqueues the device has (GET_QUEUE_NUM)."""

    @property
    def max_queue_size(self) -> int:
        """The largest queue size the device accepts (a power of two ≤ 32768)."""

    @property
    def features(self) -> int:
        """The virtio feature bits the device offers (VERSION_1, EVENT_IDX, device bits)."""

    def get_config(self, offset: int, size: int) -> bytes:
        """`size` bytes of config space from `offset` (zero-filled past the device's end)."""

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote config space."""

    def features_acked(self, features: int) -> None:
        """The front end acknowledged these virtio features (SET_FEATURES)."""

    def queue_started(self, vring: Vring) -> None:
        """The vring is ready to process (memory, addresses, kick fd and enable all present)."""

    def queue_stopped(self, vring: Vring) -> None:
        """Stop touching the vring now. On return, `vring.queue.next_avail` must be the index
        the ring resumes at: chains the device popped but did not complete must be completed or
        given back before returning. A stop is not a reset (the VM may be only pausing)."""

    def status_changed(self, status: int) -> None:
        """The front end set the virtio device status byte (SET_STATUS); 0 is a stop, not a
        reset, as QEMU sends it when pausing a VM."""

    def save_state(self) -> bytes:
        """The device's state for a migration destination (every queue is stopped)."""

    def load_state(self, data: bytes) -> None:
        """Go on from a migration source's `save_state` (ValueError if it does not fit)."""

    def reset(self) -> None:
        """RESET_DEVICE (or the deprecated RESET_OWNER): forget all device state. Every queue
        has been stopped before this is called."""
