"""Clients that do not read, half-close or vanish, against a real server's broker ports.

A ``twistd -n stage`` server answers text lines: ``big`` with 1 KiB, ``ping`` with ``pong``,
``flood`` with 8 MiB at once, ``late`` 300 ms later. A client pipelining 100,000 ``big`` requests
without reading must cost the server a bounded amount of memory (reading stops past ``outbuf``)
while another client keeps its answers; a peer that gets more than ``outmax`` unread is dropped;
a half-closed client still gets its replies, then the end of the stream; a client that vanishes
behind a cut link is freed by idle expiry.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.reliability.control import ask
from tests.reliability.procs import LUA_APP, group_pids, rss_mib
from tests.support import ServerProcess, free_port, write_app

SCRIPT = """
local big = string.rep("x", 1023)
local function serve(s, line)
    if line == "big" then return big end
    if line == "ping" then return "pong" end
    if line == "flood" then
        for i = 1, 8192 do
            if broker.signal({{s.id}}, big) ~= true then break end
        end
        return
    end
    if line == "late" then
        stage.addtask(300, function() broker.signal({{s.id}}, "late reply") end)
        return
    end
end
broker.ready("tcp://127.0.0.1:{port}?text", function() return serve end)
broker.ready("tcp://127.0.0.1:{small}?text&outbuf=64k&outmax=1m", function() return serve end)
log4cxx.info("ready")
"""
REQUESTS = 100_000


def _server(tmp_path: Path) -> tuple[ServerProcess, int, int]:
    port, small = free_port(), free_port()
    config = {"#startup": [["=lua+a"]], "=lua": {**LUA_APP, "=lua+a": "a"}}
    path = write_app(tmp_path, config, {"a": SCRIPT.format(port=port, small=small)})
    return ServerProcess(path), port, small


def _pipeline_without_reading(port: int, seconds: float, hold: float) -> int:
    """Send up to REQUESTS ``big`` lines, never reading, for at most ``seconds``; keep the
    connection open ``hold`` seconds more; how many went out."""
    line = b"big\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setblocking(False)
        pending = line * REQUESTS
        sent = 0
        deadline = time.monotonic() + seconds
        while sent < len(pending) and time.monotonic() < deadline:
            try:
                sent += conn.send(pending[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)  # the server stopped reading: its kernel buffers are full
        time.sleep(hold)  # the connection stays open, unread, while the other player plays
        return sent // len(line)


def test_a_client_pipelining_without_reading_costs_bounded_memory(tmp_path: Path) -> None:
    server, port, _ = _server(tmp_path)
    with server:
        server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the broker port")
        pid = group_pids(server)[0]
        assert ask(port, "ping") == "pong"
        idle_rss = rss_mib(pid)
        latencies: list[float] = []
        done = threading.Event()

        def other_player() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                reader = conn.makefile("rb")
                while not done.is_set():
                    started = time.monotonic()
                    conn.sendall(b"ping\n")
                    assert reader.readline() == b"pong\n"
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.02)

        player = threading.Thread(target=other_player, daemon=True)
        player.start()
        try:
            sent = _pipeline_without_reading(port, seconds=8.0, hold=4.0)
            peak_rss = rss_mib(pid)
        finally:
            done.set()
            player.join(15)
        assert not player.is_alive()
        assert ask(port, "ping") == "pong"
    growth = peak_rss - idle_rss
    print(f"pipelined {sent} requests; RSS {idle_rss:.1f} → {peak_rss:.1f} MiB; {len(latencies)} pings")
    # unbounded, the replies to what was sent would be sent × 1 KiB (about 100 MiB)
    assert growth < 16, f"RSS grew {growth:.1f} MiB while a client did not read"
    assert len(latencies) > 50
    p99 = statistics.quantiles(latencies, n=100)[98]
    median = statistics.median(latencies)
    print(f"other player: {len(latencies)} pings, median {median * 1000:.1f} ms, p99 {p99 * 1000:.0f} ms")
    assert p99 < 1.0, f"other player's p99 {p99 * 1000:.0f} ms"


def test_a_peer_that_does_not_read_past_outmax_is_dropped_and_logged(tmp_path: Path) -> None:
    server, port, small = _server(tmp_path)
    with server:
        server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the broker port")
        with socket.create_connection(("127.0.0.1", small), timeout=20) as conn:
            conn.sendall(b"flood\n")  # 8 MiB of replies, never read
            server.wait_for(lambda: any("over outmax" in line for line in server.lines), 20, "the drop")
            conn.settimeout(20)
            received = 0
            try:
                while chunk := conn.recv(1 << 20):
                    received += len(chunk)
            except ConnectionResetError:
                pass
        assert received < 4 << 20  # the rest was dropped with the connection
        assert ask(small, "ping") == "pong"


def test_a_half_closed_client_gets_the_replies_due_then_the_end(tmp_path: Path) -> None:
    server, port, _ = _server(tmp_path)
    with server:
        server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the broker port")
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"ping\nlate\nping\n")
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65536):  # ends when the server closes
                data += chunk
        assert data == b"pong\npong\nlate reply\n"


VANISHING = """
local big = string.rep("x", 1023)
local l = broker.ready("tcp://{host}:{port}?text", function()
    return function(s, line)
        if line == "flood" then  -- more than the peer's windows hold: output waits for it
            for i = 1, 4096 do broker.signal({{s.id}}, big) end
            log4cxx.info("flooded", s.id)
        end
    end
end)
l.expire = {expire}
l.close = function(s) log4cxx.info("closed", s.id) end
log4cxx.info("ready")
"""
# A client that asks for the flood and then never reads (run in the namespace).
CLIENT = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
conn.sendall(b"flood\\n")
print("sent", flush=True)
time.sleep(60)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def test_a_vanished_client_is_freed_within_expire_plus_one_second(tmp_path: Path) -> None:
    """A client in a network namespace of its own, behind a veth pair the test makes, vanishes
    (the link is cut) while output waits for it: idle expiry aborts its connection."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip) for a network namespace")
    ns, host_if, ns_if = f"i21b-ns-{os.getpid()}", f"i21b-h{os.getpid() % 100000}", f"i21b-c{os.getpid() % 100000}"
    server_ip, client_ip = "10.221.21.1", "10.221.21.2"
    expire_ms = 2000
    client = None
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{server_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{client_ip}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        port = free_port()
        config = {"#startup": [["=lua+a"]], "=lua": {**LUA_APP, "=lua+a": "a"}}
        script = VANISHING.format(host=server_ip, port=port, expire=expire_ms)
        path = write_app(tmp_path, config, {"a": script})
        with ServerProcess(path) as server:
            server.wait_for(lambda: bool(server.logged("a", "ready")), 30, "the broker port")
            client = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, server_ip, str(port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout is not None and client.stdout.readline() == "sent\n"
            server.wait_for(lambda: bool(server.logged("a", "flooded")), 20, "the flood")
            _ip("link", "set", host_if, "down")  # the client vanishes: nothing it could send or ack
            cut = time.monotonic()
            server.wait_for(lambda: bool(server.logged("a", "closed")), 30, "the close callback")
            freed = time.monotonic() - cut
            print(f"vanished client freed {freed:.2f} s after the cut (expire {expire_ms} ms)")
            assert freed <= expire_ms / 1000 + 1.0, f"freed {freed:.1f} s after the cut"
    finally:
        if client is not None:
            client.kill()
            client.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_default_app_bounds_a_player_pipelining_top_100_without_reading(tmp_path: Path) -> None:
    """The issue's case: ``top 100`` pipelined without reading. ``inflight=64`` on the front's
    port stops reading that player, so neither the front nor the index process grows, and other
    players keep their answers."""
    import bson

    from tests.e2e.test_default_app import App

    app = App(tmp_path).start()
    try:
        assert app.server is not None
        code, _ = app.client("login carol; score 10")
        assert code == 0
        pids = group_pids(app.server)
        before = {group: rss_mib(pid) for group, pid in pids.items()}
        with socket.create_connection(("127.0.0.1", app.port), timeout=20) as conn:
            conn.sendall(bson.encode({"op": "login", "id": 0, "user": "dave"}))
            length = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "little")
            assert bson.decode(length.to_bytes(4, "little") + conn.recv(length - 4, socket.MSG_WAITALL))["ok"]
            conn.setblocking(False)
            pending = b"".join(bson.encode({"op": "top", "id": i, "n": 100}) for i in range(1, REQUESTS + 1))
            sent, deadline = 0, time.monotonic() + 8.0
            while sent < len(pending) and time.monotonic() < deadline:
                try:
                    sent += conn.send(pending[sent : sent + 65536])
                except BlockingIOError:
                    time.sleep(0.01)
            latencies = []
            for _ in range(5):  # other players meanwhile, each a whole client run
                started = time.monotonic()
                code, replies = app.client("login erin; top 3")
                latencies.append(time.monotonic() - started)
                assert code == 0 and replies[1]["ok"]
            after = {group: rss_mib(pid) for group, pid in pids.items()}
        growth = {group: after[group] - before[group] for group in pids}
        print(f"sent {sent // 1024} KiB of top 100; RSS growth {growth} MiB; clients {latencies}")
        assert all(g < 16 for g in growth.values()), f"RSS growth per process {growth} MiB"
        assert max(latencies) < 10.0
        late = [line for line in app.server.lines if "no handler for message '~" in line]
        assert not late
    finally:
        app.stop()
