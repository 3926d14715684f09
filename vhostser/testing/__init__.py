"""QEMU and Linux in a box: a vhost-user front end and a virtio-console guest driver in Python, for
tests and benchmarks. It uses the real mechanisms (memfd guest RAM, eventfds, SCM_RIGHTS)."""

from .console_driver import ConsoleDriver as ConsoleDriver
from .frontend import (
    DEFAULT_MEM_SIZE,
    IMPLEMENTED_PROTOCOL_FEATURES,
    STATUS_FEATURES_OK,
    AckError,
    BackendClosedError,
    BackendMessage,
    FrontEnd,
    FrontEndError,
    open_frontend,
    sealed_memfd,
)

__all__ = [
    "DEFAULT_MEM_SIZE",
    "IMPLEMENTED_PROTOCOL_FEATURES",
    "STATUS_FEATURES_OK",
    "AckError",
    "BackendClosedError",
    "BackendMessage",
    "ConsoleDriver",
    "FrontEnd",
    "FrontEndError",
    "open_frontend",
    "sealed_memfd",
]
