"""The ticket stage through its message interface, with a recording context."""

from __future__ import annotations

import tracemalloc
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger

from stagetx.address import format_reply
from stagetx.codec import pack_py
from stagetx.message import Message, Sender
from stagetx.stages.ticket.stage import Stage

SERVER = "srv"
TICKET = 4
REQ_A = Sender(SERVER, 0, "login", 1)
REQ_B = Sender(SERVER, 1, "login", 2)


class RecordingContext:
    """A StageContext that records sends; ``reply_to`` resolves as the router does."""

    stage_id = "ticket"
    name = "=ticket+ticket"
    instance = TICKET
    base_dir = "/"

    def __init__(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.log = Logger(namespace="test.ticket", observer=self.events.append)
        self.sent: list[tuple[str, tuple[Any, ...], str | None]] = []
        self.refuse: set[str] = set()

    def resolve_path(self, path: str) -> str:
        return path

    def send(self, target: str, *values: Any, reply_to: str | None = None) -> tuple[bool, str | None]:
        if reply_to is not None:
            reply_to = format_reply(SERVER, TICKET, reply_to)
        pack_py(values)
        self.sent.append((target, values, reply_to))
        return (False, "gone") if target in self.refuse else (True, None)

    def reply(self, message: Message, *values: Any) -> None:
        raise AssertionError("the ticket stage answers by address")

    def take(self) -> list[tuple[str, tuple[Any, ...], str | None]]:
        sent, self.sent = self.sent, []
        return sent


def at(sender: Sender, msgid: str) -> str:
    return format_reply(sender.server, sender.instance, msgid)


def request(stage: Stage, sender: Sender, written: str, *values: Any) -> None:
    """``signal("ticket:" .. written, ...)`` as the router delivers it (split at the first =)."""
    msgid, eq, reply = written.partition("=")
    stage.receive(Message(msgid, pack_py(values), sender, at(sender, reply) if eq else None))


def ticket_of(call: tuple[str, tuple[Any, ...], str | None]) -> str:
    """The ticket id a callback was sent with: its reply id without the ``#``."""
    assert call[2] is not None
    return call[2].rpartition("/#")[2]


def notice(sender: Sender, ticket_id: str, callback: str | bool) -> tuple[str, tuple[Any, ...], None]:
    """The ``ticket:@`` message telling ``sender`` its ticket ``ticket_id`` was ended for it."""
    return (at(sender, "ticket:@"), ("cancel", {ticket_id: callback}), None)


def make(config: Any = None) -> tuple[RecordingContext, Stage]:
    context = RecordingContext()
    return context, Stage(context, config or [10, {"db": 1}])


def test_grant_calls_back_with_the_ticket_as_reply_id_and_feeds_back() -> None:
    context, stage = make()
    request(stage, REQ_A, "db=query?fb", b"user1")
    (accepted, called, done) = context.take()
    ticket_id = accepted[1][1]
    assert accepted == (at(REQ_A, "fb"), ("ticket:db=query?fb", ticket_id), None)
    assert ticket_id.startswith("@")
    assert called == (at(REQ_A, "query"), (b"user1",), format_reply(SERVER, TICKET, f"#{ticket_id}"))
    assert done == (at(REQ_A, "fb"), ("ticket:db=query?fb", True), None)


def test_feedback_before_the_callback_in_either_order() -> None:
    context, stage = make()
    request(stage, REQ_A, "db?fb=query", 1)
    assert [v[0] for _, v, _ in context.take()] == ["ticket:db?fb=query", 1, "ticket:db?fb=query"]


def test_waiters_are_called_in_order_when_holds_expire() -> None:
    context, stage = make()
    for n in range(3):
        request(stage, REQ_A if n % 2 == 0 else REQ_B, "db=cb", n)
    [first] = context.take()
    assert first[:2] == (at(REQ_A, "cb"), (0,))
    context.clock.advance(1.0)
    expired, second = context.take()
    assert expired == notice(REQ_A, ticket_of(first), "cb")
    assert second[:2] == (at(REQ_B, "cb"), (1,))
    context.clock.advance(1.0)
    assert [v for _, v, _ in context.take()] == [("cancel", {ticket_of(second): "cb"}), (2,)]


def test_signal_nil_ms_from_the_callback_extends_the_hold() -> None:
    context, stage = make()
    request(stage, REQ_A, "db=cb?fb", 1)
    ticket_id = context.take()[0][1][1]
    request(stage, REQ_B, "db=cb", 2)
    context.clock.advance(0.5)
    stage.receive(Message(f"#{ticket_id}", pack_py((3000,)), REQ_A, None))
    stage.receive(Message(f"#{ticket_id}", pack_py((b"a return value",)), REQ_A, None))
    context.clock.advance(2.9)
    assert context.take() == []
    context.clock.advance(0.1)
    assert [v for _, v, _ in context.take()] == [("cancel", {ticket_id: "cb"}), (2,)]


def test_a_hold_that_runs_out_tells_the_holder_at_ticket_at_before_the_next_is_called() -> None:
    """The original revokes the ticket and sends ``("cancel", {ticket_id = callback_id})`` to the
    holder's ``waitfor("ticket:@")``; its feedback hears nothing more."""
    context, stage = make()
    request(stage, REQ_A, "db=cb?fb", 1)
    ticket_id = context.take()[0][1][1]
    request(stage, REQ_B, "db=cb", 2)
    context.clock.advance(0.999)
    assert context.take() == []
    context.clock.advance(0.001)
    expired, called = context.take()
    assert expired == notice(REQ_A, ticket_id, "cb")
    assert called[:2] == (at(REQ_B, "cb"), (2,))


def test_a_ticket_given_back_or_never_called_gets_no_notice() -> None:
    """``signal(nil, 0)`` (or a returned 0) ends a hold quietly, as in the original; so does an
    undeliverable callback, whose requester is gone."""
    context, stage = make([10, {"db": 2}])
    context.refuse.add(at(REQ_B, "cb"))
    request(stage, REQ_A, "db=cb", 1)
    request(stage, REQ_B, "db=cb", 2)
    ticket_id = ticket_of(context.take()[0])
    stage.receive(Message(f"#{ticket_id}", pack_py((0,)), REQ_A, None))
    context.clock.advance(5.0)
    assert context.take() == []


def test_a_ticket_without_callback_is_told_with_false_when_its_hold_runs_out() -> None:
    context, stage = make()
    request(stage, REQ_A, "db?fb")
    ticket_id = context.take()[0][1][1]
    context.clock.advance(1.0)
    assert context.take() == [notice(REQ_A, ticket_id, False)]


def test_a_holder_of_a_closed_temporary_category_is_told_when_its_hold_runs_out() -> None:
    context, stage = make()
    stage.receive(Message("@event", pack_py((1, 500)), REQ_A, None))
    request(stage, REQ_A, "event=cb?fb", 1)
    ticket_id = context.take()[0][1][1]
    context.clock.advance(0.5)
    assert "event" not in stage.categories() and context.take() == []
    context.clock.advance(0.5)
    assert context.take() == [notice(REQ_A, ticket_id, "cb")]


def test_refused_past_max_tickets_and_for_unknown_categories() -> None:
    context, stage = make([2, {"db": 1}])
    request(stage, REQ_A, "db=cb", 1)
    request(stage, REQ_A, "db=cb", 2)
    context.take()
    request(stage, REQ_A, "db=cb?fb", 3)
    request(stage, REQ_A, "nope=cb?fb", 4)
    assert context.take() == [
        (at(REQ_A, "fb"), ("ticket:db=cb?fb", False), None),
        (at(REQ_A, "fb"), ("ticket:nope=cb?fb", False), None),
    ]


def test_broadcast_reaches_each_holder_and_waiter_once() -> None:
    context, stage = make([10, {"db": 1, "other": 1}])
    request(stage, REQ_A, "db=cb", 1)
    request(stage, REQ_A, "db=cb", 2)
    request(stage, REQ_B, "db=cb", 3)
    context.take()
    stage.receive(Message("=db", pack_py((b"maintenance",)), REQ_B, None))
    assert context.take() == [
        (at(REQ_A, "ticket:db"), (b"maintenance",), None),
        (at(REQ_B, "ticket:db"), (b"maintenance",), None),
    ]


def test_temporary_category_cancels_its_waiters_when_it_closes() -> None:
    context, stage = make()
    stage.receive(Message("@event", pack_py((1, 500)), REQ_A, None))
    request(stage, REQ_A, "event=cb?fb", 1)
    request(stage, REQ_B, "event=cb?fb", 2)
    waiting_id = context.take()[-1][1][1]
    context.clock.advance(0.5)
    assert context.take() == [
        (at(REQ_B, "fb"), ("ticket:event=cb?fb", False), None),
        (at(REQ_B, "ticket:@"), ("cancel", {waiting_id: "cb"}), None),
    ]
    assert "event" not in stage.categories()


def test_an_undeliverable_callback_gives_the_slot_back() -> None:
    context, stage = make()
    context.refuse.add(at(REQ_A, "cb"))
    request(stage, REQ_A, "db=cb?fb", 1)
    request(stage, REQ_B, "db=cb", 2)
    sent = context.take()
    assert [v[1] for t, v, _ in sent if t == at(REQ_A, "fb")][1:] == [False]
    assert at(REQ_B, "cb") not in [t for t, _, _ in sent]
    context.clock.advance(0)
    assert [t for t, _, _ in context.take()] == [at(REQ_B, "cb")]


def test_bad_requests_and_creations_are_logged() -> None:
    context, stage = make()
    request(stage, REQ_A, "db")  # neither callback nor feedback
    stage.receive(Message("@db", pack_py((1, 100)), REQ_A, None))  # configured
    stage.receive(Message("@x", pack_py((1,)), REQ_A, None))
    assert context.take() == []
    assert len(context.events) == 3
    stage.stop()
    assert context.clock.getDelayedCalls() == []


def test_the_original_table_form_takes_one_ticket_per_callback_id() -> None:
    """``signal("ticket:db?fb", {[""] = data, a = 1, b = 2})`` (the original platform's form): ``a``
    is granted at once, ``b`` waits; one feedback tells each result and hands ``[""]`` back."""
    context, stage = make()
    request(stage, REQ_A, "db?fb", {b"": b"USER DATA", b"a": 1, b"b": 2})
    called, feedback = context.take()
    assert called[0] == at(REQ_A, "a") and called[1] == (1,)
    assert feedback[0] == at(REQ_A, "fb")
    text, results = feedback[1]
    assert text == "ticket:db?fb"
    assert results[b""] == b"USER DATA" and results[b"a"] is True
    assert results[b"b"].startswith("@")
    context.clock.advance(1.0)
    assert [(target, values) for target, values, _ in context.take()] == [
        (at(REQ_A, "ticket:@"), ("cancel", {ticket_of(called): "a"})),  # a's hold ran out
        (at(REQ_A, "b"), (2,)),
    ]


def test_a_hold_or_close_time_that_is_not_finite_is_logged_and_changes_nothing() -> None:
    context, stage = make()
    request(stage, REQ_A, "db=cb?fb", 1)
    ticket_id = context.take()[0][1][1]
    request(stage, REQ_B, "db=cb", 2)
    for ms in (float("nan"), float("inf")):
        stage.receive(Message(f"#{ticket_id}", pack_py((ms,)), REQ_A, None))
        stage.receive(Message("@event", pack_py((1, ms)), REQ_A, None))
    problems = [e["problem"] for e in context.events]
    assert problems == [
        "a hold is a finite number of ms, not nan",
        "a temporary category needs (limit, close_ms), close_ms a finite number",
        "a hold is a finite number of ms, not inf",
        "a temporary category needs (limit, close_ms), close_ms a finite number",
    ]
    context.clock.advance(1.0)  # the default hold ends as if nothing had come: the waiter's turn
    assert [v for _, v, _ in context.take()] == [("cancel", {ticket_id: "cb"}), (2,)]


def test_undeliverable_callbacks_in_a_row_are_logged_at_a_bounded_rate() -> None:
    """A requester that stopped reading fails the callback of each of its waiting tickets in
    turn: one line, then a summary per interval, not a line per ticket."""
    context, stage = make([1000, {"db": 1}])
    context.refuse.add(at(REQ_A, "cb"))
    for n in range(500):
        request(stage, REQ_A, "db=cb", n)
    for _ in range(500):
        context.clock.advance(0)
    context.clock.advance(10)
    lines = [e for e in context.events if "not delivered" in e["log_format"]]
    assert len(lines) <= 2
    assert 1 + sum(e.get("repeated", 0) for e in lines) == 500  # every failure counted
    assert stage.categories()["db"] == (0, 0, 1)


def test_refused_requests_with_long_ids_keep_little_memory_and_short_log_lines() -> None:
    """What "logged once" remembers and logs of a refused request is bounded: a script asking
    for long unique unknown categories held every request whole."""
    context, stage = make()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(300):
            request(stage, REQ_A, f"{n}" + "c" * 100_000 + "=cb", 1)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 3_000_000  # the ids alone are 30 MB
    assert all(len(str(e.get("text", ""))) < 300 for e in context.events)
