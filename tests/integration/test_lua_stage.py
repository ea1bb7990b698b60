"""A Lua stage in this process with the real reactor and real Lua: settings, scripts, messaging, handlers, logging."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted

from stagetx.lua.api import ERROR_LOG_BURST
from tests.support import InProcessServer, LogCapture, wait_for, write_app


def lua_app(tmp_path: Path, scripts: dict[str, str], **settings: object) -> Path:
    config = {
        "#startup": [["=lua+a"]],
        "=lua+a": {"%package": ["[0]lua"], **settings, "=lua+a": "main"},
        "greeting": "hello",
    }
    return write_app(tmp_path, config, scripts)


async def run(path: Path, until: str, timeout: float = 20.0, namespace: str = "stage.a") -> LogCapture:
    """Start the app, wait until stage ``a`` logs a line starting with ``until``, stop it."""
    with LogCapture() as capture:
        server = InProcessServer(path)
        await server.start()
        try:
            await wait_for(lambda: any(line.startswith(until) for line in capture.lines(namespace)), timeout, until)
        finally:
            await server.stop()
    return capture


def logged(capture: LogCapture, prefix: str) -> list[list[str]]:
    return [line.split("\t")[1:] for line in capture.lines("stage.a") if line.split("\t")[0] == prefix]


@pytest_twisted.ensureDeferred
async def test_waitfor_matches_full_id_then_groups_then_stage_prefix(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        local function tag(name) return function() log4cxx.info("hit", _WAITFOR[0], name, _WAITFOR[-1]) end end
        stage.waitfor("s:g.m.cb", tag("full"))
        stage.waitfor("s:g.m.", tag("msg"))
        stage.waitfor("s:g.", tag("group"))
        stage.waitfor("s:", tag("stage"))
        stage.waitfor("x.y.", tag("plain"))
        for _, id in ipairs({"s:g.m.cb", "s:g.m.other", "s:g.zz", "s:q", "x.y.z", "a.b:c"}) do
            stage.signal(":" .. id)
        end
        log4cxx.info("unmatched", tostring(stage.signal(":a.b:c")))
        log4cxx.info("done")
    """
        },
    )
    capture = await run(path, "done")
    assert logged(capture, "hit") == [
        ["s:g.m.cb", "full", "s:g.m.cb"],
        ["s:g.m.other", "msg", "s:g.m."],
        ["s:g.zz", "group", "s:g."],
        ["s:q", "stage", "s:"],
        ["x.y.z", "plain", "x.y."],
    ]
    assert logged(capture, "unmatched") == [["false"]]


@pytest_twisted.ensureDeferred
async def test_waitfor_bound_values_lookup_unregister_and_auto_ids(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        local function h(...) log4cxx.info("args", ...) end
        stage.waitfor("m", h, "b1", "b2")
        stage.signal(":m", "d1", "d2")
        local f, b1, b2 = stage.waitfor("m")
        log4cxx.info("lookup", f == h, b1, b2)
        stage.waitfor("m", nil)
        log4cxx.info("gone", stage.waitfor("m") == nil, tostring(stage.signal(":m")))
        local a = stage.waitfor(function(x) log4cxx.info("auto", x) end)
        local b = stage.waitfor(function() end)
        log4cxx.info("ids", a ~= b, type(a))
        stage.signal(a, "via-auto")
    """,
            "next": "",
        },
    )
    capture = await run(path, "auto")
    assert logged(capture, "args") == [["b1", "b2", "d1", "d2"]]
    assert logged(capture, "lookup") == [["true", "b1", "b2"]]
    assert logged(capture, "gone") == [["true", "false"]]
    assert logged(capture, "ids") == [["true", "string"]]
    assert logged(capture, "auto") == [["via-auto"]]


@pytest_twisted.ensureDeferred
async def test_local_messages_are_ordered_copied_and_async(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        local seen = {}
        stage.waitfor("m", function(i, t)
            seen[#seen + 1] = i
            t.changed = true
            if i == 100 then
                local in_order = #seen == 100
                for k = 1, 100 do in_order = in_order and seen[k] == k end
                log4cxx.info("order", tostring(in_order), tostring(t.inner ~= shared_inner))
            end
        end)
        local shared = {n = 1, inner = {1, 2}, gone = stage.null}
        shared_inner = shared.inner
        for i = 1, 100 do stage.signal("m", i, shared) end
        log4cxx.info("after-send", #seen, tostring(shared.changed), tostring(rawget(shared, "gone") == stage.null))
        stage.waitfor("null", function(t, v) log4cxx.info("null", tostring(t.gone), tostring(v)) end)
        stage.signal("null", shared, stage.null)
        stage.waitfor("lone", function(v) log4cxx.info("lone", tostring(v)) end)
        stage.signal("lone", stage.null)
        log4cxx.info("missing", tostring(stage.signal("nobody", 1)))
        stage.waitfor("sync", function(t) t.x = 2; return "r1", "r2" end)
        local t = {x = 1}
        local r1, r2 = stage.signal(":sync", t)
        log4cxx.info("sync", r1, r2, t.x)
    """
        },
    )
    capture = await run(path, "lone")
    assert logged(capture, "after-send") == [["0", "nil", "true"]]
    assert logged(capture, "order") == [["true", "true"]]
    assert logged(capture, "null") == [["nil", "nil"]]
    assert logged(capture, "lone") == [["nil"]]
    assert logged(capture, "missing") == [["false"]]
    assert logged(capture, "sync") == [["r1", "r2", "1"]]


