"""The pure ranked structure and the request executor over it, without files; the same requests on
both backends (embedded and Redis) are tests/integration/test_index_board.py."""

from __future__ import annotations

import random
from typing import Any

import pytest

from stagetx.stages.index.board import Board, DenseTier, Ranking
from stagetx.stages.index.commands import Executor, IndexMessage, RequestError, parse_key, read_message
from tests.support import board_loaded_from


class MemoryBoards:
    """``commands.Boards`` in memory, remembering which members changed."""

    def __init__(self) -> None:
        self.boards: dict[bytes, Board] = {}
        self.changes: list[tuple[bytes, bytes]] = []

    def board(self, name: bytes, create: bool) -> Board | None:
        if create and name not in self.boards:
            self.boards[name] = Board()
        return self.boards.get(name)

    def changing(self, name: bytes, board: Board, member: bytes) -> None:
        pass

    def changed(self, name: bytes, board: Board, member: bytes) -> None:
        self.changes.append((name, member))

    def set_one(
        self, name: bytes, board: Board, member: bytes, number: int, score: Any, value: Any, has_value: bool
    ) -> int:
        rank = board.set_one(member, number, score, value, has_value)
        self.changes.append((name, member))
        return rank

    def check_value(self, value: Any) -> None:
        if isinstance(value, set):
            raise RequestError("value cannot be stored")


def test_parse_key_reads_the_original_short_forms() -> None:
    """One-letter commands and ``?`` before the index name, as the original platform's scripts
    write them (``"s?index"``, ``"#1.g:board/2"``)."""
    for short, op in ((b"s", b"set"), (b"d", b"del"), (b"g", b"get"), (b"r", b"range"), (b"f", b"forEach")):
        assert parse_key(short + b"?index").op == op
    command = parse_key(b"#3.t?board/2")
    assert (command.op, command.name, command.tier, command.order) == (b"total", b"board", 2, (0, 3))
    assert parse_key(b"get?board").op == b"get"


def test_read_message_tells_request_tables_from_direct_commands() -> None:
    assert read_message("callback", None) == IndexMessage(None, "callback")
    assert read_message("q", "got") == IndexMessage(None, None)
    assert read_message("s?index", None) == IndexMessage("s?index", None)
    assert read_message("t?index", "total_callback") == IndexMessage("t?index", None)
    assert read_message("get_callback", "g?index") == IndexMessage("g?index", "get_callback")


def test_parse_key_reads_order_name_and_tier() -> None:
    command = parse_key(b"#12.range:top/scores/3")
    assert (command.op, command.name, command.tier, command.order) == (b"range", b"top/scores", 3, (0, 12))
    assert parse_key("get:b").tier == 1


def test_ranks_match_a_sorted_model_under_random_updates() -> None:
    rng = random.Random(7)
    board = Board()
    model: dict[bytes, tuple[int, int]] = {}  # member -> (score, time of last score change)
    for step in range(3000):
        member = b"m%d" % rng.randrange(200)
        if rng.random() < 0.1:
            board.delete(member)
            model.pop(member, None)
            continue
        score = rng.randrange(50)
        if board.set(member, {1: score}, None, False):
            model[member] = (score, step)
    expected = sorted(model, key=lambda m: (-model[m][0], model[m][1]))
    tier = board.tier(1)
    assert [member for _, _, member in tier.slice(1, len(expected))] == expected
    assert all(tier.rank(m) == i for i, m in enumerate(expected, 1))


