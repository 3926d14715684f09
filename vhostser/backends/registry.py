"""Backend types by name, as the config file spells them: `backend = { type = "unix", ... }`.

`create(type, options, where, peers)` validates the options (without `type`) and returns an
unstarted backend; it raises `OptionError` naming `where.key` and what was expected. It opens
no files and makes no sockets: `run()` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from ..options import OptionError, Options
from ..sockets import PeerPolicy
from .console_log import ConsoleBackend
from .file import FileBackend
from .options import ANYONE, ConfigurableBackend
from .pty import PtyBackend
from .simple import EchoBackend, NullBackend, SinkBackend
from .tcp import TcpBackend
from .unix import UnixBackend

__all__ = ["BACKENDS", "backend_type", "create"]

STDOUT = 1  # the process's stdout fd, whatever sys.stdout was made into


class _NoOptions(ConfigurableBackend):
    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        Options(options, where, ())
        return cls()


class Null(_NoOptions, NullBackend):
    """`null`: takes every guest byte and drops it; never attaches a host peer."""


class Echo(_NoOptions, EchoBackend):
    """`echo`: sends every guest byte back, in the same session."""


class Stdout(_NoOptions, SinkBackend):
    """`stdout`: guest bytes printed on the daemon's stdout (the embedded default console),
    never blocking the daemon when nobody reads it (see `SinkBackend`)."""

    def __init__(self) -> None:
        super().__init__(STDOUT, "stdout")


BACKENDS: dict[str, type[ConfigurableBackend]] = {
    "null": Null,
    "echo": Echo,
    "stdout": Stdout,
    "unix": UnixBackend,
    "tcp": TcpBackend,
    "pty": PtyBackend,
    "file": FileBackend,
    "console": ConsoleBackend,
}


def backend_type(value: object, where: str) -> str:
    """`value` if it names a backend type; else OptionError naming `where.type`. (`value` is
    whatever the table held: missing (None), a number, a typo.)"""
    if isinstance(value, str) and value in BACKENDS:
        return value
    raise OptionError.at(where, "type",
                         f"expected one of {', '.join(sorted(BACKENDS))}, got {value!r}")


def create(type_name: str, options: Mapping[str, Any], where: str,
           peers: PeerPolicy = ANYONE) -> ConfigurableBackend:
    """The backend `type_name` built from `options` (OptionError if either is wrong); `peers`
    may connect to its unix sockets unless the options have allow lists of their own."""
    return BACKENDS[backend_type(type_name, where)].from_options(options, where, peers)