@pytest_twisted.ensureDeferred
async def test_handler_error_is_logged_with_file_and_line_and_stage_goes_on(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        stage.waitfor("bad", function() local x = nil; return x.field end)
        stage.waitfor("good", function() log4cxx.info("still serving") end)
        stage.signal("bad")
        stage.signal("good")
    """
        },
    )
    capture = await run(path, "still serving")
    errors = [e for e in capture.events if e.get("log_namespace") == "stage.a" and e["log_level"].name == "error"]
    assert len(errors) == 1
    assert "main.lua:2:" in errors[0]["error"] and errors[0]["msgid"] == " of message 'bad'"


@pytest_twisted.ensureDeferred
async def test_a_flood_of_lua_errors_is_counted_each_but_logged_at_a_bounded_rate(tmp_path: Path) -> None:
    """A client that makes the script fail on every frame: each error counts, the log gets the
    first ``ERROR_LOG_BURST`` in full and the rest as "and N more like it" lines."""
    path = lua_app(
        tmp_path,
        {
            "main": """
        stage.waitfor("bad", function(i) error("bad input " .. i) end)
        stage.waitfor("good", function() log4cxx.info("still serving") end)
        for i = 1, 500 do stage.signal("bad", i) end
        stage.signal("good")
    """
        },
    )
    with LogCapture() as capture:
        server = InProcessServer(path)
        await server.start()
        try:
            await wait_for(lambda: "still serving" in capture.lines("stage.a"), 20, "still serving")
            counted = server.hosts[0].stages[0].errors
        finally:
            await server.stop()
    errors = [e for e in capture.events if e.get("log_namespace") == "stage.a" and e["log_level"].name == "error"]
    assert counted == 500
    assert ERROR_LOG_BURST <= len(errors) < 100  # a summary line per interval besides the burst
    assert "main.lua:2: bad input 1" in errors[0]["error"]


@pytest_twisted.ensureDeferred
async def test_runaway_loop_is_interrupted_by_the_budget(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        stage.addtask(1, function() while true do end end)
        stage.addtask(400, function() log4cxx.info("alive") end)
    """
        },
        **{"%budget": 200},
    )
    capture = await run(path, "alive")  # the reactor runs again: the later task logs
    errors = [
        e["error"] for e in capture.events if e.get("log_namespace") == "stage.a" and e["log_level"].name == "error"
    ]
    assert any("main.lua:2:" in e and "budget of 200 ms exceeded" in e for e in errors), errors


