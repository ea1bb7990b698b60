"""Every Lua example of the STAGE API document, as written, in a real server (``twistd -n stage``).

One stage per section of the document (``stage.*``, ``log4cxx``, ``process``, ``thread``, and
the index, curl, route and ticket parts of ``stage.signal``), over two processes. The examples'
code is the document's; what had to be filled in is marked ``-- filled:`` (the document's
``...`` placeholders, an outside URL replaced by a server of this test on 127.0.0.1, JSON-style
table syntax written as Lua, an observing ``print`` where the example shows nothing). Each test
asserts what the document's text says the example does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import ServerProcess, free_port, write_app


class _Web(BaseHTTPRequestHandler):
    """``GET /doc`` answers text and sets a cookie; ``POST /echo`` answers its header and body."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(b"HELLO STAGE", [("Set-Cookie", "session=s1; Path=/")])

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer(self.headers.get("X-Game", "").encode() + b"|" + body, [])

    def _answer(self, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


CONFIG = {
    "#startup": [
        ["=index+rank", "=ticket+ticket", "=route+route", "=lua+process", "=lua+rt2"],
        ["=curl+agent", "=lua+stage", "=lua+submit", "=lua+logs", "=lua+thr"],
        ["=lua+idx", "=lua+web", "=lua+rt", "=lua+tk", "=lua+proc"],  # proc last: it replaces "$" values
    ],
    "=index+rank": "scores",
    "=ticket+ticket": [100, {"odbc": 10, "category": 1}],
    "=lua": {
        "%package": ["package", "rollback", "[0]lib", "[0]"],
        **{f"=lua+{name}": name for name in ("stage", "process", "submit", "logs", "proc", "thr")},
        **{f"=lua+{name}": name for name in ("idx", "web", "rt", "rt2", "tk")},
    },
    "greeting": "hello",
}

# -- stage.* ---------------------------------------------------------------------------------------
STAGE = """
local snippets = {}

snippets[#snippets + 1] = function()  -- stage.once
   local readies = 0                                             -- filled: an observer
   stage.once("#1", function ()
      -- 처음 실행인 경우에만 호출
      readies = readies + 1                                      -- filled
      broker.ready("tcp://127.0.0.1:" .. process["$port"], function (socket, addr)  -- filled: "tcp://..."
         return false                                            -- filled: ...
      end)

   end)
   stage.once("#1", function () readies = readies + 1 end)      -- filled: a second try
   print("ONCE", readies)
   stage.once("#1", nil) -- 실행 여부 제거
   stage.once("#1", function () readies = readies + 1 end)      -- filled: runs again
   print("ONCE-AGAIN", readies)
end

snippets[#snippets + 1] = function()  -- stage.load
   stage.load("source+id")("SOURCE");

   stage.load("source+id", function (v, i)
      if i[1] > 0 then
         print("FAIL-OVER")
      end
      v("SOURCE")
   end)
   stage.load("fallback+id", function (v, i)                   -- filled: a script only in "rollback"
      if i[1] > 0 then
         print("FAIL-OVER")
      end
      v("SOURCE")
   end)
end

snippets[#snippets + 1] = function()  -- stage.addtask
   local task = stage.addtask(0, function (v)
       print("CANCELLED TASK RAN", v)                            -- filled: ...
   end, "x")                                                     -- filled: ...

   stage.addtask(task, nil)

   stage.addtask(0, function (v)
      print("RANDOM", v[math.random(0, 2)])
      return 1000; --- 1초 간격으로 재 실행
   end, { 10, 20, 30 })
end

snippets[#snippets + 1] = function()  -- stage.signal: several values
   stage.waitfor("local_callback", function (a, b, c)
     -- "CALL", "HELLO", "STAGE", "PLATFORM"
     print("CALL", a, b, c)
   end)

   stage.signal("local_callback", "HELLO", "STAGE", "PLATFORM");
end

snippets[#snippets + 1] = function()  -- stage.signal: nil answers the message being handled
   stage.waitfor("local_callback", function (v)
      print("STEP #2 ", v.msg)
      stage.signal(nil, v.msg);
   end)
   stage.waitfor("echoed", function (m) print("ECHOED", m) end)  -- filled: a sender asking a reply
   stage.signal("local_callback=echoed", {msg = "HELLO"})         -- filled
   print("OUTSIDE", pcall(stage.signal, nil, "x"))                -- filled: nil outside a handler
end

snippets[#snippets + 1] = function()  -- stage.signal: {callback id, address}
   local addr = broker.aton("udp://224.0.0.1:8082", {})[1];
   print("TO-SERVER", stage.signal({"callback_id", addr}, "HELLO"))  -- filled: print the result
   stage.waitfor("callback_id", function (v) print("ID-ALONE", v) end)  -- filled: the items after
   stage.signal({"callback_id"}, "HELLO")                               -- the id left out
end

snippets[#snippets + 1] = function()  -- stage.signal: ":id" runs now
   stage.waitfor("local_callback", function (v)
      print("STEP #2 ", v.msg)
   end)

   print("STEP #1")
   stage.signal(":local_callback", {
     ["msg"] = "HELLO"
   })
   print("STEP #3")
end

snippets[#snippets + 1] = function()  -- stage.signal: ordered execution
   stage.waitfor("lock_callback", function (v)
      print("CALLBACK: ", v.msg)
      stage.signal(">>LOCK.lock_callback", 1000)                 -- filled: the extension form
      stage.signal("<LOCK.*", nil)
   end)

   stage.signal(">LOCK.lock_callback", {
     ["msg"] = "HELLO"
   })
end

snippets[#snippets + 1] = function()  -- stage.signal: TIP, a function sent to run remotely
   stage.waitfor("callback", function (v)
     v.f(v.arg);
   end)

   stage.signal("callback", {
     ["f"] = function (v)
       print("CALLBACK", v)
     end,
     ["arg"] = "HELLO"
   })
   stage.signal("process:callback", {                            -- filled: the same to another process
     ["f"] = function (v)
       print("CALLBACK", v)
     end,
     ["arg"] = "HELLO"
   })
end

snippets[#snippets + 1] = function()  -- stage.signal "+" (the "stage" half of the example)
   stage.waitfor("stage:callback", function (v)
      print("STAGE ", v.msg)
   end)

   stage.waitfor("process:callback", function (v)
      print("PROCESS ", v.msg)
   end)

   -- stage에세 전송 합니다.
   stage.signal("process+callback", {
     ["msg"] = "HELLO"
   })
end

snippets[#snippets + 1] = function()  -- stage.waitfor with bound values, and unregistering
   stage.waitfor("message", function (_self, v)
      print("MESSAGE", v)
   end, {1})                                                      -- filled: {...}
   stage.signal("message", "HELLO")

   local task = stage.waitfor(function (v)
       print("NEVER", v)                                         -- filled: ...
   end, "bound")                                                 -- filled: ...

   stage.waitfor(task, nil)
   print("UNREGISTERED", stage.waitfor(task), stage.signal(task, 1))  -- filled: observe it
end

snippets[#snippets + 1] = function()  -- stage.proxy
    local T = stage.proxy({}, {
        ["count"] = {
            10, 20, 30, function (o, m, k, v)
                print("COUNT", o, o[k], m, k, v);
                for i, t in ipairs(m) do
                    print("", i, t);
                end
                print("END");
            end
        },
        ["hello"] = function (o, m, k, v)
            print("HELLO", o, o[k], m, k, v)
        end
    })(function (v)
        print("==> INDEX", v.count);
        v.count = 9;
        v.hello = "hello";
    end);
    print("T", T.count, T.hello)                                 -- filled: what T is
end

snippets[#snippets + 1] = function()  -- stage.v
   stage.v("name", "STAGE")                                      -- filled: a value to start from
   print("V", pcall(stage.v, "name", function (v)
      return v + "_HELLO";
   end));
   print("V-KEPT", stage.v("name"))
   print("V-CONCAT", stage.v("name", function (v) return v .. "_HELLO" end))  -- filled: with ..
   stage.v("name", nil)
   print("V-DELETED", stage.v("name"))
end

local step = 0
stage.addtask(100, function ()
   step = step + 1
   snippets[step]()
   if step < #snippets then return 100 end
   print("DONE")
end)
"""

SOURCE = """
print("HELLO STAGE")
return {
    ["id"] = function (v)
       print("LOADING", v)
    end
}
"""

PROCESS = """
stage.waitfor("stage:callback", function (v)
   print("STAGE ", v.msg)
end)

stage.waitfor("process:callback", function (v)
   print("PROCESS ", v.msg)
end)

-- stage에세 전송 합니다.
stage.signal("process+callback", {
  ["msg"] = "HELLO"
})

stage.waitfor("callback", function (v)                          -- the TIP's receiver
  v.f(v.arg);
end)
"""

SUBMIT = """
stage.submit(0, function (v)
   print("RANDOM", v[math.random(0, 2)])
   return 1000; --- 1초 간격으로 재 실행
end, { 10, 20, 30 })
"""

# -- log4cxx, process, thread ---------------------------------------------------------------------
LOGS = """
local msg = "HELLO"                                              -- filled
-- 해당 로그를 bot의 그룹에 warn 레벨로 출력하라고 설정
log4cxx.out("%{PWD} %l - " .. msg, "%{=bot:warn}");
for _, level in ipairs({"out", "info", "warn", "error", "trace"}) do  -- filled: each level
   log4cxx[level]("LEVEL", level)
end
log4cxx.info("%{=bot:error}SWITCHED")
"""

PROC = """
print("LANG", process["%LANG"])
print("READ", process.id, type(process.tick), process.args[1] ~= nil, process.stage, process["$greeting"])
process.title = "stagetx-doc-proc"
process["%STAGE_DOC"] = "env"
process["$greeting"] = {text = "written"}
print("WRITTEN", os.getenv("STAGE_DOC"), process["$greeting"].text)
process["$"] = '{"greeting": "replaced"}'
print("REPLACED", process["$greeting"])
"""

THR = """
print("ID", type(thread.id), type(thread.tick))
local to = thread.new(function (arg)
    print("THREAD", thread.id, arg)
    thread.signal("HELLO")
    return "HELLO-RETURN"
end, "HELLO")

to.waitfor(function (v)
    print("THREAD-MESSAGE", v)
end)

local to2 = thread.new(function (arg)                           -- the waitfor(nil) example
    thread.signal("UNSEEN")                                      -- filled: ...
end, "HELLO")

to2.waitfor(nil)
"""

# -- index, curl ----------------------------------------------------------------------------------
IDX = """
local function show(label, r)                                   -- filled: print what came back
   for k, v in pairs(r["get:index"] or {}) do print(label, "get", k, v.v, v.I[1].i, v.I[1].d) end
   for _, row in ipairs(r["range:index"] or {}) do print(label, "range", row.k, row.v, row.i, row.d) end
   for _, row in ipairs(r["forEach:index"] or {}) do print(label, "forEach", row.k, row.v, row.i, row.d) end
end
local round = 0
stage.waitfor("callback", function (r)
   round = round + 1
   show("ROUND" .. round, r)
   if round == 1 then
      stage.signal("rank:callback", {
          --[[ ["set:index"] = {
              ["KR0001"] = {
                  ["i"] = 10,
                  ["v"] = "TEST1"
              },
              ["KR0002"] = {
                  ["i"] = 100,
                  ["v"] = "TEST2"
              },
              ["KR0003"] = {
                  ["i"] = 200,
                  ["v"] = "TEST3"
              },
          }, ]]--
          ["get:index"] = { "KR0001", "KR0002" },
          -- ["range:index"] = { 100, 100 },
          ["range:index"] = { "KR0001", 1, 100 },
          ["forEach:index"] = { 1, 100 },
      });
   elseif round == 2 then
      stage.signal("rank:callback", {["del:index"] = {"KR0002"}, ["forEach:index"] = {1, 100}})  -- filled: del
   end
end)

-- filled: the first message with the document's own commented-out "set:index" block in use
stage.signal("rank:callback", {
    ["set:index"] = {
        ["KR0001"] = {
            ["i"] = 10,
            ["v"] = "TEST1"
        },
        ["KR0002"] = {
            ["i"] = 100,
            ["v"] = "TEST2"
        },
        ["KR0003"] = {
            ["i"] = 200,
            ["v"] = "TEST3"
        },
    },
    ["get:index"] = { "KR0001", "KR0002" },
    ["range:index"] = { 100, 100 },
    -- ["range:index"] = { "KR0001", 1, 100 },
    ["forEach:index"] = { 1, 100 },
});
"""

WEB = """
stage.waitfor("callback", function (r)                          -- filled: print the reply
   local d = r.data
   print("REPLY", r.url, r.effective_url, r.status, r.redirect_url, r.cookie.session, tostring(r.extra))
   print("COOKIES", #r.cookie, r.cookie[1])                      -- filled: the array of cookies
   print("DATA", d.type, d.length, d.content, d.charset, d.result, type(d.message), type(d.time),
         type(d.download_speed))
end)

stage.signal("agent:callback", {
    ["url"] = process["$url"] .. "/doc"                          -- filled: "http://www.naver.com"
});

stage.signal("agent:callback", {                                -- filled: the request table's fields
    url = process["$url"] .. "/echo",
    header = {["X-Game"] = "stage"},
    data = "a=1",
    timeout = 5000,
    extra = "mine",
})
"""

# -- route ----------------------------------------------------------------------------------------
RT = """
stage.waitfor("fetch", function (id, v)
   print("FETCH", id, v)                                         -- filled: ...
   stage.signal(nil, "FEEDBACK")
end)

stage.waitfor("r__fail", function (id, v)
   print("ROUTE FAIL", id, v)
end)

stage.waitfor("message", function (_self, v)
   print("MESSAGE", v)
end, {1})                                                        -- filled: {...}
stage.signal("message", "HELLO")

stage.waitfor("route:@", function (id, v)
  -- 만약, "route:" 에서 보내는 데이터를 처리되길 원하지 않는 경우에는 stage.signal()로 반환하지 않으면 됩니다.
  stage.signal(nil, v)
end)

stage.signal("route:@", {
   ["login"] = "fetch"
})
stage.signal("route:login!r__fail", "HELLO")

-- filled: the publisher's side of the route section's forms, driven by rt2's steps
stage.waitfor("returned", function (v) print("RETURNED", v) end)
stage.waitfor("fail", function (id, v)
   print("FAIL", id, v)
   if v == "paused" then stage.signal("route:*subscribe_id_2!fail", "everyone")
   elseif v == "removed" then stage.signal("rt2:last")
   elseif v == 5 then stage.signal("rt2:again") end
end)
stage.waitfor("go", function (step)
   if step == 1 then stage.signal("route:subscribe_id_0?argument=returned!fail", "value")
   elseif step == 2 then stage.signal("route:subscribe_id_1?x!fail", "paused")
   elseif step == 4 then stage.signal("route:subscribe_id_2!fail", "removed")
   elseif step == 5 then stage.signal("route:*probe!fail", 5)
   elseif step == 6 then stage.signal("route:subscribe_id_0!fail", "sleeping") end
end)
"""

RT2 = """
-- route에서 메시지 처리여부를 확인하기 위해 호출됨.
stage.waitfor("route:@", function (id, k)
   -- id에 대해 처리를 원하는 경우
   -- id에 설정된 argument를 통해, 처리 여부를 판단할 수 있음.
   print("OFFER", id)                                            -- filled
   stage.signal(nil, k)
end)

stage.waitfor("callbac_id", function (id, arg)
   print("GOT", id, arg)                                         -- filled: ...
   if arg == "value" then
      stage.signal("route:@", {
        ["subscribe_id_1"] = false
      })
      stage.signal("route:*probe", 2)                            -- filled: the next step
      return "RESULT"
   elseif arg == "everyone" then
      stage.signal("route:@", {
        ["subscribe_id_2"] = nil                                 -- the document's removal
      })
      stage.signal("route:@", {
        ["subscribe_id_2"] = stage.null                          -- filled: what removes in Lua
      })
      stage.signal("route:*probe", 4)
   end
end)

stage.waitfor("probe", function (id, n)                         -- filled: registrations are in
   print("PROBE", n)
   stage.signal("rt:go", n)
end)

stage.waitfor("last", function ()                               -- filled: remove everything
   stage.signal("route:@", nil)
   stage.signal("rt:go", 5)
end)

stage.waitfor("again", function ()                              -- filled: register, pause all
   stage.signal("route:@", {
     ["subscribe_id_0"] = "callbac_id"
   })
   stage.signal("route:@", 60000)
   stage.signal("rt:go", 6)
end)

stage.signal("route:@", {
  ["subscribe_id_0"] = "callbac_id",                             -- the document: "subscribe_id_0": "callbac_id"
  ["subscribe_id_1"] = "callbac_id",
  ["subscribe_id_2"] = "callbac_id",
  ["probe"] = "probe",
})
stage.signal("route:@", {
  ["subscribe_id_0"] = true                                      -- true | false | msec
})
stage.signal("route:@", true)                                    -- keep-alive
stage.signal("route:*probe", 1)
"""

# -- ticket ---------------------------------------------------------------------------------------
TK = """
stage.waitfor("feedback_id", function (request_id, result)
   -- request_id: 요청한 메시지 (예: "ticket:category=callback_id?feedback_id")
   --
   -- result: true    처리 완료
   --         false   처리 실패
   --         @0x...  ticket_id
   print("FEEDBACK", request_id, result)                         -- filled
end)
stage.waitfor("callback_id", function (v)                       -- filled: the callback
   print("CALLBACK", v.n, _TICKET)
end)
stage.signal("ticket:category=callback_id", { n = 1 })          -- filled: { ... }
stage.signal("ticket:category=callback_id?feedback_id", { n = 2 })

stage.waitfor("ticket:@", function (result_id, result)
   -- result_id
   --   cancel: 취소되는 티켓
   --   result: { ticket_id: callback_id }
   for k, v in pairs(result) do print("CONTROL", result_id, k, v) end  -- filled
end)

local socket, msg = {id = 7}, {userid = "alice"}                -- filled
stage.waitfor("login_query", function (socket_id, value)
    -- _TICKET 변수에 사용된 티켓ID가 설정됩니다.
    stage.signal(nil, 3000) -- 3초 동안 사용을 예약
    -- odbc.new(...)                                             -- the odbc library is not in stagetx
    print("LOGIN", socket_id, value, _TICKET)                    -- filled
    stage.signal("ticket:=odbc", "NEWS")                         -- 추가. 2, sent while holding
end)

stage.signal("ticket:odbc=login_query", socket.id, msg.userid)

stage.waitfor("ticket:odbc", function (value)
   print("BROADCAST", value)                                     -- filled: ...
end)

-- 추가. 3: a category that stops granting after close_time
stage.waitfor("temp_cb", function (n) print("TEMP", n) end)     -- filled
stage.waitfor("temp_fb", function (request_id, result) print("TEMP-FEEDBACK", tostring(result)) end)
stage.signal("ticket:@category_name", 1, 300);
stage.signal("ticket:category_name=temp_cb?temp_fb", 1)         -- filled: one granted,
stage.signal("ticket:category_name=temp_cb?temp_fb", 2)         -- one still waiting at close
"""


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, web: str) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("document")
    scripts = {
        "package.stage": STAGE,
        "package.source": SOURCE,
        "rollback.fallback": SOURCE.replace("HELLO STAGE", "HELLO ROLLBACK"),
        "package.process": PROCESS,
        "package.submit": SUBMIT,
        "package.logs": LOGS,
        "package.proc": PROC,
        "package.thr": THR,
        "package.idx": IDX,
        "package.web": WEB,
        "package.rt": RT,
        "package.rt2": RT2,
        "package.tk": TK,
    }
    path = write_app(root, {**CONFIG, "port": free_port(), "url": web}, scripts)
    for name in list(scripts):  # write_app puts scripts under lua/; %package names the folders
        folder, _, base = name.partition(".")
        (root / folder).mkdir(exist_ok=True)
        (root / "lua" / folder / f"{base}.lua").rename(root / folder / f"{base}.lua")
    lang = os.environ.get("LANG")
    os.environ["LANG"] = "ko_KR.UTF-8"  # process["%LANG"]; the server inherits this environment
    try:
        server = ServerProcess(path)
    finally:
        if lang is None:
            del os.environ["LANG"]
        else:
            os.environ["LANG"] = lang
    with server:
        server.wait_for(lambda: printed(server, "stage", "DONE"), 60, "the stage.* snippets")
        server.wait_for(lambda: len(printed(server, "stage", "RANDOM")) >= 2, 30, "a repeated task")
        server.wait_for(lambda: len(printed(server, "idx", "ROUND3")) >= 2, 30, "three index rounds")
        server.wait_for(lambda: len(printed(server, "web", "DATA")) == 2, 30, "two curl replies")
        server.wait_for(
            lambda: ["FAIL", "route:subscribe_id_0!fail", "sleeping"] in printed(server, "rt", "FAIL"), 30, "route"
        )
        server.wait_for(lambda: printed(server, "tk", "CONTROL"), 30, "the temporary category's close")
        server.wait_for(lambda: len(printed(server, "thr", "THREAD-MESSAGE")) == 2, 30, "the thread's messages")
        yield server


