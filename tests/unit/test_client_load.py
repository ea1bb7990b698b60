"""The load mode's arithmetic and output: percentiles, the summary, the progress line (no socket;
the connection and the load loop against a loopback server are tests/integration/test_client_connection.py)."""

from __future__ import annotations

import io

from stagetx.client.load import Progress, Stats, format_summary, percentile


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_the_summary_counts_requests_but_not_chat_deliveries() -> None:
    stats = Stats()
    stats.connected = 2
    for ms in (1, 2, 3, 4):
        stats.record("score", ms / 1000)
    stats.record("score", 0.5, ok=False)
    stats.record("chat", 0.010)
    summary = stats.summary(players=2, elapsed=2.0)
    assert (summary["requests"], summary["errors"], summary["throughput"]) == (5, 1, 2.5)
    assert summary["ops"]["score"] == {
        "count": 4,
        "errors": 1,
        "rate": 2.0,
        "p50_ms": 2.0,
        "p90_ms": 4.0,
        "p99_ms": 4.0,
        "max_ms": 4.0,
    }
    lines = format_summary(summary)
    assert lines[0] == "load: 2 players (2 connected), 2.0 s, 5 requests, 2.5 req/s, 1 errors"
    assert lines[2].split() == ["login", "0", "0", "0.0", "0.0", "0.0", "0.0", "0.0"]
    assert lines[3].split() == ["score", "4", "1", "2.0", "2.0", "4.0", "4.0", "4.0"]
    stats.failed_players = 2  # the text says so too, not only --json: the exit status is 1 for it
    (first, *_) = format_summary(stats.summary(players=2, elapsed=2.0))
    assert first.endswith("1 errors, 2 players failed (could not connect, lost their connection or timed out)")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_updating_line_on_a_terminal_and_plain_lines_otherwise() -> None:
    stats = Stats()
    tty, plain = Terminal(), io.StringIO()
    for out in (tty, plain):
        progress = Progress(out, stats, players=3, seconds=10, plain_every=1.0)
        for elapsed in (0.25, 0.5, 1.0, 1.25, 2.0):
            progress.show(elapsed)
        progress.done()
    assert tty.getvalue().count("\r") == 5 and tty.getvalue().count("\n") == 1
    assert plain.getvalue().count("\n") == 2 and "\r" not in plain.getvalue()
    assert "players 0/3" in plain.getvalue()