@pytest_twisted.ensureDeferred
async def test_memory_limit_fails_the_allocation_not_the_stage(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        stage.addtask(1, function() local t = {} for i = 1, 1e8 do t[i] = string.rep("x", 100) .. i end end)
        stage.addtask(100, function() collectgarbage(); log4cxx.info("alive") end)
    """
        },
        **{"%memory": "16m", "%budget": 60000},  # only the memory limit may stop it, however slow the machine
    )
    capture = await run(path, "alive")
    errors = [
        e["error"] for e in capture.events if e.get("log_namespace") == "stage.a" and e["log_level"].name == "error"
    ]
    assert any("not enough memory" in e for e in errors)


@pytest_twisted.ensureDeferred
async def test_addtask_repeats_by_return_value_and_cancels(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        local n, m = 0, 0
        stage.addtask(5, function(step) n = n + 1; if n < 3 then return step end; log4cxx.info("repeat", n) end, 5)
        local task
        task = stage.addtask(5, function() m = m + 1; stage.addtask(task, nil); return 5 end)
        local never = stage.addtask(50, function() log4cxx.info("never") end)
        stage.addtask(never, nil)
        local up = "upvalue"
        stage.addtask(0, function() log4cxx.info("closure", up) end)
        stage.addtask(100, function() log4cxx.info("done", m) end)
    """
        },
    )
    capture = await run(path, "done")
    assert logged(capture, "repeat") == [["3"]]
    assert logged(capture, "closure") == [["upvalue"]]
    assert logged(capture, "done") == [["1"]]
    assert logged(capture, "never") == []


@pytest_twisted.ensureDeferred
async def test_idle_function_is_rescheduled_by_its_return_value(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        local n = 0
        return function()
            n = n + 1
            if n == 3 then log4cxx.info("idle", n) return 0 end
            return 5
        end
    """
        },
    )
    capture = await run(path, "idle")
    assert logged(capture, "idle") == [["3"]]


@pytest_twisted.ensureDeferred
async def test_preload_runs_first_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "b.lua").write_text("ORDER = (ORDER or '') .. 'b'\n")
    (tmp_path / "pre" / "a.lua").write_text("ORDER = (ORDER or '') .. 'a'\n")
    path = lua_app(tmp_path, {"main": 'log4cxx.info("order", ORDER)'}, **{"%preload": "pre"})
    capture = await run(path, "order")
    assert logged(capture, "order") == [["ab"]]


@pytest_twisted.ensureDeferred
async def test_once_and_v(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        local runs = 0
        for i = 1, 3 do stage.once("init", function() runs = runs + 1 end) end
        stage.once("init", nil)
        stage.once("init", function() runs = runs + 1 end)
        local ok, err = pcall(stage.once, "boom", function() error("inside once") end)
        stage.once("boom", function() runs = runs + 100 end)
        log4cxx.info("once", runs, tostring(ok))
        local t = {a = 1}
        stage.v("k", t)
        t.a = 2
        local copy = stage.v("k")
        copy.a = 3
        log4cxx.info("v", stage.v("k").a)
        log4cxx.info("update", stage.v("n", function(old) return (old or 0) + 5 end),
                     stage.v("n", function(old) return old * 2 end))
        stage.v("k", nil)
        log4cxx.info("deleted", tostring(stage.v("k")))
        local ok2, err2 = pcall(stage.v, "bad", coroutine.create(function() end))
        log4cxx.info("bad", tostring(ok2), tostring(err2):find("coroutine") ~= nil)
    """
        },
    )
    capture = await run(path, "bad")
    assert logged(capture, "once") == [["2", "false"]]
    assert logged(capture, "v") == [["1"]]
    assert logged(capture, "update") == [["5", "10"]]
    assert logged(capture, "deleted") == [["nil"]]
    assert logged(capture, "bad") == [["false", "true"]]


