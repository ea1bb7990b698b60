"""Signals between two processes of one server: one-way messages/s, and request/reply with
64 in flight (rate, p50, p99) and paced at 10,000 req/s (p99), also with a CPU hog on one core;
process CPU time per message on each side.

Stage ``a`` (group 0) sends to stage ``b`` (group 1) over the server's process link; only ``a``'s
clock is used.  A full queue (``false`` from ``signal``) makes ``a`` back off for 2 ms and retry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import budget
from bench.baselines.twisted_raw import ECHO_64, ONE_WAY
from bench.rows import row
from bench.workloads.latency import HISTOGRAM
from bench.workloads.server import bench_line, lua_stages, server

SENDER = """
local N, INFLIGHT, PACED, LIMIT, HOG_DELAY = %(count)d, 64, %(paced)d, %(limit)f, %(hog_delay)d
local signal, tick, min = stage.signal, function() return process.tick end, math.min
local sent, t0, c0 = 0, 0, 0
local cpu = os.clock  -- this process's CPU time (s)

%(histogram)s
-- one-way: chunks of sends; a 0 ms task between them lets the reactor write
local function pump()
  local n = min(2000, N - sent)
  for _ = 1, n do
    if not signal("b:ping", sent) then stage.addtask(2, pump) return end
    sent = sent + 1
  end
  if sent < N and tick() - t0 < LIMIT then stage.addtask(0, pump) else signal("b:stop=fin") end
end

-- request/reply, INFLIGHT outstanding
local issued, got, at, lat = 0, 0, {}, {}  -- lat: the waits' histogram
local function request()
  if issued >= N or tick() - t0 > LIMIT then return end
  issued = issued + 1
  at[issued] = tick()
  if not signal("b:echo=pong", issued) then issued = issued - 1; stage.addtask(2, request) end
end
stage.waitfor("pong", function(i)
  count_wait(lat, tick() - at[i])
  at[i] = nil
  got = got + 1
  if got == issued and (issued >= N or tick() - t0 > LIMIT) then signal("rr_done") else request() end
end)

-- paced: 10 requests every ms (10,000/s), latency only
local paced_got, paced_lat, paced_at, paced_issued, paced_round = 0, {}, {}, 0, 1
local paced
stage.waitfor("paced_pong", function(i)
  count_wait(paced_lat, tick() - paced_at[i])
  paced_got = paced_got + 1
  if paced_got == PACED then
    log4cxx.info(paced_round == 1 and "BENCH paced" or "BENCH paced_hog", paced_got, quantile_us(paced_lat, 0.5),
      quantile_us(paced_lat, 0.99))
    if paced_round == 1 then  -- again, while the bench's CPU hog runs (it starts on the line above)
      paced_round, paced_got, paced_lat, paced_at, paced_issued = 2, 0, {}, {}, 0
      stage.addtask(HOG_DELAY, paced)
    end
  end
end)
paced = function()
  for _ = 1, 10 do
    if paced_issued < PACED then
      paced_issued = paced_issued + 1
      paced_at[paced_issued] = tick()
      signal("b:echo=paced_pong", paced_issued)
    end
  end
  if paced_issued < PACED then return 1 end
end

stage.waitfor("rr_done", function()
  local seconds, used = tick() - t0, cpu() - c0
  log4cxx.info("BENCH rr", got, seconds, quantile_us(lat, 0.5), quantile_us(lat, 0.99), used)
  signal("b:rr_cpu")
  stage.addtask(200, paced)
end)
stage.waitfor("fin", function(n)
  log4cxx.info("BENCH oneway", n, tick() - t0, cpu() - c0)  -- CPU while idle does not count
  stage.addtask(200, function()
    t0, c0 = tick(), cpu()
    signal("b:rr_start")
    for _ = 1, INFLIGHT do request() end
  end)
end)
stage.addtask(1000, function() t0, c0 = tick(), cpu(); pump() end)
"""

RECEIVER = """
local got, c0, cpu = 0, nil, os.clock
stage.waitfor("ping", function() got = got + 1; c0 = c0 or cpu() end)
stage.waitfor("stop", function()
  log4cxx.info("BENCH oneway_cpu", got, cpu() - (c0 or cpu()))
  return got
end)
stage.waitfor("echo", function(i) return i end)
stage.waitfor("rr_start", function() c0 = cpu() end)
stage.waitfor("rr_cpu", function() log4cxx.info("BENCH rr_cpu", cpu() - c0) end)
"""


#: ms between the paced round and its repeat beside the CPU hog (the hog starts in between).
HOG_DELAY_MS = 1000
#: The hog: a busy loop that ends by itself after the given seconds (the bench also kills it).
HOG = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def cpu_hog(seconds: float) -> Iterator[None]:
    """A process spinning on the last core for at most ``seconds``, reaped on the way out."""
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(seconds)])
    try:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) > 1:
            os.sched_setaffinity(hog.pid, {cores[-1]})
        yield
    finally:
        hog.kill()
        hog.wait(10)


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: one-way msg/s; request/reply req/s, p50, p99 at 64 in flight; p99 at 10,000 req/s."""
    limit = budget.seconds(10, 4)
    values = {
        "count": budget.count(1_000_000, 200_000),
        "paced": budget.count(30_000, 10_000),
        "limit": limit,
        "hog_delay": HOG_DELAY_MS,
        "histogram": HISTOGRAM,
    }
    with server(lua_stages("a", "b"), {"a": SENDER % values, "b": RECEIVER}) as peer:
        received, receive_cpu = bench_line(peer, "oneway_cpu", limit + 40)  # logged before "oneway"
        sent, seconds, send_cpu = bench_line(peer, "oneway", 10)
        got, rr_seconds, p50, p99, client_cpu = bench_line(peer, "rr", limit + 20)
        (server_cpu,) = bench_line(peer, "rr_cpu", 10)
        _, paced_p50, paced_p99 = bench_line(peer, "paced", limit + 20)
        with cpu_hog(limit + 30):
            _, _, hog_p99 = bench_line(peer, "paced_hog", limit + 20)
    return [
        row("signal two processes one-way", sent / seconds, "msg/s", baseline_name=ONE_WAY, target="≥ 0.5 × baseline"),
        row(
            "request/reply two processes, 64 in flight",
            got / rr_seconds,
            "req/s",
            baseline_name=ECHO_64,
            target="≥ 0.6 × baseline",
        ),
        row("signal two processes one-way, sender CPU", send_cpu / sent * 1e6, "µs/msg"),
        row("signal two processes one-way, receiver CPU", receive_cpu / received * 1e6, "µs/msg"),
        row("request/reply 64 in flight, requester CPU", client_cpu / got * 1e6, "µs/req"),
        row("request/reply 64 in flight, replier CPU", server_cpu / got * 1e6, "µs/req"),
        row("request/reply two processes, 64 in flight p50", p50, "µs", baseline_name=f"{ECHO_64} p50"),
        row("request/reply two processes, 64 in flight p99", p99, "µs", baseline_name=f"{ECHO_64} p99"),
        row("request/reply at 10,000 req/s p50", paced_p50, "µs"),
        row("request/reply at 10,000 req/s p99", paced_p99, "µs", target="≤ 1000"),
        row("request/reply at 10,000 req/s p99, CPU hog on one core", hog_p99, "µs", target="≤ 1000"),
    ]
