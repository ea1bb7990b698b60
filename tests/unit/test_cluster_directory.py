"""The peer table (stagetx.cluster.directory): tiers, heart-beat expiry, restarts, overload, addresses."""

from __future__ import annotations

from stagetx.cluster.directory import Directory, OverloadGate, Routes, cluster_address


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(backups: tuple[str, ...] = ()) -> tuple[Directory, FakeTime]:
    clock = FakeTime()
    return Directory("me", 1.5, clock, backups), clock


def test_linked_peers_are_live_replicas_in_a_stable_order() -> None:
    d, _ = make()
    d.learn("s2", "127.0.0.1:2", {"w": [3, 1]})
    d.learn("s1", "127.0.0.1:1", {"w": [0]})
    assert d.routes().targets("w", has_local=False) == [("s1", 0), ("s2", 1), ("s2", 3)]


def test_a_peer_not_heard_from_within_sync_loses_its_routing() -> None:
    d, clock = make()
    d.learn("s1", "127.0.0.1:1", {"w": [0]})
    clock.t += 1.4
    assert d.expire() == []
    d.heard("s1")
    clock.t += 1.4
    assert d.expire() == []
    clock.t += 0.2
    assert [p.server_id for p in d.expire()] == ["s1"]
    assert d.routes().targets("w", has_local=False) == []
    assert "s1" not in d.routes().servers


def test_an_unlinked_peer_is_used_only_when_no_replica_is_live_or_local() -> None:
    d, _ = make()
    d.learn("s1", "127.0.0.1:1", {"w": [0]})
    d.learn("s2", "127.0.0.1:2", {"w": [0]})
    assert d.unlinked("s1") is True
    assert d.unlinked("s1") is False
    routes = d.routes()
    assert routes.targets("w", has_local=False) == [("s2", 0)]
    d.unlinked("s2")
    routes = d.routes()
    assert routes.targets("w", has_local=False) == [("s1", 0), ("s2", 0)]
    assert routes.targets("w", has_local=True) == []
    assert routes.targets("w", has_local=True, remote_only=True) == [("s1", 0), ("s2", 0)]


def test_backups_serve_only_stage_ids_no_live_server_has() -> None:
    d, _ = make(backups=("127.0.0.1:9",))
    d.learn("b", "127.0.0.1:9", {"w": [0], "only": [1]})
    d.learn("p", "127.0.0.1:1", {"w": [0]})
    routes = d.routes()
    assert routes.targets("w", has_local=False) == [("p", 0)]
    assert routes.targets("only", has_local=False) == [("b", 1)]
    assert routes.targets("only", has_local=True) == []
    d.peers["p"].heard -= 10
    d.expire()
    assert d.routes().targets("w", has_local=False) == [("b", 0)]


def test_an_overloaded_server_keeps_its_stage_ids_from_the_backups() -> None:
    d, _ = make(backups=("127.0.0.1:9",))
    d.learn("b", "127.0.0.1:9", {"w": [0]})
    d.learn("p", "127.0.0.1:1", {"w": [0]})
    d.heard("p", 1.2, overloaded=True)
    routes = d.routes()
    assert routes.targets("w", has_local=False) == [] and routes.overloaded == {"w": ["p"]}
    d.heard("p", 0.0, overloaded=False)
    assert d.routes().targets("w", has_local=False) == [("p", 0)]


def test_a_backup_is_recognised_by_the_address_it_was_dialed_at() -> None:
    d, _ = make(backups=("localhost:9",))
    d.learn("b", "127.0.0.1:9", {"w": [0]}, via="localhost:9")
    assert d.peers["b"].backup
    assert d.routes().addrs == {"127.0.0.1:9": "b", "localhost:9": "b"}


def test_a_restarted_server_replaces_the_old_id_at_its_address() -> None:
    d, _ = make()
    d.learn("old", "127.0.0.1:1", {"w": [0]})
    replaced = d.learn("new", "127.0.0.1:1", {"w": [0]})
    assert [p.server_id for p in replaced] == ["old"]
    assert set(d.peers) == {"new"}


def test_servers_without_a_port_do_not_replace_each_other() -> None:
    d, _ = make()
    d.learn("x", "", {"w": [0]})
    assert d.learn("y", "", {"w": [0]}) == []
    assert "" not in d.routes().addrs


def test_an_overloaded_peer_takes_no_routed_work_until_it_recovers() -> None:
    d, _ = make()
    d.learn("s1", "127.0.0.1:1", {"w": [0]})
    assert d.heard("s1", 1.2, True) is True
    assert d.routes().targets("w", has_local=False) == []
    assert d.heard("s1", 1.2, True) is False
    assert d.heard("s1", 0.0, False) is True
    assert d.routes().targets("w", has_local=False) == [("s1", 0)]


def test_routes_survive_the_trip_to_other_processes() -> None:
    d, _ = make(backups=("127.0.0.1:9",))
    d.learn("p", "127.0.0.1:1", {"w": [0, 2]})
    d.learn("b", "127.0.0.1:9", {"z": [0]})
    d.learn("o", "127.0.0.1:2", {"w": [1]})
    d.heard("p", 0.25)
    d.heard("o", 1.5, overloaded=True)
    routes = d.routes(full=["p"])
    back = Routes.from_wire(routes.to_wire())
    assert back == routes
    assert back.delay("p") == 0.25 and back.full == frozenset({"p"})
    assert back.overloaded == {"w": ["o"]} and back.live["w"] == [("p", 0), ("p", 2)]


def test_overload_gate_has_hysteresis() -> None:
    gate = OverloadGate(0.9)
    assert gate.update(0.5) is False
    assert gate.update(0.95) is True and gate.overloaded
    assert gate.update(0.6) is False and gate.overloaded
    assert gate.update(0.4) is True and not gate.overloaded


def test_cluster_address_reads_text_and_packed_forms() -> None:
    assert cluster_address("127.0.0.1:7001") == "127.0.0.1:7001"
    packed = bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
    assert cluster_address(packed.decode("utf-8", "surrogateescape")) == "127.0.0.1:7001"
    packed6 = bytes(15) + b"\x01" + (7001).to_bytes(2, "big")
    assert cluster_address(packed6.decode("utf-8", "surrogateescape")) == "[::1]:7001"
