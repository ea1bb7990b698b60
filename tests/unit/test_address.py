"""Signal targets and the handler lookup order."""

from __future__ import annotations

import timeit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stagetx.address import (
    REPLY_HERE,
    AddressError,
    LocalAsync,
    LocalSync,
    LockAcquire,
    LockExtend,
    LockRelease,
    ReplyHere,
    ReplyTo,
    Scope,
    ToServer,
    ToStage,
    format_reply,
    match_candidates,
    parse_target,
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, ReplyHere()),
        ("id", LocalAsync("id")),
        ("id=back", LocalAsync("id", "back")),
        (":id", LocalSync("id")),
        ("stage:id", ToStage("stage", "id")),
        ("stage+id", ToStage("stage", "id", Scope.ANY, True)),
        ("stage:id=reply", ToStage("stage", "id", Scope.ANY, False, "reply")),
        ("stage+id=reply", ToStage("stage", "id", Scope.ANY, True, "reply")),
        ("*stage:id", ToStage("stage", "id", Scope.ALL)),
        ("=stage:id", ToStage("stage", "id", Scope.LOCAL)),
        ("+stage:id", ToStage("stage", "id", Scope.REMOTE)),
        ("*id", ToStage(None, "id", Scope.ALL)),
        ("=id", ToStage(None, "id", Scope.LOCAL)),
        ("+id", ToStage(None, "id", Scope.REMOTE)),
        ("=id=r", ToStage(None, "id", Scope.LOCAL, False, "r")),
        ("*stage+id", ToStage("stage", "id", Scope.ALL, True)),
        (">CMD.reply", LockAcquire("CMD", "reply")),
        (">CMD.grp.cb", LockAcquire("CMD", "grp.cb")),
        (">>CMD.reply", LockExtend("CMD")),
        (">>CMD", LockExtend("CMD")),
        ("<CMD.*", LockRelease("CMD")),
        ("<CMD", LockRelease("CMD")),
        (("id", "10.0.0.1:80"), ToServer("id", "10.0.0.1:80", None)),
        (["id", "10.0.0.1:80", 250], ToServer("id", "10.0.0.1:80", 250)),
        (("id", "a", 250.0), ToServer("id", "a", 250)),
        # the items after the id may be left out: {id} is the id's own target
        (("id",), LocalAsync("id")),
        (("st:id", None), ToStage("st", "id")),
        ("^srv-1/3/cb", ReplyTo("srv-1", 3, "cb")),
        ("^srv/0/a/b:c", ReplyTo("srv", 0, "a/b:c")),
    ],
)
def test_every_spec_form_parses(target: object, expected: object) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # the ticket stage's broadcast form keeps its leading "=" in the message id
        ("ticket:=category", ToStage("ticket", "=category")),
        ("ticket:category=callback?feedback", ToStage("ticket", "category", reply="callback?feedback")),
        # route keys keep "?" and "!" in the id; "=" starts the reply part
        ("route:sub?arg!fail", ToStage("route", "sub?arg!fail")),
        ("route:a.b.c=ret!fail", ToStage("route", "a.b.c", reply="ret!fail")),
        ("route:*all", ToStage("route", "*all")),
        ("route:@", ToStage("route", "@")),
        # the first "=" (not leading) splits; the reply may hold more
        ("a=b=c", LocalAsync("a", "b=c")),
        # dots in the stage part are not separators and the id may hold ":" after the stage
        ("st.x:grp:id", ToStage("st.x", "grp:id")),
        # whitespace is kept verbatim
        (" id ", LocalAsync(" id ")),
    ],
)
def test_edge_cases_follow_the_documented_decisions(target: str, expected: object) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "",
        "stage:",
        "stage+",
        ":",
        "*",
        "=",
        "+",
        ":id=reply",
        "id=",
        "stage:id=",
        "*:id",
        ":id=",
        ">",
        ">CMD",
        ">CMD.",
        ">.reply",
        ">>",
        ">>.x",
        "<",
        "<.*",
        "^",
        "^srv",
        "^srv/1",
        "^srv/1/",
        "^/1/id",
        "^srv/x/id",
        "^srv/-1/id",
        "^srv/١/id",
        (),
        ("id", None, 500),
        ("id", "addr", 1, 2),
        ("", "addr"),
        ("id", ""),
        ("id", "addr", -1),
        ("id", "addr", 1.5),
        ("id", "addr", True),
        (b"id", "addr"),
        b"stage:id",
        42,
        {"id": 1},
        object(),
    ],
)
def test_bad_targets_raise_address_error(target: object) -> None:
    with pytest.raises(AddressError):
        parse_target(target)


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)


