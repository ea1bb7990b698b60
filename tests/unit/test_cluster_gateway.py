"""The gateway's logic (stagetx.cluster.gateway) with a real router, fake links and a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from stagetx.address import parse_target
from stagetx.cluster.gateway import ClusterGateway, RemoteView
from stagetx.codec import pack_py
from stagetx.config import parse_config
from stagetx.message import Sender
from stagetx.router import Router
from stagetx.wire import pack_message, unpack_message
from tests.fakes import RecordingLinks, RecordingStage


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.packed: list[bytes] = []  # what was passed on packed already, as it came
        self.stalled = False  # its peer reads everything

    def send(self, obj: Any) -> bool:
        self.sent.append(obj)
        return True

    def send_packed(self, data: bytes) -> bool:
        self.packed.append(data)
        self.sent.append(unpack_message(data))
        return True

    def frames(self, kind: str) -> list[Any]:
        return [f for f in self.sent if f[0] == kind]


def gateway(
    tmp_path: Path, queue: int = 100, startup: list[list[str]] | None = None
) -> tuple[ClusterGateway, Router, Clock, RecordingLinks]:
    (tmp_path / "a.lua").write_text("")
    raw = {
        "#startup": startup or [["=lua+a"]],
        "#router": [1500, 900],
        "#cluster": [{"listen": "127.0.0.1:7001", "queue": queue}, "=127.0.0.1:7009"],
        "=lua": {"=lua+a": "a", "=lua+w": "a"},
    }
    config = parse_config(raw, str(tmp_path))
    clock = Clock()
    clock.advance(1000)
    router = Router("me", 0, [(s.id, s.group) for s in config.stages], clock, clock.seconds)
    for s in config.startup[0]:
        router.attach(RecordingStage(s.instance, s.id, server="me"))
    links = RecordingLinks()
    gw = ClusterGateway(config, router, links, b"secret", clock, clock.seconds)
    return gw, router, clock, links


def link_peer(gw: ClusterGateway, server: str, addr: str, stages: dict[str, list[int]]) -> FakeLink:
    link = FakeLink()
    gw.peers.links[server] = link  # type: ignore[assignment]
    gw.peer_linked(server, link, None)  # type: ignore[arg-type]
    gw.peer_message(server, ["hello", addr, stages, 0.0, False])
    return link


def outlive(gw: ClusterGateway, clock: Clock, live: str, addr: str, stages: dict[str, list[int]]) -> None:
    """Peer ``live`` keeps beating past the directory's sync time while the others stay silent."""
    for _ in range(3):
        clock.advance(0.5)
        gw.peer_message(live, ["hello", addr, stages, 0.0, False])
        gw._tick()
    clock.advance(0.6)
    gw.peer_message(live, ["hello", addr, stages, 0.0, False])
    gw._tick()


SENDER = Sender("me", 0, "a", 0)


def send(router: Router, target: Any, *values: Any) -> tuple[bool, str | None]:
    return router.send(SENDER, parse_target(target), pack_py(values))


def test_a_linked_peer_gets_a_hello_and_its_replicas_are_routed_to(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0, 1]})
    assert link.frames("hello")[0][1:3] == ["127.0.0.1:7001", {"a": [0]}]
    assert send(router, "+w:x=r", 1) == (True, None)
    assert send(router, "w:x") == (True, None)
    frames = link.frames("m")
    assert [f[1] for f in frames] == [0, 1]
    assert frames[0][2] == "x" and frames[0][5] == "^me/0/r"
    assert send(router, "=w:x")[0] is False


def test_broadcast_sends_one_frame_per_replica_on_other_servers(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    one = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0, 1]})
    two = link_peer(gw, "s2", "127.0.0.1:7003", {"w": [4]})
    assert send(router, "*w:x") == (True, None)
    assert [f[1] for f in one.frames("m")] == [0, 1]
    assert [f[1] for f in two.frames("m")] == [4]


def test_frames_from_a_peer_reach_the_local_stage(tmp_path: Path) -> None:
    gw, router, clock, _ = gateway(tmp_path)
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    gw.peer_message("s1", ["m", 0, "hi", pack_py((1,)), ["s1", 0, "w", 0], "^s1/0/back"])
    clock.advance(0)
    got = router.local[0].got  # type: ignore[attr-defined]
    assert [(m.msgid, m.sender.server, m.reply) for m in got] == [("hi", "s1", "^s1/0/back")]


