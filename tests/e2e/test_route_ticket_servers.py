"""Route and ticket stages with subscribers and requesters on another server (real ``twistd`` servers).

Server A hosts ``=ticket+ticket`` in its gateway process (group 0), ``=route+route`` in a
second process (so its frames to and from B take the gateway hop), and a publisher/requester
``pa`` and a subscriber ``sa`` in processes of their own. Server B, linked to A
through ``#cluster`` on loopback, hosts a subscriber ``sb`` (in its gateway process) and a
requester ``rb`` (in another process, so its frames also cross B's gateway hop). The Lua stages
log what they see; the tests read both servers' output. Every wait is bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cluster_e2e import free_port
from tests.support import ServerProcess, write_app

SECRET = "route-ticket-cluster-secret"
WAIT = 40.0
BURST = 100  # ticket requests per requester

# A subscriber re-registers every 200 ms (keep-alive and registration in one, so it survives a
# restart of the route stage) and tells pa it is registered; it takes offers naming it.
SUBSCRIBER = """
local me = process["$NAME"]
stage.waitfor("route:@", function(key, token)
  if key:find("?" .. me, 1, true) then stage.signal(nil, token) end
end)
stage.waitfor("on_chat", function(key, v)
  log4cxx.info("GOT", me, key, v)
  return "by-" .. me
end)
stage.addtask(0, function()
  if stage.signal("route:@", {chat = "on_chat"}) then stage.signal("pa:ready", me) end
  return 200
end)
"""

# Shared by pa (on A) and rb (on B): a ticket burst whose callbacks log their interval.
WORKER = """
local me = process["$NAME"]
stage.waitfor("fb", function(req, r) log4cxx.info("FB", me, tostring(r)) end)
stage.waitfor("answer", function(...) log4cxx.info("ANSWER", me, ...) end)
stage.waitfor("failed", function(key, v) log4cxx.info("FAILED", me, key, v) end)
stage.waitfor("work", function(i)
  local hold = _WAITFOR[2]
  log4cxx.info("START", me, i, string.format("%.6f", process.tick), tostring(_TICKET))
  stage.addtask(3, function()
    log4cxx.info("END", me, i, string.format("%.6f", process.tick))
    stage.signal(hold, 0)  -- give the slot back at once
  end)
end)
function burst()
  for i = 1, BURST do stage.signal("ticket:db=work?fb", i) end
