"""A reload keeps a Lua stage's broker sockets (docs/broker.md, "Reload"): real loopback sockets, a
real Lua stage in this process, then a real ``twistd -n stage`` driven over its ``#admin`` console."""

from __future__ import annotations

import socket
import struct
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.error import ConnectionRefusedError

from tests.e2e.test_operations_e2e import ADMIN, Console, admin_ports
from tests.support import (
    RunningStage,
    ServerProcess,
    connect,
    free_port,
    packet,
    wait_for,
    write_app,
)

WAIT = 5.0

ECHO = """
VERSION = "{version}"
local l = broker.ready("tcp://127.0.0.1:{port}?packet", function(socket, addr)
    log4cxx.info("offered", VERSION, socket.id, socket[1])
    return function(s, data) return VERSION .. ":" .. data end
end)
{extra}
"""


def echo(port: int, version: str, extra: str = "") -> str:
    return ECHO.format(port=port, version=version, extra=extra)


async def reload_with(run: RunningStage, tmp_path: Path, script: str) -> None:
    """Write the stage's new main script, then reload it (to its end, with a timeout)."""
    (tmp_path / "lua" / "a.lua").write_text(textwrap.dedent(script))
    d = run.server.hosts[0].stages[0].stage.reload()
    d.addTimeout(WAIT, reactor)
    await d


@pytest_twisted.ensureDeferred
async def test_connections_survive_reloads_and_are_offered_to_the_new_script(tmp_path: Path) -> None:
    port = free_port()
    async with RunningStage(tmp_path, echo(port, "v1")) as run:
        a, b = await connect(port), await connect(port)
        a.transport.write(packet(b"1"))
        await wait_for(lambda: a.frames() == [b"v1:1"], WAIT, "the first echo")
        first = {fields[1] for fields in run.said("offered")}
        for n in range(2, 5):
            a.transport.write(packet(b"before%d" % n))  # on its way while the stage reloads
            await reload_with(run, tmp_path, echo(port, f"v{n}"))
            a.transport.write(packet(b"after%d" % n))
            b.transport.write(packet(b"b%d" % n))
            await wait_for(lambda n=n: len(a.frames()) == 2 * n - 1 and len(b.frames()) == n - 1, WAIT, "echoes")
        assert a.frames() == [
            b"v1:1",
            b"v2:before2",
            b"v2:after2",
            b"v3:before3",
            b"v3:after3",
            b"v4:before4",
            b"v4:after4",
        ]
        assert b.frames() == [b"v2:b2", b"v3:b3", b"v4:b4"]
        assert not a.closed and not b.closed
        offered = run.said("offered")
        assert [f[0] for f in offered] == ["v1", "v1", "v2", "v2", "v3", "v3", "v4", "v4"]
        assert {f[1] for f in offered} == first and len(first) == 2  # same socket ids every time
        c = await connect(port)  # the kept listener still accepts
        c.transport.write(packet(b"c"))
        await wait_for(lambda: c.frames() == [b"v4:c"], WAIT, "a new client's echo")


