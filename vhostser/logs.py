"""Rate-limited log lines, for what a guest or a front end can trigger over and over.

A hostile guest can produce a bad descriptor chain or a bad control message as fast as the
device serves its ring; one log line for each would flood the journal (156 kB/s was measured)
and cost more than the bad input itself. Every such line goes through a `RateLimiter`: per
key, at most `burst` lines in a window of `interval` seconds; the lines over that are dropped
and counted, and the first line of the key after its window has passed is preceded by one
"suppressed" line saying how many were dropped. The exact totals are in the counters the
callers keep next to their log lines (the stats), so nothing is lost but repetition.

Depends on nothing else in vhostser; the clock is a parameter so that sans-io code and its
tests can run it on a fake one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["BURST", "INTERVAL", "RateLimiter"]

BURST = 10
INTERVAL = 60.0


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class RateLimiter:
    """At most `burst` lines per key per `interval` seconds on `logger`.

    Keys name a kind of event (with a queue index, say), never data from the guest: the set
    of keys must stay small and bounded, as each has its window here for good.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError(f"rate limit of {burst} lines per {interval} s")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: object,
            exc_info: BaseException | None = None) -> bool:
        """Log `msg % args` at `level` unless `key` used up its lines; True if logged."""
        return self._log(level, key, msg, args, exc_info)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self._log(logging.WARNING, key, msg, args)

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self._log(logging.ERROR, key, msg, args)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self._log(logging.INFO, key, msg, args)

    def _log(self, level: int, key: Hashable, msg: str, args: tuple[object, ...],
             exc_info: BaseException | None = None) -> bool:
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            if window is not None and window.suppressed:
                self.logger.log(level, "%s: %d similar messages suppressed in %.0f s",
                                key, window.suppressed, now - window.start)
            window = self._windows[key] = _Window(now)
        if window.logged >= self.burst:
            window.suppressed += 1
            return False
        window.logged += 1
        # The caller's file and line in the record, not this module's.
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=3)
        return True
