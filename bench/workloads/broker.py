"""broker echo through a Lua handler with 1,000 client connections, and memory per idle connection.

A real server (``twistd -n stage``) runs one Lua stage whose ``broker.ready`` packet listener
returns each frame from its receive function. The client is the raw baseline's client
(``bench.baselines.peers``) with little-endian lengths, as ``packet`` framing wants, run as
``python -m bench.workloads.broker client …``; ``hold`` opens idle connections and keeps them.
Memory per idle connection is the stage process's RSS growth over those connections.
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

from twisted.internet import protocol, reactor

from bench import budget
from bench.baselines.peers import Client, ClientRun, emit, stop
from bench.baselines.twisted_raw import ECHO_1000
from bench.procs import spawn_python
from bench.rows import row
from bench.workloads.server import bench_line, server

ME = "bench.workloads.broker"
ECHO = "broker echo via Lua, 1,000 connections"
IDLE = "broker memory per idle connection"
CONNS = 1000

SCRIPT = """
broker.ready("tcp://127.0.0.1:%(port)d?packet=64k,64k", function(socket, addr)
    return function(s, data) return data end
end)
log4cxx.info("BENCH ready", process.id)
"""


class LittleEndianClient(Client):
    """The baseline client speaking the broker's ``packet`` framing (4-byte little-endian length)."""

    structFormat = "<I"


class Holder(protocol.Protocol):
    """An idle connection; counts itself in when connected."""

    def __init__(self, run: dict[str, int]) -> None:
        self.run = run

    def connectionMade(self) -> None:
        self.run["connected"] += 1
        if self.run["connected"] == self.run["conns"]:
            emit(connected=self.run["connected"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _rate(result: dict[str, Any]) -> float | None:
    done, seconds = result.get("replies", 0), result.get("seconds", 0.0)
    return done / seconds if seconds > 0 and done > 1 else None


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: echo req/s (vs raw Twisted echo at 1,000 connections) with p50/p99, bytes per idle connection."""
    limit = budget.seconds(20, 8)
    count = budget.count(400_000, 50_000)  # quick: 50 per connection, as its raw baseline
    conns = min(CONNS, max(2, count // 4))
    port = _free_port()
    config = {"#startup": [["=lua+echo"]], "=lua+echo": {"%package": ["[0]"], "=lua+echo": "echo"}}
    with server(config, {"echo": SCRIPT % {"port": port}}) as srv:
        (pid,) = bench_line(srv, "ready", 30)
        before = _rss(int(pid))
        with spawn_python(ME, "hold", "--port", port, "--conns", conns, "--limit", limit + 30) as holder:
            holder.read_json(limit + 30)
            time.sleep(0.5)  # let the server finish accepting and building the sockets
            per_conn = (_rss(int(pid)) - before) / conns
        args = ("--port", port, "--count", count, "--conns", conns, "--limit", limit)
        with spawn_python(ME, "client", *args) as client:
            echo = client.read_json(limit + 30)
    target = "≥ 0.5 × baseline" if conns == CONNS else ""
    note = "" if conns == CONNS else f"{conns} connections (scaled run)"
    return [
        row(ECHO, _rate(echo), "req/s", baseline_name=ECHO_1000, target=target, note=note),
        row(f"{ECHO} p50", echo.get("p50_us"), "µs"),
        row(f"{ECHO} p99", echo.get("p99_us"), "µs"),
        row(IDLE, max(per_conn, 0.0), "B", target="≤ 10240", note=note),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=ME)
    p.add_argument("role", choices=["client", "hold"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--conns", type=int, default=CONNS)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--limit", type=float, default=30.0)
    a = p.parse_args(argv)
    if a.role == "client":
        client_run = ClientRun(a.count, a.conns, a.size)
        factory: protocol.ClientFactory = protocol.ClientFactory.forProtocol(lambda: LittleEndianClient(client_run, 1))
        reactor.callLater(a.limit, client_run.report)
    else:
        held = {"connected": 0, "conns": a.conns}
        factory = protocol.ClientFactory.forProtocol(lambda: Holder(held))
        reactor.callLater(a.limit, stop)
    for _ in range(a.conns):
        reactor.connectTCP("127.0.0.1", a.port, factory)
    reactor.run()


if __name__ == "__main__":
    main()
