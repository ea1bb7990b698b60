"""Servers linked into a cluster: real ``twistd`` servers on loopback.

Each scenario starts its servers on free loopback ports; the Lua stages log what they observe and
the tests read the servers' output.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from stagetx.cluster.discovery import encode_announcement
from tests.e2e.cluster_scripts import ASKER, COUNTER, WHERE, burst
from tests.support import ServerProcess, free_port, write_app

SECRET = "cluster-test-secret"


def app(root: Path, name: str, config: dict[str, Any], scripts: dict[str, str]) -> Path:
    lua = {f"=lua+{sid}": sid for sid in scripts}
    full = {"#secret": SECRET, "=lua": {"%package": ["[0]lua"], **lua}, **config}
    return write_app(root / name, full, scripts)


# -- static peering: request/reply, functions, scopes, {id, addr}, a second process -------------

B = """
stage.waitfor("who", function() return "who", process.stage end)
stage.waitfor("echo", function(f, x) return "echo", f(x), type(os) end)
stage.waitfor("bcast", function(tok) log4cxx.info("bcast", tok, process.stage) end)
stage.waitfor("later", function(v)
    local r = _WAITFOR[2]
    stage.addtask(20, function() stage.signal(r, "later", v) end)
end)
stage.waitfor("direct", function(v) log4cxx.info("direct", v, _WAITFOR[1].stage); return "direct", v end)
"""

A = """
local function log(...) log4cxx.info(...) end
stage.waitfor("reply", function(...) log("reply", ...) end)
stage.addtask(50, function()
    if not stage.signal("+b:who=reply") then return 50 end
    for _ = 1, 5 do stage.signal("+b:who=reply") end
    local k = 20
    stage.signal("b:echo=reply", function(x) return x * 2 + (k or 0) end, 21)
    stage.signal("*b:bcast", "tok")
    stage.signal("b:later=reply", 7)
    log("local-only", stage.signal("=b:who"))
    log("nobody", stage.signal("+zzz:x"))
    log("toserver", stage.signal({"b:direct=reply", "127.0.0.1:%(port_b)d"}, "hi"))
    log("noserver", stage.signal({"b:direct", "127.0.0.1:1"}, "hi"))
    log("oldreply", stage.signal("^0123abcd/0/x", 1))
    return 0
end)
"""

C = """
stage.waitfor("reply", function(...) log4cxx.info("reply", ...) end)
stage.addtask(50, function()
    if not stage.signal("b:who=reply") then return 50 end
    return 0
end)
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("cluster")
    port_a, port_b = free_port(), free_port()
    path_b = app(root, "b", {"#cluster": [port_b], "#startup": [["=lua+b"], ["=lua+b"]]}, {"b": B})
    path_a = app(
        root,
        "a",
        {"#cluster": [port_a, f"127.0.0.1:{port_b}"], "#startup": [["=lua+a"], ["=lua+c"]]},
        {"a": A % {"port_b": port_b}, "c": C},
    )
    with ServerProcess(path_b) as b, ServerProcess(path_a) as a:
        a.wait_for(lambda: len(a.logged("a", "reply")) >= 9, 30, "replies from the other server")
        a.wait_for(lambda: len(a.logged("c", "reply")) >= 1, 30, "a reply to the second process")
        b.wait_for(lambda: len(b.logged("b", "bcast")) >= 2, 30, "broadcast on the other server")
        yield a, b


def test_plus_scope_goes_round_robin_over_the_other_servers_replicas(pair: Any) -> None:
    a, _ = pair
    who = [r[1] for r in a.logged("a", "reply") if r[0] == "who"]
    assert len(who) == 6
    assert sorted(set(who)) == ["1", "2"]


def test_a_function_runs_on_another_server_without_its_upvalues(pair: Any) -> None:
    a, _ = pair
    assert ["echo", "42", "table"] in a.logged("a", "reply")


def test_broadcast_reaches_each_replica_on_the_other_server_once(pair: Any) -> None:
    _, b = pair
    assert sorted(r[1] for r in b.logged("b", "bcast")) == ["1", "2"]


def test_a_saved_reply_address_answers_across_servers(pair: Any) -> None:
    a, _ = pair
    a.wait_for(lambda: ["later", "7"] in a.logged("a", "reply"), 10, "the later reply")