@pytest_twisted.ensureDeferred
async def test_what_the_new_script_does_not_take_up_is_closed(tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    refuse = "function(socket) log4cxx.info('refused', socket.id) return false end"
    script = echo(port, "v1", f'broker.ready("tcp://127.0.0.1:{other}?packet")')
    async with RunningStage(tmp_path, script) as run:
        kept, dropped = await connect(port), await connect(other)
        await wait_for(lambda: len(run.said("offered")) == 1, WAIT, "the first client")
        await reload_with(run, tmp_path, f'broker.ready("tcp://127.0.0.1:{port}?packet", {refuse})')
        await wait_for(lambda: kept.closed and dropped.closed, WAIT, "both clients closed")
        assert len(run.said("refused")) == 1
        assert f"tcp://127.0.0.1:{other} (listener" in run.log.text()
        assert "not re-created by the reloaded script: closed with its 1 sockets" in run.log.text()
        refused = await connect(port)  # still listening
        await wait_for(lambda: refused.closed, WAIT, "the refusal")
        with pytest.raises(ConnectionRefusedError):  # the dropped listener's port is closed
            await connect(other)


@pytest_twisted.ensureDeferred
async def test_expire_and_close_callbacks_carry_on(tmp_path: Path) -> None:
    port = free_port()
    closing = 'l.close = function(s) log4cxx.info("closed", VERSION, s.id) end'
    script = echo(port, "v1", "l.expire = 400\n" + closing)
    async with RunningStage(tmp_path, script) as run:
        idle = await connect(port)
        await wait_for(lambda: len(run.said("offered")) == 1, WAIT, "the client")
        await reload_with(run, tmp_path, echo(port, "v2", closing + '\nlog4cxx.info("expire", l.expire)'))
        assert run.said("expire") == [["400"]]
        await wait_for(lambda: idle.closed, WAIT, "the idle client to expire")  # no expire: never closed
        await wait_for(lambda: len(run.said("closed")) == 1, WAIT, "the close callback")
        assert run.said("closed")[0][0] == "v2"


@pytest_twisted.ensureDeferred
async def test_another_framing_keeps_the_port_but_not_its_connections(tmp_path: Path) -> None:
    port = free_port()
    async with RunningStage(tmp_path, echo(port, "v1")) as run:
        old = await connect(port)
        await wait_for(lambda: len(run.said("offered")) == 1, WAIT, "the client")
        text = f'broker.ready("tcp://127.0.0.1:{port}?text", function() return function(s, l) return "t:" .. l end end)'
        await reload_with(run, tmp_path, text)
        await wait_for(lambda: old.closed, WAIT, "the old-framing client to close")
        new = await connect(port)
        new.transport.write(b"hi\n")
        await wait_for(lambda: new.data == b"t:hi\n", WAIT, "a text echo")


class Upstream(protocol.Protocol):
    """A server the stage joins: replies ``up<n>:`` + payload, counting its connections."""

    accepted = 0

    def connectionMade(self) -> None:
        Upstream.accepted += 1
        self.n = Upstream.accepted
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4 and len(self.buf) >= 4 + struct.unpack("<I", self.buf[:4])[0]:
            size = struct.unpack("<I", self.buf[:4])[0]
            payload, self.buf = self.buf[4 : 4 + size], self.buf[4 + size :]
            self.transport.write(packet(b"up%d:" % self.n + payload))


JOIN = """
UP = broker.join("tcp://127.0.0.1:{port}?packet", function(socket)
    log4cxx.info("joined", "{version}", socket.id)
    socket.commit("{version}")
    return function(s, data) log4cxx.info("got", data) end
end)
"""


@pytest_twisted.ensureDeferred
async def test_a_join_connection_is_claimed_by_the_same_join_or_closed(tmp_path: Path) -> None:
    Upstream.accepted = 0
    listening = reactor.listenTCP(0, protocol.Factory.forProtocol(Upstream), interface="127.0.0.1")
    port = listening.getHost().port
    try:
        async with RunningStage(tmp_path, JOIN.format(port=port, version="v1")) as run:
            await wait_for(lambda: run.said("got") == [["up1:v1"]], WAIT, "the first reply")
            await reload_with(run, tmp_path, JOIN.format(port=port, version="v2"))
            await wait_for(lambda: len(run.said("got")) == 2, WAIT, "the reply on the kept connection")
            assert run.said("got")[1] == ["up1:v2"] and Upstream.accepted == 1
            assert run.said("joined")[0][1] == run.said("joined")[1][1]  # the same socket id
            await reload_with(run, tmp_path, "-- no join")
            assert f"broker.join tcp://127.0.0.1:{port} (socket " in run.log.text()
            assert "not claimed by the reloaded script: closed" in run.log.text()
            await reload_with(run, tmp_path, JOIN.format(port=port, version="v3"))
            await wait_for(lambda: len(run.said("got")) == 3, WAIT, "a reply on a new connection")
            assert run.said("got")[2] == ["up2:v3"] and Upstream.accepted == 2
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_udp_port_is_kept(tmp_path: Path) -> None:
    port = free_port(socket.AF_INET)
    udp = """
        broker.ready("udp://127.0.0.1:{port}", function(s, data)
            return "{version}:" .. s.id .. ":" .. data
        end)
    """
    async with RunningStage(tmp_path, udp.format(port=port, version="v1")) as run:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            got: list[bytes] = []

            def answered() -> bool:
                try:
                    got.append(client.recv(100))
                except BlockingIOError:
                    pass
                return bool(got)

            client.sendto(b"ping", ("127.0.0.1", port))
            await wait_for(answered, WAIT, "the datagram reply")
            await reload_with(run, tmp_path, udp.format(port=port, version="v2"))
            client.sendto(b"ping", ("127.0.0.1", port))
            await wait_for(lambda: answered() and len(got) == 2, WAIT, "the datagram reply after the reload")
            sid = got[0].split(b":")[1]
            assert got == [b"v1:" + sid + b":ping", b"v2:" + sid + b":ping"]  # the same socket


# -- a real server, reloaded from its console ----------------------------------------------------

SERVED = """
VERSION = {version}
broker.ready("tcp://127.0.0.1:{port}?text", function(socket)
    return function(s, line) return VERSION .. " " .. line end
end)
{extra}
"""


class LineClient:
    """A blocking loopback client: ``ask(line)`` sends it and reads one reply line."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def read(self) -> str:
        while b"\n" not in self.buffer:
            data = self.sock.recv(4096)
            assert data, "the server closed the connection"
            self.buffer += data
        raw, self.buffer = self.buffer.split(b"\n", 1)
        return raw.decode()

    def closed(self) -> bool:
        self.sock.settimeout(10)
        try:
            return self.sock.recv(100) == b""
        except OSError:
            return True


def test_twistd_clients_keep_talking_across_console_reloads(tmp_path: Path) -> None:
    port, spare = free_port(), free_port()
    extra = f'broker.ready("tcp://127.0.0.1:{spare}?text")'
    config = {"#startup": [["=lua+app"]], "#admin": ADMIN, "=lua+app": "lua/app"}
    path = write_app(tmp_path, config, {"app": SERVED.format(version=1, port=port, extra=extra)})
    with ServerProcess(path) as server:
        console = Console(admin_ports(server)["console"])
        clients = [LineClient(port) for _ in range(3)]
        dropped = LineClient(spare)
        try:
            sent: list[list[str]] = [[] for _ in clients]
            replies: list[list[list[str]]] = [[] for _ in clients]
            for version in range(1, 6):
                if version > 1:
                    script = SERVED.format(version=version, port=port, extra=extra if version < 5 else "")
                    (tmp_path / "lua" / "app.lua").write_text(script)
                    for i, client in enumerate(clients):  # in flight while the reload command travels
                        client.send(f"pre{version}.{i}")
                        sent[i].append(f"pre{version}.{i}")
                    assert console.ask("reload app") == ["process 1: app reloaded", "OK"]
                for round_ in range(20):
                    for i, client in enumerate(clients):
                        client.send(f"m{version}.{round_}.{i}")
                        sent[i].append(f"m{version}.{round_}.{i}")
                for i, client in enumerate(clients):  # every reply before the next reload
                    replies[i].extend(client.read().split(" ") for _ in range(len(sent[i]) - len(replies[i])))
            for i in range(len(clients)):
                assert [line for _, line in replies[i]] == sent[i]  # nothing lost or reordered
                for answered_by, line in replies[i]:  # m<v>.* by script v; pre<v> by v-1 or v (racing the reload)
                    version = int(line[3 if line.startswith("pre") else 1 : line.index(".")])
                    assert int(answered_by) in ((version - 1, version) if line.startswith("pre") else (version,))
            assert dropped.closed()  # its listener is gone from the fifth script
            server.wait_for(
                lambda: any("not re-created by the reloaded script" in line for line in server.lines),
                what="the closed-listener line",
            )
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", spare)) != 0
            assert sum("stage =lua+app reloaded" in line for line in server.lines) == 4
        finally:
            console.close()
            for client in clients + [dropped]:
                client.sock.close()
