"""Route subscriptions and offer rounds with fake time."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from stagetx.codec import NULL
from stagetx.stages.route.subscriptions import (
    Offers,
    PublishKey,
    Round,
    RouteConfigError,
    RouteSettings,
    Subscriptions,
    fallbacks,
    parse_key,
    parse_settings,
)

A, B, C = ("s1", 1), ("s1", 2), ("s2", 1)


def make_subs(expire: float = 30.0) -> tuple[Clock, Subscriptions, list[object]]:
    clock = Clock()
    expired: list[object] = []
    return clock, Subscriptions(clock, expire, expired.append), expired


def test_many_subscribers_per_id_with_their_own_callbacks() -> None:
    clock, subs, _ = make_subs()
    assert subs.update(A, ({b"chat": b"on_chat", b"news": b"on_news"},)) == []
    assert subs.update(B, ({b"chat": b"other"},)) == []
    assert subs.candidates("chat") == ("chat", {A: "on_chat", B: "other"})
    assert subs.candidates("news") == ("news", {A: "on_news"})
    assert subs.counts() == {"chat": 2, "news": 1}


def test_pause_until_resumed_and_for_a_time() -> None:
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb"},))
    subs.update(B, ({b"chat": b"cb"},))
    subs.update(A, ({b"chat": False},))
    assert subs.candidates("chat")[1] == {B: "cb"}
    clock.advance(10)
    subs.update(B, ({b"chat": 500},))
    assert subs.candidates("chat")[1] == {}
    clock.advance(0.25)
    assert subs.candidates("chat")[1] == {}
    clock.advance(0.25)
    assert subs.candidates("chat")[1] == {B: "cb"}
    subs.update(A, ({b"chat": True},))
    assert subs.candidates("chat")[1] == {A: "cb", B: "cb"}


def test_a_number_pauses_all_of_the_stages_subscriptions() -> None:
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb", b"news": b"cb"},))
    subs.update(A, (2000,))
    assert subs.candidates("chat")[1] == {} and subs.candidates("news")[1] == {}
    clock.advance(2.0)
    assert subs.candidates("chat")[1] == {A: "cb"}


def test_null_removes_one_and_nil_removes_all() -> None:
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb", b"news": b"cb"},))
    subs.update(A, ({b"chat": NULL},))
    assert subs.counts() == {"news": 1}
    subs.update(A, (None,))
    assert subs.counts() == {}
    subs.update(B, ({b"x": b"cb"},))
    subs.update(B, ())
    assert subs.counts() == {}
    assert clock.getDelayedCalls() == []  # no expiry timer left for forgotten subscribers


def test_expiry_after_silence_and_keep_alive() -> None:
    clock, subs, expired = make_subs(expire=30.0)
    subs.update(A, ({b"chat": b"cb"},))
    subs.update(B, ({b"chat": b"cb"},))
    for _ in range(3):
        clock.advance(20.0)
        subs.update(A, (True,))  # keep-alive
    assert expired == [B]
    assert subs.candidates("chat")[1] == {A: "cb"}
    clock.advance(29.9)
    assert subs.counts() == {"chat": 1}
    clock.advance(0.1)
    assert expired == [B, A] and subs.counts() == {}


def test_any_route_message_refreshes_even_a_pause() -> None:
    clock, subs, expired = make_subs(expire=10.0)
    subs.update(A, ({b"chat": b"cb"},))
    clock.advance(9.0)
    subs.update(A, ({b"chat": False},))
    clock.advance(9.0)
    assert expired == []


@pytest.mark.parametrize(
    "value",
    [True, {}, [], {b"chat": b"cb"}, {b"news": b"cb"}, {b"chat": True}, False, float("nan")],
    ids=repr,
)
def test_any_route_message_ends_a_stage_wide_pause(value: object) -> None:
    """route.cpp sets ``timeUpdate = utimeNow()`` for every ``route:@`` of a known stage."""
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb"},))
    subs.update(A, (60000,))
    assert subs.candidates("chat")[1] == {}
    subs.update(A, (value,))
    assert subs.candidates("chat")[1] == {A: "cb"}


def test_a_later_number_replaces_the_stage_wide_pause() -> None:
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb"},))
    subs.update(A, (60000,))
    subs.update(A, (500,))
    clock.advance(0.5)
    assert subs.candidates("chat")[1] == {A: "cb"}


def test_a_keep_alive_does_not_end_a_pause_of_one_id() -> None:
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb", b"news": b"cb"},))
    subs.update(A, ({b"chat": False, b"news": 60000},))
    subs.update(A, (True,))
    assert subs.candidates("chat")[1] == {} and subs.candidates("news")[1] == {}


def test_re_registering_keeps_the_callback_and_the_pause() -> None:
    """route.cpp ignores a callback id for a subscribe id the stage has registered already."""
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb", b"news": b"cb"},))
    subs.update(A, ({b"chat": False, b"news": 1000},))
    assert subs.update(A, ({b"chat": b"cb", b"news": b"cb"},)) == []
    assert subs.candidates("chat")[1] == {} and subs.candidates("news")[1] == {}
    assert subs.update(A, ({b"chat": b"other"},)) == ["chat: registered already to 'cb'; remove it first to change it"]
    subs.update(A, ({b"chat": True},))
    assert subs.candidates("chat")[1] == {A: "cb"}
    clock.advance(1.0)
    assert subs.candidates("news")[1] == {A: "cb"}
    subs.update(A, ({b"chat": NULL},))
    subs.update(A, ({b"chat": b"other"},))
    assert subs.candidates("chat")[1] == {A: "other"}


def test_keep_alive_or_pause_from_an_unknown_stage_registers_nothing() -> None:
    clock, subs, _ = make_subs()
    assert subs.update(A, (True,)) == []
    assert subs.update(A, (1000,)) == []
    assert subs.counts() == {} and clock.getDelayedCalls() == []


def test_bad_entries_are_reported_and_the_rest_applied() -> None:
    clock, subs, _ = make_subs()
    problems = subs.update(A, ({b"chat": b"cb", b"@x": b"cb", b"news": False, b"n": [1]},))
    assert len(problems) == 3
    assert subs.counts() == {"chat": 1}
    assert subs.update(A, (False,)) != []
    assert subs.update(A, ([],)) == []  # an empty Lua table: a keep-alive


def test_fallback_to_shorter_prefixes() -> None:
    clock, subs, _ = make_subs()
    subs.update(A, ({b"zone.": b"any_zone"},))
    subs.update(B, ({b"zone.north.": b"north"},))
    assert subs.candidates("zone.north.gate") == ("zone.north.", {B: "north"})
    assert subs.candidates("zone.south.gate") == ("zone.", {A: "any_zone"})
    assert subs.candidates("other.x") == ("other.x", {})
    subs.update(B, ({b"zone.north.": False},))
    assert subs.candidates("zone.north.gate") == ("zone.", {A: "any_zone"})


def test_an_id_whose_subscribers_are_all_paused_falls_back() -> None:
    """route.cpp: ``if (kv->allows.empty()) goto _gR`` — paused subscribers are no candidates."""
    clock, subs, _ = make_subs()
    subs.update(A, ({b"zone.north.gate": b"gate", b"zone.north.": b"north"},))
    subs.update(B, ({b"zone.north.gate": b"gate_b", b"zone.": b"any_zone"},))
    subs.update(A, ({b"zone.north.gate": False},))
    assert subs.candidates("zone.north.gate") == ("zone.north.gate", {B: "gate_b"})
    subs.update(B, ({b"zone.north.gate": 1000},))
    assert subs.candidates("zone.north.gate") == ("zone.north.", {A: "north"})
    subs.update(A, (2000,))  # A's stage-wide pause: its zone.north. is no candidate either
    assert subs.candidates("zone.north.gate") == ("zone.", {B: "any_zone"})
    subs.update(B, ({b"zone.": False},))
    assert subs.candidates("zone.north.gate") == ("zone.north.gate", {})
    clock.advance(1.0)  # B's pause of zone.north.gate is over
    assert subs.candidates("zone.north.gate") == ("zone.north.gate", {B: "gate_b"})


def test_fallbacks() -> None:
    assert fallbacks("a.b.c") == ["a.b.c", "a.b.", "a."]
    assert fallbacks("a.b.") == ["a.b.", "a."]
    assert fallbacks("abc") == ["abc"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("chat", PublishKey("chat", ("chat",))),
        ("chat?room7", PublishKey("chat?room7", ("chat",), argument="room7")),
        ("a,b?x=ret!fail", PublishKey("a,b?x=ret!fail", ("a", "b"), False, "x", "ret", "fail")),
        ("*all", PublishKey("*all", ("all",), broadcast=True)),
        ("gone!nobody", PublishKey("gone!nobody", ("gone",), fail_cb="nobody")),
        ("a,a", PublishKey("a,a", ("a",))),
        ("?x", None),
        ("*", None),
        ("a=", None),
    ],
)
def test_parse_key(text: str, key: PublishKey | None) -> None:
    assert parse_key(text) == key


def test_parse_settings() -> None:
    assert parse_settings(None) == RouteSettings(30.0, 0.3)
    assert parse_settings({"expire_ms": 500, "offer_ms": 50}) == RouteSettings(0.5, 0.05)
    for bad in [
        [1, 2],
        {"expire": 5},
        {"offer_ms": 0},
        {"offer_ms": "1"},
        {"expire_ms": float("nan")},
        {"offer_ms": float("inf")},
        {"expire_ms": 1e300},
        {"offer_ms": True},
    ]:
        with pytest.raises(RouteConfigError):
            parse_settings(bad)


def make_offers(timeout: float = 0.3) -> tuple[Clock, Offers, list[Round]]:
    clock = Clock()
    failed: list[Round] = []
    return clock, Offers(clock, timeout, failed.append, prefix="p"), failed


KEY = PublishKey("chat", ("chat",))


def test_first_acceptance_wins() -> None:
    clock, offers, failed = make_offers()
    rnd = offers.open(KEY, {"chat": {A: "cb_a", B: "cb_b"}}, "payload")
    assert rnd.candidates() == [A, B]
    assert offers.accept(rnd.token, B) == (rnd, ["cb_b"])
    assert offers.accept(rnd.token, A) is None
    clock.advance(1.0)
    assert failed == [] and clock.getDelayedCalls() == []


def test_only_candidates_with_the_right_token_win() -> None:
    clock, offers, failed = make_offers()
    rnd = offers.open(KEY, {"chat": {A: "cb"}}, None)
    assert offers.accept(rnd.token, C) is None
    assert offers.accept("p.999", A) is None
    assert offers.accept(rnd.token, A) is not None


def test_partial_acceptance_leaves_the_other_units_open() -> None:
    clock, offers, failed = make_offers()
    key = PublishKey("a,b", ("a", "b"))
    rnd = offers.open(key, {"a": {A: "cb1", B: "x"}, "b": {A: "cb2", B: "y"}}, None)
    assert offers.accept(rnd.token, A, frozenset({"cb1"})) == (rnd, ["cb1"])
    assert offers.accept(rnd.token, A, frozenset({"cb1"})) is None  # unit a is taken already
    assert offers.accept(rnd.token, B) == (rnd, ["y"])
    clock.advance(1.0)
    assert failed == []


def test_one_acceptance_takes_every_unit_and_callbacks_are_distinct() -> None:
    clock, offers, failed = make_offers()
    rnd = offers.open(PublishKey("a,b", ("a", "b")), {"a": {A: "cb"}, "b": {A: "cb"}}, None)
    assert offers.accept(rnd.token, A) == (rnd, ["cb"])


def test_no_acceptance_in_time_fails_once() -> None:
    clock, offers, failed = make_offers(timeout=0.3)
    rnd = offers.open(KEY, {"chat": {A: "cb"}}, None)
    clock.advance(0.299)
    assert failed == []
    clock.advance(0.001)
    assert failed == [rnd]
    assert offers.accept(rnd.token, A) is None
    clock.advance(10)
    assert failed == [rnd]


def test_no_candidate_fails_at_once() -> None:
    clock, offers, failed = make_offers()
    rnd = offers.open(KEY, {"chat": {}}, None)
    assert failed == [rnd] and clock.getDelayedCalls() == []


def test_withdrawing_every_candidate_fails_without_waiting() -> None:
    clock, offers, failed = make_offers()
    rnd = offers.open(KEY, {"chat": {A: "cb", B: "cb"}}, None)
    offers.withdraw(rnd.token, A)
    assert failed == []
    offers.withdraw(rnd.token, B)
    assert failed == [rnd] and clock.getDelayedCalls() == []


def test_a_unit_without_candidates_fails_the_round_once_the_rest_is_taken() -> None:
    clock, offers, failed = make_offers()
    rnd = offers.open(PublishKey("a,b", ("a", "b")), {"a": {A: "cb"}, "b": {}}, None)
    assert failed == []
    assert offers.accept(rnd.token, A) is not None
    assert failed == [rnd]


@pytest.mark.parametrize("ms", [float("nan"), float("inf"), float("-inf")])
def test_a_pause_that_is_not_finite_is_refused(ms: float) -> None:
    clock, subs, _ = make_subs()
    subs.update(A, ({b"chat": b"cb"},))
    assert subs.update(A, ({b"chat": ms},)) == [
        f"chat: a pause is a finite number of ms (false pauses until true), not {ms}"
    ]
    assert subs.update(A, (ms,)) == [f"a pause is a finite number of ms (false pauses until true), not {ms}"]
    assert subs.candidates("chat")[1] == {A: "cb"}


def test_a_withdrawn_subscriber_leaves_every_open_round() -> None:
    clock = Clock()
    failed: list[Round] = []
    offers = Offers(clock, 0.3, failed.append, prefix="t")
    first = offers.open(parse_key("a"), {"a": {"gone": "cb", "other": "cb"}}, None)
    second = offers.open(parse_key("b"), {"b": {"gone": "cb"}}, None)
    offers.withdraw_everywhere("gone")
    assert failed == [second]  # its only candidate left: it fails at once
    assert offers.accept(first.token, "gone") is None
    assert offers.accept(first.token, "other") == (first, ["cb"])
