"""Discovery without multicast: the servers of a cluster are the addresses of a DNS name.

For each ``"dns://NAME:PORT"`` of ``#cluster`` the name's A records are looked up at start and
every ``every`` seconds (``twisted.names``: the system's resolvers, or the entry's ``server``);
each address with PORT is a cluster address. ``changed`` is told every answer and what
disappeared since the last one. A failed lookup (timeout, no such name) keeps the last answer
and is logged when its reason changes, so a DNS hiccup does not unlink a cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.python.failure import Failure

from stagetx.config import DnsName

#: The resolver's retry timeouts of one lookup (s): it fails after their sum, 4 s.
LOOKUP_TIMEOUT = (1, 3)


def addresses(answers: list[Any]) -> set[str]:
    """The IPv4 addresses of the A records among ``answers`` (CNAMEs and others skipped)."""
    return {a.payload.dottedQuad() for a in answers if a.type == dns.A and isinstance(a.payload, dns.Record_A)}


class _Name:
    """The lookups of one entry."""

    def __init__(self, owner: DnsDiscovery, entry: DnsName) -> None:
        self.owner = owner
        self.entry = entry
        if entry.server is not None:
            self.resolver: Any = client.Resolver(
                servers=[(entry.server.host, entry.server.port)], reactor=owner.reactor
            )
        else:
            self.resolver = client.createResolver()  # /etc/hosts, then resolv.conf's servers
        self.known: set[str] = set()
        self.error: str | None = None
        self.busy = False
        self.loop = LoopingCall(self.lookup)
        self.loop.clock = owner.reactor

    def lookup(self) -> None:
        if self.busy:  # the last lookup has not finished: do not pile them up
            return
        self.busy = True
        d = self.resolver.lookupAddress(self.entry.name, timeout=LOOKUP_TIMEOUT)
        d.addCallbacks(self.answered, self.failed)
        d.addBoth(self.done)

    def done(self, _: object) -> None:
        self.busy = False

    def answered(self, result: tuple[list[Any], list[Any], list[Any]]) -> None:
        found = {f"{ip}:{self.entry.port}" for ip in addresses(result[0])}
        if self.error is not None:
            self.owner.log.info("dns discovery {name}: answers again", name=str(self.entry))
            self.error = None
        removed, self.known = self.known - found, found
        self.owner.changed(found, removed)

    def failed(self, failure: Failure) -> None:
        reason = failure.getErrorMessage() or failure.type.__name__  # type: ignore[union-attr]
        if reason != self.error:
            self.owner.log.warn(
                "dns discovery {name}: lookup failed ({reason}); keeping {n} known address(es)",
                name=str(self.entry),
                reason=reason,
                n=len(self.known),
            )
            self.error = reason


class DnsDiscovery(Service):
    """Looks up each ``dns://`` entry periodically and reports the addresses to ``changed``.

    @param changed: called with ``(addresses now, addresses gone)`` of one entry at each answer
        (``"ip:port"`` strings).
    """

    log = Logger()

    def __init__(self, entries: list[DnsName], changed: Callable[[set[str], set[str]], None], reactor: Any) -> None:
        self.changed = changed
        self.reactor = reactor
        self.names = [_Name(self, entry) for entry in entries]

    def startService(self) -> None:
        Service.startService(self)
        for name in self.names:
            name.loop.start(name.entry.every, now=True)

    def stopService(self) -> Any:
        Service.stopService(self)
        for name in self.names:
            if name.loop.running:
                name.loop.stop()
