"""Fuzzing the broker's framings (packet, text, bson) and a real ``Connection`` fed in pieces.

Whatever a client sends: only ``FrameTooLarge``/``FrameError`` leave ``split``/``decode`` (the
connection is then aborted, logged), decoded BSON is plain data, and a connection never holds
more than one incomplete frame within the IN limit.
"""

from __future__ import annotations

import struct
from typing import Any

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from stagetx.broker.framing import (
    MAX_DEPTH,
    BsonFraming,
    FrameError,
    FrameTooLarge,
    Framing,
    PacketFraming,
    TextFraming,
    parse_url,
)
from stagetx.broker.sockets import Connection, Endpoint, Registry, Socket

LIMIT = 64
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRAMINGS = {"packet": PacketFraming, "text": TextFraming, "bson": BsonFraming}
PLAIN = (bytes, str, int, float, bool, type(None))


def pending_bound(framing: Framing) -> int:
    """The most bytes a connection may keep between reads: one incomplete frame at its largest
    (a header and all but one byte of the payload; for text, a line of the full IN size plus the
    ``\r`` of its ``\r\n``)."""
    return {"packet": 4 + framing.limit_in - 1, "text": framing.limit_in + 1, "bson": framing.limit_in - 1}[
        framing.name
    ]


def assert_plain(value: Any, depth: int = 0) -> None:
    """Data only: what a bson document decodes to never holds code or driver types."""
    assert depth <= 64
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            assert_plain(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v, depth + 1)
    else:
        assert type(value) in PLAIN, type(value)


class Handler:
    """Accepts every socket and keeps what it receives."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def accepted(self, sock: Socket) -> bool:
        return True

    def received(self, sock: Socket, value: Any, addr: bytes | None) -> None:
        self.values.append(value)

    def closed(self, sock: Socket) -> None:
        pass

    def failed(self, endpoint: Endpoint, reason: str, code: int) -> None:
        pass


class TCPStringTransport(StringTransport):
    """A ``StringTransport`` with the TCP option a broker connection sets."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def connection(name: str) -> tuple[Connection, StringTransport, Handler]:
    handler = Handler()
    endpoint = Endpoint(parse_url(f"tcp://127.0.0.1:1?{name}={LIMIT},{LIMIT}"), handler, Registry(), Clock())
    conn = Connection(endpoint)
    transport = TCPStringTransport()
    conn.makeConnection(transport)
    return conn, transport, handler


def documents() -> st.SearchStrategy[bytes]:
    """Valid BSON documents, then mangled: the decoder sees both shapes."""
    keys = st.text(max_size=4).filter(lambda k: "\0" not in k)
    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    )
    docs = st.dictionaries(keys, values, max_size=4).map(bson.encode)
    return docs | st.tuples(docs, st.integers(0, 200), st.binary(min_size=1, max_size=3)).map(
        lambda t: t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) + len(t[2]) :]
    )


line_bytes = st.lists(st.sampled_from([b"\r", b"\n", b"x", b"\r\n", b"\x10\x00\x00\x00"]), max_size=100).map(b"".join)
stream = st.lists(st.binary(max_size=80) | documents() | line_bytes, max_size=10)


@FUZZ
@given(name=st.sampled_from(sorted(FRAMINGS)), chunks=stream)
def test_split_and_decode_raise_only_the_documented_errors(name: str, chunks: list[bytes]) -> None:
    framing = FRAMINGS[name](LIMIT, LIMIT)
    buffer = b""
    for chunk in chunks:
        try:
            frames, buffer = framing.split(buffer + chunk)
        except (FrameTooLarge, FrameError):
            return
        assert len(buffer) <= pending_bound(framing)
        for payload in frames:
            try:
                assert_plain(framing.decode(payload))
            except FrameError:
                return


@FUZZ
@given(name=st.sampled_from(sorted(FRAMINGS)), chunks=stream)
def test_a_connection_fed_anything_stays_bounded_and_never_raises(name: str, chunks: list[bytes]) -> None:
    conn, transport, handler = connection(name)
    with capturedLogs():
        for chunk in chunks:
            conn.dataReceived(chunk)
            assert len(conn.buf) <= pending_bound(conn.endpoint.framing)
            if transport.disconnecting or transport.disconnected:
                break
    for value in handler.values:
        assert_plain(value)


def test_a_text_line_of_carriage_returns_is_over_the_limit() -> None:
    """``\\r`` bytes count toward a pending line (only one before ``\\n`` is dropped)."""
    framing = TextFraming(LIMIT, LIMIT)
    with pytest.raises(FrameTooLarge):
        framing.split(b"\r" * (LIMIT + 2))
    assert framing.split(b"x" * LIMIT + b"\r") == ([], b"x" * LIMIT + b"\r")
    assert framing.split(b"x" * LIMIT + b"\r\n") == ([b"x" * LIMIT], b"")


def nested_document(depth: int) -> bytes:
    doc = b"\x05\x00\x00\x00\x00"
    for _ in range(depth):
        body = b"\x03a\x00" + doc + b"\x00"
        doc = struct.pack("<i", len(body) + 4) + body
    return doc


@pytest.mark.parametrize("depth", [63, 64, 500, 990, 5000])
def test_deeply_nested_bson_is_a_frame_error_not_a_recursion_error(depth: int) -> None:
    framing = BsonFraming(1 << 20, 1 << 20)
    (payload,), _ = framing.split(nested_document(depth))
    if depth < MAX_DEPTH:  # the outer document is one level more
        assert_plain(framing.decode(payload))
    else:
        with pytest.raises(FrameError):
            framing.decode(payload)
