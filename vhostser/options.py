"""Typed, checked reads from one table of a config file, with errors that name the file, the
key path and what was expected:

    web1.toml:12: port 1 (org.qemu.guest_agent.0).backend.mode: expected one of "stream",
    "session", "framed", got 'raw'

The config file's own tables ([vm], [[port]]) and every backend's options are read with
`Options`. Unknown keys are errors: a typo must never be silently ignored. No string it hands
out contains NUL: each one ends up as a path, a name or an address.

This module imports nothing else from vhostser, so every layer may use it.
"""

from __future__ import annotations

import difflib
import grp
import pwd
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar, overload

T = TypeVar("T")
S = TypeVar("S", bound=str)

_MISSING: Any = object()
_SIZE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20}


class OptionError(ValueError):
    """A config file, or one of its tables, is not valid: a key is missing, unknown or not what
    was expected. The message names the file and the key path; `key` (within the table
    `where`) and `problem` are its parts, for a caller that places the error in a file."""

    def __init__(self, message: str, *, where: str = "", key: str = "",
                 problem: str = "") -> None:
        super().__init__(message)
        self.where, self.key, self.problem = where, key, problem

    @classmethod
    def at(cls, where: str, key: str, problem: str) -> OptionError:
        return cls(f"{where}.{key}: {problem}", where=where, key=key, problem=problem)


# Where `Options` puts unknown keys instead of raising (`collecting`).
_UNKNOWN: ContextVar[list[OptionError] | None] = ContextVar("unknown_keys", default=None)


@contextmanager
def collecting(unknown: list[OptionError]) -> Iterator[None]:
    """Within this, every `Options` appends its unknown keys' errors to `unknown` and reads on
    without them, so that one run of `vhostser check` reports them all."""
    token = _UNKNOWN.set(unknown)
    try:
        yield
    finally:
        _UNKNOWN.reset(token)


def unknown_key(key: str, allowed: Iterable[str]) -> str:
    """The problem with an unknown key: what it may have meant, else what is allowed. (Not its
    value: what was typed wrong is the key.)"""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (expected one of {', '.join(allowed)})" if allowed else \
        "unknown key (expected no options)"


