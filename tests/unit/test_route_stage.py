"""The route stage through its message interface, with a recording context."""

from __future__ import annotations

import tracemalloc
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger

from stagetx.address import format_reply
from stagetx.codec import NULL, pack_py
from stagetx.message import Message, Sender
from stagetx.stages.route.stage import ACCEPT, Stage

SERVER = "srv"
ROUTE = 9  # the route stage's instance
PUB = Sender(SERVER, 0, "game", 1)
SUB_A = Sender(SERVER, 1, "chat", 2)
SUB_B = Sender(SERVER, 2, "chat", 3)


class RecordingContext:
    """A StageContext that records sends; ``reply_to`` resolves as the router does."""

    stage_id = "route"
    name = "=route+route"
    instance = ROUTE
    base_dir = "/"

    def __init__(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.log = Logger(namespace="test.route", observer=self.events.append)
        self.sent: list[tuple[str, tuple[Any, ...], str | None]] = []
        self.refuse: set[str] = set()
        self.replied: list[tuple[str, tuple[Any, ...]]] = []

    def resolve_path(self, path: str) -> str:
        return path

    def send(self, target: str, *values: Any, reply_to: str | None = None) -> tuple[bool, str | None]:
        if reply_to is not None and not reply_to.startswith("^"):
            reply_to = format_reply(SERVER, ROUTE, reply_to)
        pack_py(values)  # what the router would do: the values must move
        self.sent.append((target, values, reply_to))
        if target in self.refuse:
            return False, "no handler"
        return True, None

    def reply(self, message: Message, *values: Any) -> None:
        """Only a ``route:@`` with a reply address is answered this way (publishes pass it on)."""
        if message.reply is not None:
            self.replied.append((message.reply, values))

    def take(self) -> list[tuple[str, tuple[Any, ...], str | None]]:
        sent, self.sent = self.sent, []
        return sent


def msg(msgid: str, sender: Sender, *values: Any, reply: str | None = None) -> Message:
    return Message(msgid, pack_py(values), sender, reply)


def at(sender: Sender, msgid: str) -> str:
    return format_reply(sender.server, sender.instance, msgid)


def make(config: Any = None) -> tuple[RecordingContext, Stage]:
    context = RecordingContext()
    stage = Stage(context, config)
    stage.start()
    return context, stage


def subscribe(stage: Stage, sender: Sender, table: dict[bytes, Any]) -> None:
    stage.receive(msg("@", sender, table))


def test_offer_round_delivers_to_the_first_acceptor_with_the_publisher_as_reply() -> None:
    context, stage = make()
    subscribe(stage, SUB_A, {b"login": b"on_login"})
    subscribe(stage, SUB_B, {b"login": b"on_login_b"})
    stage.receive(msg("login?eu", PUB, b"HELLO", 7))
    offers = context.take()
    assert [(t, v[0]) for t, v, _ in offers] == [
        (at(SUB_A, "route:@"), "login?eu"),
        (at(SUB_B, "route:@"), "login?eu"),
    ]
    token = offers[0][1][1]
    assert offers[1][1][1] == token
    assert all(r == format_reply(SERVER, ROUTE, ACCEPT) for _, _, r in offers)
    stage.receive(msg(ACCEPT, SUB_B, token.encode()))
    stage.receive(msg(ACCEPT, SUB_A, token.encode()))  # too late
    assert context.take() == [(at(SUB_B, "on_login_b"), ("route:login?eu", b"HELLO", 7), at(PUB, "route:login?eu"))]
    context.clock.advance(1.0)
    assert context.take() == []


def test_return_and_fail_callbacks_from_the_key_as_published() -> None:
    context, stage = make()
    subscribe(stage, SUB_A, {b"login": b"cb"})
    # "route:login?x=ret!oops": the router split "=ret!oops" into the reply address
    stage.receive(msg("login?x", PUB, b"v", reply=at(PUB, "ret!oops")))
    (offer,) = context.take()
    assert offer[1][0] == "login?x=ret!oops"
    stage.receive(msg(ACCEPT, SUB_A, offer[1][1].encode()))
    assert context.take() == [(at(SUB_A, "cb"), ("route:login?x=ret!oops", b"v"), at(PUB, "ret"))]


def test_no_acceptance_within_the_offer_time_calls_the_fail_callback() -> None:
    context, stage = make({"offer_ms": 300})
    subscribe(stage, SUB_A, {b"login": b"cb"})
    stage.receive(msg("login!nobody", PUB, b"v"))
    context.take()
    context.clock.advance(0.299)
    assert context.take() == []
    context.clock.advance(0.001)
    assert context.take() == [(at(PUB, "nobody"), ("route:login!nobody", b"v"), None)]


def test_no_subscriber_fails_at_once_and_without_fail_callback_logs_once() -> None:
    context, stage = make()
    stage.receive(msg("gone!nobody", PUB, 1))
    assert context.take() == [(at(PUB, "nobody"), ("route:gone!nobody", 1), None)]
    stage.receive(msg("gone", PUB, 1))
    stage.receive(msg("gone", PUB, 2))
    assert context.take() == []
    dropped = [e for e in context.events if "dropped" in e["log_format"]]
    assert len(dropped) == 1


def test_partial_acceptance_over_several_subscribe_ids() -> None:
    context, stage = make()
    subscribe(stage, SUB_A, {b"a": b"cb1", b"b": b"cb2"})
    subscribe(stage, SUB_B, {b"b": b"other"})
    stage.receive(msg("a,b", PUB, b"v"))
    token = context.take()[0][1][1]
    stage.receive(msg(ACCEPT, SUB_A, f"{token}?cb1".encode()))
    stage.receive(msg(ACCEPT, SUB_B, token.encode()))
    assert [(t, v[0]) for t, v, _ in context.take()] == [
        (at(SUB_A, "cb1"), "route:a,b"),
        (at(SUB_B, "other"), "route:a,b"),
    ]


def test_broadcast_skips_offers_and_paused_subscribers() -> None:
    context, stage = make()
    subscribe(stage, SUB_A, {b"news": b"cb"})
    subscribe(stage, SUB_B, {b"news": b"cb"})
    stage.receive(msg("*news", PUB, b"x"))
    assert [t for t, _, _ in context.take()] == [at(SUB_A, "cb"), at(SUB_B, "cb")]
    subscribe(stage, SUB_B, {b"news": False})
    stage.receive(msg("*news", PUB, b"y"))
    assert context.take() == [(at(SUB_A, "cb"), ("route:*news", b"y"), at(PUB, "route:*news"))]


def test_unreachable_candidates_fail_the_round_without_waiting() -> None:
    context, stage = make()
    subscribe(stage, SUB_A, {b"login": b"cb"})
    context.refuse.add(at(SUB_A, "route:@"))
    stage.receive(msg("login!f", PUB, 1))
    assert context.take()[-1] == (at(PUB, "f"), ("route:login!f", 1), None)


def test_removal_and_expiry_end_delivery() -> None:
    context, stage = make({"expire_ms": 1000})
    subscribe(stage, SUB_A, {b"a": b"cb", b"b": b"cb"})
    stage.receive(msg("@", SUB_A, {b"a": NULL}))
    assert stage.subscriptions() == {"b": 1}
    context.clock.advance(0.9)
    stage.receive(msg("@", SUB_A, True))
    context.clock.advance(0.9)
    assert stage.subscriptions() == {"b": 1}
    context.clock.advance(0.1)
    assert stage.subscriptions() == {}


def test_bad_messages_are_logged_not_raised() -> None:
    context, stage = make()
    stage.receive(msg("@", SUB_A, "not a table"))
    stage.receive(Message("x", b"\xc1garbage", PUB, None))
    stage.receive(msg(ACCEPT, SUB_A, 42))
    levels = [e["log_level"].name for e in context.events]
    assert levels == ["warn", "critical"]
    stage.stop()
    assert context.clock.getDelayedCalls() == []


def test_a_registration_with_a_reply_address_is_answered_once_applied() -> None:
    context, stage = make()
    stage.receive(msg("@", SUB_A, {b"ch.lobby": b"chat"}, reply=at(SUB_A, "7")))
    assert context.replied == [(at(SUB_A, "7"), (True,))]
    assert stage.subscriptions() == {"ch.lobby": 1}
    stage.receive(msg("@", SUB_A, {b"*bad": b"chat", b"ch.x": b"chat"}, reply=at(SUB_A, "8")))
    ((address, (ok, problems)),) = context.replied[1:]
    assert address == at(SUB_A, "8") and ok is False and "*bad" in problems
    assert stage.subscriptions() == {"ch.lobby": 1, "ch.x": 1}
    subscribe(stage, SUB_B, {b"ch.lobby": b"chat"})  # no reply address: no answer
    assert len(context.replied) == 2 and context.take() == []


def test_deliveries_failing_in_a_row_are_logged_at_a_bounded_rate() -> None:
    """A subscriber that stopped reading fails every ``route:*`` delivery until it expires: one
    line, then a summary per interval, not a line per message."""
    context, stage = make()
    subscribe(stage, SUB_A, {b"chat": b"say"})
    context.refuse.add(at(SUB_A, "say"))
    for n in range(1000):
        stage.receive(msg("*chat", PUB, n))
    context.clock.advance(10)
    lines = [e for e in context.events if "delivery of" in e["log_format"]]
    assert len(lines) <= 2
    assert 1 + sum(e.get("repeated", 0) for e in lines) == 1000  # every failure counted


def test_dropped_publishes_of_long_keys_keep_little_memory_and_short_log_lines() -> None:
    """What "logged once per key" remembers and logs of a key is bounded: a script publishing
    long unique keys nobody takes held every key whole (300 MB for 3,000 keys of 100 kB)."""
    context, stage = make()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(300):
            stage.receive(msg(f"{n}" + "k" * 100_000, PUB, 1))
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 3_000_000  # the keys alone are 30 MB
    assert all(len(str(e.get("key", ""))) < 300 for e in context.events)


def test_a_route_at_with_many_problems_is_one_line_and_a_short_answer() -> None:
    """Pausing 10,000 channels the route stage no longer knows (it restarted) is one warning and
    a short ``false`` answer, not 10,000 lines."""
    context, stage = make()
    table = {f"ch.{n}".encode(): False for n in range(10_000)}
    stage.receive(msg("@", SUB_A, table, reply=at(SUB_A, "7")))
    ((_, (ok, problems)),) = context.replied
    assert ok is False and problems.endswith("; and 9997 more") and len(problems) < 500
    assert len([e for e in context.events if "route:@ from" in e["log_format"]]) == 1
