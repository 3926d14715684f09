"""How vhostser paces what it retries: delays that back off (log lines that repeat are
paced by `logs.RateLimiter`).

This module imports nothing else from vhostser, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "backoff_delays"]

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


def backoff_delays(lo: float = BACKOFF_MIN, hi: float = BACKOFF_MAX) -> Iterator[float]:
    """0.1, 0.2, 0.4, ... doubling up to `hi`, then `hi` forever."""
    delay = lo
    while True:
        yield delay
        delay = min(delay * 2, hi)
