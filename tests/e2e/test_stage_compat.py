"""Scripts written for STAGE, in a real server (``twistd -n stage``, one child per group):
the index and curl stages answer ``stage:ID`` at the sender's ``waitfor("ID")``, a function value
never crosses between ``=lua`` and ``=luajit`` silently, and ``"#router": [1500]`` starts.

Group 1 holds the index, a Lua 5.4 stage ``a`` and a LuaJIT stage ``j1``; group 2 the curl stage
and a LuaJIT stage ``j2``. The curl stage fetches from a plain HTTP server the test runs on
127.0.0.1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import ServerProcess, write_app


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b"hello " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


CONFIG = {
    "#router": [1500],
    "#startup": [["=index+rank", "=lua+a", "=luajit+j1"], ["=curl+agent", "=luajit+j2"]],
    "=index+rank": "scores",
    "=lua": {"%package": ["[0]lua"], "=lua+a": "a"},
    "=luajit": {"%package": ["[0]lua"], "=luajit+j1": "j1", "=luajit+j2": "j2"},
}

A = """
local function log(...) log4cxx.info(...) end
local function count(t) local n = 0; for _ in pairs(t) do n = n + 1 end; return n end
stage.waitfor("callback", function(r) log("callback", count(r), r["set:board"].m1, r["total:board"]) end)
stage.waitfor("got", function(r) log("got", r["total:board"]) end)
stage.waitfor("tagged", function(r) log("tagged", r["total:board"]) end)
stage.waitfor("eq", function(r) log("eq", r["total:board"]) end)
stage.waitfor("web", function(r) log("web", r.status, r.data.content, r.extra) end)
stage.waitfor("web_reply", function(r) log("web_reply", r.status, r.data.content) end)
stage.signal("rank:callback", {["set:board"] = {m1 = {i = 10}}, ["total:board"] = 0})
stage.signal("rank:q=got", {["total:board"] = 0})
stage.signal("rank+tagged", {["total:board"] = 0})
stage.signal("rank:=eq", {["total:board"] = 0})
stage.signal("agent:web", {url = process["$url"] .. "/doc", extra = "x"})
stage.signal("agent:q=web_reply", {url = process["$url"] .. "/reply"})
stage.waitfor("web_eq", function(r) log("web_eq", r.status, r.data.content) end)
stage.signal("agent:=web_eq", {url = process["$url"] .. "/eq"})
local function try(target)
    local ok, err = pcall(function() local sent = stage.signal(target, function() return 1 end); return sent end)
    log("fn", target, tostring(ok), tostring(err))
end
stage.waitfor("go", function()
    try("j1:take")
    try("j2:take")
    log("plain", tostring(stage.signal("j2:take", "no function")))
    stage.signal("j1:ask=back")
end)
stage.waitfor("back", function(v) log("back", v) end)
stage.addtask(200, function() stage.signal(":go") end)
"""

J1 = """
stage.waitfor("ask", function()
    local ok, err = pcall(stage.signal, nil, function() end)
    log4cxx.info("fn_reply", tostring(ok), tostring(err))
    return "answered"
end)
stage.addtask(100, function()
    local ok, err = pcall(stage.signal, "a:take", function() end)
    log4cxx.info("fn_to_a", tostring(ok), tostring(err))
end)
"""

J2 = """
stage.waitfor("take", function(v) log4cxx.info("took", type(v)) end)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, http_url: str) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("compat")
    path = write_app(root, {**CONFIG, "url": http_url}, {"a": A, "j1": J1, "j2": J2})
    with ServerProcess(path) as server:
        server.wait_for(
            lambda: server.logged("a", "web") and server.logged("a", "web_reply") and server.logged("a", "web_eq"),
            30,
            "curl answers",
        )
        server.wait_for(lambda: len(server.logged("a", "fn")) == 2, 30, "function sends")
        server.wait_for(lambda: server.logged("a", "back") and server.logged("j2", "took"), 30, "j1 and j2")
        server.wait_for(lambda: server.logged("j1", "fn_to_a"), 30, "j1's send")
        yield server


def test_index_answers_the_handler_named_by_the_message_id(server: ServerProcess) -> None:
    """The document's ``stage.signal("rank:callback", {...})`` + ``waitfor("callback")``."""
    assert server.logged("a", "callback") == [["2", "1", "1"]]


def test_index_reply_forms_still_work(server: ServerProcess) -> None:
    assert server.logged("a", "got") == [["1"]]  # "rank:q=got"
    assert server.logged("a", "eq") == [["1"]]  # "rank:=eq"
    assert server.logged("a", "tagged") == [["1"]]  # "rank+tagged": the sender's tag is dropped


def test_curl_answers_the_handler_named_by_the_message_id(server: ServerProcess) -> None:
    assert server.logged("a", "web") == [["200", "hello /doc", "x"]]
    assert server.logged("a", "web_reply") == [["200", "hello /reply"]]
    assert server.logged("a", "web_eq") == [["200", "hello /eq"]]


def test_a_function_to_the_other_vm_kind_is_a_lua_error_at_the_sender(server: ServerProcess) -> None:
    """Same process (``j1``) and another process (``j2``); plain values still go."""
    by_target = {target: (ok, err) for target, ok, err in server.logged("a", "fn")}
    for target, name in (("j1:take", "=luajit+j1"), ("j2:take", "=luajit+j2")):
        ok, err = by_target[target]
        assert ok == "false"
        assert f"cannot send a lua54 function to {name}" in err and "a.lua:" in err
    assert server.logged("a", "plain") == [["true"]]
    assert server.logged("j2", "took") == [["string"]]
    assert not [line for line in server.lines if "cannot load a" in line]


def test_a_luajit_function_to_lua54_is_a_lua_error_too_also_as_a_reply(server: ServerProcess) -> None:
    """``j1`` (LuaJIT) sends to ``a`` (Lua 5.4), and replies to it with ``signal(nil, f)``; its
    plain reply still arrives."""
    ((ok, err),) = server.logged("j1", "fn_to_a")
    assert ok == "false" and "cannot send a luajit21 function to =lua+a" in err
    ((ok, err),) = server.logged("j1", "fn_reply")
    assert ok == "false" and "cannot send a luajit21 function to =lua+a" in err
    assert server.logged("a", "back") == [["answered"]]


def test_router_with_one_value_starts(server: ServerProcess) -> None:
    assert server.process.poll() is None
