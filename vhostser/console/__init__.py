"""The virtio-console device (virtio id 3): config space, queue map, ports."""

from .device import ConsoleDevice

__all__ = ["ConsoleDevice"]
