"""Repeated log lines at a bounded rate, with the count of those held back."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger

from stagetx.ratelog import RateLimitedLog
from tests.support import LogCapture


def _events(capture: LogCapture) -> list[dict]:
    return [e for e in capture.events if e.get("log_namespace") == "test.ratelog"]


def test_the_first_line_goes_at_once_then_one_summary_per_interval() -> None:
    clock = Clock()
    log = RateLimitedLog(Logger(namespace="test.ratelog"), clock, interval=10.0)
    with LogCapture() as capture:
        for n in range(100):
            log.error("write failed: {n}", n=n)
        assert [e["n"] for e in _events(capture)] == [0]
        clock.advance(10)
        summary = _events(capture)[-1]
        assert summary["repeated"] == 99 and summary["n"] == 99 and "more like it" in summary["log_format"]
        log.error("write failed: {n}", n=100)  # inside the new window: held
        clock.advance(10)
        assert _events(capture)[-1]["repeated"] == 1
        clock.advance(10)  # a quiet window closes without a line
        assert len(_events(capture)) == 3
        log.error("write failed: {n}", n=101)  # quiet for a whole interval: logged at once
        assert _events(capture)[-1]["n"] == 101 and "repeated" not in _events(capture)[-1]


def test_kinds_are_limited_apart_and_stop_flushes_the_held_count() -> None:
    clock = Clock()
    log = RateLimitedLog(Logger(namespace="test.ratelog"), clock, interval=5.0)
    with LogCapture() as capture:
        for _ in range(3):
            log.error("write failed")
            log.warn("fsync failed")
        assert [e["log_format"] for e in _events(capture)] == ["write failed", "fsync failed"]
        log.stop()
        assert sorted(e.get("repeated") for e in _events(capture)[2:]) == [2, 2]
    assert not clock.getDelayedCalls()


def test_a_burst_logs_that_many_lines_an_interval_then_counts() -> None:
    clock = Clock()
    log = RateLimitedLog(Logger(namespace="test.ratelog"), clock, interval=10.0, burst=3)
    with LogCapture() as capture:
        for n in range(10):
            log.warn("dropped: {n}", n=n)
        assert [e["n"] for e in _events(capture)] == [0, 1, 2]
        clock.advance(10)
        assert _events(capture)[-1]["repeated"] == 7
        log.stop()
    assert not clock.getDelayedCalls()
