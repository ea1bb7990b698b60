"""UDP multicast discovery on one chosen interface per group: announce this server, learn the others.

Every ``interval`` seconds (and once at start) the gateway sends one datagram to each
``"udp://GROUP:PORT?interface=ADDR&ttl=N"`` of ``#cluster``: its server id and cluster address,
authenticated with ``#secret`` (HMAC-SHA256, so a stranger on the group cannot make us dial it,
and a datagram of another cluster is ignored). Datagrams that do not verify are dropped silently
(counted), and so are those whose address cannot be dialed. A server without a cluster port
announces nothing (there is nothing to dial): it finds the others and dials them.

The socket joins the group on the interface of address ADDR only and sends through it only, with
TTL N and loopback mode on (servers of the same host hear each other). The default, 127.0.0.1 and
TTL 1, keeps every datagram on this machine.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import msgpack
from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from stagetx.config import ConfigError, DiscoveryGroup, parse_host_port

MAGIC = b"STGXD1"
TAG_SIZE = 16
#: Seconds between announcements.
ANNOUNCE_INTERVAL = 0.5


def encode_announcement(secret: bytes, server_id: str, addr: str) -> bytes:
    """One announcement datagram: magic, tag, msgpack ``[server_id, addr]``."""
    body = msgpack.packb([server_id, addr], use_bin_type=True)
    return MAGIC + hmac.digest(secret, MAGIC + body, hashlib.sha256)[:TAG_SIZE] + body


def decode_announcement(secret: bytes, data: bytes) -> tuple[str, str] | None:
    """``(server_id, addr)`` from a datagram, or None when it is not one of ours."""
    head = len(MAGIC) + TAG_SIZE
    if len(data) <= head or not data.startswith(MAGIC) or len(data) > 1024:
        return None
    body = data[head:]
    expected = hmac.digest(secret, MAGIC + body, hashlib.sha256)[:TAG_SIZE]
    if not hmac.compare_digest(data[len(MAGIC) : head], expected):
        return None
    try:
        server_id, addr = msgpack.unpackb(body, raw=False)
    except Exception:  # a datagram with a valid tag but bad body: a peer's bug, ignore it
        return None
    if not (isinstance(server_id, str) and isinstance(addr, str)):
        return None
    try:
        parse_host_port(addr, "addr")  # what a server can dial; a peer's bug otherwise
    except ConfigError:
        return None
    return server_id, addr


class _Announcer(DatagramProtocol):
    """The socket of one multicast group."""

    def __init__(self, discovery: Discovery, config: DiscoveryGroup) -> None:
        self.discovery = discovery
        self.group = config.host
        self.port = config.port
        self.interface = config.interface
        self.ttl = config.ttl

    def startProtocol(self) -> None:
        transport: Any = self.transport
        transport.setTTL(self.ttl)
        transport.setLoopbackMode(1)
        transport.setOutgoingInterface(self.interface).addErrback(self._failed, "set the outgoing interface")
        transport.joinGroup(self.group, self.interface).addCallbacks(self._joined, self._failed, errbackArgs=("join",))

    def _joined(self, _: object) -> None:
        self.discovery.log.info(
            "discovery joined {group}:{port} on {iface} (ttl {ttl})",
            group=self.group,
            port=self.port,
            iface=self.interface,
            ttl=self.ttl,
        )
        self.announce()

    def _failed(self, failure: Any, what: str) -> None:
        self.discovery.log.error(
            "discovery on {group}:{port}: could not {what}: {error}",
            group=self.group,
            port=self.port,
            what=what,
            error=failure.getErrorMessage(),
        )

    def announce(self) -> None:
        if self.transport is not None and self.discovery.addr:  # no cluster port: nothing to dial
            self.transport.write(self.discovery.datagram(), (self.group, self.port))

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.discovery.received(data)


class Discovery(Service):
    """Announces ``addr`` on each group and reports other servers' announcements to ``found``.

    @param groups: the ``udp://`` entries of ``#cluster``.
    @param found: called with ``(server_id, addr)`` for each verified announcement of another server.
    """

    log = Logger()

    def __init__(
        self,
        groups: list[DiscoveryGroup],
        secret: bytes,
        server_id: str,
        addr: str,
        found: Callable[[str, str], None],
        reactor: Any,
        interval: float = ANNOUNCE_INTERVAL,
    ) -> None:
        self.groups = groups
        self.secret = secret
        self.server_id = server_id
        self.addr = addr
        self.found = found
        self.reactor = reactor
        self.interval = interval
        self.rejected = 0
        self._sockets: list[tuple[_Announcer, IListeningPort]] = []
        self._loop = LoopingCall(self._announce)
        self._loop.clock = reactor

    def datagram(self) -> bytes:
        return encode_announcement(self.secret, self.server_id, self.addr)

    def startService(self) -> None:
        Service.startService(self)
        for group in self.groups:
            proto = _Announcer(self, group)
            # bound to the group address: only this group's datagrams arrive on the socket
            listening = self.reactor.listenMulticast(group.port, proto, interface=group.host, listenMultiple=True)
            self._sockets.append((proto, listening))
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        sockets, self._sockets = self._sockets, []
        for _, listening in sockets:
            listening.stopListening()

    def _announce(self) -> None:
        for proto, _ in self._sockets:
            try:
                proto.announce()
            except OSError as e:
                self.log.warn("discovery announcement on {group} failed: {error}", group=proto.group, error=str(e))

    def received(self, data: bytes) -> None:
        decoded = decode_announcement(self.secret, data)
        if decoded is None:
            self.rejected += 1
            return
        server_id, addr = decoded
        if server_id != self.server_id:
            self.found(server_id, addr)
