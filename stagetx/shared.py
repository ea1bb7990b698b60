"""Process-wide state every runtime of a process shares: ``stage.once`` keys and ``stage.v`` values.

Values are held encoded (``stagetx.codec`` payloads), so every reader gets its own copy and
values move between runtimes (the stage's and its worker sandboxes) by value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable


class ProcessShared:
    """``stage.once`` and ``stage.v`` storage, safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._once: set[Hashable] = set()
        self._values: dict[Hashable, bytes] = {}

    def once(self, key: Hashable, mark: bool) -> bool:
        """With ``mark``: True exactly once per key (the caller runs); else forget ``key``."""
        with self._lock:
            if not mark:
                self._once.discard(key)
                return False
            if key in self._once:
                return False
            self._once.add(key)
            return True

    def get(self, key: Hashable) -> bytes | None:
        return self._values.get(key)

    def set(self, key: Hashable, payload: bytes | None) -> None:
        with self._lock:
            self._store(key, payload)

    def update(self, key: Hashable, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Replace the value of ``key`` by ``change(old)`` atomically; returns the new payload."""
        with self._lock:
            new = change(self._values.get(key))
            self._store(key, new)
            return new

    def _store(self, key: Hashable, payload: bytes | None) -> None:
        if payload is None:
            self._values.pop(key, None)
        else:
            self._values[key] = payload
