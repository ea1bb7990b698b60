"""Load mode: N simulated players against the default application for a bounded time.

Each player connects, logs in (retrying a refused login a few times), joins one of a few chat
channels, then loops — post a score, read the top 10, read its rank, say a line — one request at
a time until the time is up or it made ``max_requests``. Scores go to the application's load-test
board (``board``, not the real ranking), and each player removes its own entry at the end.
Latencies are kept per message; ``chat`` is the time from a ``say`` until the speaker's own line
is pushed back through the route stage.
A progress line shows the request rate while it runs; the summary gives throughput and
p50/p90/p99 per message.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import attrs

from stagetx.client.connection import Connection
from stagetx.client.protocol import Command, Document

OPS = ("login", "score", "top", "rank", "say", "chat")
LOGIN_RETRIES = 20
LOGIN_BACKOFF = 0.1


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p ≤ 100) of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


@attrs.define
class Stats:
    """Latencies (seconds) per message and error counts, shared by every player of a run."""

    latencies: dict[str, list[float]] = attrs.field(factory=lambda: {op: [] for op in OPS})
    errors: dict[str, int] = attrs.field(factory=lambda: {op: 0 for op in OPS})
    connected: int = 0
    failed_players: int = 0

    def record(self, op: str, seconds: float, ok: bool = True) -> None:
        if ok:
            self.latencies[op].append(seconds)
        else:
            self.errors[op] += 1

    @property
    def requests(self) -> int:
        return sum(len(v) for op, v in self.latencies.items() if op != "chat") + sum(
            n for op, n in self.errors.items() if op != "chat"
        )

    def summary(self, players: int, elapsed: float) -> dict[str, Any]:
        """The run's result as plain data (what ``--json`` prints)."""
        ops = {}
        for op in OPS:
            values = sorted(self.latencies[op])
            ops[op] = {
                "count": len(values),
                "errors": self.errors[op],
                "rate": len(values) / elapsed if elapsed > 0 else 0.0,
                **{f"p{p}_ms": percentile(values, p) * 1000 for p in (50, 90, 99)},
                "max_ms": (values[-1] if values else 0.0) * 1000,
            }
        return {
            "players": players,
            "connected": self.connected,
            "failed_players": self.failed_players,
            "seconds": elapsed,
            "requests": self.requests,
            "throughput": self.requests / elapsed if elapsed > 0 else 0.0,
            "errors": sum(n for op, n in self.errors.items()),
            "ops": ops,
        }


def format_summary(summary: dict[str, Any]) -> list[str]:
    """The summary as a few readable lines: totals, then one row per message."""
    lines = [
        f"load: {summary['players']} players ({summary['connected']} connected), "
        f"{summary['seconds']:.1f} s, {summary['requests']} requests, "
        f"{summary['throughput']:.1f} req/s, {summary['errors']} errors"
        + (
            f", {summary['failed_players']} players failed (could not connect, lost their connection or timed out)"
            if summary["failed_players"]
            else ""
        ),
        f"{'message':<8}{'count':>9}{'errors':>8}{'per s':>10}"
        + "".join(f"{title:>9}" for title in ("p50 ms", "p90 ms", "p99 ms", "max ms")),
    ]
    for op, row in summary["ops"].items():
        lines.append(
            f"{op:<8}{row['count']:>9}{row['errors']:>8}{row['rate']:>10.1f}"
            f"{row['p50_ms']:>9.1f}{row['p90_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['max_ms']:>9.1f}"
        )
    return lines


class Progress:
    """One updating line on a terminal, plain lines (every ``plain_every`` s) otherwise."""

    def __init__(self, out: TextIO, stats: Stats, players: int, seconds: float, plain_every: float = 1.0) -> None:
        self.out = out
        self.stats = stats
        self.players = players
        self.seconds = seconds
        self.tty = out.isatty()
        self.plain_every = plain_every
        self._last = (time.monotonic(), 0)
        self._printed_at = 0.0

    def show(self, elapsed: float) -> None:
        now, requests = time.monotonic(), self.stats.requests
        rate = (requests - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, requests)
        errors = sum(self.stats.errors.values())
        line = (
            f"{elapsed:5.1f}/{self.seconds:.0f} s  players {self.stats.connected}/{self.players}  "
            f"requests {requests}  {rate:.0f}/s  errors {errors}"
        )
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
        elif elapsed - self._printed_at >= self.plain_every:
            self._printed_at = elapsed
            self.out.write(line + "\n")
            self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


