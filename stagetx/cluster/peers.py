"""TCP links to the other servers of a cluster: listening, dialing with back-off, per-peer queues.

Every server listens on its ``#cluster`` port and dials the addresses it was given (static
peers, backups) or learned (discovery); a dialer keeps reconnecting with back-off while the
peer is away, so a restarted peer is linked again by itself. Links are ``stagetx.wire`` links
(authenticated handshake, then authenticated, sequenced, batched frames); the node id of each
side is its server id. Either link of a pair (the one we dialed or the one we accepted) carries
our frames; once chosen, a peer's link stays the one used until it drops, so frames to a peer
keep their order. Frames for a peer without a link wait in its queue, bounded by ``queue_limit``;
so do frames for a peer whose link is ``stalled`` (it stopped reading: a frozen process, a cut
without a reset), which would otherwise pile up in Twisted's write buffer until sync expires.
Once the link has written out its buffer, the queue follows, in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, ITCPTransport
from twisted.logger import Logger

from stagetx.config import ClusterTls, HostPort
from stagetx.linkqueue import LinkQueue
from stagetx.wire import FrameTooLarge, Link, LinkClientFactory, LinkServerFactory, check_fits, pack_message

#: Reconnect delays: first retry after this many seconds, growing by ``BACKOFF_FACTOR`` ...
BACKOFF_FIRST = 0.1
#: ... up to this many seconds.
BACKOFF_MAX = 2.0
BACKOFF_FACTOR = 1.5
#: Seconds between tries to listen on a cluster port another program holds.
LISTEN_RETRY = 1.0
#: A peer's queue takes no more frames once it holds this many bytes (besides ``queue_limit``
#: frames): frames may be runs of many messages, so a count alone does not bound their memory.
QUEUE_BYTES = 64 * 1024 * 1024


class PeerEvents(Protocol):
    """What the gateway is told about peers."""

    def peer_linked(self, server_id: str, link: Link, via: str | None) -> None: ...

    def peer_message(self, server_id: str, obj: Any) -> None: ...

    def peer_frame_done(self, server_id: str) -> None:
        """Every message of one network frame from ``server_id`` was handed to ``peer_message``."""

    def peer_unlinked(self, server_id: str) -> None: ...

    def peer_drained(self, server_id: str) -> None:
        """The link to ``server_id`` took what waited for it: its queue has room again."""


@attrs.define
class Queued:
    """One frame waiting for a peer's link; ``reroute`` is the stage id if it may go elsewhere."""

    frame: bytes  # packed (``pack_message``): measured once, written as it is
    reroute: str | None = None
    deadline: float | None = None  # monotonic time after which it is dropped ({id, addr, ms})


def _queued_size(item: Queued) -> int:
    return len(item.frame)


class _Handler:
    """The wire handler of one link; ``via`` is the address dialed (None for accepted links)."""

    def __init__(self, peers: PeerLinks, via: str | None) -> None:
        self.peers = peers
        self.via = via

    def link_authenticated(self, link: Link) -> None:
        # a frame is written whole when flushed: Nagle's algorithm would hold its tail until the
        # peer acknowledges the previous one (up to the peer's delayed-ACK timer, 40 ms)
        cast(ITCPTransport, link.transport).setTcpNoDelay(True)
        self.peers._authenticated(link, self.via)

    def message_received(self, link: Link, obj: Any) -> None:
        if link.peer_id is not None:
            self.peers.events.peer_message(link.peer_id, obj)

    def frame_done(self, link: Link) -> None:
        if link.peer_id is not None:
            self.peers.events.peer_frame_done(link.peer_id)

    def link_drained(self, link: Link) -> None:
        self.peers._drained(link)

    def link_lost(self, link: Link, reason: object) -> None:
        self.peers._lost(link)


def _write(link: Link, frame: list[Any] | bytes) -> bool:
    return link.send_packed(frame) if type(frame) is bytes else link.send(frame)


def tls_options(tls: ClusterTls) -> ssl.CertificateOptions:
    """Both ends of a TLS link: this server's certificate, and the peer's required and checked
    against the cluster CA (mutual authentication; no host name check: cluster membership is
    holding a certificate of its CA)."""
    with open(tls.ca, "rb") as ca, open(tls.cert, "rb") as cert, open(tls.key, "rb") as key:
        authority = ssl.Certificate.loadPEM(ca.read())
        own = ssl.PrivateCertificate.loadPEM(cert.read() + key.read())
    return own.options(authority)  # verify=True, requireCertificate=True, trusting only the CA


