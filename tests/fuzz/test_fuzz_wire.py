"""Fuzzing the link frame decoder (``stagetx.wire.Link``) before and after authentication.

Whatever bytes arrive, in whatever pieces: ``dataReceived`` never raises, an unauthenticated
peer never gets a message delivered, a bad frame drops the connection (never the process), and
the receive buffer never holds more than one incomplete frame of the limit in force — the
handshake limit before authentication, ``max_frame`` after.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs

from stagetx.wire import (
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX_FRAME,
    Link,
)
from tests.fakes import LinkPair

MAX_FRAME = 4096
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_pair(secret: bytes = b"k", max_frame: int = MAX_FRAME) -> LinkPair:
    """A client (with ``secret``) and the server under test (secret ``k``), small frame limit."""
    return LinkPair(client_secret=secret, max_frame=max_frame)


def buffer_bound(link: Link) -> int:
    """The most bytes a link may hold between reads: one incomplete frame of the limit in force."""
    limit = link.settings.max_frame if link.authenticated else HANDSHAKE_MAX_FRAME
    return 4 + limit


def feed(link: Link, chunks: list[bytes]) -> None:
    for chunk in chunks:
        link.dataReceived(chunk)  # must not raise
        assert len(link._buffer) < buffer_bound(link)


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


garbage = st.lists(st.binary(max_size=300), max_size=12)
lengths = st.integers(min_value=0, max_value=2**32 - 1) | st.integers(HANDSHAKE_MAX_FRAME - 2, DEFAULT_MAX_FRAME)


@FUZZ
@given(chunks=garbage)
def test_random_bytes_before_authentication_deliver_nothing(chunks: list[bytes]) -> None:
    pair = small_pair()
    with capturedLogs():
        feed(pair.server, chunks)
        pair.clock.advance(11)  # past the handshake timeout
    assert pair.server_handler.authentications == 0 and pair.server_handler.messages == []
    assert pair.st.disconnecting or pair.server._dead  # dropped: garbage or the timeout


@FUZZ
@given(length=lengths, body=st.binary(max_size=64))
def test_a_large_length_before_authentication_is_refused_before_buffering(length: int, body: bytes) -> None:
    """Even under the link's own 16 MiB ``max_frame``, a stranger cannot make it buffer more."""
    pair = small_pair(max_frame=DEFAULT_MAX_FRAME)
    with capturedLogs():
        feed(pair.server, [struct.pack("<I", length) + body])
    if length > HANDSHAKE_MAX_FRAME:
        assert pair.server._dead and len(pair.server._buffer) < 4 + 64


@FUZZ
@given(data=st.binary(max_size=400), cut=st.integers(min_value=0, max_value=400))
def test_garbled_hello_or_proof_is_refused(data: bytes, cut: int) -> None:
    """A well-framed HELLO from a peer, then a proof that is random or truncated."""
    pair = small_pair()
    hello = pair.ct.value()
    pair.ct.clear()
    with capturedLogs():
        feed(pair.server, [hello[:cut], hello[cut:], frame(data[:32]), data])
    assert pair.server_handler.authentications == 0 and pair.server_handler.messages == []


@FUZZ
@given(chunks=garbage)
def test_random_bytes_after_authentication_drop_the_link(chunks: list[bytes]) -> None:
    pair = small_pair()
    pair.pump()
    assert pair.server.authenticated
    with capturedLogs():
        feed(pair.server, chunks)
    assert pair.server_handler.messages == []  # no random tag verifies


def tagged(link: Link, seq: int, body: bytes) -> bytes:
    """A data frame as ``link``'s peer would write it (the fuzzer knows the session key)."""
    mac = link._recv_mac.copy()
    mac.update(struct.pack("<Q", seq) + body)
    return frame(mac.digest() + body)


@FUZZ
@given(bodies=st.lists(st.binary(max_size=200), min_size=1, max_size=6), split=st.integers(1, 50))
def test_authenticated_frames_with_random_bodies_never_raise(bodies: list[bytes], split: int) -> None:
    """Correctly tagged frames whose body is anything: delivered if a msgpack array, else dropped."""
    pair = small_pair()
    pair.pump()
    link = pair.server
    stream = b"".join(tagged(link, seq, body) for seq, body in enumerate(bodies))
    with capturedLogs():
        feed(link, [stream[i : i + split] for i in range(0, len(stream), split)])
    expected: list[Any] = []
    for body in bodies:  # the model: deliver each array in order, stop at the first bad body
        try:
            batch = msgpack.unpackb(body, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
        except Exception:
            break
        if type(batch) is not list:
            break
        expected.extend(batch)
    assert repr(pair.server_handler.messages) == repr(expected)  # repr: NaN equals itself


@FUZZ
@given(
    values=st.lists(
        st.recursive(
            st.none()
            | st.integers(-(2**63), 2**64 - 1)
            | st.binary(max_size=20)
            | st.text(max_size=20)
            | st.floats(allow_nan=False),
            lambda inner: st.lists(inner, max_size=4),
            max_leaves=20,
        ),
        max_size=8,
    )
)
def test_replayed_or_reordered_frames_drop_the_link(values: list[Any]) -> None:
    pair = small_pair()
    pair.pump()
    body = msgpack.packb(values, use_bin_type=True)
    first = tagged(pair.server, 0, body)
    with capturedLogs():
        feed(pair.server, [first])
        assert pair.server_handler.messages == values and not pair.server._dead
        feed(pair.server, [first])  # the same frame again: its tag was for seq 0
    assert pair.server._dead and pair.server_handler.messages == values


def test_a_wrong_secret_never_authenticates_either_side() -> None:
    pair = small_pair(secret=b"wrong")
    with capturedLogs() as events:
        pair.pump()
    assert not pair.server.authenticated and not pair.client.authenticated
    assert any("bad secret" in str(e.get("problem", "")) for e in events)
