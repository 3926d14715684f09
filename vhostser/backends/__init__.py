"""Spice-style per-port backends and the interface they implement."""

from .base import PortBackend, Session

__all__ = ["PortBackend", "Session"]
