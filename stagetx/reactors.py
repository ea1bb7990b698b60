"""The reactor as stagetx modules reach it: the one place a module falls back to the global
reactor when it was given none, and the one way a process stops it."""

from __future__ import annotations

from typing import Any


def resolve(reactor: Any = None) -> Any:
    """``reactor``, else the global one: imported only now, so importing a module of stagetx never
    installs a reactor (twistd installs its own before it makes the service)."""
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor


def stop(reactor: Any) -> bool:
    """Stop ``reactor``; False when it is stopping already. A stop may be asked again while the
    process shuts down (a second SIGTERM from an impatient operator or ``timeout``, the
    parent-death signal, EOF from the supervisor after it), which ``reactor.stop`` answers with
    ``ReactorNotRunning``, a traceback in the log."""
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        return False
    return True
