"""The index end to end on its Redis backend: a Lua stage in process 1 sends ``set`` requests with
``=reply`` to ``=index+rank`` in process 2, whose boards are in a local redis-server, ``INFLIGHT``
outstanding, beside redis-benchmark ``ZADD`` with 50 clients on the same server in the same run
(measured right before and right after, the ratio taken against the mean; see ``index_e2e``).

The timed sets update members of a key space filled beforehand (untimed), each request a member
none of the others in flight has (so the Lua stage can time each one: p50 and p99 of the time from
``signal`` to the reply, counted in buckets of 1 µs) and the CPU per set of each of the three
busy processes over the timed seconds. The Lua client is ``index_e2e``'s, with its latencies on.
The sets of a router turn are one Lua script run on Redis; each replies the member's rank.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

from bench import budget
from bench.baselines import redis_zset
from bench.rows import row, skip
from bench.workloads.index_e2e import INFLIGHT, client, cpu_note

WORKLOAD = "index e2e on redis: set from Lua, another process"


def _pid(port: int) -> int:
    """The process id of the redis-server on ``port`` (its ``INFO server``)."""
    info = subprocess.run(["redis-cli", "-p", str(port), "INFO", "server"], capture_output=True, text=True, timeout=10)
    found = re.search(r"^process_id:(\d+)", info.stdout, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"redis-server on port {port} gave no process_id")
    return int(found.group(1))


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: the redis ZADD rate measured around this workload (or why not), the fill rate and the
    timed set rate with its latency percentiles, both end to end from Lua."""
    reason = redis_zset.missing()
    around = f"{redis_zset.label('ZADD', False)}, around index e2e on redis"
    if reason is not None:
        return [skip(around, reason), skip(WORKLOAD, reason)]
    members = budget.count(200_000, 50_000)
    with redis_zset.filled_server(members) as (port, _):
        before = redis_zset.zadd(port, members)
        settings = {"redis": f"redis://127.0.0.1:{port}/0", "prefix": "bench-index:"}
        figures = client(settings, members, timed=True, watch={"redis-server": _pid(port)})
        after = redis_zset.zadd(port, members)
    baseline = (before + after) / 2
    n = f"{members:,}-member index on redis-server, {INFLIGHT} in flight"
    return [
        row(around, baseline, "req/s", note=f"mean of {before:,.0f} right before and {after:,.0f} right after"),
        row("index e2e on redis: new members from Lua", figures.fill, "req/s", note=n),
        row(
            WORKLOAD,
            figures.sets,
            "req/s",
            baseline_name=around,
            baseline=baseline,
            target="≥ 0.8 × baseline",
            note=f"{n}, rank in each reply; latency p50 {figures.p50:.2f} ms, p99 {figures.p99:.2f} ms; "
            f"{figures.failed:.0f} failed; {cpu_note(figures)}",
        ),
    ]
