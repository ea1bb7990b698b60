"""Faults of one server of a cluster: real ``twistd`` servers on loopback; the receiving server's
process frozen with SIGSTOP while the other one sends to it, then thawed with SIGCONT; the
gateway process of a sending server killed while another of its processes sends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.e2e.cluster_scripts import ASKER, WHERE
from tests.e2e.test_cluster_e2e import app
from tests.support import ServerProcess, free_port

# counts "ping" messages, logs "count N" when it changed, answers "who"
COUNTED = """
local n = 0
stage.waitfor("ping", function() n = n + 1 end)
stage.waitfor("who", function() return "who", n end)
local told = -1
stage.addtask(100, function()
    if n ~= told then told = n; log4cxx.info("count", n) end
    return 100
end)
"""

# sends %(total)d one-way "+b:ping" of 200 bytes, 500 per 5 ms; logs "refused WHY" at its first
# refusal and "done ACCEPTED REFUSED" at the end, then asks "+b:who=after" every 200 ms
SENDER = """
local total, sent, accepted, refused = %(total)d, 0, 0, 0
local pad = string.rep("x", 200)
stage.waitfor("after", function(what, n) log4cxx.info("after", what, n) end)
stage.addtask(50, function()
    if sent == 0 and not stage.signal("+b:ping", pad) then return 50 end  -- until b is linked
    if sent == 0 then sent, accepted = 1, 1 end
    for _ = 1, math.min(500, total - sent) do
        sent = sent + 1
        local ok, why = stage.signal("+b:ping", pad)
        if ok then accepted = accepted + 1
        else
            if refused == 0 then log4cxx.info("refused", why) end
            refused = refused + 1
        end
    end
    if sent < total then return 5 end
    log4cxx.info("done", accepted, refused)
    stage.addtask(200, function() stage.signal("+b:who=after"); return 200 end)
    return 0
end)
"""


def test_a_server_that_stops_reading_fills_its_bounded_queue_then_gets_everything_accepted(tmp_path: Path) -> None:
    """SIGSTOP of the receiving server: the sender's frames wait in the TCP stream, then in the
    peer's queue (``queue`` frames); past it sends return false and the reason, instead of the
    sender buffering everything it is given until sync. After SIGCONT every accepted message
    arrives and new ones are answered, with no restart."""
    port_a, port_b = free_port(), free_port()
    router = {"#router": [60000, 60000]}  # neither expiry nor overload: only the stalled link speaks
    path_b = app(tmp_path, "b", {**router, "#cluster": [port_b], "#startup": [["=lua+b"]]}, {"b": COUNTED})
    cluster_a = [{"listen": f"127.0.0.1:{port_a}", "queue": 20}, f"127.0.0.1:{port_b}"]
    path_a = app(
        tmp_path, "a", {**router, "#cluster": cluster_a, "#startup": [["=lua+a"]]}, {"a": SENDER % {"total": 400_000}}
    )
    with ServerProcess(path_b) as b, ServerProcess(path_a) as a:
        b.wait_for(lambda: any(int(n[0]) > 0 for n in b.logged("b", "count")), 30, "pings arriving")
        pid = b.pids(0)[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            a.wait_for(lambda: bool(a.logged("a", "done")), 120, "the end of the sends")
        finally:
            os.kill(pid, signal.SIGCONT)
        accepted, refused = map(int, a.logged("a", "done")[0])
        assert refused > 0, "every send accepted while the peer read nothing"
        why = a.logged("a", "refused")[0][0]
        assert why.startswith("server ") and why.endswith(" is not reading and its queue is full (20)"), why
        b.wait_for(lambda: [str(accepted)] in b.logged("b", "count"), 60, "every accepted ping counted")
        a.wait_for(lambda: bool(a.logged("a", "after")), 30, "an answer after SIGCONT")
        assert a.logged("a", "after")[-1] == ["who", str(accepted)]


def test_what_other_processes_send_while_the_gateway_process_restarts_is_relayed_after_it(tmp_path: Path) -> None:
    """kill -9 of the sending server's gateway (process 1) while its process 2 asks the other
    server every 40 ms: the asks queued for process 1 meanwhile reach the new one before it is
    linked to the other server again (frozen meanwhile, so that order is sure); they wait for the
    link instead of being dropped as "not relayed"."""
    port_a, port_b = free_port(), free_port()
    router = {"#router": [5000, 5000]}  # the new gateway waits up to 5 s for its peers
    path_b = app(tmp_path, "b", {**router, "name": "B", "#cluster": [port_b], "#startup": [["=lua+w"]]}, {"w": WHERE})
    idle = "stage.waitfor('nothing', function() end)"
    path_a = app(
        tmp_path,
        "a",
        {**router, "#cluster": [port_a, f"127.0.0.1:{port_b}"], "#startup": [["=lua+x"], ["=lua+s"]]},
        {"s": ASKER, "x": idle},
    )

    def relinked(server: ServerProcess) -> int:
        return sum("p2[" in line and "linked to process 1" in line for line in server.lines)

    with ServerProcess(path_b) as b, ServerProcess(path_a) as a:
        a.wait_for(lambda: len(a.logged("s", "at")) >= 5, 30, "answers")
        links = relinked(a)
        frozen = b.pids(0)[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            os.kill(a.pids(0)[0], signal.SIGKILL)
            a.wait_for(lambda: relinked(a) > links, 30, "process 2 linked to the restarted process 1")
        finally:
            os.kill(frozen, signal.SIGCONT)
        answered = len(a.logged("s", "at"))
        a.wait_for(lambda: len(a.logged("s", "at")) > answered + 10, 30, "answers through the new gateway")
        numbers = sorted(int(r[1]) for r in a.logged("s", "at"))
        refused = {int(r[0]) for r in a.logged("s", "refused")}
    assert not any("not relayed" in line for line in a.lines)
    missing = set(range(numbers[0], numbers[-1])) - set(numbers) - refused
    # only asks already written to the killed process may be lost
    assert len(missing) <= 3, sorted(missing)
