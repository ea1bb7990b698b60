"""The cluster port of a real server, attacked over loopback TCP (issue 10; docs/cluster.md).

Peer restart and a peer server with another secret are in tests/e2e/test_cluster_e2e.py; here an
outside client binds nothing but attacks the port: where it listens, a wrong secret, an oversized
frame before authentication, a replayed frame and a frame cut in the middle. The server must
refuse each as docs/wire.md says and keep serving.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from stagetx.wire import HANDSHAKE_MAX_FRAME
from tests.reliability.control import ask
from tests.reliability.procs import LUA_APP
from tests.reliability.raw_link import closed_by_peer, connect, handshake, send_now
from tests.support import ServerProcess, free_port, wait_until, write_app

SECRET = "cluster-secret"
A = """
broker.ready("tcp://127.0.0.1:{port}?text", function() return function() return "pong" end end)
log4cxx.info("ready")
"""


class Server:
    def __init__(self, process: ServerProcess, control: int, cluster: int) -> None:
        self.process, self.control, self.cluster = process, control, cluster

    def logged(self, text: str) -> int:
        return sum(text in line for line in list(self.process.lines))

    def healthy(self) -> None:
        assert ask(self.control, "ping") == "pong"
        assert self.process.process.poll() is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cluster")
    control, cluster = free_port(), free_port()
    config = {"#secret": SECRET, "#cluster": [cluster], "#startup": [["=lua+a"]], "=lua": {**LUA_APP, "=lua+a": "a"}}
    with ServerProcess(write_app(root, config, {"a": A.format(port=control)})) as process:
        process.wait_for(lambda: bool(process.logged("a", "ready")), 30, "the server")
        wait_until(lambda: _listening(cluster) != [], 20, "the cluster port")
        yield Server(process, control, cluster)
        log = "\n".join(process.lines)
    assert "Traceback" not in log


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as the kernel shows them) of sockets listening on TCP ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].rsplit(":", 1)
                if int(hex_port, 16) == port and fields[3] == "0A":
                    found.append(address)
    return found


def test_the_cluster_port_listens_on_loopback_only(server: Server) -> None:
    assert _listening(server.cluster) == ["0100007F"]  # 127.0.0.1, and no IPv6 or wildcard socket


def test_a_stranger_with_the_wrong_secret_is_refused(server: Server) -> None:
    before = server.logged("refused: bad secret")
    link, transport = handshake(("127.0.0.1", server.cluster), b"guess", "intruder")
    assert not link.authenticated and closed_by_peer(transport.sock)  # whichever side saw it first
    transport.sock.close()
    # the server logs the refusal when it read our proof before we, seeing its proof, hung up
    # (a reset can discard our proof unread): then our side refused, which the link records
    wait_until(lambda: server.logged("refused: bad secret") > before or link._dead, 5, "the refusal")
    server.healthy()


def test_an_oversized_frame_before_authentication_is_refused_unread(server: Server) -> None:
    with connect(("127.0.0.1", server.cluster)) as sock:
        sock.sendall(struct.pack("<I", 8 << 20) + b"x" * 1000)
        assert closed_by_peer(sock)
    wait_until(lambda: server.logged(f"over the limit of {HANDSHAKE_MAX_FRAME}") > 0, 5, "the refusal")
    server.healthy()


def test_a_replayed_frame_from_an_authenticated_peer_drops_its_link(server: Server) -> None:
    link, transport = handshake(("127.0.0.1", server.cluster), SECRET.encode(), "replayer")
    assert link.authenticated
    frame = send_now(link, transport, ["ping-unknown-kind"])
    before = server.logged("bad frame tag")
    transport.sock.sendall(frame)
    assert closed_by_peer(transport.sock)
    transport.sock.close()
    wait_until(lambda: server.logged("bad frame tag") > before, 5, "the replay refusal")
    server.healthy()


def test_a_link_cut_mid_frame_is_just_gone(server: Server) -> None:
    link, transport = handshake(("127.0.0.1", server.cluster), SECRET.encode(), "cutter")
    assert link.authenticated
    frame = send_now(link, transport, ["ping-unknown-kind"])
    transport.sock.sendall(frame[: len(frame) // 2])
    transport.sock.close()
    server.healthy()
