"""The cluster as the router sees it: the gateway (process of group 0) and its view in the others.

The process of the first ``#startup`` group is the server's gateway: it listens on the
``#cluster`` port, dials peers and backups, runs discovery, keeps the ``Directory`` and relays
frames between the processes of its server and the peer servers. The other processes route
with a ``RemoteView``: the gateway's latest ``Routes`` (pushed to them over the process links
when they change, and with every heart-beat) and a forwarder of their remote frames to group 0.

Frames between servers (each one ``stagetx.wire`` message)::

    ["hello", ADDR, {STAGE: [INSTANCE...]}, DELAY_S, OVERLOADED, [GROUP...]]   at link-up and every
                                                     heart-beat; GROUP: the process of each instance
    ["m", INSTANCE, MSGID, PAYLOAD, SENDER, REPLY]                  to one stage instance
    ["s", STAGE, MSGID, TAG_SENDER, PAYLOAD, SENDER, REPLY, TTL_MS]  {id, addr [, ms]}: routed there

SENDER is the instance number of a stage of the sending server (the receiver makes its ``Sender``
from that server's hello, once), or ``[SERVER, GROUP, STAGE, INSTANCE]`` for any other sender. A
link carries the hello before any other frame.

Frames between the processes of one server (kinds added to ``stagetx.router``)::

    ["cx", SERVER, FRAME, REROUTE_STAGE, DEADLINE]   a process → the gateway: send FRAME to SERVER
                                                     (FRAME packed: the gateway writes it as it is)
    ["croutes", ROUTES]                              the gateway → the processes: ``Routes.to_wire``
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from stagetx.address import Scope, ToStage
from stagetx.bounded import BoundedDict
from stagetx.cluster.directory import Directory, OverloadGate, Peer, Routes
from stagetx.cluster.discovery import Discovery
from stagetx.cluster.dns import DnsDiscovery
from stagetx.cluster.peers import PeerLinks, tls_options
from stagetx.config import HostPort, ServerConfig
from stagetx.message import Sender, run_fields
from stagetx.router import Links, Result, Router
from stagetx.wire import FrameTooLarge, Link, check_fits, message_room, pack_message, unpack_message

#: The largest frame between servers.
MAX_FRAME = 16 * 1024 * 1024
#: The largest payload ``steady_room`` allows to a linked server: half a frame, leaving the rest
#: to the message's other fields.
STEADY_ROOM = message_room(MAX_FRAME) // 2
GATEWAY_GROUP = 0


def cluster_enabled(config: ServerConfig) -> bool:
    cluster = config.cluster
    return bool(cluster.listen or cluster.peers or cluster.backups or cluster.discovery or cluster.dns)


def stage_table(config: ServerConfig) -> dict[str, list[int]]:
    """Stage id → instance numbers of this server (what peers learn in the hello)."""
    table: dict[str, list[int]] = {}
    for stage in config.stages:
        table.setdefault(stage.id, []).append(stage.instance)
    return table


class RemoteView:
    """The cluster as seen from a process other than the gateway."""

    def __init__(self, links: Links) -> None:
        self.links = links
        self.routes = Routes()

    def send(
        self,
        server_id: str,
        frame: list[Any] | bytes,
        reroute: str | None = None,
        deadline: float | None = None,
        steady: bool = False,
    ) -> Result:
        """Relay ``frame`` through the gateway (which decides on ``steady`` frames as on any other)."""
        if server_id not in self.routes.servers:
            return False, f"server '{server_id}' is not in the cluster (gone, restarted or never seen)"
        if server_id in self.routes.full:
            # the gateway's routes say only that it is full: its link may be down or not reading
            return False, f"server '{server_id}' takes nothing more now: its queue is full (not linked, or not reading)"
        try:
            packed = frame if type(frame) is bytes else pack_message(frame)  # the gateway passes it on as it is
            check_fits(packed, MAX_FRAME)
        except FrameTooLarge as err:
            return False, str(err)
        return self.links.send(GATEWAY_GROUP, ["cx", server_id, packed, reroute, deadline])

    def steady_room(self, server_id: str) -> int:
        """While the gateway's process is linked, a known server with room in its queue takes
        what is relayed to it (as ``send`` answers it)."""
        if server_id not in self.routes.servers or server_id in self.routes.full:
            return 0
        return min(self.links.steady_room(GATEWAY_GROUP), STEADY_ROOM)  # it must fit both links

    def process_frame(self, group: int, frame: list[Any]) -> None:
        if frame[0] == "croutes":
            self.routes = Routes.from_wire(frame[1])


class ClusterGateway(MultiService):
    """The cluster service of a server, run in the process of group 0."""

    log = Logger()

    def __init__(
        self,
        config: ServerConfig,
        router: Router,
        links: Links | None,
        secret: bytes,
        reactor: Any,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        cluster = config.cluster
        self.router = router
        self.links = links
        self.reactor = reactor
        self.now = now
        self.server_id = router.server_id
        self.groups = len(config.startup)
        self.stages = stage_table(config)
        self.placement = [s.group for s in sorted(config.stages, key=lambda s: s.instance)]
        # server id -> its stages as senders (hello)
        self._senders: BoundedDict[str, list[Sender]] = BoundedDict(SENDER_TABLES)
        sync_ms, overload_ms = config.router
        self.interval = sync_ms / 3000.0
        self.directory = Directory(self.server_id, sync_ms / 1000.0, now, [str(b) for b in cluster.backups])
        self.gate = OverloadGate(overload_ms / 1000.0)
        listen = (cluster.listen_host, cluster.listen) if cluster.listen else None
        self.addr = (cluster.advertise or str(HostPort(*listen))) if listen else ""
        tls = tls_options(cluster.tls) if cluster.tls is not None else None
        self.peers = PeerLinks(self.server_id, secret, listen, self, reactor, MAX_FRAME, cluster.queue, now, tls)
        self.peers.setServiceParent(self)
        self.static = [str(a) for a in (*cluster.peers, *cluster.backups)]
        self.discovery: Discovery | None = None
        if cluster.discovery:
            self.discovery = Discovery(
                list(cluster.discovery), secret, self.server_id, self.addr, self.discovered, reactor
            )
            self.discovery.setServiceParent(self)
        if cluster.dns:
            DnsDiscovery(list(cluster.dns), self.dns_answered, reactor).setServiceParent(self)
        self.routes = Routes()
        self._via: dict[str, str] = {}
        # discovered addresses dialed but not linked yet -> (server id, when last announced): one
        # that falls silent before our dial links is no longer dialed (nothing else forgets it)
        self._announced: dict[str, tuple[str, float]] = {}
        self.dropped = 0  # messages dropped because their server went away (for /metrics)
        self._push_call: IDelayedCall | None = None
        self._queue_limit = cluster.queue
        self._warm_until = 0.0  # set at start: until then, frames for unknown servers are held
        self._held: list[tuple[int, list[Any]]] = []  # (group, cx frame) held while warming up
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        router.remote = self

    def startService(self) -> None:
        MultiService.startService(self)
        self._warm_until = self.now() + self.directory.sync
        for addr in self.static:
            self.peers.dial(addr)
        self._loop.start(self.interval, now=False)
        self.log.info(
            "cluster: server {server} listening on {addr}, peers {peers}",
            server=self.server_id,
            addr=self.addr or "(no port)",
            peers=self.static,
        )

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        if self._push_call is not None and self._push_call.active():
            self._push_call.cancel()
        return MultiService.stopService(self)

    # -- what the router calls --------------------------------------------------------------------
    def send(
        self,
        server_id: str,
        frame: list[Any] | bytes,
        reroute: str | None = None,
        deadline: float | None = None,
        steady: bool = False,
    ) -> Result:
        """Send ``frame`` to a known server (queued while it has no link or does not read, bounded;
        a ``steady`` run is queued past the bound, which ``steady_room`` kept room for); bytes: a
        frame another process packed, passed on as it is."""
        if server_id not in self.directory.peers:
            return False, f"server '{server_id}' is not in the cluster (gone, restarted or never seen)"
        ok, reason = self.peers.send(server_id, frame, reroute, deadline, steady)
        full = self.routes.full
        if (self.peers.queues or full) and self.peers.is_full(server_id) != (server_id in full):
            self._changed()  # the other processes learn that its queue filled up (or has room again)
        return ok, reason

    def steady_room(self, server_id: str) -> int:
        """A server linked now takes every frame sent to it until the reactor runs again: written
        to its link, or queued while it does not read (runs keep their form there)."""
        if server_id in self.directory.peers and self.peers.has_room(server_id):
            return STEADY_ROOM
        return 0

    def process_frame(self, group: int, frame: list[Any]) -> None:
        """A frame from another process of this server: a remote frame to relay."""
        if frame[0] != "cx":
            self.log.warn("unexpected cluster frame {kind!r} from process {group}", kind=frame[0], group=group + 1)
            return
        _, server_id, inner, reroute, deadline = frame
        if server_id not in self.directory.peers and self._warming() and len(self._held) < self._queue_limit:
            # sent through this process before it restarted: its peers are not linked again yet
            self._held.append((group, frame))
            return
        ok, reason = self.send(server_id, inner, reroute, deadline)
        if not ok and reroute is not None:
            for message in messages_of(_unpacked(inner)):
                ok, reason = self.router.route_again(reroute, message)
                if not ok:
                    break
        if not ok:
            self.log.warn("message from process {group} not relayed: {reason}", group=group + 1, reason=reason)

    def _warming(self) -> bool:
        """Within sync of this gateway's start, every live peer has not been heard from yet."""
        return self.now() < self._warm_until

    def _release_held(self) -> None:
        """Relay the held frames whose server is known now; past the warm-up, all of them (those
        for a server still unknown are rerouted, or logged as not relayed)."""
        held, self._held = self._held, []
        for group, frame in held:
            if frame[1] in self.directory.peers or not self._warming():
                self.process_frame(group, frame)
            else:
                self._held.append((group, frame))

    def server_at(self, addr: str) -> str | None:
        return self.routes.addrs.get(addr)

    # -- discovery --------------------------------------------------------------------------------
    def discovered(self, server_id: str, addr: str) -> None:
        if server_id in self.directory.peers and self.directory.peers[server_id].linked:
            return
        if addr in self._announced:
            self._announced[addr] = (server_id, self.now())
        elif addr not in self.peers.dialing():
            self.log.info("discovered server {server} at {addr}", server=server_id, addr=addr)
            self._announced[addr] = (server_id, self.now())
            self.peers.dial(addr)

    def _forget_silent_announcements(self) -> None:
        """Stop dialing discovered addresses our dial never linked to and that were not announced
        within the directory's sync time: a server gone before anyone reached it, one announcing
        an address this server cannot reach, or one linked the other way (it dialed us; its
        announcements are ignored then). Discovery dials them again if they are announced again."""
        cutoff = self.now() - self.directory.sync
        for addr, (server_id, heard) in list(self._announced.items()):
            if heard >= cutoff:
                continue
            del self._announced[addr]
            if addr in self.static:
                continue
            peer = self.directory.peers.get(server_id)
            if peer is None or not peer.linked:
                self.log.info(
                    "discovered address {addr} of server {server} never linked and is no longer announced: "
                    "not dialed any more",
                    addr=addr,
                    server=server_id,
                )
            self.peers.undial(addr)

    def dns_answered(self, found: set[str], gone: set[str]) -> None:
        """A ``dns://`` name's addresses: dial those not dialed (new ones, and peers forgotten
        since, which DNS still names), stop dialing those no longer named."""
        dialing = self.peers.dialing()
        for addr in sorted(gone & dialing):
            if addr not in self.static:
                self.log.info("cluster address {addr} no longer in DNS: not dialed any more", addr=addr)
                self.peers.undial(addr)
        for addr in sorted(found - dialing - self.peers.itself - {self.addr}):
            self.log.info("cluster address {addr} found in DNS", addr=addr)
            self.peers.dial(addr)

    # -- peer events (PeerLinks) ------------------------------------------------------------------
    def peer_linked(self, server_id: str, link: Link, via: str | None) -> None:
        if via is not None:
            self._via[server_id] = via
            self._announced.pop(via, None)  # linked: forgotten with its peer from now on
        link.send(self._hello())

    def peer_unlinked(self, server_id: str) -> None:
        if self.directory.unlinked(server_id):
            self.log.warn("link to server {server} lost", server=server_id)
            self._changed()

    def peer_drained(self, server_id: str) -> None:
        if server_id in self.routes.full:
            self._changed()  # the other processes learn that its queue has room again

    def peer_message(self, server_id: str, obj: Any) -> None:
        kind = obj[0]
        if kind == "m":
            _, instance, msgid, payload, sender, reply = obj
            known = self._sender(server_id, sender)
            if known is None:
                self._undelivered(msgid, server_id, f"unknown sender {sender!r}")
                return
            ok, reason = self.router.deliver(instance, msgid, payload, known, reply)
            if not ok:
                self._undelivered(msgid, server_id, reason)
        elif kind == "r":
            _, instance, sender, count, body = obj
            known = self._sender(server_id, sender)
            if known is None:
                self._undelivered(f"{count} messages", server_id, f"unknown sender {sender!r}")
                return
            ok, reason = self.router.deliver_run(instance, known, count, body)
            if not ok:
                self._undelivered(f"{count} messages", server_id, reason)
        elif kind == "hello":
            self._hello_from(server_id, obj)
        elif kind == "s":
            self._to_this_server(server_id, obj)
        else:
            self.log.warn("unknown frame kind {kind!r} from server {server}", kind=kind, server=server_id)

    def peer_frame_done(self, server_id: str) -> None:
        """A whole frame counts as one heart-beat; its messages, queued, run now (as between
        the processes of a server: no drain scheduled per message, one per frame)."""
        self.directory.heard(server_id)
        self.router.run_queue()

    def _sender(self, server_id: str, named: int | list[Any]) -> Sender | None:
        """The ``Sender`` a frame from ``server_id`` names (see the module doc), or None."""
        if type(named) is not int:
            return self.router.named_sender(named)  # type: ignore[arg-type]
        senders = self._senders.get(server_id)
        return senders[named] if senders is not None and 0 <= named < len(senders) else None

    def _hello(self) -> list[Any]:
        return ["hello", self.addr, self.stages, self.own_delay(), self.gate.overloaded, self.placement]

    def _hello_from(self, server_id: str, obj: list[Any]) -> None:
        _, addr, stages, delay, overloaded = obj[:5]
        if len(obj) > 5 and server_id not in self._senders:
            # ``put`` empties a full table: ids of servers long gone; live ones say hello again
            stage_of = {i: stage for stage, instances in stages.items() for i in instances}
            self._senders.put(server_id, [Sender(server_id, g, stage_of.get(i, ""), i) for i, g in enumerate(obj[5])])
        known = self.directory.peers.get(server_id)
        if known is None or not known.linked:
            for old in self.directory.learn(
                server_id, addr or self._via.get(server_id, ""), stages, self._via.get(server_id)
            ):
                self.log.warn(
                    "server {old} at {addr} was replaced by {new} (restarted)",
                    old=old.server_id,
                    addr=addr,
                    new=server_id,
                )
                self._forget(old)
            self.log.info(
                "server {server} at {addr} linked: stages {stages}", server=server_id, addr=addr, stages=sorted(stages)
            )
            self.directory.heard(server_id, delay, overloaded)
            self._changed()
            if self._held:
                self._release_held()
        elif self.directory.heard(server_id, delay, overloaded):
            state = "overloaded: no routed work for it" if overloaded else "recovered"
            self.log.info("server {server} {state}", server=server_id, state=state)
            self._changed()

    def _to_this_server(self, server_id: str, obj: list[Any]) -> None:
        _, stage, msgid, tag, payload, sender, reply, ttl_ms = obj
        if ttl_ms is not None and self.own_delay() * 1000.0 >= ttl_ms:
            self.log.warn(
                "message {msgid!r} from server {server} dropped: not handled within {ms} ms",
                msgid=msgid,
                server=server_id,
                ms=ttl_ms,
            )
            return
        known = self._sender(server_id, sender)
        if known is None:
            self._undelivered(msgid, server_id, f"unknown sender {sender!r}")
            return
        address = ToStage(stage, msgid, Scope.LOCAL, bool(tag), None)
        ok, reason = self.router.send(known, address, payload, reply)
        if not ok:
            self._undelivered(msgid, server_id, reason)

    def _undelivered(self, msgid: str, server_id: str, reason: str | None) -> None:
        self.log.warn(
            "message {msgid!r} from server {server} not delivered: {reason}",
            msgid=msgid,
            server=server_id,
            reason=reason,
        )

    # -- heart-beats, expiry, overload ------------------------------------------------------------

    def own_delay(self) -> float:
        """This server's message delay: the worst queue delay of its processes (s)."""
        return max([self.router.delay, *self.router.delays.values()])

    def _tick(self) -> None:
        try:
            self.router.refresh_delay()  # the gate re-opens once drained, with no traffic coming
            if self.gate.update(self.own_delay()):
                if self.gate.overloaded:
                    self.log.warn(
                        "overloaded: message delay {ms:.0f} ms; taking no routed work from the cluster",
                        ms=self.own_delay() * 1000,
                    )
                else:
                    self.log.info("recovered from overload: taking routed work from the cluster again")
            hello = self._hello()
            for link in self.peers.links.values():
                link.send(hello)
            if self._held and not self._warming():
                self._release_held()
            self._forget_silent_announcements()
            gone = self.directory.expire()
            for peer in gone:
                self.log.warn(
                    "server {server} not heard from within {ms:.0f} ms: routing removed",
                    server=peer.server_id,
                    ms=self.directory.sync * 1000,
                )
                self._forget(peer)
            self._push()
        except Exception:
            self.log.failure("cluster heart-beat failed")

    def _forget(self, peer: Peer) -> None:
        """``peer`` is gone for good: what waited for it goes to other replicas, or is dropped."""
        self._via.pop(peer.server_id, None)
        if peer.addr and peer.addr not in self.static:
            self.peers.undial(peer.addr)  # discovery will find it again if it comes back
        self.routes = self.directory.routes(self._full())
        lost = []
        for item in self.peers.take_queue(peer.server_id):
            for frame in messages_of(_unpacked(item.frame)):
                if item.reroute is None or not self.router.route_again(item.reroute, frame)[0]:
                    lost.append(dropped_message(frame, item.reroute))
        if lost:
            self.dropped += len(lost)
            shown = ", ".join(lost[:DROPPED_SHOWN]) + (
                f" and {len(lost) - DROPPED_SHOWN} more" if len(lost) > DROPPED_SHOWN else ""
            )
            self.log.warn(
                "{n} message(s) queued for server {server} dropped: {messages}",
                n=len(lost),
                server=peer.server_id,
                messages=shown,
                dropped=lost,
            )
        self._changed()

    def _full(self) -> list[str]:
        return [s for s in self.directory.peers if self.peers.is_full(s)]

    def _changed(self) -> None:
        self.routes = self.directory.routes(self._full())
        if self._push_call is None or not self._push_call.active():
            self._push_call = self.reactor.callLater(0, self._push)

    def _push(self) -> None:
        """Tell the other processes of this server the current routes."""
        self._push_call = None
        if self.links is None or self.groups < 2:
            return
        frame = ["croutes", self.routes.to_wire()]
        for group in range(self.groups):
            if group != GATEWAY_GROUP:
                self.links.send(group, frame)


