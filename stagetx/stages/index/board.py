"""One scoreboard: members with a value and up to four scored tiers, ranked in O(log n).

Each tier keeps its keys ordered as ``(score, seq, member)`` ascending plus a dict
``member -> key``; rank 1 is the *last* element, so no score is ever negated. ``seq`` is a
per-board counter that *decreases* with every score change: among equal scores the member whose
score was set earlier has the larger ``seq``, sorts later, and ranks higher ("earlier set
first"). A key is one int (``encode``: ``DenseTier``, ordered by the C ``Order``) while every
score of the tier fits one exactly, else the tuple itself (``TupleTier``, ordered by a
``SortedList``).
"""

from __future__ import annotations

import io
import math
import pickle
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, count, repeat
from typing import Any

from sortedcontainers import SortedList

from stagetx.stages.index._order import Order, take_columns

TIERS = 4

Score = int | float
Key = tuple[Score, int, bytes]
# A tier's stored state for one member: (score, seq), or None when unscored in that tier.
TierState = tuple[Score, int] | None
# One tier's state of a run of members (a snapshot chunk), for the scored ones only when a third
# item ``positions`` (their indexes in the run) is there: ``[keys, least_seq(, positions)]`` from
# a ``DenseTier`` (``keys`` the dense keys as ``dump_keys`` bytes, their slots numbered as a bulk
# load gives them, ``least_seq`` no larger than any seq among them), else ``[scores, seqs(, positions)]``.
Column = list[Any]


def dump_keys(keys: list[int]) -> bytes:
    """Dense keys as bytes that ``load_keys`` turns back into ints in one C call (pickle: the one
    decoder in the standard library that makes Python ints of any size without a Python step per
    number; msgpack holds 64 bits)."""
    return pickle.dumps(keys, protocol=5)


class _KeysUnpickler(pickle.Unpickler):
    """Loads a pickled list of ints and refuses any class or function a file could name."""

    def find_class(self, module: str, name: str) -> Any:
        raise ValueError(f"snapshot keys name {module}.{name}: only ints are read")


def load_keys(data: bytes) -> list[int]:
    """The dense keys ``dump_keys`` stored (ValueError for anything but a list)."""
    keys = _KeysUnpickler(io.BytesIO(data)).load()
    if type(keys) is not list:
        raise ValueError(f"snapshot keys are a {type(keys).__name__}, not a list")
    return keys


def _scored(members: list[bytes], keys: dict[bytes, Any]) -> tuple[list[Any], list[int] | None]:
    """The keys of ``members`` in ``keys`` and, when some have none, the positions of those that do
    (``positions`` None: every member has a key)."""
    get = keys.get
    found = [get(member) for member in members]
    if None not in found:  # keys are ints or tuples: never equal to None
        return found, None
    positions = [i for i, key in enumerate(found) if key is not None]
    return [found[i] for i in positions], positions


def _column(scores: list[Any], seqs: list[Any], positions: list[int] | None) -> Column:
    return [scores, seqs] if positions is None else [scores, seqs, positions]


