"""Log lines that can repeat in a storm (a full disk fails every write) at a bounded rate.

The first event of a kind is logged at once; like events in the next ``interval`` seconds are
only counted, and when the interval ends one line carries the latest event's fields and how many
were held back (``repeated``), then a new interval starts. A kind that stays quiet for a whole
interval is logged at once again the next time. "Kind" is the format string. With a ``burst``
of N, the first N events of an interval are logged each (a few distinct reasons stay readable),
only the rest are counted.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel


@attrs.define
class _Window:
    level: LogLevel
    fields: dict[str, Any]
    call: IDelayedCall
    held: int = 0
    sent: int = 1  # lines logged in this interval


class RateLimitedLog:
    """Emits through ``log`` at most ``burst`` lines per format string every ``interval`` seconds."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0, burst: int = 1) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self.burst = burst
        self._windows: dict[str, _Window] = {}

    def emit(self, level: LogLevel, format: str, **fields: Any) -> None:
        """Log now if no line of ``format`` went out in the current interval, else count it."""
        window = self._windows.get(format)
        if window is not None and window.sent < self.burst:
            window.sent += 1
            self.log.emit(level, format, **fields)
            return
        if window is not None:
            window.held += 1
            window.level, window.fields = level, fields
            return
        self.log.emit(level, format, **fields)
        self._open(format, level, fields)

    def error(self, format: str, **fields: Any) -> None:
        self.emit(LogLevel.error, format, **fields)

    def warn(self, format: str, **fields: Any) -> None:
        self.emit(LogLevel.warn, format, **fields)

    def stop(self) -> None:
        """Log what is held back and cancel the pending timers (the owner is going away)."""
        for format in list(self._windows):
            window = self._windows.pop(format)
            window.call.cancel()
            self._summarise(format, window)

    def _open(self, format: str, level: LogLevel, fields: dict[str, Any]) -> None:
        call = self.clock.callLater(self.interval, self._close, format)
        self._windows[format] = _Window(level, fields, call)

    def _close(self, format: str) -> None:
        window = self._windows.pop(format)
        if window.held:
            self._summarise(format, window)
            self._open(format, window.level, window.fields)

    def _summarise(self, format: str, window: _Window) -> None:
        if window.held:
            self.log.emit(
                window.level,
                format + " (and {repeated} more like it in the last {interval} s)",
                repeated=window.held,
                interval=self.interval,
                **window.fields,
            )
