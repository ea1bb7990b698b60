"""Caches and log-once sets that empty themselves whole when full.

A cache of what a stage parsed for keys it sees again and again (signal targets, reply addresses,
senders) must not grow without bound when a peer sends endless distinct keys. Emptying it whole
keeps a hit a plain dict look-up with no bookkeeping per read (an LRU would pay on every one), and
the few keys in use come back at their next miss.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(dict[K, V]):
    """A dict of at most ``limit`` entries. Reads are the dict's own (``get``, ``in``, ``[]``);
    a new entry goes in through ``put``, which empties the dict first when it is full."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: K, value: V) -> V:
        """Keep ``value`` under ``key`` (a key not held: callers put after a miss) and return it."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


class OnceSet(set[K]):
    """The items seen since the set last emptied, at most ``limit``: for "log it once" without
    remembering every distinct item a peer can make up."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def first(self, item: K) -> bool:
        """True the first time ``item`` comes since the set last emptied (it is kept, the set
        emptied first when full); False while it is held."""
        if item in self:
            return False
        if len(self) >= self.limit:
            self.clear()
        self.add(item)
        return True
