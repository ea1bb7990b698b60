"""Process links: the reconnect policy between processes of one machine."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from stagetx.address import parse_target
from stagetx.child.links import ProcessLinks, local_retry
from stagetx.message import Sender
from stagetx.router import Router
from stagetx.wire import pack_message, unpack_entries
from tests.fakes import LinkPair


def test_a_sibling_process_is_retried_within_tens_of_milliseconds_and_at_most_every_second() -> None:
    """At start-up a process dials siblings that may not listen yet: the first retries come
    quickly (a frame for that sibling waits no longer than that), later ones back off to 1 s."""
    policy = local_retry()
    delays = [policy(attempt) for attempt in range(40)]
    assert 0.02 <= delays[0] <= 0.04
    assert sum(delays[:5]) < 0.5
    assert max(delays) <= 1.02
    assert delays[-1] >= 1.0


def _links(tmp_path: Any, max_frame: int = 4096) -> tuple[ProcessLinks, Router]:
    clock = Clock()
    router = Router("srv", 0, [("a", 0), ("b", 1)], clock, clock.seconds)
    return ProcessLinks(router, str(tmp_path), 2, b"secret", clock, max_frame), router


def test_a_message_too_large_for_a_link_is_refused_with_a_reason_while_the_process_is_up(tmp_path: Any) -> None:
    links, router = _links(tmp_path)
    pair = LinkPair(max_frame=4096)
    pair.pump()
    links.connected(1, pair.client)
    ok, reason = router.send(Sender("srv", 0, "a", 0), parse_target("b:x"), b"\x00" * 5000)
    assert ok is False and "exceeds the frame limit" in str(reason)
    assert router.send(Sender("srv", 0, "a", 0), parse_target("b:y"), b"small") == (True, None)


def test_a_message_too_large_is_refused_when_queued_and_the_new_link_carries_the_rest(tmp_path: Any) -> None:
    links, _ = _links(tmp_path)
    assert links.send(1, ["m", 1, "first", b"", 0, None]) == (True, None)
    ok, reason = links.send(1, ["m", 1, "huge", b"\x00" * 5000, 0, None])
    assert ok is False and "exceeds the frame limit" in str(reason)
    assert links.send(1, ["m", 1, "last", b"", 0, None]) == (True, None)
    pair = LinkPair(max_frame=4096)
    pair.pump()
    links.connected(1, pair.client)
    pair.pump()
    assert [m[2] for m in pair.server_handler.messages] == ["first", "last"]
    assert pair.client.authenticated and pair.server.authenticated


def test_steady_messages_go_as_one_run_entry_and_wait_like_others_if_the_link_dropped(tmp_path: Any) -> None:
    links, router = _links(tmp_path)
    pair = LinkPair(max_frame=4096)
    pair.pump()
    links.connected(1, pair.client)
    sender = router.sender_of(0)
    address = parse_target("b:x=back")
    steady = router.steady(sender, address)
    assert steady is not None
    room, group = steady
    assert group == 1 and 0 < room < 4096
    head, msgid, reply, server, reroute = router.run_parts(sender, address)  # type: ignore[arg-type]
    assert server is None and reroute is None  # a process of this server
    body = b"".join(msgid + b"\xc4" + bytes((len(p),)) + p + reply for p in (b"\x91\x01", b"\x91\x02"))
    entry = head + b"\x02\xc4" + bytes((len(body),)) + body  # as the prelude's outbox joins it
    assert router.send_run(1, entry) == (True, None)
    pair.pump()
    assert pair.server_handler.messages == [["r", 1, 0, 2, body]]
    assert unpack_entries(body) == ["x", b"\x91\x01", "^srv/0/back", "x", b"\x91\x02", "^srv/0/back"]
    pair.client.connectionLost(Failure(ConnectionDone()))  # dropped within the turn: queued
    links.disconnected(1, pair.client)
    assert router.steady(sender, parse_target("b:x=back")) is None
    assert router.send_run(1, entry) == (True, None)
    assert [list(frame) for frame in links._pending[1]] == [["r", 1, 0, 2, body]]


def _messages(frames: list[Any]) -> list[tuple[Any, ...]]:
    """``(kind, instance, msgid, sender)`` of every message of ``frames``, runs opened."""
    out: list[tuple[Any, ...]] = []
    for frame in frames:
        if frame[0] == "r":
            fields = unpack_entries(frame[4])
            out += [("r", frame[1], fields[i], frame[2]) for i in range(0, len(fields), 3)]
        else:
            out.append(
                (frame[0], frame[1], frame[2] if frame[0] == "m" else None, frame[4] if frame[0] == "m" else None)
            )
    return out


def test_messages_routed_in_python_to_one_stage_of_another_process_leave_as_runs_in_order(tmp_path: Any) -> None:
    clock = Clock()
    router = Router("srv", 0, [("a", 0), ("b", 1), ("c", 1), ("d", 0)], clock, clock.seconds)
    links = ProcessLinks(router, str(tmp_path), 2, b"secret", clock, 1 << 20)
    pair = LinkPair()
    pair.pump()
    links.connected(1, pair.client)
    a, d = router.sender_of(0), router.sender_of(3)
    for _ in range(40):
        assert router.send(a, parse_target("b:x"), b"\x91\x01") == (True, None)
    assert router.send(d, parse_target("b:y"), b"\x91\x02") == (True, None)  # another sender
    assert router.send(a, parse_target("c:z"), b"\x91\x03") == (True, None)  # another stage
    assert links.send(1, ["delay", 0.5]) == (True, None)  # any other frame: after them
    assert router.send(a, parse_target("c:w"), b"\xc4" + b"\x00" * 20000) == (True, None)  # too big for a run
    clock.advance(0)  # the end of the reactor turn: the run being built leaves
    pair.pump()
    got = pair.server_handler.messages
    assert [len(unpack_entries(f[4])) // 3 for f in got if f[0] == "r"] == [32, 8, 1, 1]
    assert _messages(got) == [
        *[("r", 1, "x", 0)] * 40,
        ("r", 1, "y", 3),
        ("r", 2, "z", 0),
        ("delay", 0.5, None, None),
        ("m", 2, "w", 0),
    ]
    assert router.send(a, parse_target("b:x"), b"\x91\x04") == (True, None)
    pair.client.connectionLost(Failure(ConnectionDone()))  # dropped within the turn: it waits
    links.disconnected(1, pair.client)
    assert [frame[2] for frame in links._pending[1]] == ["x"]


def test_a_process_that_does_not_read_stays_steady_while_its_queue_is_under_half_full(tmp_path: Any) -> None:
    """Frames for a stalled link wait in the bounded queue (runs as they came) and follow in
    order once it drained; they used to pile up in Twisted's write buffer without a bound."""
    links, _ = _links(tmp_path)
    pair = LinkPair(max_frame=4096)
    pair.pump()
    links.connected(1, pair.client)
    pair.client.stalled = True  # as Twisted's pauseProducing leaves it
    assert links.steady_room(1) > 0
    run = pack_message(["r", 1, 0, 1, pack_message("a") + pack_message(b"") + pack_message(None)])
    assert links.send_entries(1, run, 1) == (True, None)
    assert links.send(1, ["m", 1, "b", b"", 0, None]) == (True, None)
    pair.pump()
    assert pair.server_handler.messages == []  # nothing written to the stalled link
    pair.client.stalled = False
    links.drained(1, pair.client)  # what the link's handler hears when Twisted resumes it
    links.flush()
    pair.pump()
    kinds = [(m[0], m[3] if m[0] == "r" else m[2]) for m in pair.server_handler.messages]
    assert kinds == [("r", 1), ("r", 1)]  # the run as it came, then "b" in a run of its own
    assert unpack_entries(pair.server_handler.messages[1][4])[0] == "b"


def test_a_process_that_does_not_read_refuses_past_its_queue_bound(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("stagetx.child.links.PENDING_LIMIT", 4)
    links, _ = _links(tmp_path)
    pair = LinkPair(max_frame=4096)
    pair.pump()
    links.connected(1, pair.client)
    pair.client.stalled = True
    for i in range(2):
        assert links.send(1, ["m", 1, str(i), b"", 0, None]) == (True, None)
    assert links.steady_room(1) == 0  # half full: no longer steady
    for i in range(2):
        assert links.send(1, ["m", 1, str(i), b"", 0, None]) == (True, None)
    assert links.send(1, ["m", 1, "x", b"", 0, None]) == (False, "process 2 is not reading and its queue is full")
