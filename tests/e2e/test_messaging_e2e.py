"""Messaging across the processes of one real server: ``twistd -n stage``.

Stage ``a`` drives; ``b`` has three replicas in three processes (one beside ``a``); ``c`` is alone
in the third process. What the scripts observe they log; the tests read the server's output.
"""

from __future__ import annotations

import pytest

from tests.support import ServerProcess, write_app

CONFIG = {
    "#startup": [["=lua+a", "=lua+b"], ["=lua+b"], ["=lua+b", "=lua+c"]],
    "=lua": {"%package": ["[0]lua"], "=lua+a": "a", "=lua+b": "b", "=lua+c": "c"},
}

B = """
local count = 0
stage.waitfor("count", function() count = count + 1 end)
stage.waitfor("report", function() return process.stage, count end)
stage.waitfor("echo", function(...) return process.id, ... end)
stage.waitfor("later", function(v)
    local reply_to = _WAITFOR[2]
    stage.addtask(20, function() stage.signal(reply_to, "later", v * 2) end)
end)
stage.waitfor("twice", function(v) stage.signal(nil, "first", v); stage.signal(nil, "second", v) end)
stage.waitfor("bcast", function(token) log4cxx.info("bcast", token, process.stage) end)
stage.waitfor("fn", function(f, arg) return f(arg) end)
stage.waitfor("a:", function(v) return "tagged", _WAITFOR[0], _WAITFOR[-1], _WAITFOR[1].stage, v end)
stage.signal("a:hello", process.stage)
"""

C = """
stage.waitfor("turn", function(who)
    log4cxx.info("enter", "c", string.format("%.6f", process.tick))
    stage.addtask(15, function()
        log4cxx.info("leave", "c", string.format("%.6f", process.tick))
        stage.signal("<L.*")
    end)
end)
stage.waitfor("go", function(n) for i = 1, n do stage.signal(">L.turn", i) end end)
stage.signal("a:hello", "c")
process.title = "stagetx-e2e-title-c"
log4cxx.info("titled", process.id)
"""

A = """
local hellos = 0
local function log(...) log4cxx.info(...) end
stage.waitfor("reply", function(...) log("reply", ...) end)
stage.waitfor("counted", function(group, n) log("counted", group, n) end)
stage.waitfor("turn", function(i)
    log4cxx.info("enter", "a", string.format("%.6f", process.tick))
    stage.addtask(15, function()
        log4cxx.info("leave", "a", string.format("%.6f", process.tick))
        stage.signal("<L.*")
    end)
end)
stage.waitfor("hello", function()
    hellos = hellos + 1
    if hellos < 4 then return end
    for i = 1, 300 do stage.signal("b:count") end
    stage.addtask(300, function() stage.signal("*b:report=counted") end)
    stage.signal("b:echo=reply", "bin\\0ary", 1, 1.0, {nested = {true, false, {x = 1}}})
    stage.signal("b:later=reply", 21)
    stage.signal("b:twice=reply", 5)
    stage.signal("*b:bcast", "once")
    local offset = 100
    stage.signal("b:fn=reply", function(x) return "fn", x + (offset or 1000), type(os) end, 1)
    stage.signal("b+tagme=reply", "v")
    log("unknown", stage.signal("nobody:x", 1))
    log("remote", stage.signal("+b:x", 1))
    local ok, err = pcall(stage.signal, "b:x", coroutine.create(function() end))
    log("unmovable", tostring(ok), tostring(err):find("coroutine") ~= nil)
    stage.signal("c:go", 3)
    for i = 1, 3 do stage.signal(">L.turn", i) end
end)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    root = tmp_path_factory.mktemp("messaging")
    path = write_app(root, CONFIG, {"a": A, "b": B, "c": C})
    with ServerProcess(path) as server:
        server.wait_for(lambda: len(server.logged("a", "counted")) == 3, 30, "three counts")
        server.wait_for(
            lambda: len(server.logged("a", "leave")) + len(server.logged("c", "leave")) == 6, 30, "six lock turns"
        )
        server.wait_for(lambda: len(server.logged("a", "reply")) >= 6, 30, "replies")
        yield server


def test_round_robin_spreads_300_messages_over_three_replicas_within_one(server: ServerProcess) -> None:
    counts = sorted(int(n) for _, n in server.logged("a", "counted"))
    assert sum(counts) == 300
    assert counts[-1] - counts[0] <= 1


def test_broadcast_reaches_every_replica_exactly_once(server: ServerProcess) -> None:
    groups = sorted(group for _, group in server.logged("b", "bcast"))
    assert groups == ["1", "2", "3"]


def test_replies_cross_processes_with_values_intact(server: ServerProcess) -> None:
    replies = server.logged("a", "reply")
    echo = [r for r in replies if r[1:2] == ["bin\x00ary"]]
    assert len(echo) == 1
    assert echo[0][1:4] == ["bin\x00ary", "1", "1.0"]
    assert echo[0][4].startswith("table:")


def test_saved_reply_address_and_signal_nil_reply_later_and_twice(server: ServerProcess) -> None:
    replies = server.logged("a", "reply")
    assert ["later", "42"] in replies
    assert ["first", "5"] in replies and ["second", "5"] in replies


def test_a_function_runs_in_another_process_without_its_upvalues(server: ServerProcess) -> None:
    assert ["fn", "1001", "table"] in server.logged("a", "reply")


def test_plus_form_tags_the_sender(server: ServerProcess) -> None:
    assert ["tagged", "a:tagme", "a:", "a", "v"] in server.logged("a", "reply")


def test_undeliverable_messages_return_false_and_a_reason(server: ServerProcess) -> None:
    assert server.logged("a", "unknown") == [["false", "unknown stage 'nobody'"]]
    assert server.logged("a", "remote")[0][0] == "false"
    assert server.logged("a", "unmovable") == [["false", "true"]]


def test_ordered_lock_turns_never_overlap_across_processes(server: ServerProcess) -> None:
    events = []
    for stage in ("a", "c"):
        events += [(float(t), "enter") for _, t in server.logged(stage, "enter")]
        events += [(float(t), "leave") for _, t in server.logged(stage, "leave")]
    events.sort()
    assert len(events) == 12
    holders = 0
    for _, kind in events:
        holders += 1 if kind == "enter" else -1
        assert holders in (0, 1)


def test_process_title_changes_what_ps_shows(server: ServerProcess) -> None:
    ((pid,),) = server.logged("c", "titled")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0] == b"stagetx-e2e-title-c"