class Ranking(SortedList):  # type: ignore[misc]
    """A ``SortedList`` whose insertions report where the key landed, as a rank from the top: the
    order of a ``TupleTier`` (a ``DenseTier``'s is the C ``Order``, which does the same).

    A score change is a removal, an insertion and a rank lookup; the lookup would search for the
    key the insertion just placed. ``insert`` and ``move`` keep the insertion's position instead,
    which saves two of the six binary searches of an update, and turn it into the index's rank
    (1 = the largest key). They use the sublist layout of
    sortedcontainers 2.x (``_lists``, ``_maxes``, ``_expand``, ``_delete``, ``_loc``) exactly as
    its own ``add`` and ``remove`` do; ``tests/unit/test_index_board.py`` checks the ranks
    and the layout's invariants (``_check``) against a plain sorted list through many sublist
    splits and merges.

    Sublists hold twice sortedcontainers' default load: at a million keys a shorter positional
    index to climb and fewer sublist maxes to search outweigh the longer list shifts (inserts,
    score updates and rank lookups 10–20 % faster at 1M, no change at 100k; docs/index.md).
    """

    DEFAULT_LOAD_FACTOR = 2000

    def insert(self, key: Any) -> int:
        """Add ``key`` (not present); its rank counted from the largest key (1 = largest)."""
        lists = self._lists
        maxes = self._maxes
        if not maxes:
            lists.append([key])
            maxes.append(key)
            self._len = 1
            return 1
        pos, sub, idx = self._put(key)
        self._len += 1
        index = self._index
        if not index or len(sub) > self._load << 1:
            self._expand(pos)  # splits ``sub`` (and drops the index) when it grew too long
            # _loc is "keys in the sublists before pos, plus idx": still right when _expand split
            # ``sub`` and idx now points into the new sublist after it
            return self._len - self._loc(pos, idx)
        # _expand's index update and _loc's walk in one climb: count the key in every node from
        # the leaf up, and add the left sibling of every right child on the way
        node = self._offset + pos
        total = 0
        while node:
            index[node] += 1
            if not node & 1:
                total += index[node - 1]
            node = (node - 1) >> 1
        index[0] += 1
        return self._len - total - idx

    def _put(self, key: Any) -> tuple[int, list[Any], int]:
        """Put ``key`` into the sublist it belongs in: (sublist number, the sublist, index in it)."""
        lists, maxes = self._lists, self._maxes
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
            # a slice assignment shifts the tail with one memmove, where list.insert moves it one
            # pointer at a time: about 250 ns less at the 2,000–4,000 keys of a sublist
            sub[idx:idx] = (key,)
        return pos, sub, idx

    def move(self, old: Any, new: Any) -> int:
        """Replace ``old`` (present) by ``new``; the rank of ``new`` counted from the largest key."""
        lists = self._lists
        maxes = self._maxes
        pos = bisect_left(maxes, old)
        sub = lists[pos]
        idx = bisect_left(sub, old)
        last = len(maxes) - 1
        if (not pos or maxes[pos - 1] < new) and (pos == last or new < lists[pos + 1][0]):
            # ``new`` belongs in the same sublist (a small score change): no length changes
            del sub[idx]
            idx = bisect_right(sub, new)
            sub[idx:idx] = (new,)  # one memmove (see _put)
            maxes[pos] = sub[-1]
            return self._len - self._loc(pos, idx)
        if len(sub) <= (self._load >> 1) + 1 or not self._index:  # ``sub`` will merge, or no index
            self._delete(pos, idx)
            return self.insert(new)
        del sub[idx]
        maxes[pos] = sub[-1]
        target, sub, idx = self._put(new)  # never pos: ``new`` lies beyond a neighbour's keys
        if len(sub) > self._load << 1:
            self._expand(target)  # splits ``sub`` and drops the index: _loc rebuilds it
            return self._len - self._loc(target, idx)
        # one key less below ``pos``'s leaf and one more below ``target``'s: the counts change
        # only under their common ancestor; _loc's sum of left siblings in the same climb
        index = self._index
        offset = self._offset
        gone = offset + pos
        node = offset + target
        total = 0
        while gone != node:  # the leaves are on one level: they meet at the common ancestor
            index[gone] -= 1
            index[node] += 1
            if not node & 1:
                total += index[node - 1]
            gone = (gone - 1) >> 1
            node = (node - 1) >> 1
        while node:
            if not node & 1:
                total += index[node - 1]
            node = (node - 1) >> 1
        return self._len - total - idx


class NotDense(Exception):
    """A score or sequence number that a dense int key cannot hold exactly."""


# The dense key: one int, its bits from the least significant (``encode``, ``decode`` and
# ``DenseTier`` build and read it with these shifts):
#   [0, 32)    slot: the member's slot in its tier (``_SLOTS`` per tier)
#   [32, 34)   kind: 0 an int score, 1 a float, 2 the float -0.0 (so decode gives the type back)
#   [34, 96)   seq + 2**62: the tier's sequence number, offset to be non-negative
#   [96, 225)  score * 2**64, signed (so an int score is also ``score << 160``): |score| < 2**65
# Int order is ``(score, seq)`` order; seqs are unique in a tier, so kind and slot never decide.
# ``Order`` holds keys in [-2**225, 2**225): its inline copy of ``key >> 34`` is 192 bits.
_SCALE = 2.0**64  # a float score's fixed-point factor: exact (a power of two)
_SEQ_SPAN = 1 << 62  # seqs in [-2**62, 0) fit the key's sequence field
_SEQ_MASK = _SEQ_SPAN - 1
_SLOTS = 1 << 32  # member slots per tier
_SLOT = _SLOTS - 1
_FLOAT_BITS = 3 << 32  # the kind field: zero for an int score
_INT_BOUND = 1 << 65  # |score| of a dense key
_FIXED_BOUND = _INT_BOUND << 64  # |score * 2**64|
_HEAD_BOUND = _FIXED_BOUND << 96  # |key|, and of its score part ("head") alone


def _fixed(score: Score) -> tuple[int, int]:
    """``(score * 2**64, kind)`` as exact ints; kind 0 int, 1 float, 2 the float -0.0.

    Raises NotDense for a float that is not a multiple of 2**-64 (tiny fractions, inf, NaN) and
    for a score of 2**65 or more in size.
    """
    if type(score) is int:
        if not -_INT_BOUND <= score < _INT_BOUND:
            raise NotDense(score)
        return score << 64, 0
    if type(score) is not float:
        raise NotDense(score)
    scaled = score * _SCALE
    if not scaled.is_integer() or not -_FIXED_BOUND <= scaled < _FIXED_BOUND:
        raise NotDense(score)
    fixed = int(scaled)
    return fixed, 2 if not fixed and math.copysign(1.0, score) < 0 else 1


def encode(score: Score, seq: int, slot: int) -> int:
    """The dense key of ``(score, seq)`` for the member in ``slot`` (the layout above); exact for
    every int score and every float that is a multiple of 2**-64. An int score (nearly every one)
    takes its fixed point and kind (0) in one shift."""
    if type(score) is int:
        head = score << 160
        if not -_HEAD_BOUND <= head < _HEAD_BOUND:
            raise NotDense(score)
    else:
        fixed, kind = _fixed(score)
        head = (fixed << 96) | (kind << 32)
    if not -_SEQ_SPAN <= seq < 0 or not 0 <= slot < _SLOTS:
        raise NotDense(seq)
    return head | ((seq + _SEQ_SPAN) << 34) | slot


