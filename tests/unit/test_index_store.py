"""Durability of index boards: log replay, torn records, snapshots and compaction."""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest
from twisted.logger import globalLogPublisher

from stagetx.stages.index import store as store_module
from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import (
    COMPACT_RATIO,
    PLACE_CHECK_INTERVAL,
    IndexStore,
    LogSegment,
    StoreCorrupt,
    frame,
    read_frames,
)
from tests.support import LogCapture


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
    return {name: {member: board.state(member) for member in board.members()} for name, board in store.boards.items()}


def _assert_reopens_as_it_was(directory: str, store: IndexStore) -> None:
    """No partial snapshot is left, and the files load into the state the store had."""
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]
    before = _state(store)
    store.close()
    again, _ = _open(directory)
    assert _state(again) == before
    again.close()


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
    assert set(store.boards[b"b"].members()) == {b"kept"}
    assert [(e["count"], e["offset"]) for e in events if e.get("log_namespace") == "stagetx.stages.index.store"] == [
        (torn, intact)
    ]
    assert os.path.getsize(path) == intact
    _apply(store, executor, {b"set:b": {b"after": {b"i": 3}}})
    store.close()
    store, _ = _open(str(tmp_path))
    assert set(store.boards[b"b"].members()) == {b"kept", b"after"}
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
    _assert_reopens_as_it_was(directory, store)


def test_a_snapshot_is_flushed_as_it_is_written_and_a_failed_flush_fails_the_compaction(tmp_path, monkeypatch) -> None:
    """Each ``SNAPSHOT_SYNC_BYTES`` written reach the disk in the step that wrote them, so the last
    step has no whole file to flush; a flush the disk refuses fails the compaction like a write."""
    directory = str(tmp_path)
    store, executor = _open(directory, chunk=10)
    _apply(store, executor, {b"set:b": {b"m%d" % i: {b"i": i} for i in range(100)}})
    flushed: list[int] = []  # the snapshot's size at each of its flushes (the log's are left out)

    def record(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".snap.tmp"):
            flushed.append(os.fstat(fd).st_size)

    monkeypatch.setattr(store_module, "SNAPSHOT_SYNC_BYTES", 1)
    monkeypatch.setattr(os, "fdatasync", record)
    steps = 0
    for _ in store.compaction():
        steps += 1
        assert len(flushed) == steps  # this step's chunk flushed before the reactor runs again
    assert steps == 10 and flushed == sorted(flushed) and flushed[0] > 0

    def refuse(fd: int) -> None:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(os, "fdatasync", refuse)
    _apply(store, executor, {b"set:b": {b"late": {b"i": 1000}}})
    with pytest.raises(OSError):
        for _ in store.compaction():
            pass
    monkeypatch.undo()  # the disk flushes again
    _assert_reopens_as_it_was(directory, store)


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


class FaultySegment(LogSegment):
    """A log segment whose ``write()`` calls follow ``plan``: a number writes at most that many
    bytes (a short write), an errno raises that OSError; once the plan is used up, writes are real."""

    plan: list[int | OSError] = []

    def write(self, data: memoryview) -> int:
        if not FaultySegment.plan:
            return super().write(data)
        step = FaultySegment.plan.pop(0)
        if isinstance(step, OSError):
            raise step
        return super().write(data[:step])


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EIO = OSError(errno.EIO, "Input/output error")


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setattr(IndexStore, "segment_type", FaultySegment)
    FaultySegment.plan = []
    return FaultySegment.plan


def _board(store: IndexStore, name: bytes = b"b") -> dict:
    board = store.boards[name]
    return {m: (board.value(m), board.tier(1).rank(m), board.tier(1).score(m)) for m in board.members()}


@pytest.mark.parametrize(
    "plan", [[ENOSPC], [7, ENOSPC], [3, 5, EIO], [0]], ids=["enospc", "short+enospc", "2short+eio", "zero"]
)
def test_a_failed_write_leaves_the_log_and_the_boards_as_they_were(tmp_path, faulty, plan) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"a": {b"v": b"A", b"i": 5}, b"b": {b"i": 5}, b"c": {b"i": 1}}})
    before, size = _board(store), _log_size(str(tmp_path))
    faulty.extend(plan)
    # one turn: an update that reorders a tie, a new member, a deletion, a value change
    reply = executor.run({b"set:b": {b"a": {b"i": 9}, b"new": {b"i": 3}}, b"del:b": [b"c"]})
    assert reply[b"set:b"] == {b"a": 1, b"new": 3} and reply[b"del:b"] == 1
    executor.run({b"set:b": {b"b": {b"v": b"B", b"i": 5}}})
    with pytest.raises(OSError):
        store.commit()
    assert _board(store) == before  # undone in memory
    assert _log_size(str(tmp_path)) == size  # cut back to the last whole frame
    assert executor.run({b"get:b": [b"new"]}) == {b"get:b": {}}
    # the log goes on: the next acknowledged write lands right after the last good frame
    _apply(store, executor, {b"set:b": {b"d": {b"i": 7}}})
    expected = _board(store)
    store.close()
    again, _ = _open(str(tmp_path))
    assert _board(again) == expected and b"new" not in again.boards[b"b"]
    again.close()


