"""Durability of index boards: log replay, torn records, snapshots and compaction."""

from __future__ import annotations

import os

import pytest
from twisted.logger import globalLogPublisher

from stagetx.index.commands import Executor
from stagetx.index.store import COMPACT_RATIO, IndexStore, StoreCorrupt, frame, read_frames


def _open(directory: str, **options) -> tuple[IndexStore, Executor]:
    store = IndexStore(directory, **options)
    store.open()
    return store, Executor(store, key_size=64)


def _apply(store: IndexStore, executor: Executor, request: dict) -> dict:
    reply = executor.run(request)
    store.commit()
    return reply


def _state(store: IndexStore) -> dict:
    """Everything observable: values and (score, seq) per tier, for every board."""
    return {name: {member: board.state(member) for member in board.values} for name, board in store.boards.items()}


def _log_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".log"))


def test_frames_stop_at_a_torn_or_corrupt_record() -> None:
    data = frame(b"one") + frame(b"two")
    assert read_frames(data) == ([b"one", b"two"], len(data))
    assert read_frames(data[:-1]) == ([b"one"], len(frame(b"one")))
    damaged = data[:-1] + b"X"
    assert read_frames(damaged)[0] == [b"one"]


def test_replay_restores_values_scores_ranks_and_tie_order(tmp_path) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"a": {b"v": b"A", b"i": 5}, b"b": {b"v": [1, {b"x": 2.5}], b"i": 5}}})
    _apply(store, executor, {b"set:b/2": {b"c": {b"I": {2: 7, 4: -1}}}, b"set:other": {b"z": {b"i": 1}}})
    _apply(store, executor, {b"set:b": {b"a": {b"i": 6}}})
    _apply(store, executor, {b"set:b": {b"a": {b"i": 5}}, b"del:other": [b"z"]})
    before = _state(store)
    store.close()

    again, executor = _open(str(tmp_path))
    assert _state(again) == before
    rows = executor.run({b"forEach:b": [1, 10]})[b"forEach:b"]
    assert [row["k"] for row in rows] == [b"b", b"a"]  # a re-entered the tie last
    # new members still go behind everyone already tied
    assert _apply(again, executor, {b"set:b": {b"d": {b"i": 5}}}) == {b"set:b": {b"d": 3}}
    again.close()


def test_a_torn_last_record_is_ignored_logged_and_cut_off(tmp_path) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"kept": {b"i": 1}}})
    intact = _log_size(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"torn": {b"i": 2}}})
    store.close()
    (log,) = [f for f in os.listdir(tmp_path) if f.endswith(".log")]
    path = os.path.join(tmp_path, log)
    os.truncate(path, os.path.getsize(path) - 3)
    torn = os.path.getsize(path) - intact

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        store, executor = _open(str(tmp_path))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert set(store.boards[b"b"].values) == {b"kept"}
    assert [(e["count"], e["offset"]) for e in events if e.get("log_namespace") == "stagetx.index.store"] == [
        (torn, intact)
    ]
    assert os.path.getsize(path) == intact
    _apply(store, executor, {b"set:b": {b"after": {b"i": 3}}})
    store.close()
    store, _ = _open(str(tmp_path))
    assert set(store.boards[b"b"].values) == {b"kept", b"after"}
    store.close()


def test_compaction_keeps_files_proportional_to_live_data(tmp_path) -> None:
    directory = str(tmp_path)
    store, executor = _open(directory, compact_min_bytes=20_000, chunk=50)
    compactions = 0
    for round_ in range(60):
        _apply(store, executor, {b"set:b": {b"m%d" % i: {b"v": b"x" * 20, b"i": round_ * i} for i in range(200)}})
        if store.wants_compaction():
            for _ in store.compaction():
                # the stage keeps serving between chunks
                _apply(store, executor, {b"set:b": {b"m0": {b"i": -round_}}, b"del:b": [b"m199"]})
            compactions += 1
    assert compactions >= 3
    files = os.listdir(directory)
    assert len([f for f in files if f.endswith(".snap")]) == 1
    assert not [f for f in files if f.endswith(".tmp")]
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    assert total < (COMPACT_RATIO + 2) * max(store.snapshot_bytes, 20_000)
    before = _state(store)
    store.close()
    again, _ = _open(directory)
    assert _state(again) == before
    assert b"m199" not in again.boards[b"b"]
    again.close()


def test_an_abandoned_compaction_leaves_a_loadable_directory(tmp_path) -> None:
    directory = str(tmp_path)
    store, executor = _open(directory, chunk=10)
    _apply(store, executor, {b"set:b": {b"m%d" % i: {b"i": i} for i in range(100)}})
    steps = store.compaction()
    next(steps)
    _apply(store, executor, {b"set:b": {b"late": {b"i": 1000}}})
    steps.close()
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]
    before = _state(store)
    store.close()
    again, _ = _open(directory)
    assert _state(again) == before
    again.close()


def test_a_stale_temporary_snapshot_is_ignored(tmp_path) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"a": {b"i": 1}}})
    store.close()
    (tmp_path / "0000000002.snap.tmp").write_bytes(b"half a snapshot")
    store, _ = _open(str(tmp_path))
    assert b"a" in store.boards[b"b"]
    assert not (tmp_path / "0000000002.snap.tmp").exists()
    store.close()


def test_a_damaged_snapshot_refuses_to_load(tmp_path) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"a": {b"i": 1}}})
    for _ in store.compaction():
        pass
    store.close()
    (snap,) = tmp_path.glob("*.snap")
    data = bytearray(snap.read_bytes())
    data[-2] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt):
        IndexStore(str(tmp_path)).open()


def test_a_second_process_cannot_open_the_same_directory(tmp_path) -> None:
    store, _ = _open(str(tmp_path))
    with pytest.raises(RuntimeError, match="in use"):
        IndexStore(str(tmp_path)).open()
    store.close()
    IndexStore(str(tmp_path)).open()


def test_fsync_policy_and_interval_sync(tmp_path, monkeypatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    store, executor = _open(str(tmp_path), fsync=True)
    _apply(store, executor, {b"set:b": {b"a": {b"i": 1}}})
    assert len(synced) == 1
    store.close()
    synced.clear()
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"a": {b"i": 2}}})
    assert synced == []
    store.sync()
    store.sync()
    assert len(synced) == 1
    store.close()