@pytest_twisted.ensureDeferred
async def test_load_searches_package_caches_and_takes_ids(tmp_path: Path) -> None:
    (tmp_path / "v1" / "lib").mkdir(parents=True)
    (tmp_path / "v1" / "lib" / "util.lua").write_text("COUNT = (COUNT or 0) + 1\nreturn {answer = 42}\n")
    (tmp_path / "devel").mkdir()
    path = lua_app(
        tmp_path,
        {
            "main": """
        local u = stage.load("lib.util")
        local again = stage.load("lib.util")
        log4cxx.info("load", u.answer, COUNT, u == again)
        log4cxx.info("id", stage.load("lib.util+answer"))
        log4cxx.info("info", stage.load("lib.util", function(v, i)
            return i[1], i[2]:match("v1/lib/util.lua$") ~= nil, type(i[3])
        end))
        local ok, err = pcall(stage.load, "lib.missing")
        log4cxx.info("missing", tostring(ok), err:find("lib.missing") ~= nil)
        local f = io.open(PATH .. "/devel/broken.lua", "w"); f:write("return {\\n  oops = ,\\n}"); f:close()
        local ok2, err2 = pcall(stage.load, "broken")
        log4cxx.info("broken", tostring(ok2), err2:find("broken.lua:2:") ~= nil)
    """
        },
        **{"%package": ["devel", "v1", "[0]lua"]},
    )
    path.write_text(path.read_text().replace('"greeting"', f'"path": {str(tmp_path)!r}, "greeting"').replace("'", '"'))
    (tmp_path / "lua" / "main.lua").write_text(
        'PATH = process["$path"]\n' + (tmp_path / "lua" / "main.lua").read_text()
    )
    capture = await run(path, "broken")
    assert logged(capture, "load") == [["42", "1", "true"]]
    assert logged(capture, "id") == [["42"]]
    assert logged(capture, "info") == [["1", "true", "number"]]
    assert logged(capture, "missing") == [["false", "true"]]
    assert logged(capture, "broken") == [["false", "true"]]


@pytest_twisted.ensureDeferred
async def test_load_with_an_id_of_a_script_that_returned_no_table_gives_the_value_itself(tmp_path: Path) -> None:
    """The original platform's ``stage.load("file+id")`` takes ``[id]`` only from a table: any
    other result is returned as it is (also to ``f`` and through ``stage.require``)."""
    path = lua_app(
        tmp_path,
        {
            "main": """
        log4cxx.info("string", pcall(stage.load, "plain+id"))
        log4cxx.info("number", pcall(stage.load, "number+id"))
        log4cxx.info("nothing", select("#", stage.load("nothing+id")), tostring(stage.load("nothing+id")))
        log4cxx.info("f", stage.load("plain+id", function(v, i) return v, i[1] end))
        log4cxx.info("require", stage.require("number+x"))
        log4cxx.info("table", stage.load("tbl+id"), tostring(stage.load("tbl+other")))
        log4cxx.info("done")
    """,
            "plain": "return 'plain'",
            "number": "return 7",
            "nothing": "local x = 1",
            "tbl": "return {id = 'from table'}",
        },
    )
    capture = await run(path, "done")
    assert logged(capture, "string") == [["true", "plain"]]
    assert logged(capture, "number") == [["true", "7"]]
    assert logged(capture, "nothing") == [["1", "nil"]]
    assert logged(capture, "f") == [["plain", "0"]]
    assert logged(capture, "require") == [["7"]]
    assert logged(capture, "table") == [["from table", "nil"]]


@pytest_twisted.ensureDeferred
async def test_load_errors_reach_the_caller_and_once_marks_before_raising(tmp_path: Path) -> None:
    """stagetx follows its specification (2.1, 2.2) where the original platform was quiet: a
    missing script or an error in it raises at ``stage.load`` (``f`` is not called), and an error
    in ``stage.once``'s ``f`` is raised to the caller (the key stays marked). Uncaught, such an
    error is logged with file and line and the stage keeps serving."""
    path = lua_app(
        tmp_path,
        {
            "main": """
        local called = false
        local ok, err = pcall(stage.load, "nope+x", function() called = true; return "F" end)
        local named = err:find("'nope' not found along %package", 1, true) ~= nil
        log4cxx.info("missing f", tostring(ok), tostring(called), named)
        ok, err = pcall(stage.load, "bad")
        log4cxx.info("bad", tostring(ok), err:find("lua/bad.lua:2: boom in bad", 1, true) ~= nil)
        ok, err = pcall(stage.once, "k", function() error("in once") end)
        log4cxx.info("once", tostring(ok), err:match("main.lua:%d+: in once") ~= nil)
        stage.once("k", function() log4cxx.info("ran again") end)
        stage.waitfor("go", function() log4cxx.info("served") end)
        stage.addtask(0, function() stage.signal(":go") end)
        stage.load("bad")
        log4cxx.info("not reached")
    """,
            "bad": "local x = 1\nerror('boom in bad')",
        },
    )
    capture = await run(path, "served")
    assert logged(capture, "missing f") == [["false", "false", "true"]]
    assert logged(capture, "bad") == [["false", "true"]]
    assert logged(capture, "once") == [["false", "true"]]
    assert logged(capture, "ran again") == []
    assert logged(capture, "not reached") == []
    assert any("lua/bad.lua:2: boom in bad" in line for line in capture.lines())