def decode(key: int) -> tuple[Score, int]:
    """``(score, seq)`` of a dense key, the score of the type it was set with."""
    kind = (key >> 32) & 3
    seq = ((key >> 34) & _SEQ_MASK) - _SEQ_SPAN
    if kind == 0:
        return key >> 160, seq
    if kind == 1:
        return (key >> 96) / (1 << 64), seq  # correctly rounded, so exact: the value is a float
    return -0.0, seq


class _RankedTier:
    """What both tier kinds share: a member → key map and the keys in ascending order."""

    __slots__ = ("keys", "order")

    keys: dict[bytes, Any]
    order: Ranking | Order

    def __len__(self) -> int:
        return len(self.keys)

    def rank(self, member: bytes) -> int | None:
        """1-based rank of ``member`` (1 = highest score), None when unscored here."""
        key = self.keys.get(member)
        if key is None:
            return None
        return len(self.order) - self.order.bisect_left(key)


class TupleTier(_RankedTier):
    """The ranked members of one tier as ``(score, seq, member)`` tuples: exact for any score.

    The fallback of ``DenseTier`` for scores a dense key cannot hold.
    """

    __slots__ = ()

    def __init__(self) -> None:
        self.keys: dict[bytes, Key] = {}
        self.order: Ranking = Ranking()

    def score(self, member: bytes) -> Score | None:
        key = self.keys.get(member)
        return None if key is None else key[0]

    def state(self, member: bytes) -> TierState:
        key = self.keys.get(member)
        return None if key is None else (key[0], key[1])

    def change(self, member: bytes, score: Score, seq: int) -> int:
        """Give ``member`` ``score`` with ``seq`` unless it has that score: its new rank, or 0."""
        keys = self.keys
        order = self.order
        old = keys.get(member)
        if old is None:
            key = keys[member] = (score, seq, member)
            return order.insert(key)
        if old[0] == score:
            return 0
        member = old[2]  # keep one bytes object per member alive, not one per update
        key = keys[member] = (score, seq, member)
        return order.move(old, key)

    def put(self, member: bytes, score: Score, seq: int) -> None:
        """Insert or replace ``member``'s key, whatever its score was (log replay)."""
        old = self.keys.get(member)
        if old is not None:
            self.order.remove(old)
        key = self.keys[member] = (score, seq, member)
        self.order.add(key)

    def discard(self, member: bytes) -> None:
        key = self.keys.pop(member, None)
        if key is not None:
            self.order.remove(key)

    def load(self, column: list[Key]) -> None:
        """Bulk-insert keys into an empty tier: one sort instead of n inserts."""
        self.keys.update((key[2], key) for key in column)
        self.order.update(column)

    def add_unsorted(
        self, members: list[bytes], scores: list[Any], seqs: list[int], values: list[Any] | None = None
    ) -> None:
        """Bulk load: map new ``members`` to their keys; ``sort`` builds the order at the end.
        (``values`` is for ``DenseTier``: a board keeps the values of a tuple tier's members.)"""
        self.keys.update(zip(members, zip(scores, seqs, members)))

    def add_keys(self, members: list[bytes], keys: list[int], values: list[Any] | None = None) -> None:
        """Bulk load of a ``DenseTier``'s column (a tier that had to become tuples meanwhile)."""
        self.keys.update((member, (*decode(key), member)) for member, key in zip(members, keys))  # type: ignore[misc]

    def put_unsorted(self, member: bytes, score: Score, seq: int) -> None:
        """``put`` during a bulk load: the key map only."""
        self.keys[member] = (score, seq, member)

    def discard_unsorted(self, member: bytes) -> None:
        """``discard`` during a bulk load: the key map only."""
        self.keys.pop(member, None)

    def sort(self) -> None:
        """End of a bulk load: build the (empty) order from the key map in one sort."""
        self.order.update(self.keys.values())

    def columns(self, members: list[bytes], first_slot: int) -> Column | None:
        """The ``Column`` of ``members`` in this tier; None when none of them is scored here."""
        found, positions = _scored(members, self.keys)
        if not found:
            return None
        return _column([key[0] for key in found], [key[1] for key in found], positions)

    def rank_at_most(self, score: Score) -> int | None:
        """Rank of the highest-ranked member whose score is ≤ ``score``; None if there is none."""
        return _rank_below(self.order, self.order.bisect_left((score, math.inf)))

    def slice(self, first: int, count: int) -> Iterator[tuple[int, Score, bytes]]:
        """``(rank, score, member)`` for ``count`` members from rank ``first`` (1-based) down."""
        first = max(first, 1)
        return ((rank, key[0], key[2]) for rank, key in enumerate(_keys_from(self.order, first, count), first))


