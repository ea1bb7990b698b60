"""What the operator sees is true (docs/operations.md): a real ``twistd -n stage`` with a broker text
listener and real clients; broken scripts saved and reloaded from the console, ``/api`` and
``--watch``; a stage that fails to load shown as failed in ``stat``, ``/metrics`` and ``/health``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.test_operations_e2e import ADMIN, Console, admin_ports, http
from tests.e2e.test_reload_keeps_connections import LineClient
from tests.support import ServerProcess, env_path, free_port, write_app

SERVED = """VERSION = {version}
broker.ready("tcp://127.0.0.1:{port}?text", function(socket)
    return function(s, line) return VERSION .. " " .. line end
end)
"""
# a syntax error on line 3 of the saved file
BROKEN = "VERSION = 99\n\nlocal = 3\n"


def _config(extra: dict[str, str] | None = None) -> dict[str, object]:
    return {"#startup": [["=lua+echo", *(extra or {})]], "#admin": ADMIN, "=lua+echo": "lua/echo", **(extra or {})}


def test_a_broken_reload_answers_error_and_keeps_the_stage_and_its_clients(tmp_path: Path) -> None:
    port = free_port()
    path = write_app(tmp_path, _config(), {"echo": SERVED.format(version=1, port=port)})
    with ServerProcess(path) as server:
        ports = admin_ports(server)
        console = Console(ports["console"])
        client = LineClient(port)
        try:
            client.send("a")
            assert client.read() == "1 a"
            (tmp_path / "lua" / "echo.lua").write_text(BROKEN)
            answer = console.ask("reload echo")
            assert answer[-1].startswith("ERROR reload: lua/echo.lua:3:"), answer
            status, body = http(ports["http"], "/api", body=b"reload =lua+echo")
            reply = json.loads(body)
            assert status == 400 and not reply["ok"] and reply["error"].startswith("reload: lua/echo.lua:3:"), reply
            client.send("b")  # the same connection, still served by the running script
            assert client.read() == "1 b"
            # compiles, but raises while it loads (after taking up the listener): nothing changes either
            (tmp_path / "lua" / "echo.lua").write_text(SERVED.format(version=3, port=port) + 'error("no database")\n')
            assert console.ask("reload echo")[-1] == "ERROR reload: lua/echo.lua:5: no database"
            client.send("b2")
            assert client.read() == "1 b2"
            assert http(ports["http"], "/health")[0] == 200
            stat = console.ask("stat")
            assert stat[-1] == "OK" and not any("FAILED" in line for line in stat)
            refused = [line for line in server.lines if "reload of =lua+echo refused" in line]
            assert len(refused) == 2 and "lua/echo.lua:3:" in refused[0] and "#error]" in refused[0]
            assert any("reload of =lua+echo failed, the running scripts are kept" in line for line in server.lines)
            assert not any("not re-created" in line or "Closed" in line for line in server.lines)

            (tmp_path / "lua" / "echo.lua").write_text(SERVED.format(version=2, port=port))
            assert console.ask("reload echo") == ["process 1: echo reloaded", "OK"]
            client.send("c")
            assert client.read() == "2 c"
        finally:
            console.close()
            client.sock.close()


def test_watch_mode_refuses_a_broken_save_and_takes_the_fixed_one(tmp_path: Path) -> None:
    port = free_port()
    path = write_app(tmp_path, _config(), {"echo": SERVED.format(version=1, port=port)})
    with ServerProcess(path, "--watch", "0.1") as server:
        admin_ports(server)
        client = LineClient(port)
        try:
            client.send("a")
            assert client.read() == "1 a"
            (tmp_path / "lua" / "echo.lua").write_text(BROKEN)
            server.wait_for(lambda: any("reload of =lua+echo refused" in line for line in server.lines), what="refusal")
            refusal = next(line for line in server.lines if "reload of =lua+echo refused" in line)
            assert "lua/echo.lua:3:" in refusal
            client.send("b")
            assert client.read() == "1 b"
            (tmp_path / "lua" / "echo.lua").write_text(SERVED.format(version=2, port=port))
            server.wait_for(lambda: any("stage =lua+echo reloaded" in line for line in server.lines), what="reload")
            client.send("c")
            assert client.read() == "2 c"
            assert not any("Traceback" in line or "not re-created" in line for line in server.lines)
        finally:
            client.sock.close()


def test_a_stage_whose_script_fails_is_failed_in_stat_metrics_and_health(tmp_path: Path) -> None:
    port = free_port()
    failing = 'VERSION = 1\nerror("no database configured")\n'
    config = _config({"=lua+other": "lua/other"})
    scripts = {"echo": failing, "other": SERVED.format(version=7, port=port)}
    path = write_app(tmp_path, config, scripts)
    with ServerProcess(path) as server:
        ports = admin_ports(server)
        assert not any("stage =lua+echo started" in line for line in server.lines)
        failed = "stage =lua+echo failed: lua/echo.lua:2: no database configured"
        assert any(re.search(r"\[stage\.echo#error\] p1\[\d+\] " + re.escape(failed), line) for line in server.lines)
        status, body = http(ports["http"], "/health")
        assert status == 503, body
        assert "stage =lua+echo failed: lua/echo.lua:2: no database configured" in json.loads(body)["reasons"]
        metrics = http(ports["http"], "/metrics")[1].decode()
        assert 'stagetx_stage_up{process="1",stage="=lua+echo",type="lua"} 0.0' in metrics
        assert 'stagetx_stage_up{process="1",stage="=lua+other",type="lua"} 1.0' in metrics
        console = Console(ports["console"])
        client = LineClient(port)  # the process keeps serving its other stage
        try:
            stat = console.ask("stat")
            assert any(re.search(r"=lua\+echo FAILED: lua/echo.lua:2: no database configured", line) for line in stat)
            client.send("x")
            assert client.read() == "7 x"
            (tmp_path / "lua" / "echo.lua").write_text('VERSION = 2\nerror("still no database")\n')
            answer = console.ask("reload echo")
            assert answer[-1] == "ERROR reload: lua/echo.lua:2: still no database", answer
            assert any("FAILED: lua/echo.lua:2: no database configured" in line for line in console.ask("stat"))
            (tmp_path / "lua" / "echo.lua").write_text("VERSION = 3\n")
            assert console.ask("reload echo")[-1] == "OK"
            server.wait_for(lambda: http(ports["http"], "/health")[0] == 200, what="health after the fix")
        finally:
            console.close()
            client.sock.close()


def test_check_compiles_main_scripts_and_preload_files_without_running_them(tmp_path: Path) -> None:
    config = {
        "#startup": [["=lua+app", "=luajit+fast"], ["=lua+ok"]],
        "=lua+app": {"%preload": "lua/pre", "=lua+app": "lua/app"},
        "=luajit+fast": "lua/fast",
        "=lua+ok": "lua/ok",
    }
    scripts = {
        "pre.a": "x = 1\n",
        "pre.b": "local = {}\n",
        "app": "local x <const> = 1\nreturn function(=)\n",
        "fast": "local x <const> = 1\n",  # Lua 5.4 only: LuaJIT does not compile it
        "ok": 'error("never run by --check")\n',
    }
    path = write_app(tmp_path, config, scripts)
    result = subprocess.run(
        [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "stage", "-c", str(path), "--check"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": env_path()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "config OK" not in result.stdout
    assert [e.split(":")[1:3] for e in errors] == [
        [" lua/pre/b.lua", "1"],
        [" lua/app.lua", "2"],
        [" lua/fast.lua", "1"],
    ]
    (tmp_path / "lua" / "pre" / "b.lua").write_text("y = 2\n")
    (tmp_path / "lua" / "app.lua").write_text("return 1\n")
    (tmp_path / "lua" / "fast.lua").write_text("return 1\n")
    fixed = subprocess.run(
        result.args,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": env_path()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fixed.returncode == 0 and fixed.stdout.startswith("config OK\n"), fixed.stdout + fixed.stderr


def _in_own_process_group(config: Path) -> ServerProcess:
    """A ``ServerProcess`` leading a process group of its own, as a terminal runs a command."""
    server = ServerProcess.__new__(ServerProcess)
    twistd = str(Path(sys.executable).with_name("twistd"))
    server.process = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "stage", "-c", str(config)],
        cwd=config.parent,
        env={**os.environ, "PYTHONPATH": env_path()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    server.lines = []
    server._reader = threading.Thread(target=server._read, daemon=True)
    server._reader.start()
    return server


def test_ctrl_c_to_the_process_group_is_a_graceful_stop(tmp_path: Path) -> None:
    config = {"#startup": [["=lua+echo"], ["=index+scores"]], "=lua+echo": "lua/echo", "=index+scores": "scores"}
    path = write_app(tmp_path, config, {"echo": SERVED.format(version=1, port=free_port())})
    server = _in_own_process_group(path)
    try:
        server.wait_for(lambda: any("] ready: 2 processes" in line for line in server.lines), what="ready")
        # the processes link to each other after they report ready: on a busy machine the link's
        # line (asserted below) may come later than "ready"
        server.wait_for(lambda: any("linked to process 1" in line for line in server.lines), what="the link")
        os.killpg(server.process.pid, signal.SIGINT)  # what Ctrl-C does
        assert server.process.wait(30) == 0
    finally:
        server.stop()
    lines = server.lines
    assert any("SIGINT: stopping" in line for line in lines), "\n".join(lines)
    ended = [line for line in lines if " ended: " in line]
    assert len(ended) == 2 and all(line.endswith("ended: exit code 0") for line in ended), ended
    noisy = [line for line in lines if re.search(r"#(critical|error|warn)\]|Traceback|KeyboardInterrupt", line)]
    assert noisy == []
    chatter = [line for line in lines if "Starting factory" in line or "Scheduling retry" in line]
    assert chatter == []
    assert any(re.search(r"process 2 started, pid \d+", line) for line in lines)
    assert any(
        re.search(r"\[stagetx\.child\.links\.ProcessLinks#info\] p2\[\d+\] linked to process 1", line) for line in lines
    )


def test_a_process_restarted_on_purpose_is_not_reported_as_a_lost_link(tmp_path: Path) -> None:
    config = {
        "#startup": [["=lua+echo"], ["=lua+other"]],
        "#admin": ADMIN,
        "=lua+echo": "lua/echo",
        "=lua+other": "lua/other",
    }
    path = write_app(tmp_path, config, {"echo": "x = 1\n", "other": "x = 2\n"})
    with ServerProcess(path) as server:
        console = Console(admin_ports(server)["console"])
        try:
            server.wait_for(lambda: any("linked to process 2" in line for line in server.lines), what="the link")
            for wrong in ("0", "3", "x", "²", "٢"):  # Unicode digits pass str.isdigit, not int()
                assert console.ask(f"restart {wrong}")[-1] == f"ERROR no process {wrong!r} (1 to 2)"
            assert console.ask("restart 2")[-1] == "OK"
            server.wait_for(
                lambda: any("link to process 2 closed (stopping)" in line for line in server.lines), what="the stop"
            )
        finally:
            console.close()
        assert not any("link to process 2 lost" in line for line in server.lines)


def test_json_lines_keep_each_child_record_level_and_namespace(tmp_path: Path) -> None:
    config = {"#startup": [["=lua+echo"]], "=lua+echo": "lua/echo"}
    path = write_app(tmp_path, config, {"echo": 'error("no database configured")\n'})
    twistd = str(Path(sys.executable).with_name("twistd"))
    command = [twistd, "--logger=stagetx.logsetup.json_observer", "-n", "--pidfile=", "stage", "-c", str(path)]
    server = subprocess.Popen(
        [*command, "--log-format", "json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": env_path()},
        stdout=subprocess.PIPE,
        text=True,
    )
    records = []
    try:
        assert server.stdout is not None
        for line in server.stdout:  # bounded: the server logs the failure within its start-up
            records.append(json.loads(line))
            if "stage =lua+echo failed" in records[-1].get("line", ""):
                break
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    failure = records[-1]
    assert failure["log_namespace"] == "stage.echo" and failure["log_level"] == "error", failure
    assert failure["process"] == 1 and isinstance(failure["pid"], int)
    assert all(isinstance(r["log_level"], str) for r in records)


def _rss_mib(pid: int) -> float:
    """The resident memory of process ``pid``, from ``/proc``."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024  # type: ignore[union-attr]