@pytest_twisted.ensureDeferred
async def test_load_picks_up_an_edited_file_after_the_recheck_period(tmp_path: Path) -> None:
    script = tmp_path / "lua" / "conf.lua"
    path = lua_app(
        tmp_path,
        {
            "conf": "return {v = 1}",
            "main": """
        log4cxx.info("v", stage.load("conf").v)
        stage.addtask(100, function() log4cxx.info("v", stage.load("conf").v) end)
        stage.addtask(400, function() log4cxx.info("v", stage.load("conf").v); log4cxx.info("end") end)
    """,
        },
        **{"%recheck": [200, 200]},
    )
    with LogCapture() as capture:
        server = InProcessServer(path)
        await server.start()
        script.write_text("return {v = 2, padding = 'changes the size'}")
        await wait_for(lambda: "end" in capture.lines("stage.a"), 20, "end")
        await server.stop()
    assert logged(capture, "v") == [["1"], ["1"], ["2"]]


@pytest_twisted.ensureDeferred
async def test_log4cxx_substitutions_and_groups(tmp_path: Path) -> None:
    os.environ["STAGETX_TEST_ENV"] = "envvalue"
    path = lua_app(
        tmp_path,
        {
            "main": """
        local function where() log4cxx.info("at %l") end
        where()
        log4cxx.warn("env %{STAGETX_TEST_ENV} {braces} %q 100%", "second")
        log4cxx.info("to group %{=audit:error}")
        print("printed", 1, nil)
        log4cxx.info("done")
    """
        },
    )
    capture = await run(path, "done")
    lines = capture.lines("stage.a")
    assert "at lua/main.lua [where:2]" in lines
    assert "env envvalue {braces} %q 100%\tsecond" in lines
    assert "printed\t1\tnil" in lines
    audit = [e for e in capture.events if e.get("log_namespace") == "audit"]
    assert [(e["message"], e["log_level"].name) for e in audit] == [("to group ", "error")]


@pytest_twisted.ensureDeferred
async def test_a_value_whose_tostring_fails_in_log4cxx_is_an_error_at_the_script_s_line(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        {
            "main": """
        local bad = setmetatable({}, {__tostring = function() return {} end})
        local raising = setmetatable({}, {__tostring = function() error("no text") end})
        log4cxx.info("bad", pcall(function() log4cxx.info("x", bad) end))
        log4cxx.info("raising", pcall(function() print(raising) end))
        log4cxx.info("done")
    """
        },
    )
    capture = await run(path, "done")
    bad, raising = logged(capture, "bad"), logged(capture, "raising")
    assert bad == [["false", "lua/main.lua:4: '__tostring' must return a string"]], bad
    assert raising == [["false", "lua/main.lua:3: no text"]], raising


@pytest_twisted.ensureDeferred
async def test_process_and_thread_properties(tmp_path: Path) -> None:
    os.environ.pop("STAGETX_SET_BY_LUA", None)
    path = lua_app(
        tmp_path,
        {
            "main": """
        log4cxx.info("ids", process.id, process.stage, type(process.tick), type(process.args),
                     type(thread.id), type(thread.tick))
        log4cxx.info("config", process["$greeting"], process["$mine"], tostring(process["$nothing"]))
        process["%STAGETX_SET_BY_LUA"] = "yes"
        process["$greeting"] = {x = 1}
        log4cxx.info("written", process["%STAGETX_SET_BY_LUA"], process["$greeting"].x)
        process["$"] = '{"greeting": "replaced"}'
        log4cxx.info("replaced", process["$greeting"])
        process.title = "stagetx-test-title"
        log4cxx.info("title", process.title)
        log4cxx.info("readonly", tostring(pcall(function() process.id = 1 end)))
    """
        },
        mine="own setting",
    )
    capture = await run(path, "readonly")
    assert logged(capture, "ids") == [[str(os.getpid()), "1", "number", "table", "number", "number"]]
    assert logged(capture, "config") == [["hello", "own setting", "nil"]]
    assert logged(capture, "written") == [["yes", "1"]]
    assert logged(capture, "replaced") == [["replaced"]]
    assert logged(capture, "title") == [["stagetx-test-title"]]
    assert logged(capture, "readonly") == [["false"]]
    assert os.environ["STAGETX_SET_BY_LUA"] == "yes"


