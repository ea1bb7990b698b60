"""Broker addresses and framings, without sockets."""

from __future__ import annotations

import struct

import bson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stagetx.broker import addresses
from stagetx.broker.framing import (
    BrokerAddressError,
    BsonFraming,
    FrameError,
    FrameTooLarge,
    JsonFraming,
    PacketFraming,
    TextFraming,
    parse_size,
    parse_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:8081?packet=64k,1m", ("tcp", "127.0.0.1", 8081, "packet", 65536, 1 << 20)),
        ("tcp://127.0.0.1:8081?packet=64k:2m", ("tcp", "127.0.0.1", 8081, "packet", 65536, 2 << 20)),
        ("tcp://[::1]:9?text=100", ("tcp", "::1", 9, "text", 100, 100)),
        ("udp://224.0.0.1:8082?bson", ("udp", "224.0.0.1", 8082, "bson", 1 << 20, 1 << 20)),
        ("tcp://:80", ("tcp", "0.0.0.0", 80, "packet", 1 << 20, 1 << 20)),
        ("tcp://*:80", ("tcp", "0.0.0.0", 80, "packet", 1 << 20, 1 << 20)),
    ],
)
def test_urls_name_scheme_host_port_framing_and_limits(url: str, expected: tuple[object, ...]) -> None:
    u = parse_url(url)
    assert (u.scheme, u.host, u.port, u.framing, u.limit_in, u.limit_out) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://a:1",
        "tcp://host",
        "tcp://a:70000",
        "tcp://a:1?yaml",
        "tcp://a:1?packet=0",
        "tcp://a:1?packet=1,2,3",
        "tcp://a:1/path",
        "wss://a?json",
    ],
)
def test_bad_urls_say_why(url: str) -> None:
    with pytest.raises(BrokerAddressError):
        parse_url(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://a:1", ("packet", 256 << 10, 16 << 20, 0)),
        ("tcp://a:1?text=4k&outbuf=64k&outmax=1m&inflight=32", ("text", 64 << 10, 1 << 20, 32)),
        ("tcp://a:1?inflight=8", ("packet", 256 << 10, 16 << 20, 8)),
    ],
)
def test_backpressure_parameters_follow_the_framing(url: str, expected: tuple[object, ...]) -> None:
    u = parse_url(url)
    assert (u.framing, u.outbuf, u.outmax, u.inflight) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("tcp://a:1?text&nodelay=1", "unknown parameter 'nodelay'"),
        ("tcp://a:1?outbuf=lots", "outbuf: bad frame size"),
        ("tcp://a:1?inflight=-1", "inflight is a number of frames"),
        ("tcp://a:1?outbuf=2m&outmax=1m", "outmax is less than outbuf"),
    ],
)
def test_bad_backpressure_parameters_say_why(url: str, why: str) -> None:
    with pytest.raises(BrokerAddressError, match=why):
        parse_url(url)


def test_sizes_take_k_and_m_units() -> None:
    assert [parse_size(s) for s in ("512", "4k", "4K", "2m", "1g")] == [512, 4096, 4096, 2 << 20, 1 << 30]


def _packet(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def test_packet_frames_are_little_endian_length_then_payload() -> None:
    f = PacketFraming(100, 100)
    assert f.encode(b"abc") == b"\x03\x00\x00\x00abc"
    frames, rest = f.split(_packet(b"one") + _packet(b"") + _packet(b"three")[:5])
    assert frames == [b"one", b""]
    assert rest == _packet(b"three")[:5]


@given(st.lists(st.binary(max_size=50), max_size=10), st.integers(1, 7))
def test_packet_split_survives_any_chunking(payloads: list[bytes], step: int) -> None:
    f = PacketFraming(64, 64)
    stream = b"".join(f.encode(p) for p in payloads)
    got, buf = [], b""
    for i in range(0, len(stream), step):
        frames, buf = f.split(buf + stream[i : i + step])
        got.extend(frames)
    assert got == payloads and buf == b""


def test_an_oversized_packet_is_refused_as_soon_as_its_length_is_known() -> None:
    f = PacketFraming(10, 5)
    with pytest.raises(FrameTooLarge, match="IN limit of 10"):
        f.split(struct.pack("<I", 11))
    with pytest.raises(FrameTooLarge, match="OUT limit of 5"):
        f.encode(b"123456")


def test_text_frames_are_lines_with_optional_cr() -> None:
    f = TextFraming(10, 10)
    assert f.split(b"one\r\ntwo\nthr") == ([b"one", b"two"], b"thr")
    assert f.encode(b"hi") == b"hi\n"
    assert f.encode(42) == b"42\n"
    # a line that already ends with its newline, as the original's scripts write replies, gets no second one
    assert f.encode(b"hi\n") == b"hi\n" and f.encode(b"hi\r\n") == b"hi\r\n"
    with pytest.raises(FrameTooLarge):
        f.split(b"x" * 11)  # no newline yet, already too long
    with pytest.raises(FrameError):
        f.encode({"a": 1})


def test_a_full_size_line_may_wait_for_the_newline_after_its_cr() -> None:
    f = TextFraming(10, 10)
    assert f.split(b"x" * 10 + b"\r") == ([], b"x" * 10 + b"\r")  # IN + 1 bytes kept, legally
    assert f.split(b"x" * 10 + b"\r\n") == ([b"x" * 10], b"")
    with pytest.raises(FrameTooLarge):
        f.split(b"x" * 11 + b"\r")


def test_bson_documents_decode_to_plain_data_never_code() -> None:
    f = BsonFraming(1000, 1000)
    doc = bson.encode({"n": 1, "s": "x", "l": [1, {"b": b"\xff"}], "js": bson.Code("os.exit()"), "big": bson.Int64(5)})
    frames, rest = f.split(doc + doc[:3])
    assert rest == doc[:3]
    value = f.decode(frames[0])
    assert value == {"n": 1, "s": "x", "l": [1, {"b": b"\xff"}], "js": "os.exit()", "big": 5}
    assert type(value["js"]) is str  # noqa: E721 - exactly str, not bson.Code


def test_bson_encodes_lua_data_with_utf8_strings() -> None:
    f = BsonFraming(1000, 1000)
    wire = f.encode({b"name": b"p1", b"raw": b"\xff", 1: [b"a", 2.5]})
    assert bson.decode(wire) == {"name": "p1", "raw": b"\xff", "1": ["a", 2.5]}
    assert bson.decode(f.encode([])) == {}
    with pytest.raises(FrameError):
        f.encode(b"not a table")


def test_bad_bson_is_a_frame_error() -> None:
    f = BsonFraming(1000, 1000)
    with pytest.raises(FrameError):
        f.decode(b"\x06\x00\x00\x00\x99\x00")
    with pytest.raises(FrameTooLarge):
        f.split(struct.pack("<I", 1001))


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:80", "127.0.0.1", 80),
        ("udp://224.0.0.1:8082", "224.0.0.1", 8082),
        ("[::1]:443", "::1", 443),
        ("::1", "::1", 0),
        ("10.0.0.1", "10.0.0.1", 0),
    ],
)
def test_aton_and_ntoa_round_trip_ipv4_and_ipv6(text: str, host: str, port: int) -> None:
    (packed,) = addresses.aton(text)
    assert len(packed) == (6 if "." in host else 18)
    assert addresses.unpack(packed) == (host, port)


