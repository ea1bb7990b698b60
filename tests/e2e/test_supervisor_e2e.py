"""Real processes: the supervisor spawning, sharing sockets, restarting and stopping children,
and ``twistd -n stage`` as an operator runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import capturedLogs

from stagetx.config import parse_config
from stagetx.supervisor import Supervisor
from tests.support import ServerProcess, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
STANDIN = [sys.executable, str(Path(__file__).with_name("standin_child.py"))]


def child_lines(events: Sequence[dict[str, Any]], prefix: str = "") -> list[str]:
    return [e["line"] for e in events if "line" in e and e["line"].startswith(prefix)]


def standin_supervisor(app_dir: Path, groups: int, **kwargs: Any) -> Supervisor:
    extra = kwargs.pop("extra", {})
    config = parse_config({"#startup": [[f"=route+i{g}"] for g in range(groups)], **extra}, str(app_dir))
    return Supervisor(config, child_command=STANDIN, **kwargs)


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest_twisted.inlineCallbacks
def test_children_share_the_service_sockets(app_dir: Path) -> Any:
    port = free_port()
    supervisor = standin_supervisor(app_dir, 2, extra={"#services": {"tcp": [f"127.0.0.1:{port}"]}})
    with capturedLogs() as events:
        supervisor.startService()
        try:
            yield wait_for(lambda: len(child_lines(events, "standin ready")) == 2, 20)
            pids = {s.pid for s in supervisor.status()}
            ready = child_lines(events, "standin ready")
            for status in supervisor.status():
                assert (
                    f"standin ready group={status.group} pid={status.pid} rundir={supervisor.rundir} ports=[{port}]"
                ) in ready
            for _ in range(10):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    pid, group = conn.makefile().readline().split()
                assert int(pid) in pids
        finally:
            yield supervisor.stopService().addTimeout(20, reactor)
    for pid in pids:
        assert_gone(pid)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest_twisted.inlineCallbacks
def test_crashing_child_is_restarted_and_long_lines_arrive_whole(app_dir: Path) -> Any:
    environ = {**os.environ, "STANDIN_EXIT": "3", "STANDIN_LONG_LINE": "200000"}
    supervisor = standin_supervisor(app_dir, 1, backoff=(0.1, 0.4), environ=environ)
    with capturedLogs() as events:
        supervisor.startService()
        try:
            yield wait_for(lambda: supervisor.status()[0].restarts >= 3, 20)
        finally:
            yield supervisor.stopService().addTimeout(20, reactor)
    assert child_lines(events, "x").count("x" * 200000) >= 3
    assert sum("exit code 3" in e.get("how", "") for e in events) >= 3


@pytest_twisted.inlineCallbacks
def test_child_ended_from_outside_with_exit_0_is_restarted(app_dir: Path) -> Any:
    # a SIGTERM sent to a child by hand: it stops cleanly (exit 0), but nobody asked the
    # supervisor, so the group's stages would be gone until the next server start
    supervisor = standin_supervisor(app_dir, 1, backoff=(0.1, 0.4))
    with capturedLogs() as events:
        supervisor.startService()
        try:
            yield wait_for(lambda: bool(child_lines(events, "standin ready")), 20)
            first = supervisor.status()[0].pid
            assert first is not None
            os.kill(first, signal.SIGTERM)
            yield wait_for(lambda: len(child_lines(events, "standin ready")) == 2, 20)
            status = supervisor.status()[0]
        finally:
            yield supervisor.stopService().addTimeout(20, reactor)
    assert any(e.get("how") == "exit code 0" and e.get("pid") == first for e in events)
    assert status.restarts == 1
    assert status.pid not in (None, first)


@pytest_twisted.inlineCallbacks
def test_stop_kills_a_child_that_ignores_sigterm(app_dir: Path) -> Any:
    environ = {**os.environ, "STANDIN_IGNORE_TERM": "1"}
    supervisor = standin_supervisor(app_dir, 1, grace=0.5, environ=environ)
    with capturedLogs() as events:
        supervisor.startService()
        yield wait_for(lambda: bool(child_lines(events, "standin ready")), 20)
        pid = supervisor.status()[0].pid
        started = time.monotonic()
        yield supervisor.stopService().addTimeout(20, reactor)
    assert 0.5 <= time.monotonic() - started < 10
    assert any(e.get("how") == "signal SIGKILL" for e in events)
    assert pid is not None
    assert_gone(pid)


def test_twistd_runs_restarts_and_stops_its_children(app_dir: Path) -> None:
    config = app_dir / "stage.json"
    config.write_text(
        json.dumps(
            {
                "#startup": [["=lua+a"], ["=lua+b"]],
                "=lua": {"%package": ["[0]lua"], "=lua+a": "start", "=lua+b": "start"},
            }
        )
    )
    twistd = ServerProcess(config)
    try:
        twistd.wait_for(lambda: bool(twistd.pids(0) and twistd.pids(1)), 30)
        first, other = twistd.pids(0)[0], twistd.pids(1)[0]
        os.kill(first, 0)
        os.kill(other, 0)
        os.kill(first, signal.SIGKILL)
        twistd.wait_for(lambda: len(twistd.pids(0)) == 2, 30)
        second = twistd.pids(0)[1]
        assert second != first
        os.kill(second, 0)
        assert twistd.pids(1) == [other]
        stopping = time.monotonic()
        # SIGTERM is the graceful stop: twistd drains and exits 0 (docs/operations.md)
        assert twistd.stop(30) == 0
        assert time.monotonic() - stopping < 15
    finally:
        twistd.stop()
    for pid in (first, second, other):
        assert_gone(pid)
    text = "\n".join(twistd.lines)
    assert f"process 1 pid {first} ended: signal SIGKILL" in text
    assert f"process 1 pid {second} ended:" in text and f"process 2 pid {other} ended:" in text
    assert "Main loop terminated." in text


def slow_to_stop(app_dir: Path) -> Path:
    """A server whose one process takes seconds to stop: its stage waits for a running job."""
    (app_dir / "lua" / "slow.lua").write_text(
        "stage.submit(0, function() log4cxx.info('job running')"
        " local t = os.clock() while os.clock() - t < 3 do end end)\n"
    )
    config = app_dir / "stage.json"
    config.write_text(
        json.dumps({"#startup": [["=lua+a"]], "=lua": {"%package": ["[0]lua"], "%budget": 60000, "=lua+a": "slow"}})
    )
    return config


def test_a_child_sent_sigterm_twice_stops_once_without_a_traceback(app_dir: Path) -> None:
    """``timeout``, an init system or an impatient operator may send SIGTERM twice, the second
    while the child still stops: Twisted's own handler stopped the stopping reactor again, a
    ``ReactorNotRunning`` traceback."""
    with ServerProcess(slow_to_stop(app_dir)) as twistd:
        twistd.wait_for(lambda: any("job running" in line for line in twistd.lines), 30, "the job")
        first = twistd.pids(0)[0]
        os.kill(first, signal.SIGTERM)
        twistd.wait_for(lambda: any("SIGTERM: stopping" in line for line in twistd.lines), 10, "the stop")
        os.kill(first, signal.SIGTERM)
        twistd.wait_for(lambda: f"process 1 pid {first} ended: exit code 0" in "\n".join(twistd.lines), 30)
    text = "\n".join(twistd.lines)
    assert "ReactorNotRunning" not in text and "Traceback" not in text, text


def test_twistd_sent_sigterm_twice_stops_once_and_exits_0(app_dir: Path) -> None:
    twistd = ServerProcess(slow_to_stop(app_dir))
    try:
        twistd.wait_for(lambda: any("job running" in line for line in twistd.lines), 30, "the job")
        twistd.process.send_signal(signal.SIGTERM)
        twistd.wait_for(lambda: any("SIGTERM: stopping (grace" in line for line in twistd.lines), 10, "the stop")
        twistd.process.send_signal(signal.SIGTERM)
        assert twistd.process.wait(30) == 0
    finally:
        twistd.stop()
    text = "\n".join(twistd.lines)
    assert "ReactorNotRunning" not in text and "Traceback" not in text, text


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"#startup": [["=route+a"], ["=lau+x"]]},
            'stage: #startup[1][0]: unknown stage type "=lau"',
        ),
        (
            {"#startup": [["=lua+x"]], "=lua+x": "gone"},
            'stage: =lua+x: script "gone" not found along %package ["[0]"]',
        ),
        # each built-in stage type checks its own settings through the registry, before anything runs
        (
            {"#startup": [["=lua+x"]], "=lua": {"%budget": 0, "=lua+x": "gone"}},
            "stage: =lua.%budget: expected milliseconds (an integer from 1 to 31536000000)",
        ),
        (
            {"#startup": [["=index+rank"]]},
            'stage: =index+rank: expected a directory, [dir, key_size, page_items] or {"dir": …}',
        ),
        (
            {"#startup": [["=index+rank"]], "=index+rank": {"dir": "rank/", "fsync": "always"}},
            "stage: =index+rank.fsync: expected true, false or milliseconds (above 0, at most 31536000000)",
        ),
        (
            {"#startup": [["=curl+web"]], "=curl+web": {"timeout": "5s"}},
            'stage: =curl+web.timeout: wrong value "5s"',
        ),
        (
            {"#startup": [["=route+r"]], "=route+r": {"expire_ms": 0}},
            "stage: =route+r: expire_ms must be a number of ms from above 0 to 31536000000, not 0",
        ),
        (
            {"#startup": [["=ticket+t"]], "=ticket+t": [0, {"room": 1}]},
            "stage: =ticket+t: max_tickets must be a positive integer, not 0",
        ),
        # each of these once passed --check, then crash-looped the children or failed with a traceback
        (
            {"#startup": [["=route+r"]], "#log": {"stage": {"file": "logs/stage.log"}}},
            "stage: #log.stage.file: directory APP/logs does not exist",
        ),
        (
            {"#startup": [["=route+r"]], "big": 2**64},
            "stage: big: 18446744073709551616 does not fit a Lua integer (-9223372036854775808 to 9223372036854775807)",
        ),
        ({"#startup": [["=route+r"]], "text": "a\ud800b"}, 'stage: text: "\\ud800" is a lone surrogate, not text'),
        (
            {"#startup": [["=route+r"]], "#admin": {"console": "tcp:19190:interface=127.0.0.1:bogus=1"}},
            'stage: #admin.console: bad endpoint "tcp:19190:interface=127.0.0.1:bogus=1":'
            " _parseTCP() got an unexpected keyword argument 'bogus'",
        ),
        (
            {"#startup": [["=curl+web"]], "=curl+web": {"concurrency": float("inf")}},
            "stage: =curl+web.concurrency: wrong value Infinity",
        ),
        (
            {"#startup": [["=index+rank"]], "=index+rank": {"dir": "rank/", "fsync": float("nan")}},
            "stage: =index+rank.fsync: expected true, false or milliseconds (above 0, at most 31536000000)",
        ),
        (
            {"#startup": [["=curl+web"]], "=curl+web": {"ca-file": "missing.pem"}},
            "stage: =curl+web.ca-file: cannot read APP/missing.pem: No such file or directory",
        ),
        # once answered every other read from an empty index (the replica that could not lock it)
        (
            {"#startup": [["=index+rank"], ["=index+rank"]], "=index+rank": "scores"},
            "stage: #startup[1][0]: =index+rank: APP/scores is used by one process at a time,"
            " as =index+rank at #startup[0][0]",
        ),
    ],
)
@pytest.mark.parametrize("check", [False, True], ids=["start-up", "--check"])
def test_twistd_refuses_a_broken_config_with_one_line(
    app_dir: Path, raw: dict[str, Any], message: str, check: bool
) -> None:
    config = app_dir / "bad.json"
    config.write_text(json.dumps(raw))
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("twistd")),
            "-n",
            "--pidfile=",
            "stage",
            "-c",
            str(config),
            *(["--check"] if check else []),
        ],
        cwd=app_dir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == message.replace("APP", str(app_dir)) + "\n"
    assert result.stdout == ""


def test_twistd_check_prints_the_groups(app_dir: Path) -> None:
    config = app_dir / "stage.json"
    config.write_text(
        json.dumps({"#license": "x", "#startup": [["=index+a", "=route+r"], ["=curl+c"]], "=index+a": "a/"})
    )
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("twistd")),
            "-n",
            "--pidfile=",
            "stage",
            "-c",
            str(config),
            "--check",
        ],
        cwd=app_dir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "config OK\nnotice: #license: not used by stagetx, ignored\nprocess 1: =index+a =route+r\nprocess 2: =curl+c\n"
    )
