"""Parking and resuming broker endpoints across a reload (``Endpoint.park``/``resume``, ``Kept``),
with a fake clock and transports; the real-socket tests are tests/e2e/test_reload_keeps_connections.py."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger

from stagetx.broker.framing import parse_url
from stagetx.broker.reload import Kept
from stagetx.broker.sockets import Connection, Endpoint, Registry


class Transport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class Port:
    """A listening port: what parking needs of ``tcp.Port``."""

    def __init__(self) -> None:
        self.reading = True
        self.stopped = False

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopListening(self) -> None:
        self.stopped = True


class Recorder:
    """A handler that records what it is told; refuses the socket ids in ``refuse``."""

    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.refuse = refuse

    def accepted(self, sock: Any) -> bool:
        self.events.append(("accepted", sock.id, sock.transport.producerState))
        return sock.id not in self.refuse

    def received(self, sock: Any, value: Any, addr: Any) -> None:
        self.events.append(("received", sock.id, value))

    def closed(self, sock: Any) -> None:
        self.events.append(("closed", sock.id))

    def failed(self, endpoint: Any, reason: str, code: int) -> None:
        self.events.append(("failed", reason))


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


REGISTRY = Registry()  # one per process: ids are unique across endpoints


def listener(url: str = "tcp://127.0.0.1:9000?packet") -> tuple[Endpoint, Clock]:
    clock = Clock()
    endpoint = Endpoint(parse_url(url), Recorder(), REGISTRY, clock)
    endpoint.port = Port()
    return endpoint, clock


def connect(endpoint: Endpoint) -> Connection:
    conn = Connection(endpoint)
    conn.makeConnection(Transport())
    return conn


def test_a_parked_endpoint_stops_reading_and_resume_offers_each_socket_in_order() -> None:
    endpoint, _ = listener()
    a, b, c = connect(endpoint), connect(endpoint), connect(endpoint)
    a.state = "old runtime"
    parked = endpoint.park()
    assert not endpoint.port.reading and a.state is None
    assert {s.transport.producerState for s in (a, b, c)} == {"paused"}
    a.dataReceived(frame(b"x") + frame(b"y"))  # a read the reactor had already begun: held
    late = connect(endpoint)  # e.g. a broker.join that connects meanwhile: kept, not reading
    assert late.transport.producerState == "paused"
    handler = endpoint.handler = Recorder(refuse=(b.id,))
    endpoint.resume(parked)
    assert handler.events == [
        ("accepted", a.id, "paused"),
        ("received", a.id, b"x"),
        ("received", a.id, b"y"),
        ("accepted", b.id, "paused"),
        ("accepted", c.id, "paused"),
        ("accepted", late.id, "paused"),
    ]
    assert b.transport.disconnecting and not a.transport.disconnecting  # refused: closed
    assert a.transport.producerState == "producing" and endpoint.port.reading


def test_expiry_pauses_while_parked_and_idle_time_survives() -> None:
    endpoint, clock = listener()
    endpoint.set_expire(800)
    idle = connect(endpoint)
    clock.advance(0.5)
    parked = endpoint.park()
    clock.advance(5)  # a long reload: nothing expires while parked
    assert not idle.transport.disconnecting
    endpoint.handler = Recorder()
    endpoint.resume(parked)
    clock.advance(0.1)  # idle since before the reload: closed at the next sweep
    assert idle.transport.disconnecting


def test_kept_endpoints_are_claimed_by_address_and_the_rest_closed() -> None:
    kept_one, _ = listener("tcp://127.0.0.1:9000?packet")
    dropped, _ = listener("tcp://127.0.0.1:9001?packet")
    sock = connect(kept_one)
    gone = connect(dropped)
    kept = Kept([kept_one, dropped], Logger())
    handler = Recorder()
    assert kept.claim(parse_url("tcp://127.0.0.1:9000?packet"), True, handler) is None  # a join is no listener
    assert kept.claim(parse_url("tcp://127.0.0.1:9000?packet"), False, handler) is kept_one
    assert kept.claim(parse_url("tcp://127.0.0.1:9000?packet"), False, handler) is None  # claimed once
    kept.finish()
    assert handler.events == [("accepted", sock.id, "paused")]
    assert dropped.port is None and gone.transport.disconnecting
    assert kept_one.port.reading and not sock.transport.disconnecting


def test_another_framing_keeps_the_port_and_closes_its_connections() -> None:
    endpoint, _ = listener("tcp://127.0.0.1:9000?packet")
    old = connect(endpoint)
    kept = Kept([endpoint], Logger())
    assert kept.claim(parse_url("tcp://127.0.0.1:9000?text"), False, Recorder()) is endpoint
    assert old.transport.disconnecting and endpoint.url.framing == "text"
    kept.finish()
    assert endpoint.port.reading and not endpoint.port.stopped
