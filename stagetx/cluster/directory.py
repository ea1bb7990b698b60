"""What this server knows of the other servers: the peer table, heart-beat expiry, overload; pure.

The gateway (``stagetx.cluster.gateway``) feeds ``Directory`` with what peers say (hello,
heart-beats, link up/down) and asks it for a ``Routes``: the frozen answer to "where may a
message for stage id S go on other servers", shared with every process of the server. No I/O,
no reactor: time comes from ``now``.

Routing tiers for one stage id (``Routes.targets``), in order, the first non-empty one wins:

1. replicas on linked peers that are not overloaded and not backups;
2. only when this server has no replica itself: replicas on peers whose link dropped but that
   have not yet missed a heart-beat period (messages wait in their bounded queue);
3. only when no live server has the stage id: replicas on backup servers. An overloaded server
   is live: its stage ids are not handed to a backup for a passing burst (senders get ``false``
   and the overload as the reason until it recovers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

Replica = tuple[str, int]  # (server id, instance number on that server)


@attrs.define
class Peer:
    """One other server as last heard of."""

    server_id: str
    addr: str  # its cluster address as it announced it ("host:port")
    stages: dict[str, list[int]]  # stage id -> instance numbers on that server
    heard: float
    backup: bool = False
    linked: bool = False
    delay: float = 0.0  # its own message delay (s), from its heart-beats
    overloaded: bool = False
    aliases: set[str] = attrs.field(factory=set)  # other addresses it was reached at


@attrs.frozen
class Routes:
    """A snapshot of the routable replicas of other servers (what every process routes with)."""

    live: Mapping[str, list[Replica]] = attrs.field(factory=dict)
    pending: Mapping[str, list[Replica]] = attrs.field(factory=dict)
    backups: Mapping[str, list[Replica]] = attrs.field(factory=dict)
    servers: Mapping[str, float] = attrs.field(factory=dict)  # known server -> its delay (s)
    addrs: Mapping[str, str] = attrs.field(factory=dict)  # "host:port" -> server id
    full: frozenset[str] = frozenset()  # servers whose send queue is full
    overloaded: Mapping[str, list[str]] = attrs.field(factory=dict)  # stage id -> overloaded servers with it

    def targets(self, stage_id: str, has_local: bool, remote_only: bool = False) -> list[Replica]:
        """The replicas of ``stage_id`` on other servers to route to (tiers in the module doc).

        ``remote_only`` (a ``+`` target): replicas of a peer that is away count even when this
        server has the stage id, since this server's own replicas may not be used.
        """
        found = self.live.get(stage_id)
        if found:
            return found
        if has_local and not remote_only:
            return []
        found = self.pending.get(stage_id)
        if found or has_local:
            return found or []
        return self.backups.get(stage_id) or []

    def delay(self, server_id: str) -> float:
        return self.servers.get(server_id, 0.0)

    def to_wire(self) -> list[Any]:
        """A msgpack-able form, sent by the gateway to the other processes of its server."""
        return [
            dict(self.live),
            dict(self.pending),
            dict(self.backups),
            dict(self.servers),
            dict(self.addrs),
            sorted(self.full),
            dict(self.overloaded),
        ]

    @classmethod
    def from_wire(cls, data: list[Any]) -> Routes:
        def replicas(table: Mapping[str, list[list[Any]]]) -> dict[str, list[Replica]]:
            return {sid: [(str(s), int(i)) for s, i in items] for sid, items in table.items()}

        live, pending, backups, servers, addrs, full, overloaded = data
        return cls(
            replicas(live),
            replicas(pending),
            replicas(backups),
            dict(servers),
            dict(addrs),
            frozenset(full),
            {sid: list(names) for sid, names in overloaded.items()},
        )


class Directory:
    """The peer table of one server.

    @param sync: seconds without hearing from a peer after which it loses its routing
        (``#router[0]``).
    @param backups: the cluster addresses configured as backups (``"=host:port"``).
    """

    def __init__(self, server_id: str, sync: float, now: Callable[[], float], backups: Iterable[str] = ()) -> None:
        self.server_id = server_id
        self.sync = sync
        self.now = now
        self.backup_addrs = set(backups)
        self.peers: dict[str, Peer] = {}

    def learn(
        self, server_id: str, addr: str, stages: Mapping[str, Iterable[int]], via: str | None = None
    ) -> list[Peer]:
        """A peer said hello over a link (``via``: the address we dialed, if we did).

        Returns the peers this one replaces: earlier servers at the same address (a restart
        gives a server a new id), to be forgotten at once.
        """
        replaced = [
            p for p in self.peers.values() if addr and p.server_id != server_id and addr in ({p.addr} | p.aliases)
        ]
        for old in replaced:
            del self.peers[old.server_id]
        peer = self.peers.get(server_id)
        table = {str(sid): sorted(int(i) for i in items) for sid, items in stages.items()}
        if peer is None:
            peer = self.peers[server_id] = Peer(server_id, addr, table, self.now())
        peer.addr, peer.stages, peer.heard, peer.linked = addr, table, self.now(), True
        if via is not None and via != addr:
            peer.aliases.add(via)
        peer.backup = bool(({peer.addr} | peer.aliases) & self.backup_addrs)
        return replaced

    def heard(self, server_id: str, delay: float | None = None, overloaded: bool | None = None) -> bool:
        """Anything from ``server_id`` counts as a heart-beat; returns whether its routing changed."""
        peer = self.peers.get(server_id)
        if peer is None:
            return False
        peer.heard = self.now()
        changed = False
        if delay is not None:
            peer.delay = delay
        if overloaded is not None and overloaded != peer.overloaded:
            peer.overloaded, changed = overloaded, True
        return changed

    def unlinked(self, server_id: str) -> bool:
        """The link to ``server_id`` dropped; its replicas stop being first choice."""
        peer = self.peers.get(server_id)
        if peer is None or not peer.linked:
            return False
        peer.linked = False
        return True

    def expire(self) -> list[Peer]:
        """Forget the peers not heard from within ``sync``; returns them."""
        limit = self.now() - self.sync
        gone = [p for p in self.peers.values() if p.heard < limit]
        for peer in gone:
            del self.peers[peer.server_id]
        return gone

    def routes(self, full: Iterable[str] = ()) -> Routes:
        """The routing snapshot for the peers as they stand (lists sorted: fair round-robin)."""
        live: dict[str, list[Replica]] = {}
        pending: dict[str, list[Replica]] = {}
        backups: dict[str, list[Replica]] = {}
        addrs: dict[str, str] = {}
        overloaded: dict[str, list[str]] = {}
        for peer in sorted(self.peers.values(), key=lambda p: p.server_id):
            for addr in ({peer.addr} | peer.aliases) - {""}:
                addrs[addr] = peer.server_id
            if peer.overloaded:  # not routed to; named in the reason a send fails
                for sid in peer.stages:
                    overloaded.setdefault(sid, []).append(peer.server_id)
                continue
            table = backups if peer.backup else live if peer.linked else pending
            for sid, instances in peer.stages.items():
                table.setdefault(sid, []).extend((peer.server_id, i) for i in instances)
        for sid in list(backups):
            if sid in live or sid in pending or sid in overloaded:
                del backups[sid]  # backups only serve stage ids no live server has
        servers = {p.server_id: p.delay for p in self.peers.values()}
        return Routes(live, pending, backups, servers, addrs, frozenset(full), overloaded)


@attrs.define
class OverloadGate:
    """``#router[1]``: this server stops taking routed work while its message delay is too high.

    It enters overload when the delay passes ``limit`` and leaves it once the delay is back under
    half of it (hysteresis, so a delay hovering at the limit does not flap the cluster's routes).
    """

    limit: float  # seconds
    overloaded: bool = False

    def update(self, delay: float) -> bool:
        """Feed the current delay; returns True when the state changed."""
        if not self.overloaded and delay > self.limit:
            self.overloaded = True
            return True
        if self.overloaded and delay < self.limit / 2:
            self.overloaded = False
            return True
        return False


def cluster_address(addr: str) -> str:
    """The ``"host:port"`` key of a ``{id, addr}`` target's ``addr``.

    ``addr`` is either text (``"127.0.0.1:7001"``, ``"[::1]:7001"``) or what ``broker.aton``
    returns (4/16 address bytes and a 2-byte port, arriving as a surrogate-escaped string).
    """
    raw = addr.encode("utf-8", "surrogateescape")
    if len(raw) in (6, 18) and not _looks_like_text(addr):
        host = str(ipaddress.ip_address(raw[:-2]))
        port = int.from_bytes(raw[-2:], "big")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return addr.strip()


def _looks_like_text(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit())
