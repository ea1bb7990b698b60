"""A message's values reach its handler alike from this stage and from another process.

Stage ``a`` (process 1) and ``b`` (process 2) of one real server each count the values their
handler receives (``select('#', ...)``) for messages with none, one ``nil`` and two values, sent
to themselves (the local queue) and to the other (through the router and a link).
"""

from __future__ import annotations

import pytest

from tests.support import ServerProcess, write_app

CONFIG = {
    "#startup": [["=lua+a"], ["=lua+b"]],
    "=lua": {"%package": ["[0]lua"], "=lua+a": "ab", "=lua+b": "ab"},
}

AB = """
local other = process.stage == 1 and "b" or "a"  -- process.stage: the process number
stage.waitfor("count", function(how, ...) log4cxx.info("arity", how, select("#", ...)) end)
stage.waitfor("none", function(...) log4cxx.info("arity", "none", select("#", ...)) end)
-- Until the other process answers a ping (a message sent before the link is up is lost), ping it;
-- its pong proves this side's messages reach it.
local started, pings = false, 0
stage.waitfor("ping", function() stage.signal(other .. ":pong") end)
local function ping()
    if started or pings == 200 then return end
    pings = pings + 1
    stage.signal(other .. ":ping")
    stage.addtask(50, ping)
end
ping()
stage.waitfor("pong", function()
    if started then return end
    started = true
    stage.signal("none")
    stage.signal(other .. ":none")
    stage.signal("count", "local-nil", nil)
    stage.signal(other .. ":count", "remote-nil", nil)
    stage.signal("count", "local-two", 1, 2)
    stage.signal(other .. ":count", "remote-two", 1, 2)
end)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    root = tmp_path_factory.mktemp("arity")
    path = write_app(root, CONFIG, {"ab": AB})
    with ServerProcess(path) as server:
        for stage in ("a", "b"):
            server.wait_for(lambda stage=stage: len(server.logged(stage, "arity")) == 6, 30, f"six messages to {stage}")
        yield server


@pytest.mark.parametrize("stage", ["a", "b"])
def test_no_values_arrive_as_none_from_this_stage_and_from_another_process(server: ServerProcess, stage: str) -> None:
    assert server.logged(stage, "arity").count(["none", "0"]) == 2


@pytest.mark.parametrize("stage", ["a", "b"])
def test_a_nil_value_and_two_values_arrive_alike_locally_and_remotely(server: ServerProcess, stage: str) -> None:
    rows = sorted(server.logged(stage, "arity"))
    assert ["local-nil", "1"] in rows and ["remote-nil", "1"] in rows
    assert ["local-two", "2"] in rows and ["remote-two", "2"] in rows
