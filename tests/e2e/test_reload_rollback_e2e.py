"""A reload that fails, as the operator sees it (docs/operations.md, "Hot reload"): a real ``twistd
-n stage`` with a broker text listener, real loopback clients, the admin console and HTTP side.
A reload whose script raises while it loads leaves every client figure of ``stat``, ``/api/stat``,
``/api/overview`` and ``/metrics`` as it was; a reload that fails in some of a stage's processes
names each of them in its answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.test_operations_e2e import ADMIN, Console, admin_ports, http
from tests.e2e.test_reload_keeps_connections import LineClient
from tests.support import ServerProcess, free_port, write_app

ECHO = """broker.ready("tcp://127.0.0.1:{port}?text", function(socket)
    return function(s, line) return "echo " .. line end
end)
"""
# takes up the listener, then raises on line 4
RAISES = ECHO + 'error("no database")\n'
LABELS = 'process="1",stage="=lua+echo",type="lua"'


def _stat_lines(console: Console) -> list[str]:
    """The stage's client lines of ``stat``: its totals, then one per endpoint."""
    return [line for line in console.ask("stat") if "=lua+echo clients:" in line or "tcp://127.0.0.1:" in line]


def _client_series(metrics: str) -> list[str]:
    """The stage's and its endpoints' client series of a ``/metrics`` text."""
    return [
        line
        for line in metrics.splitlines()
        if line.startswith(("stagetx_broker_endpoint_", "stagetx_stage_client")) and not line.startswith("#")
    ]


def _overview(port: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stage's row and the listeners of ``/api/overview``."""
    data = json.loads(http(port, "/api/overview")[1])
    return next(s for s in data["stages"] if s["name"] == "=lua+echo"), data["listeners"]


def _figures(ports: dict[str, int], console: Console) -> dict[str, Any]:
    """Every client figure the operator reads, but the stage's error count."""
    stage = json.loads(http(ports["http"], "/api/stat")[1])["data"][0]["stages"][0]
    row, listeners = _overview(ports["http"])
    return {
        "stat": _stat_lines(console),
        "api": (stage["clients"], stage["listeners"]),
        "overview": (row["clients"], listeners),
        "metrics": _client_series(http(ports["http"], "/metrics")[1].decode()),
    }


def test_a_reload_that_raises_leaves_every_client_figure_as_it_was(tmp_path: Path) -> None:
    port = free_port()
    config = {"#startup": [["=lua+echo"]], "#admin": ADMIN, "=lua+echo": "lua/echo"}
    path = write_app(tmp_path, config, {"echo": ECHO.format(port=port)})
    with ServerProcess(path) as server:
        ports = admin_ports(server)
        console = Console(ports["console"])
        clients = [LineClient(port) for _ in range(3)]
        try:
            for client in clients:
                client.send("a")
                assert client.read() == "echo a"
            clients.pop().sock.close()
            totals = "2 connected, accepted 3 refused 0 closed 1, frames in 3 out 3"
            server.wait_for(lambda: totals in " ".join(_stat_lines(console)), what="the counts in stat")
            closed = f"stagetx_stage_client_closed_total{{{LABELS}}} 1.0"
            server.wait_for(lambda: closed in http(ports["http"], "/metrics")[1].decode(), what="the snapshot")
            server.wait_for(lambda: _overview(ports["http"])[0]["clients"] == 2, what="the overview")
            before = _figures(ports, console)
            assert len(before["stat"]) == 2 and totals in before["stat"][1], before["stat"]
            assert len(before["api"][1]) == 1 and before["api"][1][0]["connected"] == 2
            assert len(before["overview"][1]) == 1
            assert any(line.startswith("stagetx_broker_endpoint_clients_connected{") for line in before["metrics"])

            (tmp_path / "lua" / "echo.lua").write_text(RAISES.format(port=port))
            assert console.ask("reload echo")[-1] == "ERROR reload: lua/echo.lua:4: no database"
            # the failed script's error is counted: the snapshots after the reload show it
            errors = f"stagetx_stage_errors_total{{{LABELS}}} 1.0"
            server.wait_for(lambda: errors in http(ports["http"], "/metrics")[1].decode(), what="a later snapshot")
            server.wait_for(lambda: _overview(ports["http"])[0]["errors"] == 1, what="a later overview")
            after = _figures(ports, console)
            for view in before:
                assert after[view] == before[view], view
            for client in clients:  # and the running script still serves them
                client.send("b")
                assert client.read() == "echo b"
        finally:
            console.close()
            for client in clients:
                client.sock.close()


FRONT = """VERSION = {version}
if process.stage ~= 1 and VERSION > 1 then error("broken in process " .. process.stage) end
"""


def test_a_reload_failing_in_some_processes_names_each_process(tmp_path: Path) -> None:
    config = {"#startup": [["=lua+front"], ["=lua+front"], ["=lua+front"]], "#admin": ADMIN, "=lua+front": "lua/front"}
    path = write_app(tmp_path, config, {"front": FRONT.format(version=1)})
    with ServerProcess(path) as server:
        ports = admin_ports(server)
        console = Console(ports["console"])
        try:
            (tmp_path / "lua" / "front.lua").write_text(FRONT.format(version=2))
            answer = console.ask("reload front")
            assert answer == [
                "process 1: front reloaded",
                "ERROR process 2: reload: lua/front.lua:2: broken in process 2;"
                " process 3: reload: lua/front.lua:2: broken in process 3",
            ], answer
            status, body = http(ports["http"], "/api", body=b"reload front")
            reply = json.loads(body)
            assert status == 400 and reply["error"] == answer[-1].removeprefix("ERROR "), reply
            assert [(p["process"], p["ok"], p["reloads"]) for p in reply["data"]] == [
                (1, True, 2),
                (2, False, None),
                (3, False, None),
            ]
            assert reply["data"][1]["error"] == "reload: lua/front.lua:2: broken in process 2"
            # the versions the processes run: the operator's answer told which ones took the new one
            assert console.ask("eval front VERSION") == ["process 1: 2", "process 2: 1", "process 3: 1", "OK"]
        finally:
            console.close()
