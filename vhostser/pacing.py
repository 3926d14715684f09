"""How vhostser paces what repeats: retry delays that back off, and log lines that do not
flood the journal when the same thing keeps going wrong (a backend failing on every restart,
accept() hitting EMFILE on every wake-up).

This module imports nothing else from vhostser, so every layer may use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterator

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "LogLimiter", "backoff_delays"]

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


def backoff_delays(lo: float = BACKOFF_MIN, hi: float = BACKOFF_MAX) -> Iterator[float]:
    """0.1, 0.2, 0.4, ... doubling up to `hi`, then `hi` forever."""
    delay = lo
    while True:
        yield delay
        delay = min(delay * 2, hi)


class LogLimiter:
    """At most one line per `interval` seconds for each key; the lines held back meanwhile
    are counted, and the next line that goes out says how many there were. (What they were
    about is counted elsewhere: a counter, never only a log line, keeps the exact number.)"""

    def __init__(self, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def log(self, logger: logging.Logger, level: int, key: Hashable, msg: str,
            *args: object, exc_info: BaseException | None = None) -> bool:
        """Log `msg % args` unless a line with `key` went out less than `interval` ago;
        True if it was logged."""
        now = self._clock()
        if now < self._next.get(key, now):
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._next[key] = now + self.interval
        held = self._held.pop(key, 0)
        if held:
            msg += f" ({held} more like it not logged since the last one)"
        logger.log(level, msg, *args, exc_info=exc_info)
        return True