@attrs.frozen
class LoadOptions:
    host: str = "127.0.0.1"
    port: int = 8081
    url: str | None = None  # a ws:// or wss:// address instead of host and port
    players: int = 10
    seconds: float = 10.0
    max_requests: int = 100_000
    channels: int = 4
    think_ms: float = 0.0
    prefix: str = "load"
    timeout: float = 10.0
    board: str = "load"  # the application's load-test board (its ``load_board``)


class Player:
    """One simulated player: a connection and its loop of requests."""

    def __init__(self, number: int, options: LoadOptions, stats: Stats, deadline: float) -> None:
        self.name = f"{options.prefix}-{number}"
        self.channel = f"{options.prefix}-{number % max(1, options.channels)}"
        self.options = options
        self.stats = stats
        self.deadline = deadline
        self.rng = random.Random(number)
        self._said: dict[str, float] = {}

    async def run(self) -> None:
        try:
            connection = await Connection.open(
                self.options.host, self.options.port, self.options.timeout, on_push=self._push, url=self.options.url
            )
        except (TimeoutError, OSError):
            self.stats.failed_players += 1
            return
        self.stats.connected += 1
        try:
            if await self._login(connection) and await self._call(connection, "join", {"channel": self.channel}):
                try:
                    await self._play(connection)
                finally:  # the player's entry leaves the board with it, even after an error
                    await self._call(connection, "forget", {"board": self.options.board})
        except (TimeoutError, ConnectionError):
            self.stats.failed_players += 1
        finally:
            await connection.close()

    async def _login(self, connection: Connection) -> bool:
        for _ in range(LOGIN_RETRIES):
            if time.monotonic() >= self.deadline:
                return False
            reply = await self._timed(connection, "login", {"user": self.name})
            if reply.get("ok"):
                return True
            await asyncio.sleep(LOGIN_BACKOFF)
        return False

    async def _play(self, connection: Connection) -> None:
        board = self.options.board
        steps: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
            ("score", lambda i: {"points": self.rng.randrange(1_000_000), "board": board}),
            ("top", lambda i: {"n": 10, "board": board}),
            ("rank", lambda i: {"board": board}),
            ("say", lambda i: {"channel": self.channel, "text": f"{self.name} #{i}"}),
        ]
        for i in range(self.options.max_requests):
            if time.monotonic() >= self.deadline:
                return
            op, make = steps[i % len(steps)]
            fields = make(i)
            if op == "say":
                self._said[fields["text"]] = time.monotonic()
            await self._timed(connection, op, fields)
            if self.options.think_ms > 0:
                await asyncio.sleep(self.options.think_ms / 1000.0)

    async def _call(self, connection: Connection, op: str, fields: dict[str, Any]) -> bool:
        return bool((await connection.request(Command(op, fields), self.options.timeout)).get("ok"))

    async def _timed(self, connection: Connection, op: str, fields: dict[str, Any]) -> Document:
        """The reply to one request, its latency recorded; a request that timed out is an error
        of its message (then the player stops, as a failed player)."""
        started = time.monotonic()
        try:
            reply = await connection.request(Command(op, fields), self.options.timeout)
        except TimeoutError:
            self.stats.record(op, time.monotonic() - started, False)
            raise
        self.stats.record(op, time.monotonic() - started, bool(reply.get("ok")))
        return reply

    def _push(self, push: Document) -> None:
        if push.get("from") == self.name:
            sent = self._said.pop(str(push.get("text")), None)
            if sent is not None:
                self.stats.record("chat", time.monotonic() - sent)


async def run_load(options: LoadOptions, out: TextIO = sys.stderr, tick: float = 0.25) -> dict[str, Any]:
    """Run ``options.players`` players for ``options.seconds``; the summary (``Stats.summary``)."""
    stats = Stats()
    started = time.monotonic()
    deadline = started + options.seconds
    progress = Progress(out, stats, options.players, options.seconds)
    players = [asyncio.create_task(Player(n, options, stats, deadline).run()) for n in range(options.players)]
    everyone = asyncio.gather(*players)
    # a request started just before the deadline may take up to its timeout
    hard_stop = deadline + options.timeout + 1.0
    while not everyone.done() and time.monotonic() < hard_stop:
        await asyncio.wait([everyone], timeout=tick)
        progress.show(min(time.monotonic() - started, options.seconds))
    if not everyone.done():
        everyone.cancel()
    await asyncio.gather(everyone, return_exceptions=True)
    progress.done()
    return stats.summary(options.players, time.monotonic() - started)


def print_summary(summary: dict[str, Any], out: TextIO, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(summary) + "\n")
    else:
        out.write("\n".join(format_summary(summary)) + "\n")
