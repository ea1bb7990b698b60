"""A process of a server that stops reading: a real ``twistd`` server of two processes, the
receiving one frozen with SIGSTOP while the other sends to its stage, then thawed with SIGCONT."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support import ServerProcess, write_app

# counts "ping" messages, logs "count N" when it changed and "out of order" for a number that
# does not follow the last one
COUNTED = """
local n, last = 0, 0
stage.waitfor("ping", function(i)
    if i <= last then log4cxx.info("out of order", last, i) end
    last, n = i, n + 1
end)
local told = -1
stage.addtask(100, function()
    if n ~= told then told = n; log4cxx.info("count", n) end
    return 100
end)
"""

# sends %(total)d numbered "b:ping" of 1,000 bytes, 500 per 5 ms; logs "refused WHY" at its first
# refusal and "done ACCEPTED REFUSED" at the end
SENDER = """
local total, sent, accepted, refused = %(total)d, 0, 0, 0
local pad = string.rep("x", 1000)
stage.addtask(50, function()
    for _ = 1, math.min(500, total - sent) do
        sent = sent + 1
        local ok, why = stage.signal("b:ping", sent, pad)
        if ok then accepted = accepted + 1
        else
            if refused == 0 then log4cxx.info("refused", why) end
            refused = refused + 1
        end
    end
    if sent < total then return 5 end
    log4cxx.info("done", accepted, refused)
    return 0
end)
"""


def test_a_process_that_stops_reading_fills_its_bounded_queue_then_gets_everything_in_order(tmp_path: Path) -> None:
    """Without the bound, the sending process kept every frame in Twisted's write buffer for as
    long as the other one was frozen (45 MB/s here)."""
    config = {
        # the thawed process takes its whole backlog in a few callbacks: on a busy machine one may
        # pass 3 × the default %budget, and its rebuilt runtime would count from 0 again
        "=lua": {"%package": ["[0]lua"], "%budget": 20000, "=lua+a": "a", "=lua+b": "b"},
        "#startup": [["=lua+a"], ["=lua+b"]],
    }
    path = write_app(tmp_path, config, {"a": SENDER % {"total": 200_000}, "b": COUNTED})
    with ServerProcess(path) as server:
        server.wait_for(lambda: any(int(n[0]) > 0 for n in server.logged("b", "count")), 30, "pings arriving")
        pid = server.pids(1)[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            server.wait_for(lambda: bool(server.logged("a", "done")), 120, "the end of the sends")
        finally:
            os.kill(pid, signal.SIGCONT)
        accepted, refused = map(int, server.logged("a", "done")[0])
        assert refused > 0, "every send accepted while the process read nothing"
        assert server.logged("a", "refused")[0] == ["process 2 is not reading and its queue is full"]
        server.wait_for(lambda: [str(accepted)] in server.logged("b", "count"), 60, "every accepted ping counted")
        assert server.logged("b", "out of order") == []
