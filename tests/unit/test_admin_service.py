"""AdminService beside a supervisor, on a memory reactor: its ports, heart-beat, health and stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from stagetx.admin.service import HEARTBEAT, AdminService
from stagetx.config import parse_config
from tests.support import LogCapture


@attrs.define
class Status:
    group: int
    pid: int | None
    started: float | None = None
    restarts: int = 0


class FakeProcesses:
    """The ``Processes`` view of a supervisor with two groups."""

    def __init__(self, app_dir: Path, reactor: MemoryReactorClock) -> None:
        raw = {
            "#startup": [["=route+a"], ["=route+b"]],
            "#admin": {"console": "tcp:0:interface=127.0.0.1", "http": "tcp:0:interface=127.0.0.1"},
        }
        self.config = parse_config(raw, str(app_dir))
        self.secret = "00" * 32
        self.rundir: str | None = str(app_dir)
        self.on_spawn: list[Callable[[int], None]] = []
        self.on_stopped: list[Callable[[], Deferred[None] | None]] = []
        self.pids: list[int | None] = [101, 102]
        self.reactor = reactor

    def clock(self) -> Any:
        return self.reactor

    def status(self) -> list[Status]:
        return [Status(group, pid) for group, pid in enumerate(self.pids)]

    def restart(self, group: int) -> Deferred[int]:
        return succeed(0)


def test_ports_heart_beat_health_and_stop(app_dir: Path) -> None:
    reactor = MemoryReactorClock()
    processes = FakeProcesses(app_dir, reactor)
    admin = AdminService(processes)
    with LogCapture() as log:
        admin.startService()
    # one StreamServerEndpointService per #admin endpoint, each bound port logged
    assert [port[0] for port in reactor.tcpServers] == [0, 0]
    assert sum("listening on" in line for line in log.lines()) == 2
    assert [path for path, *_ in reactor.unixServers] == [str(app_dir / "control.sock")]
    assert admin.control is not None
    # not ready yet; a process down is named; a spawn forgets the process's ready flag
    admin.control.children[0].ready = True
    admin.control.children[0].snapshot_at = reactor.seconds()  # it reported just now
    processes.pids[1] = None
    assert admin.health() == ["process 2 is down"]
    processes.on_spawn[0](0)
    assert admin.health() == ["process 1 is starting (not ready)", "process 2 is down"]
    # the heart-beat: a reactor that did not run for longer than the lag limit is reported
    reactor.advance(HEARTBEAT)
    assert not any("lagging" in reason for reason in admin.health())
    reactor.seconds = lambda: 1000.0  # type: ignore[method-assign]  # time moved, no timer ran
    assert any(reason.startswith("supervisor reactor lagging") for reason in admin.health())
    # stop: the ports and the heart-beat at once; the control server once the processes are gone
    stopped = admin.stopService()
    assert stopped is not None and not admin.running
    assert admin.control is not None  # the children may still report while they drain
    for hook in processes.on_stopped:
        hook()
    assert admin.control is None
