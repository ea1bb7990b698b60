"""The `#services` sockets the supervisor opens before it spawns: real listening sockets on loopback,
passed to (fake) children as file descriptors from 3; a busy port stops start-up with one line."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from stagetx.supervisor import Supervisor
from tests.support import free_port
from tests.unit.test_supervisor import FakeSpawner, make_config


@pytest.fixture
def spawner() -> FakeSpawner:
    return FakeSpawner()


def supervisor_for(app_dir: Path, spawner: FakeSpawner, groups: int, services: dict[str, Any]) -> Supervisor:
    config = make_config(app_dir, groups, **{"#services": services})
    return Supervisor(config, reactor=spawner, environ={"PATH": "/bin", "PYTHONPATH": "/x"})


def test_services_sockets_are_shared_as_fds_from_3(app_dir: Path, spawner: FakeSpawner) -> None:
    ports = [free_port(), free_port()]
    services = {"tcp": [f"127.0.0.1:{ports[0]}", f"[::1]:{ports[1]}"]}
    supervisor = supervisor_for(app_dir, spawner, 2, services)
    supervisor.privilegedStartService()
    supervisor.startService()
    sockets = supervisor.sockets
    assert [s.getsockname()[1] for s in sockets] == ports
    assert all(not s.getblocking() for s in sockets)
    assert spawner.spawns[1]["childFDs"] == {
        0: "w",
        1: "r",
        2: "r",
        3: sockets[0].fileno(),
        4: sockets[1].fileno(),
    }
    assert spawner.processes[1].bootstrap["services"] == {
        f"127.0.0.1:{ports[0]}": 3,
        f"[::1]:{ports[1]}": 4,
    }
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=5):
        pass  # the kernel queues it on the shared listening socket
    for process in spawner.processes:
        process.exit(0)
    supervisor.stopService()
    assert all(s.fileno() == -1 for s in sockets)


def test_a_busy_service_port_stops_start_up_with_one_line(app_dir: Path, spawner: FakeSpawner) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        supervisor = supervisor_for(app_dir, spawner, 1, {"tcp": [f"127.0.0.1:{port}"]})
        with pytest.raises(SystemExit) as caught:
            supervisor.privilegedStartService()
    assert str(caught.value.code).startswith(f"stage: #services: cannot listen on 127.0.0.1:{port}: [Errno 98]")


def test_a_busy_cluster_port_stops_start_up_before_any_process_starts(app_dir: Path, spawner: FakeSpawner) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = make_config(app_dir, 1, **{"#cluster": [{"listen": f"127.0.0.1:{port}"}]})
        supervisor = Supervisor(config, reactor=spawner, environ={"PATH": "/bin", "PYTHONPATH": "/x"})
        with pytest.raises(SystemExit) as caught:
            supervisor.privilegedStartService()
    assert str(caught.value.code).startswith(f"stage: #cluster: cannot listen on 127.0.0.1:{port}: [Errno 98]")
    assert spawner.spawns == []
