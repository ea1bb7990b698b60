"""A run of router messages to one Lua stage crosses into Lua once (``deliver_batch``), on real
Lua and a real router driven by ``task.Clock``: each message still is its own callback, with its
own budget, slow-handler report and place in the stage's counters and handler-time histogram."""

from __future__ import annotations

import json
from bisect import bisect_left
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from stagetx.child.host import LATENCY_BUCKETS, ProcessHost
from stagetx.codec import NULL, pack_py
from stagetx.config import load_config
from stagetx.router import DRAIN_CHUNK
from tests.support import DELIVERY_HANDLERS, LogCapture, count_calls
from tests.support import said as logged

SCRIPT = (
    DELIVERY_HANDLERS
    + """
stage.waitfor("echo", function(...) stage.signal("later", ...) end)
stage.waitfor("later", function(...) log4cxx.info("later", select("#", ...), ...) end)
"""
)


def start(tmp_path: Path, budget_ms: int = 1000) -> ProcessHost:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "a.lua").write_text(SCRIPT)
    config = {"#startup": [["=lua+a"]], "=lua+a": {"%package": ["[0]lua"], "%budget": budget_ms, "=lua+a": "a"}}
    (tmp_path / "app.json").write_text(json.dumps(config))
    host = ProcessHost(load_config(str(tmp_path / "app.json")), 0, Clock())
    host.startService()
    return host


def send(host: ProcessHost, *messages: tuple[str, tuple[Any, ...]]) -> None:
    """Queue ``messages`` to stage ``a`` from itself, then run the queue as a network read does."""
    stage = host.stages[0]
    for msgid, values in messages:
        host.router.deliver(0, msgid, pack_py(values), stage.sender, None)
    host.router.run_queue()


def crossings(host: ProcessHost) -> dict[str, int]:
    """Counts the calls into the stage's runtime by kind, from now on."""
    return count_calls(host.stages[0].stage.vm, "deliver", "deliver_batch")


def said(capture: LogCapture, prefix: str) -> list[list[str]]:
    return logged(capture, "stage.a", prefix)


def test_a_run_of_forty_messages_crosses_once_per_chunk_in_order_and_counted(tmp_path: Path) -> None:
    host = start(tmp_path)
    stage = host.stages[0]
    calls = crossings(host)
    with LogCapture() as capture:
        send(host, *[("n", (i,)) for i in range(40)])
    assert said(capture, "n") == [[str(i)] for i in range(40)]
    assert calls["deliver"] == 0
    assert -(-40 // DRAIN_CHUNK) <= calls["deliver_batch"] < 40  # one per chunk, more only if a slice ran out
    assert stage.received == 40
    assert sum(stage.latency) == 40


def test_values_of_each_message_in_a_run_keep_their_count(tmp_path: Path) -> None:
    host = start(tmp_path)
    with LogCapture() as capture:
        send(host, ("echo", ()), ("echo", (None,)), ("echo", (1, None, 3)), ("echo", ("x",)))
    assert said(capture, "later") == [["0"], ["1", "nil"], ["3", "1", "nil", "3"], ["1", "x"]]


def test_the_slow_message_of_a_run_is_named_with_its_handler_and_counted_alone(tmp_path: Path) -> None:
    host = start(tmp_path)
    stage = host.stages[0]
    host.process.slow_ms = 20.0
    with LogCapture() as capture:
        send(host, ("n", (1,)), ("n", (2,)), ("slow", ()), ("n", (3,)), ("n", (4,)))
    slow = [e for e in capture.events if e.get("log_format", "").startswith("slow handler")]
    # the slow message is reported once, alone; on a busy machine a quick one may be slow too
    named = [e for e in slow if e["where"] == "handler of message 'slow'"]
    assert len(named) == 1
    assert (named[0]["script"], named[0]["line"]) == ("lua/a.lua", 3)
    assert named[0]["ms"] >= 30
    assert said(capture, "n") == [["1"], ["2"], ["3"], ["4"]]
    assert stage.received == 5
    assert sum(stage.latency) == 5
    assert sum(stage.latency[bisect_left(LATENCY_BUCKETS, 0.03) :]) >= 1
    assert stage.busy >= 0.03


def test_the_budget_stops_only_the_message_that_overran_and_the_run_goes_on(tmp_path: Path) -> None:
    host = start(tmp_path, budget_ms=100)
    stage = host.stages[0]
    with LogCapture() as capture:
        send(host, ("n", (1,)), ("loop", ()), ("n", (2,)), ("n", (3,)))
    errors = [line for line in capture.text().splitlines() if line.startswith("Lua error")]
    assert len(errors) == 1
    assert errors[0].startswith("Lua error in handler of message 'loop'")
    assert "budget of 100 ms exceeded" in errors[0]
    assert said(capture, "n") == [["1"], ["2"], ["3"]]
    assert stage.received == 4
    assert sum(stage.latency) == 4
    assert sum(stage.latency[bisect_left(LATENCY_BUCKETS, 0.1) :]) >= 1  # the loop's (others: load)


def test_a_payload_that_does_not_decode_drops_only_its_message_logged_and_counted(tmp_path: Path) -> None:
    host = start(tmp_path)
    stage = host.stages[0]
    with LogCapture() as capture:
        # decoded in Lua; malformed; out of Lua's range; left to Python's decoder (an extension type)
        for payload in (pack_py((1,)), b"\x91\xcd\x01", pack_py((2**64 - 1,)), pack_py((NULL,))):
            host.router.deliver(0, "n", payload, stage.sender, None)
        host.router.run_queue()
    assert said(capture, "n") == [["1"], ["nil"]]  # a null argument arrives as nil
    assert capture.text().count("message 'n' dropped") == 2
    assert stage.errors == 2 and stage.received == 4 and sum(stage.latency) == 4


def test_a_luajit_stage_gets_its_run_decoded_by_python_with_the_same_counts_and_drops(tmp_path: Path) -> None:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "a.lua").write_text(SCRIPT)
    config = {"#startup": [["=luajit+a"]], "=luajit+a": {"%package": ["[0]lua"], "=luajit+a": "a"}}
    (tmp_path / "app.json").write_text(json.dumps(config))
    host = ProcessHost(load_config(str(tmp_path / "app.json")), 0, Clock())
    host.startService()
    stage = host.stages[0]
    calls = crossings(host)
    with LogCapture() as capture:
        for msgid, payload in [("echo", pack_py(())), ("echo", b"\x91\xcd\x01"), ("echo", pack_py((1, None, 3)))]:
            host.router.deliver(0, msgid, payload, stage.sender, None)
        host.router.run_queue()
    assert said(capture, "later") == [["0"], ["3", "1", "nil", "3"]]
    assert capture.text().count("message 'echo' dropped") == 1
    assert calls["deliver_batch"] == 1 and calls["deliver"] == 0
    assert stage.errors == 1 and stage.received == 3 and sum(stage.latency) == 3