def _endpoint(reactor: Any, addr: str) -> Any:
    host, _, port = addr.rpartition(":")
    if host.startswith("["):
        return TCP6ClientEndpoint(reactor, host[1:-1], int(port), timeout=5)
    return TCP4ClientEndpoint(reactor, host, int(port), timeout=5)


class PeerLinks(MultiService):
    """The links of this server to its peers.

    @param listen: ``(host, port)`` to accept peers on, or None to only dial.
    @param tls: TLS options for every link (``tls_options``), or None for plain TCP.
    """

    log = Logger()

    def __init__(
        self,
        server_id: str,
        secret: bytes,
        listen: tuple[str, int] | None,
        events: PeerEvents,
        reactor: Any,
        max_frame: int,
        queue_limit: int,
        now: Callable[[], float] = time.monotonic,
        tls: ssl.CertificateOptions | None = None,
    ) -> None:
        super().__init__()
        self.tls = tls
        self.server_id = server_id
        self.secret = secret
        self.listen = listen
        self.events = events
        self.reactor = reactor
        self.max_frame = max_frame
        self.queue_limit = queue_limit
        self.now = now
        self.links: dict[str, Link] = {}  # server id -> the link its frames go out on
        self.queues: dict[str, LinkQueue[Queued]] = {}
        self._dialers: dict[str, ClientService] = {}
        self._open: dict[str, list[Link]] = {}  # server id -> every authenticated link to it
        self._port: IListeningPort | None = None
        self._listen_retry: IDelayedCall | None = None  # while the cluster port is taken
        self.port_number: int | None = None
        self.itself: set[str] = set()  # addresses dialed that turned out to be this server

    def startService(self) -> None:
        if self.listen is not None:
            self._try_listen()
        MultiService.startService(self)

    def _try_listen(self) -> None:
        """Listen on the cluster port; one another program holds (taken while this process was
        restarted: the supervisor checks it only at start-up) is logged once and tried again every
        ``LISTEN_RETRY`` seconds, the links this server dials working meanwhile."""
        assert self.listen is not None
        host, port = self.listen
        factory = LinkServerFactory(self.secret, self.server_id, _Handler(self, None), self.max_frame, self.reactor)
        try:
            if self.tls is not None:
                self._port = self.reactor.listenSSL(port, factory, self.tls, interface=host)
            else:
                self._port = self.reactor.listenTCP(port, factory, interface=host)
        except CannotListenError as err:
            if self._listen_retry is None:
                self.log.error(
                    "cluster: cannot listen on {addr}: {reason}; trying again every {every} s",
                    addr=str(HostPort(host, port)),
                    reason=str(err.socketError),
                    every=LISTEN_RETRY,
                )
            self._listen_retry = self.reactor.callLater(LISTEN_RETRY, self._try_listen)
            return
        if self._listen_retry is not None:
            self._listen_retry = None
            self.log.info("cluster: listening on {addr} now", addr=str(HostPort(host, port)))
        self.port_number = self._port.getHost().port  # type: ignore[union-attr]

    def stopService(self) -> Any:
        if self._listen_retry is not None and self._listen_retry.active():
            self._listen_retry.cancel()
        self._listen_retry = None
        if self._port is not None:
            self._port.stopListening()
            self._port = None
        for link in list(self.links.values()):
            link.close()
        return MultiService.stopService(self)

    # -- dialing ----------------------------------------------------------------------------------
    def dial(self, addr: str) -> None:
        """Keep a link to ``addr`` (reconnecting with back-off); a no-op if already dialing it."""
        if addr in self._dialers:
            return
        factory = LinkClientFactory(self.secret, self.server_id, _Handler(self, addr), self.max_frame, self.reactor)
        policy = backoffPolicy(BACKOFF_FIRST, BACKOFF_MAX, factor=BACKOFF_FACTOR)
        endpoint = _endpoint(self.reactor, addr)
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls, endpoint)  # type: ignore[arg-type]
        service = ClientService(endpoint, factory, retryPolicy=policy, clock=self.reactor)
        self._dialers[addr] = service
        service.setServiceParent(self)

    def undial(self, addr: str) -> None:
        """Stop dialing ``addr`` (its current link, if any, is closed)."""
        service = self._dialers.pop(addr, None)
        if service is not None:
            service.disownServiceParent()

    def dialing(self) -> set[str]:
        return set(self._dialers)

    # -- sending ----------------------------------------------------------------------------------
    def send(
        self,
        server_id: str,
        frame: list[Any] | bytes,
        reroute: str | None = None,
        deadline: float | None = None,
        steady: bool = False,
    ) -> tuple[bool, str | None]:
        """Send ``frame`` (bytes: packed already, passed on as they are) to ``server_id`` now, or
        queue it while the peer has no link or does not read; a frame too large for a link is
        refused here, queued or not. A full queue refuses it unless it is ``steady`` (a run of a
        reactor turn that ``has_room`` promised a place: the half of the queue kept for it)."""
        try:
            link = self.links.get(server_id)
            if link is not None and self.takes(server_id) and _write(link, frame):
                return True, None
            queue = self.queues.get(server_id)
            if queue is None:
                queue = self.queues[server_id] = LinkQueue(self.queue_limit, QUEUE_BYTES, _queued_size)
            bound = queue.limit_reached()
            if bound is not None and not steady:
                state = "is not reading" if link is not None else "is not linked"
                return False, f"server '{server_id}' {state} and its queue is full ({bound})"
            packed = frame if type(frame) is bytes else pack_message(frame)
            check_fits(packed, self.max_frame)
        except FrameTooLarge as err:
            return False, str(err)
        queue.append(Queued(packed, reroute, deadline))
        return True, None

    def takes(self, server_id: str) -> bool:
        """Frames to ``server_id`` go to its link now: it is linked, reads, and nothing waits before them."""
        link = self.links.get(server_id)
        return link is not None and not link.stalled and not self.queues.get(server_id)

    def has_room(self, server_id: str) -> bool:
        """``server_id`` is linked and its queue is under half full: what a reactor turn sends to
        it surely fits, written to the link or queued (the other half is that turn's margin)."""
        queue = self.queues.get(server_id)
        return server_id in self.links and (queue is None or queue.has_room())

    def is_full(self, server_id: str) -> bool:
        queue = self.queues.get(server_id)
        return queue is not None and queue.limit_reached() is not None

    def take_queue(self, server_id: str) -> list[Queued]:
        """Remove and return what waits for ``server_id`` (a peer that is gone for good)."""
        queue = self.queues.pop(server_id, None)
        return queue.take() if queue is not None else []

    def _flush(self, server_id: str, link: Link) -> None:
        queue = self.queues.pop(server_id, None)
        if not queue:
            return
        now, dropped = self.now(), 0
        for item in queue:
            if item.deadline is not None and now > item.deadline:
                dropped += 1
                continue
            _write(link, item.frame)
        if dropped:
            self.log.warn(
                "{n} queued message(s) for server {peer} timed out before its link came up", n=dropped, peer=server_id
            )

    # -- link events ------------------------------------------------------------------------------
    def _authenticated(self, link: Link, via: str | None) -> None:
        peer = link.peer_id
        assert peer is not None
        if peer == self.server_id:
            self.log.info("cluster address {addr} is this server itself; not dialed", addr=via)
            link.close()
            if via is not None:
                self.itself.add(via)
                self.undial(via)
            return
        self._open.setdefault(peer, []).append(link)
        first = peer not in self.links
        if first:
            self.links[peer] = link
        self.events.peer_linked(peer, link, via)  # its hello goes first: later frames rely on it
        if first:
            self._flush(peer, link)

    def _drained(self, link: Link) -> None:
        peer = link.peer_id
        if peer is not None and self.links.get(peer) is link and self.queues.get(peer):
            self._flush(peer, link)
            self.events.peer_drained(peer)

    def _lost(self, link: Link) -> None:
        peer = link.peer_id
        if peer is None or peer == self.server_id:
            return
        others = [other for other in self._open.get(peer, []) if other is not link]
        if others:
            self._open[peer] = others
        else:
            self._open.pop(peer, None)
        if self.links.get(peer) is not link:
            return
        if others:  # it dialed us while we dialed it: the other link takes over
            self.links[peer] = others[0]
            self._flush(peer, others[0])
            return
        del self.links[peer]
        self.events.peer_unlinked(peer)
