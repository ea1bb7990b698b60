"""broker over WebSocket (``ws://``) through a real Lua stage, real loopback sockets and a client
speaking RFC 6455 with wsproto (plus raw frames for what a well-behaved client never sends)."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import struct
import textwrap
import time
from pathlib import Path
from typing import Any

import bson
import pytest
import pytest_twisted
import treq
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from stagetx.broker import websocket
from tests.support import PacketClient, RunningStage, ServerProcess, free_port, wait_for, write_app

WAIT = 5.0


class WsClient(protocol.Protocol):
    """A WebSocket client: whole messages in ``messages``, the server's close code in ``code``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.opened = False
        self.rejected: int | None = None
        self.body = b""
        self.messages: list[str | bytes] = []
        self.pongs: list[bytes] = []
        self.code: int | None = None
        self.closed = False
        self._parts: list[Any] = []

    def connectionMade(self) -> None:
        self.transport.write(self.ws.send(Request(host="127.0.0.1", target=self.path)))

    def dataReceived(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.opened = True
            elif isinstance(event, RejectConnection):
                self.rejected = event.status_code
            elif isinstance(event, RejectData):
                self.body += event.data
            elif isinstance(event, (TextMessage, BytesMessage)):
                self._parts.append(event.data)
                if event.message_finished:
                    whole = "".join(self._parts) if isinstance(event, TextMessage) else b"".join(self._parts)
                    self.messages.append(whole)
                    self._parts = []
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                self.code = event.code
                if self.ws.state is not ConnectionState.CLOSED:
                    self.transport.write(self.ws.send(event.response()))

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def send(self, *messages: str | bytes) -> None:
        for message in messages:
            event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
            self.transport.write(self.ws.send(event))

    def send_parts(self, *parts: str) -> None:
        """One text message in several frames (fragments)."""
        for n, part in enumerate(parts):
            self.transport.write(self.ws.send(TextMessage(data=part, message_finished=n == len(parts) - 1)))

    def ping(self, payload: bytes) -> None:
        self.transport.write(self.ws.send(Ping(payload=payload)))

    def leave(self) -> None:
        self.transport.write(self.ws.send(CloseConnection(code=1000)))


def frame(opcode: int, payload: bytes, masked: bool = True, fin: bool = True) -> bytes:
    """One raw frame (payload < 126 bytes, or 126..65535 with the 16-bit length): what a broken or
    hostile client may send, byte for byte."""
    first = (0x80 if fin else 0) | opcode
    size = bytes([len(payload)]) if len(payload) < 126 else bytes([126]) + struct.pack("!H", len(payload))
    if not masked:
        return bytes([first, size[0]]) + size[1:] + payload
    mask = os.urandom(4)
    return bytes([first, 0x80 | size[0]]) + size[1:] + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def ws_connect(port: int, path: str, opened: bool = True) -> WsClient:
    client = WsClient(path)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    if opened:
        await wait_for(lambda: client.opened, WAIT, f"the handshake of {path}")
    return client


@pytest_twisted.ensureDeferred
async def test_text_messages_echo_refuse_fragments_and_close_callbacks(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        local n = 0
        local l = broker.ready("ws://127.0.0.1:{port}/play?text=1k,1k", function(socket, addr)
            n = n + 1
            log4cxx.info("accept", socket.id, broker.ntoa(addr) == socket[1], socket[-1])
            if n == 2 then return false end
            return function(s, data) return "re:" .. data end
        end)
        l.close = function(socket) log4cxx.info("closed", socket.id) end
    """
    async with RunningStage(tmp_path, script) as run:
        first = await ws_connect(port, "/play")
        first.send("one", "два")
        first.send_parts("frag", "ment", "ed")
        await wait_for(lambda: len(first.messages) == 3, WAIT, "three echoes")
        assert first.messages == ["re:one", "re:два", "re:fragmented"]
        first.ping(b"are you there")
        await wait_for(lambda: first.pongs == [b"are you there"], WAIT, "the pong")

        refused = await ws_connect(port, "/play")
        await wait_for(lambda: refused.closed, WAIT, "the refused socket to close")
        assert refused.code == 1000

        elsewhere = await ws_connect(port, "/other", opened=False)
        await wait_for(lambda: elsewhere.closed, WAIT, "the wrong path to be refused")
        assert elsewhere.rejected == 404 and not elsewhere.opened

        (accept, _) = run.said("accept")
        assert accept[1:] == ["true", f"127.0.0.1:{port}"]
        first.leave()
        await wait_for(lambda: first.closed, WAIT, "the closing handshake")
        assert first.code == 1000
        await wait_for(lambda: run.said("closed") == [[accept[0]]], WAIT, "the close callback")


@pytest_twisted.ensureDeferred
async def test_websocket_connections_send_small_frames_without_delay(tmp_path: Path) -> None:
    """TCP_NODELAY on both ends' sockets, as on the TCP broker sockets: with Nagle on, the second
    of two small frames sent back to back waits for the peer's delayed ACK (about 40 ms)."""
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/play?text", function() return function(s, data) return data end end)
        dialled = broker.join("ws://127.0.0.1:{port}/play?text", function() return function() end end)
    """
    async with RunningStage(tmp_path, script) as run:
        client = await ws_connect(port, "/play")
        registry = run.server.hosts[0].stages[0].stage.broker.registry
        await wait_for(lambda: len(registry.sockets) == 3, WAIT, "the client's, the listener's and the dialled socket")
        for sock in registry.sockets.values():  # the client's and the dialled connection, both ends
            handle = sock.transport.getHandle()
            assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), sock
        client.leave()


@pytest_twisted.ensureDeferred
async def test_limits_close_with_1009_and_protocol_errors_close_only_that_socket(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/?text=100,200", function(socket)
            return function(s, data)
                if data == "big" then
                    log4cxx.info("commit", s.commit(string.rep("x", 300)))
                    return
                end
                if data == "mid" then return string.rep("m", 150) end  -- over IN, within OUT
                if data == "bytes" then
                    log4cxx.info("commit", pcall(s.commit, "\\255\\254"))
                    return
                end
                return data
            end
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        keeper = await ws_connect(port, "/")
        keeper.send("mid")
        await wait_for(lambda: keeper.messages == ["m" * 150], WAIT, "a reply over IN but within OUT")

        big_in = await ws_connect(port, "/")
        big_in.send("y" * 101)
        await wait_for(lambda: big_in.closed, WAIT, "an oversized message to close its socket")
        assert big_in.code == 1009

        big_out = await ws_connect(port, "/")
        big_out.send("big")
        await wait_for(lambda: big_out.closed, WAIT, "an oversized reply to close its socket")
        assert big_out.code == 1009
        assert run.said("commit")[0][0] == "false"

        not_utf8 = await ws_connect(port, "/")
        not_utf8.send("bytes")
        await wait_for(lambda: len(run.said("commit")) == 2, WAIT, "the refused non-UTF-8 text")
        refused = run.said("commit")[1]  # a value the text framing cannot carry: an error, as a table
        assert refused[0] == "false" and "must be UTF-8" in refused[1] and not not_utf8.closed

        unmasked = await ws_connect(port, "/")
        unmasked.transport.write(frame(0x1, b"hello", masked=False))
        await wait_for(lambda: unmasked.closed, WAIT, "an unmasked client frame to close its socket")
        assert unmasked.code == 1002

        bad_text = await ws_connect(port, "/")
        bad_text.transport.write(frame(0x1, b"\xff\xfe"))
        await wait_for(lambda: bad_text.closed, WAIT, "invalid UTF-8 in a text message to close its socket")
        assert bad_text.code == 1007

        junk = await ws_connect(port, "/")
        junk.transport.write(bytes([0x8F, 0x85]) + os.urandom(40))  # reserved opcode 0xF
        await wait_for(lambda: junk.closed, WAIT, "a reserved opcode to close its socket")

        keeper.send("still here")
        await wait_for(lambda: keeper.messages[1:] == ["still here"], WAIT, "the other socket to keep serving")


@pytest_twisted.ensureDeferred
async def test_json_and_bson_framings_carry_tables(tmp_path: Path) -> None:
    port, bport = free_port(), free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/json?json", function(socket)
            return function(s, doc)
                return {{name = doc.name, total = doc.a + doc.b, n = #doc.list, nested = {{ok = true}}, empty = {{}}}}
            end
        end)
        broker.ready("ws://127.0.0.1:{bport}/bson?bson", function(socket)
            return function(s, doc) return {{sum = doc.a + doc.b}} end
        end)
    """
    async with RunningStage(tmp_path, script):
        client = await ws_connect(port, "/json")
        client.send(json.dumps({"name": "ann", "a": 2, "b": 3.5, "list": [1, 2, 3]}))
        await wait_for(lambda: len(client.messages) == 1, WAIT, "a JSON reply")
        reply = client.messages[0]
        assert isinstance(reply, str)  # JSON travels in text messages
        assert json.loads(reply) == {"name": "ann", "total": 5.5, "n": 3, "nested": {"ok": True}, "empty": []}

        client.send("{not json")
        await wait_for(lambda: client.closed, WAIT, "a bad JSON document to close its socket")
        assert client.code == 1008

        deep = await ws_connect(port, "/json")
        deep.send("[" * 5000 + "]" * 5000)
        await wait_for(lambda: deep.closed, WAIT, "a too deep JSON document to close its socket")

        binary = await ws_connect(bport, "/bson")
        binary.send(bson.encode({"a": 1, "b": 2}))
        await wait_for(lambda: len(binary.messages) == 1, WAIT, "a BSON reply")
        answer = binary.messages[0]
        assert isinstance(answer, bytes) and bson.decode(answer) == {"sum": 3}


@pytest_twisted.ensureDeferred
async def test_json_lua_cannot_hold_closes_with_1008_and_the_others_keep_serving(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/json?json", function(socket)
            return function(s, doc) return {{id = doc.id}} end
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        keeper = await ws_connect(port, "/json")
        for document in (b'{"op":"top","id":123456789012345678901234567890}', b'{"op":"login","user":"\\ud800"}'):
            client = await ws_connect(port, "/json")
            client.transport.write(frame(0x1, document))
            await wait_for(lambda c=client: c.closed, WAIT, "a document Lua cannot hold to close its socket")
            assert client.code == 1008
        warnings = [line for line in run.text().splitlines() if "closed: bad JSON document" in line]
        assert len(warnings) == 2 and "does not fit 64 bits" in warnings[0] and "lone surrogate" in warnings[1]
        assert "Unhandled" not in run.text()
        keeper.send('{"id":7}')
        await wait_for(lambda: keeper.messages == ['{"id":7}'], WAIT, "the other socket to keep serving")


@pytest_twisted.ensureDeferred
async def test_a_reply_the_framing_cannot_carry_is_a_lua_error_and_the_socket_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        local l = broker.ready("ws://127.0.0.1:{port}/json?json", function(socket)
            return function(s, doc)
                if doc.op == "fn" then return {{f = print}} end
                if doc.op == "nan" then return {{n = 0/0}} end
                return {{id = doc.id}}
            end
        end)
        log4cxx.info("expire", select(2, pcall(function() l.expire = 0/0 end)))
    """
    async with RunningStage(tmp_path, script) as run:
        assert "broker: expire is a finite number of ms" in run.said("expire")[0][0]
        keeper = await ws_connect(port, "/json")
        keeper.send('{"op":"fn"}', '{"op":"nan"}', '{"id":7}')
        await wait_for(lambda: keeper.messages == ['{"id":7}'], WAIT, "the socket to keep serving")
        errors = [line for line in run.text().splitlines() if "Lua error in broker receive" in line]
        assert len(errors) == 2 and all("a.lua:3: reply not sent: broker socket" in e for e in errors), errors
        assert "cannot send" in errors[0] and "Out of range float values are not JSON compliant" in errors[1]
        assert not keeper.closed


@pytest_twisted.ensureDeferred
async def test_bytes_that_are_not_utf8_on_a_text_websocket_are_a_lua_error_not_a_silent_drop(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/t?text", function(socket)
            return function(s, line)
                if line == "raw" then return "\\xff\\xfe" end
                if line == "commit" then log4cxx.info("commit", pcall(s.commit, "\\xff")) return end
                return "re:" .. line
            end
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        client = await ws_connect(port, "/t")
        client.send("raw", "commit", "after")
        await wait_for(lambda: client.messages == ["re:after"], WAIT, "the socket to keep serving")
        errors = [line for line in run.text().splitlines() if "Lua error in broker receive" in line]
        assert len(errors) == 1 and "a.lua:3: reply not sent: broker socket" in errors[0], errors
        assert "must be UTF-8" in errors[0]
        ((ok, why),) = run.said("commit")
        assert ok == "false" and "must be UTF-8" in why
        assert not client.closed


@pytest_twisted.ensureDeferred
async def test_join_a_websocket_server_expire_and_a_page_for_browsers(tmp_path: Path) -> None:
    port, dead = free_port(), free_port()
    idle_port = free_port()
    script = f"""
        local l = broker.ready("ws://127.0.0.1:{port}/echo?json", function(socket)
            return function(s, doc) return {{echo = doc.say}} end
        end)
        broker.join("ws://127.0.0.1:{port}/echo?json", function(socket, addr)
            socket.commit({{say = "hi"}})
            return function(s, doc) log4cxx.info("joined", doc.echo, s[1]); s.close() end
        end)
        local lost = broker.join("ws://127.0.0.1:{port}/nowhere?json", function() end)
        lost.close = function(s, reason) log4cxx.info("failed", s == lost, reason) end
        local dead = broker.join("ws://127.0.0.1:{dead}/?json", function() end)
        dead.close = function(s, reason) log4cxx.info("dead", s == dead, reason) end
        local idle = broker.ready("ws://127.0.0.1:{idle_port}/idle", function() return function() end end)
        idle.expire = 200
        idle.close = function(socket) log4cxx.info("expired", socket.id) end
    """
    async with RunningStage(tmp_path, script) as run:
        await wait_for(lambda: run.said("joined") == [["hi", f"127.0.0.1:{port}"]], WAIT, "the joined echo")
        await wait_for(lambda: len(run.said("failed")) == 1, WAIT, "the refused join")
        assert run.said("failed") == [["true", str(errno.ECONNABORTED)]] and "404" in run.text()
        await wait_for(lambda: run.said("dead") == [["true", str(errno.ECONNREFUSED)]], WAIT, "the failed connect")

        sleeper = await ws_connect(idle_port, "/idle")
        await wait_for(lambda: sleeper.closed, WAIT, "the idle socket to expire")
        assert sleeper.code == 1000 and len(run.said("expired")) == 1

        logged_before = len(run.text())
        response = await treq.get(f"http://127.0.0.1:{port}/", timeout=WAIT)
        assert response.code == 404  # a plain GET: this listener has no page
        await response.content()
        assert "dropping connection" not in run.text()[logged_before:]  # answered: a clean close, no warning


WS_ECHO = """
VERSION = "{version}"
broker.ready("ws://127.0.0.1:{port}/play?text", function(socket)
    log4cxx.info("offered", VERSION, socket.id)
    return function(s, data) return VERSION .. ":" .. data end
end)
"""


@pytest_twisted.ensureDeferred
async def test_a_reload_keeps_websocket_connections_and_offers_them_to_the_new_script(tmp_path: Path) -> None:
    port = free_port()
    async with RunningStage(tmp_path, WS_ECHO.format(port=port, version="v1")) as run:
        client = await ws_connect(port, "/play")
        client.send("1")
        await wait_for(lambda: client.messages == ["v1:1"], WAIT, "the first echo")
        client.send("during")  # on its way while the stage reloads
        (tmp_path / "lua" / "a.lua").write_text(textwrap.dedent(WS_ECHO.format(port=port, version="v2")))
        d = run.server.hosts[0].stages[0].stage.reload()
        d.addTimeout(WAIT, reactor)
        await d
        client.send("2")
        await wait_for(lambda: len(client.messages) == 3, WAIT, "the echoes of the new script")
        assert client.messages[1:] == ["v2:during", "v2:2"] and not client.closed
        offered = run.said("offered")
        assert [f[0] for f in offered] == ["v1", "v2"] and offered[0][1] == offered[1][1]  # the same socket id

        smaller = WS_ECHO.format(port=port, version="v3").replace("?text", "?text=4,64")
        (tmp_path / "lua" / "a.lua").write_text(textwrap.dedent(smaller))
        d = run.server.hosts[0].stages[0].stage.reload()
        d.addTimeout(WAIT, reactor)
        await d
        await wait_for(lambda: client.closed, WAIT, "the kept connection to close with the old framing")
        fresh = await ws_connect(port, "/play")
        fresh.send("1234", "12345")
        await wait_for(lambda: fresh.closed, WAIT, "the new IN limit to close a new connection")
        assert fresh.messages == ["v3:1234"] and fresh.code == 1009


def _ws_ask(port: int, message: str) -> str:
    """One request/answer over a blocking WebSocket (the server runs in another process)."""
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(ws.send(Request(host="127.0.0.1", target="/")))
        opened = False
        while True:
            data = conn.recv(65536)
            assert data, "connection closed early"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    opened = True
                    conn.sendall(ws.send(TextMessage(data=message)))
                elif isinstance(event, TextMessage):
                    assert opened
                    conn.sendall(ws.send(CloseConnection(code=1000)))
                    return event.data


def test_a_services_port_serves_websockets_from_two_processes(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "#services": {"tcp": [f"127.0.0.1:{port}"]},
        "#startup": [["=lua+a"], ["=lua+b"]],
        "=lua": {"%package": ["[0]lua"], "=lua+a": "srv", "=lua+b": "srv"},
    }
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/?text", function() return function() return tostring(process.id) end end)
        log4cxx.info("listening", process.id)
    """
    path = write_app(tmp_path, config, {"srv": script})
    with ServerProcess(path) as server:
        server.wait_for(lambda: any("ready: 2 processes" in line for line in server.lines), what="ready")
        server.wait_for(
            lambda: len(server.logged("a", "listening") + server.logged("b", "listening")) == 2,
            what="both processes listening",
        )
        answers: set[str] = set()
        for n in range(200):  # until both processes took clients (bounded)
            if len(answers) == 2 and n >= 10:
                break
            time.sleep(0.005)
            answers.add(_ws_ask(port, "?"))
        assert len(answers) == 2, answers
        assert any("ws://127.0.0.1" in line and "shared #services socket" in line for line in server.lines)


@pytest_twisted.ensureDeferred
async def test_slow_or_endless_handshakes_and_fuzzed_frames_drop_only_their_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket, "HANDSHAKE_TIMEOUT", 1.0)  # the shipped 10 s, shortened for the test
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/?text=1k,1k", function(socket)
            return function(s, data) return data end
        end)
    """
    async with RunningStage(tmp_path, script):
        keeper = await ws_connect(port, "/")

        slow = PacketClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), slow)
        slow.transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for n in range(100):  # a header line every 50 ms, never the blank line that ends the head
            if slow.closed:
                break
            slow.transport.write(b"X-Slow-%d: 1\r\n" % n)
            await deferLater(reactor, 0.05, lambda: None)
        assert slow.closed, "a slow-loris handshake was never dropped"

        endless = PacketClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), endless)
        endless.transport.write(b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * (20 << 10))
        await wait_for(lambda: endless.closed, WAIT, "a 20 KiB request head to be dropped")

        rng = random.Random(29)
        fuzzers = [await ws_connect(port, "/") for _ in range(30)]
        for fuzzer in fuzzers:
            fuzzer.transport.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        await wait_for(lambda: sum(f.closed for f in fuzzers) >= 20, WAIT, "most fuzzed connections to close")

        keeper.send("still here")
        await wait_for(lambda: keeper.messages == ["still here"], WAIT, "the well-behaved client to keep its echo")
        for fuzzer in fuzzers:
            fuzzer.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_rfc6455_cases_fragments_control_frames_and_close_codes(tmp_path: Path) -> None:
    """Raw frames a conforming server must accept, and ones it must fail with 1002 or 1007."""
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/?text=1k,1k", function(socket)
            return function(s, data) return "got:" .. data end
        end)
    """
    euro = "€".encode()  # three bytes: split across fragments it is only valid once joined
    async with RunningStage(tmp_path, script):
        good = await ws_connect(port, "/")
        good.transport.write(
            frame(0x1, b"a" + euro[:1], fin=False)
            + frame(0x9, b"in between")  # a ping between the fragments of a message
            + frame(0x0, euro[1:], fin=False)
            + frame(0x0, b"z")
            + frame(0x2, b"binary")  # a text socket takes binary messages too
            + frame(0x1, b"")
            + frame(0x1, b"x" * 200)
        )
        await wait_for(lambda: len(good.messages) == 4, WAIT, "four echoes")
        assert good.messages == ["got:a€z", "got:binary", "got:", "got:" + "x" * 200]
        assert good.pongs == [b"in between"]

        failures = {
            "a continuation frame without a message": frame(0x0, b"x"),
            "a new message inside a fragmented one": frame(0x1, b"a", fin=False) + frame(0x1, b"b"),
            "a fragmented ping": frame(0x9, b"p", fin=False),
            "a ping payload over 125 bytes": frame(0x9, b"p" * 126),
            "close code 999": frame(0x8, struct.pack("!H", 999)),
            "a one-byte close payload": frame(0x8, b"x"),
            "reserved bits set": bytes([0xC1]) + frame(0x1, b"x")[1:],  # FIN, RSV1 without an extension
        }
        for what, data in failures.items():
            client = await ws_connect(port, "/")
            client.transport.write(data)
            await wait_for(lambda c=client: c.closed, WAIT, f"{what} to fail the connection")
            if what.startswith(("close code", "a one-byte close")):
                assert client.code in (None, 1002), what  # a bad close frame: failed, a close frame is optional
            else:
                assert client.code == 1002, what
        split_text = await ws_connect(port, "/")
        split_text.transport.write(frame(0x1, euro[:2], fin=False) + frame(0x0, b"x"))
        await wait_for(lambda: split_text.closed, WAIT, "a text message that is not UTF-8 once joined")
        assert split_text.code == 1007

        good.send("after all that")
        await wait_for(lambda: good.messages[-1:] == ["got:after all that"], WAIT, "the good client still served")


@pytest_twisted.ensureDeferred
async def test_packet_framing_and_a_slow_reader_gets_everything_in_order(tmp_path: Path) -> None:
    """``packet`` frames are binary messages; a client that stops reading while 8 MiB are pushed to
    it holds up nobody else, and gets every message, in order, once it reads again."""
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/?packet=1k,128k", function(socket)
            return function(s, data)
                if data == "flood" then
                    for i = 1, 128 do s.commit(string.format("%06d", i) .. string.rep("f", 65530)) end
                    return
                end
                return data
            end
        end)
    """
    async with RunningStage(tmp_path, script):
        slow, other = await ws_connect(port, "/"), await ws_connect(port, "/")
        slow.transport.pauseProducing()  # reads nothing: the kernel buffers fill, then the server's
        slow.transport.write(slow.ws.send(BytesMessage(data=b"flood")))
        for n in range(5):
            other.send(b"ping %d" % n)
            await wait_for(lambda n=n: len(other.messages) == n + 1, WAIT, "the other client's echo")
        assert other.messages == [b"ping %d" % n for n in range(5)]  # binary in, binary out
        assert len(slow.messages) < 128
        slow.transport.resumeProducing()
        await wait_for(lambda: len(slow.messages) == 128, 2 * WAIT, "every pushed message")
        assert [m[:6] for m in slow.messages] == [b"%06d" % i for i in range(1, 129)]
        assert all(len(m) == 65536 for m in slow.messages)


@pytest_twisted.ensureDeferred
async def test_outbuf_bounds_what_waits_for_a_websocket_peer_before_reading_pauses(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("ws://127.0.0.1:{port}/?packet&outbuf=1m", function(socket)
            return function(s, data) return data end
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        client = await ws_connect(port, "/")
        (endpoint,) = run.server.hosts[0].stages[0].stage.broker.endpoints.values()
        (sock,) = endpoint.sockets.values()
        # the TCP transport pauses its producer (the socket: reading stops) past its bufferSize
        assert sock.transport.bufferSize == 1 << 20
        client.send(b"still served")
        await wait_for(lambda: client.messages == [b"still served"], WAIT, "an echo")