def test_a_failed_write_restores_float_scores_other_tiers_and_a_widened_tier(tmp_path, faulty) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"a": {b"i": 1.5}, b"b": {b"i": -0.0}}, b"set:b/2": {b"a": {b"i": 7}}})
    before, size = _state(store), _log_size(str(tmp_path))
    faulty.append(ENOSPC)
    # tier 1 takes a score its dense keys cannot hold (0.1: it becomes a tuple tier), tiers 2 and 3 change
    executor.run({b"set:b": {b"a": {b"i": 0.1}, b"b": {b"i": 2.25}}, b"set:b/2": {b"a": {b"i": 8}}})
    executor.run({b"set:b/3": {b"b": {b"i": 4}}, b"del:b": [b"a"]})
    with pytest.raises(OSError):
        store.commit()
    assert _state(store) == before
    assert [store.boards[b"b"].tier(1).rank(m) for m in (b"a", b"b")] == [1, 2]
    assert _log_size(str(tmp_path)) == size
    store.close()


def test_a_write_that_cannot_be_cut_off_seals_its_segment(tmp_path, faulty, monkeypatch) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"a": {b"i": 1}}})
    faulty.extend([5, EIO])
    with monkeypatch.context() as patch:
        patch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(EIO))
        executor.run({b"set:b": {b"lost": {b"i": 2}}})
        with pytest.raises(OSError):
            store.commit()
    logs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".log"))
    assert len(logs) == 1  # the torn one is sealed at the next commit, not before
    for n in range(3, 6):
        _apply(store, executor, {b"set:b": {b"m%d" % n: {b"i": n}}})
    logs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".log"))
    assert len(logs) == 2
    expected = _board(store)
    store.close()
    again, _ = _open(str(tmp_path))  # the sealed segment's torn tail hides nothing after it
    assert _board(again) == expected and b"lost" not in again.boards[b"b"]
    again.close()


def test_a_failed_fsync_is_a_failed_commit(tmp_path, monkeypatch) -> None:
    store, executor = _open(str(tmp_path), fsync=True)
    _apply(store, executor, {b"set:b": {b"a": {b"i": 1}}})
    size = _log_size(str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(EIO))
        executor.run({b"set:b": {b"a": {b"i": 2}}})
        with pytest.raises(OSError):
            store.commit()
    assert _log_size(str(tmp_path)) == size and store.boards[b"b"].tier(1).score(b"a") == 1
    store.close()


def test_a_failed_snapshot_leaves_the_files_and_the_retry_reuses_its_segment(tmp_path, monkeypatch) -> None:
    store, executor = _open(str(tmp_path), compact_min_bytes=1, chunk=2)
    for n in range(10):
        _apply(store, executor, {b"set:b": {b"m%d" % n: {b"i": n}}})
    files = sorted(os.listdir(tmp_path))
    real_fsync = os.fsync

    def snapshot_fsync_fails(fd: int) -> None:  # directories still sync: rotations succeed
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise ENOSPC
        real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", snapshot_fsync_fails)
        for n in range(5):  # a retry storm: each rotation would leave a new segment behind
            _apply(store, executor, {b"set:b": {b"late%d" % n: {b"i": n}}})
            assert store.wants_compaction()
            with pytest.raises(OSError):
                for _ in store.compaction():
                    pass
    after = sorted(os.listdir(tmp_path))
    assert [f for f in after if f not in files] == ["0000000002.log"]  # one new segment
    assert not [f for f in after if f.endswith((".tmp", ".snap"))]
    expected = _board(store)
    for _ in store.compaction():
        pass
    store.close()
    again, _ = _open(str(tmp_path))
    assert _board(again) == expected
    again.close()


def test_a_zero_filled_tail_is_a_torn_record_not_a_frame(tmp_path) -> None:
    store, executor = _open(str(tmp_path))
    _apply(store, executor, {b"set:b": {b"kept": {b"i": 1}}})
    store.close()
    (log,) = [f for f in os.listdir(tmp_path) if f.endswith(".log")]
    with open(os.path.join(tmp_path, log), "ab") as out:
        out.write(b"\0" * 4096)  # a machine crash can leave allocated blocks unwritten
    store, _ = _open(str(tmp_path))
    assert set(store.boards[b"b"].members()) == {b"kept"}
    store.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".damaged")]


