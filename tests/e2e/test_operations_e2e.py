"""Operations end to end (docs/operations.md): a real ``twistd -n stage`` driven through its admin
console and HTTP side, a hot reload under traffic, and SIGTERM under index writes."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import ServerProcess, write_app

ADMIN = {"console": "tcp:0:interface=127.0.0.1", "http": "tcp:0:interface=127.0.0.1"}

APP = """
count, last, disorder = 0, 0, 0
stage.waitfor("hit", function(n)
  count = count + 1
  if n ~= last + 1 then disorder = disorder + 1 end
  last = n
end)
function on_unload() return {count = count, last = last, disorder = disorder} end
function on_reload(old) count, last, disorder = old.count, old.last, old.disorder end
"""

# Sends TOTAL numbered messages to app in bursts once go() is called (from the console).
PRODUCER = """
local n, total = 0, 3000
local function burst()
  for _ = 1, 30 do n = n + 1; stage.signal("app:hit", n) end
  if n < total then return 10 end
end
function go() stage.addtask(0, burst) return "started" end
"""


class Console:
    """A line-console client over a real loopback socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def ask(self, line: str) -> list[str]:
        """Send one command; the reply's lines, the OK/ERROR marker last."""
        self.sock.sendall(line.encode() + b"\n")
        lines: list[str] = []
        while True:
            while b"\n" not in self.buffer:
                data = self.sock.recv(65536)
                assert data, "console closed"
                self.buffer += data
            raw, self.buffer = self.buffer.split(b"\n", 1)
            lines.append(raw.decode())
            if lines[-1] == "OK" or lines[-1].startswith("ERROR"):
                return lines

    def close(self) -> None:
        self.sock.close()


