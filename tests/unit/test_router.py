"""The router's decisions with fake time and fake receivers: replicas, scopes, replies, order, locks."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack
import pytest
from twisted.internet.task import Clock

from stagetx.address import parse_target
from stagetx.codec import pack_py, unpack_py
from stagetx.locks import LockTable, Turn
from stagetx.message import Message, Sender
from stagetx.router import DRAIN_CHUNK, SLOW_MARGIN, Router
from tests.fakes import RecordingLinks, RecordingStage
from tests.support import LogCapture


def make_router(placement: list[tuple[str, int]], group: int = 0) -> tuple[Router, Clock, dict[int, RecordingStage]]:
    clock = Clock()
    router = Router("srv", group, placement, clock, now=clock.seconds)
    stages = {}
    for instance, (stage_id, g) in enumerate(placement):
        if g == group:
            stages[instance] = RecordingStage(instance, stage_id)
            router.attach(stages[instance])
    return router, clock, stages


def send(
    router: Router, sender: RecordingStage, target: str, *values: Any, reply_to: str | None = None
) -> tuple[bool, str | None]:
    return router.send(sender.sender, parse_target(target), pack_py(values), reply_to)


def test_round_robin_over_three_local_replicas_is_even() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 0), ("b", 0), ("b", 0)])
    for i in range(300):
        assert send(router, stages[0], "b:count", i) == (True, None)
    clock.advance(0)
    counts = [len(stages[i].got) for i in (1, 2, 3)]
    assert counts == [100, 100, 100]
    # each replica saw its messages in the order they were sent
    for i in (1, 2, 3):
        values = [unpack_py(m.payload)[0] for m in stages[i].got]
        assert values == sorted(values)


def test_messages_for_other_processes_go_on_their_link() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 1), ("b", 2)])
    links = RecordingLinks()
    router.links = links
    for _ in range(4):
        send(router, stages[0], "b:x", 1)
    assert [group for group, _ in links.frames] == [1, 2, 1, 2]
    kind, instance, msgid, payload, sender, reply = links.frames[0][1]
    assert (kind, instance, msgid, reply) == ("m", 1, "x", None)
    assert sender == ["srv", 0, "a", 0]


def test_a_frame_names_this_server_s_own_sender_by_instance_number() -> None:
    """Between the processes of one server a frame carries the sender's instance number, which
    the receiving process turns back into the same sender; other senders travel whole."""
    placement = [("a", 0), ("b", 1)]
    router, _, _ = make_router(placement)
    links = RecordingLinks()
    router.links = links
    own = router.sender_of(0)
    assert own == Sender("srv", 0, "a", 0)
    router.send(own, parse_target("b:x"), pack_py((1,)))
    router.send(Sender("srv", 0, "a", 0), parse_target("b:y"), pack_py((2,)))  # equal, not the router's
    router.send(Sender("far", 3, "z", 9), parse_target("b:z"), pack_py((3,)))
    assert [frame[4] for _, frame in links.frames] == [0, ["srv", 0, "a", 0], ["far", 3, "z", 9]]

    other, _, stages = make_router(placement, group=1)
    for _, frame in links.frames:
        other.frame_received(0, frame)
    other.frame_received(0, ["m", 1, "bad", pack_py((4,)), 7, None])  # no instance 7 on this server
    other.run_queue()
    got = stages[1].got
    assert [m.msgid for m in got] == ["x", "y", "z"]
    assert got[0].sender is other.sender_of(0) and got[0].sender == own
    assert got[1].sender == own and got[2].sender == Sender("far", 3, "z", 9)


def test_a_process_whose_link_dropped_is_skipped_until_it_is_back() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 1), ("b", 2)])
    links = RecordingLinks()
    router.links = links
    links.down.add(1)
    for _ in range(4):
        send(router, stages[0], "b:x")
    assert {group for group, _ in links.frames} == {2}
    links.down.clear()
    links.frames.clear()
    for _ in range(4):
        send(router, stages[0], "b:x")
    assert sorted(group for group, _ in links.frames) == [1, 1, 2, 2]


def test_a_clearly_slower_replica_is_skipped_while_slow() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 1), ("b", 2), ("b", 3)])
    links = RecordingLinks()
    router.links = links
    router.delays = {1: 0.001, 2: 0.002 + SLOW_MARGIN * 3, 3: 0.0}
    for _ in range(6):
        send(router, stages[0], "b:x")
    assert Counter(group for group, _ in links.frames) == {1: 3, 3: 3}


def test_broadcast_reaches_every_replica_once_including_the_sender() -> None:
    router, clock, stages = make_router([("b", 0), ("b", 0), ("b", 1)])
    links = RecordingLinks()
    router.links = links
    assert send(router, stages[0], "*b:all", "v") == (True, None)
    assert send(router, stages[0], "*mine", "w") == (True, None)
    clock.advance(0)
    assert [m.msgid for m in stages[0].got] == ["all", "mine"]
    assert [m.msgid for m in stages[1].got] == ["all", "mine"]
    assert [f[1][2] for f in links.frames] == ["all", "mine"]


def test_plus_tags_the_sender_and_reply_suffix_makes_a_reply_address() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 0)])
    send(router, stages[0], "b+hello=back", 1)
    clock.advance(0)
    message = stages[1].got[0]
    assert message.msgid == "a:hello"
    assert message.reply == "^srv/0/back"
    # replying to that address reaches stage a as message "back"
    assert send(router, stages[1], message.reply, "answer") == (True, None)
    clock.advance(0)
    assert stages[0].got[0].msgid == "back"
    assert unpack_py(stages[0].got[0].payload) == (b"answer",)


def test_reply_to_can_hand_on_a_third_partys_reply_address() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 0), ("c", 0)])
    send(router, stages[1], "c:work", reply_to="^srv/0/done")
    clock.advance(0)
    assert stages[2].got[0].reply == "^srv/0/done"


def test_undeliverable_targets_say_why() -> None:
    router, clock, stages = make_router([("a", 0)])
    assert send(router, stages[0], "nobody:x") == (False, "unknown stage 'nobody'")
    assert send(router, stages[0], "+a:x")[0] is False
    assert send(router, stages[0], "^other/0/x")[0] is False
    assert send(router, stages[0], "^srv/99/x")[0] is False
    ok, reason = router.send(stages[0].sender, parse_target(("id", "127.0.0.1:1", 10)), pack_py(()))
    assert ok is False and reason


def test_a_frame_from_another_process_runs_when_the_link_says_the_frame_is_done() -> None:
    """``frame_received`` only queues (no drain scheduled per frame); ``run_queue`` delivers the
    frame's messages in order."""
    router, clock, stages = make_router([("a", 0), ("b", 1)])
    for n in (1, 2, 3):
        router.frame_received(1, ["m", 0, f"x{n}", pack_py((n,)), ["srv", 1, "b", 1], None])
    assert stages[0].got == [] and clock.getDelayedCalls() == []
    router.run_queue()
    assert [(m.msgid, unpack_py(m.payload)) for m in stages[0].got] == [("x1", (1,)), ("x2", (2,)), ("x3", (3,))]
    assert stages[0].got[0].sender.stage == "b"