class DenseTier(_RankedTier):
    """The ranked members of one tier as one int per member (``encode``).

    Its ``Order`` compares the keys' inline copies in C and reads no Python object, where a
    sorted list of tuples (or of ints) reads one or two scattered objects per comparison: at a
    million members each is a cache miss, and they were most of an update's time. The
    key's low bits name the member's slot in ``slots`` (kept across score changes, reused after
    a delete), which gives ``forEach`` and ``range`` the member of a key without a second dict,
    and ``values`` the member's value in the same slot (the board keeps its members' values
    there in tier 1, so a member needs one dict entry, not two; None in the other tiers).
    Raises NotDense (changing nothing) for a score it cannot hold; the board then converts the
    tier to a ``TupleTier``.
    """

    __slots__ = ("slots", "free", "values")

    def __init__(self) -> None:
        self.keys: dict[bytes, int] = {}
        self.slots: list[bytes | None] = []
        self.values: list[Any] = []
        self.free: list[int] = []
        self.order = Order()

    def score(self, member: bytes) -> Score | None:
        key = self.keys.get(member)
        return None if key is None else decode(key)[0]

    def state(self, member: bytes) -> TierState:
        key = self.keys.get(member)
        if key is None:
            return None
        if not key & _FLOAT_BITS:  # decode() inlined for an int score: every logged change asks
            return key >> 160, ((key >> 34) & _SEQ_MASK) - _SEQ_SPAN
        return decode(key)

    def _slot(self, member: bytes) -> int:
        """A free slot, now holding ``member``; NotDense (changing nothing) when none is left."""
        if self.free:
            slot = self.free.pop()
            self.slots[slot] = member
            return slot
        slot = len(self.slots)
        if slot >= _SLOTS:
            raise NotDense(member)
        self.slots.append(member)
        self.values.append(None)
        return slot

    def change(self, member: bytes, score: Score, seq: int) -> int:
        """Give ``member`` ``score`` with ``seq`` unless it has that score: its new rank, or 0."""
        old = self.keys.get(member)
        if old is not None:
            return self.rescore(member, old, score, seq)
        key = self.keys[member] = encode(score, seq, 0) | self._slot(member)  # NotDense before a slot is taken
        return self.order.insert(key)

    def rescore(self, member: bytes, old: int, score: Score, seq: int) -> int:
        """``change`` of a member whose key is ``old``."""
        key = encode(score, seq, old & _SLOT)
        if old >> 96 == key >> 96:  # the same score (and kind)
            return 0
        self.keys[member] = key
        return self.order.move(old, key)

    def put(self, member: bytes, score: Score, seq: int) -> None:
        """Insert or replace ``member``'s key, whatever its score was (log replay)."""
        old = self.keys.get(member)
        key = encode(score, seq, self._slot(member) if old is None else old & _SLOT)
        if old is not None:
            self.order.remove(old)
        self.keys[member] = key
        self.order.add(key)

    def discard(self, member: bytes) -> None:
        key = self.keys.pop(member, None)
        if key is not None:
            self.slots[key & _SLOT] = self.values[key & _SLOT] = None
            self.free.append(key & _SLOT)
            self.order.remove(key)

    def columns(self, members: list[bytes], first_slot: int) -> Column | None:
        """The ``Column`` of ``members`` in this tier (None when none of them is scored here): their
        keys renumbered to the slots from ``first_slot`` on, which a bulk load that has put
        ``first_slot`` members into this tier before them gives them (``add_keys``)."""
        found, positions = _scored(members, self.keys)
        if not found:
            return None
        least = min((key >> 34) & _SEQ_MASK for key in found) - _SEQ_SPAN
        keys = [(key >> 32 << 32) | slot for slot, key in zip(count(first_slot), found)]
        return [dump_keys(keys), least] if positions is None else [dump_keys(keys), least, positions]

    def add_unsorted(
        self, members: list[bytes], scores: list[Any], seqs: list[int], values: list[Any] | None = None
    ) -> None:
        """Bulk load: map new ``members`` to their keys (their ``values`` to their slots, else
        None); ``sort`` builds the order at the end.

        Raises NotDense, having changed nothing, when a seq or a float score does not fit a dense
        key (an int score too large for ``Order`` shows at ``Board.finish_load``).
        """
        if seqs and (min(seqs) < -_SEQ_SPAN or max(seqs) >= 0):
            raise NotDense(seqs)
        base = len(self.slots)
        if base + len(members) > _SLOTS:
            raise NotDense(len(members))
        try:
            # encode() inlined for int scores: a float score raises TypeError at its shift
            keys = [
                (score << 160) | ((seq + _SEQ_SPAN) << 34) | slot for slot, score, seq in zip(count(base), scores, seqs)
            ]
        except TypeError:
            keys = [encode(score, seq, slot) for slot, score, seq in zip(count(base), scores, seqs)]
        self._extend(members, keys, values)

    def add_keys(self, members: list[bytes], keys: list[int], values: list[Any] | None = None) -> None:
        """Bulk load of a column of dense keys (``columns``) for new ``members`` (and their
        ``values``, else None). Their slots are the ones a load gives them when the column was
        written for this point of the load (checked at both ends of the run); else they are
        renumbered."""
        base = len(self.slots)
        if base + len(members) > _SLOTS:
            raise NotDense(len(members))
        if keys and (keys[0] & _SLOT != base or keys[-1] & _SLOT != base + len(keys) - 1):
            keys = [(key >> 32 << 32) | slot for slot, key in zip(count(base), keys)]
        self._extend(members, keys, values)

    def _extend(self, members: list[bytes], keys: list[int], values: list[Any] | None) -> None:
        self.slots.extend(members)
        self.values.extend(values if values is not None else repeat(None, len(members)))
        self.keys.update(zip(members, keys))

    def put_unsorted(self, member: bytes, score: Score, seq: int) -> None:
        """``put`` during a bulk load: the key map only (NotDense as ``add_unsorted``)."""
        keys = self.keys
        old = keys.get(member)
        if type(score) is int and -_SEQ_SPAN <= seq < 0:  # encode() inlined: every replayed record
            key = (score << 160) | ((seq + _SEQ_SPAN) << 34)
        else:
            key = encode(score, seq, 0)  # NotDense before a slot is taken
        keys[member] = key | (self._slot(member) if old is None else old & _SLOT)

    def discard_unsorted(self, member: bytes) -> None:
        """``discard`` during a bulk load: the key map only."""
        key = self.keys.pop(member, None)
        if key is not None:
            self.slots[key & _SLOT] = self.values[key & _SLOT] = None
            self.free.append(key & _SLOT)

    def sort(self) -> None:
        """End of a bulk load: build the (empty) order from the key map in one sort."""
        self.order.update(self.keys.values())

    def unsorted_tuples(self) -> TupleTier:
        """This tier's key map as a ``TupleTier``'s, its order not built yet (bulk load)."""
        tier = TupleTier()
        tier.keys = {member: (*decode(key), member) for member, key in self.keys.items()}  # type: ignore[misc]
        return tier

    def tuples(self) -> TupleTier:
        """The same ranking as a ``TupleTier``."""
        tier = TupleTier()
        tier.load([(*decode(key), member) for member, key in self.keys.items()])
        return tier

    def rank_at_most(self, score: Score) -> int | None:
        """Rank of the highest-ranked member whose score is ≤ ``score``; None if there is none."""
        if type(score) is int:
            floor = score << 64
        elif math.isinf(score):
            return _rank_below(self.order, len(self.order) if score > 0 else 0)
        else:
            scaled = score * _SCALE
            # beyond 2**960 the scaling overflows, but such a float is an int already
            floor = math.floor(scaled) if math.isfinite(scaled) else int(score) << 64
        return _rank_below(self.order, self.order.bisect_left((floor + 1) << 96))

    def slice(self, first: int, count: int) -> Iterator[tuple[int, Score, bytes]]:
        """``(rank, score, member)`` for ``count`` members from rank ``first`` (1-based) down."""
        first = max(first, 1)
        slots = self.slots
        keys = list(_keys_from(self.order, first, count))
        # decode() inlined column by column: a top-100 decodes 100 keys per request
        scores = [key >> 160 if not key & _FLOAT_BITS else decode(key)[0] for key in keys]
        return zip(range(first, first + len(keys)), scores, [slots[key & _SLOT] for key in keys])  # type: ignore[arg-type]

    def slice_values(self, first: int, count: int) -> Iterator[tuple[int, Score, bytes, Any]]:
        """``slice`` with the value in each member's slot (tier 1's: the board keeps them there)."""
        first = max(first, 1)
        keys = list(_keys_from(self.order, first, count))
        slots = [key & _SLOT for key in keys]
        scores = [key >> 160 if not key & _FLOAT_BITS else decode(key)[0] for key in keys]
        members, values = self.slots, self.values
        return zip(
            range(first, first + len(keys)),
            scores,
            [members[slot] for slot in slots],  # type: ignore[misc]
            [values[slot] for slot in slots],
        )


