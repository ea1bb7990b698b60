"""The supervisor's decisions on fake time and a fake spawner: spawning, back-off, stop, restart
(the `#services` sockets it opens for real: tests/integration/test_supervisor.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, eventAsJSON, formatEvent, jsonFileLogObserver
from twisted.python.failure import Failure

from stagetx.config import parse_config
from stagetx.logsetup import plain_level_observer
from stagetx.supervisor import CHILD_COMMAND, LineRelay, Supervisor


class FakeProcess:
    """The transport a fake spawn hands to the protocol: records writes and signals."""

    def __init__(self, protocol: ProcessProtocol, pid: int) -> None:
        self.protocol = protocol
        self.pid: int | None = pid
        self.written = b""
        self.signals: list[str] = []
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def exit(self, code: int | None = 0, sig: int | None = None) -> None:
        """End the process as the reactor would report it."""
        self.pid = None
        if code == 0 and sig is None:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=code, signal=sig))
        self.protocol.processExited(reason)

    @property
    def bootstrap(self) -> dict[str, Any]:
        line, rest = self.written.split(b"\n", 1)
        assert rest == b""
        return json.loads(line)


class FakeSpawner(Clock):
    """A fake reactor: ``task.Clock`` time, and ``spawnProcess`` making ``FakeProcess``es with
    increasing pids."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.spawns: list[dict[str, Any]] = []
        self.fail = False

    def spawnProcess(
        self,
        protocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, Any] | None = None,
    ) -> FakeProcess:
        if self.fail:
            raise OSError("no such executable")
        process = FakeProcess(protocol, 1000 + len(self.processes))
        self.spawns.append({"executable": executable, "args": args, "env": env, "childFDs": childFDs})
        self.processes.append(process)
        protocol.makeConnection(process)  # type: ignore[arg-type]
        return process

    def last(self, group: int) -> FakeProcess:
        return [p for p in self.processes if p.protocol.group == group][-1]  # type: ignore[attr-defined]


def make_config(app_dir: Path, groups: int = 2, **extra: Any) -> Any:
    raw = {"#startup": [[f"=route+i{g}"] for g in range(groups)], **extra}
    return parse_config(raw, str(app_dir))


@pytest.fixture
def spawner() -> FakeSpawner:
    return FakeSpawner()


@pytest.fixture
def clock(spawner: FakeSpawner) -> Clock:
    """The fake reactor's clock (the same object)."""
    return spawner


@pytest.fixture
def make(app_dir: Path, clock: Clock, spawner: FakeSpawner):  # type: ignore[no-untyped-def]
    started: list[Supervisor] = []

    def make(groups: int = 2, **kwargs: Any) -> Supervisor:
        extra = kwargs.pop("extra", {})
        supervisor = Supervisor(
            make_config(app_dir, groups, **extra),
            reactor=spawner,
            environ={"PATH": "/bin", "PYTHONPATH": "/x"},
            **kwargs,
        )
        started.append(supervisor)
        return supervisor

    yield make
    for supervisor in started:  # never leave a run directory behind
        if supervisor.rundir:
            for slot_status in supervisor.status():
                if slot_status.pid is not None:
                    spawner.last(slot_status.group).exit(0)
            supervisor.stopService()