class BatchingStage(RecordingStage):
    """A stage that takes several messages per call and is told when each chunk ended."""

    batches = True

    def __init__(self, instance: int, stage_id: str) -> None:
        super().__init__(instance, stage_id)
        self.calls: list[list[str]] = []  # the msgids of each call; "|" for each turn_ended

    def receive_batch(self, messages: list[Message]) -> None:
        self.got += messages
        self.calls.append([m.msgid for m in messages])

    def turn_ended(self) -> None:
        self.calls.append(["|"])


def _run_body(*msgids: str) -> bytes:
    return b"".join(msgpack.packb(m) + msgpack.packb(pack_py((m,)), use_bin_type=True) + b"\xc0" for m in msgids)


def test_a_run_reaches_a_stage_that_takes_no_runs_a_chunk_at_a_time_in_order() -> None:
    router, _, _ = make_router([("a", 0), ("b", 1)])
    stage = BatchingStage(0, "a")
    router.attach(stage)
    names = [f"x{i}" for i in range(DRAIN_CHUNK + 8)]
    # two runs that arrived split: joined while queued, then handed over as chunks
    router.frame_received(1, ["r", 0, 1, 20, _run_body(*names[:20])])
    router.frame_received(1, ["r", 0, 1, len(names) - 20, _run_body(*names[20:])])
    router.run_queue()
    assert stage.calls == [names[:DRAIN_CHUNK], ["|"], names[DRAIN_CHUNK:], ["|"]]
    assert [unpack_py(m.payload)[0] for m in stage.got] == [n.encode() for n in names]
    assert all(m.sender.stage == "b" and m.reply is None for m in stage.got)