def printed(server: ServerProcess, stage: str, first: str) -> list[list[str]]:
    """The tab-separated fields of each line stage ``stage`` printed whose first field is ``first``."""
    return [[first, *fields] for fields in server.logged(stage, first)]


def test_stage_functions(server: ServerProcess) -> None:
    """stage.once, load, addtask, signal (every form with an example), waitfor, proxy, v."""
    # once: runs only the first time; once(s, nil) forgets s
    assert printed(server, "stage", "ONCE") == [["ONCE", "1"]]
    assert printed(server, "stage", "ONCE-AGAIN") == [["ONCE-AGAIN", "2"]]
    # load: "file+id" returns result[id]; cached (the script ran once); a script found at a later
    # %package position is a fail-over load (i[1] > 0)
    assert printed(server, "stage", "HELLO STAGE") == [["HELLO STAGE"]]
    assert printed(server, "stage", "LOADING") == [["LOADING", "SOURCE"]] * 3
    assert printed(server, "stage", "FAIL-OVER") == [["FAIL-OVER"]]
    # addtask: a cancelled task never runs; a returned 1000 runs it again; v[math.random(0, 2)] is
    # the document's own (index 0 of a Lua table is nil)
    assert printed(server, "stage", "CANCELLED TASK RAN") == []
    assert {line[1] for line in printed(server, "stage", "RANDOM")} <= {"10", "20", "nil"}
    # signal: several values; nil answers the message being handled (and is an error elsewhere)
    assert printed(server, "stage", "CALL") == [["CALL", "HELLO", "STAGE", "PLATFORM"]]
    assert printed(server, "stage", "ECHOED") == [["ECHOED", "HELLO"]]
    ((_, ok, why),) = printed(server, "stage", "OUTSIDE")
    assert ok == "false" and "wants no reply" in why
    # {callback id, address}: no server of the cluster is there (this server has no peers)
    assert printed(server, "stage", "TO-SERVER") == [["TO-SERVER", "false", "no cluster: this server has no peers"]]
    # {callback id} alone: "the values after it may be left out", a message to the id here
    assert printed(server, "stage", "ID-ALONE") == [["ID-ALONE", "HELLO"]]
    # ":id" runs the handler before signal returns
    steps = [
        fields[0]
        for fields in (text.split("\t") for text in server.stage_lines("stage"))
        if fields[0].startswith("STEP")
    ]
    assert steps == ["STEP #2 ", "STEP #1", "STEP #2 ", "STEP #3"]
    # ordered execution, extended and released by the holder
    assert printed(server, "stage", "CALLBACK: ") == [["CALLBACK: ", "HELLO"]]
    # a function sent as a value runs at the receiver, here and in another process
    assert printed(server, "stage", "CALLBACK") == [["CALLBACK", "HELLO"]]
    assert printed(server, "process", "CALLBACK") == [["CALLBACK", "HELLO"]]
    # "+": the receiver tells the senders apart by "<sender>:id"
    assert sorted(printed(server, "process", "STAGE ") + printed(server, "process", "PROCESS ")) == [
        ["PROCESS ", "HELLO"],
        ["STAGE ", "HELLO"],
    ]
    # waitfor: bound values come first; an unregistered id is gone
    assert printed(server, "stage", "MESSAGE") == [["MESSAGE", "HELLO"]]
    ((_, *gone),) = printed(server, "stage", "UNREGISTERED")
    assert gone[0] == "nil" and gone[1] == "false"
    assert printed(server, "stage", "NEVER") == []
    # proxy: 9 crosses none of 10, 20, 30; "hello" runs its watcher (old value nil); T is t1
    assert printed(server, "stage", "==> INDEX") == [["==> INDEX", "nil"]]
    assert printed(server, "stage", "COUNT") == []
    ((_, proxy, stored, old, key, new),) = printed(server, "stage", "HELLO")
    assert proxy.startswith("table:") and (stored, old, key, new) == ("nil", "nil", "hello", "hello")
    assert printed(server, "stage", "T") == [["T", "9", "hello"]]
    # v: the document's `v + "_HELLO"` is arithmetic on a string: a Lua error, the value kept
    ((_, ok, why),) = printed(server, "stage", "V")
    assert ok == "false" and "attempt to add" in why
    assert printed(server, "stage", "V-KEPT") == [["V-KEPT", "STAGE"]]
    assert printed(server, "stage", "V-CONCAT") == [["V-CONCAT", "STAGE_HELLO"]]
    assert printed(server, "stage", "V-DELETED") == [["V-DELETED", "nil"]]
    # submit: runs on the worker pool and again 1000 ms later
    server.wait_for(lambda: len(printed(server, "submit", "RANDOM")) >= 2, 30, "a repeated submit")
    assert {line[1] for line in printed(server, "submit", "RANDOM")} <= {"10", "20", "nil"}
    assert not [line for line in server.lines if "Lua error" in line and "[stage.stage#" in line]