@pytest.mark.parametrize("kind", ["lua", "luajit"])
@pytest_twisted.ensureDeferred
async def test_both_vm_kinds_run_stages(tmp_path: Path, kind: str) -> None:
    config = {
        "#startup": [[f"={kind}+a"]],
        f"={kind}+a": {"%package": ["[0]lua"], f"={kind}+a": "main"},
    }
    path = write_app(
        tmp_path,
        config,
        {"main": 'stage.waitfor("m", function(v) log4cxx.info("got", v, _VERSION) end); stage.signal("m", 7)'},
    )
    capture = await run(path, "got")
    version = "Lua 5.1" if kind == "luajit" else "Lua 5.4"
    assert logged(capture, "got") == [["7", version]]


@pytest_twisted.ensureDeferred
async def test_catch_all_handler_takes_what_no_other_id_matches(tmp_path: Path) -> None:
    """The original platform's ``waitfor("@")``: tried after every other candidate, for local,
    queued and replied messages alike; ``_WAITFOR[-1]`` is ``"@"``."""
    path = lua_app(
        tmp_path,
        {
            "main": """
        stage.waitfor("s:", function(v) log4cxx.info("prefix", _WAITFOR[0], v) end)
        stage.waitfor("@", function(v) log4cxx.info("any", _WAITFOR[0], _WAITFOR[-1], v) end)
        stage.signal(":s:x", 1)
        stage.signal(":other.id", 2)
        log4cxx.info("queued", tostring(stage.signal("nobody", 3)))
        stage.signal("a:ask=answer", 4)
        stage.addtask(50, function() log4cxx.info("done") end)
    """
        },
    )
    capture = await run(path, "done")
    assert logged(capture, "prefix") == [["s:x", "1"]]
    assert ["other.id", "@", "2"] in logged(capture, "any")
    assert logged(capture, "queued") == [["true"]]
    assert ["nobody", "@", "3"] in logged(capture, "any") and ["ask", "@", "4"] in logged(capture, "any")


@pytest_twisted.ensureDeferred
async def test_stage_call_spreads_table_arguments(tmp_path: Path) -> None:
    """The original platform's ``stage.call(f, v...)``: table arguments are spread into their
    values (array part in order), other values pass as they are; ``{f, v...}`` and a script name
    ``"file+id"`` name the function; its results are returned and its errors raised."""
    path = lua_app(
        tmp_path,
        {
            "main": """
        local function show(...) return select("#", ...), table.concat({...}, ",") end
        log4cxx.info("spread", stage.call(show, {1, 2}, "x", {}, {3}))
        log4cxx.info("packed", stage.call({show, "a", "b"}, "c"))
        log4cxx.info("script", stage.call("lib+twice", 21))
        local ok, err = pcall(stage.call, function() error("boom") end)
        log4cxx.info("error", tostring(ok), tostring(err):find("boom") ~= nil)
        log4cxx.info("logger", require("logger") == log4cxx)
        log4cxx.info("done")
    """,
            "lib": "return {twice = function(n) return n * 2 end}",
        },
    )
    capture = await run(path, "done")
    assert logged(capture, "spread") == [["4", "1,2,x,3"]]
    assert logged(capture, "packed") == [["3", "a,b,c"]]
    assert logged(capture, "script") == [["42"]]
    assert logged(capture, "error") == [["false", "true"]]
    assert logged(capture, "logger") == [["true"]]