def test_server_target_by_address(pair: Any) -> None:
    a, b = pair
    assert a.logged("a", "toserver") == [["true"]]
    b.wait_for(lambda: ["hi", "a"] in b.logged("b", "direct"), 10, "the direct message")
    a.wait_for(lambda: ["direct", "hi"] in a.logged("a", "reply"), 10, "the direct reply")
    assert a.logged("a", "noserver")[0][0] == "false"


def test_undeliverable_remote_messages_return_false_and_a_reason(pair: Any) -> None:
    a, _ = pair
    assert a.logged("a", "local-only")[0][0] == "false"
    assert a.logged("a", "nobody") == [["false", "no replica of 'zzz' on other servers"]]
    old = a.logged("a", "oldreply")[0]
    assert old[0] == "false" and "0123abcd" in old[1]


def test_a_second_process_routes_to_other_servers_through_the_gateway(pair: Any) -> None:
    a, _ = pair
    assert a.logged("c", "reply")[0][0] == "who"


# -- backups, a peer killed and restarted ---------------------------------------------------------


def test_backup_takes_over_while_the_peer_is_down_and_routing_returns_after_its_restart(tmp_path: Path) -> None:
    port_p, port_k, port_s = free_port(), free_port(), free_port()
    router = {"#router": [2000, 2000]}  # no routing flaps from a busy machine's stalls
    path_p = app(tmp_path, "p", {**router, "name": "P", "#cluster": [port_p], "#startup": [["=lua+w"]]}, {"w": WHERE})
    path_k = app(tmp_path, "k", {**router, "name": "K", "#cluster": [port_k], "#startup": [["=lua+w"]]}, {"w": WHERE})
    path_s = app(
        tmp_path,
        "s",
        {**router, "#cluster": [port_s, f"127.0.0.1:{port_p}", f"=127.0.0.1:{port_k}"], "#startup": [["=lua+s"]]},
        {"s": ASKER},
    )

    def names(server: ServerProcess) -> list[str]:
        return [r[0] for r in server.logged("s", "at")]

    with ServerProcess(path_k), ServerProcess(path_s) as s:
        with ServerProcess(path_p):
            s.wait_for(lambda: names(s).count("P") >= 5, 30, "replies from the primary")
            # the backup serves only stage ids no live server has: before the primary is linked
            # it may answer, never once the primary does
            seen = names(s)
            assert "K" not in seen[seen.index("P") :]
        stopped_at = len(s.logged("s", "at"))
        s.wait_for(lambda: "K" in names(s)[stopped_at:], 30, "the backup taking over")
        assert any("routing removed" in line or "link to server" in line for line in s.lines)
        with ServerProcess(path_p):
            back_at = len(names(s))
            s.wait_for(lambda: "P" in names(s)[back_at:], 30, "routing back to the restarted primary")
        numbers = sorted(int(r[1]) for r in s.logged("s", "at"))
        refused = s.logged("s", "refused")
    sent = max(numbers)
    missing = set(range(numbers[0], sent)) - set(numbers) - {int(r[0]) for r in refused}
    # only messages already on the wire to the primary when it stopped may be lost
    assert len(missing) <= 3, sorted(missing)


# -- wrong secret -------------------------------------------------------------------------------


def test_a_peer_with_another_secret_is_refused_and_logged(tmp_path: Path) -> None:
    port_x, port_y = free_port(), free_port()
    path_x = app(tmp_path, "x", {"#cluster": [port_x], "#startup": [["=lua+w"]], "name": "X"}, {"w": WHERE})
    path_y = app(
        tmp_path,
        "y",
        {"#secret": "another-secret", "#cluster": [port_y, f"127.0.0.1:{port_x}"], "#startup": [["=lua+s"]]},
        {"s": ASKER},
    )
    with ServerProcess(path_x) as x, ServerProcess(path_y) as y:
        # the handshake is symmetric: whichever side checks the other's proof first refuses and logs
        x.wait_for(lambda: any("bad secret" in line for line in x.lines + y.lines), 20, "the refusal in a log")
        y.wait_for(lambda: len(y.logged("s", "refused")) >= 10, 20, "refused sends")
        assert y.logged("s", "at") == []
        assert y.logged("s", "refused")[0][1] == "unknown stage 'w'"


# -- multicast discovery on loopback ------------------------------------------------------------