def test_log4cxx(server: ServerProcess) -> None:
    """``%{=bot:warn}`` sends the line to group ``bot`` at warn; ``%{PWD}`` and ``%l`` expand;
    ``out`` is ``info``; trace is below the default level."""
    (line,) = [line for line in server.lines if "[bot#warn]" in line]
    assert f"] {os.environ.get('PWD', '')} package/logs.lua [" in line and line.endswith(" - HELLO\t")
    levels = {fields[1] for fields in (text.split("\t") for text in server.stage_lines("logs")) if fields[0] == "LEVEL"}
    for level, shown in (("out", "info"), ("info", "info"), ("warn", "warn"), ("error", "error")):
        assert [x for x in server.lines if f"[stage.logs#{shown}] " in x and x.endswith(f"] LEVEL\t{level}")]
    assert "trace" not in levels
    assert [x for x in server.lines if "[bot#error]" in x and "SWITCHED" in x]


def test_process(server: ServerProcess) -> None:
    assert printed(server, "proc", "LANG") == [["LANG", "ko_KR.UTF-8"]]
    ((_, pid, tick, has_args, stage, greeting),) = printed(server, "proc", "READ")
    assert int(pid) in server.pids(2) and tick == "number" and has_args == "true"
    assert stage == "3" and greeting == "hello"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0] == b"stagetx-doc-proc"
    assert printed(server, "proc", "WRITTEN") == [["WRITTEN", "env", "written"]]
    assert printed(server, "proc", "REPLACED") == [["REPLACED", "replaced"]]


