"""The links between the processes of a real server, attacked from outside (issue 10).

One ``twistd -n stage`` server with two processes and ``#secret``; the test reaches the process
link sockets in the run directory as the same user could, with a real ``Link`` over a blocking
socket or with raw bytes: a wrong secret, oversized and garbage frames before authentication, a
replayed frame, a frame cut in the middle. Each is refused as docs/wire.md says, and the server
keeps linking its own processes (checked by a message round trip across them after each).
"""

from __future__ import annotations

import glob
import os
import stat
import struct
from collections.abc import Iterator

import pytest

from stagetx.wire import HANDSHAKE_MAX_FRAME
from tests.reliability.control import ask
from tests.reliability.procs import LUA_APP
from tests.reliability.raw_link import closed_by_peer, connect, handshake, send_now
from tests.support import ServerProcess, free_port, wait_until, write_app

SECRET = "s3cret"
A = """
local replies = 0
stage.waitfor("done", function() replies = replies + 1 end)
broker.ready("tcp://127.0.0.1:{port}?text", function()
    return function(s, line)
        if line == "ping" then stage.signal("b:work=done"); return "pong" end
        return tostring(replies)
    end
end)
log4cxx.info("ready")
"""
B = 'stage.waitfor("work", function() return true end)\n'


class Server:
    def __init__(self, process: ServerProcess, port: int, rundir: str) -> None:
        self.process, self.port, self.rundir = process, port, rundir

    def healthy(self) -> None:
        """A message from process 1 to process 2 and its reply still make the round trip."""
        before = int(ask(self.port, "replies"))
        assert ask(self.port, "ping") == "pong"
        wait_until(lambda: int(ask(self.port, "replies")) > before, 10, "a reply across the process link")

    def logged(self, text: str) -> int:
        return sum(text in line for line in list(self.process.lines))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("links")
    tmp = root / "tmp"
    tmp.mkdir()
    port = free_port()
    lua = {**LUA_APP, "=lua+a": "a", "=lua+b": "b"}
    config = {"#secret": SECRET, "#startup": [["=lua+a"], ["=lua+b"]], "=lua": lua}
    path = write_app(root, config, {"a": A.format(port=port), "b": B})
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)  # the run directory is made under the supervisor's TMPDIR
    try:
        process = ServerProcess(path)
    finally:
        os.environ.pop("TMPDIR") if old is None else os.environ.__setitem__("TMPDIR", old)
    with process:
        process.wait_for(lambda: sum("linked to process" in line for line in process.lines) >= 2, 30, "the links")
        process.wait_for(lambda: bool(process.logged("a", "ready")), 30, "stage a")
        (rundir,) = glob.glob(str(tmp / "stagetx-*"))
        yield Server(process, port, rundir)
        log = "\n".join(process.lines)
    assert "Traceback" not in log


def test_the_run_directory_is_private_and_its_sockets_owner_only(server: Server) -> None:
    info = os.stat(server.rundir)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    sockets = sorted(os.listdir(server.rundir))
    assert {"g0.sock", "g1.sock"} <= set(sockets)
    for name in sockets:
        mode = os.stat(os.path.join(server.rundir, name)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, (name, oct(mode))


def test_a_peer_with_the_wrong_secret_is_refused(server: Server) -> None:
    before = server.logged("refused: bad secret")
    link, transport = handshake(os.path.join(server.rundir, "g0.sock"), b"not the secret", "g1")
    assert not link.authenticated
    assert closed_by_peer(transport.sock)
    transport.sock.close()
    wait_until(lambda: server.logged("refused: bad secret") > before, 5, "the refusal in the log")
    server.healthy()


def test_oversized_and_garbage_frames_before_authentication_are_refused_unread(server: Server) -> None:
    path = os.path.join(server.rundir, "g1.sock")
    with connect(path) as sock:  # announces 1 MiB: refused on the length alone
        sock.sendall(struct.pack("<I", 1 << 20) + b"x" * 100)
        assert closed_by_peer(sock)
    with connect(path) as sock:  # a well-framed HELLO that is not one
        sock.sendall(struct.pack("<I", 40) + b"HTTP/1.1 200 OK\r\n" + b"x" * 23)
        assert closed_by_peer(sock)
    wait_until(lambda: server.logged(f"over the limit of {HANDSHAKE_MAX_FRAME}") >= 1, 5, "the size refusal")
    wait_until(lambda: server.logged("not a stagetx peer") >= 1, 5, "the garbage refusal")
    server.healthy()


def test_a_replayed_frame_drops_the_link(server: Server) -> None:
    secret = SECRET.encode()
    link, transport = handshake(os.path.join(server.rundir, "g0.sock"), secret, "g1")
    assert link.authenticated  # whoever holds #secret is a process of this server (threat model)
    data_frame = send_now(link, transport, ["delay", 0.0])
    before = server.logged("bad frame tag")
    transport.sock.sendall(data_frame)  # the same bytes again: the tag was for sequence 0
    assert closed_by_peer(transport.sock)
    transport.sock.close()
    wait_until(lambda: server.logged("bad frame tag") > before, 5, "the replay refusal")
    server.healthy()


def test_a_link_cut_in_the_middle_of_a_frame_is_just_gone(server: Server) -> None:
    link, transport = handshake(os.path.join(server.rundir, "g0.sock"), SECRET.encode(), "g1")
    assert link.authenticated
    frame = send_now(link, transport, ["delay", 0.0])
    transport.sock.sendall(frame + frame[:10])  # one whole frame, then half a header and body
    transport.sock.close()
    server.healthy()
    for _ in range(3):  # and again, cut inside the handshake itself
        with connect(os.path.join(server.rundir, "g0.sock")) as sock:
            sock.sendall(struct.pack("<I", 40) + b"STGX")
    server.healthy()