def test_a_stage_that_asks_for_shorter_chunks_ends_its_turn_after_that_many_messages() -> None:
    router, _, _ = make_router([("a", 0), ("b", 1)])
    stage = BatchingStage(0, "a")
    stage.chunk = 4
    router.attach(stage)
    names = [f"x{i}" for i in range(10)]
    router.frame_received(1, ["r", 0, 1, 10, _run_body(*names)])
    router.run_queue()
    assert stage.calls == [names[:4], ["|"], names[4:8], ["|"], names[8:], ["|"]]


def test_a_run_whose_body_holds_fewer_messages_than_it_says_hands_over_what_it_holds() -> None:
    router, _, stages = make_router([("a", 0), ("b", 1)])
    router.frame_received(1, ["r", 0, 1, 5, _run_body("x1", "x2", "x3")])
    router.frame_received(1, ["m", 0, "after", pack_py(()), 1, None])
    router.run_queue()
    assert [m.msgid for m in stages[0].got] == ["x1", "x2", "x3", "after"]


def test_a_run_whose_body_does_not_decode_is_dropped_with_a_log_line_and_the_queue_goes_on() -> None:
    router, _, stages = make_router([("a", 0), ("b", 1)])
    router.frame_received(1, ["r", 0, 1, 2, b"\xc1\xc1\xc1"])  # 0xc1: never used in msgpack
    router.frame_received(1, ["m", 0, "after", pack_py(()), 1, None])
    with LogCapture() as capture:
        router.run_queue()
    assert [m.msgid for m in stages[0].got] == ["after"]
    assert "malformed run" in capture.text()


class TurnClock(Clock):
    """A clock whose ``turn()`` runs only the calls that were due when the turn began, like one
    pass of a reactor loop (``Clock.advance`` would also run calls scheduled meanwhile)."""

    def turn(self) -> int:
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)
        return len(due)


def test_one_drain_turn_yields_to_the_reactor_after_its_time_slice() -> None:
    clock = TurnClock()
    elapsed = [0.0]
    router = Router("srv", 0, [("a", 0), ("b", 0)], clock, now=lambda: elapsed[0])

    class Slow(RecordingStage):
        def receive(self, message: Message) -> None:
            super().receive(message)
            elapsed[0] += 0.001  # each message takes 1 ms

    sender, slow = RecordingStage(0, "a"), Slow(1, "b")
    router.attach(sender)
    router.attach(slow)
    for _ in range(200):
        send(router, sender, "b:x")
    assert clock.turn() == 1
    first_turn = len(slow.got)
    assert 0 < first_turn < 200
    turns = 1
    while router.queue_length():
        assert clock.turn() == 1
        turns += 1
    assert len(slow.got) == 200 and turns > 2


def test_a_batching_stage_hears_once_per_turn_after_its_messages() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 0)])
    events: list[str] = []

    class Batching(RecordingStage):
        batches = True

        def receive(self, message: Message) -> None:
            events.append(message.msgid)

        def turn_ended(self) -> None:
            events.append("end")

    router.attach(Batching(1, "b"))
    for msgid in ("x", "y"):
        send(router, stages[0], f"b:{msgid}")
    clock.advance(0)
    send(router, stages[0], "a:other")  # a turn without b's messages does not tell b
    clock.advance(0)
    assert events == ["x", "y", "end"]


def test_a_long_turn_ends_in_chunks_so_replies_leave_while_the_rest_is_handled() -> None:
    """Every DRAIN_CHUNK messages the batching stage ends its turn and the links are flushed, so
    another process can work on the first replies while this one handles the next chunk."""
    router, clock, stages = make_router([("a", 0), ("b", 0)])
    links = RecordingLinks()
    router.links = links
    events: list[str] = []

    class Batching(RecordingStage):
        batches = True

        def receive(self, message: Message) -> None:
            events.append("m")

        def turn_ended(self) -> None:
            events.append(f"end after flush {links.flushes}")

    router.attach(Batching(1, "b"))
    count = 2 * DRAIN_CHUNK + 3
    for _ in range(count):
        send(router, stages[0], "b:x")
    clock.advance(0)
    chunk = ["m"] * DRAIN_CHUNK
    assert events == [
        *chunk,
        "end after flush 0",
        *chunk,
        "end after flush 1",
        *["m"] * 3,
        "end after flush 2",
    ]
    assert links.flushes == 3


