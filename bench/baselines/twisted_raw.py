"""Raw Twisted over loopback, two processes: the physical limit for a Twisted framework here.

One-way Int32StringReceiver frames (plain, and with msgpack per message) and echo with 64 or 1
request in flight on one connection, plus 1,000 connections with one in flight each.
"""

from __future__ import annotations

from typing import Any

from bench import budget
from bench.procs import spawn_python
from bench.rows import row

PEERS = "bench.baselines.peers"


def one_way(count: int, limit: float, packed: bool) -> dict[str, Any]:
    """Frames/s from a source process to a sink process; ``packed`` adds msgpack per message."""
    flags = ["--msgpack"] if packed else []
    with spawn_python(PEERS, "sink", "--count", count, "--limit", limit, *flags) as sink:
        port = sink.read_json(15)["port"]
        with spawn_python(PEERS, "source", "--port", port, "--count", count, "--limit", limit, *flags):
            result = sink.read_json(limit + 15)
    return result


def echo(count: int, limit: float, inflight: int, conns: int = 1) -> dict[str, Any]:
    """Round trips/s and latency from a client process to an echo process."""
    with spawn_python(PEERS, "echo", "--limit", limit + 15) as server:
        port = server.read_json(15)["port"]
        args = ("--count", count, "--inflight", inflight, "--conns", conns, "--limit", limit)
        with spawn_python(PEERS, "client", "--port", port, *args) as client:
            return client.read_json(limit + 15)


def _rate(done: int, seconds: float) -> float | None:
    return done / seconds if seconds > 0 and done > 1 else None


ONE_WAY = "raw Twisted one-way 100 B frames"
ONE_WAY_MSGPACK = "raw Twisted one-way 100 B frames + msgpack"
ECHO_64 = "raw Twisted echo 64 in flight"
ECHO_1 = "raw Twisted echo 1 in flight"
ECHO_1000 = "raw Twisted echo 1,000 connections"


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: one-way frames/s (plain, msgpack), echo req/s with p50/p99 at 64 and 1 in flight."""
    limit = budget.seconds(20, 8)
    rows = []
    for label, packed in ((ONE_WAY, False), (ONE_WAY_MSGPACK, True)):
        r = one_way(budget.count(2_000_000, 400_000), limit, packed)
        rows.append(row(label, _rate(r["frames"], r["seconds"]), "frames/s"))
    shapes = (
        (ECHO_64, 64, 1, 1_000_000, 200_000),
        (ECHO_1, 1, 1, 40_000, 10_000),
        (ECHO_1000, 1, 1000, 400_000, 50_000),  # quick: 50 round trips per connection
    )
    for label, inflight, conns, full, small in shapes:
        r = echo(budget.count(full, small), limit, inflight, conns)
        rows.append(row(label, _rate(r["replies"], r["seconds"]), "req/s"))
        rows.append(row(f"{label} p50", r["p50_us"], "µs"))
        rows.append(row(f"{label} p99", r["p99_us"], "µs"))
    return rows
