"""vhostser.pacing: retry delays that back off."""

from __future__ import annotations

from vhostser.pacing import backoff_delays


def test_backoff_doubles_to_five_seconds() -> None:
    delays = backoff_delays()
    assert [round(next(delays), 3) for _ in range(9)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0
    ]
    assert [next(backoff_delays(0.05, 1.0)) for _ in range(2)] == [0.05, 0.05]  # fresh ones