def test_damage_followed_by_records_keeps_a_copy_of_the_whole_segment(tmp_path) -> None:
    store, executor = _open(str(tmp_path))
    for member in (b"a", b"b", b"c"):
        _apply(store, executor, {b"set:b": {member: {b"i": 1}}})
    store.close()
    (log,) = [f for f in os.listdir(tmp_path) if f.endswith(".log")]
    path = os.path.join(tmp_path, log)
    data = bytearray(open(path, "rb").read())
    second = len(frame(b"x")) - 1 + len(data) // 3  # somewhere inside the second frame's payload
    data[second] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with LogCapture() as capture:
        store, _ = _open(str(tmp_path))
    assert set(store.boards[b"b"].members()) == {b"a"}
    store.close()
    assert open(path + ".damaged", "rb").read() == bytes(data)  # nothing the damage hid is gone
    assert [e for e in capture.events if e["log_level"].name == "error" and "damaged record" in e["log_format"]]


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_directory_taken_away_is_made_anew_and_gets_every_board_again(tmp_path, how, monkeypatch) -> None:
    monkeypatch.setattr("stagetx.stages.index.store.PLACE_CHECK_INTERVAL", 0)  # every commit looks
    directory = str(tmp_path / "scores")
    store, executor = _open(directory, chunk=10)
    _apply(store, executor, {b"set:b": {b"m%d" % i: {b"v": b"v%d" % i, b"I": {1: i % 7, 3: -i}} for i in range(100)}})
    _apply(store, executor, {b"set:b": {b"m5": {b"i": 3}}, b"del:b": [b"m9"], b"set:c": {b"x": {b"i": 1.5}}})
    old_compaction = store.compaction()
    next(old_compaction)  # under way when the directory goes
    if how == "removed":
        shutil.rmtree(directory)
    else:
        os.rename(directory, str(tmp_path / "scores.old"))
    assert _apply(store, executor, {b"set:b": {b"late": {b"i": 3}, b"m1": {b"v": b"new"}}})[b"set:b"][b"late"] > 0
    # a crash now: the new directory holds what was acknowledged since, whole
    crashed = str(tmp_path / "crashed")
    shutil.copytree(directory, crashed, ignore=shutil.ignore_patterns("LOCK"))
    early, _ = _open(crashed)
    assert _state(early)[b"b"].keys() == {b"late", b"m1"}
    assert early.boards[b"b"].state(b"m1") == store.boards[b"b"].state(b"m1")
    early.close()
    with pytest.raises(OSError):
        for _ in old_compaction:  # its file went with the old directory
            pass
    assert store.wants_compaction(), "only a snapshot holds every board again"
    for _ in store.compaction():
        _apply(store, executor, {b"set:b": {b"m2": {b"i": 6}}})
    assert not store.wants_compaction()
    _assert_reopens_as_it_was(directory, store)


def test_a_directory_made_anew_by_another_process_refuses_the_writes_until_it_is_free(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("stagetx.stages.index.store.PLACE_CHECK_INTERVAL", 0)  # every commit looks
    directory = str(tmp_path / "scores")
    store, executor = _open(directory)
    _apply(store, executor, {b"set:b": {b"m": {b"i": 1}}})
    shutil.rmtree(directory)
    other = IndexStore(directory)
    other.open()
    executor.run({b"set:b": {b"n": {b"i": 2}}})
    with pytest.raises(RuntimeError, match="in use"):
        store.commit()
    assert b"n" not in store.boards[b"b"], "what was not written is not visible"
    other.close()
    _apply(store, executor, {b"set:b": {b"n": {b"i": 2}}})
    for _ in store.compaction():
        pass
    _assert_reopens_as_it_was(directory, store)


def test_the_log_s_place_is_looked_at_most_every_interval_and_a_move_is_kept(tmp_path) -> None:
    """A stat per commit cost as much as a small turn's write; the look is rate-limited, and once
    the log is found moved it stays moved (the store's second look must not be told otherwise)."""
    now = [100.0]
    path = str(tmp_path / "0000000001.log")
    segment = LogSegment(path, clock=lambda: now[0])
    os.remove(path)
    assert segment.in_place()  # within the interval: not looked at
    now[0] += 2 * PLACE_CHECK_INTERVAL
    assert not segment.in_place()
    open(path, "wb").close()  # another file at the path later: still not this log
    now[0] += 2 * PLACE_CHECK_INTERVAL
    assert not segment.in_place() and not segment.in_place()