@pytest_twisted.ensureDeferred
async def test_stage_require_lets_its_callback_decide_for_a_missing_script(tmp_path: Path) -> None:
    """The original platform's ``stage.require``, as its preload/import.lua uses it: a script of
    ``%package`` is loaded as ``stage.load`` does; for a missing one the callback gets
    ``(nil, {"dir/file", id})`` and falls back to Lua's ``require``."""
    original = Path(__file__).resolve().parent.parent / "e2e" / "stage_original" / "preload" / "import.lua"
    path = lua_app(
        tmp_path,
        {
            "main": """
        log4cxx.info("script", import("lib+twice")(21))
        log4cxx.info("module", import("string+upper")("abc"))
        stage.require("no.such", function(r, i) log4cxx.info("missing", tostring(r), i[1], tostring(i[2])) end)
        log4cxx.info("raises", pcall(stage.require, "no.such"))
        log4cxx.info("done")
    """,
            "lib": "return {twice = function(n) return n * 2 end}",
        },
        **{"%preload": "preload"},
    )
    (tmp_path / "preload").mkdir()
    (tmp_path / "preload" / "import.lua").write_bytes(original.read_bytes())
    capture = await run(path, "done")
    assert logged(capture, "script") == [["42"]]
    assert logged(capture, "module") == [["ABC"]]
    assert logged(capture, "missing") == [["nil", "no/such", "nil"]]
    ((ok, why),) = logged(capture, "raises")
    assert ok == "false" and "not found along %package" in why


@pytest_twisted.ensureDeferred
async def test_late_replies_to_removed_auto_ids_are_counted_in_one_line(tmp_path: Path) -> None:
    """Replies that come after their ``stage.waitfor(f)`` id was removed (a timed-out request)
    each have a new id: one warning counts them instead of one line (and one kept id) each."""
    script = """
        for i = 1, 500 do
            local id = stage.waitfor(function() end)
            stage.waitfor(id, nil)  -- timed out
            stage.signal("a:" .. id, i)
        end
        stage.signal("a:named")
        stage.addtask(50, function() log4cxx.info("done") end)
    """
    capture = await run(lua_app(tmp_path, {"main": script}), "done")
    warnings = [e for e in capture.events if e.get("log_namespace") == "stage.a" and e["log_level"].name == "warn"]
    late = [e for e in warnings if "came after their waitfor was removed" in e["log_format"]]
    # the first at once, the others counted for the next line (10 s later: a busy machine may
    # get there before "done"), never a line per reply
    assert 1 <= len(late) <= 2 and late[0]["count"] == 1
    assert [e["msgid"] for e in warnings if e not in late] == ["named"]  # the named id's own warning


@pytest_twisted.ensureDeferred
async def test_a_delay_that_is_not_finite_is_a_lua_error_and_the_stage_goes_on(tmp_path: Path) -> None:
    script = """
        local function try(ms) log4cxx.info("call", select(2, pcall(function() stage.addtask(ms, print) end))) end
        try(0/0)
        try(-1/0)
        stage.addtask(1, function() return 0/0 end)
        stage.submit(0, function() stage.addtask(0/0, function() end) end)
        stage.submit(0, function() stage.addtask(1, function() return 1/0 end) end)
        stage.submit(0, function() return 0/0 end)
        stage.addtask(5, function(n) if n < 3 then return 5 end end, 0)
        local n = 0
        stage.addtask(5, function() n = n + 1; if n < 3 then return 5 end; log4cxx.info("serving", n) end)
        return function() return -1/0 end
    """
    lines = script.splitlines()

    def line(text: str) -> int:
        return next(n for n, source in enumerate(lines, 1) if text in source)

    with LogCapture() as capture:
        server = InProcessServer(lua_app(tmp_path, {"main": script}))
        await server.start()
        try:

            def errors() -> list[str]:
                found = [e for e in capture.events if "Lua error" in e.get("log_format", "")]
                return [f"{e['where']}: {e['error'].splitlines()[0]}" for e in found]

            await wait_for(lambda: len(errors()) == 5 and logged(capture, "serving"), 20, "five Lua errors")
        finally:
            await server.stop()
    where = f"lua/main.lua:{line('local function try')}"
    assert logged(capture, "call") == [
        [f"{where}: stage.addtask: the delay must be a finite number of ms, not nan"],
        [f"{where}: stage.addtask: the delay must be a finite number of ms, not -inf"],
    ]

    def ends(what: str, value: str) -> str:
        return f"the {what} returned {value} as its next delay, not a finite number of ms: it ends"

    assert sorted(errors()) == sorted(
        [
            f"task: lua/main.lua:{line('return 0/0 end)')}: {ends('task', 'nan')}",
            f"job of key 0: lua/main.lua:{line('stage.addtask(0/0')}: "
            "stage.addtask: the delay must be a finite number of ms, not nan",
            f"task: lua/main.lua:{line('return 1/0')}: {ends('task', 'inf')}",
            f"job of key 0: lua/main.lua:{line('submit(0, function() return 0/0')}: {ends('job', 'nan')}",
            f"idle function: lua/main.lua:{line('return -1/0')}: {ends('idle function', '-inf')}",
        ]
    )
    assert logged(capture, "serving") == [["3"]]
    assert not [e for e in capture.events if e["log_level"].name == "critical"]


