"""2,000 idle WebSocket clients held on a real server's ws port, with fuzzers among them: every idle
client stays open, a client that talks still gets its echo, and the server's memory per idle
connection stays bounded (docs/broker.md, "WebSocket")."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from tests.e2e.test_broker_websocket import _ws_ask
from tests.reliability.procs import LUA_APP, group_pids, raise_nofile, rss_mib
from tests.support import ServerProcess, free_port, write_app

IDLE = 2000
SCRIPT = """
broker.ready("ws://127.0.0.1:{port}/?text=1k,1k", function()
    return function(s, data) return data end
end)
log4cxx.info("ready")
"""
UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _upgrade(port: int) -> socket.socket:
    """A WebSocket connection that has finished its handshake and then says nothing."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(UPGRADE.format(port=port).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, "the server closed a connection during its handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    return conn


def test_2000_idle_websocket_clients_are_held_beside_fuzzers(tmp_path: Path) -> None:
    raise_nofile(IDLE + 1000)
    port = free_port()
    config = {"#startup": [["=lua+a"]], "=lua": {**LUA_APP, "=lua+a": "a"}}
    path = write_app(tmp_path, config, {"a": SCRIPT.format(port=port)})
    held: list[socket.socket] = []
    with ServerProcess(path) as server:
        server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the ws port")
        pid = group_pids(server)[0]
        assert _ws_ask(port, "warm-up") == "warm-up"
        before = rss_mib(pid)
        try:
            for _ in range(IDLE):
                held.append(_upgrade(port))
            after = rss_mib(pid)
            rng = random.Random(29)
            for _ in range(20):  # fuzzers: random bytes after the handshake
                fuzzer = _upgrade(port)
                fuzzer.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 500))))
                fuzzer.close()
            assert _ws_ask(port, "still served") == "still served"
            for conn in held[:: IDLE // 20]:  # a sample of the idle ones: still open (no EOF waiting)
                conn.setblocking(False)
                try:
                    assert conn.recv(1) != b"", "an idle client was disconnected"
                except BlockingIOError:
                    pass
            assert server.process.poll() is None
        finally:
            for conn in held:
                conn.close()
    per_connection_kib = (after - before) * 1024 / IDLE
    print(f"server memory per idle WebSocket connection: {per_connection_kib:.1f} KiB")
    assert per_connection_kib < 64, f"{per_connection_kib:.1f} KiB per idle WebSocket connection"