end
"""

PUBLISHER = """
local ready, count, started = {}, 0, false
stage.waitfor("ready", function(who)
  if ready[who] then return end
  ready[who], count = true, count + 1
  if count < 3 or started then return end
  started = true
  stage.addtask(300, function()
    stage.signal("route:chat?sb=answer!failed", "to-sb")
    stage.signal("route:*chat=answer", "to-all")
    stage.signal("route:chat?nobody!failed", "to-none")
    stage.signal("rb:go")
    burst()
    return 0
  end)
end)
"""

REQUESTER = """
stage.waitfor("fbx", function(req, r) log4cxx.info("FBX", req, tostring(r)) end)
stage.waitfor("ticket:@", function(what, t)
  for id, callback in pairs(t) do log4cxx.info("NOTICE", what, id, tostring(callback)) end
end)
stage.waitfor("long", function()
  log4cxx.info("LONG", string.format("%.6f", process.tick), tostring(_TICKET))
  stage.signal(nil, 2000)  -- hold the one "ext" slot 2 s instead of hold_ms (1 s)
end)
stage.waitfor("after", function()  -- never gives its slot back: its hold runs out
  log4cxx.info("AFTER", string.format("%.6f", process.tick), tostring(_TICKET))
end)
stage.waitfor("via_addr", function()
  log4cxx.info("VIA", tostring(_TICKET))
  return 0  -- a number returned moves the end of the hold too: released now
end)
stage.waitfor("go", function()
  log4cxx.info("GO", tostring(_TICKET))  -- not a ticket callback: nil
  stage.signal("ticket:ext=long?fbx")
  stage.signal("ticket:ext=after?fbx")
  stage.signal({"ticket:one=via_addr?fbx", "ADDR_A"})  -- the ticket stage of the server at ADDR_A
  stage.signal("route:chat?sa=answer!failed", "from-b")
  burst()
end)
stage.addtask(0, function()
  if stage.signal("pa:ready", "rb") then return 200 end
  return 100
end)
"""


def _lua(name: str, script: str) -> dict[str, Any]:
    return {"NAME": name, f"=lua+{name}": script}


def _app(root: Path, name: str, config: dict[str, Any], scripts: dict[str, str]) -> Path:
    # sync_ms long enough that a stall of a busy machine never drops a live server's routing
    full = {"#secret": SECRET, "#router": [2500, 2000], "=lua": {"%package": ["[0]lua"]}, **config}
    return write_app(root / name, full, scripts)


def _apps(root: Path, extra_b: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A and B as described in the module doc; ``extra_b``: more Lua stages on B (name: script)."""
    extra_b = extra_b or {}
    port_a, port_b = free_port(), free_port()
    worker = WORKER.replace("BURST", str(BURST))
    path_a = _app(
        root,
        "a",
        {
            "#cluster": [port_a],
            "#startup": [["=ticket+ticket"], ["=route+route"], ["=lua+pa"], ["=lua+sa"]],
            "=route+route": {"offer_ms": 5000},  # rounds outlast a stall of a busy machine
            "=ticket+ticket": [1000, {"db": 2, "ext": 1, "one": 1}],
            "=lua+pa": _lua("pa", "pa"),
            "=lua+sa": _lua("sa", "sub"),
        },
        {"pa": worker + PUBLISHER, "sub": SUBSCRIBER},
    )
    path_b = _app(
        root,
        "b",
        {
            "#cluster": [port_b, f"127.0.0.1:{port_a}"],
            "#startup": [["=lua+sb"], ["=lua+rb", *(f"=lua+{n}" for n in extra_b)]],
            "=lua+sb": _lua("sb", "sub"),
            "=lua+rb": _lua("rb", "rb"),
            **{f"=lua+{n}": _lua(n, n) for n in extra_b},
        },
        {"rb": worker + REQUESTER.replace("ADDR_A", f"127.0.0.1:{port_a}"), "sub": SUBSCRIBER, **extra_b},
    )
    return path_a, path_b


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path_a, path_b = _apps(tmp_path_factory.mktemp("route_ticket_servers"))
    with ServerProcess(path_a) as a, ServerProcess(path_b) as b:

        def ends(server: ServerProcess, stage: str) -> int:
            return len(server.logged(stage, "END"))

        a.wait_for(lambda: ends(a, "pa") >= BURST, WAIT, "pa's ticket burst")
        b.wait_for(lambda: ends(b, "rb") >= BURST, WAIT, "rb's ticket burst")
        b.wait_for(lambda: len(b.logged("rb", "AFTER")) >= 1, WAIT, "the extended ticket's successor")
        b.wait_for(lambda: len(b.logged("rb", "VIA")) >= 1, WAIT, "the ticket asked for by server address")
        a.wait_for(lambda: len(a.logged("pa", "ANSWER")) >= 3, WAIT, "answers to pa's publishes")
        a.wait_for(lambda: len(a.logged("pa", "FAILED")) >= 1, WAIT, "pa's fail callback")
        b.wait_for(lambda: len(b.logged("rb", "ANSWER")) >= 1, WAIT, "the answer to rb's publish")
        yield a, b


# -- route ----------------------------------------------------------------------------------------


def test_a_publish_on_a_reaches_the_accepting_subscriber_on_b_and_its_answer_comes_back(pair: Any) -> None:
    a, b = pair
    assert ["sb", "route:chat?sb=answer!failed", "to-sb"] in b.logged("sb", "GOT")
    assert ["pa", "by-sb"] in a.logged("pa", "ANSWER")
    # one receiver: sa was offered it too, declined, and got nothing
    assert not [g for g in a.logged("sa", "GOT") if g[2] == "to-sb"]


