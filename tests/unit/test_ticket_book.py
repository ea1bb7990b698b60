"""The ticket book with fake time: FIFO grants, limits, holds, temporary categories."""

from __future__ import annotations

import time

import pytest
from twisted.internet.task import Clock

from stagetx.stages.ticket.tickets import (
    Cancelled,
    Granted,
    Refused,
    Released,
    Request,
    TicketBook,
    TicketConfigError,
    TicketSettings,
    parse_request,
    parse_settings,
)


class Recorder:
    """Collects the book's effects and the time each happened at."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.effects: list[tuple[float, object]] = []

    def __call__(self, effect: object) -> None:
        self.effects.append((self.clock.seconds(), effect))

    def of(self, kind: type) -> list[object]:
        return [e for _, e in self.effects if isinstance(e, kind)]


def make_book(
    max_tickets: int = 100, categories: dict[str, int] | None = None, hold: float = 1.0
) -> tuple[Clock, Recorder, TicketBook]:
    clock = Clock()
    rec = Recorder(clock)
    settings = TicketSettings(max_tickets, categories or {"db": 2}, hold)
    return clock, rec, TicketBook(clock, settings, rec, prefix="t")


def test_burst_of_1000_never_exceeds_concurrent_and_grants_in_order() -> None:
    clock = Clock()
    held: dict[str, float] = {}
    intervals: list[tuple[float, float]] = []
    grant_order: list[int] = []
    most = 0

    def sink(effect: object) -> None:
        nonlocal most
        if isinstance(effect, Granted):
            held[effect.ticket.id] = clock.seconds()
            most = max(most, len(held))
            grant_order.append(effect.ticket.data)
            # vary the holds: some extend, some give the slot back at once
            n = effect.ticket.data
            if n % 5 == 0:
                book.extend(effect.ticket.id, 0.05 * (n % 7 + 1))
        elif isinstance(effect, Released):
            intervals.append((held.pop(effect.ticket.id), clock.seconds()))

    book = TicketBook(clock, TicketSettings(1000, {"login": 3}), sink)
    for n in range(1000):
        assert book.request("login", ("s", n % 4), n) is not None
    for _ in range(50_000):
        if len(intervals) == 1000:
            break
        clock.advance(0.01)
    assert len(intervals) == 1000
    assert grant_order == list(range(1000))  # first come, first served
    assert most == 3
    # sweep: releases at an instant count before grants at it (the slot is handed over)
    events = sorted([(g, 1) for g, _ in intervals] + [(r, -1) for _, r in intervals])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 3
    assert book.stats()["login"] == (0, 0, 3)


def test_refuses_past_max_tickets_over_all_categories() -> None:
    clock, rec, book = make_book(max_tickets=3, categories={"a": 1, "b": 1})
    assert book.request("a", "x", 1) is not None
    assert book.request("a", "x", 2) is not None
    assert book.request("b", "x", 3) is not None
    assert book.request("b", "x", 4) is None
    refused = rec.of(Refused)
    assert [(r.data, "max_tickets" in r.reason) for r in refused] == [(4, True)]
    clock.advance(1.0)  # a's and b's holders release; a's waiter is granted
    assert book.request("b", "x", 5) is not None


def test_unknown_category_is_refused() -> None:
    clock, rec, book = make_book()
    assert book.request("nope", "x", "d") is None
    assert rec.of(Refused)[0].reason == "unknown category 'nope'"


def test_accepted_comes_before_granted_and_ids_are_unique() -> None:
    clock, rec, book = make_book()
    tickets = [book.request("db", "x", n) for n in range(3)]
    kinds = [type(e).__name__ for _, e in rec.effects]
    assert kinds == ["Accepted", "Granted", "Accepted", "Granted", "Accepted"]
    ids = [t.id for t in tickets if t]
    assert len(set(ids)) == 3 and all(i.startswith("@") for i in ids)


def test_hold_expires_after_one_second_whether_or_not_the_callback_finished() -> None:
    clock, rec, book = make_book(categories={"db": 1})
    first = book.request("db", "x", 1)
    second = book.request("db", "x", 2)
    assert [g.ticket for g in rec.of(Granted)] == [first]
    clock.advance(0.999)
    assert rec.of(Released) == []
    clock.advance(0.001)
    assert [r.ticket for r in rec.of(Released)] == [first]
    assert [g.ticket for g in rec.of(Granted)] == [first, second]
    assert [t for t, e in rec.effects if isinstance(e, Granted)] == [0.0, 1.0]


def test_extension_moves_the_end_to_now_plus_ms() -> None:
    clock, rec, book = make_book(categories={"db": 1})
    ticket = book.request("db", "x", 1)
    waiting = book.request("db", "x", 2)
    assert ticket and waiting
    clock.advance(0.5)
    assert book.extend(ticket.id, 3.0)
    assert not book.extend(waiting.id, 3.0)  # a waiting ticket holds nothing to extend
    clock.advance(2.999)
    assert rec.of(Released) == []
    clock.advance(0.001)
    assert [(t, e.ticket) for t, e in rec.effects if isinstance(e, Released)] == [(3.5, ticket)]
    assert not book.extend(ticket.id, 1.0)  # released: too late


def test_extension_to_zero_releases_now_and_grants_the_next() -> None:
    clock, rec, book = make_book(categories={"db": 1})
    ticket = book.request("db", "x", 1)
    book.request("db", "x", 2)
    assert ticket and book.extend(ticket.id, 0)
    assert [g.ticket.data for g in rec.of(Granted)] == [1, 2]
    assert clock.getDelayedCalls()[0].getTime() == 1.0  # the second's hold, from now


def test_a_hold_that_runs_out_is_revoked_and_one_given_back_is_not() -> None:
    """The original revokes a ticket whose hold ran out and tells its holder; ``signal(nil, 0)``
    gives it back quietly. Running out after an extension is revoked too."""
    clock, rec, book = make_book(categories={"db": 3})
    expires, extended, given_back = (book.request("db", "x", n) for n in range(3))
    assert expires and extended and given_back
    assert book.extend(extended.id, 2.5)
    assert book.extend(given_back.id, 0)
    clock.advance(1.0)
    clock.advance(1.5)
    released = [(t, e.ticket, e.revoked) for t, e in rec.effects if isinstance(e, Released)]
    assert released == [(0.0, given_back, False), (1.0, expires, True), (2.5, extended, True)]


def test_a_holder_of_a_closed_category_is_revoked_when_its_hold_runs_out() -> None:
    clock, rec, book = make_book()
    assert book.create("event", 1, 0.5) is None
    held = book.request("event", "x", 1)
    clock.advance(0.5)
    assert "event" not in book.stats() and rec.of(Released) == []
    clock.advance(0.5)
    assert rec.of(Released) == [Released(held, True)]


def test_temporary_category_closes_cancels_waiters_and_keeps_holders() -> None:
    clock, rec, book = make_book(max_tickets=10)
    assert book.create("event", 2, 5.0) is None
    tickets = [book.request("event", ("s", n), n) for n in range(4)]
    for t in tickets[:2]:
        assert t and book.extend(t.id, 10.0)
    assert book.owners("event") == [("s", 0), ("s", 1), ("s", 2), ("s", 3)]
    clock.advance(5.0)
    assert [c.ticket.data for c in rec.of(Cancelled)] == [2, 3]
    assert "event" not in book.stats()
    assert book.request("event", "x", 9) is None  # gone
    assert rec.of(Released) == []  # granted tickets stay valid
    clock.advance(5.0)
    assert [r.ticket.data for r in rec.of(Released)] == [0, 1]
    assert [g.ticket.data for g in rec.of(Granted)] == [0, 1]  # no grant after closing
    for n in range(10):  # every slot of max_tickets is free again
        assert book.request("db", "x", n) is not None


def test_temporary_category_rearm_and_configured_names() -> None:
    clock, rec, book = make_book()
    assert book.create("db", 1, 1.0) == "category 'db' is configured, not temporary"
    assert book.create("ev", 0, 1.0) is not None
    assert book.create("@x", 1, 1.0) is not None
    assert book.create("ev", 1, 1.0) is None
    clock.advance(0.5)
    assert book.create("ev", 3, 1.0) is None  # new limit, closes 1 s from now
    assert book.stats()["ev"] == (0, 0, 3)
    clock.advance(0.9)
    assert "ev" in book.stats()
    clock.advance(0.1)
    assert "ev" not in book.stats()


def test_owners_are_distinct_and_cover_holders_and_waiters() -> None:
    clock, rec, book = make_book(categories={"db": 1})
    for owner in ["a", "b", "a", "c"]:
        book.request("db", owner, None)
    assert book.owners("db") == ["a", "b", "c"]
    assert book.owners("none") == []


def test_stop_cancels_every_timer() -> None:
    clock, rec, book = make_book()
    book.request("db", "x", 1)
    book.create("ev", 1, 5.0)
    book.stop()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cat", Request("cat")),
        ("cat=cb", Request("cat", "cb")),
        ("cat=cb?fb", Request("cat", "cb", "fb")),
        ("cat?fb=cb", Request("cat", "cb", "fb")),
        ("cat?fb", Request("cat", None, "fb")),
        ("cat=", None),
        ("cat=a=b", None),
        ("?fb", None),
    ],
)
def test_parse_request(text: str, expected: Request | None) -> None:
    assert parse_request(text) == expected


def test_parse_settings() -> None:
    settings = parse_settings([100, {"db": 3}])
    assert (settings.max_tickets, dict(settings.categories), settings.hold) == (100, {"db": 3}, 1.0)
    assert parse_settings([1, {}, 2500]).hold == 2.5
    for bad in [
        None,
        [0, {}],
        [1, []],
        [1, {"a": 0}],
        [1, {"@a": 1}],
        [1, {"a=b": 1}],
        [1, {}, 0],
        [1, {}, float("nan")],
        [1, {}, float("inf")],
        [1, {}, 1e300],
    ]:
        with pytest.raises(TicketConfigError):
            parse_settings(bad)


def test_forgetting_an_owner_frees_its_slots_and_queue_places_without_notices() -> None:
    clock, rec, book = make_book(max_tickets=5, categories={"db": 1})
    book.request("db", "dead", "held")
    book.request("db", "dead", "waiting")
    book.request("db", "alive", "next")
    assert book.forget(frozenset({"dead"})) == 2
    assert [e.ticket.data for e in rec.of(Granted)] == ["held", "next"]  # type: ignore[attr-defined]
    assert [e.revoked for e in rec.of(Released)] == [False]  # type: ignore[attr-defined]
    assert not rec.of(Cancelled)
    assert book.stats()["db"] == (1, 0, 1)
    for n in range(4):  # the dropped tickets no longer count against max_tickets
        assert book.request("db", "alive", n) is not None
    clock.advance(10)


def test_owners_take_as_many_steps_as_owners_not_tickets() -> None:
    """``ticket:=category`` asks for the owners on every message: with 20,000 tickets of two
    owners that must cost what it costs with 20 (it walked every ticket: 1,000 times more)."""

    def seconds_per_call(tickets: int) -> float:
        _, _, book = make_book(max_tickets=tickets, categories={"db": 1}, hold=60.0)
        for n in range(tickets):
            book.request("db", ("s", n % 2), n)
        best = float("inf")
        for _ in range(5):  # the best of five: a busy machine only ever adds time
            started = time.perf_counter()
            for _ in range(200):
                assert len(book.owners("db")) == 2
            best = min(best, time.perf_counter() - started)
        return best

    assert seconds_per_call(20_000) < 20 * seconds_per_call(20)


def test_owners_follow_every_way_a_ticket_ends() -> None:
    clock, rec, book = make_book(max_tickets=100, categories={"db": 1}, hold=1.0)
    assert book.create("ev", 1, 3.0) is None
    for n, owner in enumerate(["a", "b", "a", "c", "d"]):
        book.request("db", owner, n)
        book.request("ev", owner, n)
    book.forget(frozenset({"b"}))
    assert book.owners("db") == ["a", "c", "d"]
    clock.advance(1.0)  # a's first hold ran out: a still waits with another
    assert book.owners("db") == ["a", "c", "d"]
    clock.advance(2.0)  # ev closed: its waiting tickets cancelled, its holder (a) holds on
    assert book.owners("ev") == []
    for _ in range(10):  # one hold after another (a Clock grants at the end of an advance)
        clock.advance(1.0)
    assert book.owners("db") == [] and book.stats()["db"] == (0, 0, 1)
