"""Links between servers (stagetx.cluster.peers) over real loopback TCP: link, queue, reconnect, refuse."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from stagetx.cluster.peers import PeerLinks
from tests.support import LogCapture, wait_for


class Events:
    def __init__(self) -> None:
        self.linked: list[str] = []
        self.unlinked: list[str] = []
        self.messages: list[tuple[str, Any]] = []
        self.drained: list[str] = []

    def peer_linked(self, server_id: str, link: Any, via: str | None) -> None:
        self.linked.append(server_id)

    def peer_message(self, server_id: str, obj: Any) -> None:
        self.messages.append((server_id, obj))

    def peer_unlinked(self, server_id: str) -> None:
        self.unlinked.append(server_id)

    def peer_drained(self, server_id: str) -> None:
        self.drained.append(server_id)


def peers(
    server_id: str, secret: bytes = b"k", listen: bool = True, port: int = 0, queue: int = 10
) -> tuple[PeerLinks, Events]:
    events = Events()
    links = PeerLinks(server_id, secret, ("127.0.0.1", port) if listen else None, events, reactor, 1 << 20, queue)
    links.startService()
    return links, events


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_frames_queued_before_the_link_arrive_in_order_and_the_link_comes_back_after_a_restart() -> None:
    server, server_events = peers("srv")
    port = server.port_number
    client, client_events = peers("cli", listen=False)
    try:
        client.dial(f"127.0.0.1:{port}")
        await wait_for(lambda: "srv" in client_events.linked, 10, "the link")
        assert client.send("srv", ["m", 1])[0]
        await wait_for(lambda: len(server_events.messages) == 1, 10, "the frame")
        await server.stopService()
        await wait_for(lambda: client_events.unlinked == ["srv"], 10, "the link lost")
        for i in range(2, 5):
            assert client.send("srv", ["m", i]) == (True, None)
        server2, server2_events = peers("srv", port=port)
        try:
            await wait_for(lambda: len(server2_events.messages) == 3, 15, "the queued frames after reconnecting")
            assert [obj for _, obj in server2_events.messages] == [["m", 2], ["m", 3], ["m", 4]]
        finally:
            await server2.stopService()
    finally:
        await client.stopService()


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_peer_that_stops_reading_gets_a_bounded_queue_then_everything_in_order() -> None:
    """Without the bound, every frame would wait in Twisted's write buffer, as long as sync lasts."""
    server, server_events = peers("srv")
    client, client_events = peers("cli", listen=False, queue=10)
    try:
        client.dial(f"127.0.0.1:{server.port_number}")
        await wait_for(lambda: "cli" in server_events.linked, 10, "the link")
        server.links["cli"].transport.pauseProducing()  # the peer reads nothing
        body = b"x" * 10_000
        for i in range(10_000):  # the socket takes a few MiB, Twisted's buffer 64 KiB, the queue 10
            ok, reason = client.send("srv", ["m", i, body])
            if not ok:
                break
        assert not ok and reason == "server 'srv' is not reading and its queue is full (10)", reason
        assert client.is_full("srv") and len(client.queues["srv"]) == 10
        server.links["cli"].transport.resumeProducing()
        await wait_for(lambda: len(server_events.messages) == i, 15, "every frame accepted")
        assert [obj[1] for _, obj in server_events.messages] == list(range(i))
        assert client_events.drained == ["srv"] and not client.is_full("srv")
        assert client.send("srv", ["m", i, body]) == (True, None)
        await wait_for(lambda: len(server_events.messages) == i + 1, 10, "a frame after the stall")
    finally:
        await client.stopService()
        await server.stopService()


def test_the_queue_for_a_peer_without_a_link_is_bounded() -> None:
    links = PeerLinks("me", b"k", None, Events(), reactor, 1 << 20, 2)
    assert links.send("x", ["m"]) == (True, None)
    assert links.send("x", ["m"], reroute="w") == (True, None)
    ok, reason = links.send("x", ["m"])
    assert ok is False and "queue is full (2)" in str(reason)
    assert links.is_full("x")
    assert [q.reroute for q in links.take_queue("x")] == [None, "w"]
    assert not links.is_full("x")


class StalledLink:
    stalled = True  # its peer reads nothing: every frame queues


def test_a_peer_that_does_not_read_stays_a_steady_route_while_its_queue_is_under_half_full() -> None:
    """Runs keep their form in the queue; the half kept free takes a turn's runs, even past the
    bound (refusing one would lose messages their senders were told were sent)."""
    links = PeerLinks("me", b"k", None, Events(), reactor, 1 << 20, 4)
    links.links["x"] = StalledLink()  # type: ignore[assignment]
    assert links.has_room("x")
    for _ in range(2):
        assert links.send("x", ["m"]) == (True, None)
    assert not links.has_room("x")
    for _ in range(2):
        assert links.send("x", ["m"]) == (True, None)
    assert links.send("x", ["m"]) == (False, "server 'x' is not reading and its queue is full (4)")
    assert links.send("x", ["r"], steady=True) == (True, None)
    assert len(links.queues["x"]) == 5


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_peer_with_another_secret_never_links() -> None:
    server, server_events = peers("srv")
    client, client_events = peers("cli", secret=b"wrong", listen=False)
    try:
        with LogCapture() as log:
            client.dial(f"127.0.0.1:{server.port_number}")
            await wait_for(lambda: any("refused" in line for line in log.lines()), 10, "the handshake refused")
        assert server_events.linked == [] and client_events.linked == []
    finally:
        await client.stopService()
        await server.stopService()


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_dialing_itself_is_noticed_and_stopped() -> None:
    server, events = peers("srv")
    try:
        server.dial(f"127.0.0.1:{server.port_number}")
        await wait_for(lambda: not server.dialing(), 10, "the self-dial to stop")
        assert events.linked == []
    finally:
        await server.stopService()


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_cluster_port_another_program_holds_is_logged_once_and_taken_once_free() -> None:
    """Process 1 restarted while another program took its cluster port: it went on without the
    port after a traceback; now it keeps trying and listens once the port is free."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    with LogCapture() as capture:
        server, server_events = peers("srv", port=port)
        try:
            await wait_for(lambda: f"cannot listen on 127.0.0.1:{port}" in capture.text(), 10, "the error")
            assert server.port_number is None
            holder.close()
            await wait_for(lambda: server.port_number == port, 10, "the port taken")
            client, client_events = peers("cli", listen=False)
            try:
                client.dial(f"127.0.0.1:{port}")
                await wait_for(lambda: "srv" in client_events.linked, 10, "the link")
            finally:
                await client.stopService()
        finally:
            holder.close()
            await server.stopService()
    assert capture.text().count("cannot listen on") == 1
