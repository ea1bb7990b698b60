"""The =index stage while it loads: requests wait (a bounded queue), run after the load, in order."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from stagetx.child.control import ProcessControl
from stagetx.stages.index import stage as index_stage
from stagetx.stages.index.commands import Executor
from stagetx.stages.index.stage import Stage
from stagetx.stages.index.store import IndexStore
from tests.unit.test_index_stage import FakeContext, FakeStageConfig, _message

MEMBERS = 1_000


def _filled(base_dir: str, compact: bool = True) -> None:
    """``MEMBERS`` members in board ``b`` (score = number), in a snapshot and a log after it, in
    the directory of the stage's settings ``"scores"``."""
    store = IndexStore(os.path.join(base_dir, "scores"), chunk=50)
    store.open()
    executor = Executor(store, key_size=32)
    for start in range(0, MEMBERS, 100):
        executor.run({b"set:b": {b"m%d" % n: {b"i": n} for n in range(start, start + 100)}})
        store.commit()
        if compact and start == MEMBERS // 2:
            for _ in store.compaction():
                pass
    store.close()


def _one_step(clock: Clock) -> None:
    """Run only the earliest delayed call: one step of the load."""
    call = clock.calls.pop(0)
    call.func(*call.args, **call.kw)


@pytest.fixture(autouse=True)
def one_step_per_turn(monkeypatch) -> None:
    """Each delayed call of the load runs one step (the stage runs steps for up to ``LOAD_SLICE``)."""
    monkeypatch.setattr(index_stage, "LOAD_SLICE", 0.0)


def _starting(context: FakeContext) -> Stage:
    stage = Stage(context, FakeStageConfig("scores"))
    stage.store.chunk = 50  # many steps: the snapshot and the log both take several
    stage.start()
    return stage


def _answers(context: FakeContext) -> list[Any]:
    return [values[0] for _, values in context.replies]


def test_requests_during_the_load_wait_and_are_answered_in_order_from_the_whole_board(context) -> None:
    _filled(context.base_dir)
    stage = _starting(context)
    steps = 0
    for n in range(5):
        _one_step(context.clock)
        steps += 1
        assert not stage.loaded
        stage.receive(_message({"total:b": 0, "set:b": {f"late{n}": {"i": 10_000 + n}}, "get:b": ["m999"]}))
        stage.turn_ended()
    assert context.replies == []  # nothing answered from a half-loaded board
    while not stage.loaded:
        _one_step(context.clock)
        steps += 1
    assert steps > 10
    answers = _answers(context)
    assert [a[b"total:b"] for a in answers] == [MEMBERS + n + 1 for n in range(5)]  # in order, each after the last
    assert [a[b"set:b"] for a in answers] == [{b"late%d" % n: 1} for n in range(5)]
    assert all(a[b"get:b"][b"m999"]["I"][1] == {"i": 999, "d": n + 2} for n, a in enumerate(answers))
    stage.receive(_message({"total:b": 0}))  # and later requests run as they arrive
    stage.turn_ended()
    assert _answers(context)[-1] == {b"total:b": MEMBERS + 5}
    stage.stop()


def test_past_the_bound_a_request_is_answered_with_an_error_at_once(context, monkeypatch) -> None:
    monkeypatch.setattr(index_stage, "LOAD_QUEUE", 3)
    _filled(context.base_dir)
    stage = _starting(context)
    _one_step(context.clock)
    for n in range(5):
        stage.receive(_message({"set:b": {f"q{n}": {"i": n}}}))
    stage.turn_ended()
    refused = _answers(context)
    assert refused == [{"error": "index loading: 3 requests are waiting already; try again"}] * 2
    context.clock.advance(0)
    assert stage.loaded
    # ranked on the whole board: behind m<n>…m999, which were set earlier
    assert _answers(context)[2:] == [{b"set:b": {b"q%d" % n: MEMBERS + 1 - n}} for n in range(3)]
    assert sorted(m for m in stage.store.boards[b"b"].members() if m.startswith(b"q")) == [b"q0", b"q1", b"q2"]
    stage.stop()


