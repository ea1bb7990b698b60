"""DNS discovery's bookkeeping (stagetx.cluster.dns) with fake time and a fake resolver; the real
lookups against a real DNS server are in tests/e2e/test_cluster_dns.py."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error

from stagetx.cluster.dns import DnsDiscovery, addresses
from stagetx.config import DnsName, HostPort


class FakeResolver:
    def __init__(self) -> None:
        self.answers: list[Any] = []

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        records = [dns.RRHeader(name.encode(), dns.A, payload=dns.Record_A(ip)) for ip in answer]
        return defer.succeed((records, [], []))


def test_each_answer_is_reported_and_a_failed_lookup_keeps_the_last_one() -> None:
    clock = Clock()
    seen: list[tuple[set[str], set[str]]] = []
    entry = DnsName("game.test", 7101, HostPort("127.0.0.1", 53), 2.0)
    discovery = DnsDiscovery([entry], lambda found, gone: seen.append((found, gone)), clock)
    resolver = FakeResolver()
    discovery.names[0].resolver = resolver
    resolver.answers = [["10.0.0.1", "10.0.0.2"], error.DNSServerError("down"), ["10.0.0.2"]]
    discovery.startService()  # looks up at once
    assert seen == [({"10.0.0.1:7101", "10.0.0.2:7101"}, set())]
    clock.advance(2.0)  # the DNS server fails: nothing is reported gone
    assert len(seen) == 1 and discovery.names[0].error is not None
    clock.advance(2.0)
    assert seen[-1] == ({"10.0.0.2:7101"}, {"10.0.0.1:7101"})
    discovery.stopService()


def test_only_a_records_are_addresses() -> None:
    answers = [
        dns.RRHeader(b"game.test", dns.CNAME, payload=dns.Record_CNAME(b"pods.test")),
        dns.RRHeader(b"pods.test", dns.A, payload=dns.Record_A("10.0.0.7")),
    ]
    assert addresses(answers) == {"10.0.0.7"}
