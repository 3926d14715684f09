"""vhostser.pacing: retry delays that back off, and log lines that do not flood."""

from __future__ import annotations

import logging

import pytest

from vhostser.pacing import LogLimiter, backoff_delays


def test_backoff_doubles_to_five_seconds() -> None:
    delays = backoff_delays()
    assert [round(next(delays), 3) for _ in range(9)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0
    ]
    assert [next(backoff_delays(0.05, 1.0)) for _ in range(2)] == [0.05, 0.05]  # fresh ones


def test_one_line_per_interval_per_key_and_the_held_back_ones_are_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    limiter = LogLimiter(10.0, clock=lambda: now[0])
    log = logging.getLogger("tests.pacing")
    caplog.set_level(logging.INFO, "tests.pacing")
    assert limiter.log(log, logging.ERROR, "a", "accept failed: %s", "EMFILE")
    assert not limiter.log(log, logging.ERROR, "a", "accept failed: %s", "EMFILE")
    now[0] += 9.9
    assert not limiter.log(log, logging.ERROR, "a", "accept failed: %s", "EMFILE")
    assert limiter.log(log, logging.ERROR, "b", "another key")  # keys are separate
    now[0] += 0.1
    assert limiter.log(log, logging.WARNING, "a", "accept failed: %s", "ENFILE")
    now[0] += 10
    assert limiter.log(log, logging.ERROR, "a", "accept failed: %s", "EMFILE")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "accept failed: EMFILE"),
        (logging.ERROR, "another key"),
        (logging.WARNING, "accept failed: ENFILE (2 more like it not logged since the last one)"),
        (logging.ERROR, "accept failed: EMFILE"),
    ]


def test_the_exception_goes_with_the_line(caplog: pytest.LogCaptureFixture) -> None:
    limiter = LogLimiter()
    log = logging.getLogger("tests.pacing")
    error = BrokenPipeError(32, "Broken pipe")
    limiter.log(log, logging.ERROR, 1, "backend failed", exc_info=error)
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[1] is error