def test_one_child_per_group_with_the_bootstrap_line(make, spawner: FakeSpawner, app_dir: Path) -> None:
    supervisor = make(groups=2, args=["twistd", "-n", "stage"])
    supervisor.startService()
    assert [c["args"] for c in spawner.spawns] == [list(CHILD_COMMAND)] * 2
    assert spawner.spawns[0]["executable"] == CHILD_COMMAND[0]
    assert spawner.spawns[0]["childFDs"] == {0: "w", 1: "r", 2: "r"}
    env = spawner.spawns[0]["env"]
    repo = str(Path(__file__).resolve().parents[2])
    assert env["PATH"] == "/bin" and env["PYTHONPATH"].split(os.pathsep) == [repo, "/x"]
    boot = [p.bootstrap for p in spawner.processes]
    assert [b["group"] for b in boot] == [0, 1]
    assert boot[0]["config"] == {"#startup": [["=route+i0"], ["=route+i1"]]}
    assert boot[0]["base_dir"] == str(app_dir)
    assert boot[0]["rundir"] == supervisor.rundir and os.path.isdir(supervisor.rundir)
    assert boot[0]["services"] == {} and boot[0]["args"] == ["twistd", "-n", "stage"]
    assert len(bytes.fromhex(boot[0]["secret"])) == 32
    assert boot[0]["secret"] == boot[1]["secret"] and boot[0]["server_id"] == boot[1]["server_id"]
    assert not any(p.stdin_closed for p in spawner.processes)
    assert [(s.group, s.pid, s.restarts) for s in supervisor.status()] == [
        (0, 1000, 0),
        (1, 1001, 0),
    ]


def test_configured_secret_is_passed_as_hex(make, spawner: FakeSpawner) -> None:
    make(groups=1, extra={"#secret": "s3cret"}).startService()
    assert bytes.fromhex(spawner.processes[0].bootstrap["secret"]) == b"s3cret"


def test_random_secret_differs_per_run(make, spawner: FakeSpawner) -> None:
    make(groups=1).startService()
    make(groups=1).startService()
    assert spawner.processes[0].bootstrap["secret"] != spawner.processes[1].bootstrap["secret"]


def test_crashes_restart_with_doubling_back_off_up_to_the_cap(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=1)
    supervisor.startService()
    delays = []
    for _ in range(9):
        spawned = len(spawner.processes)
        spawner.last(0).exit(1)
        waited = 0.0
        while len(spawner.processes) == spawned:
            clock.advance(0.5)
            waited += 0.5
            assert waited <= 60
        delays.append(waited)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert supervisor.status()[0].restarts == 9


def test_back_off_starts_over_after_a_stable_run(make, spawner: FakeSpawner, clock: Clock) -> None:
    make(groups=1).startService()
    for delay in (1, 2, 4):
        spawner.last(0).exit(1)
        clock.advance(delay)
    assert len(spawner.processes) == 4
    clock.advance(60)  # the fourth process stays up long enough
    spawner.last(0).exit(1)
    clock.advance(0.999)
    assert len(spawner.processes) == 4
    clock.advance(0.001)
    assert len(spawner.processes) == 5


def test_a_child_killed_by_a_signal_is_restarted(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=2)
    supervisor.startService()
    with capturedLogs() as events:
        spawner.last(1).exit(None, 9)
        clock.advance(1)
    assert [s.pid for s in supervisor.status()] == [1000, 1002]
    text = [formatEvent(e) for e in events]
    assert "process 2 pid 1001 ended: signal SIGKILL" in text
    assert "process 2 started, pid 1002" in text


def test_an_exit_0_nobody_asked_for_is_restarted_with_back_off(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=1)
    supervisor.startService()
    spawner.last(0).exit(0)
    assert supervisor.status()[0].pid is None
    clock.advance(1)
    assert len(spawner.processes) == 2
    assert supervisor.status()[0].restarts == 1


def test_a_failed_spawn_is_retried_with_back_off(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=1)
    spawner.fail = True
    supervisor.startService()
    clock.advance(1)
    spawner.fail = False
    clock.advance(2)
    assert len(spawner.processes) == 1 and supervisor.status()[0].pid == 1000


def test_stop_terminates_then_kills_after_the_grace_period(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=2, grace=10.0)
    supervisor.startService()
    rundir = supervisor.rundir
    done = supervisor.stopService()
    assert [p.signals for p in spawner.processes] == [["TERM"], ["TERM"]]
    spawner.processes[0].exit(None, 15)
    assert not done.called
    clock.advance(9.9)
    assert spawner.processes[1].signals == ["TERM"]
    clock.advance(0.1)
    assert spawner.processes[1].signals == ["TERM", "KILL"]
    spawner.processes[1].exit(None, 9)
    assert done.called
    assert not os.path.exists(rundir)
    clock.advance(120)
    assert len(spawner.processes) == 2  # nothing restarted after stop