def admin_ports(server: ServerProcess) -> dict[str, int]:
    server.wait_for(lambda: any("] ready: " in line for line in server.lines), what="the ready line")
    ports = {}
    for line in server.lines:
        found = re.search(r"admin (console|http) listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            ports[found.group(1)] = int(found.group(2))
    return ports


def http(port: int, path: str, token: str | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _line_of(server: ServerProcess, text: str) -> int:
    """The index of the first line of ``server``'s log with ``text``."""
    return next(i for i, line in enumerate(server.lines) if text in line)


def test_console_and_http_drive_a_real_server(tmp_path: Path) -> None:
    config = {
        "#startup": [["=lua+app", "=ticket+ticket"], ["=lua+producer"]],
        "#admin": ADMIN,
        "=ticket+ticket": [100, {"game": 2}],
        "=lua+app": "lua/app",
        "=lua+producer": "lua/producer",
    }
    path = write_app(tmp_path, config, {"app": APP, "producer": PRODUCER})
    with ServerProcess(path) as server:
        ports = admin_ports(server)
        assert any(re.search(r"process 2 ready, pid \d+", line) for line in server.lines)
        # start-up in the order docs/operations.md gives (the processes report ready in either order)
        started = ("process 1 started", "process 2 started", "admin console listening", "admin http listening")
        first = [_line_of(server, text) for text in started]
        ready = [_line_of(server, text) for text in ("process 1 ready", "process 2 ready")]
        assert first == sorted(first) and first[-1] < min(ready) and max(ready) < _line_of(server, "] ready: ")
        console = Console(ports["console"])
        try:
            assert console.ask("help")[-1] == "OK"
            listing = console.ask("list")
            assert listing[-1] == "OK" and re.match(r"1 +\d+ .*yes +=lua\+app =ticket\+ticket", listing[1])
            assert console.ask("eval producer go()") == ["started", "OK"]
            server.wait_for(lambda: console.ask("eval app count")[0] == "3000", what="3000 messages")
            stat = console.ask("stat")
            assert re.match(r"1 +=lua\+app +3000 ", stat[1]), stat
            assert console.ask("eval app 1 + 1") == ["2", "OK"]
            failed = console.ask('eval app error("boom")')
            assert failed[-1].startswith("ERROR eval: eval:1: boom")
            assert console.ask("tickets") == ["=ticket+ticket", "  game: held 0 waiting 0 limit 2", "OK"]
            assert console.ask("peers") == ["no cluster", "OK"]
            assert console.ask("mem")[-1] == "OK"
            assert console.ask("loglevel stage.app warn")[-1] == "OK"
            assert console.ask("frobnicate")[-1] == "ERROR unknown command 'frobnicate' (try help)"
            assert console.ask("reload ticket")[-1] == "ERROR reload: stage 'ticket' is not a Lua stage"
        finally:
            console.close()

        status, body = http(ports["http"], "/cmd/eval?args=app&args=count%20*%202")
        assert (status, body) == (200, b"6000\nOK\n")
        status, body = http(ports["http"], "/cmd", body=b"eval app last")
        assert (status, body) == (200, b"3000\nOK\n")
        status, body = http(ports["http"], "/api/stat")
        stats = json.loads(body)
        assert status == 200 and stats["ok"]
        app = next(s for p in stats["data"] for s in p["stages"] if s["name"] == "=lua+app")
        assert app["received"] == 3000 and sum(app["latency"]) == 3000
        received = 'stagetx_stage_messages_received_total{process="1",stage="=lua+app",type="lua"} 3000.0'
        server.wait_for(lambda: received in http(ports["http"], "/metrics")[1].decode(), what="the next snapshot")
        status, body = http(ports["http"], "/metrics")
        text = body.decode()
        assert status == 200
        assert 'stagetx_stage_handler_seconds_count{process="1",stage="=lua+app",type="lua"} 3000.0' in text
        assert 'stagetx_ticket_slots{category="game",process="1",stage="=ticket+ticket",state="limit"} 2.0' in text
        assert http(ports["http"], "/health")[0] == 200

        status, body = http(ports["http"], "/api/restart?args=2")
        assert status == 200 and json.loads(body)["data"]["process"] == 2
        status, body = http(ports["http"], "/health")
        assert status == 503 and "process 2" in json.loads(body)["reasons"][0]
        server.wait_for(lambda: http(ports["http"], "/health")[0] == 200, what="health after the restart")
        assert 'stagetx_process_restarts_total{process="2"} 1.0' in http(ports["http"], "/metrics")[1].decode()


def test_a_token_guards_console_and_http(tmp_path: Path) -> None:
    config = {"#startup": [["=lua+app"]], "#admin": {**ADMIN, "token": "s3cret"}, "=lua+app": "lua/app"}
    path = write_app(tmp_path, config, {"app": APP})
    with ServerProcess(path) as server:
        ports = admin_ports(server)
        console = Console(ports["console"])
        try:
            assert console.ask("list") == ["ERROR token required (first line: token <TOKEN>)"]
            assert console.ask("token s3cret") == ["OK"]
            assert console.ask("eval app count") == ["0", "OK"]
        finally:
            console.close()
        wrong = Console(ports["console"])
        try:
            assert wrong.ask("token nope") == ["ERROR bad token"]
            assert wrong.sock.recv(10) == b""
        finally:
            wrong.close()
        assert http(ports["http"], "/cmd/list")[0] == 401
        assert http(ports["http"], "/metrics", token="wrong")[0] == 401
        assert http(ports["http"], "/health", token="s3cret")[0] == 200


def test_reload_under_traffic_loses_no_message(tmp_path: Path) -> None:
    config = {
        "#startup": [["=lua+app"], ["=lua+producer"]],
        "#admin": ADMIN,
        "=lua+app": "lua/app",
        "=lua+producer": "lua/producer",
    }
    path = write_app(tmp_path, config, {"app": APP, "producer": PRODUCER})
    with ServerProcess(path) as server:
        console = Console(admin_ports(server)["console"])
        try:
            assert console.ask("eval producer go()") == ["started", "OK"]
            reloads = 0
            while int(console.ask("eval app last")[0]) < 2500 and reloads < 20:
                assert console.ask("reload app") == ["process 1: app reloaded", "OK"]
                reloads += 1
                time.sleep(0.1)
            assert reloads >= 3
            server.wait_for(lambda: console.ask("eval app count")[0] == "3000", what="all 3000 messages")
            assert console.ask("eval app count, last, disorder") == ["3000\t3000\t0", "OK"]
            assert sum("stage =lua+app reloaded" in line for line in server.lines) == reloads
        finally:
            console.close()


WRITER = """
stage.waitfor("ack", function(r)
  for member in pairs(r["set:board"]) do log4cxx.info("acked", member:sub(2)) end
end)
local n = 0
local function burst()
  for _ = 1, 20 do
    n = n + 1
    stage.signal("rank:set=ack", {["set:board"] = {["m" .. n] = {v = n, i = n}}})
  end
  return 5
end
function go() stage.addtask(0, burst) return "writing" end
"""

# Asks for the members in ACKED; logs how many the index has.
READER = """
stage.waitfor("got", function(r)
  local found = 0
  for _ in pairs(r["get:board"]) do found = found + 1 end
  log4cxx.info("found", found)
end)
stage.addtask(300, function() stage.signal("rank:q=got", {["get:board"] = ACKED}) end)
"""


def _index_app(tmp_path: Path, script: str) -> Path:
    config = {
        "#startup": [["=index+rank"], ["=lua+client"]],
        "#admin": ADMIN,
        "=index+rank": "scores",
        "=lua+client": "lua/client",
    }
    return write_app(tmp_path, config, {"client": script})


def _acked(server: ServerProcess) -> set[int]:
    return {int(fields[0]) for fields in server.logged("client", "acked")}


def test_sigterm_under_index_writes_keeps_every_acknowledged_write(tmp_path: Path) -> Any:
    path = _index_app(tmp_path, WRITER)
    server = ServerProcess(path, "--grace", "6")
    try:
        console = Console(admin_ports(server)["console"])
        assert console.ask("eval client go()") == ["writing", "OK"]
        server.wait_for(lambda: len(server.logged("client", "acked")) >= 500, what="500 acknowledged writes")
        console.close()
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
        assert time.monotonic() - started < 10  # bounded by --grace
    finally:
        server.stop()
    acked = _acked(server)
    assert len(acked) >= 500

    members = ", ".join(f'"m{n}"' for n in sorted(acked))
    path = _index_app(tmp_path, f"ACKED = {{{members}}}\n" + READER)
    with ServerProcess(path) as reader:
        reader.wait_for(lambda: bool(reader.logged("client", "found")), what="the read-back")
        found = int(reader.logged("client", "found")[0][0])
    assert found == len(acked)
