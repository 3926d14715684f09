"""Backend options: typed reads from a config table, errors that name the key.

Every built-in backend has `from_options(options, where)`: it validates the table (a TOML
inline table with `type` already removed) and returns an unstarted backend. It makes no
sockets and opens no files: that happens in `run()`, so `vhostser check` can validate a config
file without side effects. Unknown keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn, Self, TypeVar

from ..console.port import PortBackend

T = TypeVar("T", bound=str)

_MISSING = object()
_SIZE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20}


class OptionError(ValueError):
    """A backend option is missing, unknown or not what was expected; the message says which."""


class ConfigurableBackend(PortBackend):
    """A backend the config file can name: `from_options` validates and builds it."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str) -> Self:
        raise NotImplementedError


class Options:
    """Typed, checked access to one backend table. `where` prefixes every error message, e.g.
    `web1.toml: port[1].backend`, so an error reads `web1.toml: port[1].backend.path: ...`."""

    def __init__(self, options: Mapping[str, Any], where: str, known: Iterable[str]) -> None:
        if not isinstance(options, Mapping):
            raise OptionError(f"{where}: expected a table of options, got {options!r}")
        self.where = where
        self.options = dict(options)
        allowed = sorted(known)
        for key, value in self.options.items():
            if key not in allowed:
                expected = f"one of {', '.join(allowed)}" if allowed else "no options"
                self.fail(key, f"{expected} (unknown key)", value)

    def fail(self, key: str, expected: str, got: object = _MISSING) -> NoReturn:
        shown = "nothing" if got is _MISSING else repr(got)
        raise OptionError(f"{self.where}.{key}: expected {expected}, got {shown}")

    def _raw(self, key: str, required: bool, expected: str) -> object:
        if key not in self.options:
            if required:
                self.fail(key, expected)
            return _MISSING
        return self.options[key]

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               nonempty: bool = True) -> str | None:
        expected = "a non-empty string" if nonempty else "a string"
        value = self._raw(key, required, expected)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or (nonempty and not value):
            self.fail(key, expected, value)
        if "\0" in value:
            self.fail(key, f"{expected} without NUL bytes", value)
        return value

    def required_string(self, key: str) -> str:
        value = self.string(key, required=True)
        assert value is not None
        return value

    def integer(self, key: str, default: int, *, lo: int, hi: int) -> int:
        expected = f"an integer in {lo}..{hi}"
        value = self._raw(key, False, expected)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(key, expected, value)
        return value

    def required_integer(self, key: str, *, lo: int, hi: int) -> int:
        self._raw(key, True, f"an integer in {lo}..{hi}")
        return self.integer(key, 0, lo=lo, hi=hi)

    def size(self, key: str, default: int, *, lo: int, hi: int) -> int:
        """A byte count: an integer, or a string like "64K", "256KiB", "1M"."""
        expected = f"a size in bytes in {lo}..{hi} (an integer, or a string like \"256KiB\")"
        value = self._raw(key, False, expected)
        if value is _MISSING:
            return default
        n: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and (m := _SIZE.match(value)):
            n = int(m.group(1)) * _SCALE[m.group(2).lower()]
        if n is None or not lo <= n <= hi:
            self.fail(key, expected, value)
        return n

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key, False, "true or false")
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, choices: tuple[T, ...], default: T) -> T:
        expected = "one of " + ", ".join(f'"{c}"' for c in choices)
        value = self._raw(key, False, expected)
        if value is _MISSING:
            return default
        for c in choices:
            if value == c:
                return c
        self.fail(key, expected, value)

    def not_with(self, key: str, why: str) -> None:
        """`key` does not apply here (e.g. max_peers with role = "client")."""
        if key in self.options:
            self.fail(key, f"no {key} {why}", self.options[key])