class TestLocks:
    def setup_method(self) -> None:
        self.clock = Clock()
        self.granted: list[Turn] = []
        self.locks = LockTable(self.clock, self.granted.append)

    def acquire(self, who: int) -> None:
        self.locks.acquire("L", Turn(who, "turn", b""))

    def test_turns_are_granted_first_come_first_served(self) -> None:
        for who in (3, 1, 2):
            self.acquire(who)
        assert [t.who for t in self.granted] == [3]
        assert self.locks.release("L", 3)
        assert self.locks.release("L", 1)
        assert [t.who for t in self.granted] == [3, 1, 2]

    def test_an_unreleased_turn_expires_after_100_ms(self) -> None:
        self.acquire(1)
        self.acquire(2)
        self.clock.advance(0.099)
        assert self.locks.holder("L") == 1
        self.clock.advance(0.002)
        assert self.locks.holder("L") == 2

    def test_the_holder_extends_its_turn_and_others_cannot(self) -> None:
        self.acquire(1)
        self.acquire(2)
        assert not self.locks.extend("L", 2, 1000)
        assert self.locks.extend("L", 1, 500)
        self.clock.advance(0.4)
        assert self.locks.holder("L") == 1
        self.clock.advance(0.11)
        assert self.locks.holder("L") == 2

    def test_release_by_someone_else_is_ignored(self) -> None:
        self.acquire(1)
        assert not self.locks.release("L", 2)
        assert self.locks.holder("L") == 1
        assert self.locks.release("L", 1)
        assert self.locks.holder("L") is None
        assert self.locks.waiting("L") == 0


def test_router_locks_deliver_the_turn_to_the_requester_with_its_values() -> None:
    router, clock, stages = make_router([("a", 0), ("b", 0)])
    send(router, stages[0], ">L.go", "first")
    send(router, stages[1], ">L.go", "second")
    clock.advance(0)
    assert [unpack_py(m.payload) for m in stages[0].got] == [(b"first",)]
    assert stages[1].got == []
    send(router, stages[1], "<L.*")  # not the holder: ignored
    send(router, stages[0], "<L.*")
    clock.advance(0)
    assert [unpack_py(m.payload) for m in stages[1].got] == [(b"second",)]


@pytest.mark.parametrize("group", [1, 2])
def test_lock_requests_from_other_processes_go_to_the_first_group(group: int) -> None:
    router, clock, stages = make_router([("a", 0), ("b", 1), ("c", 2)], group=group)
    links = RecordingLinks()
    router.links = links
    me = stages[group]
    send(router, me, ">L.go", 1)
    send(router, me, ">>L.x", 50)
    send(router, me, "<L.*")
    assert [(g, f[0], f[1][0]) for g, f in links.frames] == [
        (0, "lock", "acquire"),
        (0, "lock", "extend"),
        (0, "lock", "release"),
    ]
    assert links.frames[1][1][1][3] == 50


class FarRoutes:
    """A cluster in which stage ``a`` has one replica on server ``far``."""

    def __init__(self) -> None:
        from stagetx.cluster.directory import Routes

        self.routes = Routes(live={"a": [("far", 0)]}, servers={"far": 0.0})
        self.sent: list[tuple[str, list[Any]]] = []

    def send(
        self,
        server_id: str,
        frame: list[Any],
        reroute: str | None = None,
        deadline: float | None = None,
        steady: bool = False,
    ) -> Any:
        self.sent.append((server_id, frame))
        return True, None

    def process_frame(self, group: int, frame: list[Any]) -> None:
        pass

    def steady_room(self, server_id: str) -> int:
        return 1000 if server_id == "far" else 0


def test_local_and_cluster_round_robins_keep_their_own_turn() -> None:
    """``=a`` goes round this server's replicas, ``a`` round those and the other server's: taking
    turns between the two must leave each its fair order."""
    router, clock, stages = make_router([("a", 0), ("a", 0)])
    far = FarRoutes()
    router.remote = far  # type: ignore[assignment]
    for round_ in range(6):
        assert send(router, stages[0], "=a:local", round_)[0]
        assert send(router, stages[0], "a:any", round_)[0]
    clock.advance(0)
    assert [[m.msgid for m in s.got].count("local") for s in stages.values()] == [3, 3]
    assert [[m.msgid for m in s.got].count("any") for s in stages.values()] == [2, 2]
    assert len(far.sent) == 2


def test_routing_again_with_no_reachable_replica_says_why() -> None:
    """A peer left while this server's own replica's process restarts: nothing to route to."""
    router, _, _ = make_router([("a", 0), ("w", 1)])
    links = RecordingLinks()
    links.down.add(1)
    router.links = links
    far = FarRoutes()
    router.remote = far  # type: ignore[assignment]
    frame = ["m", 0, "x", pack_py((1,)), ["gone", 0, "s", 0], None]
    assert router.route_again("w", frame) == (False, "no reachable replica of 'w'")


def test_a_message_to_the_one_other_server_with_the_stage_is_steady_while_it_is_linked() -> None:
    """``+a`` (or ``a`` with no replica here) to a single server has no choice to make: its route
    holds for the turn when that server is linked; a choice, a broadcast or a replica here does not."""
    router, _, stages = make_router([("s", 0), ("a", 0)])
    sender = stages[0].sender
    far = FarRoutes()
    router.remote = far  # type: ignore[assignment]
    assert router.steady_room(sender, parse_target("+a:x")) == 1000
    assert router.steady_room(sender, parse_target("a:x")) == 0  # round robin with the local replica
    assert router.steady_room(sender, parse_target("*a:x")) == 0
    assert router.steady_room(sender, parse_target("^far/0/x")) == 1000
    assert router.steady_room(sender, parse_target("^gone/0/x")) == 0

    lonely, _, lonely_stages = make_router([("s", 0)])
    lonely.remote = far  # type: ignore[assignment]
    assert lonely.steady_room(lonely_stages[0].sender, parse_target("a:x")) == 1000
    far.routes = type(far.routes)(live={"a": [("far", 0), ("other", 0)]}, servers={"far": 0.0, "other": 0.0})
    assert lonely.steady_room(lonely_stages[0].sender, parse_target("a:x")) == 0  # two servers: a choice
    assert send(lonely, lonely_stages[0], "+a:x", 1) == (True, None)
    assert [server for server, _ in far.sent] in (["far"], ["other"])
    assert far.sent[0][1][4] == ["srv", 0, "s", 0]  # a sender object not of this router: named whole


def test_steady_room_asks_for_other_servers_replicas_as_sending_does() -> None:
    """A ``+a`` from a server that has ``a`` itself never goes to a backup: a backup server is no
    steady route for it either (messages answered ``true`` from the outbox would be lost)."""
    from stagetx.cluster.directory import Routes

    router, _, stages = make_router([("s", 0), ("a", 0)])
    far = FarRoutes()
    far.routes = Routes(backups={"a": [("far", 0)]}, servers={"far": 0.0})
    router.remote = far  # type: ignore[assignment]
    assert send(router, stages[0], "+a:x", 1)[0] is False
    assert router.steady_room(stages[0].sender, parse_target("+a:x")) == 0


class ForgettingStage(RecordingStage):
    """A stage that keeps state per replica, as route and ticket do."""

    def __init__(self, instance: int, stage_id: str) -> None:
        super().__init__(instance, stage_id)
        self.lost: list[frozenset[tuple[str, int]]] = []

    def replicas_lost(self, lost: frozenset[tuple[str, int]]) -> None:
        self.lost.append(lost)


def test_a_lost_process_s_replicas_are_told_to_the_stages_that_keep_state_per_replica() -> None:
    router, _, _ = make_router([("route", 0), ("chat", 1), ("chat", 1), ("game", 2)])
    route = ForgettingStage(0, "route")
    router.attach(route)
    router.process_lost(1)
    assert route.lost == [frozenset({("srv", 1), ("srv", 2)})]