def test_a_broadcast_reaches_subscribers_on_both_servers_once_each(pair: Any) -> None:
    a, b = pair
    assert [g for g in a.logged("sa", "GOT") if g[2] == "to-all"] == [["sa", "route:*chat=answer", "to-all"]]
    assert [g for g in b.logged("sb", "GOT") if g[2] == "to-all"] == [["sb", "route:*chat=answer", "to-all"]]
    assert a.logged("pa", "ANSWER").count(["pa", "by-sa"]) >= 1
    assert a.logged("pa", "ANSWER").count(["pa", "by-sb"]) == 2  # the offer round's and the broadcast's


def test_nobody_accepting_calls_the_publishers_fail_callback(pair: Any) -> None:
    a, b = pair
    assert a.logged("pa", "FAILED") == [["pa", "route:chat?nobody!failed", "to-none"]]
    assert not [g for g in b.logged("sb", "GOT") if g[2] == "to-none"]


def test_a_publish_from_b_reaches_a_subscriber_on_a_and_the_answer_goes_back_to_b(pair: Any) -> None:
    a, b = pair
    assert ["sa", "route:chat?sa=answer!failed", "from-b"] in a.logged("sa", "GOT")
    assert b.logged("rb", "ANSWER") == [["rb", "by-sa"]]
    assert b.logged("rb", "FAILED") == []


# -- ticket ---------------------------------------------------------------------------------------


def _intervals(server: ServerProcess, stage: str) -> tuple[dict[int, float], dict[int, float]]:
    starts = {int(r[1]): float(r[2]) for r in server.logged(stage, "START")}
    ends = {int(r[1]): float(r[2]) for r in server.logged(stage, "END")}
    return starts, ends


def test_holders_from_both_servers_never_exceed_the_categorys_limit(pair: Any) -> None:
    a, b = pair
    events: list[tuple[float, int]] = []
    for server, stage in ((a, "pa"), (b, "rb")):
        starts, ends = _intervals(server, stage)
        assert len(starts) == len(ends) == BURST
        events += [(t, 1) for t in starts.values()] + [(t, -1) for t in ends.values()]
    # monotonic clocks of one machine are comparable across processes; an end before a start
    level = peak = 0
    for _, step in sorted(events):
        level += step
        peak = max(peak, level)
    assert peak == 2  # both slots were used, never a third


def test_grants_are_first_come_first_served_for_each_requester(pair: Any) -> None:
    a, b = pair
    for server, stage in ((a, "pa"), (b, "rb")):
        starts, _ = _intervals(server, stage)
        assert [i for _, i in sorted((t, i) for i, t in starts.items())] == list(range(1, BURST + 1))


def test_feedback_gives_the_ticket_id_then_true_and_the_callback_sees_it_as_ticket(pair: Any) -> None:
    a, b = pair
    for server, stage in ((a, "pa"), (b, "rb")):
        results = [r[1] for r in server.logged(stage, "FB")]
        ids = [r for r in results if r.startswith("@")]
        assert len(ids) == BURST and results.count("true") == BURST and len(results) == 2 * BURST
        tickets = [r[3] for r in server.logged(stage, "START")]
        assert sorted(tickets) == sorted(ids)  # _TICKET inside each callback, on A and on B


def test_a_callback_on_b_extends_its_hold_and_sees_its_ticket(pair: Any) -> None:
    _, b = pair
    feedback = b.logged("rb", "FBX")
    long_id = next(r[1] for r in feedback if r[0] == "ticket:ext=long?fbx" and r[1].startswith("@"))
    after_id = next(r[1] for r in feedback if r[0] == "ticket:ext=after?fbx" and r[1].startswith("@"))
    [(long_at, long_ticket)] = b.logged("rb", "LONG")
    [(after_at, after_ticket)] = b.logged("rb", "AFTER")
    assert (long_ticket, after_ticket) == (long_id, after_id)
    # the one slot was held 2 s (signal(nil, 2000) from B), not hold_ms = 1 s
    assert float(after_at) - float(long_at) >= 1.9
    assert b.logged("rb", "GO") == [["nil"]]


