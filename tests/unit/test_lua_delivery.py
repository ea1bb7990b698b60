"""Router → Lua stage delivery (stagetx.stages.lua.stage ``receive``) on real Lua and a real router,
driven by ``task.Clock``: senders, message ids and reply addresses reach the right handler and
the right reply address through the per-stage caches; scalar payloads arrive unconverted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from stagetx.child.host import ProcessHost
from stagetx.codec import CodecError, pack_py, unpack_lua
from stagetx.config import load_config
from stagetx.message import Sender
from tests.support import LogCapture, said

A = """
stage.waitfor("who", function(tag)
    local s = _WAITFOR[1]
    log4cxx.info("who", tag, s.server, s.process, s.stage, s.instance, s[3])
end)
stage.waitfor("echo", function(i) return i, _WAITFOR[0] end)
"""
B = """
stage.waitfor("pong", function(i, id) log4cxx.info("pong", _WAITFOR[0], i, id) end)
stage.waitfor("other", function(i, id) log4cxx.info("other", _WAITFOR[0], i, id) end)
"""


@pytest.fixture
def host(tmp_path: Path) -> ProcessHost:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "a.lua").write_text(A)
    (tmp_path / "lua" / "b.lua").write_text(B)
    config = {"#startup": [["=lua+a", "=lua+b"]], "=lua": {"%package": ["[0]lua"], "=lua+a": "a", "=lua+b": "b"}}
    (tmp_path / "app.json").write_text(json.dumps(config))
    host = ProcessHost(load_config(str(tmp_path / "app.json")), 0, Clock())
    host.startService()
    return host


def drain(host: ProcessHost) -> None:
    for _ in range(100):
        if not host.router.queue_length():
            return
        host.router.run_queue()
    raise AssertionError("the router queue does not drain")


def test_each_message_sees_its_own_sender_even_equal_senders_as_new_objects(host: ProcessHost) -> None:
    router = host.router
    senders = [Sender("s1", 0, "x", 5), Sender("s2", 2, "y", 7), Sender("s1", 0, "x", 5), Sender("s1", 0, "x", 5)]
    with LogCapture() as capture:
        for tag, sender in enumerate(senders):
            router.deliver(0, "who", pack_py((tag,)), sender, None)
        router.deliver(0, "who", pack_py((9,)), senders[1], None)  # the same object again
        drain(host)
    assert said(capture, "stage.a", "who") == [
        ["0", "s1", "1", "x", "5", "x"],
        ["1", "s2", "3", "y", "7", "y"],
        ["2", "s1", "1", "x", "5", "x"],
        ["3", "s1", "1", "x", "5", "x"],
        ["9", "s2", "3", "y", "7", "y"],
    ]


def test_replies_go_to_each_message_s_own_reply_address(host: ProcessHost) -> None:
    router = host.router
    b = host.stages[1].sender
    replies = ["^local/1/pong", "^local/1/other", "^local/1/pong", None, "^local/1/other"]
    with LogCapture() as capture:
        for i, reply in enumerate(replies):
            router.deliver(0, "echo", pack_py((i,)), b, reply)
        drain(host)
    assert said(capture, "stage.b", "pong") == [["pong", "0", "echo"], ["pong", "2", "echo"]]
    assert said(capture, "stage.b", "other") == [["other", "1", "echo"], ["other", "4", "echo"]]


def test_scalar_payloads_arrive_as_they_are_and_out_of_range_integers_are_refused(host: ProcessHost) -> None:
    vm = host.stages[0].stage.vm
    values = (b"x", -(2**63), 2**63 - 1, 1.5, True, False, None)
    assert unpack_lua(vm, pack_py(values)) == values
    for bad in (2**63, 2**64 - 1):
        with pytest.raises(CodecError, match="does not fit a Lua integer"):
            unpack_lua(vm, pack_py((1, bad)))


def test_a_malformed_reply_address_loses_only_its_own_reply(tmp_path: Path) -> None:
    """A Python stage's replies leave through ``StageHost.reply``: an address that does not parse
    is logged there, and the other replies of the same turn still arrive."""
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "b.lua").write_text(
        'stage.waitfor("pong", function(r) for id in pairs(r["set:top"]) do log4cxx.info("pong", id) end end)'
    )
    config = {
        "#startup": [["=index+rank", "=lua+b"]],
        "=index+rank": "scores",
        "=lua": {"%package": ["[0]lua"], "=lua+b": "b"},
    }
    (tmp_path / "app.json").write_text(json.dumps(config))
    clock = Clock()
    host = ProcessHost(load_config(str(tmp_path / "app.json")), 0, clock)
    host.startService()
    clock.advance(0)  # the index's load steps
    b = host.stages[1].sender
    with LogCapture() as capture:
        for member, reply in ((b"m1", "^local/1/pong"), (b"m2", "^x"), (b"m3", "^local/1/pong")):
            request = {b"set:top": {member: {b"i": 5}}}
            host.router.deliver(0, "s", pack_py((request,)), b, reply)
        drain(host)
    assert said(capture, "stage.b", "pong") == [["m1"], ["m3"]]
    assert "reply to 's' dropped: malformed reply address '^x'" in capture.text()
    host.stopService()


def test_a_stage_runtime_runs_its_callbacks_without_the_budget_hook(host: ProcessHost) -> None:
    """The stage's main Lua 5.4 runtime is under the budget watchdog (stagetx.lua.watchdog): no
    count hook while its handlers keep their budget."""
    vm = host.stages[0].stage.vm
    assert vm is not None and vm.guard is not None
    host.router.deliver(0, "echo", pack_py((1,)), host.stages[1].sender, None)
    drain(host)
    assert not vm.guard.hooked()
    assert vm.call("test", vm.lua.eval("function() return debug.gethook() ~= nil end")) == (True, False)