def test_packed_text_forms() -> None:
    assert addresses.text(*addresses.unpack(addresses.pack("::1", 80))) == "[::1]:80"
    assert addresses.text(*addresses.unpack(addresses.pack("1.2.3.4", 5))) == "1.2.3.4:5"
    assert addresses.unpack(bytes([10, 0, 0, 1])) == ("10.0.0.1", None)
    with pytest.raises(BrokerAddressError):
        addresses.unpack(b"abc")


def test_loopback_has_its_addresses() -> None:
    found = addresses.interface_addresses()
    assert "127.0.0.1" in found["lo"]


def test_websocket_addresses_have_a_path_and_json_is_a_framing() -> None:
    url = parse_url("ws://127.0.0.1:8082/play?json=4k,64k")
    assert (url.scheme, url.host, url.port, url.path, url.framing) == ("ws", "127.0.0.1", 8082, "/play", "json")
    assert (url.limit_in, url.limit_out) == (4096, 65536)
    assert parse_url("wss://[::1]:1?bson").path == "/"
    assert parse_url("tls://*:9?text").host == "0.0.0.0"


def test_json_framing_is_lines_of_data_only_documents() -> None:
    framing = JsonFraming(1 << 10, 1 << 10)
    frames, rest = framing.split(b'{"a": [1, 2.5, null, true]}\n"x"\n{"b"')
    assert [framing.decode(f) for f in frames] == [{"a": [1, 2.5, None, True]}, "x"] and rest == b'{"b"'
    assert framing.encode({b"k": [b"v", 1], 2: {}}) == b'{"k":["v",1],"2":{}}\n'
    for bad in (b"{", b"\xff", b"[" * 100 + b"]" * 100):
        with pytest.raises(FrameError):
            framing.decode(bad)
    for unsendable in (b"\xff", float("nan")):
        with pytest.raises(FrameError):
            framing.payload(unsendable)


@pytest.mark.parametrize(
    ("document", "why"),
    [
        (b'{"op":"top","id":123456789012345678901234567890}', "integer 123456789012345678901234567890 does not fit"),
        (b"[9223372036854775808]", "does not fit 64 bits"),
        (b"[-9223372036854775809]", "does not fit 64 bits"),
        (b'{"user":"\\ud800"}', "a lone surrogate \\ud800"),
        (b'{"\\udcff":1}', "a lone surrogate \\udcff"),
    ],
)
def test_json_that_lua_cannot_hold_does_not_decode(document: bytes, why: str) -> None:
    with pytest.raises(FrameError, match="bad JSON document") as raised:
        JsonFraming(1 << 10, 1 << 10).decode(document)
    assert why in str(raised.value)


def test_json_at_the_edges_of_what_lua_holds_decodes() -> None:
    document = b'{"min":-9223372036854775808,"max":9223372036854775807,"pair":"\\ud83d\\ude00","\xc3\xa9":"\xc3\xa9"}'
    assert JsonFraming(1 << 10, 1 << 10).decode(document) == {
        "min": -(2**63),
        "max": 2**63 - 1,
        "pair": "\U0001f600",
        "é": "é",
    }
