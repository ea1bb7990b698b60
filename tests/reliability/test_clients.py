"""Many concurrent clients of a real server's broker port, with abusers among them (issue 10).

A ``twistd -n stage`` server echoes packets on a broker port (IN limit 1 KiB, ``expire`` set).
Holders ping it for the whole run; dead clients go silent after half a header; slowloris clients
trickle a frame that never completes; oversized clients announce a frame over the limit, again
and again. The holders must all stay connected and keep getting their echoes, the dead must be
closed by idle expiry, the oversized dropped at once, and the server's memory stay bounded.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from tests.reliability.procs import LUA_APP, group_pids, raise_nofile, rss_mib
from tests.reliability.swarm import Swarm
from tests.support import ServerProcess, free_port, write_app

LIMIT_IN = 1024
SCRIPT = """
local l = broker.ready("tcp://127.0.0.1:{port}?packet=1k,1k", function()
    return function(s, data) return data end
end)
l.expire = {expire}
log4cxx.info("ready")
"""


def _run(tmp_path: Path, holders: int, seconds: float, interval: float, expire_ms: int) -> None:
    raise_nofile(holders + 1000)
    port = free_port()
    config = {"#startup": [["=lua+a"]], "=lua": {**LUA_APP, "=lua+a": "a"}}
    path = write_app(tmp_path, config, {"a": SCRIPT.format(port=port, expire=expire_ms)})
    with ServerProcess(path) as server:
        server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the broker port")
        pid = group_pids(server)[0]
        idle_rss = rss_mib(pid)
        swarm = Swarm(port, interval, LIMIT_IN)
        try:
            swarm.open(holders=holders, dead=100, slowloris=20, oversized=5)
            swarm.run(seconds / 2)
            mid_rss = rss_mib(pid)
            swarm.run(seconds / 2)
            end_rss = rss_mib(pid)
            assert server.process.poll() is None
        finally:
            swarm.close()
        server_log = "\n".join(server.lines)

    kept = swarm.of("holder")
    assert all(c.closed_at is None for c in kept), "a well-behaved client was disconnected"
    expected_pings = int(seconds / interval) - 1
    starved = [c for c in kept if c.echoed < expected_pings or c.echoed < c.sent - 2]
    assert not starved, f"{len(starved)} holders missed echoes, e.g. sent {starved[0].sent} got {starved[0].echoed}"
    latencies = sorted(swarm.stats.latencies)
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 1.0, f"echo p99 {p99 * 1000:.0f} ms"

    expire = expire_ms / 1000
    dead = swarm.of("dead")
    assert all(c.closed_at is not None for c in dead), "idle expiry left dead clients open"
    lifetimes = [c.closed_at - c.opened for c in dead if c.closed_at is not None]
    assert max(lifetimes) < expire * 1.125 + 1.0, f"dead client lived {max(lifetimes):.2f} s"
    assert min(lifetimes) >= expire * 0.9

    drops = swarm.stats.oversized_drops
    assert len(drops) >= 50 and max(drops) < 1.0, f"{len(drops)} oversized drops, slowest {max(drops):.2f} s"
    assert all(c.closed_at is None for c in swarm.of("slowloris"))  # trickling is not idleness
    assert "over the IN limit of 1024" in server_log
    assert "Traceback" not in server_log and "Unhandled" not in server_log

    # Memory: what the connections cost, then flat while they are held.
    per_connection_kib = (mid_rss - idle_rss) * 1024 / (holders + 125)
    print(
        f"{holders} clients: RSS idle {idle_rss:.0f} MiB, held {mid_rss:.0f} → {end_rss:.0f} MiB "
        f"({per_connection_kib:.1f} KiB per connection); echo median "
        f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; {len(drops)} oversized drops"
    )
    assert per_connection_kib < 32
    assert end_rss - mid_rss < 16 + 0.05 * mid_rss, f"RSS grew {mid_rss:.0f} → {end_rss:.0f} MiB while holding"


def test_2000_clients_with_abusers_for_10_seconds(tmp_path: Path) -> None:
    _run(tmp_path, holders=2000, seconds=10, interval=1.0, expire_ms=3000)


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_10000_clients_with_abusers_for_60_seconds(tmp_path: Path) -> None:
    _run(tmp_path, holders=10_000, seconds=60, interval=3.0, expire_ms=8000)
