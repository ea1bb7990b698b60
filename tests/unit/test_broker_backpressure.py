"""Per-connection backpressure of broker sockets (``inflight``, the write-buffer producer, the
frames of a held read, half-close), with fake transports; the real-socket tests are
tests/reliability/test_backpressure.py."""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.task import Clock

from stagetx.broker.framing import parse_url
from stagetx.broker.sockets import INFLIGHT, WRITES, Connection, Endpoint
from tests.unit.test_broker_reload import REGISTRY, Port, Recorder, Transport, connect, frame


class Replier(Recorder):
    """Answers each frame at once unless told to hold the answers back."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = True

    def received(self, sock: Any, value: Any, addr: Any) -> None:
        super().received(sock, value, addr)
        if self.answer:
            sock.send(b"re:" + value)


def endpoint(query: str, handler: Recorder) -> Endpoint:
    ep = Endpoint(parse_url(f"tcp://127.0.0.1:9000?{query}"), handler, REGISTRY, Clock())
    ep.port = Port()
    return ep


def received(handler: Recorder) -> list[bytes]:
    return [e[2] for e in handler.events if e[0] == "received"]


def test_inflight_stops_reading_and_holds_the_rest_of_the_read_until_replies_go_out() -> None:
    handler = Replier()
    handler.answer = False
    conn = connect(endpoint("packet&inflight=2", handler))
    conn.dataReceived(b"".join(frame(b"%d" % i) for i in range(5)))
    assert received(handler) == [b"0", b"1"]
    assert conn.held == INFLIGHT and conn.transport.producerState == "paused"
    handler.answer = True
    conn.send(b"late 0")  # one reply: one request may go on, the next two answer at once
    assert received(handler) == [b"0", b"1", b"2", b"3", b"4"]
    assert conn.held == 0 and conn.transport.producerState == "producing"
    assert conn.inflight == 1  # request 1 is still unanswered


def test_a_full_write_buffer_stops_reading_until_it_drained() -> None:
    handler = Replier()
    conn = connect(endpoint("packet", handler))
    assert conn.transport.producer is conn and conn.transport.bufferSize == 256 * 1024
    conn.pauseProducing()  # what the transport does past outbuf
    conn.dataReceived(frame(b"a") + frame(b"b"))
    assert received(handler) == [] and conn.held == WRITES
    conn.resumeProducing()  # drained
    assert received(handler) == [b"a", b"b"] and conn.transport.producerState == "producing"


def test_a_half_closed_peer_gets_its_replies_then_the_socket_closes() -> None:
    handler = Replier()
    handler.answer = False
    conn: Connection = connect(endpoint("packet", handler))
    conn.dataReceived(frame(b"a") + frame(b"b"))
    conn.readConnectionLost()
    assert not conn.transport.disconnecting
    conn.send(b"re:a")
    assert not conn.transport.disconnecting
    conn.send(b"re:b")
    assert conn.transport.disconnecting and conn.transport.value() == frame(b"re:a") + frame(b"re:b")


class Aborting(Transport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def test_idle_expiry_aborts_instead_of_waiting_for_unsent_output() -> None:
    ep = endpoint("packet", Recorder())
    conn = Connection(ep)
    conn.makeConnection(Aborting())
    ep.set_expire(1000)
    ep.clock.advance(1.2)  # type: ignore[attr-defined]
    assert conn.transport.aborted and conn.connected == 0


def test_a_socket_s_own_expire_wins_over_its_listener_s_and_the_sweep_follows_it() -> None:
    """``socket.expire`` of the original: a socket with a limit of its own is swept on that
    limit (the listener has none here); with it gone, the sweep stops."""
    ep = endpoint("packet", Recorder())
    clock: Clock = ep.clock  # type: ignore[assignment]
    short, forever, plain = (Connection(ep) for _ in range(3))
    for conn in (short, forever, plain):
        conn.makeConnection(Aborting())
    ep.set_socket_expire(short, 400)
    ep.set_socket_expire(forever, 0)
    assert ep.expiring
    clock.advance(0.3)
    short.dataReceived(frame(b"still here"))  # activity restarts its idle time
    clock.advance(0.3)
    assert short.connected
    clock.advance(0.15)
    assert not short.connected and short.close_errno == errno.ETIMEDOUT
    ep.remove(short)
    clock.advance(0.1)  # the next sweep finds no limit left
    assert not ep.expiring and forever.connected and plain.connected
    ep.set_expire(1000)  # the listener's limit: for the socket without one of its own
    clock.advance(1.2)
    assert not plain.connected and forever.connected
