"""Link framing, handshake and frame authentication over in-memory transports and fake time."""

from __future__ import annotations

import struct

import msgpack
import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from stagetx.wire import (
    FLUSH_BYTES,
    FrameTooLarge,
    Link,
    LinkServerFactory,
    LinkSettings,
)
from tests.fakes import LinkPair, LinkRecorder


@pytest.fixture
def pair() -> LinkPair:
    p = LinkPair()
    p.pump()
    return p


def test_handshake_authenticates_both_sides(pair: LinkPair) -> None:
    assert pair.client.authenticated and pair.server.authenticated
    assert pair.client.peer_id == "server-1" and pair.server.peer_id == "client-1"
    assert pair.client_handler.events == [("auth", "server-1")]
    assert pair.server_handler.events == [("auth", "client-1")]


def test_messages_arrive_in_order_with_types_kept(pair: LinkPair) -> None:
    sent = ["text", b"\x00\xffbytes", 1, 1.0, None, True, [1, [2]], {"k": b"v", 3: None}, "caf\udce9"]
    for obj in sent:
        assert pair.client.send(obj)
    pair.pump()
    assert pair.server_handler.messages == sent
    assert [type(m) for m in pair.server_handler.messages] == [type(m) for m in sent]


def test_messages_of_one_turn_leave_as_one_frame(pair: LinkPair) -> None:
    for i in range(100):
        pair.client.send(["msg", i])
    assert pair.ct.value() == b""  # nothing written before the turn ends
    pair.clock.advance(0)
    frames = pair.take(pair.ct)
    assert len(frames) == 1
    pair.server.dataReceived(frames[0])
    assert pair.server_handler.messages == [["msg", i] for i in range(100)]


