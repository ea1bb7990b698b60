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

import sys
from collections.abc import Mapping
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


class ReopenableFile:
    """An append-mode log file that can be reopened after it was rotated away."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        return self._handle.write(text)

    def flush(self) -> None:
        self._handle.flush()

    def reopen(self) -> None:
        self._handle.close()
        self._handle = open(self.path, "a", encoding="utf-8")


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
