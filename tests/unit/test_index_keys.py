"""Dense int keys (``board.encode``) against the tuple keys they replace, by property tests.

A dense tier must rank exactly like a tuple tier for every Lua number: int64, any double, and
the ints and floats that compare equal across types; scores a dense key cannot hold must move
the tier to tuples without changing any answer.
"""

from __future__ import annotations

import math
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from stagetx.stages.index.board import TIERS, Board, DenseTier, TupleTier, decode, encode
from tests.support import board_loaded_from

_INT64 = st.integers(-(2**63), 2**63 - 1)
_DOUBLES = st.floats(allow_nan=False)  # NaN is refused before it reaches a board
_EDGES = st.sampled_from(
    [0, 0.0, -0.0, 2**53, 2**53 + 1, float(2**53), 2.0**-64, 2.0**-65, 0.1, -0.5, 1e300]
    + [2**65 - 1, 2**65, -(2**65), -(2**65) - 1, 2.0**64, 2.0**65, -(2.0**65)]  # the ends of a dense key
)
SCORES = st.one_of(_INT64, _DOUBLES, _EDGES, st.integers(-3, 3), st.sampled_from([0.5, 1.0, 1.5, 2, 2.5]))
SEQS = st.integers(-(2**62), -1)


def _encodable(score: int | float) -> bool:
    """What a dense key holds: |score| < 2**65, a float a multiple of 2**-64."""
    if not -(2**65) <= score < 2**65:
        return False
    return type(score) is int or (score * 2.0**64).is_integer()


