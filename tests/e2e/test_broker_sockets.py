"""broker through a real Lua stage on the real reactor, with real loopback sockets."""

from __future__ import annotations

import errno
import socket
import struct
import time
from pathlib import Path
from typing import Any

import bson
import pytest
import pytest_twisted
from twisted.internet import protocol, reactor, threads

from stagetx.child.control import stage_stats
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


@pytest_twisted.ensureDeferred
async def test_packet_echo_by_return_value_and_refused_connections(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        local n = 0
        local l = broker.ready("tcp://127.0.0.1:{port}?packet=1k,1k", function(socket, addr)
            n = n + 1
            log4cxx.info("accept", socket.id, broker.ntoa(addr) == socket[1], socket[-1])
            log4cxx.info("ntoa", broker.ntoa(socket[1]) == socket[1], broker.ntoa(socket[-1], {{}}).port)
            if n == 2 then return false end
            return function(s, data, a) return "re:" .. data end
        end)
        l.close = function(socket) log4cxx.info("closed", socket.id) end
    """
    async with RunningStage(tmp_path, script) as run:
        first = await connect(port)
        first.transport.write(packet(b"one") + packet(b"two"))
        await wait_for(lambda: len(first.frames()) == 2, WAIT, "two echoes")
        assert first.frames() == [b"re:one", b"re:two"]
        refused = await connect(port)
        await wait_for(lambda: refused.closed, WAIT, "the refused connection to close")
        (accept, _) = run.said("accept")
        assert accept[1:] == ["true", f"127.0.0.1:{port}"]
        assert run.said("ntoa")[0] == ["true", str(port)]
        first.transport.loseConnection()
        await wait_for(lambda: len(run.said("closed")) == 1, WAIT, "the close callback")
        assert run.said("closed") == [[accept[0]]]  # refused sockets get no close callback


@pytest_twisted.ensureDeferred
async def test_each_value_a_receive_function_returns_is_a_frame(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("tcp://127.0.0.1:{port}?text", function()
            return function(s, line) return "one", nil, "two", 3 end
        end)
    """
    async with RunningStage(tmp_path, script):
        client = await connect(port)
        client.transport.write(b"go\n")
        await wait_for(lambda: client.data == b"one\ntwo\n3\n", WAIT, "three lines")


@pytest_twisted.ensureDeferred
async def test_an_address_in_use_returns_the_errno_and_a_bad_one_raises(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        first = broker.ready("tcp://127.0.0.1:{port}?text", function() end)
        again = broker.ready("tcp://127.0.0.1:{port}?text", function() end)
    """
    async with RunningStage(tmp_path, script) as run:
        assert run.lua("return type(first), again") == [b"table", errno.EADDRINUSE]
        assert "Address already in use" in run.text()
        with pytest.raises(AssertionError, match="bad broker address"):
            run.lua("broker.ready('nonsense', function() end)")


@pytest_twisted.ensureDeferred
async def test_a_client_nothing_would_read_is_refused(tmp_path: Path) -> None:
    """As the original: accepted without a receive function (none returned, none on the listener)
    the connection is closed, without a close callback; once ``listener.receive`` is set it stays."""
    port = free_port()
    script = f"""
        l = broker.ready("tcp://127.0.0.1:{port}?text", function(socket) log4cxx.info("accept", socket.id) end)
        l.close = function(socket) log4cxx.info("closed", socket.id) end
    """
    async with RunningStage(tmp_path, script) as run:
        refused = await connect(port)
        await wait_for(lambda: refused.closed, WAIT, "the connection nothing would read to close")
        assert "refused: no receive function" in run.text()
        run.lua("l.receive = function(s, line) return 'got ' .. line end")
        kept = await connect(port)
        kept.transport.write(b"hi\n")
        await wait_for(lambda: kept.data == b"got hi\n", WAIT, "the listener's receive function")
        assert len(run.said("accept")) == 2 and run.said("closed") == []


@pytest_twisted.ensureDeferred
async def test_text_lines_over_ipv6(tmp_path: Path) -> None:
    port = free_port(socket.AF_INET6)
    script = f"""
        broker.ready("tcp://[::1]:{port}?text", function(socket, addr)
            return function(s, line) return string.upper(line) end
        end)
    """
    async with RunningStage(tmp_path, script):
        client = await connect(port, "::1")
        client.transport.write(b"hello\r\nworld\npart")
        await wait_for(lambda: client.data == b"HELLO\nWORLD\n", WAIT, "two lines")


@pytest_twisted.ensureDeferred
async def test_bson_documents_arrive_as_tables_and_tables_go_back_as_documents(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("tcp://127.0.0.1:{port}?bson", function(socket)
            return function(s, doc)
                return {{name = doc.name, total = doc.a + doc.b, list = {{doc.list[1], #doc.list}}}}
            end
        end)
    """
    async with RunningStage(tmp_path, script):
        client = await connect(port)
        client.transport.write(bson.encode({"name": "p1", "a": 2, "b": 3.5, "list": ["x", "y"]}))
        await wait_for(lambda: len(client.data) >= 4 and len(client.data) >= client.data[0], WAIT, "a document")
        assert bson.decode(client.data) == {"name": "p1", "total": 5.5, "list": ["x", 2]}


@pytest_twisted.ensureDeferred
async def test_an_oversized_frame_closes_that_connection_only(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("tcp://127.0.0.1:{port}?packet=8,16", function()
            return function(s, data) if data == "big" then return string.rep("x", 17) end return data end
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        good, bad, big_reply = await connect(port), await connect(port), await connect(port)
        bad.transport.write(struct.pack("<I", 9))  # the length alone is enough
        big_reply.transport.write(packet(b"big"))
        await wait_for(lambda: bad.closed and big_reply.closed, WAIT, "oversized frames to close")
        good.transport.write(packet(b"12345678"))
        await wait_for(lambda: good.frames() == [b"12345678"], WAIT, "the other connection still served")
        reasons = [e.get("reason", "") for e in run.log.events if e.get("log_namespace") == "stagetx.broker"]
        assert any("IN limit of 8" in r for r in reasons) and any("OUT limit of 16" in r for r in reasons)


@pytest_twisted.ensureDeferred
async def test_idle_sockets_expire_and_busy_ones_stay(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        local l = broker.ready("tcp://127.0.0.1:{port}", function() return function(s, d) return d end end)
        l.expire = 150
        l.close = function(s, e) log4cxx.info("closed", s.id, e) end
        log4cxx.info("expire", l.expire)
    """
    async with RunningStage(tmp_path, script) as run:
        idle, busy = await connect(port), await connect(port)
        # keep one socket busy (one echo after the other) until the idle one has expired
        for i in range(10_000):
            if idle.closed:
                break
            busy.transport.write(packet(b"%d" % i))
            await wait_for(lambda i=i: len(busy.frames()) == i + 1, WAIT, "an echo")
        assert idle.closed and not busy.closed
        assert run.said("expire") == [["150"]]
        assert [e for _, e in run.said("closed")] == [str(errno.ETIMEDOUT)]  # close(socket, errno)
        busy.transport.loseConnection()
        await wait_for(lambda: len(run.said("closed")) == 2, WAIT, "the clean close")
        assert run.said("closed")[1][1] == "0"


@pytest_twisted.ensureDeferred
async def test_a_socket_s_own_expire_and_close_as_the_original_s_socket_table_takes_them(tmp_path: Path) -> None:
    """A game's usual pattern: a short idle limit until the client logs in, none after, and a
    close callback of the logged-in socket's own; the listener has neither limit nor callback
    of its own for these, and is asked for the close of the others."""
    port = free_port()
    script = f"""
        local l = broker.ready("tcp://127.0.0.1:{port}", function(socket)
            socket.expire = 2000
            log4cxx.info("accepted", socket.expire)
            return function(s, d)
                if d == "login" then
                    s.expire = 0
                    s.close = function(s, e) log4cxx.info("own close", e) end
                    log4cxx.info("logged in", s.expire)
                end
                return d
            end
        end)
        l.close = function(s, e) log4cxx.info("listener close", e) end
        log4cxx.info("listener", l.expire)
    """
    async with RunningStage(tmp_path, script) as run:
        guest, player = await connect(port), await connect(port)
        player.transport.write(packet(b"login"))
        await wait_for(lambda: player.frames() == [b"login"], WAIT, "the login's echo")
        await wait_for(lambda: guest.closed, 2 * WAIT, "the guest's idle limit")
        assert run.said("listener close") == [[str(errno.ETIMEDOUT)]]
        assert run.said("accepted") == [["2000"], ["2000"]] and run.said("logged in") == [["0"]]
        player.transport.write(packet(b"still here"))
        await wait_for(lambda: player.frames() == [b"login", b"still here"], WAIT, "the player served")
        player.transport.loseConnection()
        await wait_for(lambda: run.said("own close") == [["0"]], WAIT, "the player's own close callback")
        assert run.said("listener") == [["0"]] and len(run.said("listener close")) == 1


@pytest_twisted.ensureDeferred
async def test_a_lua_error_in_receive_is_logged_and_the_socket_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        broker.ready("tcp://127.0.0.1:{port}", function()
            return function(s, d) if d == "boom" then error("kaboom") end return d end
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        client = await connect(port)
        client.transport.write(packet(b"boom") + packet(b"ok"))
        await wait_for(lambda: client.frames() == [b"ok"], WAIT, "the next frame served")
        assert any("kaboom" in e.get("error", "") for e in run.log.events)


@pytest_twisted.ensureDeferred
async def test_commit_close_f_and_broker_close_by_id(tmp_path: Path) -> None:
    port = free_port()
    script = f"""
        ids = {{}}
        local l = broker.ready("tcp://127.0.0.1:{port}", function(socket) ids[#ids + 1] = socket.id end)
        l.receive = function() end
    """
    async with RunningStage(tmp_path, script) as run:
        clients = [await connect(port) for _ in range(4)]
        await wait_for(lambda: run.lua("return #ids") == [4], WAIT, "four sockets")
        # commit(nil) is the original's flush: nothing waits here (each frame is written at once)
        assert run.lua("return broker.f(ids[1]).commit(nil), broker.f(ids[1]).commit()") == [0, 0]
        assert run.lua("return broker.f(ids[1]).commit('pushed')") == [6]  # the bytes sent, as the original
        assert run.lua("return broker.f(ids[1]) == broker.f(ids[1]), broker.f(12345)") == [True, None]
        assert run.lua("local s = broker.f(ids[1]) return s[0] == s.id, math.type(s[0])") == [True, b"integer"]
        await wait_for(lambda: clients[0].frames() == [b"pushed"], WAIT, "a commit")
        assert run.lua("return broker.signal({ids[2]}, 'by id')") == [True]
        await wait_for(lambda: clients[1].frames() == [b"by id"], WAIT, "broker.signal by id")
        assert run.lua("return broker.signal(broker.aton(broker.f(ids[2])[1]), 'by address')") == [True]
        await wait_for(lambda: clients[1].frames() == [b"by id", b"by address"], WAIT, "broker.signal by address")
        run.lua("broker.f(ids[1]).close()")
        run.lua("broker.close({ids[2], ids[3]})")
        await wait_for(lambda: all(c.closed for c in clients[:3]), WAIT, "three closes")
        assert not clients[3].closed
        assert run.lua("return broker.f(ids[1]), broker.signal(ids[1], 'x')") == [
            None,
            False,
            f"no socket {run.lua('return ids[1]')[0]}".encode(),
        ]
        with pytest.raises(AssertionError, match="bson socket|tables"):
            run.lua("broker.f(ids[4]).commit({1, 2})")


@pytest_twisted.ensureDeferred
async def test_signal_to_a_socket_id_is_received_as_if_its_client_sent_it(tmp_path: Path) -> None:
    """The original's ``broker.signal(i, v)``: ``v`` goes to socket ``i``'s receive function (its
    return value to the client); ``{i, ..., f}`` sends ``v`` to each, then calls ``f``."""
    port = free_port()
    script = f"""
        broker.ready("tcp://127.0.0.1:{port}?text", function(socket)
            last = socket.id
            return function(s, data)
                if type(data) == "table" then log4cxx.info("table", data.logout) return "bye" end
                if data == "sig" then log4cxx.info("signal", broker.signal(s.id, "again")) return end
                return "re:" .. data
            end
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        client = await connect(port)
        client.transport.write(b"sig\n")
        await wait_for(lambda: client.data == b"re:again\n", WAIT, "the receive function's reply to a signal")
        assert run.said("signal") == [["true"]]
        assert run.lua("return broker.signal(last, {logout = ''})") == [True]
        await wait_for(lambda: client.data.endswith(b"bye\n"), WAIT, "a table as if received")
        assert run.said("table") == [[""]]
        done = "function(ms, v) log4cxx.info('done', ms, v) end"
        assert run.lua(f"return broker.signal({{last, 99999, {done}}}, 'pushed')") == [False, b"no socket 99999"]
        await wait_for(lambda: client.data.endswith(b"bye\npushed\n"), WAIT, "a signal to a table of ids")
        assert run.said("done") == [["0", "pushed"]]
        assert run.lua("return broker.signal(99999, 'x')") == [False, b"no socket 99999"]


@pytest_twisted.ensureDeferred
async def test_aton_ntoa_and_ifaddr(tmp_path: Path) -> None:
    async with RunningStage(tmp_path, "") as run:
        assert run.lua("return broker.ntoa(broker.aton('tcp://127.0.0.1:8081'))") == [b"127.0.0.1:8081"]
        assert run.lua("return broker.ntoa(broker.aton('[::1]:80'))") == [b"[::1]:80"]
        assert run.lua("return #broker.aton('udp://224.0.0.1:8082', {})[1]") == [6]
        six = "local t = broker.ntoa(broker.aton('[::1]:7'), {}) return t.family, t.addr, t.port, t.scope_id, t[1]"
        assert run.lua(six) == [10, b"::1", 7, 0, None]
        four = "local t = broker.ntoa(broker.aton('127.0.0.1:9'), {}) return t.family, t.addr, t.port, t.scope_id"
        assert run.lua(four) == [2, b"127.0.0.1", 9, None]
        # a text address (socket[1] is one) is taken too, and comes back as the original formats it
        assert run.lua("return broker.ntoa('127.0.0.1:8081'), broker.ntoa('[::0001]:80')") == [
            b"127.0.0.1:8081",
            b"[::1]:80",
        ]
        assert run.lua("return broker.ntoa('[::1]:80', {}).port, broker.ntoa('10.0.0.1')") == [80, b"10.0.0.1"]
        assert run.lua("return broker.aton('no such host.invalid')")[0] is False
        lo = run.lua("return broker.ifaddr('lo')")[0]
        assert b"127.0.0.1" in lo
        assert b"lo" in run.lua("return broker.ifaddr()")[0]
        with pytest.raises(AssertionError, match="packed address"):
            run.lua("broker.ntoa('abc')")


@pytest_twisted.ensureDeferred
async def test_udp_replies_to_the_sender_and_multicast_groups_are_joined(tmp_path: Path) -> None:
    port, group_port = free_port(), free_port()
    script = f"""
        u = broker.ready("udp://127.0.0.1:{port}", function(s, data, addr)  -- each datagram, as the original
            log4cxx.info("same", s == u, s[0] == u.id)
            return "udp:" .. data .. ":" .. broker.ntoa(addr), "second"
        end)
        broker.ready("udp://239.255.42.99:{group_port}?text", function(s, line, addr)
            log4cxx.info("group", line)
        end)
    """
    async with RunningStage(tmp_path, script) as run:
        got: list[bytes] = []

        class Peer(protocol.DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                got.append(data)

        peer = reactor.listenUDP(0, Peer(), interface="127.0.0.1")
        try:
            me = peer.getHost().port
            peer.write(b"hi", ("127.0.0.1", port))
            await wait_for(lambda: got == [f"udp:hi:127.0.0.1:{me}".encode(), b"second"], WAIT, "two UDP replies")
            assert run.said("same") == [["true", "true"]]  # the port is its one socket, as the original
            # what broker.ready returned sends datagrams of its own (the original's socket.commit)
            sent = run.lua(f"return u.commit('unasked', broker.aton('127.0.0.1:{me}')), broker.f(u.id) == u")
            assert sent == [7, True]
            await wait_for(lambda: got[2:] == [b"unasked"], WAIT, "a datagram sent with commit")
        finally:
            await peer.stopListening()
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sender.sendto(b"to the group", ("239.255.42.99", group_port))
            await wait_for(lambda: run.said("group") == [["to the group"]], WAIT, "a multicast datagram")
        finally:
            sender.close()


@pytest_twisted.ensureDeferred
async def test_udp_datagrams_arrive_whole_up_to_in_and_over_it_are_dropped(tmp_path: Path) -> None:
    wide, narrow = free_port(kind=socket.SOCK_DGRAM), free_port(kind=socket.SOCK_DGRAM)
    script = f"""
        broker.ready("udp://127.0.0.1:{wide}?packet=64k", function(s, data) return #data end)
        broker.ready("udp://127.0.0.1:{narrow}?packet=10000", function(s, data) return #data end)
    """
    async with RunningStage(tmp_path, script) as run:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            client.bind(("127.0.0.1", 0))
            for port, size in ((wide, 20000), (wide, 65507), (narrow, 10000)):
                client.sendto(b"d" * size, ("127.0.0.1", port))
                reply = await threads.deferToThread(client.recv, 100)
                assert reply == str(size).encode()  # not cut to some receive buffer's size
            client.sendto(b"d" * 12000, ("127.0.0.1", narrow))  # over IN: dropped and logged
            client.sendto(b"d" * 10, ("127.0.0.1", narrow))
            assert await threads.deferToThread(client.recv, 100) == b"10"
        reasons = [e.get("reason", "") for e in run.log.events if e.get("log_namespace") == "stagetx.broker"]
        assert any("12000 bytes is over the IN limit of 10000" in r for r in reasons), reasons


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


@pytest_twisted.ensureDeferred
async def test_join_connects_to_a_local_server(tmp_path: Path) -> None:
    server = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
    port = server.getHost().port
    dead = free_port()
    script = f"""
        broker.join("tcp://127.0.0.1:{port}", function(socket, addr)
            socket.commit("ping")
            return function(s, data) log4cxx.info("joined", data, s[1]); s.close() end
        end)
        local bad = broker.join("tcp://127.0.0.1:{dead}", function() end)
        bad._join = "tcp://127.0.0.1:{dead}"  -- the original's cluster/ready.lua reconnects so
        bad.close = function(s, reason) log4cxx.info("failed", s == bad, s._join, reason) end
    """
    try:
        async with RunningStage(tmp_path, script) as run:
            await wait_for(lambda: run.said("joined") == [["ping", f"127.0.0.1:{port}"]], WAIT, "the echo")
            gone = [["true", f"tcp://127.0.0.1:{dead}", str(errno.ECONNREFUSED)]]
            await wait_for(lambda: run.said("failed") == gone, WAIT, "the failed join: close(socket, errno)")
    finally:
        await server.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_join_is_its_socket_and_tables_keep_the_scripts_fields(tmp_path: Path) -> None:
    """As the original's ``cluster/ready.lua``: fields of its own and ``commit`` (the flush
    interval) on a listener and a join; the join's table is the socket its callbacks get."""
    port = free_port()
    script = f"""
        local l = broker.ready("tcp://127.0.0.1:{port}?text", function(socket, addr)
            socket.receive = function(s, d) return "own:" .. d end  -- this socket's receive function
            return true
        end)
        l.expire = -1
        l.commit = 10
        l.note = "mine"
        log4cxx.info("listener", l.note, type(l.commit), l.expire)
        local p = broker.join("tcp://127.0.0.1:{port}?text", function(socket)
            log4cxx.info("joined", socket == P, socket._join, socket[0] == P.id, broker.ntoa(socket[1]))
            socket.commit("ping")
        end)
        P = p
        p._join = "x"
        p.expire = -1
        p.commit = 10
        p.receive = function(socket, data) log4cxx.info("got", data, socket == P) socket.close() end
        p.close = function(socket, e) log4cxx.info("closed", socket == P, socket._join) end
    """
    async with RunningStage(tmp_path, script) as run:
        assert run.said("listener") == [["mine", "function", "0"]]
        await wait_for(lambda: run.said("closed") == [["true", "x"]], WAIT, "the join's close")
        assert run.said("joined") == [["true", "x", "true", f"127.0.0.1:{port}"]]
        assert run.said("got") == [["own:ping", "true"]]
        assert run.lua("return broker.f(P.id)") == [None]
        kinds = [e["kind"] for e in stage_stats(run.server.hosts[0].stages[0])["listeners"]]
        assert kinds == ["tcp"]  # closing the join's socket closed the join too
        with pytest.raises(AssertionError, match="commit .* is a number"):
            run.lua("P.commit = 'soon'")


def test_a_services_port_is_shared_by_two_processes(tmp_path: Path) -> None:
    """Two ``#startup`` processes listen on one ``#services`` socket; the kernel spreads the clients."""
    port = free_port()
    config = {
        "#services": {"tcp": [f"127.0.0.1:{port}"]},
        "#startup": [["=lua+a"], ["=lua+b"]],
        "=lua": {"%package": ["[0]lua"], "=lua+a": "srv", "=lua+b": "srv"},
    }
    script = f"""
        broker.ready("tcp://127.0.0.1:{port}", function() return function() return tostring(process.id) end end)
        log4cxx.info("listening", process.id)
    """
    path = write_app(tmp_path, config, {"srv": script})
    with ServerProcess(path) as server:
        server.wait_for(
            lambda: len(server.logged("a", "listening") + server.logged("b", "listening")) == 2,
            what="both processes listening",
        )
        # steady state: both processes done starting (a busy process wins no accept race)
        server.wait_for(lambda: any("ready: 2 processes" in line for line in server.lines), what="ready")
        pids: dict[bytes, int] = {}
        clients = []
        try:
            for n in range(200):  # until both processes took connections (bounded)
                if len(pids) == 2 and n >= 20:
                    break
                time.sleep(0.005)  # both processes back in epoll_wait before the next connection
                client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
                clients.append(client)
                client.sendall(packet(b"?"))
                size = struct.unpack("<I", _read(client, 4))[0]
                pid = _read(client, size)
                pids[pid] = pids.get(pid, 0) + 1
        finally:
            for client in clients:
                client.close()
        assert len(pids) == 2, pids
        assert any("shared #services socket" in line for line in server.lines)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_clients_that_misbehave_in_a_loop_do_not_flood_the_log(tmp_path: Path) -> None:
    from tests.e2e.test_broker_websocket import frame, ws_connect

    port, wport, uport, deaf = free_port(), free_port(), free_port(kind=socket.SOCK_DGRAM), free_port()
    script = f"""
        broker.ready("tcp://127.0.0.1:{port}?packet=8,8", function() return function(s, d) return d end end)
        broker.ready("tcp://127.0.0.1:{deaf}?packet", function() end)  -- no receive function: refused
        broker.ready("ws://127.0.0.1:{wport}/?text", function() return function(s, d) return d end end)
        broker.ready("udp://127.0.0.1:{uport}?json", function(s, d) return d end)
    """
    rounds = 60
    async with RunningStage(tmp_path, script) as run:
        keeper = await connect(port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for _ in range(rounds):  # each a fresh connection, as a client reconnecting in a loop
                bad = await connect(port)
                bad.transport.write(struct.pack("<I", 1 << 20))
                unmasked = await ws_connect(wport, "/")
                unmasked.transport.write(frame(0x1, b"hello", masked=False))
                udp.sendto(b"{not json", ("127.0.0.1", uport))
                refused = await connect(deaf)
                await wait_for(
                    lambda b=bad, u=unmasked, r=refused: b.closed and u.closed and r.closed,
                    WAIT,
                    "the bad clients dropped",
                )
            keeper.send(b"alive")
            await wait_for(lambda: keeper.frames() == [b"alive"], WAIT, "the other client still served")
        warnings = [e for e in run.log.events if e["log_level"].name in ("warn", "error")]
        assert any("IN limit of 8" in e.get("reason", "") for e in warnings)  # the first ones are logged
        assert any("datagram from" in e["log_format"] for e in warnings)
        assert any("refused: no receive function" in e["log_format"] for e in warnings)
        # 10 lines per kind and listener in 10 s (a handful of kinds here), not 4 per round
        assert len(warnings) <= 60, [e["log_format"] for e in warnings]
