"""The C ``Order`` of a dense tier against a plain sorted list: ranks, positions, slices and its
own invariants through many leaf splits and merges, and what it refuses without changing."""

from __future__ import annotations

import random
import sys
from bisect import bisect_left, bisect_right, insort

import pytest

from stagetx.stages.index._order import Order, take_columns

_BOUND = 1 << 225  # keys it holds: [-2**225, 2**225)


class _Keys:
    """Dense-key-shaped ints: a score (small, int64-sized or near the bound), a fresh seq each
    (so no two share ``key >> 34``), and random low bits that must never decide the order."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seq = 1 << 62

    def __call__(self) -> int:
        self.seq -= 1
        score = self.rng.choice(
            [self.rng.randrange(-40, 40), self.rng.randrange(-(2**63), 2**63), self.rng.choice([-(2**65), 2**65 - 1])]
        )
        return (score << 160) | (self.seq << 34) | self.rng.randrange(1 << 34)


def _same(order: Order, reference: list[int]) -> None:
    order._check()
    assert len(order) == len(reference)
    assert list(order) == reference
    assert order[:] == reference


@pytest.mark.parametrize("seed", range(6))
def test_ranks_positions_and_slices_match_a_sorted_list(seed: int) -> None:
    rng = random.Random(seed)
    make = _Keys(rng)
    order, reference = Order(), sorted(make() for _ in range(rng.randrange(0, 2_000)))
    order.update(reference)
    _same(order, reference)
    for step in range(6_000):
        roll = rng.random()
        if roll < 0.35 or not reference:
            key = make()
            insort(reference, key)
            assert order.insert(key) == len(reference) - bisect_left(reference, key)
        elif roll < 0.65:
            old, new = rng.choice(reference), make()
            reference.remove(old)
            insort(reference, new)
            assert order.move(old, new) == len(reference) - bisect_left(reference, new)
        elif roll < 0.9:
            key = rng.choice(reference)
            reference.remove(key)
            order.remove(key)
        else:
            probe = rng.choice(reference) if rng.random() < 0.5 else make()
            assert order.bisect_left(probe) == bisect_left(reference, probe)
            assert order.bisect_right(probe) == bisect_right(reference, probe)
        if step % 1_000 == 0:
            _same(order, reference)
            start, stop = sorted(rng.randrange(-2, len(reference) + 3) for _ in range(2))
            assert list(order.islice(start, stop)) == reference[max(start, 0) : max(stop, 0)]
            assert order[start:stop] == reference[start:stop]  # negative positions as a list's
            assert list(order.islice(start, stop, reverse=True)) == reference[max(start, 0) : max(stop, 0)][::-1]
    _same(order, reference)
    while reference:  # down to nothing: every leaf merged away
        key = reference.pop(rng.randrange(len(reference)))
        order.remove(key)
    _same(order, [])


def test_ints_beyond_its_range_are_placed_at_the_ends_and_refused_as_keys() -> None:
    order, keys = Order(), [-(2**200), -5, 0, 7 << 34, 2**224]
    order.update(keys)
    for probe in (-_BOUND - 1, -(2**300), _BOUND, 2**300, -_BOUND, _BOUND - 1):
        assert order.bisect_left(probe) == bisect_left(keys, probe)
    for bad in (_BOUND, -_BOUND - 1, 2**300):
        with pytest.raises(OverflowError):
            order.insert(bad)
        with pytest.raises(OverflowError):
            order.move(0, bad)
    with pytest.raises(TypeError):
        order.insert(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        order[0]  # type: ignore[index]
    with pytest.raises(ValueError):
        order[::2]
    with pytest.raises(ValueError):
        order.remove(3)  # not held
    with pytest.raises(ValueError):
        order.move(3, 9 << 34)
    _same(order, keys)


def test_a_bulk_load_sorts_and_refuses_two_keys_of_one_score_and_seq() -> None:
    order = Order()
    with pytest.raises(ValueError):
        order.update([5 << 34, (5 << 34) | 1])  # same key >> 34: no order between them
    _same(order, [])
    keys = list(range(0, 10_000 << 34, 1 << 34))
    random.Random(1).shuffle(keys)
    order.update(keys)
    _same(order, sorted(keys))
    order.update([-(1 << 34), 10_001 << 34])  # not empty: added one by one
    _same(order, sorted([*keys, -(1 << 34), 10_001 << 34]))


def test_it_holds_a_reference_to_each_key_until_the_key_leaves() -> None:
    key, other = (1 << 200) + 12345, (1 << 200) + (1 << 40)
    alone = sys.getrefcount(key)
    order = Order()
    order.insert(key)
    assert sys.getrefcount(key) == alone + 1
    order.move(key, other)
    assert sys.getrefcount(key) == alone
    order.update([])
    order.insert(key)
    del order
    assert sys.getrefcount(key) == alone


def test_take_columns_reads_each_keys_member_and_value_by_its_slot_and_renumbers_it() -> None:
    """A snapshot chunk: the low 32 bits of a key (two's complement, negative scores too) name its
    slot; the key comes back with its position in the whole list as its slot, all else kept; the
    key, its member and its value are taken out of the lists (None left in their places)."""
    rng = random.Random(3)
    make = _Keys(rng)
    slots = [b"m%d" % i for i in range(300)]
    values = [None if i % 2 else {"v": i} for i in range(300)]
    keys = [(make() >> 32 << 32) | slot for slot in rng.sample(range(300), 250)]
    keys.sort()
    original, original_slots, original_values = list(keys), list(slots), list(values)
    for start, stop in ((0, 100), (100, 200), (200, 999), (250, 260)):
        members, found, renumbered = take_columns(keys, start, stop, slots, values)
        chunk = original[start:stop]
        assert members == [original_slots[key & 0xFFFFFFFF] for key in chunk]
        assert found == [original_values[key & 0xFFFFFFFF] for key in chunk]
        assert renumbered == [(key >> 32 << 32) | position for position, key in enumerate(chunk, start)]
        assert keys[start:stop] == [None] * len(chunk)
    assert keys == [None] * 250
    taken = {key & 0xFFFFFFFF for key in original}
    assert [slots[i] is None for i in range(300)] == [i in taken for i in range(300)]
    assert all(values[i] is None for i in taken)
    member = bytes(bytearray(b"member"))  # an object of its own: its count is this test's
    copy = [member]
    refs = sys.getrefcount(member)
    (moved,), _, _ = take_columns([0], 0, 1, copy, [None])
    assert moved is member and copy == [None] and sys.getrefcount(member) == refs  # moved, not copied


def test_take_columns_refuses_keys_without_a_member_and_what_is_not_a_list_of_ints() -> None:
    slots, values = [b"a", b"b"], [None, None]
    with pytest.raises(IndexError):
        take_columns([(7 << 34) | 2], 0, 1, slots, values)
    with pytest.raises(IndexError):
        take_columns([1], 0, 1, slots, [None])
    with pytest.raises(TypeError):
        take_columns([1.0], 0, 1, slots, values)
    with pytest.raises(TypeError):
        take_columns((1,), 0, 1, slots, values)
    with pytest.raises(ValueError):
        take_columns([1], 1, 0, slots, values)
    with pytest.raises(IndexError):  # a slot named twice: its member was taken already
        take_columns([1, 1 | (1 << 34)], 0, 2, slots, values)
    member = bytes(bytearray(b"member"))
    refs = sys.getrefcount(member)
    for _ in range(100):  # each fails at the second key: what the first moved is let go of
        copy = [None, member]
        with pytest.raises(IndexError):
            take_columns([1, 9], 0, 2, copy, [None, None])
        assert copy == [None, None]
    assert sys.getrefcount(member) == refs  # every copy's reference let go of with its failed chunk
