"""The index end to end: a Lua stage in process 1 sends ``set`` requests with ``=reply`` to
``=index+rank`` in process 2 (a real ``twistd`` server), ``INFLIGHT`` outstanding, beside
redis-server ``ZADD`` with 50 clients (``bench.baselines.redis_zset``) in the same run: measured
right before this workload's server starts and right after it stops, on a key space of the same
size, and the ratio taken against the mean of the two (this machine's speed drifts by tens of
percent within minutes; a baseline taken at the start of the run compared unlike moments).

Like the redis figure, the timed sets go to random members of a key space filled beforehand
(untimed fill: every member set once, in order). Every set is durable (log ``write()`` before
its reply) and replies the member's new rank; the Lua stage counts replies per second.
"""

from __future__ import annotations

from typing import Any

import attrs

from bench import budget
from bench.baselines import redis_zset
from bench.baselines.redis_zset import CLIENTS
from bench.procs import cpu_seconds, descendants
from bench.rows import row, skip
from bench.workloads.latency import HISTOGRAM
from bench.workloads.server import bench_line, server

INFLIGHT = CLIENTS  # as many requests outstanding as redis-benchmark has clients

CLIENT = """
local MEMBERS, N, INFLIGHT, LIMIT, TIMED = %(members)d, %(count)d, %(inflight)d, %(limit)f, %(timed)s
local signal, tick, random, format = stage.signal, function() return process.tick end, math.random, string.format
local filled, issued, got, t0, c0, failed = 0, 0, 0, 0, 0, 0
local sent, waited = {}, {}  -- TIMED: when each outstanding member was sent; the waits' histogram
%(histogram)s
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
    t0, c0 = tick(), os.clock()
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
  local member
  if TIMED then  -- a member none of the others in flight has, so its reply's wait is known
    member = format("m:%%d", issued %% MEMBERS + 1)
    sent[member] = tick()
  else
    member = format("m:%%d", random(MEMBERS))
  end
  signal("rank:s=ranked", {["set:top"] = {[member] = {i = random(1 << 30)}}})
end
stage.waitfor("ranked", function(r)
  got = got + 1
  if TIMED then
    local now = tick()
    for member in pairs(r["set:top"]) do
      if member == "error" then failed = failed + 1
      else
        count_wait(waited, now - sent[member])
        sent[member] = nil
      end
    end
  end
  request()
  if got == issued then
    local seconds, cpu = tick() - t0, os.clock() - c0  -- before the percentiles are read
    local p50, p99 = quantile_us(waited, 0.5) / 1000, quantile_us(waited, 0.99) / 1000
    log4cxx.info("BENCH sets", got, seconds, p50, p99, failed, cpu)
  end
end)
stage.addtask(500, function() t0 = tick(); for _ = 1, INFLIGHT do fill() end end)
"""


@attrs.frozen
class Figures:
    """What one run of the client measured; latencies only when timed, else 0."""

    fill: float  # new members/s
    sets: float  # sets/s
    p50: float  # ms
    p99: float  # ms
    failed: float  # requests answered with an error
    cpu: dict[str, float]  # µs of CPU per set: the Lua process, the index process, ``watch``'s


def client(index: Any, members: int, timed: bool, watch: dict[str, int] | None = None) -> Figures:
    """The Lua client above against a real server whose ``=index+rank`` is ``index``; the CPU per
    timed set of the Lua process (its own clock), of the rest of the server (the index process)
    and of ``watch`` (name → pid, e.g. redis-server), over the same seconds."""
    limit = budget.seconds(20, 6)
    values = {
        "members": members,
        "count": budget.count(1_000_000, 300_000),
        "inflight": INFLIGHT,
        "limit": limit,
        "timed": "true" if timed else "false",
        "histogram": HISTOGRAM,
    }
    config = {
        "#startup": [["=lua+client"], ["=index+rank"]],
        "=lua+client": {"%package": ["[0]"], "=lua+client": "client"},
        "=index+rank": index,
    }
    with server(config, {"client": CLIENT % values}) as peer:
        filled, fill_seconds = bench_line(peer, "fill", budget.seconds(600, 120))
        pids = {"server": [peer.proc.pid, *descendants(peer.proc.pid)]} | {k: [v] for k, v in (watch or {}).items()}
        before = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
        got, seconds, p50, p99, failed, lua_cpu = bench_line(peer, "sets", limit + 30)
        used = {name: sum(map(cpu_seconds, group)) - before[name] for name, group in pids.items()}
    server_cpu = used.pop("server")
    cpu = {"Lua process": lua_cpu, "index process": server_cpu - lua_cpu, **used}
    return Figures(filled / fill_seconds, got / seconds, p50, p99, failed, {k: v / got * 1e6 for k, v in cpu.items()})


def cpu_note(figures: Figures) -> str:
    """``CPU per set: Lua process 15.1 µs, …`` for a row's note."""
    return "CPU per set: " + ", ".join(f"{name} {us:.1f} µs" for name, us in figures.cpu.items())


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: the redis ZADD rate measured around this workload (or why not), the fill rate (new
    members) and the timed set rate, both end to end from Lua."""
    members = budget.count(1_000_000, 100_000)
    around = f"{redis_zset.label('ZADD', False)}, around index e2e"
    reason = redis_zset.missing()
    if reason is not None:
        figures = client("scores", members, timed=False)
        fill, sets = figures.fill, figures.sets
        baseline = None
        first = skip(around, reason)
    else:
        with redis_zset.filled_server(members) as (port, _):
            before = redis_zset.zadd(port, members)
            figures = client("scores", members, timed=False)
            fill, sets = figures.fill, figures.sets
            after = redis_zset.zadd(port, members)
        baseline = (before + after) / 2
        first = row(around, baseline, "req/s", note=f"mean of {before:,.0f} right before and {after:,.0f} right after")
    n = f"{members:,}-member index, {INFLIGHT} in flight"
    return [
        first,
        row("index e2e: new members from Lua", fill, "req/s", note=n),
        row(
            "index e2e: set from Lua, another process",
            sets,
            "req/s",
            baseline_name=around,
            baseline=baseline,
            target="≥ 1.0 × baseline",
            note=f"{n}, random members, durable, rank in each reply; {cpu_note(figures)}",
        ),
    ]
