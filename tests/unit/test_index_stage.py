"""The =index stage edge: settings, messages to replies, durability order, fsync timer, compaction."""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger

from stagetx.codec import pack_py
from stagetx.message import Message, Sender
from stagetx.stages.index import stage as index_stage
from stagetx.stages.index.stage import IndexSettings, Stage, parse_settings
from tests.support import LogCapture


@attrs.define
class FakeContext:
    """The StageContext a host would give, recording replies."""

    base_dir: str
    clock: Clock = attrs.Factory(Clock)
    stage_id: str = "rank"
    name: str = "=index+rank"
    instance: int = 0
    log: Logger = attrs.Factory(lambda: Logger(namespace="test.index"))
    replies: list[tuple[Message, tuple[Any, ...]]] = attrs.Factory(list)
    answered: list[tuple[str, tuple[Any, ...]]] = attrs.Factory(list)  # (sender's handler, values)
    errors: list[str | None] = attrs.Factory(list)

    def count_error(self, error: str | None = None) -> None:
        self.errors.append(error)

    def resolve_path(self, path: str) -> str:
        return os.path.join(self.base_dir, path)

    def reply(self, message: Message, *values: Any) -> None:
        if message.reply is not None:
            self.replies.append((message, values))

    def reply_all(self, replies: Sequence[tuple[Message, Any]]) -> None:
        for message, value in replies:
            self.reply(message, value)

    def answer_sender(self, message: Message, msgid: str, *values: Any) -> None:
        self.answered.append((msgid, values))

    def send(self, target: str, *values: Any) -> tuple[bool, str | None]:
        raise AssertionError("the index stage only replies")


@attrs.frozen
class FakeStageConfig:
    settings: Any


def _message(*values: Any) -> Message:
    """A message as the router delivers it: a real msgpack payload, decoded on first use."""
    return Message("m1", pack_py(values), Sender("local", 0, "game", 0), reply="^local/0/got")


@pytest.fixture
def context(tmp_path) -> FakeContext:
    return FakeContext(str(tmp_path))


def _started(context: FakeContext, settings: Any = "scores") -> Stage:
    """A started stage whose load is complete (its steps run on the clock)."""
    stage = Stage(context, FakeStageConfig(settings))
    stage.start()
    context.clock.advance(0)
    assert stage.loaded
    return stage


def _ask(stage: Stage, context: FakeContext, *values: Any) -> Any:
    """One request alone in its reactor turn: receive, then the turn's end (``turn_ended``)."""
    stage.receive(_message(*values))
    stage.turn_ended()
    message, values = context.replies.pop()
    return values[0]


def test_settings_shapes() -> None:
    resolve = lambda path: "/base/" + path  # noqa: E731
    assert parse_settings("d", resolve) == IndexSettings("/base/d")
    assert parse_settings(["d", 16, 100], resolve) == IndexSettings("/base/d", 16)
    assert parse_settings({"dir": "d", "fsync": 250}, resolve) == IndexSettings("/base/d", fsync=0.25)
    assert parse_settings({"dir": "d", "fsync": True}, resolve).fsync is True
    for bad in (None, 3, [], ["d", "x"], {"dir": "d", "fsink": True}, {"dir": "d", "fsync": -1}):
        with pytest.raises(ValueError):
            parse_settings(bad, resolve)


@pytest.mark.parametrize("fsync", [float("nan"), float("inf"), 1e300])
def test_fsync_must_be_a_finite_sane_interval(fsync: float) -> None:
    """NaN once reached callLater (an AssertionError in the child, the index never answering)."""
    with pytest.raises(ValueError, match="fsync: expected true, false or milliseconds"):
        parse_settings({"dir": "d", "fsync": fsync}, lambda path: path)


def test_a_request_table_gets_one_reply_keyed_as_sent(context) -> None:
    stage = _started(context)
    reply = _ask(stage, context, {"set:board/2": {"alice": {"v": "A", "i": 10}}, "get:board": ["alice"]})
    assert reply == {b"set:board/2": {b"alice": 1}, b"get:board": {b"alice": {"v": b"A", "I": {2: {"i": 10, "d": 1}}}}}
    stage.stop()


