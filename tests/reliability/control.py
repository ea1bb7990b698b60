"""A line client of a text broker port: the tests' remote control of a Lua stage in a real server."""

from __future__ import annotations

import socket


def ask(port: int, line: str, timeout: float = 20.0) -> str:
    """Send one line to the stage listening on ``port``; its one-line answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(line.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed before an answer to {line!r}")
            answer += chunk
    return answer[:-1].decode()
