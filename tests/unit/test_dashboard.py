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
from stagetx.child.control import ProcessControl
from stagetx.codec import pack_py
from stagetx.message import Message, Sender
from stagetx.stages.index.stage import Stage as IndexStage


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

    def reply_all(self, replies: list[tuple[Message, Any]]) -> None:
        self.replies.extend((value,) for _, value in replies)


def _index_control(tmp_path: Any) -> tuple[ProcessControl, IndexStage, _IndexContext]:
    """A ProcessControl over one real, started index stage holding board ``b`` (tiers 1 and 2)."""
    context = _IndexContext(str(tmp_path))
    stage = IndexStage(context, SimpleNamespace(settings="scores"))
    stage.start()
    context.clock.advance(0)  # the load's steps
    scores = {f"m{n}".encode(): {b"I": {1: n, 2: -n}, b"v": f"name {n}".encode()} for n in range(1, 8)}
    stage.receive(Message("m", pack_py(({"set:b": scores},)), Sender("local", 0, "game", 0), reply="^game"))
    stage.turn_ended()
    host = SimpleNamespace(
        group=0,
        stages=[
            SimpleNamespace(name="=index+rank", stage_id="rank", stage=stage, config=SimpleNamespace(type="index"))
        ],
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
        assert reply["forEach:b/1"] == [
            {"k": "m7", "i": 7, "d": 1, "v": "name 7"},
            {"k": "m6", "i": 6, "d": 2, "v": "name 6"},
        ]
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


# -- history, states, overview ------------------------------------------------------------------

from io import BytesIO  # noqa: E402

from twisted.web.server import NOT_DONE_YET  # noqa: E402
from twisted.web.test.requesthelper import DummyRequest  # noqa: E402

from stagetx.admin.control import ChildState  # noqa: E402
from stagetx.admin.dashboard import DashboardSite, History, overview, quantile  # noqa: E402
from stagetx.admin.site import admin_site  # noqa: E402
from stagetx.child.host import LATENCY_BUCKETS  # noqa: E402
from stagetx.supervisor import ChildStatus  # noqa: E402

BOUNDS = list(LATENCY_BUCKETS)


def _latency(**at: int) -> list[int]:
    """Bucket counts with ``at["b3"] = n`` meaning n observations in bucket 3."""
    counts = [0] * (len(BOUNDS) + 1)
    for name, n in at.items():
        counts[int(name[1:])] = n
    return counts


def _snapshot(pid: int, uptime: float, received: int, sent: int, latency: list[int], **extra: Any) -> dict[str, Any]:
    stage = {
        "name": "=lua+game",
        "type": "lua",
        "received": received,
        "sent": sent,
        "errors": 1,
        "busy": 0.0,
        "latency": latency,
        "lua_memory": 2048,
    }
    return {
        "group": 0,
        "pid": pid,
        "uptime": uptime,
        "rss": 1 << 20,
        "queue": 3,
        "delay": 0.0,
        "buckets": BOUNDS,
        "stages": [stage, *extra.get("more", [])],
        "peers": extra.get("peers"),
    }


def test_quantile_interpolates_inside_the_bucket_and_caps_the_open_one() -> None:
    assert quantile(BOUNDS, _latency(), 0.5) is None
    assert quantile(BOUNDS, _latency(b0=10), 0.5) == pytest.approx(0.00005)
    assert quantile(BOUNDS, _latency(b3=50, b4=50), 0.99) == pytest.approx(0.001 + 0.0015 * 0.98)
    assert quantile(BOUNDS, _latency(b12=5), 0.99) == BOUNDS[-1]


def test_history_rates_quantiles_restart_and_gaps() -> None:
    history = History(size=3)
    history.observe(100.0, 0, _snapshot(7, 10.0, 100, 50, _latency(b3=10)), ["=lua+game"])
    history.observe(101.0, 0, _snapshot(7, 12.0, 300, 150, _latency(b3=10, b5=100)), ["=lua+game"])
    cols = history.columns("1/=lua+game")["1/=lua+game"]
    assert cols["t"] == [100.0, 101.0] and cols["in"] == [None, 100.0] and cols["out"] == [None, 50.0]
    assert BOUNDS[4] < cols["p50"][1] < BOUNDS[5]  # only the new observations count
    assert history.current["1/=lua+game"]["in_rate"] == 100.0
    same = history._last[0]
    history.observe(102.0, 0, same, ["=lua+game"])  # no new report: no sample
    history.observe(103.0, 0, _snapshot(8, 1.0, 5, 5, _latency()), ["=lua+game"])  # restarted: new baseline
    history.observe(104.0, 0, None, ["=lua+game"])  # down: a gap, nothing current
    cols = history.columns()["1/=lua+game"]
    assert cols["t"] == [101.0, 103.0, 104.0] and cols["in"] == [100.0, None, None]
    assert "1/=lua+game" not in history.current


class _Supervisor:
    """What the dashboard reads of a Supervisor: config, status(), control.children, clock()."""

    def __init__(self, clock: Clock, statuses: list[ChildStatus], children: list[ChildState]) -> None:
        game = SimpleNamespace(name="=lua+game", type="lua", id="game", group=0)
        rank = SimpleNamespace(name="=index+rank", type="index", id="rank", group=1)
        self.config = SimpleNamespace(startup=[[game], [rank]], stages=[game, rank])
        self._clock = clock
        self.statuses = statuses
        self.control = SimpleNamespace(children=children)

    def clock(self) -> Clock:
        return self._clock

    def status(self) -> list[ChildStatus]:
        return self.statuses

    def health(self) -> list[str]:
        return []


def _server(clock: Clock) -> _Supervisor:
    clock.advance(1000.0)
    peers = [
        {
            "server": "s2",
            "addr": "127.0.0.1:1",
            "linked": False,
            "backup": False,
            "delay": 0.0,
            "overloaded": False,
            "stages": 2,
        }
    ]
    child0 = ChildState(
        0, ready=True, snapshot=_snapshot(7, 10.0, 100, 50, _latency(b3=4), peers=peers), snapshot_at=999.5
    )
    child1 = ChildState(1, ready=False)
    statuses = [ChildStatus(0, 7, 990.0, 0), ChildStatus(1, None, None, 2)]
    return _Supervisor(clock, statuses, [child0, child1])


def test_overview_shows_states_never_stale_numbers() -> None:
    clock = Clock()
    sup = _server(clock)
    sup.config.startup[0].append(SimpleNamespace(name="=route+route", type="route", id="route", group=0))
    view = overview(sup, History(10), clock.seconds())
    assert [(p["process"], p["state"], p["uptime"]) for p in view["processes"]] == [
        (1, "up", 10.0),
        (2, "restarting", None),
    ]
    game, route, rank = view["stages"]
    assert game["state"] == "running" and game["received"] == 100 and game["queue"] == 3 and game["lua_memory"] == 2048
    assert route == {"process": 1, "name": "=route+route", "type": "route", "state": "stopped"}
    assert rank == {"process": 2, "name": "=index+rank", "type": "index", "state": "restarting"}
    assert view["peers"][0]["state"] == "down"
    clock.advance(10.0)  # no report for 10 s: unresponsive, no numbers
    view = overview(sup, History(10), clock.seconds())
    assert view["processes"][0]["state"] == "unresponsive" and view["processes"][0]["rss"] is None
    assert "received" not in view["stages"][0] and view["stages"][0]["state"] == "unresponsive"


def test_a_failed_stage_its_errors_clients_and_endpoints_are_shown() -> None:
    clock = Clock()
    sup = _server(clock)
    stage = sup.control.children[0].snapshot["stages"][0]
    stage["failure"] = "lua/game.lua:2: no database"
    stage["last_errors"] = [{"time": 990.0, "error": "lua/game.lua:2: no database"}]
    endpoint = {"id": 3, "url": "tcp://127.0.0.1:8091", "kind": "tcp", "connected": 2, "oversized": 1}
    stage["clients"], stage["listeners"] = {"connected": 2}, [endpoint]
    view = overview(sup, History(10), clock.seconds())
    game = view["stages"][0]
    assert game["state"] == "failed" and game["failure"] == "lua/game.lua:2: no database"
    assert game["last_errors"] == stage["last_errors"] and game["clients"] == 2
    assert view["listeners"] == [{"process": 1, "stage": "=lua+game", **endpoint}]


# -- the resources, through the admin site --------------------------------------------------------


class _StreamingRequest(DummyRequest):
    """A ``DummyRequest`` that keeps a push producer as a real request does (``DummyRequest``
    pulls from any producer in a loop)."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def _request(
    site: Any,
    path: str,
    method: bytes = b"GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    args: dict[bytes, list[bytes]] | None = None,
) -> DummyRequest:
    request = _StreamingRequest([p.encode() for p in path.split("/")[1:]])
    request.method = method
    request.content = BytesIO(body)
    request.args = args or {}
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    result = site.getResourceFor(request).render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def _body(request: DummyRequest) -> Any:
    return json.loads(b"".join(request.written))


def _site(token: str | None, answer: Any = (True, "", {})) -> tuple[DashboardSite, Clock, _AskingControl]:
    clock = Clock()
    sup = _server(clock)
    asking = _AskingControl(answer)
    asking.children = sup.control.children
    sup.control = asking  # type: ignore[assignment]
    site = admin_site(sup, Commands(sup), token)  # type: ignore[arg-type]
    assert isinstance(site, DashboardSite)
    return site, clock, asking


def test_page_static_files_and_session_without_token() -> None:
    site, _, _ = _site(None)
    page = _request(site, "/")
    assert b"<title>stagetx dashboard</title>" in b"".join(page.written)
    assert page.responseHeaders.getRawHeaders("x-frame-options") == ["DENY"]
    assert _body(_request(site, "/api/session")) == {"readonly": True, "csrf": None, "interval": 1.0}
    script = site.getResourceFor(DummyRequest([b"static", b"uPlot.iife.min.js"]))
    assert script.path.endswith("uPlot.iife.min.js")
    for path in ([b"static", b"app.js\0.png"], [b"static", b"\0"]):  # the file system would raise
        assert _request(site, "/" + "/".join(p.decode() for p in path)).responseCode == 404


def test_api_paths_beside_the_command_api_and_token_rules() -> None:
    site, _, asking = _site("s3cret", answer=(True, "", {"b": [3, 0, 0, 0]}))
    assert _request(site, "/api/session").responseCode == 401
    assert _request(site, "/api/events").responseCode == 401
    auth = {"authorization": "Bearer s3cret"}
    session = _body(_request(site, "/api/session", headers=auth))
    assert session["readonly"] is False and len(session["csrf"]) > 20
    reply = _body(_request(site, "/api/index", headers=auth, args={b"args": [b"rank"]}))
    assert reply == {"ok": True, "data": {"b": [3, 0, 0, 0]}, "error": None}
    assert asking.asked == [("index", ["rank"], [1])]
    assert _body(_request(site, "/api/help", headers=auth))["ok"] is True
    view = _body(_request(site, "/api/overview", headers=auth))
    assert [s["name"] for s in view["stages"]] == ["=lua+game", "=index+rank"]


def test_event_stream_pushes_a_snapshot_per_sample_until_the_client_leaves() -> None:
    site, clock, _ = _site(None)
    site.startFactory()
    try:
        request = _request(site, "/api/events")
        assert request.responseHeaders.getRawHeaders("content-type") == ["text/event-stream"]
        events = [e for e in b"".join(request.written).split(b"\n\n") if e.startswith(b"data: ")]
        assert len(events) == 1 and json.loads(events[0][6:])["processes"][0]["pid"] == 7
        site.dashboard.supervisor.control.children[0].snapshot_at = clock.seconds() + 1.0  # a fresh report
        clock.advance(1.0)
        clock.advance(1.0)
        events = [e for e in b"".join(request.written).split(b"\n\n") if e.startswith(b"data: ")]
        assert len(events) == 3 and json.loads(events[-1][6:])["time"] == clock.seconds()
        history = _body(_request(site, "/api/history", args={b"stage": [b"1/=lua+game"]}))
        assert history["seconds"] == 600 and len(history["stages"]["1/=lua+game"]["t"]) >= 1
        request.finish()
        assert site.dashboard.streams == []
    finally:
        site.stopFactory()
    assert not site.dashboard._loop.running


def test_an_event_stream_whose_client_does_not_read_skips_samples_until_it_reads() -> None:
    site, clock, _ = _site(None)
    site.startFactory()
    try:
        request = _request(site, "/api/events")
        request.producer.pauseProducing()  # the connection's write buffer is full
        written = len(request.written)
        clock.advance(1.0)
        clock.advance(1.0)
        assert len(request.written) == written
        request.producer.resumeProducing()
        clock.advance(1.0)
        assert len(request.written) == written + 1
        assert json.loads(request.written[-1][6:])["time"] == clock.seconds()
    finally:
        site.stopFactory()
    assert request.producer is None and request.finished


def test_actions_need_token_csrf_same_origin_and_known_commands() -> None:
    body = json.dumps({"command": "loglevel", "args": ["stage", "debug"]}).encode()
    site, _, _ = _site(None)
    refused = _request(site, "/api/action", b"POST", {"content-type": "application/json"}, body)
    assert refused.responseCode == 403 and "read-only" in _body(refused)["error"]

    site, _, asking = _site("s3cret")
    csrf = site.dashboard.csrf
    good = {
        "authorization": "Bearer s3cret",
        "content-type": "application/json",
        "x-csrf-token": csrf,
        "origin": "http://127.0.0.1:9190",
        "host": "127.0.0.1:9190",
    }
    assert _request(site, "/api/action", b"POST", {**good, "authorization": "Bearer no"}, body).responseCode == 401
    for change in ({"x-csrf-token": "forged"}, {"origin": "http://evil.example"}, {"content-type": "text/plain"}):
        refused = _request(site, "/api/action", b"POST", {**good, **change}, body)
        assert refused.responseCode == 403, change
    assert asking.asked == []
    wrong = _request(site, "/api/action", b"POST", good, json.dumps({"command": "eval", "args": ["x", "1"]}).encode())
    assert wrong.responseCode == 400 and "actions are" in _body(wrong)["error"]
    done = _request(site, "/api/action", b"POST", good, body)
    assert _body(done)["ok"] is True and asking.asked == [("loglevel", ["stage", "debug"], None)]