def test_replies_to_another_server_and_to_a_gone_one(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    assert send(router, "^s1/0/back", "v") == (True, None)
    assert link.frames("m")[0][1:3] == [0, "back"]
    ok, reason = send(router, "^gone/0/back", "v")
    assert ok is False and "gone" in str(reason)


def s1_gone(tmp_path: Path, w_on_s2: int) -> tuple[ClusterGateway, Router, Clock, FakeLink]:
    """A gateway linked to servers s1 and s2 (stage ``w``: instance 0 on s1, ``w_on_s2`` on s2)
    that just lost its link to s1; the last item is s2's link."""
    gw, router, clock, _ = gateway(tmp_path)
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    other = link_peer(gw, "s2", "127.0.0.1:7003", {"w": [w_on_s2]})
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    return gw, router, clock, other


def test_silence_removes_routing_and_queued_messages_go_to_another_replica(tmp_path: Path) -> None:
    gw, router, clock, other = s1_gone(tmp_path, 0)
    gw.directory.unlinked("s2")  # both away: messages wait in the queues
    gw.routes = gw.directory.routes()
    for _ in range(4):
        assert send(router, "w:x")[0]
    assert len(gw.peers.queues["s1"]) == 2
    outlive(gw, clock, "s2", "127.0.0.1:7003", {"w": [0]})  # s2 keeps beating, s1 stays silent
    assert "s1" not in gw.directory.peers
    gw.peers.links["s2"] = other  # type: ignore[assignment]
    gw.peers._flush("s2", other)  # type: ignore[arg-type]
    assert len(other.frames("m")) == 4  # nothing for the live replica lost in the switch-over


def test_messages_dropped_with_a_gone_peer_are_logged_by_id_and_target_and_counted(tmp_path: Path) -> None:
    gw, router, clock, _ = gateway(tmp_path)
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    gw.routes = gw.directory.routes()
    assert send(router, "w:score")[0] and send(router, "w:top")[0]  # no other replica of w
    assert send(router, ["w:rank", "127.0.0.1:7002"])[0]  # a message for that server
    with capturedLogs() as events:
        for _ in range(4):
            clock.advance(0.5)
            gw._tick()
    assert "s1" not in gw.directory.peers
    (event,) = [e for e in events if "dropped" in e and e.get("server") == "s1"]
    assert event["dropped"] == ["w:score", "w:top", "w:rank"] and gw.dropped == 3
    assert formatEvent(event) == "3 message(s) queued for server s1 dropped: w:score, w:top, w:rank"


def test_the_queue_of_an_unlinked_peer_is_bounded_and_overflow_is_reported(tmp_path: Path) -> None:
    gw, router, clock, links = gateway(tmp_path, queue=2, startup=[["=lua+a"], ["=lua+a"]])
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    assert send(router, "w:x")[0] and send(router, "w:x")[0]
    ok, reason = send(router, "w:x")
    assert ok is False and "queue is full" in str(reason)
    clock.advance(0)
    pushed = [f for g, f in links.frames if g == 1 and f[0] == "croutes"]
    assert pushed and pushed[-1][1][5] == ["s1"]  # the other processes learn it is full
    view = RemoteView(RecordingLinks())
    view.process_frame(0, pushed[-1])
    assert view.send("s1", ["m"]) == (
        False,
        "server 's1' takes nothing more now: its queue is full (not linked, or not reading)",
    )


def test_overload_is_announced_and_logged_then_recovery(tmp_path: Path) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        gw, router, clock, _ = gateway(tmp_path)
        link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
        router.frame_received(1, ["m", 0, "x", pack_py(()), ["s1", 0, "w", 0], None])
        clock.advance(1.0)  # the message waited a second
        gw._tick()
        assert link.frames("hello")[-1][4] is True
        router.run_queue()
        gw._tick()
        assert link.frames("hello")[-1][4] is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    formats = [e.get("log_format", "") for e in events]
    assert any(f.startswith("overloaded") for f in formats)
    assert any(f.startswith("recovered from overload") for f in formats)


def test_an_overloaded_peer_gets_no_routed_work(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    gw.peer_message("s1", ["hello", "127.0.0.1:7002", {"w": [0]}, 1.2, True])
    assert send(router, "w:x")[0] is False


def test_server_target_is_routed_on_that_server_and_dropped_when_too_late(tmp_path: Path) -> None:
    gw, router, clock, _ = gateway(tmp_path)
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    assert send(router, ["w:x=r", "127.0.0.1:7002", 50], 1) == (True, None)
    frame = link.frames("s")[0]
    assert frame[1:4] == ["w", "x", False] and frame[6] == "^me/0/r" and frame[7] == 50
    assert send(router, ["x", "127.0.0.1:9"], 1)[0] is False
    # the receiving side: in time it is delivered, too late (own delay ≥ ttl) it is dropped
    gw.peer_message("s1", ["s", "a", "in-time", False, pack_py(()), ["s1", 0, "w", 0], None, 50])
    router.delay = 0.2
    gw.peer_message("s1", ["s", "a", "late", False, pack_py(()), ["s1", 0, "w", 0], None, 50])
    clock.advance(0)
    assert [m.msgid for m in router.local[0].got] == ["in-time"]  # type: ignore[attr-defined]


def test_a_queued_server_target_past_its_timeout_is_not_sent(tmp_path: Path) -> None:
    gw, router, clock, _ = gateway(tmp_path)
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    assert send(router, ["w:x", "127.0.0.1:7002", 50], 1)[0]
    assert send(router, ["w:y", "127.0.0.1:7002"], 1)[0]
    clock.advance(0.1)
    again = FakeLink()
    gw.peers._flush("s1", again)  # type: ignore[arg-type]
    assert [f[2] for f in again.frames("s")] == ["y"]


def test_other_processes_relay_through_the_gateway(tmp_path: Path) -> None:
    gw, router, clock, links = gateway(tmp_path, startup=[["=lua+a"], ["=lua+a"]])
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    clock.advance(0)
    routes = [f for g, f in links.frames if g == 1 and f[0] == "croutes"][-1]
    view_links = RecordingLinks()
    view = RemoteView(view_links)
    view.process_frame(0, routes)
    sibling = Router("me", 1, [("a", 0), ("a", 1)], clock, clock.seconds)
    sibling.remote = view
    assert sibling.send(Sender("me", 1, "a", 1), parse_target("+w:x"), pack_py((1,))) == (True, None)
    ((group, frame),) = view_links.frames
    assert group == 0 and frame[0] == "cx" and frame[1] == "s1"
    assert type(frame[2]) is bytes  # packed in the sending process ...
    router.frame_received(1, frame)
    assert link.packed == [frame[2]]  # ... and written to the peer by the gateway as it is
    assert link.frames("m")[0][1:4] == [0, "x", pack_py((1,))]
    ok, reason = view.send("nobody", ["m"])
    assert ok is False and "not in the cluster" in str(reason)


def test_a_relayed_frame_queued_for_a_gone_peer_is_routed_again_or_named_when_dropped(tmp_path: Path) -> None:
    """Frames other processes relay wait packed in the peer's queue; when the peer is gone for
    good they are read once more to go to another replica or to be named in the drop log."""
    gw, router, clock, links = gateway(tmp_path, startup=[["=lua+a"], ["=lua+a"]])
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    clock.advance(0)  # the routes reach the other process
    view_links = RecordingLinks()
    view = RemoteView(view_links)
    view.process_frame(0, [f for g, f in links.frames if g == 1 and f[0] == "croutes"][-1])
    sibling = Router("me", 1, [("a", 0), ("a", 1)], clock, clock.seconds)
    sibling.remote = view
    assert sibling.send(Sender("me", 1, "a", 1), parse_target("w:score"), pack_py((1,))) == (True, None)
    router.frame_received(1, view_links.frames[0][1])
    assert type(gw.peers.queues["s1"][0].frame) is bytes
    with capturedLogs() as events:
        for _ in range(4):
            clock.advance(0.5)
            gw._tick()
    (event,) = [e for e in events if "dropped" in e and e.get("server") == "s1"]
    assert event["dropped"] == ["w:score"] and gw.dropped == 1


def test_a_restarted_peer_replaces_its_old_id(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    link_peer(gw, "old", "127.0.0.1:7002", {"w": [0]})
    link_peer(gw, "new", "127.0.0.1:7002", {"w": [0]})
    assert set(gw.directory.peers) == {"new"}
    assert send(router, "^old/0/r")[0] is False


def test_a_backup_peer_is_used_only_for_stage_ids_nobody_else_has(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    backup = link_peer(gw, "b", "127.0.0.1:7009", {"w": [0], "a": [0]})
    assert gw.directory.peers["b"].backup
    assert send(router, "w:x")[0]
    assert send(router, "a:x")[0]
    assert [f[2] for f in backup.frames("m")] == ["x"]  # only w: a has a replica here
    assert len(router._queue) == 1


def test_unknown_frames_from_a_peer_are_ignored(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    gw.peer_message("s1", ["bogus"])
    assert send(router, "w:x")[0]


def test_the_overload_gate_reopens_within_one_heart_beat_once_drained_without_traffic(tmp_path: Path) -> None:
    """A burst's last delay reading must not keep the server out of routing: nothing would be
    routed to it to refresh the reading."""
    gw, router, clock, _ = gateway(tmp_path)
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    for n in range(2000):  # a burst relayed by another process, queued frame by frame
        router.frame_received(1, ["m", 0, "burst", pack_py((n,)), ["s1", 0, "w", 0], None])
    clock.advance(2.0)  # it waited two seconds before this process got to it
    gw._tick()  # still queued: overloaded on the age of the oldest message
    assert link.frames("hello")[-1][3:5] == [2.0, True]
    router.run_queue()
    assert not router._queue and router.delay > 0.9  # the last reading of the drain
    clock.advance(gw.interval)  # one heart-beat later, no message in between
    gw._tick()
    assert link.frames("hello")[-1][3:5] == [0.0, False]


def test_a_peer_that_recovers_is_routed_to_again_and_sends_meanwhile_say_why(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    gw.peer_message("s1", ["hello", "127.0.0.1:7002", {"w": [0]}, 1.2, True])
    assert send(router, "+w:x") == (False, "no replica of 'w' available: server s1 overloaded")
    assert send(router, "w:x") == (False, "no replica of 'w' available: server s1 overloaded")
    gw.peer_message("s1", ["hello", "127.0.0.1:7002", {"w": [0]}, 0.0, False])
    assert send(router, "+w:x") == (True, None)
    assert [f[2] for f in link.frames("m")] == ["x"]


def test_other_processes_report_a_drained_queue_as_no_delay(tmp_path: Path) -> None:
    from stagetx.child.links import ProcessLinks

    clock = Clock()
    router = Router("me", 1, [("a", 0), ("b", 1)], clock, clock.seconds)
    router.attach(RecordingStage(1, "b", server="me"))
    links = ProcessLinks(router, str(tmp_path), 2, b"secret", clock, 1 << 20)
    out = FakeLink()
    links._out[0] = out  # type: ignore[assignment]
    router.delay = 1.5  # a burst's last reading
    links._tell_delay()
    assert out.frames("delay") == [["delay", 0.0]]


def test_a_gone_peer_s_queue_with_nowhere_to_go_is_dropped_whole_and_logged(tmp_path: Path) -> None:
    """Its messages are routed again; with this server's replica's process restarting there is no
    replica to take them: each fails with a reason and the count is logged (no heart-beat crash)."""
    from twisted.logger import globalLogPublisher

    gw, router, clock, links = gateway(tmp_path, startup=[["=lua+a"], ["=lua+w"]])
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    for _ in range(3):
        assert gw.send("s1", ["m", 0, "x", pack_py(()), ["me", 0, "a", 0], None], "w")[0]
    links.down.add(1)  # the process of this server's own replica of w restarts
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock.advance(2.0)
        gw._tick()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert "s1" not in gw.directory.peers and not gw.peers.queues
    assert [e["n"] for e in events if e.get("log_format", "").startswith("{n} message(s) queued")] == [3]
    assert not [e for e in events if e.get("log_failure")]


def test_a_message_too_large_for_a_cluster_link_is_refused_with_a_reason(tmp_path: Path) -> None:
    gw, router, _, _ = gateway(tmp_path)
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    gw.peers.max_frame = 4096
    ok, reason = send(router, "+w:x", "y" * 5000)
    assert ok is False and "exceeds the frame limit" in str(reason)
    assert not gw.peers.queues.get("s1")


def test_a_peer_silent_past_sync_loses_routing_and_is_routed_to_again_when_heard_on_its_link(
    tmp_path: Path,
) -> None:
    """A partition: the TCP link does not drop, the peer just goes silent; when the cut heals its
    heart-beats arrive on the same link and routing resumes without a restart."""
    gw, router, clock, _ = gateway(tmp_path)
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    clock.advance(1.6)  # past sync (1.5 s) without a word
    gw._tick()
    assert "s1" not in gw.directory.peers
    assert send(router, "+w:x") == (False, "no replica of 'w' on other servers")
    gw.peer_message("s1", ["hello", "127.0.0.1:7002", {"w": [0]}, 0.0, False])
    assert send(router, "+w:x") == (True, None)
    assert [f[2] for f in link.frames("m")] == ["x"]


def test_dns_answers_dial_new_and_forgotten_addresses_and_stop_dialing_gone_ones(tmp_path: Path) -> None:
    gw, _, _, _ = gateway(tmp_path)
    gw.dns_answered({"127.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"}, set())
    assert gw.peers.dialing() == {"10.0.0.2:7001", "10.0.0.3:7001"}  # never itself
    gw.peers.undial("10.0.0.3:7001")  # forgotten after a silence; DNS still names it
    gw.dns_answered({"127.0.0.1:7001", "10.0.0.3:7001"}, {"10.0.0.2:7001"})
    assert gw.peers.dialing() == {"10.0.0.3:7001"}


def test_a_discovered_address_that_never_links_is_not_dialed_once_no_longer_announced(tmp_path: Path) -> None:
    gw, _, clock, _ = gateway(tmp_path)  # sync 1.5 s
    with capturedLogs() as events:
        gw.discovered("ghost", "10.0.0.9:7001")
        gw.discovered("s1", "127.0.0.1:7002")
        link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
        gw.peer_linked("s1", FakeLink(), "127.0.0.1:7002")  # our dial linked too
        for _ in range(4):  # announced every 0.5 s: kept
            clock.advance(0.5)
            gw.discovered("ghost", "10.0.0.9:7001")
            gw.peer_message("s1", ["hello", "127.0.0.1:7002", {"w": [0]}, 0.0, False])
            gw._tick()
        assert gw.peers.dialing() == {"10.0.0.9:7001", "127.0.0.1:7002"}
        for _ in range(4):  # silent past sync: forgotten; the linked peer's address is kept
            clock.advance(0.5)
            gw.peer_message("s1", ["hello", "127.0.0.1:7002", {"w": [0]}, 0.0, False])
            gw._tick()
    assert gw.peers.dialing() == {"127.0.0.1:7002"}
    lines = [formatEvent(e) for e in events]
    assert any("10.0.0.9:7001 of server ghost never linked" in line for line in lines)
    gw.discovered("ghost", "10.0.0.9:7001")  # announced again: dialed again
    assert "10.0.0.9:7001" in gw.peers.dialing()


def test_a_linked_server_is_a_steady_route_from_every_process(tmp_path: Path) -> None:
    """The gateway: a server whose link is up takes what is written to it this turn; another
    process: a known server with room, while its link to the gateway is up (and within both
    links' frame limits)."""
    gw, router, clock, links = gateway(tmp_path, startup=[["=lua+a"], ["=lua+a"]])
    link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    clock.advance(0)
    assert gw.steady_room("s1") > 0 and gw.steady_room("nobody") == 0

    class Connected(RecordingLinks):
        room = 1 << 40

        def steady_room(self, group: int) -> int:
            return 0 if group in self.down else self.room

    view_links = Connected()
    view = RemoteView(view_links)
    view.process_frame(0, [f for g, f in links.frames if g == 1 and f[0] == "croutes"][-1])
    assert 0 < view.steady_room("s1") <= gw.steady_room("s1")
    assert view.steady_room("nobody") == 0
    view_links.down.add(0)
    assert view.steady_room("s1") == 0
    del gw.peers.links["s1"]
    gw.peer_unlinked("s1")
    assert gw.steady_room("s1") == 0


def test_this_server_s_senders_travel_as_instance_numbers_the_hello_explains(tmp_path: Path) -> None:
    """A frame to another server names a sender of this server by its instance number; the
    receiver makes the ``Sender`` from the hello, which a link carries before anything else. A
    number no hello explained is refused with a log line, never guessed."""
    gw, router, clock, links = gateway(tmp_path, startup=[["=lua+a"], ["=lua+w"]])
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    hello = link.frames("hello")[0]
    assert hello[5] == [0, 1]  # the process of each instance of this server
    own = router.sender_of(0)
    assert router.send(own, parse_target("+w:x"), pack_py((1,))) == (True, None)
    assert link.frames("m")[-1][4] == 0

    (tmp_path / "other").mkdir()
    other, _, _, _ = gateway(tmp_path / "other")  # another server, hearing from server "s9"
    other.peer_message("s9", ["hello", "127.0.0.1:7009", {"a": [0], "w": [1]}, 0.0, False, [0, 1]])
    other.peer_message("s9", ["m", 0, "hi", pack_py((1,)), 1, None])
    other.router.run_queue()
    (got,) = other.router.local[0].got  # type: ignore[attr-defined]
    assert got.sender == Sender("s9", 1, "w", 1)
    with capturedLogs() as events:
        other.peer_message("s9", ["m", 0, "bad", pack_py((1,)), 7, None])
        other.peer_message("stranger", ["m", 0, "bad", pack_py((1,)), 0, None])
    assert sum("unknown sender" in formatEvent(e) for e in events) == 2


def _run(*messages: tuple[str, Any, str | None]) -> bytes:
    """A run's body (``stagetx.message.Run``): per message its id, payload and reply."""
    return b"".join(pack_message(m) + pack_message(pack_py((v,))) + pack_message(r) for m, v, r in messages)


def test_a_run_from_a_peer_reaches_the_local_stage_or_the_process_that_has_it(tmp_path: Path) -> None:
    gw, router, _, links = gateway(tmp_path, startup=[["=lua+a"], ["=lua+w"]])
    router.links = links
    gw.peer_message("s9", ["hello", "127.0.0.1:7009", {"b": [0]}, 0.0, False, [0]])
    body = _run(("x", 1, None), ("y", 2, "^s9/0/back"))
    gw.peer_message("s9", ["r", 0, 0, 2, body])  # to stage a, here: its messages one by one
    router.run_queue()
    got = router.local[0].got  # type: ignore[attr-defined]
    assert [(m.msgid, m.values, m.reply, m.sender) for m in got] == [
        ("x", (1,), None, Sender("s9", 0, "b", 0)),
        ("y", (2,), "^s9/0/back", Sender("s9", 0, "b", 0)),
    ]
    gw.peer_message("s9", ["r", 1, 0, 2, body])  # to stage w, in process 2: passed on as a run
    assert [f for g, f in links.frames if g == 1 and f[0] == "r"] == [["r", 1, ["s9", 0, "b", 0], 2, body]]
    with capturedLogs() as events:
        gw.peer_message("s9", ["r", 0, 5, 1, _run(("z", 3, None))])
    assert any("unknown sender" in formatEvent(e) for e in events)


def test_a_queued_run_for_a_gone_peer_goes_to_another_replica_message_by_message(tmp_path: Path) -> None:
    gw, router, clock, other = s1_gone(tmp_path, 3)
    entry = pack_message(["r", 0, 0, 2, _run(("x", 1, None), ("y", 2, None))])
    assert router.send_far_run("s1", entry, "w") == (True, None)  # queued for s1
    outlive(gw, clock, "s2", "127.0.0.1:7003", {"w": [3]})
    assert "s1" not in gw.directory.peers
    assert [(f[1], f[2]) for f in other.frames("m")] == [(3, "x"), (3, "y")]


def test_frames_relayed_to_a_restarted_gateway_wait_until_their_server_is_linked_again(tmp_path: Path) -> None:
    """What the other processes sent through the gateway while its process restarted reaches it
    before its peers are linked again; it used to be logged as not relayed and lost."""
    gw, router, clock, _ = gateway(tmp_path, startup=[["=lua+a"], ["=lua+a"]])
    gw._warm_until = clock.seconds() + 1.5  # as startService sets it: sync after the start
    packed = pack_message(["m", 0, "x", pack_py((1,)), ["me", 1, "a", 1], None])
    router.frame_received(1, ["cx", "s1", packed, "w", None])
    router.frame_received(1, ["cx", "s9", packed, "w", None])  # a server that does not come back
    link = link_peer(gw, "s1", "127.0.0.1:7002", {"w": [0]})
    assert link.packed == [packed]  # passed on as it came, once s1 said hello
    clock.advance(2)
    gw._tick()  # past the warm-up: s9's message goes to another replica of w
    assert [f[2] for f in link.frames("m")] == ["x", "x"]
    router.frame_received(1, ["cx", "s9", packed, None, None])
    assert len(link.frames("m")) == 2  # no longer held: unknown, and nowhere else to go