def test_a_large_batch_is_written_at_once(pair: LinkPair) -> None:
    blob = b"x" * (FLUSH_BYTES // 4)
    for _ in range(4):
        pair.client.send(blob)
    assert len(pair.take(pair.ct)) == 1  # written without waiting for the turn to end


def test_messages_queued_before_authentication_wait_for_it() -> None:
    p = LinkPair()
    p.client.send("early")
    p.clock.advance(0)
    p.pump()
    assert p.server_handler.messages == ["early"]


def test_split_and_coalesced_frames_are_reassembled(pair: LinkPair) -> None:
    pair.client.send("first")
    pair.clock.advance(0)
    pair.client.send({"second": list(range(50))})
    pair.clock.advance(0)
    stream = b"".join(pair.take(pair.ct))
    for i in range(len(stream)):  # one byte at a time
        pair.server.dataReceived(stream[i : i + 1])
    assert pair.server_handler.messages == ["first", {"second": list(range(50))}]
    pair.client.send("third")
    pair.clock.advance(0)
    pair.client.send("fourth")
    pair.clock.advance(0)
    pair.server.dataReceived(b"".join(pair.take(pair.ct)))  # two frames in one read
    assert pair.server_handler.messages[2:] == ["third", "fourth"]


def test_wrong_secret_is_refused_and_logged() -> None:
    with capturedLogs() as events:
        p = LinkPair(client_secret=b"right", server_secret=b"wrong")
        p.pump()
    assert not p.client.authenticated and not p.server.authenticated
    assert p.ct.disconnecting and p.st.disconnecting
    texts = [formatEvent(e) for e in events]
    assert any("refused: bad secret" in t and "client-1" in t for t in texts)
    assert any("refused: bad secret" in t and "server-1" in t for t in texts)
    assert p.client_handler.events == p.server_handler.events == []


def test_tampered_frame_drops_the_link(pair: LinkPair) -> None:
    pair.client.send("good")
    pair.clock.advance(0)
    pair.client.send("evil")
    pair.clock.advance(0)
    good, evil = pair.take(pair.ct)
    pair.server.dataReceived(good)
    tampered = evil[:-1] + bytes((evil[-1] ^ 1,))
    with capturedLogs() as events:
        pair.server.dataReceived(tampered)
    assert pair.st.disconnecting
    assert pair.server_handler.messages == ["good"]
    assert any("bad frame tag" in formatEvent(e) for e in events)


def test_replayed_frame_drops_the_link(pair: LinkPair) -> None:
    pair.client.send("pay once")
    pair.clock.advance(0)
    (frame,) = pair.take(pair.ct)
    pair.server.dataReceived(frame)
    pair.server.dataReceived(frame)
    assert pair.server_handler.messages == ["pay once"]
    assert pair.st.disconnecting


def test_reordered_frames_drop_the_link(pair: LinkPair) -> None:
    for word in ("one", "two"):
        pair.client.send(word)
        pair.clock.advance(0)
    one, two = pair.take(pair.ct)
    pair.server.dataReceived(two + one)
    assert pair.server_handler.messages == []
    assert pair.st.disconnecting


def test_a_frame_reflected_to_its_sender_is_refused(pair: LinkPair) -> None:
    pair.client.send("to server")
    pair.clock.advance(0)
    (frame,) = pair.take(pair.ct)
    pair.client.dataReceived(frame)  # the client's own frame, sent back with a matching seq
    assert pair.client_handler.messages == []
    assert pair.ct.disconnecting


def test_oversized_frame_drops_the_link_before_its_body_arrives() -> None:
    p = LinkPair(max_frame=1024)
    p.pump()
    with capturedLogs() as events:
        p.server.dataReceived(struct.pack("<I", 1025))
    assert p.st.disconnecting
    assert any("over the limit" in formatEvent(e) for e in events)


def test_oversized_hello_is_refused_before_authentication() -> None:
    p = LinkPair(max_frame=1024)
    p.server.dataReceived(struct.pack("<I", 1 << 30))
    assert p.st.disconnecting and not p.server.authenticated


def test_garbage_instead_of_hello_is_refused() -> None:
    p = LinkPair()
    p.server.dataReceived(b"\x05\x00\x00\x00hello")
    assert p.st.disconnecting and p.server_handler.events == []


def test_authenticated_garbage_body_drops_the_link(pair: LinkPair) -> None:
    pair.client._pending.append(b"\xc1")  # 0xc1 is never valid msgpack
    pair.client._pending_bytes = 1
    pair.client.flush()
    pair.pump()
    assert pair.st.disconnecting and pair.server_handler.messages == []


def test_handshake_times_out() -> None:
    clock = Clock()
    link = LinkServerFactory(b"k", "s", LinkRecorder(), clock=clock, handshake_timeout=5).buildProtocol(None)  # type: ignore[arg-type]
    transport = StringTransport()
    link.makeConnection(transport)
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_batches_over_the_frame_limit_are_split(pair: LinkPair) -> None:
    p = LinkPair(max_frame=1024)
    p.pump()
    for i in range(10):
        p.client.send([i, b"y" * 300])
    p.clock.advance(0)
    frames = p.take(p.ct)
    assert len(frames) > 1 and all(len(f) - 4 <= 1024 for f in frames)
    for f in frames:
        p.server.dataReceived(f)
    assert [m[0] for m in p.server_handler.messages] == list(range(10))


def test_entries_packed_by_the_sender_arrive_as_messages_in_order() -> None:
    p = LinkPair(max_frame=1024)
    p.pump()
    packed = [msgpack.packb([i, b"y" * 100]) for i in range(12)]
    p.client.send(["alone", 0])
    assert p.client.send_entries(b"".join(packed[:3]), 3)
    p.client.send(["alone", 1])
    for start in range(3, 12, 3):  # past the frame limit: split between entries, counts kept
        assert p.client.send_entries(b"".join(packed[start : start + 3]), 3)
    p.clock.advance(0)
    frames = p.take(p.ct)
    assert len(frames) > 1 and all(len(f) - 4 <= 1024 for f in frames)
    for f in frames:
        p.server.dataReceived(f)
    got = p.server_handler.messages
    assert got[0] == ["alone", 0] and got[4] == ["alone", 1]
    assert [m[0] for m in got[1:4] + got[5:]] == list(range(12))


def test_a_message_larger_than_a_frame_is_refused_at_send() -> None:
    p = LinkPair(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        p.client.send(b"z" * 1024)


def test_a_failing_handler_does_not_lose_the_link(pair: LinkPair) -> None:
    pair.server_handler.fail_on = "boom"
    for obj in ("a", "boom", "b"):
        pair.client.send(obj)
    with capturedLogs() as events:
        pair.pump()
    assert pair.server_handler.messages == ["a", "b"]
    assert not pair.st.disconnecting
    assert any("handler failed" in formatEvent(e) for e in events)


def test_link_lost_is_told_for_authenticated_links_only(pair: LinkPair) -> None:
    pair.server.connectionLost(Failure(ConnectionError("gone")))
    assert pair.server_handler.events[-1] == ("lost", "client-1")
    assert pair.server.send("late") is False
    fresh = LinkPair()
    fresh.server.connectionLost(Failure(ConnectionError("gone")))
    assert fresh.server_handler.events == []


def test_close_flushes_queued_messages(pair: LinkPair) -> None:
    pair.client.send("last words")
    pair.client.close()
    assert pair.ct.disconnecting
    pair.server.dataReceived(pair.ct.value())
    assert pair.server_handler.messages == ["last words"]


def test_settings_refuse_an_empty_secret() -> None:
    with pytest.raises(ValueError):
        LinkSettings(b"", "n", LinkRecorder())
    assert LinkSettings("text secret", "n", LinkRecorder()).secret == b"text secret"


class ShortSocket(FileDescriptor):
    """A socket transport whose kernel side takes ``room`` more bytes, then none."""

    connected = True

    def __init__(self, room: int) -> None:
        super().__init__(reactor=MemoryReactorClock())
        self.room = room
        self.sent = bytearray()

    def writeSomeData(self, data: bytes) -> int:  # noqa: N802 (Twisted's name)
        taken = min(self.room, len(data))
        self.room -= taken
        self.sent += data[:taken]
        return taken


def test_a_flush_writes_the_socket_directly_only_while_nothing_waits_before_it() -> None:
    link = Link(LinkSettings(b"k", "n", LinkRecorder()), b"C")
    link.transport = socket = ShortSocket(room=100)
    link._send_now(b"a" * 150)  # the socket takes 100 bytes; 50 wait in the transport
    assert bytes(socket.sent) == b"a" * 100
    socket.room = 1_000
    link._send_now(b"b" * 10)  # room again, but it must not overtake the 50 bytes waiting
    assert bytes(socket.sent) == b"a" * 100
    socket.doWrite()  # the reactor's write turn
    assert bytes(socket.sent) == b"a" * 150 + b"b" * 10
    link._send_now(b"c" * 5)  # nothing waits: straight to the socket
    assert bytes(socket.sent) == b"a" * 150 + b"b" * 10 + b"c" * 5