def test_holds_that_run_out_on_a_are_told_to_their_holder_on_b(pair: Any) -> None:
    """``("cancel", {ticket_id = callback_id})`` at B's ``waitfor("ticket:@")`` for the extended
    and the never-given-back ticket; none for tickets given back (``signal(hold, 0)``, a returned 0)."""
    _, b = pair
    ids = {r[0]: r[1] for r in b.logged("rb", "FBX") if r[1].startswith("@")}
    long_id, after_id = ids["ticket:ext=long?fbx"], ids["ticket:ext=after?fbx"]
    b.wait_for(lambda: len(b.logged("rb", "NOTICE")) >= 2, WAIT, "the notices of the ext tickets")
    notices = {n[1]: n for n in b.logged("rb", "NOTICE")}
    assert notices[long_id] == ["cancel", long_id, "long"]
    assert notices[after_id] == ["cancel", after_id, "after"]
    assert ids["ticket:one=via_addr?fbx"] not in notices
    assert not set(notices) & {r[3] for r in b.logged("rb", "START")}  # the burst gave its slots back


def test_a_request_to_the_ticket_stage_of_a_server_given_by_address(pair: Any) -> None:
    _, b = pair
    feedback = [r[1] for r in b.logged("rb", "FBX") if r[0] == "ticket:one=via_addr?fbx"]
    assert len(feedback) == 2 and feedback[0].startswith("@") and feedback[1] == "true"
    assert b.logged("rb", "VIA") == [[feedback[0]]]


# -- the server holding the route and ticket stages goes down and comes back ----------------------

PROBE = """
local i = 0
stage.waitfor("probed", function(n) log4cxx.info("PROBED", n, tostring(_TICKET)) end)
stage.addtask(100, function()
  i = i + 1
  local ok, why = stage.signal("ticket:db=probed", i)
  log4cxx.info("TRY", i, tostring(ok), tostring(why))
  return 100
end)
"""


def test_requests_fail_while_the_ticket_server_is_down_and_work_again_after_its_restart(tmp_path: Path) -> None:
    path_a, path_b = _apps(tmp_path, {"probe": PROBE})

    def probed() -> list[int]:
        return [int(r[0]) for r in b.logged("probe", "PROBED")]

    def tries() -> list[list[str]]:
        return b.logged("probe", "TRY")

    with ServerProcess(path_b) as b:
        with ServerProcess(path_a) as a:
            b.wait_for(lambda: len(probed()) >= 3, WAIT, "tickets for B before the stop")
            a.wait_for(lambda: ["pa", "by-sb"] in a.logged("pa", "ANSWER"), WAIT, "a route delivery to B")
        stopped = len(tries())
        # within sync_ms the requests wait in the gone server's queue; then its routing is removed
        b.wait_for(
            lambda: ["false", "unknown stage 'ticket'"] in [r[1:] for r in tries()[stopped:]],
            WAIT,
            "requests refused once A's routing is removed",
        )
        refused = len(tries())
        with ServerProcess(path_a) as a:
            b.wait_for(lambda: any(n > refused for n in probed()), WAIT, "tickets again after A's restart")
            # subscribers are back through their next route:@ (registration sent as keep-alive)
            a.wait_for(lambda: ["pa", "by-sb"] in a.logged("pa", "ANSWER"), WAIT, "a route delivery after the restart")
            a.wait_for(lambda: len(a.logged("pa", "FAILED")) >= 1, WAIT, "fail callbacks after the restart")
            assert a.logged("pa", "FAILED") == [["pa", "route:chat?nobody!failed", "to-none"]]
    lost = [int(r[0]) for r in tries()[stopped:refused] if r[1] == "true"]
    # what waited for the old server (a new server id after its restart) was dropped, not granted
    assert not set(lost) & set(probed())
    assert any("routing removed" in line for line in b.lines)
