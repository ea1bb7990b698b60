"""A real server's Lua stage survives runaway scripts: ``%memory``, ``%budget``, handler errors.

Tests of the limits on a stage in this process live in tests/integration/test_lua_stage.py; here a
``twistd -n stage`` server is abused through its broker port and by its own messages, and must keep
answering after each.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from tests.reliability.control import ask
from tests.reliability.procs import LUA_APP, alive, group_pids, rss_mib
from tests.support import ServerProcess, free_port, write_app

SCRIPT = """
local function hog()  -- allocates until %memory says no
    local t = {{}}
    for i = 1, 1e9 do t[i] = string.rep("x", 1048576) .. i end  -- 1 MiB a step: at the limit in ms
end
local function spin() while true do end end
stage.waitfor("hog", hog)
stage.waitfor("spin", spin)
stage.waitfor("fail", function() error("handler kaboom") end)
local commands = {{
    ping = function() return "pong" end,
    hog = hog,
    spin = spin,
    fail = function() error("receive kaboom") end,
    queue = function()  -- the same abuse as messages and a timer, then a marker
        stage.signal("hog"); stage.signal("spin"); stage.signal("fail")
        stage.addtask(1, function() error("task kaboom") end)
        return "queued"
    end,
    mem = function()  -- what is still held: garbage is collected first
        collectgarbage()
        return string.format("%d", collectgarbage("count") // 1024)
    end,
}}
broker.ready("tcp://127.0.0.1:{port}?text", function()
    return function(s, line) return commands[line]() end
end)
log4cxx.info("ready")
"""


BUDGET = "budget of 1000 ms exceeded"


def fire(port: int, line: str) -> None:
    """Send one line and hang up without waiting for an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(line.encode() + b"\n")


def test_memory_hog_infinite_loop_and_errors_never_stop_the_stage(tmp_path: Path) -> None:
    port = free_port()
    # a budget long enough that the hog meets %memory first also on a busy machine
    config = {"#startup": [["=lua+a"]], "=lua": {**LUA_APP, "%memory": "64m", "%budget": 1000, "=lua+a": "a"}}
    path = write_app(tmp_path, config, {"a": SCRIPT.format(port=port)})
    errors = {"hog": ("not enough memory", BUDGET), "spin": (BUDGET,), "fail": ("receive kaboom",)}
    with ServerProcess(path) as server:
        server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the stage")
        pid = group_pids(server)[0]
        base_rss = rss_mib(pid)
        peak = base_rss

        def log_count(needles: tuple[str, ...]) -> int:
            text = "\n".join(server.lines)
            return sum(text.count(needle) for needle in needles)

        for _ in range(3):  # each abuse, three times over: nothing accumulates
            for command in ("hog", "spin", "fail"):
                before = log_count(errors[command])
                fire(port, command)  # the failing callback sends no answer
                assert ask(port, "ping") == "pong", f"no answer after {command}"
                peak = max(peak, rss_mib(pid))
                # one more of its errors logged (a hog may meet the budget first on a busy machine);
                # the supervisor relays child output a little later
                server.wait_for(lambda c=command, b=before: log_count(errors[c]) > b, 20, f"the error of {command}")
        assert ask(port, "queue") == "queued"
        server.wait_for(lambda: "task kaboom" in "\n".join(server.lines), 10, "the queued abuse to run")
        server.wait_for(lambda: "handler kaboom" in "\n".join(server.lines), 10, "the queued handler error")
        assert ask(port, "ping") == "pong"
        lua_mib = int(ask(port, "mem"))
        log = "\n".join(server.lines)
        assert server.process.poll() is None
    assert "not enough memory" in log
    assert lua_mib < 8, f"{lua_mib} MiB still held by Lua after the hogs"
    assert peak - base_rss < 64 + 48, f"RSS {base_rss:.0f} → {peak:.0f} MiB under a 64 MiB %memory"


# Stage a abuses its budget in ways a plain hook does not stop; stage b, in the same process (one
# reactor thread), must keep answering soon after each abuse (within two budgets, plus slack for a busy machine).
ABUSER = """
local function long() local x = 0 for i = 1, 1e12 do x = x + i end end
local commands = {{
    ping = function() return "pong" end,
    pcall_loop = function() while true do pcall(function() while true do end end) end end,
    retry = function() local ok repeat ok = pcall(long) until ok end,
    pattern = function() return tostring(string.find(string.rep("a", 200), ".-.-.-.-b")) end,
    unhook = function() pcall(debug.sethook) while true do end end,  -- the hooks cannot be cleared
    unhook_coroutine = function() coroutine.wrap(function() pcall(debug.sethook) while true do end end)() end,
    tostring_loop = function() error(setmetatable({{}}, {{__tostring = function() while true do end end}})) end,
    xpcall_handler = function() xpcall(error, function() while true do end end) end,
    rep_empty = function() return tostring(#string.rep("", 1e15)) end,  -- C code: days of copying nothing
    move = function() table.move({{}}, 1, 1e12, 1, {{}}) end,  -- C code: hours of moving nothing
    finalizer = function()
        setmetatable({{}}, {{__gc = function() while true do end end}})
        debug.setmetatable({{}}, {{__gc = function() while true do end end}})
        return "armed"
    end,
    fill = function()  -- up to 50,000 more of 4,000,000 numbers to sort, well within the budget
        numbers = numbers or {{}}
        local n = #numbers
        for i = n + 1, math.min(n + 50000, 4000000) do numbers[i] = (i * 7919) % 4e6 end
        marker = "old runtime"
        return tostring(#numbers)
    end,
    sort = function()  -- C code the hook cannot reach: past the hard limit, the runtime is rebuilt
        table.sort(numbers)
        return "sorted"
    end,
    marker = function() return tostring(marker) end,
}}
broker.ready("tcp://127.0.0.1:{port}?text", function()
    return function(s, line) return commands[line]() end
end)
log4cxx.info("ready")
"""
OTHER = """
broker.ready("tcp://127.0.0.1:{port}?text", function()
    return function(s, line) return "pong" end
end)
log4cxx.info("ready")
"""


def test_a_budget_pcall_cannot_catch_bounded_patterns_and_finalizers(tmp_path: Path) -> None:
    from tests.e2e.test_operations_e2e import Console, admin_ports

    budget = 300
    port_a, port_b = free_port(), free_port()
    config = {
        "#startup": [["=lua+a", "=lua+b"]],
        "#admin": {"console": "tcp:0:interface=127.0.0.1"},
        "=lua": {**LUA_APP, "%budget": budget, "=lua+a": "a", "=lua+b": "b"},
    }
    path = write_app(tmp_path, config, {"a": ABUSER.format(port=port_a), "b": OTHER.format(port=port_b)})
    with ServerProcess(path) as server:
        for name in ("a", "b"):
            server.wait_for(lambda n=name: bool(server.logged(n, "ready")), 30, f"stage {name}")
        console = Console(admin_ports(server)["console"])
        try:
            for command in (
                "pcall_loop",
                "retry",
                "pattern",
                "unhook",
                "unhook_coroutine",
                "tostring_loop",
                "xpcall_handler",
                "rep_empty",
                "move",
            ):
                fire(port_a, command)
                started = time.monotonic()
                assert ask(port_b, "ping") == "pong"
                waited = time.monotonic() - started
                # interrupted after one budget, not never: the slack is for a busy machine's scheduler
                assert waited < 2 * budget / 1000 + 2.0, f"stage b waited {waited:.2f} s behind {command}"
                assert ask(port_a, "ping") == "pong"
            server.wait_for(lambda: "\n".join(server.lines).count(f"budget of {budget} ms exceeded") >= 5, 20, "budget")
            server.wait_for(lambda: 'pattern ".-.-.-.-b" is too complex' in "\n".join(server.lines), 20, "pattern")

            assert ask(port_a, "finalizer") == "armed"
            started = time.monotonic()
            assert console.ask("gc")[-1] == "OK"  # the finalizer runs under the budget, after the collection
            assert time.monotonic() - started < 2 * budget / 1000 + 2.0
            assert ask(port_b, "ping") == "pong"
            server.wait_for(lambda: "Lua error in finalizer" in "\n".join(server.lines), 20, "the finalizer stopped")

            for _ in range(200):  # 80 calls fill it; a call a busy machine stalls past the budget is retried
                try:
                    if ask(port_a, "fill", timeout=5.0) == "4000000":
                        break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("stage a never filled its 4,000,000 numbers")
            fire(port_a, "sort")  # its answer never comes: the budget error meets it on its way back
            server.wait_for(lambda: "abandoned and rebuilt" in "\n".join(server.lines), 20, "the rebuild")
            server.wait_for(lambda: ask(port_a, "marker") == "nil", 20, "a fresh runtime")
            assert ask(port_b, "ping") == "pong"
            assert server.process.poll() is None
        finally:
            console.close()


# Stage "small" (%memory 1m) takes packets of up to 4 MiB and messages; stage "big", in another
# process, sends it a message of 3 MB when asked. Neither may abort small's process (lupa hands
# Python's values over outside Lua's protected calls, where a failed allocation is a panic).
SMALL = """
stage.waitfor("big", function(v) log4cxx.info("got", #v) end)
broker.ready("tcp://127.0.0.1:{port}?packet=4m,1k", function()
    return function(s, data) return "ok " .. #data end
end)
log4cxx.info("ready")
"""
BIG = """
broker.ready("tcp://127.0.0.1:{port}?text", function()
    return function(s, line)
        return tostring(stage.signal("small:big", string.rep("x", 3000000)))
    end
end)
log4cxx.info("ready")
"""


def packet(port: int, data: bytes) -> bytes:
    """Send one ``packet`` frame; the payload of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(len(data).to_bytes(4, "little") + data)
        answer = b""
        while len(answer) < 4 or len(answer) < 4 + int.from_bytes(answer[:4], "little"):
            chunk = conn.recv(65536)
            if not chunk:
                raise AssertionError("connection closed before an answer")
            answer += chunk
    return answer[4:]


def test_a_frame_or_message_bigger_than_memory_fails_in_the_stage_not_the_process(tmp_path: Path) -> None:
    small_port, big_port = free_port(), free_port()
    config = {
        "#startup": [["=lua+small"], ["=lua+big"]],
        "=lua": {**LUA_APP, "=lua+small": "small", "=lua+big": "big"},
        "=lua+small": {"%memory": "1m"},
    }
    scripts = {"small": SMALL.format(port=small_port), "big": BIG.format(port=big_port)}
    path = write_app(tmp_path, config, scripts)
    with ServerProcess(path) as server:
        server.wait_for(lambda: server.logged("small", "ready") and server.logged("big", "ready"), 30, "the stages")
        pid = group_pids(server)[0]
        assert packet(small_port, b"hello") == b"ok 5"
        with socket.create_connection(("127.0.0.1", small_port), timeout=20) as conn:
            conn.sendall((3_000_000).to_bytes(4, "little") + b"x" * 3_000_000)
            server.wait_for(lambda: "not enough memory" in "\n".join(server.lines), 20, "the frame's error")
        assert packet(small_port, b"hello") == b"ok 5"
        assert ask(big_port, "send") == "true"
        server.wait_for(lambda: "\n".join(server.lines).count("not enough memory") >= 2, 20, "the message's error")
        assert packet(small_port, b"again") == b"ok 5"
        assert group_pids(server)[0] == pid and alive(pid)
        assert not [line for line in server.lines if "PANIC" in line or "SIGABRT" in line]


# Stage "loader" runs what its clients send (a console, a rules engine); stage "other" shares its
# process. Lua runs bytecode unverified: a damaged chunk reads and writes past its arrays.
LOADER = """
broker.ready("tcp://127.0.0.1:{port}?packet", function()
    return function(s, data)
        local f, err = load(data, "=client")
        if not f then return "refused: " .. err end
        return "ran: " .. tostring(select(2, pcall(f)))
    end
end)
log4cxx.info("ready")
"""


def damaged_chunks(count: int) -> list[bytes]:
    """Lua 5.4 binary chunks of one small function, each with three bytes of its body changed."""
    import random

    import lupa.lua54

    dump = lupa.lua54.LuaRuntime(encoding=None).eval(
        'string.dump(function(a) local t = {a, 1, 2, "x"} for i = 1, 3 do t[i] = t[i] end return t[1], #t end)'
    )
    rng = random.Random(5)
    chunks = []
    for _ in range(count):
        chunk = bytearray(dump)
        for _ in range(3):
            chunk[rng.randrange(40, len(chunk))] = rng.randrange(256)
        chunks.append(bytes(chunk))
    return chunks


def test_a_client_sending_bytecode_or_os_exit_to_load_cannot_end_the_process(tmp_path: Path) -> None:
    loader_port, other_port = free_port(), free_port()
    config = {
        "#startup": [["=lua+loader", "=lua+other"]],
        "=lua": {**LUA_APP, "=lua+loader": "loader", "=lua+other": "other"},
    }
    scripts = {"loader": LOADER.format(port=loader_port), "other": OTHER.format(port=other_port)}
    path = write_app(tmp_path, config, scripts)
    with ServerProcess(path) as server:
        server.wait_for(lambda: server.logged("loader", "ready") and server.logged("other", "ready"), 30, "the stages")
        pid = group_pids(server)[0]
        assert packet(loader_port, b"return 6 * 7") == b"ran: 42"
        for chunk in damaged_chunks(100):
            assert packet(loader_port, chunk) == b"refused: attempt to load a binary chunk (mode is 't')"
        # a script's os.exit(0) ended the process and every stage in it (lost their state and clients)
        assert b"os.exit: a stage cannot end its process" in packet(loader_port, b"os.exit(0)")
        assert ask(other_port, "ping") == "pong"
        assert group_pids(server)[0] == pid and alive(pid)


PAUSED = """
local count = 0
stage.addtask(10, function()
    count = count + 1
    local inside = io.open("{inside}", "w"); inside:close()
    while not io.open("{release}") do end  -- until the test lets it go: it runs while stopped
    log4cxx.info("released", count)
    stage.addtask(10, function() log4cxx.info("kept", count) end)
end)
"""


def test_a_process_stopped_and_continued_mid_callback_does_not_charge_the_pause_to_it(tmp_path: Path) -> None:
    """SIGSTOP then SIGCONT (or a suspended VM, a starved machine) while a callback runs: the
    pause counted against the callback's %budget, so it was interrupted on thaw and, the pause
    being over 3 × %budget, its runtime rebuilt (its state gone) although it ran for milliseconds."""
    inside, release = tmp_path / "inside", tmp_path / "release"
    config = {"#startup": [["=lua+a"]], "=lua": {**LUA_APP, "%budget": 1000, "=lua+a": "a"}}
    path = write_app(tmp_path, config, {"a": PAUSED.format(inside=inside, release=release)})
    with ServerProcess(path) as server:
        server.wait_for(inside.exists, 30, "the callback running")
        pid = group_pids(server)[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(4)  # the fault itself: a pause past 3 × %budget
        finally:
            os.kill(pid, signal.SIGCONT)
        release.touch()
        server.wait_for(lambda: bool(server.logged("a", "kept")), 30, "the stage going on")
        assert server.logged("a", "released") == [["1"]] and server.logged("a", "kept") == [["1"]]
        text = "\n".join(server.lines)
        assert BUDGET not in text and "abandoned" not in text, text
