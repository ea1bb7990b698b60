"""The original STAGE platform's own scripts as real stages of a real server (``twistd -n stage``).

The scripts (``bin/package/test_*.lua``), the preload folder and ``bin/lib/stacktrace.lua`` are
in ``tests/e2e/stage_original`` as the original repository has them (MIT licence, see the
headers); lines that need what stagetx does not have (``_SANDBOX`` internals, ``odbc``,
``bundle``, luvit) are commented out there with the reason. The configuration is in the
original's own spelling (``lua.so+ID``, ``%odbc``, ``#license``). Each test asserts what the
script's ``print`` lines show on the original, addresses (``table: 0x…``) and generated ids
aside.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess

ORIGINAL = Path(__file__).with_name("stage_original")

CONFIG = {
    "#license": ["DOCKER", "0"],
    "#router": [1500],
    "#threads": [4, 10000],
    "#startup": [
        ["index.so+index", "=ticket+ticket", "lua.so+indexer"],
        ["lua.so+waitfor", "lua.so+actor", "lua.so+coroutine", "lua.so+example"],
        ["luajit.so+jwaitfor", "luajit.so+jactor", "luajit.so+jcoroutine"],
    ],
    "lua.so": {
        "%preload": "preload",
        "%package": ["package", "rollback", "[0]lib", "[0]"],
        "%odbc": {},
        "%cluster": ["tcp://127.0.0.1:8081?bson=64k,128k"],
        "lua.so+waitfor": "test_waitfor",
        "lua.so+actor": "test_actor",
        "lua.so+coroutine": "test_coroutine",
        "lua.so+example": "test_example",
        "lua.so+indexer": "test_index",
    },
    "luajit.so": {  # the original's own configuration ran its scripts under LuaJIT
        "%preload": "preload",
        "%package": ["package", "rollback", "[0]lib", "[0]"],
        "luajit.so+jwaitfor": "test_waitfor",
        "luajit.so+jactor": "test_actor",
        "luajit.so+jcoroutine": "test_coroutine",
    },
    "=ticket+ticket": [100000, {"odbc": 10}],
    "index.so+index": ["index/", 128, 100000],
}

TABLE = re.compile(r"table: 0x[0-9a-f]+")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("original")
    for part in ("package", "preload", "lib"):
        shutil.copytree(ORIGINAL / part, root / part)
    (root / "stage.json").write_text(json.dumps(CONFIG))
    with ServerProcess(root / "stage.json") as server:
        for waitfor, actor in (("waitfor", "actor"), ("jwaitfor", "jactor")):
            server.wait_for(lambda w=waitfor: printed(server, w, "CANCEL"), 30, "test_waitfor's cancel task")
            server.wait_for(lambda a=actor: printed(server, a, "RETURN"), 30, "test_actor's return")
        server.wait_for(lambda: printed(server, "example", "TICKET CALLBACK"), 30, "test_example's ticket")
        yield server


def printed(server: ServerProcess, stage: str, first: str | None = None) -> list[list[str]]:
    """What ``print`` wrote in stage ``stage``, as tab-separated fields, addresses replaced by
    ``table``; only lines whose first field is ``first`` when given (the host's own "stage …
    started" line left out)."""
    lines = []
    for text in server.stage_lines(stage):
        fields = TABLE.sub("table", text).split("\t")
        if fields[0].startswith("stage =") and fields[0].endswith(" started"):
            continue
        if first is None or fields[0] == first:
            lines.append(fields)
    return lines


@pytest.mark.parametrize("stage", ["waitfor", "jwaitfor"])
def test_waitfor_thread_object_callbacks_and_stage_call(server: ServerProcess, stage: str) -> None:
    """``thread.new(f).waitfor(g)`` gets f's return; ``_WAITFOR[-1]``; a waitfor with bound values
    unregisters itself, so the cancel task finds nothing to ``stage.call`` (Lua 5.4 and LuaJIT)."""
    assert printed(server, stage, "RESULT") == [["RESULT", "HELLO"]]
    calls = printed(server, stage, "CALLBACK")
    assert ["CALLBACK", "TEST", "callback"] in calls
    (anonymous,) = [c for c in calls if c[1] != "TEST"]
    assert anonymous[0] == "CALLBACK" and anonymous[2:] == ["USERDATA", "HELLO"]
    assert printed(server, stage, "CANCEL") == [["CANCEL", anonymous[1], "nil", "nil"]]


@pytest.mark.parametrize("stage", ["actor", "jactor"])
def test_actor_preload_asks_and_returns_through_stage_call(server: ServerProcess, stage: str) -> None:
    """``stage.actor`` (preload/actor.lua) sends ``"callback=" .. id``; the reply runs the actor's
    function through ``stage.call``, with the bound ``{}`` spread to nothing."""
    assert printed(server, stage, "CALLBACK") == [["CALLBACK", "HI"]]
    assert printed(server, stage, "RETURN") == [["RETURN", "nil", "HELLO"]]
    (shown,) = [line for line in printed(server, stage) if line[0].startswith("table")]
    assert shown == ["table"]  # print(v): the proxy (the original's bundle proxy prints its own name)


@pytest.mark.parametrize("stage", ["coroutine", "jcoroutine"])
def test_coroutine_script_prints_the_classic_sequence(server: ServerProcess, stage: str) -> None:
    """``_SANDBOX`` is nil here (its internals are the original's), so the two SANDBOX lines show nil."""
    assert printed(server, stage) == [
        ["SANDBOX Sample"],
        ["coroutine section 1", "3", "2", "10"],
        ["main", "true", "4", "3"],
        ["BEGIN SANDBOX", "nil", "Hello"],
        ["coroutine section 2", "12", "nil", "13"],
        ["main", "true", "5", "1"],
        ["coroutine section 3", "5", "6", "16"],
        ["END SANDBOX", "nil", "World"],
        ["main", "true", "2", "end"],
        ["main", "false", "cannot resume dead coroutine"],
    ]


def test_example_globals_local_message_proxy_ticket_and_logger(server: ServerProcess) -> None:
    # ticket_callback gives its ticket back by no return: its hold runs out after the default 1 s,
    # and ticket:@ is told ("cancel", {ticket_id = callback}), as the original's Cleanup does
    server.wait_for(lambda: printed(server, "example", "TICKET CONTROL"), 30, "the ticket's hold to run out")
    lines = printed(server, "example")
    assert lines[:5] == [
        ["EXAMPLE", "table"],
        ["", "1", "10"],
        ["", "2", "20"],
        ["SANDBOX"],
        ["TEST", "table", "test", "40"],
    ]
    assert ["WAITFOR", "10", "20", "table"] in lines
    test = lines.index(["TEST", "table", "test", "40"])
    assert lines[test + 1 : test + 3] == [["", "1", "10"], ["", "2", "20"]]
    assert ["PROXY", "table"] in lines
    listed = lines[lines.index(["PROXY", "table"]) + 1 :][:4]
    assert sorted(tuple(line[1:]) for line in listed) == sorted(
        [("test", "70"), ("name", "HELLO"), ("10", "STAGE"), ("table", "HAHA")]
    )
    failed = lines.index(["FAILED CALLBACK", "ticket:odbc?fail_callback", "table"])
    assert sorted(lines[failed + 1 : failed + 3]) == [["", "", "USER DATA"], ["", "ticket_callback", "true"]]
    assert ["TICKET CALLBACK", "HELLO"] in lines
    assert ["HELLO LOG4CXX"] in lines  # logger.out, logger = require('logger') in preload/stage.lua
    assert [line for line in lines if line[0] == "TICKET CONTROL"] == [["TICKET CONTROL", "cancel", "table"]]
    assert not [line for line in lines if line[0] in ("INDEX", "NAME CHANGE")]


def test_index_script_fills_the_index_and_its_total_reaches_the_catch_all(server: ServerProcess) -> None:
    """``index:s?index`` with 500 random members, then after 61 s ``index:t?index=total_callback``:
    there is no such handler, so ``"@"`` prints the message id, the reply address (nil: no reply
    wanted) and the values, then ``print_r`` the count.

    The filling task returns nothing: the STAGE document (and stagetx) end a task that returns
    no number, so it runs once; the original's C++ re-armed it with its last interval, and there
    the count would keep growing by 500 every 100 ms up to about 200,000 (docs/lua-api.md,
    "Differences from STAGE").
    """
    server.wait_for(
        lambda: printed(server, "indexer", "total_callback") and printed(server, "indexer", "#"),
        100,
        "the 61 s total and the count print_r dumps after it",
    )
    assert printed(server, "indexer", "total_callback") == [["total_callback", "nil", "table"]]
    (dump,) = printed(server, "indexer", "#")
    assert dump[:1] == ["#"] and dump[1].startswith("1: ")
    assert 490 < int(dump[1][3:]) <= 500  # 500 ids drawn from 1..1e8 rarely collide
    assert not [line for line in server.lines if "stage.indexer" in line and "Lua error" in line]
