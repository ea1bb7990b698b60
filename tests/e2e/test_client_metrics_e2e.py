"""Broker client metrics and a stage's last errors, as the operator sees them (docs/operations.md,
"Client metrics"): a real ``twistd -n stage`` whose Lua stage serves real loopback text clients;
``stat``, ``/metrics`` and the dashboard (in headless Chromium) report what those clients did."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.test_dashboard_browser import DevTools, find_browser
from tests.e2e.test_operations_e2e import ADMIN, Console, admin_ports, http
from tests.e2e.test_reload_keeps_connections import LineClient
from tests.support import ServerProcess, free_port, write_app

# Refuses its third client; a line "boom" raises in the handler (line 6 of the file).
ECHO = """accepted = 0
broker.ready("tcp://127.0.0.1:{port}?text=64", function(socket)
    accepted = accepted + 1
    if accepted == 3 then return false end
    return function(s, line)
        if line == "boom" then error("boom on purpose") end
        return "echo " .. line
    end
end)
"""


@contextmanager
def served(tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, int], list[LineClient]]]:
    """The server after its clients did their part: two still connected (one sent "boom"), one
    refused, one dropped for an oversized line."""
    port = free_port()
    config = {"#startup": [["=lua+echo"]], "#admin": ADMIN, "=lua+echo": "lua/echo"}
    path = write_app(tmp_path, config, {"echo": ECHO.format(port=port)})
    with ServerProcess(path) as server:
        ports = admin_ports(server)
        first, second = LineClient(port), LineClient(port)
        clients = [first, second]
        try:
            for client in clients:
                client.send("a")
                assert client.read() == "echo a"
            refused = LineClient(port)
            assert refused.closed()
            big = LineClient(port)
            big.send("x" * 100)
            assert big.closed()
            first.send("boom")
            first.send("b")
            assert first.read() == "echo b"  # the error is logged; the socket and the stage serve on
            yield server, ports, clients
        finally:
            for client in clients:
                client.sock.close()


def _clients_line(console: Console) -> str:
    return next((line for line in console.ask("stat") if "=lua+echo clients:" in line), "")


def test_stat_and_metrics_count_each_listener_s_clients(tmp_path: Path) -> None:
    with served(tmp_path) as (server, ports, _):
        console = Console(ports["console"])
        try:
            # bytes in: 11 of the served lines, and what was read of the oversized one (101 sent)
            expected = (
                r"2 connected, accepted 3 refused 1 closed 2, frames in 4 out 3, bytes in (\d+) out 21, oversized 1"
            )
            server.wait_for(lambda: re.search(expected, _clients_line(console)) is not None, what="the counts in stat")
            found = re.search(expected, _clients_line(console))
            assert found is not None and 11 + 64 < int(found.group(1)) <= 11 + 101
            endpoint = next(line for line in console.ask("stat") if "tcp://127.0.0.1:" in line)
            assert re.search(r"tcp://127\.0\.0\.1:\d+ \(tcp \d+\): " + expected, endpoint), endpoint
            data = json.loads(http(ports["http"], "/api/stat")[1])["data"][0]["stages"][0]
            assert data["clients"]["oversized"] == 1 and data["listeners"][0]["connected"] == 2
            assert data["errors"] == 1 and "lua/echo.lua:6: boom on purpose" in data["last_errors"][0]["error"]
            labels = 'process="1",stage="=lua+echo",type="lua"'
            connected = f"stagetx_stage_clients_connected{{{labels}}} 2.0"
            server.wait_for(lambda: connected in http(ports["http"], "/metrics")[1].decode(), what="the snapshot")
            metrics = http(ports["http"], "/metrics")[1].decode()
            assert f"stagetx_stage_clients_connected{{{labels}}} 2.0" in metrics
            assert f"stagetx_stage_client_refused_total{{{labels}}} 1.0" in metrics
            assert f"stagetx_stage_client_frames_in_total{{{labels}}} 4.0" in metrics
            assert re.search(
                r'stagetx_broker_endpoint_client_oversized_total\{endpoint="tcp://127\.0\.0\.1:\d+",'
                r'kind="tcp",process="1",stage="=lua\+echo"\} 1\.0',
                metrics,
            ), metrics
            # the counts belong to the stage: a reload keeps them
            assert console.ask("reload echo")[-1] == "OK"
            reloaded = re.search(expected, _clients_line(console))
            assert reloaded is not None and reloaded.group(1) == found.group(1)
        finally:
            console.close()


@pytest.mark.timeout(120)
def test_the_dashboard_lists_a_stage_s_last_errors_when_its_count_is_clicked(tmp_path: Path) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (install the Debian package chromium; .ci/run does)")
    with served(tmp_path) as (_, ports, _):
        devtools = DevTools(browser, tmp_path / "profile")
        try:
            devtools.open(f"http://127.0.0.1:{ports['http']}/")
            row = "document.querySelector('#stages tr[data-stage=\"1/=lua+echo\"]')"
            devtools.wait(f"{row}?.querySelector('[data-field=errors]')?.textContent === '1'", what="the error count")
            devtools.wait(f"{row}.querySelector('[data-field=clients]').textContent === '2'", what="the clients")
            listener = "document.querySelector('#listeners tbody tr')"
            assert devtools.wait(f"{listener}?.querySelector('[data-field=oversized]')?.textContent === '1'")
            assert devtools.js(f"{listener}.querySelector('[data-field=refused]').textContent") == "1"
            assert devtools.js("document.getElementById('errors-panel').hidden") is True
            devtools.js(f"{row}.querySelector('[data-field=errors]').click()")
            devtools.wait("!document.getElementById('errors-panel').hidden", what="the error list")
            errors = devtools.js("[...document.querySelectorAll('#errors-list li')].map(li => li.textContent)")
            assert len(errors) == 1 and "lua/echo.lua:6: boom on purpose" in errors[0], errors
            assert "=lua+echo (process 1)" in devtools.js("document.getElementById('errors-title').textContent")
        finally:
            devtools.close()