class Options:
    """Typed access to one table. `where` prefixes every error: with `port 1`, an error reads
    `port 1.staging: expected ...`.

    `terse` is the wording vhostser has always used for the [vm] and [[port]] tables: a value
    of the wrong type is named by its type (`expected int, got '4'`), choices are listed bare,
    a missing key is `required key missing`. Backend tables say in full what they expected
    (`expected an integer in 1..1024, got True`). Both are what users have been seeing (and
    what the tests pin), so both stay; everything else is the same.
    """

    def __init__(self, table: object, where: str, known: Iterable[str], *,
                 terse: bool = False) -> None:
        if not isinstance(table, Mapping):
            problem = f"expected a table, got {table!r}"
            raise OptionError(f"{where}: {problem}", where=where, problem=problem)
        self.table: dict[str, Any] = dict(table)
        self.where = where
        self.terse = terse
        allowed = set(known)
        for key in [k for k in self.table if k not in allowed]:
            error = OptionError.at(where, key, unknown_key(key, allowed))
            sink = _UNKNOWN.get()
            if sink is None:
                raise error
            sink.append(error)
            del self.table[key]

    def fail(self, key: str, expected: str, got: object = _MISSING) -> NoReturn:
        """Raise the error for `key`; without `got`, the key is missing."""
        if got is not _MISSING:
            problem = f"expected {expected}, got {got!r}"
        elif self.terse:
            problem = "required key missing"
        else:
            problem = f"expected {expected}, got nothing"
        raise OptionError.at(self.where, key, problem)

    def _check(self, key: str, kind: type[T], expected: str,
               valid: Callable[[T], bool] = lambda _: True) -> T:
        """The value at `key`, which must be there, be a `kind` (an int is also a float; a bool
        is nothing but a bool) and be `valid`."""
        if key not in self.table:
            self.fail(key, expected)
        raw = self.table[key]
        is_int = isinstance(raw, int) and not isinstance(raw, bool)
        value = float(raw) if kind is float and is_int else raw
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self.fail(key, kind.__name__ if self.terse else expected, value)
        if isinstance(raw, str) and "\0" in raw:
            self.fail(key, f"{expected} without NUL bytes", raw)
        if not valid(value):
            self.fail(key, expected, value)
        return value

    def get(self, key: str, kind: type[T], default: T) -> T:
        """The value at `key` if it is a `kind`, or `default`; errors name the type."""
        return self._check(key, kind, kind.__name__) if key in self.table else default

    def required(self, key: str, kind: type[T]) -> T:
        return self._check(key, kind, kind.__name__)

    @overload
    def string(self, key: str, default: None = None, *, nonempty: bool = True) -> str | None: ...

    @overload
    def string(self, key: str, default: str, *, nonempty: bool = True) -> str: ...

    def string(self, key: str, default: str | None = None, *,
               nonempty: bool = True) -> str | None:
        return self.required_string(key, nonempty=nonempty) if key in self.table else default

    def required_string(self, key: str, *, nonempty: bool = True) -> str:
        expected = "a non-empty string" if nonempty else "a string"
        return self._check(key, str, expected, lambda s: bool(s) or not nonempty)

    def integer(self, key: str, default: int, *, lo: int, hi: int) -> int:
        return self.required_integer(key, lo=lo, hi=hi) if key in self.table else default

    def required_integer(self, key: str, *, lo: int, hi: int) -> int:
        return self._check(key, int, f"an integer in {lo}..{hi}", lambda n: lo <= n <= hi)

    def size(self, key: str, default: int, *, lo: int, hi: int) -> int:
        """A byte count: an integer, or a string like "64K", "256KiB", "1M"."""
        if key not in self.table:
            return default
        expected = f"a size in bytes in {lo}..{hi} (an integer, or a string like \"256KiB\")"
        value = self._check(key, object, expected)
        n: int | None = None
        if isinstance(value, int):
            n = value
        elif isinstance(value, str) and (m := _SIZE.match(value)):
            n = int(m.group(1)) * _SCALE[m.group(2).lower()]
        if n is None or not lo <= n <= hi:
            self.fail(key, expected, value)
        return n

    def boolean(self, key: str, default: bool) -> bool:
        return self._check(key, bool, "true or false") if key in self.table else default

    def choice(self, key: str, choices: tuple[S, ...], default: S) -> S:
        if key not in self.table:
            return default
        listed = ", ".join(choices if self.terse else (f'"{c}"' for c in choices))
        value = self._check(key, str, f"one of {listed}")
        for c in choices:
            if value == c:
                return c
        self.fail(key, f"one of {listed}", value)

    def socket_mode(self, key: str, default: int) -> int:
        """A unix socket file's mode: read and write for its owner, perhaps bits for its
        group, none for others (who could connect to what is the daemon's). An integer
        (0o660) or a string ("0660", "0o660", "660")."""
        raw = value = self.table.get(key, default)
        if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{3}", value):
            value = int(value.removeprefix("0o"), 8)
        if not isinstance(value, int) or isinstance(value, bool) or (
            value & 0o600 != 0o600 or value & ~0o770
        ):
            self.fail(key, "a file mode with read and write for the owner and no bits "
                      "for others, like 0o600 or 0o660", raw)
        return value

    def group(self, key: str) -> int | None:
        """A group's gid: a number, or a name looked up now; None if `key` is not set."""
        return self._id(key, self.table[key], _gid) if key in self.table else None

    def users(self, key: str) -> tuple[int, ...]:
        """A list of users' uids, each a number or a name looked up now."""
        return tuple(self._id(key, v, _uid) for v in self.get(key, list, []))

    def groups(self, key: str) -> tuple[int, ...]:
        """A list of groups' gids, each a number or a name looked up now."""
        return tuple(self._id(key, v, _gid) for v in self.get(key, list, []))

    def _id(self, key: str, value: object, lookup: Callable[[str], int]) -> int:
        # 2**32 - 1 is (uid_t)-1: "no change" to chown, nobody's id.
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
            return value
        if isinstance(value, str) and "\0" not in value:
            try:
                return lookup(value)
            except KeyError:
                pass
        self.fail(key, "a number or the name of an existing user/group", value)

    def not_with(self, key: str, why: str) -> None:
        """`key` does not apply here (e.g. max_peers with role = "client")."""
        if key in self.table:
            self.fail(key, f"no {key} {why}", self.table[key])


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid
