"""The request executor of both index backends on the same requests: the embedded board and
Redis (a real redis-server, on the real reactor). The pure structures are tests/unit/test_index_board.py."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.redis_backend import RedisExecutor, fill, pack_steps, unpack_answer
from stagetx.stages.index.redis_link import RedisLink, parse_redis_settings
from tests.redis_servers import REDIS_SERVER, RedisServer
from tests.support import wait_for
from tests.unit.test_index_board import MemoryBoards

Runner = Callable[[Any], Awaitable[Any]]


@pytest.fixture
def boards() -> MemoryBoards:
    return MemoryBoards()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield server
    finally:
        server.stop()


async def redis_runner(server: RedisServer, key_size: int) -> tuple[Runner, RedisLink]:
    """``Executor.run`` of the Redis backend: plan, one script run on the real server, the reply;
    under a prefix of its own, so every test starts with no boards."""
    settings = parse_redis_settings({"redis": server.url, "prefix": f"t{uuid.uuid4().hex[:8]}:"}, key_size)
    link = RedisLink(settings)
    link.start()
    await wait_for(lambda: link.connected, 10.0, "the redis pool")
    executor = RedisExecutor(key_size)

    async def run(request: Any) -> Any:
        reply, plan = executor.plan(request)
        if not plan.steps:
            return reply
        return fill(reply, unpack_answer(await link.run(settings.prefix.encode(), plan.pack(), False)))

    return run, link


def embedded_runner(boards: MemoryBoards, key_size: int) -> Runner:
    executor = Executor(boards, key_size)

    async def run(request: Any) -> Any:
        return executor.run(request)

    return run


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def run(boards: MemoryBoards, backend: str, request: pytest.FixtureRequest) -> AsyncIterator[Runner]:
    """The request executor of either backend: every test using it runs on both (docs/index.md)."""
    if backend == "embedded":
        yield embedded_runner(boards, 8)
        return
    runner, link = await redis_runner(request.getfixturevalue("redis_server"), 8)
    try:
        yield runner
    finally:
        await link.close()


async def _set(run, board: str, **scores: int) -> dict:
    return await run(
        {f"set:{board}".encode(): {k.encode(): {b"v": k.upper().encode(), b"i": s} for k, s in scores.items()}}
    )


@pytest_twisted.ensureDeferred
async def test_larger_score_ranks_higher_and_set_replies_new_rank(run) -> None:
    assert (await _set(run, "b", alice=10)) == {b"set:b": {b"alice": 1}}
    assert (await _set(run, "b", bob=20)) == {b"set:b": {b"bob": 1}}
    assert (await _set(run, "b", carol=15)) == {b"set:b": {b"carol": 2}}
    reply = (await run({b"get:b": [b"alice", b"bob", b"carol"]}))[b"get:b"]
    assert {member: entry["I"][1]["d"] for member, entry in reply.items()} == {b"bob": 1, b"carol": 2, b"alice": 3}
    assert reply[b"alice"] == {"v": b"ALICE", "I": {1: {"i": 10, "d": 3}}}


@pytest_twisted.ensureDeferred
async def test_unchanged_score_replies_zero_but_updates_value(run) -> None:
    (await _set(run, "b", alice=10))
    reply = await run({b"set:b": {b"alice": {b"v": b"new", b"i": 10}}})
    assert reply == {b"set:b": {b"alice": 0}}
    assert (await run({b"get:b": [b"alice"]}))[b"get:b"][b"alice"]["v"] == b"new"


@pytest_twisted.ensureDeferred
async def test_ties_rank_the_earlier_set_first_and_a_moved_member_goes_behind(run) -> None:
    (await _set(run, "b", first=5))
    (await _set(run, "b", second=5))
    assert (await _set(run, "b", third=5)) == {b"set:b": {b"third": 3}}
    (await _set(run, "b", first=6))
    assert (await _set(run, "b", first=5)) == {b"set:b": {b"first": 3}}  # re-entering the tie: last
    rows = (await run({b"forEach:b": [1, 10]}))[b"forEach:b"]
    assert [row["k"] for row in rows] == [b"second", b"third", b"first"]


@pytest_twisted.ensureDeferred
async def test_tiers_are_independent_and_unscored_members_are_not_ranked(run) -> None:
    (await run({b"set:b/2": {b"a": {b"i": 1}, b"b": {b"I": {2: 3, 3: 7}}}}))
    assert (await run({b"total:b": True, b"total:b/2": True, b"total:b/3": True})) == {
        b"total:b": 0,
        b"total:b/2": 2,
        b"total:b/3": 1,
    }
    got = (await run({b"get:b": [b"a", b"b"]}))[b"get:b"]
    assert got[b"a"] == {"I": {2: {"i": 1, "d": 2}}}
    assert got[b"b"] == {"I": {2: {"i": 3, "d": 1}, 3: {"i": 7, "d": 1}}}
    assert (await run({b"forEach:b/1": [1, 5]}))[b"forEach:b/1"] == []


@pytest_twisted.ensureDeferred
async def test_a_set_whose_score_widens_the_tier_replies_the_ranks(run) -> None:
    # a score no dense key holds (inf, 1e300) makes the embedded board widen the tier mid-set
    (await _set(run, "b", a=1))
    reply = await run({b"set:b": {b"top": {b"i": math.inf}, b"mid": {b"i": 2}}})
    assert reply == {b"set:b": {b"top": 1, b"mid": 2}}
    assert (await run({b"set:c/2": {b"m": {b"I": {2: 1e300}}}})) == {b"set:c/2": {b"m": 1}}


@pytest_twisted.ensureDeferred
async def test_I_as_a_sequence_sets_tiers_in_order(run) -> None:
    assert (await run({b"set:b/3": {b"m": {b"I": [1, 2, 3, 4]}}})) == {b"set:b/3": {b"m": 1}}
    got = (await run({b"get:b": [b"m"]}))[b"get:b"][b"m"]["I"]
    assert [got[t]["i"] for t in (1, 2, 3, 4)] == [1, 2, 3, 4]


@pytest_twisted.async_fixture
async def ten(run):
    """Members m0..m9 with score 10*i: m9 has rank 1, m0 rank 10."""
    (await run({b"set:b": {f"m{i}".encode(): {b"i": 10 * i} for i in range(10)}}))
    return run


@pytest_twisted.ensureDeferred
async def test_range_by_score_starts_at_the_highest_score_not_above(ten) -> None:
    rows = (await ten({b"range:b": [55, 3]}))[b"range:b"]
    assert [(r["k"], r["i"], r["d"]) for r in rows] == [(b"m5", 50, 5), (b"m4", 40, 6), (b"m3", 30, 7)]
    assert [r["k"] for r in (await ten({b"range:b": [50, 2]}))[b"range:b"]] == [b"m5", b"m4"]
    assert (await ten({b"range:b": [-1, 5]}))[b"range:b"] == []
    assert [r["d"] for r in (await ten({b"range:b": [1000, 2]}))[b"range:b"]] == [1, 2]


@pytest_twisted.ensureDeferred
async def test_range_around_a_member_with_delta_and_count(ten) -> None:
    # m5 has rank 5: start 2 ranks above it, 4 entries.
    assert [r["d"] for r in (await ten({b"range:b": [b"m5", 2, 4]}))[b"range:b"]] == [3, 4, 5, 6]
    # never above rank 1
    assert [r["d"] for r in (await ten({b"range:b": [b"m8", 5, 3]}))[b"range:b"]] == [1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_range_with_delta_only_puts_the_member_in_the_middle(ten) -> None:
    assert [r["d"] for r in (await ten({b"range:b": [b"m4", 5]}))[b"range:b"]] == [4, 5, 6, 7, 8]
    assert [r["d"] for r in (await ten({b"range:b": [b"m9", 4]}))[b"range:b"]] == [1, 2, 3, 4]
    assert [r["d"] for r in (await ten({b"range:b": [b"m0", 4]}))[b"range:b"]] == [8, 9, 10]
    assert (await ten({b"range:b": [b"nobody", 4]}))[b"range:b"] == []


@pytest_twisted.ensureDeferred
async def test_forEach_pages_from_a_rank(ten) -> None:
    rows = (await ten({b"forEach:b": [9, 5]}))[b"forEach:b"]
    assert [(r["k"], r["d"]) for r in rows] == [(b"m1", 9), (b"m0", 10)]
    assert (await ten({b"forEach:b": [11, 5]}))[b"forEach:b"] == []
    assert (await ten({b"forEach:b": [1, 0]}))[b"forEach:b"] == []


@pytest_twisted.ensureDeferred
async def test_a_start_score_or_id_alone_is_one_row_as_on_the_original(ten) -> None:
    """The original's COUNT (and DELTA) default to 0 and it reads at least one row: who is at
    rank N, the highest score at most S, a member's own row."""
    assert [(r["k"], r["d"]) for r in (await ten({b"forEach:b": [3]}))[b"forEach:b"]] == [(b"m7", 3)]
    assert (await ten({b"forEach:b": [11]}))[b"forEach:b"] == []
    assert [(r["k"], r["i"]) for r in (await ten({b"range:b": [55]}))[b"range:b"]] == [(b"m5", 50)]
    assert [(r["k"], r["d"]) for r in (await ten({b"range:b": [b"m4"]}))[b"range:b"]] == [(b"m4", 6)]
    assert (await ten({b"range:b": [b"nobody"]}))[b"range:b"] == []
    assert (await ten({b"forEach:b": [1, 2, 3]}))[b"forEach:b"] == {"error": "forEach takes {START, COUNT} or {START}"}


