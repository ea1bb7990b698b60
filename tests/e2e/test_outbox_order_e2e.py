"""Order and answers of messages signalled to another process in one turn, between two real
processes: most leave Lua in batches (the prelude's outbox), some cross at once (broadcast, a
target not seen before in the turn); the receiver sees them in the order they were signalled."""

from __future__ import annotations

import pytest

from tests.support import ServerProcess, write_app

CONFIG = {
    "#startup": [["=lua+a"], ["=lua+b"]],
    "=lua": {"%package": ["[0]lua"], "=lua+a": "a", "=lua+b": "b"},
}

A = """
local N = 3000
-- ping b until it answers: a message sent before the link is up is lost
local started, pings = false, 0
local function ping()
    if started or pings == 200 then return end
    pings = pings + 1
    stage.signal("b:ping")
    stage.addtask(50, ping)
end
ping()
local backs = 0
stage.waitfor("back", function(i) backs = backs + 1; if backs == N // 7 then log4cxx.info("backs", backs) end end)
stage.waitfor("pong", function()
    if started then return end
    started = true
    local refused = 0
    for i = 1, N do
        local target = (i % 7 == 0 and "b:n=back") or (i % 101 == 0 and "*b:n") or "b:n"
        if not stage.signal(target, i) then refused = refused + 1 end
    end
    log4cxx.info("sent", refused, tostring(stage.signal("nobody:n", 1)), stage.signal("b:done"))
end)
"""

B = """
local last, wrong = 0, 0
stage.waitfor("ping", function() stage.signal("a:pong") end)
stage.waitfor("n", function(i)
    if i ~= last + 1 then wrong = wrong + 1 end
    last = i
    return i
end)
stage.waitfor("done", function() log4cxx.info("received", last, wrong) end)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    root = tmp_path_factory.mktemp("outbox")
    path = write_app(root, CONFIG, {"a": A, "b": B})
    with ServerProcess(path) as server:
        server.wait_for(lambda: server.logged("b", "received") and server.logged("a", "backs"), 30, "all messages")
        yield server


def test_every_message_arrives_once_in_the_order_signalled(server: ServerProcess) -> None:
    assert server.logged("b", "received") == [["3000", "0"]]


def test_each_signal_answered_at_the_call(server: ServerProcess) -> None:
    assert server.logged("a", "sent") == [["0", "false", "true"]]


def test_replies_to_the_batched_requests_come_back(server: ServerProcess) -> None:
    assert server.logged("a", "backs") == [[str(3000 // 7)]]