def _multicast_on_loopback(group: str) -> str | None:
    """None when this kernel lets a socket join ``group`` on 127.0.0.1, else the reason."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            request = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
            probe.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
            probe.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        except OSError as err:
            return f"the kernel refuses multicast on loopback: {err}"
    return None


def test_servers_find_each_other_by_multicast_on_loopback(tmp_path: Path) -> None:
    group = f"239.255.71.{int(time.time()) % 200 + 20}"
    reason = _multicast_on_loopback(group)
    if reason:
        pytest.skip(reason)
    udp = free_port(kind=socket.SOCK_DGRAM)
    discovery = f"udp://{group}:{udp}"
    port_d, port_e = free_port(), free_port()
    path_d = app(tmp_path, "d", {"#cluster": [port_d, discovery], "#startup": [["=lua+w"]], "name": "D"}, {"w": WHERE})
    path_e = app(tmp_path, "e", {"#cluster": [port_e, discovery], "#startup": [["=lua+s"]]}, {"s": ASKER})
    with ServerProcess(path_d) as d, ServerProcess(path_e) as e:
        d.wait_for(lambda: any("ready" in line for line in d.lines), 20, "the first server")
        e.wait_for(lambda: [r[0] for r in e.logged("s", "at")].count("D") >= 3, 20, "replies through a discovered link")
        assert any("discovered server" in line for line in e.lines + d.lines)


def test_a_discovered_address_that_never_links_stops_being_dialed_once_silent(tmp_path: Path) -> None:
    """A server announced on the group (by this test, with the cluster's secret) at an address
    nobody listens on: dialed while announced, no longer dialed within sync of its last one."""
    group = f"239.255.73.{int(time.time()) % 200 + 20}"
    reason = _multicast_on_loopback(group)
    if reason:
        pytest.skip(reason)
    udp = free_port(kind=socket.SOCK_DGRAM)
    config = {"#cluster": [free_port(), f"udp://{group}:{udp}"], "#router": [1500, 900], "#startup": [["=lua+w"]]}
    path = app(tmp_path, "d", config, {"w": WHERE})
    ghost = f"127.0.0.1:{free_port()}"
    announcement = encode_announcement(SECRET.encode(), "ghost", ghost)
    with ServerProcess(path) as d, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        d.wait_for(lambda: any("ready" in line for line in d.lines), 20, "the server")

        def announced(marker: str) -> bool:
            sender.sendto(announcement, (group, udp))
            return any(marker in line for line in d.lines)

        d.wait_for(lambda: announced(f"discovered server ghost at {ghost}"), 20, "the ghost discovered")
        d.wait_for(
            lambda: any(f"{ghost} of server ghost never linked" in line for line in d.lines), 20, "the ghost forgotten"
        )
        assert not any("Traceback" in line for line in d.lines)


# -- a burst that overloads a server, and its recovery ------------------------------------------


def test_a_burst_that_overloads_a_server_does_not_cut_it_off(tmp_path: Path) -> None:
    """The burst of a new user's first try (scaled down): the receiving server may take no routed
    work for a while; sends meanwhile say why; once it drained it is routed to again by itself."""
    total = 100_000
    port_a, port_b = free_port(), free_port()
    path_b = app(tmp_path, "b", {"#router": [3000, 50], "#cluster": [port_b], "#startup": [["=lua+b"]]}, {"b": COUNTER})
    path_a = app(
        tmp_path,
        "a",
        {"#router": [3000, 50], "#cluster": [port_a, f"127.0.0.1:{port_b}"], "#startup": [["=lua+a"]]},
        {"a": burst("b", total)},
    )
    with ServerProcess(path_b) as b, ServerProcess(path_a) as a:
        a.wait_for(lambda: bool(a.logged("a", "burst")), 120, "the end of the burst")
        accepted, refused, why = a.logged("a", "burst")[0]
        assert int(accepted) + int(refused) == total
        if int(refused):
            assert why.startswith("no replica of 'b' available: server ") and why.endswith(" overloaded")
        # a request after the burst is answered: the gate re-opened with no routed work arriving
        a.wait_for(lambda: bool(a.logged("a", "after")), 30, "an answer after the burst")
        # every accepted ping arrived: none was dropped silently
        b.wait_for(lambda: [str(accepted)] in b.logged("b", "count"), 30, "every accepted ping counted")
        if any("overloaded: message delay" in line for line in b.lines):
            # it re-opens by itself, the sender routes to it again and a new request is answered
            b.wait_for(lambda: any("recovered from overload" in line for line in b.lines), 30, "b's recovery")
            a.wait_for(lambda: any(line.endswith(" recovered") for line in a.lines), 30, "a routing to b again")
            answered = len(a.logged("a", "after"))
            a.wait_for(lambda: len(a.logged("a", "after")) > answered, 30, "an answer after the recovery")
