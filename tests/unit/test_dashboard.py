"""The web dashboard's data side: the ``index`` admin command, history, overview, JSON API, event stream."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

from stagetx.admin.commands import Commands, parse
from stagetx.codec import pack_py
from stagetx.control import ProcessControl
from stagetx.message import Message, Sender
from stagetx.stages.index import Stage as IndexStage


@attrs.define
class _IndexContext:
    base_dir: str
    clock: Clock = attrs.Factory(Clock)
    stage_id: str = "rank"
    name: str = "=index+rank"
    instance: int = 0
    log: Logger = attrs.Factory(lambda: Logger(namespace="test.dashboard"))
    replies: list[Any] = attrs.Factory(list)

    def resolve_path(self, path: str) -> str:
        return os.path.join(self.base_dir, path)

    def reply(self, message: Message, *values: Any) -> None:
        self.replies.append(values)


def _index_control(tmp_path: Any) -> tuple[ProcessControl, IndexStage, _IndexContext]:
    """A ProcessControl over one real, started index stage holding board ``b`` (tiers 1 and 2)."""
    context = _IndexContext(str(tmp_path))
    stage = IndexStage(context, SimpleNamespace(settings="scores"))
    stage.start()
    scores = {f"m{n}".encode(): {b"I": {1: n, 2: -n}, b"v": f"name {n}".encode()} for n in range(1, 8)}
    stage.receive(Message("m", pack_py(({"set:b": scores},)), Sender("local", 0, "game", 0), reply="^game"))
    context.clock.advance(0)
    host = SimpleNamespace(
        group=0,
        stages=[SimpleNamespace(name="=index+rank", stage_id="rank", stage=stage, config=SimpleNamespace(type="index"))],
    )
    return ProcessControl(host, None, 0.0), stage, context  # type: ignore[arg-type]


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_index_command_lists_boards_and_runs_reads(tmp_path: Any) -> None:
    control, stage, _ = _index_control(tmp_path)
    try:
        ok, _, boards = _result(control.command("index", ["rank"]))
        assert ok and boards == {"b": [7, 7, 0, 0]}
        request = json.dumps({"forEach:b/1": [1, 2], "get:b/2": ["m3", "nobody"], "range:b": ["m4", 3]})
        ok, text, reply = _result(control.command("index", ["rank", request]))
        assert ok, text
        assert reply["forEach:b/1"] == [{"k": "m7", "i": 7, "d": 1, "v": "name 7"}, {"k": "m6", "i": 6, "d": 2, "v": "name 6"}]
        assert reply["get:b/2"] == {"m3": {"I": {"1": {"i": 3, "d": 5}, "2": {"i": -3, "d": 3}}, "v": "name 3"}}
        assert [row["k"] for row in reply["range:b"]] == ["m5", "m4", "m3"]
        json.dumps(reply)  # plain JSON, no bytes
    finally:
        stage.stop()


def test_index_command_refuses_writes_and_other_stages(tmp_path: Any) -> None:
    control, stage, _ = _index_control(tmp_path)
    try:
        ok, text, _ = _result(control.command("index", ["rank", json.dumps({"get:b": ["m1"], "del:b": ["m1"]})]))
        assert not ok and "only get, range, forEach and total" in text
        assert stage.store.boards[b"b"].tier(1).rank(b"m1") == 7  # untouched
        ok, text, _ = _result(control.command("index", ["nope"]))
        assert not ok and "no stage 'nope'" in text
        ok, text, _ = _result(control.command("index", ["rank", "{not json"]))
        assert not ok
        ok, _, reply = _result(control.command("index", ["rank", json.dumps({"bogus:b": 1})]))
        assert ok and "error" in reply["bogus:b"]
    finally:
        stage.stop()


class _AskingControl:
    """The supervisor's ControlServer as Commands uses it: records asks, answers with ``answer``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[tuple[str, list[str], list[int] | None]] = []
        self.children: list[Any] = []

    def ask_all(self, name: str, args: list[str], groups: list[int] | None = None) -> Deferred[Any]:
        self.asked.append((name, args, groups))
        return succeed([(g, self.answer) for g in groups or [0]])


def test_index_admin_command_asks_the_stage_process_and_parses_lines() -> None:
    config = SimpleNamespace(stages=[SimpleNamespace(name="=index+rank", id="rank", group=1)], startup=[[], []])
    control = _AskingControl((True, "", [{"k": "a", "i": 1, "d": 1}]))
    commands = Commands(SimpleNamespace(config=config, control=control))  # type: ignore[arg-type]
    assert parse('index rank {"forEach:b": [1, 10]}') == ("index", ["rank", '{"forEach:b": [1, 10]}'])
    reply = _result(commands.run_line('index rank {"forEach:b": [1, 10]}'))
    assert reply.ok and reply.data == [{"k": "a", "i": 1, "d": 1}]
    assert control.asked == [("index", ["rank", '{"forEach:b": [1, 10]}'], [1])]
    assert _result(commands.run("index", ["nope"])).error == "no stage 'nope'"
    control.answer = (False, "index: the admin side runs only get, range, forEach and total requests", None)
    assert not _result(commands.run("index", ["rank", "{}"])).ok
