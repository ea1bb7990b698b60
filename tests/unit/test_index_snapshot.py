"""The snapshot file format: rank-ordered column chunks that bulk-load, and the older format."""

from __future__ import annotations

import os
import pickle
import random

import msgpack
import pytest

from stagetx.stages.index.board import DenseTier, TupleTier, dump_keys, encode, load_keys
from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore, StoreCorrupt, frame
from tests.unit.test_index_store import _apply, _open


def _observed(store: IndexStore, executor: Executor) -> dict:
    """Values, per-tier (score, seq) and every tier's ranking as forEach lists it."""
    state = {name: {member: board.state(member) for member in board.members()} for name, board in store.boards.items()}
    rankings = {
        (name, tier): executor.run({b"forEach:%s/%d" % (name, tier): [1, 10_000]})
        for name in store.boards
        for tier in range(1, 5)
    }
    return {"state": state, "rankings": rankings}


def _check_orders(store: IndexStore) -> None:
    for board in store.boards.values():
        for tier in board.tiers:
            tier.order._check()  # sortedcontainers' own invariants of the sublist layout
            assert len(tier.order) == len(tier.keys)


def _compact(store: IndexStore) -> None:
    for _ in store.compaction():
        pass


def _snapshot(directory: str) -> list:
    (name,) = [f for f in os.listdir(directory) if f.endswith(".snap")]
    with open(os.path.join(directory, name), "rb") as file:
        data = file.read()
    records = []
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        records.append(msgpack.unpackb(data[offset + 8 : offset + 8 + length], raw=False, strict_map_key=False))
        offset += 8 + length
    return records


def test_a_snapshot_is_written_in_rank_order_and_loads_the_same_boards(tmp_path) -> None:
    directory = str(tmp_path)
    store, executor = _open(directory, chunk=7)
    rng = random.Random(5)
    members = {b"m%03d" % i: rng.randrange(-50, 50) for i in range(120)}
    _apply(store, executor, {b"set:b": {m: {b"v": [m, 1], b"i": s} for m, s in members.items()}})
    # unscored in tier 1 but scored in tier 3; a float a dense key cannot hold; a deleted member
    _apply(store, executor, {b"set:b/3": {b"only3": {b"i": 2}, b"m001": {b"i": 9}}})
    _apply(store, executor, {b"set:b/2": {b"m002": {b"i": 1e-30}, b"m003": {b"i": 4}}, b"del:b": [b"m004"]})
    _apply(store, executor, {b"set:floats": {b"x": {b"i": 1.5}, b"y": {b"i": -0.0}, b"z": {b"i": 7}}})
    _compact(store)
    before = _observed(store, executor)
    store.close()

    records = _snapshot(directory)
    assert records[0] == ["stagetx-index", 3]
    ranked = [m for r in records if r[0] == "columns" and len(r) > 3 and r[3] for m in r[1]]
    tier1 = {m: s for m, s in members.items() if m != b"m004"}
    assert ranked[: len(tier1)] == sorted(tier1, key=lambda m: store.boards[b"b"].tier(1).keys[m])
    # tier 1's dense keys are stored whole, their slots numbered as the load hands them out
    board_b = records[1 : records.index(["end-board"]) + 1]
    stored = [key for r in board_b if r[0] == "columns" and len(r) > 3 and r[3] for key in load_keys(r[3][0])]
    assert [key & 0xFFFFFFFF for key in stored] == list(range(len(tier1)))

    again, executor = _open(directory)
    assert _observed(again, executor) == before
    _check_orders(again)
    assert isinstance(again.boards[b"b"].tier(1), DenseTier)
    assert isinstance(again.boards[b"b"].tier(2), TupleTier)  # 1e-30 is no multiple of 2**-64
    # the loaded board keeps working: a new member, a tie behind everyone already tied
    tied = max(tier1.values())
    rank = _apply(again, executor, {b"set:b": {b"new": {b"i": tied}}})[b"set:b"][b"new"]
    assert rank == sum(1 for s in tier1.values() if s >= tied) + 1
    again.close()


def test_changes_made_while_the_snapshot_is_written_survive_the_load(tmp_path) -> None:
    directory = str(tmp_path)
    store, executor = _open(directory, chunk=10)
    _apply(store, executor, {b"set:b": {b"m%03d" % i: {b"i": i} for i in range(100)}})
    step = 0
    for _ in store.compaction():
        step += 1
        _apply(
            store,
            executor,
            {
                b"set:b": {b"m%03d" % (99 - step): {b"i": 1000 + step}, b"late%d" % step: {b"i": step}},
                b"del:b": [b"m%03d" % step],
            },
        )
        if step == 3:
            _apply(store, executor, {b"del:b": [b"late1"], b"set:b/2": {b"late1": {b"i": 5}}})
    before = _observed(store, executor)
    store.close()
    again, executor = _open(directory)
    assert _observed(again, executor) == before
    _check_orders(again)
    again.close()


def _write_v1(directory: str, boards: dict[bytes, tuple[int, list]]) -> None:
    """A snapshot in format 1: ``rows`` records of whole member states, in no particular order."""
    pack = msgpack.Packer(use_bin_type=True).pack
    with open(os.path.join(directory, "0000000001.snap"), "wb") as out:
        out.write(frame(pack(["stagetx-index", 1])))
        for name, (next_seq, rows) in boards.items():
            out.write(frame(pack(["board", name, next_seq])))
            out.write(frame(pack(["rows", rows])))
            out.write(frame(pack(["end-board"])))
        out.write(frame(pack(["end", len(boards)])))


