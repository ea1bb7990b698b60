"""Fast tests of the operations parts: reply format, parsing, alarms, waitfor keys and the Prometheus
rendering of a snapshot (hot reload and the slow-handler log on a real Lua stage:
tests/integration/test_admin_parts.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import succeed

from stagetx.admin.commands import Commands, Reply, parse
from stagetx.admin.control import ChildState
from stagetx.admin.metrics import make_registry, render
from stagetx.child.control import DoublingAlarm
from stagetx.stages.lua.stage import handler_keys
from stagetx.supervisor import ChildStatus


def test_every_reply_ends_with_one_marker_line() -> None:
    assert Reply(True, ("a", "b")).text() == "a\nb\nOK\n"
    assert Reply(False, ("trace",), error="eval: boom\nstack").text() == "trace\nERROR eval: boom\n"


def test_eval_keeps_the_rest_of_the_line_as_code() -> None:
    assert parse("eval app  return 1 + 1 ") == ("eval", ["app", "return 1 + 1"])
    assert parse("loglevel stage.app debug") == ("loglevel", ["stage.app", "debug"])
    assert parse("eval app") == ("eval", ["app"])


class _Answers:
    """The ControlServer as ``Commands`` asks it: each process answers its entry of ``answers``."""

    def __init__(self, answers: dict[int, Any]) -> None:
        self.answers = answers

    def ask_all(self, name: str, args: list[str], groups: list[int]) -> Any:
        return succeed([(g, self.answers[g]) for g in groups])


def _ask(answers: dict[int, Any], line: str) -> Reply:
    stages = [SimpleNamespace(name="=lua+front", id="front", group=g) for g in answers]
    commands = Commands(SimpleNamespace(config=SimpleNamespace(stages=stages), control=_Answers(answers)))  # type: ignore[arg-type]
    replies: list[Reply] = []
    commands.run_line(line).addCallback(replies.append)
    return replies[0]


def test_reload_and_eval_name_the_process_of_each_part_when_several_answer() -> None:
    reloaded = (True, "=lua+front reloaded", {"reloads": 2})
    broken = (False, "reload: lua/front.lua:2: attempt to index a nil value", None)
    reply = _ask({0: reloaded, 1: broken, 2: (False, "process 3 is not connected", None)}, "reload front")
    assert reply.text() == (
        "process 1: front reloaded\n"
        "ERROR process 2: reload: lua/front.lua:2: attempt to index a nil value; process 3 is not connected\n"
    )
    assert [(p["process"], p["ok"], p["reloads"]) for p in reply.data] == [
        (1, True, 2),
        (2, False, None),
        (3, False, None),
    ]
    assert _ask({0: broken}, "reload front").text() == "ERROR reload: lua/front.lua:2: attempt to index a nil value\n"
    failed = (False, "eval: eval:1: boom\nstack traceback:", None)
    assert _ask({0: (True, "1", ["1"]), 1: failed}, "eval front x").text() == (
        "process 1: 1\nstack traceback:\nERROR process 2: eval: eval:1: boom\n"
    )


def test_alarm_warns_once_per_doubling_and_rearms_below_the_first_threshold() -> None:
    alarm = DoublingAlarm(1000)
    crossed = [alarm.crossed(v) for v in (10, 1000, 1500, 2000, 5000, 6000, 999, 1000)]
    assert crossed == [False, True, False, True, True, False, False, True]


def test_handler_keys_follow_the_waitfor_matching_order() -> None:
    assert handler_keys(b"s:g.m.cb") == (b"s:g.m.cb", b"s:g.m.", b"s:g.", b"s:")
    assert handler_keys(b"a.b.c") == (b"a.b.c", b"a.b.", b"a.")
    assert handler_keys(b"hit") == (b"hit",)


class _Supervisor:
    """What the metrics collector reads: status() and the control server's children."""

    def __init__(self, snapshot: dict[str, Any], silent: float | None = None) -> None:
        self.control = type("C", (), {"children": [ChildState(0, ready=True, snapshot=snapshot)]})()
        self.silent = silent

    def status(self) -> list[ChildStatus]:
        return [ChildStatus(0, 1234, 0.0, 2)]

    def unresponsive(self, group: int) -> float | None:
        return self.silent


def test_metrics_render_counters_histograms_and_tickets() -> None:
    snapshot = {
        "rss": 1 << 20,
        "queue": 3,
        "delay": 0.001,
        "buckets": [0.001, 0.01],
        "peers": None,
        "stages": [
            {
                "name": "=lua+app",
                "type": "lua",
                "received": 5,
                "sent": 4,
                "errors": 1,
                "busy": 0.02,
                "latency": [3, 1, 1],
                "lua_memory": 4096,
                "reloads": 1,
                "tickets": {"game": [1, 2, 5]},
            }
        ],
    }
    text = render(make_registry(_Supervisor(snapshot))).decode()  # type: ignore[arg-type]
    labels = 'process="1",stage="=lua+app",type="lua"'
    assert f"stagetx_stage_messages_received_total{{{labels}}} 5.0" in text
    assert f'stagetx_stage_handler_seconds_bucket{{le="0.01",{labels}}} 4.0' in text
    assert f'stagetx_stage_handler_seconds_bucket{{le="+Inf",{labels}}} 5.0' in text
    assert f"stagetx_stage_handler_seconds_sum{{{labels}}} 0.02" in text
    assert 'stagetx_ticket_slots{category="game",process="1",stage="=lua+app",state="waiting"} 2.0' in text
    assert 'stagetx_process_restarts_total{process="1"} 2.0' in text
    assert 'stagetx_process_up{process="1"} 1.0' in text
    # a process that stopped reporting (its reactor stuck) is not up, as list and /health say
    silent = render(make_registry(_Supervisor(snapshot, silent=3.5))).decode()  # type: ignore[arg-type]
    assert 'stagetx_process_up{process="1"} 0.0' in silent