@pytest_twisted.ensureDeferred
async def test_delete_removes_the_member_from_every_tier(run, boards, backend) -> None:
    (await run({b"set:b": {b"a": {b"I": [5, 6]}, b"b": {b"i": 1}}}))
    assert (await run({b"del:b": [b"a", b"ghost"]})) == {b"del:b": 1}
    assert (await run({b"get:b": [b"a", b"b"]}))[b"get:b"].keys() == {b"b"}
    assert (await run({b"total:b/2": 0, b"total:b": 0})) == {b"total:b/2": 0, b"total:b": 1}
    if backend == "embedded":
        assert boards.changes[-1] == (b"b", b"a")


@pytest_twisted.ensureDeferred
async def test_writes_run_before_reads_unless_ordered(run) -> None:
    reply = await run({b"get:b": [b"a"], b"set:b": {b"a": {b"i": 1}}})
    assert reply[b"get:b"][b"a"]["I"][1]["d"] == 1
    reply = await run({b"#2.del:b": [b"a"], b"#1.get:b": [b"a"], b"#3.get:b": [b"a"]})
    assert reply[b"#1.get:b"].keys() == {b"a"}
    assert reply[b"#3.get:b"] == {}
    assert reply[b"#2.del:b"] == 1


@pytest.mark.parametrize(
    "key, argument",
    [
        (b"explode:b", []),
        (b"set:b/5", {b"a": {b"i": 1}}),
        (b"set:b/0", {b"a": {b"i": 1}}),
        (b"set:b/x", {b"a": {b"i": 1}}),
        (b"get", [b"a"]),
        (b"get:", [b"a"]),
        (b"#x.get:b", [b"a"]),
        (b"set:b", {b"toolongkey": {b"i": 1}}),
        (b"set:b", {b"a": {b"i": b"high"}}),
        (b"set:b", {b"a": {b"i": float("nan")}}),
        (b"set:b", {b"a": {b"I": {7: 1}}}),
        (b"set:b", {b"a": 3}),
        (b"set:b", {b"a": {b"v": {1, 2}}}),
        (b"set:b", [1, 2]),
        (b"get:b", 5),
        (b"g?", [b"a"]),
        (b"x?b", [b"a"]),
        (b"range:b", [1, 2, 3]),
        (b"range:b", [b"a", b"x"]),
        (b"forEach:b", [1, 2, 3]),
        (1, [b"a"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_entry_gets_an_error_and_the_others_still_run(run, key, argument) -> None:
    reply = await run({key: argument, b"set:ok": {b"fine": {b"i": 1}}})
    assert set(reply[key]) == {"error"} and reply[key]["error"]
    assert reply[b"set:ok"] == {b"fine": 1}


@pytest_twisted.ensureDeferred
async def test_a_rejected_set_changes_nothing(run, boards) -> None:
    (await run({b"set:b": {b"good": {b"i": 1}, b"bad": {b"i": b"x"}}}))
    assert (await run({b"total:b": 0}))[b"total:b"] == 0
    assert (await run({b"get:b": [b"good"]}))[b"get:b"] == {}
    assert boards.changes == []


@pytest_twisted.ensureDeferred
async def test_get_and_del_take_one_id_alone(run) -> None:
    await run({b"set:b": {b"a": {b"i": 1}, b"c": {b"i": 2}}})
    assert set((await run({b"get:b": b"a"}))[b"get:b"]) == {b"a"}
    assert (await run({b"d?b": b"a"}))[b"d?b"] == 1


@pytest_twisted.ensureDeferred
async def test_the_redis_backend_answers_every_request_as_the_embedded_board(redis_server) -> None:
    """Random request tables (several members, ties, int and float scores, four tiers, values,
    deletes, reads of every kind, bad entries) give the same replies on both backends."""
    rng = random.Random(11)
    embedded = embedded_runner(MemoryBoards(), 8)
    on_redis, link = await redis_runner(redis_server, 8)
    try:
        for step in range(300):
            request: dict[Any, Any] = {}
            for _ in range(rng.randrange(1, 4)):
                tier = rng.randrange(1, 5)
                op = rng.choice(["set", "set", "set", "del", "get", "range", "forEach", "total"])
                members = [b"m%d" % rng.randrange(30) for _ in range(rng.randrange(1, 4))]
                if op == "set":
                    argument: Any = {}
                    for member in members:
                        score = rng.choice([rng.randrange(8), rng.randrange(8) + 0.5, float(rng.randrange(8)), -0.0])
                        spec: dict[bytes, Any] = {b"i": score}
                        if rng.random() < 0.3:
                            spec = {b"I": {rng.randrange(1, 5): score, rng.randrange(1, 5): rng.randrange(8)}}
                        if rng.random() < 0.5:
                            spec[b"v"] = rng.choice([step, b"text", {b"a": [1, 2]}, None, 1.5])
                        argument[member] = spec
                elif op in ("del", "get"):
                    argument = members
                elif op == "range":
                    argument = rng.choice(
                        [
                            [rng.randrange(-1, 9) + rng.choice([0, 0.5]), rng.randrange(5)],
                            [members[0], rng.randrange(6)],
                        ]
                        + [[members[0], rng.randrange(4), rng.randrange(5)], [float("inf"), 3], [b"x"]]
                    )
                elif op == "forEach":
                    argument = [rng.randrange(-1, 12), rng.randrange(6)]
                else:
                    argument = True
                prefix = b"#%d." % rng.randrange(3) if rng.random() < 0.3 else b""
                request[prefix + b"%s:b/%d" % (op.encode(), tier)] = argument
            assert (await on_redis(request)) == (await embedded(request)), (step, request)
        for tier in (1, 2, 3, 4):
            everyone = {b"forEach:b/%d" % tier: [1, 100], b"get:b": [b"m%d" % i for i in range(30)]}
            assert (await on_redis(everyone)) == (await embedded(everyone))
    finally:
        await link.close()


@pytest_twisted.ensureDeferred
async def test_many_tables_in_one_script_run_answer_as_the_embedded_board_one_by_one(redis_server) -> None:
    """A busy stage's turn: many request tables run as one script. One-member sets (the script's
    flat step) of the same member again, ties, unchanged scores, new members, values, a second
    tier and another board, among reads and other writes, answer as the embedded board running
    the tables one after another."""
    rng = random.Random(5)
    embedded = embedded_runner(MemoryBoards(), 8)
    settings = parse_redis_settings({"redis": redis_server.url, "prefix": f"t{uuid.uuid4().hex[:8]}:"}, 8)
    link = RedisLink(settings)
    link.start()
    try:
        await wait_for(lambda: link.connected, 10.0, "the redis pool")
        executor = RedisExecutor(8)
        for _ in range(40):
            tables: list[Any] = []
            for _ in range(rng.randrange(1, 40)):
                board = rng.choice([b"b", b"b", b"b/2", b"c"])
                member = b"m%d" % rng.randrange(12)
                if rng.random() < 0.85:
                    spec: dict[bytes, Any] = {b"i": rng.choice([rng.randrange(4), rng.randrange(4) + 0.5])}
                    if rng.random() < 0.2:
                        spec[b"v"] = rng.randrange(100)
                    tables.append({b"set:" + board: {member: spec}})
                else:
                    tables.append(
                        rng.choice(
                            [
                                {b"get:" + board: [member]},
                                {b"forEach:" + board: [1, 20]},
                                {b"del:" + board: [member]},
                                {b"set:" + board: {member: {b"i": 1}, b"m0": {b"i": 2}}},
                            ]
                        )
                    )
            planned, steps = [], []
            for table in tables:
                reply, plan = executor.plan(table)
                planned.append((reply, len(steps)))
                steps += plan.steps
            results = unpack_answer(await link.run(settings.prefix.encode(), pack_steps(steps), False))
            for table, (reply, offset) in zip(tables, planned):
                assert fill(reply, results, offset) == (await embedded(table)), table
        everyone = {b"forEach:" + board: [1, 100] for board in (b"b", b"b/2", b"c")}
        reply, plan = executor.plan(everyone)
        results = unpack_answer(await link.run(settings.prefix.encode(), plan.pack(), False))
        assert fill(reply, results) == (await embedded(everyone))
    finally:
        await link.close()