def _same(a: int | float, b: int | float) -> bool:
    """Equal with the same type and, for floats, the same bits (so -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    return a == b if type(a) is int else struct.pack("<d", a) == struct.pack("<d", b)


@given(SCORES, SEQS, st.integers(0, 2**32 - 1))
def test_a_key_decodes_to_the_score_and_seq_it_was_made_of(score, seq, slot) -> None:
    if not _encodable(score):
        return
    decoded, decoded_seq = decode(encode(score, seq, slot))
    assert _same(decoded, score) and decoded_seq == seq


@given(SCORES, SCORES, SEQS, SEQS, st.integers(0, 9), st.integers(0, 9))
def test_keys_order_exactly_as_score_seq_tuples(a, b, seq_a, seq_b, slot_a, slot_b) -> None:
    if not (_encodable(a) and _encodable(b)) or seq_a == seq_b:
        return
    key_a, key_b = encode(a, seq_a, slot_a), encode(b, seq_b, slot_b)
    assert (key_a < key_b) == ((a, seq_a) < (b, seq_b))


def _reference() -> Board:
    board = Board()
    board.tiers = [TupleTier() for _ in range(TIERS)]
    return board


MEMBERS = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["set_one", "set_logged"]), MEMBERS, st.integers(1, TIERS), SCORES, st.booleans()),
        st.tuples(st.just("set"), MEMBERS, st.dictionaries(st.integers(1, TIERS), SCORES, max_size=TIERS)),
        st.tuples(st.just("delete"), MEMBERS),
    ),
    max_size=40,
)


def _answers(board: Board, probes: list[int | float]) -> list[object]:
    """Everything a request can read from ``board``, scores compared with their type and sign."""
    out: list[object] = []
    for tier in board.tiers:
        rows = [(rank, repr(score), member, tier.state(member)[1]) for rank, score, member in tier.slice(1, len(tier))]
        out.append((len(tier), rows))
        out.append([tier.rank(member) for member in (b"a", b"b", b"c", b"d", b"e", b"f", b"zz")])
        out.append([repr(tier.score(member)) for member in (b"a", b"b", b"c", b"d", b"e", b"f")])
        out.append([tier.rank_at_most(probe) for probe in probes])
        out.append([(rank, member) for rank, _, member in tier.slice(2, 3)])
    out.append({member: repr(board.record(b"n", member)) for member in (b"a", b"b", b"c", b"d", b"e", b"f")})
    out.append((len(board), sorted(board.members())))
    for number in range(1, TIERS + 1):  # forEach's rows: each with its member's value
        out.append([(rank, repr(score), member, value) for rank, score, member, value in board.rows(number, 1, 9)])
    return out


@settings(max_examples=300, deadline=None)
@given(OPS, st.lists(st.one_of(SCORES, st.sampled_from([math.inf, -math.inf])), max_size=6))
def test_a_board_answers_as_one_on_tuple_keys(ops, probes) -> None:
    """Random sets, multi-tier sets and deletes; then every read, a log replay and a reload."""
    board, reference = Board(), _reference()
    for position, op in enumerate(ops):  # each op sets its own value: a value kept in the wrong place shows
        if op[0] == "set_one":
            _, member, tier, score, has_value = op
            assert board.set_one(member, tier, score, position, has_value) == reference.set_one(
                member, tier, score, position, has_value
            )
        elif op[0] == "set_logged":  # the store's path: with the state before and the record after
            _, member, tier, score, has_value = op
            saved = repr(board.saved(member))
            rank, logged_saved, record = board.set_logged(b"n", member, tier, score, position, has_value)
            assert rank == reference.set_one(member, tier, score, position, has_value)
            assert repr(logged_saved) == saved and repr(record) == repr(board.record(b"n", member))
        elif op[0] == "set":
            assert board.set(op[1], op[2], position, True) == reference.set(op[1], op[2], position, True)
        else:
            assert board.delete(op[1]) == reference.delete(op[1])
        assert board.next_seq == reference.next_seq
    assert _answers(board, probes) == _answers(reference, probes)
    for tier in board.tiers:
        if isinstance(tier, DenseTier):
            tier.order._check()
    # a replay of the members' records, the same replay as a bulk load, and a bulk load of the
    # snapshot chunks give the same board
    replayed, bulk_replayed = Board(), Board(loading=True)
    for member in board.members():
        record = board.record(b"n", member)
        replayed.restore(member, record[2], record[3:])
        bulk_replayed.restore(member, record[2], record[3:])
    bulk_replayed.finish_load()
    loaded = board_loaded_from(board.snapshot_chunks(7))
    for bulk in (bulk_replayed, loaded):
        for tier in bulk.tiers:
            tier.order._check()
    assert _answers(replayed, probes) == _answers(bulk_replayed, probes) == _answers(board, probes)
    assert _answers(loaded, probes) == _answers(board, probes)


def test_an_unencodable_score_moves_the_tier_to_tuples_and_a_reload_makes_it_dense_again() -> None:
    board = Board()
    board.set_one(b"a", 1, 5, None, False)
    board.set_one(b"b", 1, 2.0**-70, None, False)  # finer than 2**-64
    assert isinstance(board.tier(1), TupleTier) and isinstance(board.tier(2), DenseTier)
    assert [member for _, _, member in board.tier(1).slice(1, 5)] == [b"a", b"b"]
    board.set_one(b"b", 1, 6, None, False)
    again = board_loaded_from(board.snapshot_chunks(1))
    assert isinstance(again.tier(1), DenseTier)
    assert [member for _, _, member in again.tier(1).slice(1, 5)] == [b"b", b"a"]


def test_dense_keys_too_large_for_the_order_from_an_older_file_load_as_tuples() -> None:
    """A snapshot of a version without ``Order``'s range may hold dense keys of scores of 2**65
    and more: the load ends with that tier as tuples, answering as before."""
    board = Board(loading=True)
    seq = -5
    keys = [(score << 160) | ((seq - i + 2**62) << 34) | i for i, score in enumerate([2**70, 3, -(2**66)])]
    board.tiers[0].add_keys([b"a", b"b", b"c"], keys, [b"va", b"vb", b"vc"])
    board.finish_load()
    tier = board.tiers[0]
    assert isinstance(tier, TupleTier)
    assert [(rank, score, member) for rank, score, member in tier.slice(1, 3)] == [
        (1, 2**70, b"a"),
        (2, 3, b"b"),
        (3, -(2**66), b"c"),
    ]
    assert [board.value(member) for member in (b"a", b"b", b"c")] == [b"va", b"vb", b"vc"]