#: Servers whose senders are kept (from their hellos), at most this many. A server's table stays
#: when it is forgotten: a link that outlived a partition may carry its frames before its next hello.
SENDER_TABLES = 1024
#: How many dropped messages a failover's log line names (all of them are in its ``dropped`` field).
DROPPED_SHOWN = 20


def _unpacked(frame: list[Any] | bytes) -> list[Any]:
    """A frame relayed packed (``RemoteView.send``), decoded for the rare paths that read it."""
    return unpack_message(frame) if type(frame) is bytes else frame  # type: ignore[return-value]


def messages_of(frame: list[Any]) -> list[list[Any]]:
    """A frame for a server, a run (``["r", …]``) as the ``["m", …]`` frames of its messages."""
    if frame[0] != "r":
        return [frame]
    _, instance, sender, _, body = frame
    return [["m", instance, msgid, payload, sender, reply] for msgid, payload, reply in run_fields(body)]


def dropped_message(frame: list[Any], reroute: str | None) -> str:
    """A queued frame as the log names it: ``stage:msgid`` (or the stage instance it was for)."""
    if frame[0] == "s":  # ["s", stage, msgid, ...]: a message for a stage of that server
        return f"{frame[1]}:{frame[2]}"
    if frame[0] == "m":  # ["m", instance, msgid, ...]: for one stage instance there
        return f"{reroute}:{frame[2]}" if reroute else f"{frame[2]} (stage instance {frame[1]})"
    return str(frame[0])
