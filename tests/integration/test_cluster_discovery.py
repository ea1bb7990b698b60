"""Discovery datagrams (stagetx.cluster.discovery): authenticated, strangers ignored; a real loopback round."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor

from stagetx.cluster.discovery import (
    Discovery,
    decode_announcement,
    encode_announcement,
)
from stagetx.config import DiscoveryGroup
from tests.support import wait_for


def test_an_announcement_round_trips_with_the_right_secret_only() -> None:
    data = encode_announcement(b"k", "srv", "127.0.0.1:7001")
    assert decode_announcement(b"k", data) == ("srv", "127.0.0.1:7001")
    assert decode_announcement(b"other", data) is None
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    assert decode_announcement(b"k", tampered) is None
    assert decode_announcement(b"k", b"STGXD1") is None
    assert decode_announcement(b"k", b"x" * 2000) is None


def test_an_announcement_of_an_address_nobody_can_dial_is_ignored() -> None:
    """A gateway handed "" (a server without a cluster port) failed in ``dial`` with a traceback."""
    for addr in ("", "nonsense", "127.0.0.1:0", "127.0.0.1:http"):
        assert decode_announcement(b"k", encode_announcement(b"k", "srv", addr)) is None


def _loopback_multicast(group: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            request = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
            probe.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
        except OSError as err:
            return f"the kernel refuses multicast on loopback: {err}"
    return None


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_two_discoveries_find_each_other_on_loopback_and_ignore_strangers() -> None:
    group = f"239.255.72.{int(time.time()) % 200 + 20}"
    reason = _loopback_multicast(group)
    if reason:
        pytest.skip(reason)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    found: list[tuple[str, str, str]] = []

    def seen(me: str) -> Callable[[str, str], None]:
        return lambda server, addr: found.append((me, server, addr))

    one = Discovery([DiscoveryGroup(group, port)], b"k", "one", "127.0.0.1:1", seen("one"), reactor, interval=0.05)
    two = Discovery([DiscoveryGroup(group, port)], b"k", "two", "127.0.0.1:2", seen("two"), reactor, interval=0.05)
    stranger = Discovery([DiscoveryGroup(group, port)], b"other", "x", "127.0.0.1:3", seen("x"), reactor, interval=0.05)
    for d in (one, two, stranger):
        d.startService()
    try:
        await wait_for(lambda: {f[0] for f in found} == {"one", "two"}, 10, "both servers discovered")
        await wait_for(lambda: one.rejected > 0 and two.rejected > 0, 10, "the stranger's announcements refused")
    finally:
        for d in (one, two, stranger):
            d.stopService()
    assert ("one", "two", "127.0.0.1:2") in found
    assert ("two", "one", "127.0.0.1:1") in found
    assert not any(server == me for me, server, _ in found)
    assert not any("x" in (me, server) for me, server, _ in found)
    assert one.rejected > 0  # the stranger's datagrams arrived and were refused


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_a_server_without_a_cluster_port_announces_nothing_and_finds_the_others() -> None:
    group = f"239.255.73.{int(time.time()) % 200 + 20}"
    reason = _loopback_multicast(group)
    if reason:
        pytest.skip(reason)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    found: list[tuple[str, str, str]] = []
    one = Discovery(
        [DiscoveryGroup(group, port)], b"k", "one", "127.0.0.1:1", lambda *f: found.append(("one", *f)), reactor, 0.05
    )
    dialer = Discovery(
        [DiscoveryGroup(group, port)], b"k", "dialer", "", lambda *f: found.append(("dialer", *f)), reactor, 0.05
    )
    for d in (one, dialer):
        d.startService()
    try:
        await wait_for(lambda: ("dialer", "one", "127.0.0.1:1") in found, 10, "the other server found")
        heard = len(found)
        await wait_for(lambda: len(found) > heard + 5, 10, "more announcements")  # several rounds of both
    finally:
        for d in (one, dialer):
            d.stopService()
    assert not [f for f in found if f[0] == "one"]
    assert one.rejected == 0  # nothing sent, rather than datagrams the others must refuse