def test_the_one_member_fast_path_matches_the_general_path() -> None:
    """Bytes keys ``{i, v}`` of one member take ``_set_one``; str keys or two members the general
    path: both must give the same replies, values, ranks, tie order and change reports."""
    rng = random.Random(7)
    fast, general = MemoryBoards(), MemoryBoards()
    run_fast, run_general = Executor(fast, key_size=8).run, Executor(general, key_size=8).run
    for step in range(2000):
        member, score = b"m%d" % rng.randrange(50), rng.choice([rng.randrange(20), rng.randrange(20) + 0.5])
        tier = rng.randrange(1, 5)
        spec: dict[Any, Any] = {b"i": score} if rng.random() < 0.5 else {b"i": score, b"v": step}
        reply = run_fast({b"set:b/%d" % tier: {member: spec}})
        slow_spec = {key.decode(): value for key, value in spec.items()}
        slow = run_general({b"set:b/%d" % tier: {member: slow_spec, b"": None}})
        assert slow[b"set:b/%d" % tier] == {"error": "member ids must be non-empty strings"}
        slow = run_general({b"set:b/%d" % tier: {member: slow_spec}})
        assert reply == slow
    for bad in ({b"i": float("nan")}, {b"i": "x"}, {b"i": 1, b"w": 2}, {b"v": 1}):
        assert run_fast({b"set:b": {b"m1": bad}}) == run_general({b"set:b": {b"m1": bad}})
    assert run_fast({b"set:b": {b"too-long-id": {b"i": 1}}}) == {b"set:b": {"error": "member id longer than 8 bytes"}}
    everyone = [b"m%d" % i for i in range(50)]
    assert run_fast({b"get:b": everyone}) == run_general({b"get:b": everyone})
    assert fast.changes == general.changes
    board = fast.boards[b"b"]
    assert {m: board.record(b"b", m) for m in board.members()} == {
        m: general.boards[b"b"].record(b"b", m) for m in board.members()
    }


@pytest.mark.parametrize("seed", range(5))
def test_ranking_positions_match_a_sorted_list_through_splits_and_merges(seed: int) -> None:
    """``Ranking.insert``/``move`` report the rank from the top that ``bisect_left`` gives, with a load factor
    small enough that sublists split and merge many times."""
    rng = random.Random(seed)
    ranking = Ranking()
    ranking._reset(4)  # sublists of 4–8 keys: every few operations split or merge one
    plain: list[tuple[int, int, bytes]] = []
    keys: dict[bytes, tuple[int, int, bytes]] = {}
    for seq in range(-1, -3001, -1):
        member = b"m%d" % rng.randrange(300)
        key = (rng.randrange(50), seq, member)
        old = keys.get(member)
        if old is None:
            rank = ranking.insert(key)
        else:
            plain.remove(old)
            rank = ranking.move(old, key)
        keys[member] = key
        plain.append(key)
        plain.sort()
        assert rank == len(plain) - plain.index(key)
        if rng.random() < 0.2:  # a plain removal between moves, to shrink sublists too
            gone = keys.pop(rng.choice(list(keys)))
            plain.remove(gone)
            ranking.remove(gone)
        ranking._check()
    assert list(ranking) == plain


def test_a_value_follows_its_member_into_and_out_of_tier_1() -> None:
    """Tier 1 keeps its members' values in their slots, the board the others': a value set while
    the member was unscored in tier 1 stays with it as it gains and loses a tier-1 score, and when
    tier 1 turns to tuples."""
    board = Board()
    board.set(b"a", {2: 5}, "A", True)  # scored in tier 2 only
    board.set_one(b"a", 1, 7, None, False)  # now in tier 1 too, its value kept
    assert board.value(b"a") == "A" and b"a" not in board.others
    board.restore(b"a", "A2", [None, (5, -9)])  # a replayed state without tier 1
    assert board.value(b"a") == "A2" and board.others == {b"a": "A2"}
    board.set_one(b"b", 1, 3, "B", True)
    board.set_one(b"c", 3, 1, None, False)  # a new member outside tier 1: value None
    assert (len(board), board.value(b"b"), board.value(b"c", "absent")) == (3, "B", None)
    board.set_one(b"d", 1, 2.0**-70, "D", True)  # tier 1 turns to tuples: every value moves out
    assert board.others == {b"a": "A2", b"b": "B", b"c": None, b"d": "D"}
    assert board.delete(b"b") and board.value(b"b", "absent") == "absent" and len(board) == 3
    board.set_one(b"d", 1, 4, None, False)  # every tier-1 score fits a dense key again
    again = board_loaded_from(board.snapshot_chunks(2))
    assert isinstance(again.tier(1), DenseTier)  # a reload makes it dense: d's value in its slot
    assert {m: again.value(m) for m in again.members()} == {b"a": "A2", b"c": None, b"d": "D"}
    assert again.others == {b"a": "A2", b"c": None}