def test_bad_requests_are_error_replies_never_exceptions(context) -> None:
    stage = _started(context)
    assert set(_ask(stage, context, "not a table")) == {"error"}
    assert set(_ask(stage, context)) == {"error"}
    reply = _ask(stage, context, {"set:b/9": {"a": {"i": 1}}, "total:b": True})
    assert set(reply[b"set:b/9"]) == {"error"} and reply[b"total:b"] == 0
    stage.stop()


@attrs.define
class LogSizeAtReply(FakeContext):
    """Records the size of the log files at the moment each reply leaves."""

    sizes: list[int] = attrs.Factory(list)

    def reply(self, message: Message, *values: Any) -> None:
        logs = [os.path.join(self.base_dir, "scores", f) for f in os.listdir(os.path.join(self.base_dir, "scores"))]
        self.sizes.append(sum(os.path.getsize(f) for f in logs if f.endswith(".log")))


def test_the_log_is_written_before_the_reply(tmp_path) -> None:
    context = LogSizeAtReply(str(tmp_path))
    stage = _started(context, ["scores", 8])
    for member in ("a", "b"):
        stage.receive(_message({"set:b": {member: {"i": 1}}}))
        stage.turn_ended()
    assert 0 < context.sizes[0] < context.sizes[1]
    stage.stop()


def test_a_restart_finds_every_acknowledged_change(context) -> None:
    stage = _started(context)
    for i in range(50):
        _ask(stage, context, {"set:b": {f"m{i}": {"v": i, "i": i % 7}}})
    _ask(stage, context, {"del:b": ["m3", "m4"]})
    before = _ask(stage, context, {"forEach:b": [1, 100]})
    stage.stop()
    again = _started(FakeContext(context.base_dir))
    ctx = again.context
    assert _ask(again, ctx, {"forEach:b": [1, 100]}) == before
    assert len(before[b"forEach:b"]) == 48
    again.stop()


