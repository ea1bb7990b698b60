"""Runs: the messages one Lua stage sends a stage of another process travel as one frame entry
(``["r", INSTANCE, SENDER, COUNT, BODY]``) that the receiving Lua stage reads in Lua, one crossing
per drain chunk; on real Lua and a real router driven by ``task.Clock``. Each message still is its
own callback, with its own budget, slow-handler report, ``_WAITFOR`` and place in the stage's
counters and handler-time histogram. (Between real processes: every two-process e2e test.)"""

from __future__ import annotations

from bisect import bisect_left
from pathlib import Path
from typing import Any

import msgpack

from stagetx.child.host import LATENCY_BUCKETS, ProcessHost
from stagetx.codec import NULL, pack_py, unpack_py
from stagetx.router import DRAIN_CHUNK
from stagetx.wire import unpack_entries
from tests.fakes import ConnectedLinks
from tests.support import DELIVERY_HANDLERS, LogCapture, count_calls, started_process
from tests.support import said as logged

SCRIPT = (
    DELIVERY_HANDLERS
    + """
stage.waitfor("count", function(...) log4cxx.info("count", select("#", ...), ...) end)
stage.waitfor("who", function() log4cxx.info("who", _WAITFOR[0], _WAITFOR[1].stage, tostring(_WAITFOR[2])) end)
stage.waitfor("echo", function(i) return i end)
stage.waitfor("fail", function() error("no") end)
stage.waitfor("post", function(i) log4cxx.info("post", i); stage.signal("later", i) end)
stage.waitfor("later", function(i) log4cxx.info("later", i) end)
"""
)
B = 1  # the sender: stage b, instance 1, in the process of group 1


def start(tmp_path: Path, kind: str = "lua", budget_ms: int = 1000) -> tuple[ProcessHost, ConnectedLinks]:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "a.lua").write_text(SCRIPT)
    (tmp_path / "lua" / "b.lua").write_text("")
    config: dict[str, Any] = {"#startup": [[f"={kind}+a"], ["=lua+b"]], "=lua": {"%package": ["[0]lua"], "=lua+b": "b"}}
    config.setdefault(f"={kind}", {"%package": ["[0]lua"]}).update({"%budget": budget_ms, f"={kind}+a": "a"})
    links = ConnectedLinks()
    return started_process(tmp_path, config, links), links


def body(*messages: tuple[str, Any, str | None]) -> bytes:
    """A run's body: per message its id, payload (values, or bytes as they are) and reply."""
    parts = []
    for msgid, values, reply in messages:
        payload = values if isinstance(values, bytes) else pack_py(values)
        parts.append(msgpack.packb(msgid) + msgpack.packb(payload, use_bin_type=True) + msgpack.packb(reply))
    return b"".join(parts)


def arrive(host: ProcessHost, *runs: bytes, count: int | None = None) -> None:
    """Runs from stage b to stage a, in one network frame, then the queue runs as after a read."""
    for run in runs:
        n = count if count is not None else len(unpack_entries(run)) // 3
        host.router.frame_received(1, ["r", 0, B, n, run])
    host.router.run_queue()


def crossings(host: ProcessHost) -> dict[str, int]:
    """Counts the calls into the stage's runtime by kind, from now on."""
    return count_calls(host.stages[0].stage.vm, "deliver", "deliver_batch", "deliver_run")


def said(capture: LogCapture, prefix: str) -> list[list[str]]:
    return logged(capture, "stage.a", prefix)