def _contents(board: Board) -> list[Any]:
    """Every member's value and tier-1 rank, score and seq, in rank order, and the unscored."""
    rows = [
        (rank, member, score, board.tiers[0].state(member), board.value(member))
        for rank, score, member, _ in board.rows(1, 1, len(board))
    ]
    unscored = sorted((member, board.value(member)) for member in board.members() if member not in board.tiers[0].keys)
    return [rows, unscored, board.next_seq]


@pytest.mark.parametrize("dense", [True, False])
def test_snapshot_chunks_taken_while_the_board_changes_load_a_sound_board(dense: bool) -> None:
    """A compaction takes the chunks over many turns while requests change the board. A board
    scored in a dense tier 1 only is written as it was when the chunks were asked for (a
    deleted member's slot reused by a new member meanwhile included); any other board as it is
    when each chunk is taken. Either way the changes made meanwhile replay over the result."""
    board = Board()
    for i in range(40):
        board.set_one(b"m%02d" % i, 1, (i * 7) % 13, b"v%d" % i if i % 3 else None, i % 3 > 0)
    board.set(b"loose", {}, b"unscored", True)
    if not dense:
        board.set_one(b"m01", 2, 5, None, False)
    before = _contents(board)
    assert before[1] == [(b"loose", b"unscored")]
    chunks = board.snapshot_chunks(6)
    taken = [next(chunks)]
    board.delete(b"m05")  # its slot goes to the next new member
    board.set_one(b"new", 1, 99, b"fresh", True)
    board.set_one(b"m07", 1, -4, b"moved", True)
    board.delete(b"loose")
    taken += list(chunks)
    loaded = board_loaded_from(taken)
    if dense:
        assert _contents(loaded) == before
    for member in (b"m05", b"new", b"m07", b"loose"):  # the log segment's records, replayed
        record = board.record(b"n", member)
        if len(record) == 2:
            loaded.delete(member)
        else:
            loaded.restore(member, record[2], record[3:])
    assert _contents(loaded)[:2] == _contents(board)[:2]


def test_set_logged_gives_the_state_before_and_the_record_after_on_every_path() -> None:
    """The store's set: a new int score on a dense tier-1-only board (the one-look-up path), the
    same score with a new value, a new member, a score a dense key cannot hold, another tier."""
    board = Board()
    board.set_one(b"a", 1, 10, b"va", True)
    board.set_one(b"b", 1, 20, None, False)
    cases = [
        (b"a", 1, 30, None, False),  # new score, value kept
        (b"b", 1, 5, b"vb", True),  # new score and value
        (b"a", 1, 30, b"va2", True),  # same score, new value
        (b"c", 1, 7, None, False),  # a new member
        (b"b", 1, 2**70, None, False),  # beyond a dense key: tier 1 becomes tuples
        (b"a", 2, 1, None, False),  # another tier
    ]
    for member, number, score, value, has_value in cases:
        before = board.saved(member)
        rank, saved, record = board.set_logged(b"n", member, number, score, value, has_value)
        assert repr(saved) == repr(before)
        assert record == board.record(b"n", member)
        assert rank == (0 if score == 30 and has_value else board.tier(number).rank(member))
    assert [board.value(member) for member in (b"a", b"b", b"c")] == [b"va2", b"vb", None]
