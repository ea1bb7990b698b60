"""One scoreboard: members with a value and up to four scored tiers, ranked in O(log n).

Each tier keeps a ``SortedList`` of compact key tuples ``(score, seq, member)`` in ascending
order plus a dict ``member -> key``; rank 1 is the *last* element, so no score is ever negated.
``seq`` is a per-board counter that *decreases* with every score change: among equal scores the
member whose score was set earlier has the larger ``seq``, sorts later, and ranks higher
("earlier set first"). Memory per single-tier member is about 270 bytes (DESIGN.md: ≤ 300).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sortedcontainers import SortedList

TIERS = 4

Score = int | float
Key = tuple[Score, int, bytes]
# A tier's stored state for one member: (score, seq), or None when unscored in that tier.
TierState = tuple[Score, int] | None


class Ranking(SortedList):  # type: ignore[misc]
    """A ``SortedList`` whose insertions report where the key landed.

    A score change is a removal, an insertion and a rank lookup; the lookup would search for the
    key the insertion just placed. ``insert`` and ``move`` keep the insertion's position instead,
    which saves two of the six binary searches of an update. They use the sublist layout of
    sortedcontainers 2.x (``_lists``, ``_maxes``, ``_expand``, ``_delete``, ``_loc``) exactly as
    its own ``add`` and ``remove`` do; ``tests/unit/test_index_board.py`` checks the positions
    and the layout's invariants (``_check``) against a plain sorted list through many sublist
    splits and merges.
    """

    def insert(self, key: Key) -> int:
        """Add ``key`` (not present); its 0-based position in ascending order."""
        lists = self._lists
        maxes = self._maxes
        if not maxes:
            lists.append([key])
            maxes.append(key)
            self._len += 1
            return 0
        pos = bisect_right(maxes, key)
        if pos == len(maxes):
            pos -= 1
            sub = lists[pos]
            idx = len(sub)
            sub.append(key)
            maxes[pos] = key
        else:
            sub = lists[pos]
            idx = bisect_right(sub, key)
            sub.insert(idx, key)
        self._len += 1
        self._expand(pos)
        # _loc is "keys in the sublists before pos, plus idx": still right when _expand split
        # ``sub`` and idx now points into the new sublist after it
        return self._loc(pos, idx)

    def move(self, old: Key, new: Key) -> int:
        """Replace ``old`` (present) by ``new``; the 0-based position of ``new``."""
        pos = bisect_left(self._maxes, old)
        self._delete(pos, bisect_left(self._lists[pos], old))
        return self.insert(new)


class Tier:
    """The ranked members of one tier."""

    __slots__ = ("keys", "order")

    def __init__(self) -> None:
        self.keys: dict[bytes, Key] = {}
        self.order: Ranking = Ranking()

    def __len__(self) -> int:
        return len(self.keys)

    def put(self, key: Key) -> None:
        """Insert or move ``key[2]`` to ``key``."""
        old = self.keys.get(key[2])
        if old is not None:
            self.order.remove(old)
        self.order.add(key)
        self.keys[key[2]] = key

    def discard(self, member: bytes) -> None:
        key = self.keys.pop(member, None)
        if key is not None:
            self.order.remove(key)

    def rank(self, member: bytes) -> int | None:
        """1-based rank of ``member`` (1 = highest score), None when unscored here."""
        key = self.keys.get(member)
        if key is None:
            return None
        return len(self.order) - self.order.bisect_left(key)

    def rank_at_most(self, score: Score) -> int | None:
        """Rank of the highest-ranked member whose score is ≤ ``score``; None if there is none."""
        index = self.order.bisect_left((score, math.inf))
        if index == 0:
            return None
        return len(self.order) - index + 1

    def slice(self, first: int, count: int) -> Iterator[tuple[int, Key]]:
        """``(rank, key)`` for ``count`` members from rank ``first`` (1-based) downwards."""
        first = max(first, 1)
        size = len(self.order)
        if count <= 0 or first > size:
            return iter(())
        stop = size - first + 1
        start = max(stop - count, 0)
        return enumerate(self.order.islice(start, stop, reverse=True), first)


class Board:
    """A named index: every member's value and its scores in ``TIERS`` tiers."""

    __slots__ = ("values", "tiers", "next_seq")

    def __init__(self) -> None:
        self.values: dict[bytes, Any] = {}
        self.tiers: tuple[Tier, ...] = tuple(Tier() for _ in range(TIERS))
        self.next_seq = -1

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, member: bytes) -> bool:
        return member in self.values

    def tier(self, number: int) -> Tier:
        """Tier ``number`` (1-based)."""
        return self.tiers[number - 1]

    def set(self, member: bytes, scores: Mapping[int, Score], value: Any, has_value: bool) -> set[int]:
        """Create or update ``member``; returns the tiers (1-based) whose score changed.

        ``has_value`` False keeps the stored value (a new member then gets None). A changed score
        takes a fresh ``seq``, so the member ranks after members that already had that score.
        """
        if has_value or member not in self.values:
            self.values[member] = value if has_value else None
        changed: set[int] = set()
        seq = self.next_seq
        for number, score in scores.items():
            tier = self.tiers[number - 1]
            keys = tier.keys
            old = keys.get(member)
            if old is not None:
                if old[0] == score:
                    continue
                member = old[2]  # keep one bytes object per member alive, not one per update
                tier.order.remove(old)
            key = (score, seq, member)
            tier.order.add(key)
            keys[member] = key
            changed.add(number)
        if changed:
            self.next_seq = seq - 1
        return changed

    def set_one(self, member: bytes, number: int, score: Score, value: Any, has_value: bool) -> int:
        """``set`` for one score in tier ``number``: the request fast path, no mapping or set built.

        Returns the member's new rank in that tier, or 0 when the score did not change.
        """
        values = self.values
        if has_value:
            values[member] = value
        elif member not in values:
            values[member] = None
        tier = self.tiers[number - 1]
        keys = tier.keys
        order = tier.order
        old = keys.get(member)
        seq = self.next_seq
        if old is None:
            key = keys[member] = (score, seq, member)
            self.next_seq = seq - 1
            position = order.insert(key)
            return len(order) - position
        if old[0] == score:
            return 0
        member = old[2]  # keep one bytes object per member alive, not one per update
        key = keys[member] = (score, seq, member)
        self.next_seq = seq - 1
        position = order.move(old, key)
        return len(order) - position

    def delete(self, member: bytes) -> bool:
        """Remove ``member`` from every tier; False when it was not there."""
        if self.values.pop(member, _ABSENT) is _ABSENT:
            return False
        for tier in self.tiers:
            tier.discard(member)
        return True

    def state(self, member: bytes) -> tuple[Any, list[TierState]]:
        """The member's value and per-tier ``(score, seq)``, as stored in logs and snapshots."""
        states: list[TierState] = []
        for tier in self.tiers:
            key = tier.keys.get(member)
            states.append(None if key is None else (key[0], key[1]))
        return self.values[member], states

    def record(self, name: bytes, member: bytes) -> tuple[Any, ...]:
        """The log record of ``member``'s whole state: ``(name, member)`` when it is gone, else
        ``(name, member, value, state1, …)`` with trailing unscored tiers left out."""
        value = self.values.get(member, _ABSENT)
        if value is _ABSENT:
            return (name, member)
        tiers = self.tiers
        if not (tiers[1].keys or tiers[2].keys or tiers[3].keys):  # only tier 1 in use: most boards
            key = tiers[0].keys.get(member)
            return (name, member, value) if key is None else (name, member, value, (key[0], key[1]))
        states: list[Any] = [name, member, value]
        last = 3
        for tier in self.tiers:
            key = tier.keys.get(member)
            if key is None:
                states.append(None)
            else:
                states.append((key[0], key[1]))
                last = len(states)
        return tuple(states[:last])

    def restore(self, member: bytes, value: Any, states: Iterable[TierState]) -> None:
        """Replace the member's whole state with a recorded one (replay of logs); tiers past the
        end of ``states`` are unscored."""
        self.values[member] = value
        for tier, state in itertools.zip_longest(self.tiers, states):
            if state is None:
                tier.discard(member)
            else:
                tier.put((state[0], state[1], member))
                self.next_seq = min(self.next_seq, state[1] - 1)

    def load(self, rows: Iterable[tuple[bytes, Any, list[TierState]]]) -> None:
        """Bulk-restore members into an empty board: one sort per tier instead of n inserts.

        ``rows`` may be a generator streaming from a snapshot, so nothing is held twice.
        """
        columns: list[list[Key]] = [[] for _ in self.tiers]
        low = self.next_seq + 1
        for member, value, states in rows:
            self.values[member] = value
            for column, state in zip(columns, states):
                if state is not None:
                    column.append((state[0], state[1], member))
                    low = min(low, state[1])
        for tier, column in zip(self.tiers, columns):
            tier.keys.update((key[2], key) for key in column)
            tier.order.update(column)
        self.next_seq = low - 1


_ABSENT = object()