def test_reply_here_is_a_shared_singleton() -> None:
    assert parse_target(None) is REPLY_HERE


def test_str_subclass_parses_as_its_text() -> None:
    class Name(str):
        pass

    assert parse_target(Name("stage:id")) == ToStage("stage", "id")


@given(
    st.one_of(
        st.text(),
        st.binary(),
        st.none(),
        st.integers(),
        st.floats(),
        st.lists(st.text() | st.integers()),
        st.tuples(st.text(), st.text(), st.floats()),
    )
)
def test_parse_target_raises_only_address_error(target: object) -> None:
    try:
        parse_target(target)
    except AddressError:
        pass


@given(st.text(alphabet="ab:+=*<>^.1/ ", max_size=12))
def test_parse_target_raises_only_address_error_on_grammar_soup(target: str) -> None:
    try:
        parse_target(target)
    except AddressError:
        pass


_SERVER = st.text(min_size=1).filter(lambda s: "/" not in s)


@given(_SERVER, st.integers(min_value=0, max_value=2**40), st.text(min_size=1))
def test_format_reply_round_trips(server: str, instance: int, msgid: str) -> None:
    assert parse_target(format_reply(server, instance, msgid)) == ReplyTo(server, instance, msgid)


@pytest.mark.parametrize(("server", "instance", "msgid"), [("a/b", 0, "x"), ("", 0, "x"), ("s", -1, "x"), ("s", 0, "")])
def test_format_reply_refuses_what_would_not_parse_back(server: str, instance: int, msgid: str) -> None:
    with pytest.raises(AddressError):
        format_reply(server, instance, msgid)


_ID = st.text(alphabet=st.characters(blacklist_characters=":+=^<>*"), min_size=1)


@given(st.sampled_from(["", "*", "=", "+"]), _ID, _ID, st.sampled_from([":", "+"]), st.none() | _ID)
def test_stage_targets_round_trip(prefix: str, stage: str, msgid: str, sep: str, reply: str | None) -> None:
    text = f"{prefix}{stage}{sep}{msgid}" + ("" if reply is None else f"={reply}")
    scope = {"": Scope.ANY, "*": Scope.ALL, "=": Scope.LOCAL, "+": Scope.REMOTE}[prefix]
    assert parse_target(text) == ToStage(stage, msgid, scope, sep == "+", reply)


@pytest.mark.parametrize(
    ("msgid", "expected"),
    [
        ("stage:group.msg.cb", ["stage:group.msg.cb", "stage:group.msg.", "stage:group.", "stage:"]),
        ("a.b.c", ["a.b.c", "a.b.", "a."]),
        ("st.a:x", ["st.a:x", "st.a:"]),
        ("st.a:g.x", ["st.a:g.x", "st.a:g.", "st.a:"]),
        ("stage:grp.", ["stage:grp.", "stage:"]),
        ("stage:", ["stage:"]),
        ("plain", ["plain"]),
        ("a.", ["a."]),
        ("s:a:b.c", ["s:a:b.c", "s:a:b.", "s:"]),
    ],
)
def test_match_candidates_follow_spec_2_6_order(msgid: str, expected: list[str]) -> None:
    assert match_candidates(msgid) == expected


@given(st.text(alphabet="ab.:", max_size=10))
def test_match_candidates_are_prefixes_longest_first(msgid: str) -> None:
    candidates = match_candidates(msgid)
    assert candidates[0] == msgid
    assert len(set(candidates)) == len(candidates)
    for shorter, longer in zip(candidates[1:], candidates, strict=False):
        assert longer.startswith(shorter) and len(shorter) < len(longer)
        assert shorter.endswith((".", ":"))


def test_parsing_takes_a_few_microseconds() -> None:
    targets = [f"*stage{i}:grp.msg{i}=reply" for i in range(5000)]  # more than the cache holds
    per_call = min(timeit.repeat(lambda: [parse_target(t) for t in targets], number=1, repeat=3)) / len(targets)
    assert per_call < 20e-6  # ~2 µs uncached on the reference machine; generous for noisy CI
    cached = min(timeit.repeat(lambda: parse_target("stage:id=reply"), number=10000, repeat=3)) / 10000
    assert cached < 2e-6