def test_thread(server: ServerProcess) -> None:
    """``thread.signal`` and the thread's return values reach ``to.waitfor``; waitfor(nil) drops them."""
    assert printed(server, "thr", "ID") == [["ID", "number", "number"]]
    ((_, thread_id, arg),) = printed(server, "thr", "THREAD")
    assert arg == "HELLO" and thread_id.isdigit()
    assert printed(server, "thr", "THREAD-MESSAGE") == [["THREAD-MESSAGE", "HELLO"], ["THREAD-MESSAGE", "HELLO-RETURN"]]
    assert not [line for line in server.lines if "UNSEEN" in line]


def test_index(server: ServerProcess) -> None:
    """``stage.signal("rank:callback", {...})`` answers at ``waitfor("callback")``: get, range by
    score and around an ID, forEach; larger scores rank higher."""
    first = printed(server, "idx", "ROUND1")
    assert sorted(line[1:] for line in first if line[1] == "get") == [
        ["get", "KR0001", "TEST1", "10", "3"],
        ["get", "KR0002", "TEST2", "100", "2"],
    ]
    assert [line[1:] for line in first if line[1] == "range"] == [
        ["range", "KR0002", "TEST2", "100", "2"],
        ["range", "KR0001", "TEST1", "10", "3"],
    ]
    every = [
        ["forEach", "KR0003", "TEST3", "200", "1"],
        ["forEach", "KR0002", "TEST2", "100", "2"],
        ["forEach", "KR0001", "TEST1", "10", "3"],
    ]
    assert [line[1:] for line in first if line[1] == "forEach"] == every
    second = printed(server, "idx", "ROUND2")
    assert [line[1:] for line in second if line[1] == "range"] == [
        ["range", "KR0002", "TEST2", "100", "2"],
        ["range", "KR0001", "TEST1", "10", "3"],
    ]
    assert [line[1:] for line in second if line[1] == "forEach"] == every
    third = printed(server, "idx", "ROUND3")
    assert [line[1:] for line in third] == [
        ["forEach", "KR0003", "TEST3", "200", "1"],
        ["forEach", "KR0001", "TEST1", "10", "2"],
    ]