def test_a_console_client_that_never_reads_stops_being_read_and_keeps_memory_bounded(tmp_path: Path) -> None:
    path = write_app(tmp_path, _config(), {"echo": SERVED.format(version=1, port=free_port())})
    with ServerProcess(path) as server:
        port = admin_ports(server)["console"]
        before = _rss_mib(server.process.pid)
        hostile = socket.socket()
        hostile.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        hostile.connect(("127.0.0.1", port))
        hostile.setblocking(False)
        # 2-byte commands answered with 37 bytes each, never read: at most 8 MiB or 20 s of them
        chunk, sent, blocked, deadline = b"x\n" * 32768, 0, False, time.monotonic() + 20
        try:
            while sent < 8 << 20 and time.monotonic() < deadline:
                if not select.select([], [hostile], [], 2.0)[1]:
                    blocked = True  # the server stopped reading: nothing drained in 2 s
                    break
                with contextlib.suppress(BlockingIOError):
                    sent += hostile.send(chunk)
            assert blocked, f"the server kept reading commands whose answers are not read ({sent} bytes)"
            assert _rss_mib(server.process.pid) - before < 32
            console = Console(port)
            try:
                assert console.ask("help")[-1] == "OK"
            finally:
                console.close()
            # once the client reads, every command it sent is answered, in order
            hostile.setblocking(True)
            hostile.settimeout(20)
            answers, wanted = b"", sent // 2 * len(b"ERROR unknown command 'x' (try help)\n")
            while len(answers) < wanted:
                data = hostile.recv(1 << 20)
                assert data, "console closed"
                answers += data
            assert answers == b"ERROR unknown command 'x' (try help)\n" * (sent // 2)
        finally:
            hostile.close()


def _read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes ``sock`` (within the socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _ask_once(port: int, line: str) -> list[str]:
    """``line``'s answer on a new console connection."""
    console = Console(port)
    try:
        return console.ask(line)
    finally:
        console.close()


def test_idle_admin_connections_are_capped_and_a_crashed_process_still_restarts(tmp_path: Path) -> None:
    path = write_app(tmp_path, _config(), {"echo": SERVED.format(version=1, port=free_port())})
    limit = ("prlimit", "--nofile=256:256") if shutil.which("prlimit") else ()  # fewer than the idle clients
    with ServerProcess(path, prefix=limit) as server:
        ports = admin_ports(server)
        idle: dict[str, list[socket.socket]] = {"console": [], "http": []}
        try:
            for _ in range(150):  # 300 idle connections, more than the supervisor has descriptors for
                for kind, port in ports.items():
                    idle[kind].append(socket.create_connection(("127.0.0.1", port), timeout=10))
            assert _read_all(idle["console"][-1]) == b"ERROR too many console connections (64 open)\n"
            assert _read_all(idle["http"][-1]).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            idle["console"][0].setblocking(False)
            with pytest.raises(BlockingIOError):  # the first 64 stay open
                idle["console"][0].recv(1)
            pid = server.pids(0)[-1]
            os.kill(pid, signal.SIGKILL)
            server.wait_for(lambda: len(server.pids(0)) == 2, what="process 1 restarted")
            server.wait_for(
                lambda: sum("] process 1 ready, pid" in line for line in server.lines) == 2, what="process 1 ready"
            )
        finally:
            for sock in idle["console"] + idle["http"]:
                sock.close()
        # the idle ones closed (the server learns it as it reads): both ports take new clients again
        server.wait_for(lambda: http(ports["http"], "/health")[0] == 200, what="the http port answering again")
        server.wait_for(lambda: _ask_once(ports["console"], "list")[-1] == "OK", what="the console answering again")
        assert not any("cannot start" in line or "Too many open files" in line for line in server.lines)


def test_an_eval_answer_too_large_for_the_control_link_is_an_error_at_once(tmp_path: Path) -> None:
    path = write_app(tmp_path, _config(), {"echo": SERVED.format(version=1, port=free_port())})
    with ServerProcess(path) as server:
        console = Console(admin_ports(server)["console"])
        try:
            started = time.monotonic()
            answer = console.ask("eval echo string.rep('x', 20 * 1024 * 1024)")  # over the 16 MiB frame limit
            assert answer[-1].startswith("ERROR eval: the answer is too large for the control link (message of ")
            assert time.monotonic() - started < 5  # not the 10 s command timeout
            assert console.ask("eval echo #string.rep('x', 1000)") == ["1000", "OK"]
        finally:
            console.close()
        assert not any("Unhandled error" in line for line in server.lines)
