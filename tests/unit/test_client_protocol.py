"""The client's framing, command parsing and reply texts (stagetx.client.protocol), no sockets."""

from __future__ import annotations

import struct

import bson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stagetx.client.protocol import (
    MAX_REQUEST,
    Command,
    CommandError,
    Decoder,
    ProtocolError,
    describe,
    describe_push,
    encode,
    parse_command,
    split_commands,
)


def test_a_request_is_one_bson_document_with_op_and_id() -> None:
    data = encode(Command("score", {"points": 12}).request(7))
    assert struct.unpack_from("<i", data)[0] == len(data)
    assert bson.decode(data) == {"op": "score", "id": 7, "points": 12}


def test_a_request_over_the_servers_limit_is_refused_before_sending() -> None:
    with pytest.raises(ProtocolError, match="over the server's"):
        encode({"op": "say", "text": "x" * MAX_REQUEST})


@given(
    st.lists(
        st.dictionaries(
            st.text(min_size=1, max_size=5).filter(lambda k: "\0" not in k and "." not in k and not k.startswith("$")),
            st.one_of(st.integers(-(2**31), 2**31 - 1), st.text(max_size=20)),
            max_size=4,
        ),
        max_size=5,
    ),
    st.integers(1, 7),
)
def test_documents_come_out_whole_however_the_stream_is_cut(docs: list[dict], step: int) -> None:
    stream = b"".join(bson.encode(d) for d in docs)
    decoder = Decoder()
    out = []
    for i in range(0, len(stream), step):
        out.extend(decoder.feed(stream[i : i + step]))
    assert out == docs


def test_a_document_over_the_limit_is_refused_as_soon_as_its_length_is_read() -> None:
    with pytest.raises(ProtocolError, match="limit 100"):
        Decoder(limit=100).feed(struct.pack("<i", 101))
    with pytest.raises(ProtocolError, match="length of 2"):
        Decoder().feed(struct.pack("<i", 2))


def test_a_damaged_document_is_a_protocol_error() -> None:
    data = bytearray(bson.encode({"a": "b"}))
    data[4] = 0x7F  # an unknown element type
    with pytest.raises(ProtocolError, match="bad BSON"):
        Decoder().feed(bytes(data))


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("login alice", Command("login", {"user": "alice"})),
        (
            "LOGIN admin 's3cret word'",
            Command("login", {"user": "admin", "password": "s3cret word"}),
        ),
        ("score 120", Command("score", {"points": 120})),
        ("score 12.5", Command("score", {"points": 12.5})),
        ("top", Command("top", {})),
        ("top 5", Command("top", {"n": 5})),
        ("rank", Command("rank", {})),
        ("rank bob", Command("rank", {"user": "bob"})),
        ("join lobby", Command("join", {"channel": "lobby"})),
        (
            'say lobby  it\'s "fine"; really ',
            Command("say", {"channel": "lobby", "text": 'it\'s "fine"; really'}),
        ),
        ("leave", Command("leave", {})),
        ("leave lobby", Command("leave", {"channel": "lobby"})),
    ],
)
def test_command_lines(line: str, command: Command) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "empty"),
        ("login", "usage: login USER"),
        ("login a b c", "usage: login USER"),
        ("score ten", "POINTS must be a number"),
        ("score 9223372036854775808", "POINTS is out of range"),
        ("score -9223372036854775809", "POINTS is out of range"),
        ("score nan", "POINTS must be a finite number"),
        ("top 1e300", "N is out of range"),
        ("top inf", "N must be a finite number"),
        ("say lobby", "usage: say CHANNEL TEXT"),
        ("top 1 2", "usage: top"),
        ("dance", "unknown command 'dance'"),
        ("login 'alice", "quotation"),
    ],
)
def test_wrong_command_lines_say_why(line: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse_command(line)


def test_one_shot_text_splits_at_semicolons() -> None:
    assert split_commands("login alice; score 10;; top ") == ["login alice", "score 10", "top"]


def test_replies_read_as_text() -> None:
    assert describe("login", {"ok": True, "user": "al", "front": 2, "queued_ms": 3}) == [
        "logged in as al on front process 2 (no score yet; waited 3 ms for a login slot)"
    ]
    assert describe("score", {"ok": True, "score": 5.0, "best": 9, "rank": 2, "improved": False}) == [
        "score 5, best 9: rank 2"
    ]
    assert describe("score", {"ok": True, "score": 9, "best": 9, "rank": 1, "improved": True}) == [
        "score 9 (new best): rank 1"
    ]
    assert describe(
        "rank",
        {
            "ok": True,
            "user": "al",
            "rank": 2,
            "total": 3,
            "score": 9,
            "around": [
                {"rank": 1, "user": "bo", "score": 10},
                {"rank": 2, "user": "al", "score": 9},
            ],
        },
    ) == [
        "al: rank 2 of 3, score 9",
        "    1. bo                   10",
        "    2. al                   9  <-",
    ]
    assert describe("rank", {"ok": True, "user": "cy", "total": 3}) == ["cy: no score yet (3 ranked)"]
    assert describe("top", {"ok": True, "total": 0}) == ["(0 ranked)"]
    assert describe("leave", {"ok": True}) == ["left no channel"]
    assert describe("leave", {"ok": True, "left": ["a", "b"]}) == ["left #a, #b"]
    assert describe("say", {"ok": False, "error": "join the channel first"}) == ["error: join the channel first"]
    assert describe_push({"push": "chat", "channel": "lobby", "from": "al", "text": "hi"}) == "[#lobby] al: hi"


@pytest.mark.parametrize(
    "op, reply",
    [
        ("top", {"ok": True, "rows": [{"rank": "a"}, 5, None], "total": "x"}),
        ("rank", {"ok": True, "user": "al", "rank": 1, "around": 7}),
        ("leave", {"ok": True, "left": 3}),
        ("top", {"ok": True, "rows": [{"rank": {"x": 1}, "user": [1]}]}),
    ],
)
def test_a_reply_of_the_wrong_shape_is_shown_as_it_came(op: str, reply: dict) -> None:
    assert describe(op, reply) == [f"unexpected reply: {reply!r}"]


def test_control_characters_from_the_server_are_shown_not_sent_to_the_terminal() -> None:
    push = {"push": "chat", "channel": "lobby", "from": "al", "text": "a\x1b[2Jb\r\x07\x9b"}
    assert describe_push(push) == "[#lobby] al: a\\x1b[2Jb\\x0d\\x07\\x9b"
    assert describe("top", {"ok": False, "error": "unknown message \x1b[31m"}) == ["error: unknown message \\x1b[31m"]
    assert describe_push({"push": "chat", "channel": "c", "from": "é", "text": "ünï 😀"}) == "[#c] é: ünï 😀"
