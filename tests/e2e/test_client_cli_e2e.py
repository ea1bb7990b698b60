"""The shipped client as a new user meets it, against the real default application: numbers out of
range, one-shot ``help``, a reader that closes the pipe, and the prompt's line editing and history
at a real terminal (a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

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
        _read_until(fd, prompt, seen)
        os.write(fd, b"login fred\r")
        _read_until(fd, b"logged in as fred", seen)
        os.write(fd, b"top 2\r")
        _read_until(fd, b"ranked)", seen)
        del seen[:]
        os.write(fd, b"\x1b[A\r")  # Up: the last line again, from the history
        _read_until(fd, b"ranked)", seen)
        assert b"unknown command" not in seen and b"^[[A" not in seen
        del seen[:]
        os.write(fd, b"top 19\x1b[D\x7f\r")  # Left, Backspace: "top 9"
        _read_until(fd, b"ranked)", seen)
        assert b"unknown command" not in seen
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