def test_interval_fsync_runs_on_the_clock_only_when_dirty(context, monkeypatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    stage = _started(context, {"dir": "scores", "fsync": 100})
    _ask(stage, context, {"set:b": {"a": {"i": 1}}})
    assert synced == []
    context.clock.advance(0.1)
    assert len(synced) == 1
    context.clock.advance(0.1)
    assert len(synced) == 1
    stage.stop()
    assert not stage._syncer.running  # type: ignore[union-attr]


def _run_first_call(clock: Clock) -> None:
    """Run only the earliest delayed call (``advance(0)`` would also run the ones it schedules)."""
    call = clock.calls.pop(0)
    call.func(*call.args, **call.kw)


def test_compaction_runs_in_steps_on_the_clock_while_serving(context, tmp_path) -> None:
    stage = _started(context)
    stage.store.compact_min_bytes = 5_000  # below the five rounds of 100 records below
    stage.store.chunk = 20
    for round_ in range(5):
        _ask(stage, context, {"set:b": {f"m{i}": {"i": round_ * 1000 + i} for i in range(100)}})
    assert stage.store.compacting
    steps = 0
    while stage.store.compacting and steps < 100:
        _ask(stage, context, {"set:b": {"late": {"i": steps}}})
        _run_first_call(context.clock)  # what one reactor iteration does
        steps += 1
    assert 3 <= steps < 100
    assert len(list((tmp_path / "scores").glob("*.snap"))) == 1
    before = _ask(stage, context, {"forEach:b": [1, 200]})
    stage.stop()
    again = _started(FakeContext(context.base_dir))
    assert _ask(again, again.context, {"forEach:b": [1, 200]}) == before
    again.stop()


def test_a_log_write_failure_turns_the_reply_into_errors(context, monkeypatch) -> None:
    stage = _started(context)

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    reply = _ask(stage, context, {"set:b": {"a": {"i": 1}}, "total:b": 0})
    assert "No space left" in reply[b"set:b"]["error"] and "error" in reply[b"total:b"]
    assert len(context.errors) == 1 and "No space left" in (context.errors[0] or "")
    monkeypatch.undo()
    assert _ask(stage, context, {"total:b": 0}) == {b"total:b": 0}  # the failed set is not visible
    stage.stop()


def test_one_turn_writes_once_and_only_then_replies(tmp_path) -> None:
    context = LogSizeAtReply(str(tmp_path))
    stage = _started(context, ["scores", 8])
    writes: list[int] = []
    real_write = os.write

    def counting(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    for member in ("a", "b", "c"):
        stage.receive(_message({"set:b": {member: {"i": 1}}}))
    assert context.sizes == []  # nothing answered before the turn ends
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", counting)
        stage.turn_ended()  # the router ends the turn
    assert len(writes) == 1 and context.sizes == [context.sizes[0]] * 3 and context.sizes[0] > 0
    stage.stop()
    again = _started(FakeContext(str(tmp_path)), ["scores", 8])
    assert _ask(again, again.context, {"forEach:b": [1, 10]})[b"forEach:b"] == [
        {"k": b"a", "i": 1, "d": 1},
        {"k": b"b", "i": 1, "d": 2},
        {"k": b"c", "i": 1, "d": 3},
    ]
    again.stop()


def test_stop_answers_the_requests_of_the_unfinished_turn(context) -> None:
    stage = _started(context)
    stage.receive(_message({"set:b": {"a": {"i": 1}}}))
    stage.stop()
    assert [values[0] for _, values in context.replies] == [{b"set:b": {b"a": 1}}]
    assert context.clock.calls == []


def test_the_heap_is_frozen_again_once_the_indexes_grew(context, monkeypatch) -> None:
    """Members set after the start join the frozen heap at the next check past the growth
    threshold, so full GC passes do not walk a grown index (docs/index.md, GC pauses)."""
    monkeypatch.setattr(index_stage, "FREEZE_GROWTH", 10)
    stage = _started(context)
    try:
        for i in range(9):
            _ask(stage, context, {"set:b": {f"m{i}": {"i": i}}})
        frozen = gc.get_freeze_count()
        context.clock.advance(index_stage.FREEZE_CHECK)
        assert gc.get_freeze_count() <= frozen  # 9 new members: below the threshold
        _ask(stage, context, {"set:b": {"m9": {"i": 9}}})
        context.clock.advance(index_stage.FREEZE_CHECK)
        assert gc.get_freeze_count() > frozen
        assert stage._frozen_members == 10
    finally:
        stage.stop()
        gc.unfreeze()
    assert not context.clock.getDelayedCalls()  # the check stops with the stage


def test_a_failing_compaction_backs_off_and_logs_once_per_try(context, monkeypatch) -> None:
    stage = _started(context)
    stage.store.compact_min_bytes = 1
    full = OSError(28, "No space left on device")
    with LogCapture() as capture, monkeypatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(full))
        for n in range(200):  # many turns, each one wanting a compaction
            _ask(stage, context, {"set:b": {f"m{n}": {"i": n}}})
            while stage._step is not None:
                context.clock.advance(0)  # run the compaction's steps
            if n % 20 == 19:
                context.clock.advance(1.5)
    failures = [e for e in capture.events if "compaction failed" in e.get("log_format", "")]
    # tries at 0 s, then after 1, 2, 4, 8 s back-offs: the 15 s of this test hold at most 5
    assert 2 <= len(failures) <= 5 and len(context.errors) == len(failures)
    logs = [f for f in os.listdir(stage.settings.directory) if f.endswith(".log")]
    assert len(logs) <= 2 and not [f for f in os.listdir(stage.settings.directory) if f.endswith(".tmp")]
    context.clock.advance(60)
    _ask(stage, context, {"set:b": {"last": {"i": 1}}})
    while stage._step is not None:
        context.clock.advance(0)
    assert [f for f in os.listdir(stage.settings.directory) if f.endswith(".snap")]
    assert _ask(stage, context, {"total:b": 0}) == {b"total:b": 201}
    stage.stop()


def test_a_full_disk_logs_a_bounded_number_of_lines_with_a_count(context, monkeypatch) -> None:
    stage = _started(context)
    with LogCapture() as capture:
        with monkeypatch.context() as patch:
            patch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space left on device")))
            for n in range(500):
                assert "error" in _ask(stage, context, {"set:b": {f"m{n}": {"i": n}}})[b"set:b"]
                if n % 100 == 99:
                    context.clock.advance(4)
        lines = [e for e in capture.events if "log write failed" in e.get("log_format", "")]
        assert len(context.errors) == 500 and 2 <= len(lines) <= 6
        stage.stop()
    lines = [e for e in capture.events if "log write failed" in e.get("log_format", "")]
    # each failure is in a line of its own or in a summary's count (stop() logs what was held back)
    assert sum(e.get("repeated", 1) for e in lines) == 500


def _sent(stage: Stage, msgid: str, reply: str | None, *values: Any) -> None:
    """A message ``stage.signal("rank:" .. msgid, …)`` (``reply``: the reply address' message id)."""
    address = None if reply is None else f"^local/0/{reply}"
    stage.receive(Message(msgid, pack_py(values), Sender("local", 0, "game", 0), reply=address))
    stage.turn_ended()


def test_a_request_without_reply_id_is_answered_to_the_handler_named_by_its_id(context) -> None:
    """``stage.signal("rank:callback", {...})`` → the sender's ``waitfor("callback")`` (the document's
    example); ``"rank:=callback"`` too; ``"rank:q=got"`` keeps going to the reply address."""
    stage = _started(context)
    _sent(stage, "callback", None, {"set:board": {"a": {"i": 5}}, "total:board": 0})
    assert context.answered == [("callback", ({b"set:board": {b"a": 1}, b"total:board": 1},))]
    _sent(stage, "=callback", None, {"total:board": 0})
    assert context.answered[-1] == ("=callback", ({b"total:board": 1},))  # the host drops the "="
    _sent(stage, "q", "got", {"total:board": 0})
    assert context.replies[-1][1] == ({b"total:board": 1},) and len(context.answered) == 2
    stage.stop()


def test_the_original_direct_forms_run_one_command_and_answer_its_own_result(context) -> None:
    """``"rank:s?board"`` (no answer), ``"rank:t?board=total_cb"`` and ``"rank:get_cb=g?board"``."""
    stage = _started(context)
    _sent(stage, "s?board", None, {"KR1": {"i": 10, "v": "x"}, "KR2": {"i": 20}})
    assert context.replies == [] and context.answered == []
    _sent(stage, "t?board", "total_cb", 0)
    assert context.replies[-1][1] == (2,)
    _sent(stage, "get_cb", "g?board", "KR1")
    assert context.answered[-1] == ("get_cb", ({b"KR1": {"v": b"x", "I": {1: {"i": 10, "d": 2}}}},))
    _sent(stage, "forEach_cb", "f?board/1", [1, 1])
    assert context.answered[-1] == ("forEach_cb", ([{"k": b"KR2", "i": 20, "d": 1}],))
    _sent(stage, "d?board", "deleted", "KR2")
    assert context.replies[-1][1] == (1,)
    _sent(stage, "r?board", "ranged", ["KR1", 0, 1])
    assert context.replies[-1][1] == ([{"k": b"KR1", "v": b"x", "i": 10, "d": 1}],)
    stage.stop()


def test_short_commands_and_order_prefixes_in_a_request_table(context) -> None:
    """``g``/``s``/``d``/``f``/``r``/``t``, ``?`` or ``:`` before the name, ``#N.`` fixing the order."""
    stage = _started(context)
    reply = _ask(
        stage,
        context,
        {"#2.t?b": 0, "#1.s:b": {"m": {"i": 1}}, "#3.d?b": ["m"], "#4.t:b": 0, "x?b": 0},
    )
    assert reply[b"#1.s:b"] == {b"m": 1} and reply[b"#2.t?b"] == 1
    assert reply[b"#3.d?b"] == 1 and reply[b"#4.t:b"] == 0
    assert reply[b"x?b"] == {"error": "unknown command 'x'"}
    stage.stop()
