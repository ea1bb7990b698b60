"""Two servers over loopback: one-way messages/s from a stage of one to a stage of the other,
request/reply across them with 64 in flight (rate, p50, p99), and the time a server needs to find
a peer by multicast discovery after it starts.

Server B (stage ``b``) listens on a cluster port; server A (stage ``a``) finds B by
``"udp://GROUP:PORT"`` discovery on loopback (or is told its address where multicast does not
work), pumps ``+b:ping`` (batched frames through both gateways), then asks ``b:stop=fin`` for the
count, then keeps 64 ``+b:echo=pong`` requests in flight. The discovery figure is compared with
the announce interval (target: under two intervals after the stage started).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from bench import budget
from bench.baselines.twisted_raw import ECHO_64, ONE_WAY
from bench.rows import row, skip
from bench.workloads.latency import HISTOGRAM
from bench.workloads.server import bench_line, lua_stages, server
from stagetx.cluster.discovery import ANNOUNCE_INTERVAL

SECRET = "bench-cluster"

SENDER = """
local N, RR, LIMIT = %(count)d, %(rr_count)d, %(limit)f
local signal, tick, min = stage.signal, function() return process.tick end, math.min
local sent, t0, c0, cpu = 0, 0, 0, os.clock  -- os.clock: this process's CPU time (s)
local function pump()
  local n = min(2000, N - sent)
  for _ = 1, n do
    if not signal("+b:ping", sent) then stage.addtask(2, pump) return end
    sent = sent + 1
  end
  if sent < N and tick() - t0 < LIMIT then stage.addtask(0, pump) else signal("b:stop=fin") end
end
%(histogram)s
local issued, got, at, lat = 0, 0, {}, {}  -- lat: the waits' histogram
local function request()
  if issued >= RR or tick() - t0 > LIMIT then return end
  issued = issued + 1
  at[issued] = tick()
  if not signal("+b:echo=pong", issued) then issued = issued - 1; stage.addtask(2, request) end
end
stage.waitfor("pong", function(i)
  count_wait(lat, tick() - at[i])
  at[i] = nil
  got = got + 1
  if got == issued and (issued >= RR or tick() - t0 > LIMIT) then
    log4cxx.info("BENCH rr", got, tick() - t0, quantile_us(lat, 0.5), quantile_us(lat, 0.99))
  else
    request()
  end
end)
stage.waitfor("fin", function(n)
  log4cxx.info("BENCH oneway", n, tick() - t0, cpu() - c0)
  stage.addtask(200, function()
    t0 = tick()
    for _ = 1, 64 do request() end
  end)
end)
local started = tick()
stage.addtask(5, function()
  if not signal("+b:hello") then return 5 end
  log4cxx.info("BENCH found", tick() - started)
  stage.addtask(200, function() t0, c0 = tick(), cpu(); pump() end)
end)
"""

RECEIVER = """
local got, c0, cpu = 0, nil, os.clock
stage.waitfor("hello", function() end)
stage.waitfor("ping", function() got = got + 1; c0 = c0 or cpu() end)
stage.waitfor("stop", function()
  log4cxx.info("BENCH oneway_cpu", got, cpu() - (c0 or cpu()))
  return got
end)
stage.waitfor("echo", function(i) return i end)
"""


def _port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(stage: str, cluster: list[Any]) -> dict[str, Any]:
    return {**lua_stages(stage), "#cluster": cluster, "#secret": SECRET}


def _multicast_group() -> str | None:
    """A ``udp://GROUP:PORT`` entry if multicast works on loopback here (a datagram sent to the
    group comes back), else None."""
    group, port = f"239.255.73.{int(time.time()) % 200 + 20}", _port(socket.SOCK_DGRAM)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("", port))
            loopback = socket.inet_aton("127.0.0.1")
            probe.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + loopback)
            probe.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, loopback)
            probe.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            probe.settimeout(2.0)
            probe.sendto(b"probe", (group, port))
            if probe.recv(16) != b"probe":
                return None
    except OSError:
        return None
    return f"udp://{group}:{port}"


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: one-way msg/s between two servers (vs raw Twisted one-way) with process CPU per
    message on each side; request/reply req/s, p50, p99 at 64 in flight (vs raw Twisted echo);
    discovery time (ms).

    One pair of servers serves every row: where multicast works on loopback, server A finds B by
    discovery alone (the time from A's stage start to its first message reaching B is the
    discovery row); elsewhere A names B as its peer and the discovery row is a skip row.
    """
    limit = budget.seconds(10, 4)
    # a quick run: 100,000 one-way messages and 40,000 requests (about a second each here)
    values = {
        "count": budget.count(1_000_000, 100_000),
        "rr_count": budget.count(1_000_000, 40_000),
        "limit": limit,
        "histogram": HISTOGRAM,
    }
    udp = _multicast_group()
    port_b = _port()
    with server(_config("b", [port_b, *([udp] if udp else [])]), {"b": RECEIVER}) as b:
        a_config = _config("a", [_port(), udp or f"127.0.0.1:{port_b}"])
        with server(a_config, {"a": SENDER % values}) as a:
            (found,) = bench_line(a, "found", 30)
            got, seconds, send_cpu = bench_line(a, "oneway", limit + 60)
            received, receive_cpu = bench_line(b, "oneway_cpu", 10)
            answered, rr_seconds, p50, p99 = bench_line(a, "rr", limit + 60)
    rr = "request/reply two servers, 64 in flight"
    discovery = "cluster discovery after start"
    return [
        row(
            "signal two servers one-way (loopback TCP)",
            got / seconds,
            "msg/s",
            baseline_name=ONE_WAY,
            target="≥ 0.4 × baseline",
        ),
        row("signal two servers one-way, sender CPU", send_cpu / got * 1e6, "µs/msg"),
        row("signal two servers one-way, receiver CPU", receive_cpu / received * 1e6, "µs/msg"),
        row(rr, answered / rr_seconds, "req/s", baseline_name=ECHO_64),
        row(f"{rr} p50", p50, "µs", baseline_name=f"{ECHO_64} p50"),
        row(f"{rr} p99", p99, "µs", baseline_name=f"{ECHO_64} p99"),
        row(
            discovery,
            found * 1000,
            "ms",
            target=f"≤ {2 * ANNOUNCE_INTERVAL * 1000:.0f}",
            note=f"announce interval {ANNOUNCE_INTERVAL * 1000:.0f} ms",
        )
        if udp
        else skip(discovery, "multicast on loopback does not work here", "ms"),
    ]
