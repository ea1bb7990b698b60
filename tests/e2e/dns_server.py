"""A real DNS server (twisted.names) on loopback whose A records are read from a JSON file at
every query, so a test changes them while servers run: ``{"name": ["ip", ...]}``.

Run as ``python dns_server.py ZONE.json``; it prints ``ready PORT`` once it listens on
127.0.0.1:PORT (UDP, a free port).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.names import common, dns, error, server

TTL = 1


class ZoneFile(common.ResolverBase):
    """Answers from the JSON file, re-read per query."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        with open(self.path) as f:
            zone = json.load(f)
        addresses = zone.get(name.decode().lower().rstrip("."))
        if addresses is None:
            return defer.fail(error.DomainError(name))
        if type not in (dns.A, dns.ALL_RECORDS):
            return defer.succeed(([], [], []))
        answers = [dns.RRHeader(name, dns.A, dns.IN, TTL, dns.Record_A(ip, TTL), auth=True) for ip in addresses]
        return defer.succeed((answers, [], []))


def main() -> None:
    factory = server.DNSServerFactory(authorities=[ZoneFile(sys.argv[1])])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")  # type: ignore[attr-defined]
    print("ready", port.getHost().port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
