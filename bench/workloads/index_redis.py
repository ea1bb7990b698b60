"""The index end to end on its Redis backend: a Lua stage in process 1 sends ``set`` requests with
``=reply`` to ``=index+rank`` in process 2, whose boards are in a local redis-server, ``INFLIGHT``
outstanding, beside redis-benchmark ``ZADD`` with 50 clients on the same server in the same run
(measured right before and right after, the ratio taken against the mean; see ``index_e2e``).

The timed sets update members of a key space filled beforehand (untimed), each request a member
none of the others in flight has (so the Lua stage can time each one: p50 and p99 of the time from
``signal`` to the reply). Each set is one Lua script run on Redis and replies the member's rank.
"""

from __future__ import annotations

from typing import Any

from bench import budget
from bench.baselines import redis_zset
from bench.baselines.redis_zset import CLIENTS
from bench.rows import row, skip
from bench.workloads.server import bench_line, server

INFLIGHT = CLIENTS  # as many requests outstanding as redis-benchmark has clients
WORKLOAD = "index e2e on redis: set from Lua, another process"

CLIENT = """
local MEMBERS, N, INFLIGHT, LIMIT = %(members)d, %(count)d, %(inflight)d, %(limit)f
local signal, tick, random, format = stage.signal, function() return process.tick end, math.random, string.format
local filled, issued, got, t0, failed = 0, 0, 0, 0, 0
local sent, waits = {}, {}
local request

local function fill()  -- untimed: every member once, INFLIGHT outstanding
  if filled >= MEMBERS then return end
  filled = filled + 1
  signal("rank:f=filled", {["set:top"] = {[format("m:%%d", filled)] = {i = random(1 << 30)}}})
end
local done_fill = 0
stage.waitfor("filled", function()
  done_fill = done_fill + 1
  if done_fill == MEMBERS then
    log4cxx.info("BENCH fill", done_fill, tick() - t0)
    t0 = tick()
    for _ = 1, INFLIGHT do request() end
  else
    fill()
  end
end)

local late = false  -- past LIMIT: read the clock every 256 requests, not in every one
request = function()
  if issued >= N or late then return end
  if issued %% 256 == 0 and tick() - t0 > LIMIT then late = true return end
  issued = issued + 1
  local member = format("m:%%d", issued %% MEMBERS + 1)  -- distinct among the INFLIGHT outstanding
  sent[member] = tick()
  signal("rank:s=ranked", {["set:top"] = {[member] = {i = random(1 << 30)}}})
end
stage.waitfor("ranked", function(r)
  got = got + 1
  local now = tick()
  for member in pairs(r["set:top"]) do
    if member == "error" then failed = failed + 1
    else waits[#waits + 1] = now - sent[member] end
  end
  request()
  if got == issued then
    table.sort(waits)
    local function at(p) return waits[math.max(1, math.ceil(#waits * p))] or 0 end
    log4cxx.info("BENCH sets", got, now - t0, at(0.5) * 1000, at(0.99) * 1000, failed)
  end
end)
stage.addtask(500, function() t0 = tick(); for _ = 1, INFLIGHT do fill() end end)
"""


def _stagetx(port: int, members: int) -> tuple[float, float, float, float, float]:
    """(new members/s, sets/s, p50 ms, p99 ms, failed requests) of a real server on redis ``port``."""
    limit = budget.seconds(20, 6)
    values = {"members": members, "count": budget.count(1_000_000, 300_000), "inflight": INFLIGHT, "limit": limit}
    config = {
        "#startup": [["=lua+client"], ["=index+rank"]],
        "=lua+client": {"%package": ["[0]"], "=lua+client": "client"},
        "=index+rank": {"redis": f"redis://127.0.0.1:{port}/0", "prefix": "bench-index:"},
    }
    with server(config, {"client": CLIENT % values}) as peer:
        filled, fill_seconds = bench_line(peer, "fill", budget.seconds(600, 120))
        got, seconds, p50, p99, failed = bench_line(peer, "sets", limit + 30)
    return filled / fill_seconds, got / seconds, p50, p99, failed


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
        fill, sets, p50, p99, failed = _stagetx(port, members)
        after = redis_zset.zadd(port, members)
    baseline = (before + after) / 2
    n = f"{members:,}-member index on redis-server, {INFLIGHT} in flight"
    return [
        row(around, baseline, "req/s", note=f"mean of {before:,.0f} right before and {after:,.0f} right after"),
        row("index e2e on redis: new members from Lua", fill, "req/s", note=n),
        row(
            WORKLOAD,
            sets,
            "req/s",
            baseline_name=around,
            baseline=baseline,
            target="≥ 0.8 × baseline",
            note=f"{n}, rank in each reply; latency p50 {p50:.2f} ms, p99 {p99:.2f} ms; {failed:.0f} failed",
        ),
    ]
