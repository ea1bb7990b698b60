"""redis-server sorted sets through ``redis-benchmark``: the bar for the index stage.

Runs only when ``redis-server`` and ``redis-benchmark`` are on PATH (``apt-get install
redis-server``); otherwise one skip row says so.  The server listens on 127.0.0.1 only, saves
nothing, and is reaped when the benchmark ends.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import budget
from bench.procs import cpu_seconds, spawn
from bench.rows import row, skip

KEY = "bench:zset"
COMMANDS = {
    "ZADD": ["ZADD", KEY, "__rand_int__", "m:__rand_int__"],
    "ZREVRANK": ["ZREVRANK", KEY, "m:__rand_int__"],
    "ZREVRANGE": ["ZREVRANGE", KEY, "0", "9", "WITHSCORES"],
}
CLIENTS = 50
PIPELINE = 16


def label(command: str, pipelined: bool) -> str:
    """The workload name of one redis figure (other benchmarks name it as their baseline)."""
    return f"redis {command} {CLIENTS} clients" + (f" pipelined {PIPELINE}" if pipelined else "")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, timeout: float) -> None:
    """Block until the server answers PING on ``port``, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis-server on port {port} not ready in {timeout} s")
        time.sleep(0.05)


def bench(port: int, command: str, requests: int, keyspace: int, pipeline: int, limit: float) -> float:
    """Requests/s that ``redis-benchmark`` reports for one command."""
    argv = [
        "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-c",
        str(CLIENTS),
        "-n",
        str(requests),
        "-r",
        str(keyspace),
        "-P",
        str(pipeline),
        "--csv",
        *COMMANDS[command],
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=True).stdout
    lines = [r for r in csv.reader(out.splitlines()) if len(r) > 1]
    return float(lines[-1][1])


def missing() -> str | None:
    """Why redis cannot run here (programs missing from PATH), or None."""
    gone = [exe for exe in ("redis-server", "redis-benchmark") if shutil.which(exe) is None]
    return f"{' and '.join(gone)} not on PATH (apt-get install redis-server)" if gone else None


def requests() -> int:
    """Requests per ``redis-benchmark`` run (pipelined runs: twice as many)."""
    return budget.count(200_000, 30_000)


def time_limit() -> float:
    """Seconds one ``redis-benchmark`` run may take."""
    return budget.seconds(120, 30)


def zadd(port: int, members: int) -> float:
    """ZADD at 50 clients, not pipelined, on a filled key space: the rate others compare with."""
    return bench(port, "ZADD", requests(), members, 1, time_limit())


@contextmanager
def filled_server(members: int) -> Iterator[tuple[int, float]]:
    """A local redis-server whose sorted set holds a ``members``-member key space: ``(port, the
    pipelined fill's rate)``. Saves nothing; reaped on exit."""
    port = free_port()
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
    ]
    with spawn(argv):
        wait_ready(port, 10)
        yield port, bench(port, "ZADD", 2 * members, members, PIPELINE, time_limit())


#: Fills the sorted set inside redis-server: member%07d with a random score, KEYS[1] members.
_FILL = (
    "for i = 1, tonumber(ARGV[1]) do "
    "redis.call('ZADD', KEYS[1], math.random(0, 1073741823), string.format('member%07d', i - 1)) end "
    "return redis.call('ZCARD', KEYS[1])"
)
_LOADED = re.compile(rb"DB loaded from disk: ([0-9.]+) seconds")


def _cli(port: int, *command: str, limit: float) -> str:
    argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=True).stdout.strip()


def rdb_load(members: int, directory: str) -> tuple[float, float]:
    """``(seconds, CPU seconds)`` redis-server takes to load a ``members``-member sorted set from
    its RDB file at start: the "DB loaded from disk" figure it logs (wall clock), and the CPU time
    its process has used once it answers (the load and a start of a few ms): the start-up bar for
    the index stage. On a shared machine the CPU time is what compares with another process's.

    Fills the set in the server (one Lua loop), ``SAVE``s it to ``directory``, and starts a second
    server on the file. Both listen on 127.0.0.1 only and are reaped.
    """
    limit = time_limit()
    argv = ["redis-server", "--bind", "127.0.0.1", "--dir", directory, "--dbfilename", "bench.rdb"]
    argv += ["--save", "", "--appendonly", "no"]
    port = free_port()
    with spawn([*argv, "--port", str(port), "--loglevel", "warning"]):
        wait_ready(port, 10)
        filled = _cli(port, "EVAL", _FILL, "1", KEY, str(members), limit=limit)
        if filled != str(members):
            raise RuntimeError(f"redis fill gave {filled!r} members, not {members}")
        _cli(port, "SAVE", limit=limit)
    port = free_port()
    log = os.path.join(directory, "redis.log")
    with spawn([*argv, "--port", str(port), "--loglevel", "notice", "--logfile", log]) as loading:
        wait_ready(port, limit)  # redis answers PING with -LOADING until the load is done
        cpu = cpu_seconds(loading.proc.pid)
        with open(log, "rb") as file:
            found = _LOADED.search(file.read())
    if found is None:
        raise RuntimeError(f"redis-server logged no load time in {log}")
    return float(found.group(1)), cpu


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: ZADD, ZREVRANK and ZREVRANGE (top 10) at 50 clients, plain and pipelined 16."""
    reason = missing()
    if reason is not None:
        return [skip("redis sorted sets", reason)]
    members = budget.count(1_000_000, 100_000)
    note = f"{members:,}-member key space, filled by {2 * members:,} random ZADDs; the rows below use that set"
    rows = []
    with filled_server(members) as (port, fill):
        rows.append(row(label("ZADD", True), fill, "req/s", note=note))
        rows.append(row(label("ZADD", False), zadd(port, members), "req/s"))
        for command in ("ZREVRANK", "ZREVRANGE"):
            for pipeline in (1, PIPELINE):
                count = requests() * (2 if pipeline > 1 else 1)
                rows.append(
                    row(
                        label(command, pipeline > 1),
                        bench(port, command, count, members, pipeline, time_limit()),
                        "req/s",
                    )
                )
    return rows
