"""The shipped client as a new user meets it, against the real default application: numbers out of
range, one-shot ``help``, a reader that closes the pipe, and the prompt's line editing and history
at a real terminal (a pseudo-terminal)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stagetx.client.connection import Connection
from stagetx.client.protocol import Command
from tests.e2e.test_default_app import App
from tests.support import env_path

CLIENT = [sys.executable, "-m", "stagetx.client"]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    running = App(tmp_path_factory.mktemp("cli")).start()
    yield running
    running.stop()


def _run(app: App, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLIENT, "--port", str(app.port), *args],
        env={**os.environ, "PYTHONPATH": env_path()},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_number_out_of_range_is_a_usage_error(app: App) -> None:
    done = _run(app, "login dora; score 99999999999999999999; top 1e999")
    assert done.returncode == 1 and done.stderr == ""
    assert "error: POINTS is out of range" in done.stdout
    assert "error: N must be a finite number, not '1e999'" in done.stdout


def test_a_command_too_long_to_send_is_an_error_and_the_session_goes_on(app: App) -> None:
    """The request over the server's 16 KiB limit is refused before sending; it used to end the
    client (a prompt session too) with a ProtocolError traceback."""
    done = _run(app, f"login ivy; join lobby; say lobby {'x' * 20000}; top 1")
    assert done.returncode == 1 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[2].startswith("error: a request of ") and lines[2].endswith(" bytes is over the server's 16384")
    assert lines[-1].endswith("ranked)")  # the next command was still sent and answered


def test_help_works_one_shot(app: App) -> None:
    done = _run(app, "help")
    assert (done.returncode, done.stderr) == (0, "")
    assert "score POINTS" in done.stdout and "unknown command" not in done.stdout


def test_a_closed_pipe_ends_the_client_quietly(app: App) -> None:
    client = subprocess.Popen(
        [*CLIENT, "--port", str(app.port)],
        env={**os.environ, "PYTHONPATH": env_path()},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None and client.stderr is not None
    client.stdin.write("login erin\n")
    client.stdin.flush()
    assert "logged in as erin" in client.stdout.readline()
    client.stdout.close()  # the reader goes away, as `| head -1` does
    client.stdin.write("top 3\n")  # its reply meets the closed pipe
    client.stdin.flush()
    assert client.wait(30) == 1
    assert client.stderr.read() == ""


def _read_until(fd: int, wanted: bytes, seen: bytearray, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} in {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            seen += os.read(fd, 4096)


def test_the_prompt_has_line_editing_and_history(app: App) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the client, at a terminal
        os.environ["PYTHONPATH"] = env_path()
        os.execv(sys.executable, [*CLIENT, "--port", str(app.port)])
    try:
        seen = bytearray()
        prompt = f"127.0.0.1:{app.port}> ".encode()

        def answer(keys: bytes, expected: bytes) -> bytes:
            """Type ``keys`` once the prompt is drawn (readline reads the terminal by then); the
            output up to the next prompt, which must hold ``expected``."""
            _read_until(fd, prompt, seen)
            del seen[: seen.index(prompt) + len(prompt)]
            os.write(fd, keys)
            _read_until(fd, expected, seen)
            _read_until(fd, prompt, seen)
            return bytes(seen[: seen.index(prompt)])

        answer(b"login fred\r", b"logged in as fred")
        answer(b"top 2\r", b"ranked)")
        again = answer(b"\x1b[A\r", b"ranked)")  # Up: the last line again, from the history
        assert b"top 2" in again and b"unknown command" not in again and b"^[[A" not in again
        edited = answer(b"top 19\x1b[D\x7f\r", b"ranked)")  # Left, Backspace: "top 9"
        assert b"unknown command" not in edited
        _read_until(fd, prompt, seen)
        os.write(fd, b"quit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _ask(app: App, *commands: Command) -> list[dict[str, Any]]:
    """Log in as a fresh user, then send ``commands``; their replies."""

    async def session() -> list[dict[str, Any]]:
        connection = await Connection.open("127.0.0.1", app.port, 10.0)
        try:
            assert (await connection.request(Command("login", {"user": f"probe{time.monotonic_ns()}"}), 10.0))["ok"]
            return [await connection.request(command, 10.0) for command in commands]
        finally:
            await connection.close()

    return asyncio.run(session())


def test_the_load_tool_ranks_on_its_own_board_and_leaves_it_empty(app: App) -> None:
    assert _run(app, "login gina; score 77").returncode == 0
    (before,) = _ask(app, Command("top", {"n": 100}))
    done = _run(app, "load", "--players", "3", "--seconds", "2", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["ops"]["score"]["count"] > 0 and summary["errors"] == 0
    real, load, wrong = _ask(
        app, Command("top", {"n": 100}), Command("top", {"board": "load"}), Command("top", {"board": "other"})
    )
    assert real["rows"] == before["rows"] and real["total"] == before["total"] >= 1  # no simulated player
    assert load["ok"] and load["total"] == 0 and "rows" not in load  # every player removed its entry
    assert wrong == {"re": wrong["re"], "ok": False, "error": "board: scores or load"}
