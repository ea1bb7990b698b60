"""Where a process's log events go: text lines on a stream, per-group levels and files (``#log``).

Every logger group (a ``twisted.logger`` namespace such as ``stage.rank`` or a group named by
``%{=group:level}``) logs to the main stream at level info unless ``#log`` names it; a group with
a ``file`` also writes there. Lua text is always an event field, never a format string.
"""

from __future__ import annotations

from typing import IO, Mapping

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from stagetx.config import LogGroup

_LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
}


def level_named(name: str) -> LogLevel:
    return _LEVELS.get(name.lower(), LogLevel.info)


def log_predicate(groups: Mapping[str, LogGroup]) -> LogLevelFilterPredicate:
    """Levels per namespace from ``#log``; the default for everything else is info."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
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


def log_observers(groups: Mapping[str, LogGroup], stream: IO[str]) -> tuple[list[ILogObserver], LogLevelFilterPredicate]:
    """The observers for ``#log``: the main stream, plus one file per group that names one."""
    predicate = log_predicate(groups)
    observers: list[ILogObserver] = [FilteringLogObserver(textFileLogObserver(stream, timeFormat=None), [predicate])]
    for name, group in groups.items():
        if group.file:
            handle = open(group.file, "a", encoding="utf-8")
            observers.append(
                FilteringLogObserver(textFileLogObserver(handle), [_namespace_filter(name), predicate])  # type: ignore[list-item]
            )
    return observers, predicate


def begin_logging(groups: Mapping[str, LogGroup], stream: IO[str]) -> LogLevelFilterPredicate:
    """Start logging for this process; returns the level predicate (for run-time level changes)."""
    observers, predicate = log_observers(groups, stream)
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    return predicate