Tier = DenseTier | TupleTier


def _rank_below(order: Ranking | Order, index: int) -> int | None:
    """The rank of the key just below ascending position ``index``; None at the bottom."""
    return None if index == 0 else len(order) - index + 1


def _keys_from(order: Ranking | Order, first: int, count: int) -> Iterator[Any]:
    """``count`` keys from rank ``first`` (≥ 1) downwards."""
    size = len(order)
    if count <= 0 or first > size:
        return iter(())
    stop = size - first + 1
    return order.islice(max(stop - count, 0), stop, reverse=True)


class Board:
    """A named index: every member's value and its scores in ``TIERS`` tiers.

    A tier starts dense (``DenseTier``) and becomes a ``TupleTier`` for good, in this process,
    the first time it is given a score a dense key cannot hold; a start loads it dense again
    when every score fits.

    The value of a member scored in tier 1 while that tier is dense is kept in the tier's slot of
    the member (``DenseTier.values``): most members then cost one dict entry (tier 1's key map),
    not two, and a start builds one dict per member. The values of the other members (unscored
    in tier 1, or every member once tier 1 holds tuples) are in ``others``.

    A board made with ``loading=True`` is being bulk-loaded: ``add_columns``, ``restore`` and
    ``delete`` fill its maps only, and ``finish_load`` sorts each tier once; it answers nothing
    before that.
    """

    __slots__ = ("others", "tiers", "next_seq", "loading")

    def __init__(self, loading: bool = False) -> None:
        self.others: dict[bytes, Any] = {}
        self.tiers: list[Tier] = [DenseTier() for _ in range(TIERS)]
        self.next_seq = -1
        self.loading = loading

    def __len__(self) -> int:
        first = self.tiers[0]
        return len(self.others) + (len(first.keys) if type(first) is DenseTier else 0)

    def __contains__(self, member: bytes) -> bool:
        return member in self.tiers[0].keys or member in self.others

    def members(self) -> Iterator[bytes]:
        """Every member, once."""
        first = self.tiers[0]
        return chain(first.keys, self.others) if type(first) is DenseTier else iter(self.others)

    def value(self, member: bytes, default: Any = None) -> Any:
        """The member's value; ``default`` when it is not on the board."""
        first = self.tiers[0]
        if type(first) is DenseTier:
            key = first.keys.get(member)
            if key is not None:
                return first.values[key & _SLOT]
        return self.others.get(member, default)

    def rows(self, number: int, first: int, count: int) -> Iterator[tuple[int, Score, bytes, Any]]:
        """``(rank, score, member, value)`` for ``count`` members of tier ``number`` from rank
        ``first`` (1-based) down."""
        tier = self.tiers[number - 1]
        if number == 1 and type(tier) is DenseTier:
            return tier.slice_values(first, count)
        value = self.value
        return ((rank, score, member, value(member)) for rank, score, member in tier.slice(first, count))

    def _store_value(self, member: bytes, value: Any) -> None:
        """Keep ``value`` where the member's value belongs now (after its tiers changed)."""
        first = self.tiers[0]
        if type(first) is DenseTier:
            key = first.keys.get(member)
            if key is not None:
                first.values[key & _SLOT] = value
                if self.others:
                    self.others.pop(member, None)
                return
        self.others[member] = value

    def tier(self, number: int) -> Tier:
        """Tier ``number`` (1-based)."""
        return self.tiers[number - 1]

    def _widen(self, index: int) -> TupleTier:
        """Convert tier ``index`` (0-based) to tuples, for a score it could not hold."""
        tier = self.tiers[index]
        if isinstance(tier, DenseTier):
            if index == 0:  # its members' values move to ``others``
                values = tier.values
                self.others.update((member, values[key & _SLOT]) for member, key in tier.keys.items())
            tier = self.tiers[index] = tier.unsorted_tuples() if self.loading else tier.tuples()
        return tier

    def _change(self, index: int, member: bytes, score: Score, seq: int) -> int:
        try:
            return self.tiers[index].change(member, score, seq)
        except NotDense:
            return self._widen(index).change(member, score, seq)

    def set(self, member: bytes, scores: Mapping[int, Score], value: Any, has_value: bool) -> set[int]:
        """Create or update ``member``; returns the tiers (1-based) whose score changed.

        ``has_value`` False keeps the stored value (a new member then gets None). A changed score
        takes a fresh ``seq``, so the member ranks after members that already had that score.
        """
        if not has_value:
            value = self.value(member)
        seq = self.next_seq
        changed = {number for number, score in scores.items() if self._change(number - 1, member, score, seq)}
        if changed:
            self.next_seq = seq - 1
        self._store_value(member, value)
        return changed

    def set_one(self, member: bytes, number: int, score: Score, value: Any, has_value: bool) -> int:
        """``set`` for one score in tier ``number``: the request fast path, no mapping or set built.

        Returns the member's new rank in that tier, or 0 when the score did not change.
        """
        tier = self.tiers[number - 1]
        seq = self.next_seq
        try:
            rank = tier.change(member, score, seq)
        except NotDense:
            tier = self._widen(number - 1)
            rank = tier.change(member, score, seq)
        if rank:
            self.next_seq = seq - 1
        others = self.others
        if number == 1 and type(tier) is DenseTier:  # the member's value lives in its slot here
            if has_value:
                tier.values[tier.keys[member] & _SLOT] = value
                if others:
                    others.pop(member, None)
            elif others and member in others:  # first scored in tier 1 now
                tier.values[tier.keys[member] & _SLOT] = others.pop(member)
        elif has_value:
            self._store_value(member, value)
        elif member not in others:
            first = self.tiers[0]
            if type(first) is not DenseTier or member not in first.keys:
                others[member] = None  # a new member
        return rank

    def set_logged(
        self, name: bytes, member: bytes, number: int, score: Score, value: Any, has_value: bool
    ) -> tuple[int, tuple[Any, ...], tuple[Any, ...]]:
        """``set_one``, and what the store keeps of it: the member's ``saved`` state before and its
        log ``record`` after. A member of a board scored in a dense tier 1 only, given a new int
        score there (nearly every request), has its key looked up once rather than five times."""
        first, second, third, fourth = self.tiers
        if (
            number == 1
            and type(score) is int
            and type(first) is DenseTier
            and not (second.keys or third.keys or fourth.keys)
        ):
            old = first.keys.get(member)
            if old is not None:
                seq = self.next_seq
                try:
                    rank = first.rescore(member, old, score, seq)
                except NotDense:
                    rank = 0  # the general path below widens the tier
                if rank:
                    self.next_seq = seq - 1
                    values = first.values
                    slot = old & _SLOT
                    before = values[slot]
                    if has_value:
                        values[slot] = value
                    return rank, (before, old), (name, member, value if has_value else before, (score, seq))
        # anything else, an unchanged score (whose value alone may change) included: nothing has
        # changed yet, and the general path does it all
        saved = self.saved(member)
        rank = self.set_one(member, number, score, value, has_value)
        return rank, saved, self.record(name, member)

    def delete(self, member: bytes) -> bool:
        """Remove ``member`` from every tier; False when it was not there."""
        if member not in self:
            return False
        for tier in self.tiers:
            if self.loading:
                tier.discard_unsorted(member)
            else:
                tier.discard(member)
        self.others.pop(member, None)
        return True

    def state(self, member: bytes) -> tuple[Any, list[TierState]]:
        """The member's value and per-tier ``(score, seq)``, as stored in logs and snapshots."""
        return self.value(member), [tier.state(member) for tier in self.tiers]

    def record(self, name: bytes, member: bytes) -> tuple[Any, ...]:
        """The log record of ``member``'s whole state: ``(name, member)`` when it is gone, else
        ``(name, member, value, state1, …)`` with trailing unscored tiers left out."""
        value = self.value(member, _ABSENT)
        if value is _ABSENT:
            return (name, member)
        tiers = self.tiers
        if not (tiers[1].keys or tiers[2].keys or tiers[3].keys):  # only tier 1 in use: most boards
            state = tiers[0].state(member)
            return (name, member, value) if state is None else (name, member, value, state)
        states: list[Any] = [name, member, value]
        last = 3
        for tier in tiers:
            state = tier.state(member)
            states.append(state)
            if state is not None:
                last = len(states)
        return tuple(states[:last])

    def saved(self, member: bytes) -> tuple[Any, ...]:
        """``member``'s whole state as stored, not decoded: ``(value, key in tier 1, …)``, the value
        ``_ABSENT`` when the member is gone, trailing tiers left out when no member is scored in
        them. Cheaper to take than ``record``: the store keeps one per change for a rollback that
        seldom comes, and ``saved_record`` decodes it then."""
        first, second, third, fourth = self.tiers
        key: Any = first.keys.get(member)
        if key is not None and type(first) is DenseTier:
            value = first.values[key & _SLOT]
        else:
            value = self.others.get(member, _ABSENT)
        if not (second.keys or third.keys or fourth.keys):  # only tier 1 in use: most boards
            return (value, key)
        return (value, key, second.keys.get(member), third.keys.get(member), fourth.keys.get(member))

    def restore(self, member: bytes, value: Any, states: Sequence[TierState]) -> None:
        """Replace the member's whole state with a recorded one (replay of logs); tiers past the
        end of ``states`` are unscored."""
        loading = self.loading
        tiers = self.tiers
        if (
            loading
            and len(states) == 1
            and states[0] is not None
            and not (tiers[1].keys or tiers[2].keys or tiers[3].keys)
        ):
            # a board scored in tier 1 only, at the start: most replayed records
            score, seq = states[0]  # type: ignore[misc]
            try:
                tiers[0].put_unsorted(member, score, seq)
            except NotDense:
                self._widen(0).put_unsorted(member, score, seq)
            if seq <= self.next_seq:
                self.next_seq = seq - 1
            self._store_value(member, value)
            return
        for index, tier in enumerate(tiers):
            state = states[index] if index < len(states) else None
            if state is None:
                if not tier.keys:
                    continue
                if loading:
                    tier.discard_unsorted(member)
                else:
                    tier.discard(member)
                continue
            score, seq = state
            try:
                tier.put_unsorted(member, score, seq) if loading else tier.put(member, score, seq)
            except NotDense:
                tier = self._widen(index)
                tier.put_unsorted(member, score, seq) if loading else tier.put(member, score, seq)
            self.next_seq = min(self.next_seq, seq - 1)
        self._store_value(member, value)

    def snapshot_chunks(self, size: int) -> Iterator[list[Any]]:
        """The board's snapshot, ``size`` members per chunk (each as ``columns`` gives it, for
        ``add_columns``): tier 1's members in ascending key order, then those unscored there. A
        snapshot in this order loads with a sort that finds its input sorted.

        The chunks may be taken while the board keeps changing (a compaction writes one per
        reactor turn): a change made meanwhile is in the log segment the compaction started,
        which replays over the snapshot. A board scored in a dense tier 1 only (most boards) is
        copied now, as it is (C-level copies, no Python step per member), and its chunks read
        nothing of the board again; any other board's chunks hold the members present when each
        is taken, as they are then.
        """
        first, *rest = self.tiers
        keys = first.order[:]
        if type(first) is DenseTier and not any(tier.keys for tier in rest):
            copies = (list(first.slots), list(first.values), list(self.others.items()))
            return _dense_chunks(keys, *copies, self.next_seq + 1, size)
        if isinstance(first, DenseTier):
            slots = list(first.slots)
            unscored = list(self.others)

            def members(chunk: list[Any]) -> list[bytes]:
                return [slots[key & _SLOT] for key in chunk]  # type: ignore[misc]

        else:
            unscored = [member for member in self.others if member not in first.keys]

            def members(chunk: list[Any]) -> list[bytes]:
                return [key[2] for key in chunk]

        def chunks() -> Iterator[list[Any]]:
            written = [0] * TIERS  # each tier's members in the chunks so far
            for start in range(0, len(keys), size):
                yield self.columns(members(keys[start : start + size]), written)
            for start in range(0, len(unscored), size):
                yield self.columns(unscored[start : start + size], written)

        return chunks()

    def columns(self, members: list[bytes], written: list[int] | None = None) -> list[Any]:
        """The snapshot chunk of ``members``: ``[members, values, tier 1 Column or None, …]`` with
        the members no longer present left out and trailing unused tiers too. ``written`` counts
        the members of each tier in the snapshot's earlier chunks of this board (and is advanced):
        the dense keys are numbered for the slots a load gives them."""
        present = [member for member in members if member in self]
        value = self.value
        chunk: list[Any] = [present, [value(member) for member in present]]
        if written is None:
            written = [0] * TIERS
        for index, tier in enumerate(self.tiers):
            column = tier.columns(present, written[index]) if tier.keys else None
            if column is not None:
                written[index] += len(column[2]) if len(column) == 3 else len(present)
            chunk.append(column)
        while chunk[-1] is None:
            chunk.pop()
        return chunk

    def add_columns(self, chunk: list[Any]) -> None:
        """Bulk-load the members of one snapshot chunk (``columns``) into this loading board."""
        assert self.loading, "add_columns fills a loading board"
        members, values = chunk[0], chunk[1]
        in_first: list[int] | None = []  # positions of the members whose value is in tier 1's slots
        for index, column in enumerate(chunk[2:]):
            if column is None:
                continue
            positions = column[2] if len(column) == 3 else None
            scored = members if positions is None else [members[i] for i in positions]
            placed = None  # tier 1 keeps the values of its members in their slots
            if index == 0:
                placed = values if positions is None else [values[i] for i in positions]
            if type(column[0]) is bytes:  # a DenseTier's keys
                keys = load_keys(column[0])
                if len(keys) != len(scored):
                    raise ValueError(f"snapshot column of {len(keys)} keys for {len(scored)} members")
                if not keys:
                    continue
                self.next_seq = min(self.next_seq, column[1] - 1)
                try:
                    self.tiers[index].add_keys(scored, keys, placed)
                except NotDense:
                    self._widen(index).add_keys(scored, keys, placed)
            else:
                scores, seqs = column[0], column[1]
                if not seqs:
                    continue
                self.next_seq = min(self.next_seq, min(seqs) - 1)
                try:
                    self.tiers[index].add_unsorted(scored, scores, seqs, placed)
                except NotDense:
                    self._widen(index).add_unsorted(scored, scores, seqs, placed)
            if index == 0 and type(self.tiers[0]) is DenseTier:
                in_first = positions  # None: all of them
        tier_one = self.tiers[0]
        if type(tier_one) is not DenseTier:  # every value is in ``others``
            self.others.update(zip(members, values))
            return
        slotted = members if in_first is None else [members[i] for i in in_first]
        rest = [] if in_first is None else sorted(set(range(len(members))).difference(in_first))
        # a member both in tier 1's slots and in ``others`` (a damaged snapshot) would count twice
        if (slotted and self.others and not self.others.keys().isdisjoint(slotted)) or (
            rest and not tier_one.keys.keys().isdisjoint(members[i] for i in rest)
        ):
            raise ValueError("the snapshot names a member twice")
        self.others.update((members[i], values[i]) for i in rest)

    def finish_load(self) -> None:
        """End of a bulk load: one sort per tier (next to nothing when the keys came in order).

        A dense tier whose keys the C ``Order`` cannot hold (a score of 2**65 or more in size, as
        a snapshot or log of an older version may have) becomes tuples here, where ``Order``
        checks every key anyway, rather than by a look at every key as it is loaded."""
        for index, tier in enumerate(self.tiers):
            try:
                tier.sort()
            except OverflowError:
                self._widen(index).sort()
        self.loading = False


