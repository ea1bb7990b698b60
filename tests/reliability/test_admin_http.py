"""The admin HTTP port under hostile requests (a real ``twistd stage``, real loopback sockets):
a 200 MiB upload is answered 401/413 on its headers, with nothing spooled to a temporary file;
a NUL byte in a ``/static`` path is a clean 404."""

from __future__ import annotations

import os
import re
import select
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import ServerProcess, write_app

TOKEN = "s3cret"
UPLOAD = 200 << 20
CHUNK = b"x" * (1 << 20)


def _admin_port(server: ServerProcess) -> int:
    server.wait_for(lambda: any("] ready: " in line for line in server.lines), what="the ready line")
    for line in server.lines:
        found = re.search(r"admin http listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("no admin http port in the log")


def _temp_files(pid: int, directory: Path) -> list[str]:
    """The files under ``directory`` that process ``pid`` holds open (unnamed O_TMPFILE ones too)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(directory)) and not target.startswith("socket:"):
            held.append(target)
    return held


def _upload(
    server: ServerProcess, temp: Path, path: str, headers: str, probe: int = 16 << 20
) -> tuple[int, int, list[str]]:
    """POST a body announced as ``UPLOAD`` bytes, streaming it until the server answers.

    Returns the status, how many body bytes went out before the answer came, and the files under
    ``temp`` the server held when ``probe`` bytes had gone out (or at the answer, if earlier).
    """
    port, pid, total = _admin_port(server), server.process.pid, UPLOAD
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: admin\r\n{headers}Content-Length: {total}\r\n\r\n".encode())
        sent, held, answer = 0, None, b""
        sock.setblocking(False)
        while b"\r\n" not in answer:
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 20)
            assert readable or writable, "neither an answer nor room to send for 20 s"
            if readable:
                data = sock.recv(65536)
                assert data, f"closed without an answer after {sent} bytes"
                answer += data
            elif writable:
                sent += sock.send(CHUNK[: total - sent])
                if held is None and sent >= probe:
                    held = _temp_files(pid, temp)
        if held is None:
            held = _temp_files(pid, temp)
        return int(answer.split()[1]), sent, held
    finally:
        sock.close()


def _ask(port: int, path: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_an_oversized_or_unauthenticated_upload_is_refused_on_its_headers(tmp_path: Path, monkeypatch) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # where twisted.web would spool a large body
    admin = {"http": "tcp:0:interface=127.0.0.1", "token": TOKEN}
    path = write_app(tmp_path, {"#startup": [["=lua+app"]], "#admin": admin, "=lua+app": "lua/app"}, {"app": ""})
    with ServerProcess(path) as server:
        port = _admin_port(server)
        status, sent, held = _upload(server, temp, "/cmd", "")
        assert status == 401 and sent < UPLOAD // 2 and held == []
        status, sent, held = _upload(server, temp, "/api", f"Authorization: Bearer {TOKEN}\r\n")
        assert status == 413 and sent < UPLOAD // 2 and held == []
        # a chunked body has no length to judge: it is cut off at the limit
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        head = (
            f"POST /cmd HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode() + b"10000\r\n" + b"x" * 0x10000 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
        sock.close()
        # what is allowed still works: a small authenticated POST, and GETs
        assert _ask(port, "/cmd", b"list") == 200
        assert _ask(port, "/health") == 200
        assert _ask(port, "/static/app.js%00.png") == 404
        assert _ask(port, "/static/%00") == 404
        assert _ask(port, "/static/app.js") == 200
    assert list(temp.iterdir()) == [] or all(p.is_dir() for p in temp.iterdir())
    assert not [line for line in server.lines if "Traceback" in line or "CRITICAL" in line.upper()[:80]]


def test_a_request_trickled_a_byte_at_a_time_is_answered_408_and_closed(tmp_path: Path) -> None:
    admin = {"http": "tcp:0:interface=127.0.0.1", "token": TOKEN}
    path = write_app(tmp_path, {"#startup": [["=lua+app"]], "#admin": admin, "=lua+app": "lua/app"}, {"app": ""})
    with ServerProcess(path) as server:
        port = _admin_port(server)
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        try:
            head = f"GET /health HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
            answer, sent, started = b"", 0, time.monotonic()
            while not answer and time.monotonic() - started < 25:  # one byte of the head at most each 0.5 s
                if select.select([sock], [], [], 0.5)[0]:
                    answer = sock.recv(65536)
                elif sent < len(head):
                    sock.sendall(head[sent : sent + 1])
                    sent += 1
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
            assert 9 < time.monotonic() - started < 15 and sent < len(head)
            answer += _read_until_closed(sock)
            assert answer.endswith(b"ERROR no whole request within 10 s\n")
        finally:
            sock.close()
        assert _ask(port, "/health") == 200


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