def test_curl(server: ServerProcess) -> None:
    replies = printed(server, "web", "REPLY")
    data = printed(server, "web", "DATA")
    (doc,) = [r for r in replies if r[1].endswith("/doc")]
    assert doc[3] == "200" and doc[2] == doc[1] and doc[5] == "s1" and doc[6] == "nil"
    (echo,) = [r for r in replies if r[1].endswith("/echo")]
    assert echo[3] == "200" and echo[6] == "mine"
    # "cookie": the array of the cookies set (curl's cookie-list lines); /echo sets none
    cookies = sorted(printed(server, "web", "COOKIES"))
    assert cookies == [
        ["COOKIES", "0", "nil"],
        ["COOKIES", "1", "127.0.0.1", "FALSE", "/", "FALSE", "0", "session", "s1"],
    ]
    contents = sorted(d[3] for d in data)
    assert contents == ["HELLO STAGE", "stage|a=1"]
    for d in data:
        assert d[1].startswith("text/plain") and d[2] == str(len(d[3])) and d[4] == "utf-8"
        assert d[5] == "0" and d[6:] == ["string", "number", "number"]


def test_route(server: ServerProcess) -> None:
    """The document's route example and each route form: register, offer and accept, argument,
    ``=return``, ``!fail``, pause with false and msec, ``*`` to all, removal, keep-alive."""
    assert printed(server, "rt", "MESSAGE") == [["MESSAGE", "HELLO"]]
    assert printed(server, "rt", "FETCH") == [["FETCH", "route:login!r__fail", "HELLO"]]
    assert printed(server, "rt", "ROUTE FAIL") == []
    got = printed(server, "rt2", "GOT")
    assert ["GOT", "route:subscribe_id_0?argument=returned!fail", "value"] in got
    assert printed(server, "rt", "RETURNED") == [["RETURNED", "RESULT"]]
    assert ["OFFER", "subscribe_id_0?argument=returned!fail"] in printed(server, "rt2", "OFFER")
    # subscribe_id_1 paused (false): nobody takes it, the publisher's !fail gets it
    assert ["FAIL", "route:subscribe_id_1?x!fail", "paused"] in printed(server, "rt", "FAIL")
    # "*" reaches every subscriber without an offer
    assert ["GOT", "route:*subscribe_id_2!fail", "everyone"] in got
    # {subscribe_id_2 = nil} is an empty table in Lua (changes nothing); stage.null removes it
    assert ["FAIL", "route:subscribe_id_2!fail", "removed"] in printed(server, "rt", "FAIL")
    assert ["GOT", "route:subscribe_id_2!fail", "removed"] not in got
    # route:@ with nil removes every registration: the probe that reached rt2 before fails now
    assert [line[1] for line in printed(server, "rt2", "PROBE")] == ["1", "2", "4"]
    assert ["FAIL", "route:*probe!fail", "5"] in printed(server, "rt", "FAIL")
    # route:@ with msec pauses every subscription of the stage
    assert ["GOT", "route:subscribe_id_0!fail", "sleeping"] not in got