@pytest.mark.parametrize("kind", ["lua", "luajit"])
@pytest_twisted.ensureDeferred
async def test_scripts_load_text_and_refuse_binary_chunks(tmp_path: Path, kind: str) -> None:
    """Lua runs bytecode unverified (a damaged chunk kills the process): load, loadfile, dofile and
    require take text only, in the stage and in a job's sandbox; the job's function itself still
    moves there as bytecode."""
    script = """
        local function tries(where, path)
            local chunk = string.dump(function() return 7 end)
            local file = io.open(path, "wb"); file:write(chunk); file:close()
            package.path = (path:gsub("bytecode%.out$", "?.out"))
            local refused = 0
            local function no(f, ...)
                if not pcall(function(...) assert(f(...)) end, ...) then refused = refused + 1 end
            end
            no(load, chunk); no(load, chunk, "=c", "b"); no(loadfile, path); no(loadfile, path, "b")
            no(dofile, path); no(require, "bytecode")
            log4cxx.info(where, refused, load("return x", "=c", "bt", {x = 5})(), dofile(path .. ".lua"))
        end
        tries("stage", PATH)
        stage.submit(0, tries, "job", PATH)
    """
    out = tmp_path / "bytecode.out"
    (tmp_path / "bytecode.out.lua").write_text("return 'text'")
    config = {"#startup": [[f"={kind}+a"]], f"={kind}+a": {"%package": ["[0]lua"], f"={kind}+a": "main"}}
    path = write_app(tmp_path, config, {"main": script.replace("PATH", f"[[{out}]]")})
    capture = await run(path, "job")
    assert logged(capture, "stage") == [["6", "5", "text"]]
    assert logged(capture, "job") == [["6", "5", "text"]]


@pytest_twisted.ensureDeferred
async def test_a_luajit_stage_cannot_require_the_ffi(tmp_path: Path) -> None:
    """LuaJIT's FFI reached any address and any C function of the process: Python's
    PyRun_SimpleString ran Python from a stage script, one bad cast killed the process."""
    script = """
        local ok, err = pcall(require, "ffi")
        log4cxx.info("ffi", tostring(ok), err)
        stage.submit(0, function() log4cxx.info("job ffi", tostring((pcall(require, "ffi")))) end)
    """
    config = {"#startup": [["=luajit+a"]], "=luajit+a": {"%package": ["[0]lua"], "=luajit+a": "main"}}
    capture = await run(write_app(tmp_path, config, {"main": script}), "job ffi")
    assert logged(capture, "ffi") == [
        ["false", "ffi: not available to stage scripts (it reaches the process's memory and Python)"]
    ]
    assert logged(capture, "job ffi") == [["false"]]


@pytest.mark.parametrize("kind", ["lua", "luajit"])
@pytest_twisted.ensureDeferred
async def test_python_is_out_of_reach_by_global_and_by_require(tmp_path: Path, kind: str) -> None:
    """lupa registers its ``python`` module in ``package.loaded``: ``require("python")`` gave it
    back although the global is gone."""
    script = """
        local function look(where)
            local ok, found = pcall(require, "python")
            log4cxx.info(where, type(python), type(package.loaded.python), tostring(ok), type(found))
        end
        look("stage")
        stage.submit(0, look, "job")
    """
    config = {"#startup": [[f"={kind}+a"]], f"={kind}+a": {"%package": ["[0]lua"], f"={kind}+a": "main"}}
    capture = await run(write_app(tmp_path, config, {"main": script}), "job")
    assert logged(capture, "stage") == [["nil", "nil", "false", "string"]]
    assert logged(capture, "job") == [["nil", "nil", "false", "string"]]
