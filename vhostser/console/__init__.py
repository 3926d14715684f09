"""The virtio-console device (virtio id 3): the sans-io core and its state, the port
interface backends implement, and the trio layer that serves it over vhost-user."""

from .core import ConsoleCore
from .device import ConsoleDevice
from .port import Port, PortBackend
from .session import Input, Reason, State
from .state import (
    DEFAULT_STAGING,
    DeviceCounters,
    DeviceState,
    PortConfig,
    PortCounters,
    PortState,
    Session,
    StateError,
)

__all__ = [
    "DEFAULT_STAGING",
    "ConsoleCore",
    "ConsoleDevice",
    "DeviceCounters",
    "DeviceState",
    "Input",
    "Port",
    "PortBackend",
    "PortConfig",
    "PortCounters",
    "PortState",
    "Reason",
    "Session",
    "State",
    "StateError",
]