def test_a_run_of_forty_crosses_once_in_order_and_counted(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    stage = host.stages[0]
    calls = crossings(host)
    with LogCapture() as capture:
        arrive(host, body(*[("n", (i,), None) for i in range(40)]))
    assert said(capture, "n") == [[str(i)] for i in range(40)]
    assert calls["deliver"] == calls["deliver_batch"] == 0
    assert 1 <= calls["deliver_run"] < 40  # one, more only if a drain slice ran out
    assert stage.received == 40
    stage.take_times()
    assert sum(stage.latency) == 40 and stage.busy > 0


def test_a_run_whose_handlers_answer_crosses_once_per_drain_chunk_and_answers_leave_after_each(
    tmp_path: Path,
) -> None:
    host, links = start(tmp_path)
    calls = crossings(host)
    flushes = links.flushes
    back = f"^{host.router.server_id}/1/back"
    arrive(host, body(*[("echo", (i,), back) for i in range(3 * DRAIN_CHUNK)]))
    assert 3 <= calls["deliver_run"] < 3 * DRAIN_CHUNK  # one per chunk, more only if a slice ran out
    assert links.flushes - flushes >= 3  # the answers of each chunk leave before the next runs
    assert host.stages[0].received == 3 * DRAIN_CHUNK


def test_runs_of_one_sender_queued_together_are_joined_into_one_crossing(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    calls = crossings(host)
    with LogCapture() as capture:
        arrive(host, body(("n", (1,), None)), body(("n", (2,), None), ("n", (3,), None)), body(("n", (4,), None)))
    assert said(capture, "n") == [["1"], ["2"], ["3"], ["4"]]
    assert calls["deliver_run"] == 1


def test_each_message_keeps_its_values_id_sender_and_reply(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    with LogCapture() as capture:
        arrive(
            host,
            body(
                ("count", (), None),
                ("count", (None,), None),
                ("count", (1, None, 3), None),
                ("count", ("x",), None),
                ("who", (), None),
                ("who", (), "^srv/1/back"),
            ),
        )
    assert said(capture, "count") == [["0"], ["1", "nil"], ["3", "1", "nil", "3"], ["1", "x"]]
    assert said(capture, "who") == [["who", "b", "nil"], ["who", "b", "^srv/1/back"]]


def test_answers_to_a_run_of_requests_leave_as_a_run_after_the_first(tmp_path: Path) -> None:
    host, links = start(tmp_path)
    back = f"^{host.router.server_id}/1/back"
    arrive(host, body(*[("echo", (i,), back) for i in range(16)]))
    sent = [frame for group, frame in links.frames if group == 1]
    answers = []
    for frame in sent:
        if frame[0] == "r":
            fields = unpack_entries(frame[4])
            answers += [(fields[i], unpack_py(fields[i + 1])[0]) for i in range(0, len(fields), 3)]
        else:
            answers.append((frame[2], unpack_py(frame[3])[0]))
    assert answers == [("back", i) for i in range(16)]
    # the first crosses alone (asking whether the route is steady: in a drain turn, at once); the
    # rest wait in the outbox and leave as a run
    assert [frame[0] for frame in sent] == ["m", "r"]


def test_the_slow_message_of_a_run_is_named_with_its_handler_and_counted_alone(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    stage = host.stages[0]
    host.process.slow_ms = 20.0
    with LogCapture() as capture:
        arrive(host, body(("n", (1,), None), ("n", (2,), None), ("slow", (), None), ("n", (3,), None)))
    slow = [e for e in capture.events if e.get("log_format", "").startswith("slow handler")]
    named = [e for e in slow if e["where"] == "handler of message 'slow'"]
    assert len(named) == 1  # on a busy machine a quick one may be slow too
    assert (named[0]["script"], named[0]["line"]) == ("lua/a.lua", 3)
    assert named[0]["ms"] >= 30
    assert said(capture, "n") == [["1"], ["2"], ["3"]]
    stage.take_times()
    assert stage.received == 4 and sum(stage.latency) == 4
    assert sum(stage.latency[bisect_left(LATENCY_BUCKETS, 0.03) :]) >= 1
    assert stage.busy >= 0.03


def test_the_budget_stops_only_the_message_that_overran_and_the_run_goes_on(tmp_path: Path) -> None:
    host, _ = start(tmp_path, budget_ms=100)
    stage = host.stages[0]
    with LogCapture() as capture:
        arrive(host, body(("n", (1,), None), ("loop", (), None), ("fail", (), None), ("n", (2,), None)))
    errors = [line for line in capture.text().splitlines() if line.startswith("Lua error")]
    assert len(errors) == 2
    assert errors[0].startswith("Lua error in handler of message 'loop'")
    assert "budget of 100 ms exceeded" in errors[0]
    assert errors[1].startswith("Lua error in handler of message 'fail'") and "lua/a.lua:12: no" in errors[1]
    assert said(capture, "n") == [["1"], ["2"]]
    stage.take_times()
    assert stage.received == 4 and sum(stage.latency) == 4
    assert sum(stage.latency[bisect_left(LATENCY_BUCKETS, 0.1) :]) >= 1


def test_a_payload_that_does_not_decode_drops_only_its_message_logged_and_counted(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    stage = host.stages[0]
    with LogCapture() as capture:
        # decoded in Lua; malformed; out of Lua's range; left to Python's decoder (an extension type)
        payloads = (pack_py((1,)), b"\x91\xcd\x01", pack_py((2**64 - 1,)), pack_py((NULL,)))
        arrive(host, body(*[("n", p, None) for p in payloads]))
    assert said(capture, "n") == [["1"], ["nil"]]
    assert capture.text().count("message 'n' dropped") == 2
    stage.take_times()
    assert stage.errors == 2 and stage.received == 4 and sum(stage.latency) == 4


def test_a_malformed_run_delivers_what_came_before_the_fault_and_drops_the_rest(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    stage = host.stages[0]
    good = body(("n", (1,), None), ("n", (2,), None))
    with LogCapture() as capture:
        arrive(host, good + b"\xa1n\xc4\x40\x91", count=4)  # the third's payload runs past the end
        arrive(host, body(("n", (3,), None)))  # the stage serves on
    assert said(capture, "n") == [["1"], ["2"], ["3"]]
    assert "a run of 4 messages from b is malformed: 2 of them dropped" in capture.text()
    assert stage.errors == 1 and stage.received == 3


def test_a_run_arriving_during_a_reload_waits_and_is_delivered_in_order(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    lua = host.stages[0].stage
    lua._held = []  # as while a reload builds the new runtime
    arrive(host, body(("n", (1,), None), ("n", (2,), None)))
    assert [m.msgid for m in lua._held] == ["n", "n"]
    with LogCapture() as capture:
        lua._hand_over("finish")
    assert said(capture, "n") == [["1"], ["2"]]


def test_a_luajit_stage_gets_its_runs_decoded_by_python_with_the_same_counts(tmp_path: Path) -> None:
    host, _ = start(tmp_path, kind="luajit")
    stage = host.stages[0]
    with LogCapture() as capture:
        arrive(host, body(("count", (), None), ("n", b"\x91\xcd\x01", None), ("count", (1, None, 3), None)))
    assert said(capture, "count") == [["0"], ["3", "1", "nil", "3"]]
    assert capture.text().count("message 'n' dropped") == 1
    stage.take_times()
    assert stage.errors == 1 and stage.received == 3 and sum(stage.latency) == 3


def test_a_run_entry_of_the_wrong_shape_is_dropped_logged_and_the_stage_serves_on(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    with LogCapture() as capture:
        for bad in (["r", 0, B, "2", body(("n", (1,), None))], ["r", 0, B, 1, "n"], ["r", 0, B, 0, b""]):
            host.router.frame_received(1, bad)
        host.router.run_queue()
        arrive(host, body(("n", (2,), None)))
    assert capture.text().count("dropped: a malformed run") == 3
    assert said(capture, "n") == [["2"]]


def test_local_messages_a_handler_posts_run_after_its_message_before_the_next(tmp_path: Path) -> None:
    host, _ = start(tmp_path)
    with LogCapture() as capture:
        arrive(host, body(("post", (1,), None), ("post", (2,), None), ("n", (3,), None)))
    rows = [line.split("\t") for line in capture.lines("stage.a")]
    assert rows == [["post", "1"], ["later", "1"], ["post", "2"], ["later", "2"], ["n", "3"]]
