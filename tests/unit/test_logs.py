"""vhostser.logs.RateLimiter on a fake clock: per key at most `burst` lines per window, then
one line saying how many were suppressed."""

from __future__ import annotations

import logging

import pytest

from vhostser.logs import RateLimiter

log = logging.getLogger("tests.logs")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tests.logs"]


def test_a_flood_is_cut_to_the_burst_then_summed_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tests.logs")
    clock = Clock()
    limit = RateLimiter(log, burst=3, interval=10.0, clock=clock)
    logged = [limit.warning("bad chains", "chain %d bad", i) for i in range(100)]
    assert logged == [True] * 3 + [False] * 97
    assert lines(caplog) == ["chain 0 bad", "chain 1 bad", "chain 2 bad"]
    clock.now += 9.9  # still the same window
    assert not limit.warning("bad chains", "chain %d bad", 100)
    caplog.clear()
    clock.now += 0.1
    assert limit.warning("bad chains", "chain %d bad", 101)
    assert lines(caplog) == ["bad chains: 98 similar messages suppressed in 10 s", "chain 101 bad"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_keys_are_limited_apart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tests.logs")
    limit = RateLimiter(log, burst=1, interval=60.0, clock=Clock())
    assert limit.error("vring 3", "a")
    assert not limit.error("vring 3", "a again")
    assert limit.error("vring 5", "b")
    assert limit.info("other", "c")
    assert lines(caplog) == ["a", "b", "c"]
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR, logging.INFO]


def test_a_quiet_key_starts_a_new_window_without_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "tests.logs")
    clock = Clock()
    limit = RateLimiter(log, burst=2, interval=5.0, clock=clock)
    for _ in range(3):
        assert limit.log(logging.WARNING, "k", "once")
        clock.now += 5.0
    assert lines(caplog) == ["once"] * 3  # never over the burst: nothing was suppressed


def test_the_record_points_at_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tests.logs")
    RateLimiter(log, clock=Clock()).warning("k", "here")
    (record,) = caplog.records
    assert record.filename == "test_logs.py" and record.funcName.startswith("test_the_record")


@pytest.mark.parametrize(("burst", "interval"), [(0, 1.0), (1, 0.0)])
def test_a_limit_that_would_log_nothing_is_refused(burst: int, interval: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(log, burst=burst, interval=interval)


def test_one_line_per_interval_with_a_burst_of_one(caplog: pytest.LogCaptureFixture) -> None:
    """As the accept loops and backend failures use it: one line per key per interval, then
    the count of what was held back, at the next line's level."""
    now = [100.0]
    log = logging.getLogger("tests.logs.burst1")
    limiter = RateLimiter(log, burst=1, interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "tests.logs.burst1")
    assert limiter.log(logging.ERROR, "a", "accept failed: %s", "EMFILE")
    assert not limiter.log(logging.ERROR, "a", "accept failed: %s", "EMFILE")
    now[0] += 9.9
    assert not limiter.log(logging.ERROR, "a", "accept failed: %s", "EMFILE")
    assert limiter.log(logging.ERROR, ("b", 1), "another key")  # keys are separate
    now[0] += 0.1
    assert limiter.log(logging.WARNING, "a", "accept failed: %s", "ENFILE")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "accept failed: EMFILE"),
        (logging.ERROR, "another key"),
        (logging.WARNING, "a: 2 similar messages suppressed in 10 s"),
        (logging.WARNING, "accept failed: ENFILE"),
    ]


def test_the_exception_goes_with_the_line(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(logging.getLogger("tests.logs.exc"))
    error = BrokenPipeError(32, "Broken pipe")
    limiter.log(logging.ERROR, 1, "backend failed", exc_info=error)
    (record,) = [r for r in caplog.records if r.name == "tests.logs.exc"]
    assert record.exc_info is not None and record.exc_info[1] is error
