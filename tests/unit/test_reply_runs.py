"""Replies of a built-in stage in a row to one stage of another process leave as run entries
packed by ``StageHost.reply_all`` (``["r", INSTANCE, SENDER, COUNT, BODY]``), as a Lua stage's
outbox packs its messages; anything else is routed one by one, in order. On a real index stage
and router driven by ``task.Clock``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from stagetx.address import format_reply
from stagetx.child.host import ProcessHost
from stagetx.codec import pack_py, unpack_py
from stagetx.message import RUN_BODY_BYTES, RUN_MAX, Message, run_entries
from stagetx.stages.index.stage import Stage as IndexStage
from stagetx.wire import unpack_entries
from tests.fakes import ConnectedLinks
from tests.support import LogCapture, started_process

B = 1  # the requester: stage b, instance 1, in the process of group 1


def start(tmp_path: Path) -> tuple[ProcessHost, ConnectedLinks]:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "b.lua").write_text("")
    config: dict[str, Any] = {
        "#startup": [["=index+rank"], ["=lua+b"]],
        "=index+rank": "scores",
        "=lua": {"%package": ["[0]lua"], "=lua+b": "b"},
    }
    links = ConnectedLinks()
    host = started_process(tmp_path, config, links)
    host.router.clock.advance(0)  # type: ignore[attr-defined]  # the index load's steps
    return host, links


def requests(host: ProcessHost, members: list[str], reply: str = "got") -> None:
    """A run of ``set`` requests from stage b, each asking its reply at b's handler ``reply``."""
    address = format_reply(host.router.server_id, B, reply)
    body = b"".join(
        msgpack.packb("q")
        + msgpack.packb(pack_py(({"set:top": {member: {"i": i}}},)), use_bin_type=True)
        + msgpack.packb(address)
        for i, member in enumerate(members, 1)
    )
    host.router.frame_received(1, ["r", 0, B, len(members), body])
    host.router.run_queue()


def replies(links: ConnectedLinks) -> list[tuple[str, Any]]:
    """``(kind, …)`` of each frame sent: ``("r", count, [(msgid, value, reply), …])`` for a run."""
    out: list[tuple[str, Any]] = []
    for group, frame in links.frames:
        assert group == 1
        if frame[0] == "r":
            assert frame[1] == B and frame[2] == 0  # to b, from the index stage (instance 0)
            fields = unpack_entries(frame[4])
            messages = [(fields[i], unpack_py(fields[i + 1])[0], fields[i + 2]) for i in range(0, len(fields), 3)]
            assert len(messages) == frame[3]
            out.append(("r", frame[3], messages))
        else:
            out.append((frame[0], frame[2], unpack_py(frame[3])[0]))
    return out


def test_a_chunk_of_requests_from_one_sender_is_answered_in_one_run_in_order(tmp_path: Path) -> None:
    host, links = start(tmp_path)
    size = IndexStage.chunk  # the requests of one chunk; more would be answered after each chunk
    requests(host, [f"m{i}" for i in range(size)])
    [(kind, count, messages)] = replies(links)
    assert kind == "r" and count == size
    assert [msgid for msgid, _, _ in messages] == ["got"] * size
    assert all(reply is None for _, _, reply in messages)
    # each member scored above the ones before it: rank 1 when set
    assert [value for _, value, _ in messages] == [{b"set:top": {f"m{i}".encode(): 1}} for i in range(size)]
    assert host.stages[0].sent == size


def test_requests_past_a_chunk_are_answered_after_each_chunk(tmp_path: Path) -> None:
    host, links = start(tmp_path)
    size = IndexStage.chunk
    requests(host, [f"m{i}" for i in range(size + 3)])
    assert [(kind, count) for kind, count, _ in replies(links)] == [("r", size), ("r", 3)]


def test_more_than_a_run_holds_go_in_several_runs(tmp_path: Path) -> None:
    host, links = start(tmp_path)
    host.stages[0].reply_all([(_message(host, "got"), i) for i in range(RUN_MAX + 3)])
    runs = replies(links)
    assert [(kind, count) for kind, count, _ in runs] == [("r", RUN_MAX), ("r", 3)]
    assert [value for _, _, messages in runs for _, value, _ in messages] == list(range(RUN_MAX + 3))


def test_a_single_reply_a_local_one_and_a_too_large_one_are_routed_one_by_one_in_order(tmp_path: Path) -> None:
    host, links = start(tmp_path)
    links.room = 300
    stage = host.stages[0]
    local = Message("q", b"\x90", host.router.sender_of(0), format_reply(host.router.server_id, 0, "self"))
    stage.reply_all(
        [
            (_message(host, "one"), 1),
            (local, "to itself"),
            (_message(host, "big"), "x" * 400),
            (_message(host, "big"), "y"),
            (_message(host, "two"), 2),
            (_message(host, "two"), 3),
        ]
    )
    assert replies(links) == [
        ("m", "one", 1),
        ("m", "big", b"x" * 400),
        ("m", "big", b"y"),
        ("r", 2, [("two", 2, None), ("two", 3, None)]),
    ]
    assert host.router.queue_length() == 1  # the reply to itself, queued here


def test_a_reply_address_that_does_not_parse_is_logged_and_the_others_go(tmp_path: Path) -> None:
    host, links = start(tmp_path)
    bad = Message("q", b"\x90", host.router.sender_of(B), "^nonsense")
    with LogCapture() as capture:
        host.stages[0].reply_all([(bad, 1), (bad, 2), (_message(host, "got"), 3), (_message(host, "got"), 4)])
    assert replies(links) == [("r", 2, [("got", 3, None), ("got", 4, None)])]
    assert capture.text().count("reply to 'q' dropped") == 1  # once for the replies in a row


def test_run_entries_hold_payloads_of_every_bin_size_and_split_past_the_body_bound() -> None:
    head = msgpack.packb("r")  # any head: the entries are checked from what follows it
    payloads = [b"", b"a" * 255, b"b" * 256, b"c" * 1000, b"d" * 65536, b"e"]
    entries = list(run_entries(head, msgpack.packb("got"), msgpack.packb(None), payloads))
    assert sum(len(b) for b in payloads[:5]) >= RUN_BODY_BYTES > sum(len(b) for b in payloads[:4])
    assert [count for _, count in entries] == [5, 1]  # the fifth payload filled the first entry's body
    read = []
    for entry, count in entries:
        assert entry.startswith(head)
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(entry[len(head) :])
        assert next(unpacker) == count
        fields = list(_fields(next(unpacker)))
        assert fields[0::3] == ["got"] * count and fields[2::3] == [None] * count
        read += fields[1::3]
    assert read == payloads


def _fields(body: bytes) -> Any:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(body))
    unpacker.feed(body)
    return unpacker


def _message(host: ProcessHost, reply: str) -> Message:
    """A request from stage b whose reply goes to b's handler ``reply``."""
    return Message("q", b"\x90", host.router.sender_of(B), format_reply(host.router.server_id, B, reply))