def test_stop_cancels_a_pending_restart(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=1)
    supervisor.startService()
    spawner.last(0).exit(1)
    done = supervisor.stopService()
    assert done.called
    clock.advance(120)
    assert len(spawner.processes) == 1


def test_restart_terminates_and_respawns_at_once(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=2)
    supervisor.startService()
    new_pid = supervisor.restart(1)
    assert spawner.processes[1].signals == ["TERM"] and not new_pid.called
    spawner.processes[1].exit(None, 15)
    assert new_pid.result == 1002
    assert [(s.pid, s.restarts) for s in supervisor.status()] == [(1000, 0), (1002, 1)]
    clock.advance(30)  # the grace timer of the old process is gone
    assert spawner.last(1).signals == []


def test_restart_of_a_stopped_group_spawns_it(make, spawner: FakeSpawner, clock: Clock) -> None:
    supervisor = make(groups=1)
    supervisor.startService()
    spawner.last(0).exit(1)  # a back-off restart is pending
    new_pid = supervisor.restart(0)
    assert new_pid.result == 1001
    clock.advance(120)
    assert len(spawner.processes) == 2


def test_child_output_is_relayed_line_by_line(make, spawner: FakeSpawner) -> None:
    supervisor = make(groups=1)
    supervisor.startService()
    protocol = spawner.last(0).protocol
    with capturedLogs() as events:
        protocol.outReceived(b"one\r\ntw")
        protocol.outReceived(b"o\n" + b"z" * 100_000 + b"\nno newline")
        protocol.errReceived(b"Traceback {braces}\n")
        protocol.outConnectionLost()
    lines = [(e["log_level"].name, e["line"]) for e in events if "line" in e]
    assert lines == [
        ("info", "one"),
        ("info", "two"),
        ("info", "z" * 100_000),
        ("warn", "Traceback {braces}"),
        ("info", "no newline"),
    ]
    assert formatEvent(events[0]) == "p1[1000] one"
    assert supervisor.status()[0].pid == 1000


def test_child_records_keep_their_level_and_namespace(make, spawner: FakeSpawner) -> None:
    supervisor = make(groups=2)
    supervisor.startService()
    protocol = spawner.last(1).protocol
    record = {"log_namespace": "stage.app", "log_level": LogLevel.error, "log_format": "boom {n}", "n": 3}
    with capturedLogs() as events:
        protocol.outReceived(b"- [stage.app#error] Lua error in main script\n\tTraceback line\nplain\n")
        protocol.outReceived(eventAsJSON(record).encode() + b"\n")
    relayed = [(e["log_namespace"], e["log_level"].name, formatEvent(e)) for e in events]
    assert relayed == [
        ("stage.app", "error", "p2[1001] Lua error in main script"),
        ("stage.app", "error", "p2[1001] \tTraceback line"),
        ("stagetx.child", "info", "p2[1001] plain"),
        ("stage.app", "error", "p2[1001] boom 3"),
    ]
    assert events[-1]["n"] == 3 and events[-1]["process"] == 2


def test_json_lines_write_the_level_as_a_plain_string() -> None:
    out = io.StringIO()
    observer = plain_level_observer(jsonFileLogObserver(out, recordSeparator=""))
    Logger(namespace="stage.app", observer=observer).error("boom")
    assert json.loads(out.getvalue())["log_level"] == "error"


def test_line_relay_bounds_its_buffer() -> None:
    emitted: list[str] = []
    relay = LineRelay(emitted.append, max_line=10)
    relay.feed(b"a" * 25)
    relay.feed(b"b\n\xff\n")
    assert emitted == ["a" * 10, "a" * 10, "aaaaab", "\ufffd"]
