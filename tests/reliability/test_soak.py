"""Soak (opt-in ``-m soak``): mixed traffic against a real server for minutes, flat or it fails.

Broker clients ping an echo port, new connections arrive and expire all the time, and stage
``a`` keeps messages flowing to ``b`` replicas in both processes with replies coming back. Every
window the test counts echoes and replies and reads each process's RSS. Throughput must stay
within 25 % of its median and memory must not grow after the warm-up. ``STAGETX_SOAK_SECONDS``
sets the length (default 600).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from tests.reliability.control import ask
from tests.reliability.procs import LUA_APP, group_pids, raise_nofile, rss_mib
from tests.reliability.swarm import Swarm
from tests.support import ServerProcess, free_port, write_app

WINDOW = 10.0
WARMUP = 60.0

A = """
local sent, replies = 0, 0
stage.waitfor("done", function() replies = replies + 1 end)
local function tick()
    for i = 1, 10 do
        if stage.signal("b:work=done", i, {{player = "p" .. i, score = i * 1.5}}) then sent = sent + 1 end
    end
    stage.addtask(10, tick)
end
tick()
local echo = broker.ready("tcp://127.0.0.1:{echo}?packet=1k,1k", function() return function(s, d) return d end end)
echo.expire = 2000
broker.ready("tcp://127.0.0.1:{control}?text", function()
    return function() return string.format("%d %d", sent, replies) end
end)
log4cxx.info("ready")
"""
B = 'stage.waitfor("work", function(i, t) return process.stage, t.player end)\n'


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_mixed_traffic_soak_is_flat(tmp_path: Path) -> None:
    seconds = float(os.environ.get("STAGETX_SOAK_SECONDS", "600"))
    windows = max(int(seconds / WINDOW), 4)
    raise_nofile(4000)
    echo, control = free_port(), free_port()
    config = {"#startup": [["=lua+a", "=lua+b"], ["=lua+b"]], "=lua": {**LUA_APP, "=lua+a": "a", "=lua+b": "b"}}
    path = write_app(tmp_path, config, {"a": A.format(echo=echo, control=control), "b": B})
    rows: list[tuple[float, int, int, list[float]]] = []
    with ServerProcess(path) as server:
        server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the server")
        pids = group_pids(server)
        swarm = Swarm(echo, interval=0.1, limit_in=1024)
        try:
            swarm.open(holders=300, dead=0, slowloris=0, oversized=0)
            last_echoes, last_replies = 0, int(ask(control, "stats").split()[1])
            for n in range(windows):
                swarm.open(holders=0, dead=50, slowloris=0, oversized=0)  # churn: expired in 2 s
                swarm.run(WINDOW)
                echoes = len(swarm.stats.latencies)
                replies = int(ask(control, "stats").split()[1])
                rows.append(
                    (
                        (n + 1) * WINDOW,
                        echoes - last_echoes,
                        replies - last_replies,
                        [rss_mib(pids[g]) for g in sorted(pids)],
                    )
                )
                last_echoes, last_replies = echoes, replies
        finally:
            swarm.close()
        assert group_pids(server) == pids, "a process restarted during the soak"
        log = "\n".join(server.lines)
    print("\n  t (s)  echo/s  msg/s  RSS per process (MiB)")
    for t, e, r, rss in rows:
        print(f"{t:7.0f} {e / WINDOW:7.0f} {r / WINDOW:6.0f}  " + " ".join(f"{m:6.1f}" for m in rss))
    steady = [row for row in rows if row[0] > min(WARMUP, seconds / 4)]
    for column, name in ((1, "echo"), (2, "message")):
        rates = [row[column] for row in steady]
        median = statistics.median(rates)
        assert min(rates) > 0.75 * median and max(rates) < 1.25 * median, f"{name} throughput {rates}"
    first, last = steady[0][3], steady[-1][3]
    for before, after in zip(first, last):
        assert after - before < 8 + 0.05 * before, f"RSS grew {before:.1f} → {after:.1f} MiB"
    assert "Traceback" not in log