def test_ticket(server: ServerProcess) -> None:
    """Callbacks with ``_TICKET``, feedback (ticket id then true), ``signal(nil, ms)``,
    ``ticket:=category`` to holders, a closing category cancelling its waiting ticket, and
    ``ticket:@`` told of that and of every hold that ran out (추가. 1)."""
    callbacks = printed(server, "tk", "CALLBACK")
    assert [line[1] for line in callbacks][:1] == ["1"]
    server.wait_for(lambda: len(printed(server, "tk", "CALLBACK")) == 2, 10, "the second ticket")
    assert all(line[2].startswith("@") for line in printed(server, "tk", "CALLBACK"))
    feedback = printed(server, "tk", "FEEDBACK")
    assert feedback[0][1] == "ticket:category=callback_id?feedback_id" and feedback[0][2].startswith("@")
    server.wait_for(lambda: len(printed(server, "tk", "FEEDBACK")) == 2, 10, "the feedback's true")
    assert printed(server, "tk", "FEEDBACK")[1][2] == "true"
    ((_, socket_id, user, ticket),) = printed(server, "tk", "LOGIN")
    assert (socket_id, user) == ("7", "alice") and ticket.startswith("@")
    assert printed(server, "tk", "BROADCAST") == [["BROADCAST", "NEWS"]]
    assert printed(server, "tk", "TEMP") == [["TEMP", "1"]]
    temp_ids = [line[1] for line in printed(server, "tk", "TEMP-FEEDBACK") if line[1].startswith("@")]
    assert len(temp_ids) == 2 and printed(server, "tk", "TEMP-FEEDBACK")[-1] == ["TEMP-FEEDBACK", "false"]
    # first the ticket still waiting when its category closed, then each hold as it runs out
    assert printed(server, "tk", "CONTROL")[0] == ["CONTROL", "cancel", temp_ids[1], "temp_cb"]
    holds = [("callback_id", line[2]) for line in printed(server, "tk", "CALLBACK")]
    holds += [("login_query", ticket), ("temp_cb", temp_ids[0])]
    server.wait_for(lambda: len(printed(server, "tk", "CONTROL")) >= 5, 10, "the notices of the ended holds")
    notices = sorted(tuple(line[1:]) for line in printed(server, "tk", "CONTROL")[1:])
    assert notices == sorted(("cancel", ticket_id, callback) for callback, ticket_id in holds)