def test_a_format_1_snapshot_still_loads_and_the_next_compaction_writes_format_3(tmp_path) -> None:
    directory = str(tmp_path)
    rows = [[b"a", b"A", [5, -1]], [b"b", None, [5, -2]], [b"c", {b"k": 1}, None, [2.5, -3]]]
    _write_v1(directory, {b"old": (-4, rows)})
    store, executor = _open(directory)
    ranking = executor.run({b"forEach:old": [1, 10]})[b"forEach:old"]
    assert [(row["k"], row["i"], row["d"]) for row in ranking] == [(b"a", 5, 1), (b"b", 5, 2)]  # a set first
    assert store.boards[b"old"].state(b"c") == ({b"k": 1}, [None, (2.5, -3), None, None])
    before = _observed(store, executor)
    _apply(store, executor, {b"set:old": {b"d": {b"i": 1}}})  # something to compact onto
    _compact(store)
    store.close()
    assert _snapshot(directory)[0] == ["stagetx-index", 3]
    again, executor = _open(directory)
    after = _observed(again, executor)
    del after["state"][b"old"][b"d"]
    assert after["state"] == before["state"]
    again.close()


def test_a_snapshot_naming_a_member_twice_or_of_an_unknown_format_refuses_to_load(tmp_path) -> None:
    pack = msgpack.Packer(use_bin_type=True).pack
    twice = tmp_path / "twice"
    twice.mkdir()
    with open(twice / "0000000001.snap", "wb") as out:
        out.write(frame(pack(["stagetx-index", 2])))
        out.write(frame(pack(["board", b"b", -3])))
        out.write(frame(pack(["columns", [b"a"], [None], [[1], [-1]]])))
        out.write(frame(pack(["columns", [b"a"], [None], [[2], [-2]]])))
        out.write(frame(pack(["end-board"])))
        out.write(frame(pack(["end", 1])))
    with pytest.raises(StoreCorrupt, match="names a member twice"):
        IndexStore(str(twice)).open()

    # once scored in tier 1 (its value in the slot), once unscored (its value in the board's dict)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    tier_one = [dump_keys([encode(1, -1, 0)]), -1]
    _write_snapshot(str(mixed), 3, b"b", -2, [[[b"a"], [None], tier_one], [[b"a"], [None]]])
    with pytest.raises(StoreCorrupt, match="names a member twice"):
        IndexStore(str(mixed)).open()

    future = tmp_path / "future"
    future.mkdir()
    (future / "0000000001.snap").write_bytes(frame(pack(["stagetx-index", 4])))
    with pytest.raises(StoreCorrupt, match="format 4"):
        IndexStore(str(future)).open()


def _write_snapshot(directory: str, version: int, board: bytes, next_seq: int, chunks: list[list]) -> None:
    pack = msgpack.Packer(use_bin_type=True).pack
    with open(os.path.join(directory, "0000000001.snap"), "wb") as out:
        out.write(frame(pack(["stagetx-index", version])))
        out.write(frame(pack(["board", board, next_seq])))
        for chunk in chunks:
            out.write(frame(pack(["columns", *chunk])))
        out.write(frame(pack(["end-board"])))
        out.write(frame(pack(["end", 1])))


def test_a_format_2_snapshot_of_scores_and_seqs_still_loads(tmp_path) -> None:
    directory = str(tmp_path)
    # b and c scored in tier 1 (c set first), a only in tier 2
    chunks = [[[b"b", b"c"], [b"B", None], [[5, 5], [-2, -1]]], [[b"a"], [b"A"], None, [[1.5], [-3]]]]
    _write_snapshot(directory, 2, b"old", -4, chunks)
    store, executor = _open(directory)
    top = executor.run({b"forEach:old": [1, 10], b"get:old/2": [b"a"]})
    assert [(row["k"], row["i"], row["d"]) for row in top[b"forEach:old"]] == [(b"c", 5, 1), (b"b", 5, 2)]
    assert top[b"get:old/2"] == {b"a": {"v": b"A", "I": {2: {"i": 1.5, "d": 1}}}}
    assert store.boards[b"old"].next_seq == -4
    store.close()


def test_stored_keys_that_name_anything_but_ints_refuse_to_load(tmp_path) -> None:
    """The keys are unpickled with every class and function refused: a snapshot cannot make the
    load call anything."""
    directory = str(tmp_path)
    called = pickle.dumps([1, os.getpid])  # a GLOBAL opcode, as any callable a file could name
    _write_snapshot(directory, 3, b"b", -2, [[[b"a", b"b"], [None, None], [called, -1]]])
    with pytest.raises(StoreCorrupt, match="only ints are read"):
        IndexStore(directory).open()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    _write_snapshot(str(wrong), 3, b"b", -2, [[[b"a", b"b"], [None, None], [dump_keys([1 << 200]), -1]]])
    with pytest.raises(StoreCorrupt, match="1 keys for 2 members"):
        IndexStore(str(wrong)).open()
