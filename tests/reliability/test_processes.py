"""kill -9 of stage processes and of the supervisor, in a real ``twistd -n stage`` server.

Stage ``a`` (process 1) drives traffic and answers the test on a text broker port; ``b`` has
replicas in processes 2 and 3; ``c`` lives only in process 2. What ``a`` counted it tells the
test. (Index data under kill -9: ``tests/e2e/test_index_crash.py``.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.reliability.control import ask
from tests.reliability.procs import LUA_APP, alive, children_of, group_pids
from tests.support import ServerProcess, free_port, wait_until, write_app

CONFIG = {
    "#startup": [["=lua+a"], ["=lua+b", "=lua+c"], ["=lua+b"]],
    "=lua": {**LUA_APP, "%budget": 20000, "=lua+a": "a", "=lua+b": "b", "=lua+c": "c"},
}

A = """
local sent, refused, replies, reasons, running = 0, 0, {{}}, {{}}, false
stage.waitfor("done", function(id) replies[id] = (replies[id] or 0) + 1 end)
stage.waitfor("counted", function(n) log4cxx.info("counted", n) end)
local function tick()
    if not running then return end
    for i = 1, 20 do
        local ok, why = stage.signal("b:work=done", i)
        if ok then sent = sent + 1 else refused = refused + 1; reasons[#reasons + 1] = why end
    end
    stage.addtask(10, tick)
end
local commands = {{
    start = function() running = true; tick(); return "started" end,
    stop = function() running = false; return "stopped" end,
    stats = function()
        return string.format("%d %d %d %d %s", sent, refused, replies[2] or 0, replies[3] or 0,
                             tostring(reasons[1]))
    end,
    blast = function()  -- fill the queue of c's process, which is down
        local ok_count = 0
        for i = 1, 150000 do
            local ok, why = stage.signal("c:fill", i)
            if not ok then return string.format("%d %d %s", ok_count, i, why) end
            ok_count = ok_count + 1
        end
        return string.format("%d none none", ok_count)
    end,
    count = function() return tostring(stage.signal("c:report=counted")) end,
}}
broker.ready("tcp://127.0.0.1:{port}?text", function()
    return function(s, line) return commands[line]() end
end)
log4cxx.info("ready")
"""

B = """
stage.waitfor("work", function() return process.stage end)
"""

C = """
local filled, last = 0, 0
stage.waitfor("fill", function(i)
    filled = filled + 1
    if i ~= last + 1 then log4cxx.info("out of order", last, i) end
    last = i
end)
stage.waitfor("report", function() return filled end)
"""


def start(tmp_path: Path, *twistd_args: str) -> tuple[ServerProcess, int]:
    port = free_port()
    path = write_app(tmp_path, CONFIG, {"a": A.format(port=port), "b": B, "c": C})
    server = ServerProcess(path, *twistd_args)
    try:
        server.wait_for(lambda: bool(server.logged("a", "ready")) and len(group_pids(server)) == 3, 30, "start")
        server.wait_for(lambda: sum("linked to process" in line for line in server.lines) >= 6, 30, "the links")
    except BaseException:
        server.stop()
        raise
    return server, port


def stats(port: int) -> tuple[int, int, int, int, str]:
    sent, refused, r2, r3, reason = ask(port, "stats").split(" ", 4)
    return int(sent), int(refused), int(r2), int(r3), reason


def unanswered(port: int) -> int:
    sent, _, r2, r3, _ = stats(port)
    return sent - r2 - r3


def restarted(server: ServerProcess, group: int, old_pid: int) -> bool:
    return group_pids(server).get(group, old_pid) != old_pid


def test_kill_9_of_a_replica_under_load_sends_its_traffic_to_the_other(tmp_path: Path) -> None:
    server, port = start(tmp_path)
    with server:
        assert ask(port, "start") == "started"
        server.wait_for(lambda: min(stats(port)[2:4]) > 100, 20, "both replicas answering")
        victim = group_pids(server)[2]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        sent_at_kill, _, r2_at_kill, r3_at_kill, _ = stats(port)
        server.wait_for(lambda: restarted(server, 2, victim), 20, "the supervisor to restart process 3")
        gap = time.monotonic() - killed
        sent_in_gap, _, r2_in_gap, _, _ = stats(port)
        server.wait_for(lambda: stats(port)[3] > r3_at_kill + 100, 20, "the restarted replica answering")
        assert ask(port, "stop") == "stopped"
        # the replies still under way come home: all but those in flight at the kill (under 400)
        server.wait_for(lambda: unanswered(port) < 400, 20, "the last replies")
        sent, refused, r2, r3, reason = stats(port)
        log = "\n".join(server.lines)
    lost = sent - r2 - r3
    print(f"kill -9 of a replica: gap {gap:.2f} s, {sent} sent, {refused} refused, {lost} lost in flight")
    assert refused == 0, reason  # the other replica was there all along
    assert 0 <= lost < 400, f"{lost} messages lost (more than what was in flight at the kill)"
    assert r2_in_gap - r2_at_kill >= (sent_in_gap - sent_at_kill) - 400  # process 2 took the whole load
    assert "ended: signal SIGKILL" in log and "Traceback" not in log


def test_a_stage_whose_only_process_is_down_queues_up_to_the_bound_then_refuses(tmp_path: Path) -> None:
    server, port = start(tmp_path, "--restart-delay", "8")  # a gap longer than the blast, even on a busy machine
    with server:
        victim = group_pids(server)[1]
        losses_before = sum("link to process 2 lost" in line for line in server.lines)
        os.kill(victim, signal.SIGKILL)
        server.wait_for(
            lambda: sum("link to process 2 lost" in line for line in server.lines) > losses_before,
            10,
            "process 1 to see the link go",
        )
        queued, refused_at, why = ask(port, "blast").split(" ", 2)
        blasted_in_gap = not restarted(server, 1, victim)
        links_before = sum("p1[" in line and "linked to process 2" in line for line in server.lines)
        server.wait_for(
            lambda: sum("p1[" in line and "linked to process 2" in line for line in server.lines) > links_before,
            20,
            "process 1 linked to the restarted process 2",
        )
        assert ask(port, "count") == "true"
        server.wait_for(lambda: bool(server.logged("a", "counted")), 30, "c's count")
        (counted,) = server.logged("a", "counted")[-1]
        out_of_order = server.logged("c", "out of order")
    assert blasted_in_gap, "process 2 came back before the queue filled; cannot test the bound"
    assert (int(queued), int(refused_at)) == (100_000, 100_001)  # links.PENDING_LIMIT
    assert why == "process 2 is down and its queue is full"
    assert int(counted) == 100_000, "messages queued during the gap were lost"
    assert out_of_order == []


def test_kill_9_of_the_supervisor_leaves_no_orphans(tmp_path: Path) -> None:
    server, port = start(tmp_path)
    children = children_of(server.process.pid)
    try:
        assert sorted(children) == sorted(group_pids(server).values())
        os.kill(server.process.pid, signal.SIGKILL)
        started = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in children), 10, "the children to exit")
        print(f"children gone {time.monotonic() - started:.2f} s after the supervisor's kill -9")
    finally:
        server.stop()
        for pid in children:  # orphans of a failed run: ours to end
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_stuck_process_is_reported_unresponsive_then_killed_and_restarted(tmp_path: Path) -> None:
    """A process whose reactor stops beating (SIGSTOP: nothing it runs can answer) shows as
    ``unresponsive`` in ``list``, ``/health`` and ``/metrics`` within 2 × its 1 s report beat, and is killed and
    restarted after ``--unresponsive-restart``."""
    from tests.e2e.test_operations_e2e import ADMIN, Console, admin_ports, http

    config = {
        "#startup": [["=lua+a"], ["=lua+b"]],
        "#admin": ADMIN,
        "=lua": {**LUA_APP, "=lua+a": "a", "=lua+b": "b"},
    }
    path = write_app(tmp_path, config, {"a": "log4cxx.info('ready')", "b": "log4cxx.info('ready')"})
    with ServerProcess(path, "--unresponsive-restart", "4") as server:
        ports = admin_ports(server)
        console = Console(ports["console"])
        try:
            stuck = group_pids(server)[1]
            assert http(ports["http"], "/health")[0] == 200
            os.kill(stuck, signal.SIGSTOP)
            stopped = time.monotonic()
            wait_until(lambda: "unresponsive" in console.ask("list")[2], 10, "list to say unresponsive")
            assert time.monotonic() - stopped <= 2 * 1.0 + 1.0 + 2.0  # 2 beats, the last report's age, slack
            status, body = http(ports["http"], "/health")
            assert status == 503 and b"process 2 is unresponsive" in body
            metrics = http(ports["http"], "/metrics")[1]
            assert b'stagetx_process_up{process="2"} 0.0' in metrics
            assert b'stagetx_process_up{process="1"} 1.0' in metrics
            assert "yes" in console.ask("list")[1]  # process 1 still fine
            wait_until(lambda: group_pids(server).get(1, stuck) != stuck, 20, "a new process 2")
            assert time.monotonic() - stopped >= 4 - 1.0  # counted from its last report, up to 1 s before
            assert not alive(stuck)
            wait_until(lambda: http(ports["http"], "/health")[0] == 200, 30, "health back to ok")
            listing = console.ask("list")
            assert "unresponsive" not in "\n".join(listing) and listing[2].split()[3] == "1"  # one restart
            assert any("process 2 pid" in line and "unresponsive for" in line for line in server.lines)
        finally:
            console.close()
