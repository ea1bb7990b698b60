"""Raw Twisted peers for the baselines, run as ``python -m bench.baselines.peers ROLE …``.

Roles (each prints JSON lines on stdout and stops by itself after ``--limit`` seconds):

- ``sink``: listen on 127.0.0.1, print ``{"port"}``, count ``--count`` Int32 frames (unpacking
  each with msgpack when ``--msgpack``), print ``{"frames", "seconds"}`` from first to last frame.
- ``source``: connect and send ``--count`` frames of ``--size`` bytes as fast as the transport
  takes them (a pull producer, so memory stays flat), packing each with msgpack when asked.
- ``echo``: listen, print ``{"port"}``, send every frame back.
- ``client``: ``--conns`` connections with ``--inflight`` requests in flight each; prints
  ``{"replies", "seconds", "p50_us", "p99_us"}`` after ``--count`` replies in all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from typing import Any

import msgpack
from twisted.internet import protocol, reactor
from twisted.internet.interfaces import IPullProducer
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

BATCH = 1000


def emit(**fields: Any) -> None:
    """One JSON line on stdout, flushed so the harness sees it at once."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def stop() -> None:
    """Stop the reactor once (a deadline and completion may both ask)."""
    if reactor.running:
        reactor.stop()


class Sink(Int32StringReceiver):
    """Counts frames from first to ``count``-th and reports the rate's inputs."""

    MAX_LENGTH = 1 << 20

    def __init__(self, count: int, unpack: bool) -> None:
        self.count, self.unpack, self.seen, self.first = count, unpack, 0, 0.0

    def stringReceived(self, data: bytes) -> None:
        if self.unpack:
            msgpack.unpackb(data)
        if not self.seen:
            self.first = time.perf_counter()
        self.seen += 1
        if self.seen == self.count:
            self.report()

    def report(self) -> None:
        emit(frames=self.seen, seconds=time.perf_counter() - self.first if self.seen else 0.0)
        stop()


class SinkFactory(protocol.Factory):
    """Makes the one :class:`Sink` and reports it at the deadline."""

    def __init__(self, count: int, unpack: bool) -> None:
        self.count, self.unpack, self.sink = count, unpack, None

    def buildProtocol(self, addr: Any) -> Sink:
        self.sink = Sink(self.count, self.unpack)
        return self.sink

    def deadline(self) -> None:
        if self.sink is None:
            stop()
        else:
            self.sink.report()


@implementer(IPullProducer)
class Source(Int32StringReceiver):
    """Sends ``count`` frames in batches whenever the transport asks for more."""

    def __init__(self, count: int, size: int, pack: bool) -> None:
        self.left, self.pack = count, pack
        self.payload = b"x" * (size - 12 if pack else size)

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        n = min(BATCH, self.left)
        self.left -= n
        send, payload = self.sendString, self.payload
        if self.pack:
            packb = msgpack.packb
            for i in range(n):
                send(packb([i, payload]))
        else:
            for _ in range(n):
                send(payload)
        if not self.left:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.left = 0

    def connectionLost(self, reason: Any = None) -> None:
        stop()


class Echo(Int32StringReceiver):
    """Sends every frame straight back."""

    MAX_LENGTH = 1 << 20

    def stringReceived(self, data: bytes) -> None:
        self.sendString(data)


class Client(Int32StringReceiver):
    """Keeps ``inflight`` requests outstanding and records each round-trip time."""

    def __init__(self, run: ClientRun, inflight: int) -> None:
        self.run, self.inflight, self.sent = run, inflight, deque[float]()

    def connectionMade(self) -> None:
        self.run.connected(self)

    def start(self) -> None:
        for _ in range(self.inflight):
            self.send()

    def send(self) -> None:
        if self.run.claim():
            self.sent.append(time.perf_counter())
            self.sendString(self.run.payload)

    def stringReceived(self, data: bytes) -> None:
        self.run.replied(time.perf_counter() - self.sent.popleft())
        self.send()


class ClientRun:
    """Shared state of all client connections: counts, latencies, start and end."""

    def __init__(self, count: int, conns: int, size: int) -> None:
        self.count, self.conns, self.payload = count, conns, b"x" * size
        self.claimed, self.latencies, self.protocols = 0, list[float](), list[Client]()
        self.first = 0.0

    def connected(self, proto: Client) -> None:
        self.protocols.append(proto)
        if len(self.protocols) == self.conns:
            self.first = time.perf_counter()
            for p in self.protocols:
                p.start()

    def claim(self) -> bool:
        if self.claimed >= self.count:
            return False
        self.claimed += 1
        return True

    def replied(self, seconds: float) -> None:
        self.latencies.append(seconds)
        if len(self.latencies) == self.count:
            self.report()

    def report(self) -> None:
        lat = sorted(self.latencies)
        n = len(lat)
        emit(
            replies=n,
            seconds=time.perf_counter() - self.first if self.first else 0.0,
            p50_us=lat[n // 2] * 1e6 if n else None,
            p99_us=lat[min(n - 1, int(n * 0.99))] * 1e6 if n else None,
        )
        stop()


def listen(factory: protocol.Factory) -> None:
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=4096)
    emit(port=port.getHost().port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="peers")
    p.add_argument("role", choices=["sink", "source", "echo", "client"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--msgpack", action="store_true")
    p.add_argument("--inflight", type=int, default=1)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--limit", type=float, default=30.0)
    a = p.parse_args(argv)
    on_deadline = stop
    if a.role == "sink":
        sink_factory = SinkFactory(a.count, a.msgpack)
        listen(sink_factory)
        on_deadline = sink_factory.deadline
    elif a.role == "echo":
        listen(protocol.Factory.forProtocol(Echo))
    elif a.role == "source":
        factory = protocol.ClientFactory.forProtocol(lambda: Source(a.count, a.size, a.msgpack))
        reactor.connectTCP("127.0.0.1", a.port, factory)
    else:
        run = ClientRun(a.count, a.conns, a.size)
        factory = protocol.ClientFactory.forProtocol(lambda: Client(run, a.inflight))
        for _ in range(a.conns):
            reactor.connectTCP("127.0.0.1", a.port, factory)
        on_deadline = run.report
    reactor.callLater(a.limit, on_deadline)
    reactor.run()


if __name__ == "__main__":
    main()
