"""Where a process's log events go: text lines on a stream, per-group levels and files (``#log``).

Every logger group (a ``twisted.logger`` namespace such as ``stage.rank`` or a group named by
``%{=group:level}``) logs to the main stream at level info unless ``#log`` names it; a group with
a ``file`` also writes there. Lua text is always an event field, never a format string.

``json_lines=True`` writes the main stream as JSON lines (one event per line with all its fields):
children use it so that the supervisor re-emits their events with every structured field, and
``json_observer`` is the matching ``twistd --logger`` factory (docs/operations.md). SIGHUP makes a
process call ``reopen_log_files`` so that rotated ``#log`` files are written afresh.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

from stagetx.config import LogGroup

_LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
    "fatal": LogLevel.critical,
}


def level_named(name: str) -> LogLevel:
    """The Twisted level of a level name of ``config.LOG_LEVELS`` (checked there)."""
    return _LEVELS[name.lower()]


#: Namespaces whose info lines are reconnection chatter ("Scheduling retry 1 to connect …"):
#: warn and up unless ``#log`` or the ``loglevel`` command says otherwise.
QUIET_NAMESPACES = ("twisted.application._client_service",)


def log_predicate(groups: Mapping[str, LogGroup]) -> LogLevelFilterPredicate:
    """Levels per namespace from ``#log``; the default for everything else is info."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    for name in QUIET_NAMESPACES:
        predicate.setLogLevelForNamespace(name, LogLevel.warn)
    for name, group in groups.items():
        predicate.setLogLevelForNamespace(name, level_named(group.level))
    return predicate


def _namespace_filter(namespace: str) -> object:
    def accept(event: dict) -> object:  # type: ignore[type-arg]
        ns = event.get("log_namespace", "")
        from twisted.logger import PredicateResult

        if ns == namespace or ns.startswith(namespace + "."):
            return PredicateResult.maybe
        return PredicateResult.no

    return accept


def _to_stderr(text: str) -> None:
    """Report on stderr: a child's stderr is relayed by the supervisor at warn."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class ReopenableFile:
    """An append-mode log file that can be reopened after it was rotated away, and that survives
    its disk: a failed write (disk full, directory removed or read-only) must not raise into the
    log publisher, which would print a traceback to the main stream for every later event.

    The first failure is reported once on ``report``; events are then dropped and counted until a
    write succeeds again (tried with each event: one syscall, no retry loop), which is reported
    with the count. A file that cannot be opened is tried again every ``retry`` seconds of
    ``clock`` and at each ``reopen`` (SIGHUP). Writes are unbuffered, so nothing is held back in
    memory and a rotation (rename, or copytruncate with ``O_APPEND``) loses no buffered line.
    """

    def __init__(
        self,
        path: str,
        report: Callable[[str], None] = _to_stderr,
        clock: Callable[[], float] = time.monotonic,
        retry: float = 5.0,
    ) -> None:
        self.path = path
        self._report = report
        self._clock = clock
        self._retry = retry
        self._fd: int | None = None
        self._next_open = 0.0
        self._failure: str | None = None  # why events are being dropped, None while writing
        self._dropped = 0
        self._cut = False  # the last event went out in part: start the next one on a new line
        self.reopen()

    def write(self, text: str) -> int:
        if self._fd is None and self._clock() >= self._next_open:
            self.reopen()
        if self._fd is None:
            self._dropped += 1
            return 0
        data = (b"\n" if self._cut else b"") + text.encode("utf-8", "replace")
        written = 0
        try:
            while written < len(data):  # each pass writes at least one byte or raises
                count = os.write(self._fd, data[written:])
                if count <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += count
        except OSError as error:
            self._cut = self._cut or written > 0
            self._dropped += 1
            self._failed(error)
            return 0
        self._cut = False
        if self._failure is not None:
            self._report(f"log file {self.path}: writing again ({self._dropped} events dropped)")
            self._failure, self._dropped = None, 0
        return len(text)

    def flush(self) -> None:
        """Nothing to flush: every write goes straight to the file."""

    def reopen(self) -> None:
        """Open the file at its path again (after rotation); on failure, drop events until the
        next try rather than write on into a file that was moved or removed."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            fd = None
            self._next_open = self._clock() + self._retry
            self._failed(error)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._cut = fd, False

    def _failed(self, error: OSError) -> None:
        if self._failure is None:
            self._failure = error.strerror or str(error)
            self._report(f"log file {self.path}: {self._failure}; its events are dropped until it can be written")


_FILES: list[ReopenableFile] = []


def reopen_log_files() -> None:
    """Reopen every ``#log`` file of this process (on SIGHUP, after log rotation)."""
    for handle in _FILES:
        handle.reopen()


def json_observer() -> ILogObserver:
    """``twistd --logger=stagetx.logsetup.json_observer``: the supervisor's log as JSON lines,
    ``log_level`` a plain string (``"error"``) as log shippers read it."""
    return plain_level_observer(jsonFileLogObserver(sys.stdout, recordSeparator=""))


def plain_level_observer(observer: ILogObserver) -> ILogObserver:
    """``observer`` given each event with its ``log_level`` as the level's name."""

    @implementer(ILogObserver)
    def write(event: dict) -> None:  # type: ignore[type-arg]
        level = event.get("log_level")
        observer(event if level is None or isinstance(level, str) else dict(event, log_level=level.name))

    return write


def log_observers(
    groups: Mapping[str, LogGroup], stream: IO[str], json_lines: bool = False
) -> tuple[list[ILogObserver], LogLevelFilterPredicate]:
    """The observers for ``#log``: the main stream, plus one file per group that names one."""
    predicate = log_predicate(groups)
    main = (
        jsonFileLogObserver(stream, recordSeparator="") if json_lines else textFileLogObserver(stream, timeFormat=None)
    )
    observers: list[ILogObserver] = [FilteringLogObserver(main, [predicate])]
    for name, group in groups.items():
        if group.file:
            handle = ReopenableFile(group.file)
            _FILES.append(handle)
            observers.append(
                FilteringLogObserver(textFileLogObserver(handle), [_namespace_filter(name), predicate])  # type: ignore[list-item, arg-type]
            )
    return observers, predicate


def begin_logging(groups: Mapping[str, LogGroup], stream: IO[str], json_lines: bool = False) -> LogLevelFilterPredicate:
    """Start logging for this process; returns the level predicate (for run-time level changes)."""
    observers, predicate = log_observers(groups, stream, json_lines)
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    return predicate