_ABSENT = object()


def _dense_chunks(
    keys: list[int],
    slots: list[bytes | None],
    values: list[Any],
    unscored: list[tuple[bytes, Any]],
    least: int,
    size: int,
) -> Iterator[list[Any]]:
    """``Board.snapshot_chunks`` of a board scored in a dense tier 1 only, from copies of its
    order, slots and values and of its unscored members' values: each key names its member's
    slot, so a chunk is read by position (``take_columns``, in C), with no dict look-up, and taken
    out of the copies, which are let go of as the chunks are written. The keys are renumbered to
    the slots a load gives the members (their places in the snapshot); ``least`` (the board's
    next seq + 1 at the copy) is no larger than any of their seqs."""
    for start in range(0, len(keys), size):
        members, chunk_values, renumbered = take_columns(keys, start, start + size, slots, values)
        yield [members, chunk_values, [dump_keys(renumbered), least]]
    for start in range(0, len(unscored), size):
        part = unscored[start : start + size]
        yield [[member for member, _ in part], [value for _, value in part]]


def saved_record(name: bytes, member: bytes, saved: tuple[Any, ...]) -> tuple[Any, ...]:
    """The log record (as ``Board.record`` gives it, unscored tiers as None) of a state taken by
    ``Board.saved``: a dense tier keeps an int key, a tuple tier ``(score, seq, member)``."""
    value = saved[0]
    if value is _ABSENT:
        return (name, member)
    states = [None if key is None else decode(key) if type(key) is int else (key[0], key[1]) for key in saved[1:]]
    return (name, member, value, *states)
