"""The one place a module falls back to the global reactor when it was given none."""

from __future__ import annotations

from typing import Any


def resolve(reactor: Any = None) -> Any:
    """``reactor``, else the global one: imported only now, so importing a module of stagetx never
    installs a reactor (twistd installs its own before it makes the service)."""
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor
