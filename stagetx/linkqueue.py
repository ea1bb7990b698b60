"""What waits for a link that is down or does not read: the queue the process links
(``stagetx.child.links``) and the cluster's peer links (``stagetx.cluster.peers``) both keep.

Bounded twice, by a count of items and by their bytes (an item may be a run of many messages, so
a count alone does not bound memory). A sender refuses new items once either bound is reached
(``limit_reached``); a reactor turn that found the queue under half full on both counts
(``has_room``) may queue its runs past the bounds, into the half kept for it, so a run promised
room is never refused halfway.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class LinkQueue(Generic[T]):
    """Items in order, with the bytes ``measure`` counts for each."""

    __slots__ = ("_items", "bytes", "limit", "byte_limit", "_measure")

    def __init__(self, limit: int, byte_limit: int, measure: Callable[[T], int]) -> None:
        self._items: deque[T] = deque()
        self.bytes = 0
        self.limit = limit
        self.byte_limit = byte_limit
        self._measure = measure

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __getitem__(self, index: int) -> T:
        return self._items[index]

    def limit_reached(self) -> str | None:
        """The bound reached (``"100000"``, ``"64 MiB"``), or None while the queue takes more."""
        if len(self._items) >= self.limit:
            return str(self.limit)
        if self.bytes >= self.byte_limit:
            return f"{self.byte_limit >> 20} MiB"
        return None

    def has_room(self) -> bool:
        """Under half full on both counts: what one reactor turn sends surely fits."""
        return len(self._items) < self.limit // 2 and self.bytes < self.byte_limit // 2

    def append(self, item: T) -> None:
        self._items.append(item)
        self.bytes += self._measure(item)

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def popleft(self) -> T:
        item = self._items.popleft()
        self.bytes -= self._measure(item)
        return item

    def take(self) -> list[T]:
        """Remove and return every item."""
        items = list(self._items)
        self._items.clear()
        self.bytes = 0
        return items