def test_a_stop_during_the_load_answers_every_waiting_request(context) -> None:
    _filled(context.base_dir)
    stage = _starting(context)
    _one_step(context.clock)
    stage.receive(_message({"set:b": {"x": {"i": 1}}}))
    stage.stop()
    assert _answers(context) == [{"error": "index stopped before its load was complete"}]
    again = Stage(FakeContext(context.base_dir), FakeStageConfig("scores"))  # the directory was released
    again.start()
    again.context.clock.advance(0)
    assert again.loaded and len(again.store.boards[b"b"]) == MEMBERS and b"x" not in again.store.boards[b"b"]
    again.stop()


def test_a_request_that_reaches_a_stopped_index_is_answered_with_an_error(context) -> None:
    stage = _starting(context)
    context.clock.advance(0)
    stage.store.compact_min_bytes = 0  # a compaction would be due at the next turn's end
    stage.stop()
    stage.receive(_message({"set:b": {"x": {"i": 1}}}))
    stage.turn_ended()
    assert _answers(context) == [{"error": "index stopped"}]
    assert not stage.loaded and not stage.store.compacting


def test_a_load_that_fails_leaves_the_stage_failed_and_answers_every_request_with_why(context) -> None:
    _filled(context.base_dir)
    (snapshot,) = [p for p in Path(context.base_dir, "scores").iterdir() if p.suffix == ".snap"]
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF  # disk corruption in the middle of the snapshot
    snapshot.write_bytes(bytes(data))
    stage = _starting(context)
    stage.receive(_message({"total:b": 0}))
    context.clock.advance(0)
    assert stage.failure is not None and "damaged frame" in stage.failure
    assert not stage.loaded
    stage.receive(_message({"total:b": 0}))
    stage.turn_ended()
    assert _answers(context) == [{"error": stage.failure}] * 2
    assert context.errors == [stage.failure]
    stage.stop()


@pytest.fixture
def context(tmp_path) -> FakeContext:
    return FakeContext(str(tmp_path))


def test_the_admin_index_command_says_still_loading_instead_of_reading_a_half_built_index(context) -> None:
    _filled(context.base_dir)
    stage = _starting(context)
    _one_step(context.clock)
    host = SimpleNamespace(
        group=0,
        stages=[
            SimpleNamespace(name="=index+rank", stage_id="rank", stage=stage, config=SimpleNamespace(type="index"))
        ],
    )
    control = ProcessControl(host, None, 0.0)  # type: ignore[arg-type]
    answers: list[Any] = []
    control.command("index", ["rank"]).addBoth(answers.append)
    assert answers == [(False, "index rank: still loading", None)]
    context.clock.advance(0)
    control.command("index", ["rank"]).addBoth(answers.append)
    assert answers[1] == (True, "", {"b": [MEMBERS, 0, 0, 0]})
    stage.stop()


def test_a_directory_another_process_holds_fails_the_stage_until_it_is_free(context) -> None:
    _filled(context.base_dir)
    holder = IndexStore(os.path.join(context.base_dir, "scores"))
    holder.open()  # the process of a server still stopping, say
    stage = Stage(context, FakeStageConfig("scores"))
    stage.start()
    stage.receive(_message({"get:b": ["m1"], "total:b": 0}))  # reads alone: no write fails them
    stage.turn_ended()
    assert stage.failure is not None and "in use by another process" in stage.failure
    assert _answers(context) == [{"error": stage.failure}], "answered with why, not from an empty index"
    context.clock.advance(index_stage.LOCK_RETRY)
    context.clock.advance(index_stage.LOCK_RETRY)
    assert not stage.loaded and context.errors == [stage.failure], "counted once, not per try"
    holder.close()
    context.clock.advance(index_stage.LOCK_RETRY)
    for _ in range(1000):  # the load's steps (one per turn here)
        if stage.loaded:
            break
        context.clock.advance(0)
    assert stage.loaded and stage.failure is None
    stage.receive(_message({"total:b": 0}))
    stage.turn_ended()
    assert _answers(context)[-1] == {b"total:b": MEMBERS}
    stage.stop()
