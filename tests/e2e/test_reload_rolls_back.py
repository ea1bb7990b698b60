"""A reload whose new main script raises while it loads changes nothing (docs/operations.md, "Hot
reload"): real Lua, real loopback sockets, the stage in this process. The running runtime keeps
its timers, its handlers and its sockets with their per-connection callbacks; what the failed
script opened is closed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.error import ConnectionRefusedError

from stagetx.child.control import stage_stats
from stagetx.codec import pack_py
from stagetx.message import Message
from stagetx.stages.lua.stage import ReloadError
from tests.e2e.test_reload_keeps_connections import Upstream
from tests.support import RunningStage, connect, free_port, wait_for

WAIT = 5.0

# per connection: a counter in the accept function's closure, so a re-offered socket would restart it
V1 = """
VERSION, ticks = "v1", 0
stage.addtask(20, function() ticks = ticks + 1 return 20 end)
stage.waitfor("hit", function(n) log4cxx.info("hit", VERSION, n) end)
broker.ready("tcp://127.0.0.1:{port}?packet", function(socket)
    local n = 0
    return function(s, data) n = n + 1 return VERSION .. ":" .. n .. ":" .. data end
end)
function on_unload() return {{ticks = ticks}} end
"""

# loads until line 6, after taking up the listener and opening another one
BROKEN = """
VERSION = "v2"
broker.ready("tcp://127.0.0.1:{port}?packet", function() return function() return "v2" end end)
broker.ready("tcp://127.0.0.1:{other}?packet")
stage.waitfor("hit", function(n) log4cxx.info("hit", VERSION, n) end)
local config = nil; local _ = config.database
"""


@pytest_twisted.ensureDeferred
async def test_a_script_that_raises_while_loading_leaves_the_running_one_serving(tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    async with RunningStage(tmp_path, V1.format(port=port)) as run:
        stage = run.server.hosts[0].stages[0]
        client = await connect(port)
        client.send(b"a")
        await wait_for(lambda: client.frames() == [b"v1:1:a"], WAIT, "the first echo")
        ticks = run.lua("return ticks")[0]
        (tmp_path / "lua" / "a.lua").write_text(textwrap.dedent(BROKEN.format(port=port, other=other)))
        client.send(b"b")  # on its way while the stage reloads
        d = stage.stage.reload().addTimeout(WAIT, reactor)
        with pytest.raises(ReloadError, match=r"^lua/a\.lua:6: attempt to index a nil value"):
            await d
        stage.receive(Message("hit", pack_py((7,)), stage.sender))
        await wait_for(lambda: client.frames() == [b"v1:1:a", b"v1:2:b"], WAIT, "the old callback's echo")
        client.send(b"c")
        await wait_for(lambda: len(client.frames()) == 3, WAIT, "another echo")
        assert client.frames()[2] == b"v1:3:c" and not client.closed  # the same closure: no re-offer
        assert run.said("hit") == [["v1", "7"]]  # the running runtime's handler, not the failed one's
        await wait_for(lambda: run.lua("return ticks")[0] > ticks + 2, WAIT, "the old timer ticking")
        with pytest.raises(ConnectionRefusedError):  # the failed script's own listener is closed
            await connect(other)
        newcomer = await connect(port)  # the listener still accepts, for the running script
        newcomer.send(b"d")
        await wait_for(lambda: newcomer.frames() == [b"v1:1:d"], WAIT, "a new client's echo")
        text = run.text()
        assert "reload of =lua+a failed, the running scripts are kept: lua/a.lua:6: attempt to index" in text
        assert "not re-created" not in text and "stage =lua+a reloaded" not in text
        assert stage.failure is None and stage.stage.reloads == 0

        (tmp_path / "lua" / "a.lua").write_text(textwrap.dedent(V1.format(port=port).replace('"v1"', '"v3"')))
        await stage.stage.reload().addTimeout(WAIT, reactor)
        client.send(b"e")
        await wait_for(lambda: len(client.frames()) == 4, WAIT, "the echo after a good reload")
        assert client.frames()[3] == b"v3:1:e" and stage.stage.reloads == 1


JOIN = """
VERSION = "{version}"
broker.join("tcp://127.0.0.1:{port}?packet", function(socket)
    log4cxx.info("joined", VERSION, socket.id)
    UP = socket.id
    return function(s, data) log4cxx.info("got", VERSION, data) end
end)
stage.waitfor("send", function(text) broker.signal({{UP}}, text) end)
{extra}
"""


@pytest_twisted.ensureDeferred
async def test_a_join_connection_goes_back_to_the_running_script(tmp_path: Path) -> None:
    Upstream.accepted = 0
    listening = reactor.listenTCP(0, protocol.Factory.forProtocol(Upstream), interface="127.0.0.1")
    port = listening.getHost().port
    try:
        async with RunningStage(tmp_path, JOIN.format(port=port, version="v1", extra="")) as run:
            stage = run.server.hosts[0].stages[0]
            await wait_for(lambda: len(run.said("joined")) == 1, WAIT, "the connection")
            endpoint = stage_stats(stage)["listeners"][0]
            broken = JOIN.format(port=port, version="v2", extra='error("no")')
            (tmp_path / "lua" / "a.lua").write_text(textwrap.dedent(broken))
            with pytest.raises(ReloadError, match="no"):
                await stage.stage.reload().addTimeout(WAIT, reactor)
            stage.receive(Message("send", pack_py(("x",)), stage.sender))
            await wait_for(lambda: run.said("got") == [["v1", "up1:x"]], WAIT, "the reply, to the old callback")
            assert Upstream.accepted == 1 and len(run.said("joined")) == 1  # kept, not dialled again
            # stat and /metrics still see the endpoint, with the "x" it sent and the reply
            assert stage_stats(stage)["listeners"] == [
                endpoint | {"frames_out": 1, "bytes_out": 5, "frames_in": 1, "bytes_in": 9}
            ]
    finally:
        await listening.stopListening()
