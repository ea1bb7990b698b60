"""Links over real loopback TCP and UNIX sockets: authentication, order, refusal."""

from __future__ import annotations

import os
import select
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from stagetx.wire import Link, LinkClientFactory, LinkServerFactory

COUNT = 10_000
TIMEOUT = 30


class Collector:
    """Fires ``done`` after ``expected`` messages; ``ready`` on authentication."""

    def __init__(self, expected: int = 0) -> None:
        self.expected = expected
        self.messages: list[Any] = []
        self.ready: defer.Deferred[Link] = defer.Deferred()
        self.done: defer.Deferred[list[Any]] = defer.Deferred()
        self.lost: defer.Deferred[type[BaseException]] = defer.Deferred()

    def link_authenticated(self, link: Link) -> None:
        self.ready.callback(link)

    def message_received(self, link: Link, obj: Any) -> None:
        self.messages.append(obj)
        if len(self.messages) == self.expected:
            self.done.callback(self.messages)

    def link_lost(self, link: Link, reason: Failure) -> None:
        self.lost.callback(reason.type)  # a Failure as result would errback


def _timeout(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    return d.addTimeout(TIMEOUT, reactor)


async def _exchange(
    listen: Callable[[LinkServerFactory], IListeningPort], connect: Callable[[IListeningPort, LinkClientFactory], Any]
) -> None:
    server, client = Collector(COUNT), Collector(COUNT)
    port = listen(LinkServerFactory(b"shared", "srv", server))
    connector = connect(port, LinkClientFactory(b"shared", "cli", client))
    try:
        client_link = await _timeout(client.ready)
        server_link = await _timeout(server.ready)
        assert client_link.peer_id == "srv" and server_link.peer_id == "cli"
        started = time.perf_counter()
        for i in range(COUNT):
            client_link.send([i, b"payload-%d" % i])
            if i % 1000 == 999:  # several reactor turns: several frames
                await _timeout(_turn())
        received = await _timeout(server.done)
        elapsed = time.perf_counter() - started
        assert [m[0] for m in received] == list(range(COUNT))
        assert received[1234] == [1234, b"payload-1234"]
        for i in range(COUNT):  # and back the other way
            server_link.send(i)
        assert await _timeout(client.done) == list(range(COUNT))
        print(f"{COUNT / elapsed:,.0f} messages/s one way")
        client_link.close()
        assert await _timeout(server.lost) is ConnectionDone
    finally:
        connector.disconnect()
        await port.stopListening()


def _turn() -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d


@pytest_twisted.ensureDeferred
async def test_tcp_loopback_carries_ten_thousand_messages_in_order() -> None:
    await _exchange(
        lambda f: reactor.listenTCP(0, f, interface="127.0.0.1"),
        lambda port, f: reactor.connectTCP("127.0.0.1", port.getHost().port, f),
    )


@pytest_twisted.ensureDeferred
async def test_unix_socket_carries_ten_thousand_messages_in_order() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g0.sock")
        await _exchange(
            lambda f: reactor.listenUNIX(path, f),
            lambda port, f: reactor.connectUNIX(path, f),
        )


@pytest_twisted.ensureDeferred
async def test_tcp_peer_with_wrong_secret_is_refused() -> None:
    server, client = Collector(), Collector()
    lost: defer.Deferred[None] = defer.Deferred()

    class Factory(LinkClientFactory):
        def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
            lost.callback(None)

    port = reactor.listenTCP(0, LinkServerFactory(b"right", "srv", server), interface="127.0.0.1")
    connector = reactor.connectTCP("127.0.0.1", port.getHost().port, Factory(b"wrong", "cli", client))
    try:
        await _timeout(lost)
        assert not server.ready.called and not client.ready.called
    finally:
        connector.disconnect()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_large_messages_cross_in_several_frames() -> None:
    server, client = Collector(8), Collector()
    port = reactor.listenTCP(0, LinkServerFactory(b"k", "srv", server, max_frame=1 << 20), interface="127.0.0.1")
    connector = reactor.connectTCP(
        "127.0.0.1", port.getHost().port, LinkClientFactory(b"k", "cli", client, max_frame=1 << 20)
    )
    try:
        link = await _timeout(client.ready)
        blobs = [bytes([i]) * 700_000 for i in range(8)]  # more than one frame can hold together
        for blob in blobs:
            link.send(blob)
        assert await _timeout(server.done) == blobs
    finally:
        connector.disconnect()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_flush_hands_the_frame_to_the_socket_before_the_reactor_turn_ends() -> None:
    """A flushed frame is readable at the peer's socket at once, while this process is still busy
    (a transport left to itself would write it only at the reactor's next write turn)."""
    server, client = Collector(1), Collector()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g0.sock")
        port = reactor.listenUNIX(path, LinkServerFactory(b"k", "srv", server))
        connector = reactor.connectUNIX(path, LinkClientFactory(b"k", "cli", client))
        try:
            link = await _timeout(client.ready)
            server_link = await _timeout(server.ready)
            link.send(b"now")
            link.flush()
            readable, _, _ = select.select([server_link.transport.socket], [], [], 0)
            assert readable, "the frame is still queued in this process"
            assert await _timeout(server.done) == [b"now"]
        finally:
            connector.disconnect()
            await port.stopListening()
