"""A real ``stagetx.wire.Link`` driven over a blocking socket: the tests' outside attacker.

With the right secret it is a fully authenticated peer (it can then replay or cut frames); with
a wrong one it shows what a stranger gets. ``SocketTransport`` records every write, so a test can
send the bytes of an earlier frame again.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock

from stagetx.wire import Link, LinkClientFactory


class SocketTransport:
    """Enough of a transport for a ``Link`` over a blocking socket (writes go straight out)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        peer = sock.getpeername()  # read now: a reset socket cannot tell it any more
        self.peer = UNIXAddress(peer) if isinstance(peer, str) else IPv4Address("TCP", *peer[:2])
        self.written: list[bytes] = []
        self.dropped = False

    def write(self, data: bytes) -> None:
        self.written.append(data)
        try:
            self.sock.sendall(data)
        except OSError:  # the server already reset the connection: like Twisted, drop the write
            self.dropped = True

    def getPeer(self) -> Any:
        return self.peer

    def loseConnection(self) -> None:
        self.dropped = True  # the socket stays open: the test watches the server close its end

    abortConnection = loseConnection

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass  # writes never wait here: nothing to pause

    def unregisterProducer(self) -> None:
        pass


class _Quiet:
    def link_authenticated(self, link: Link) -> None: ...
    def message_received(self, link: Link, obj: Any) -> None: ...
    def link_lost(self, link: Link, reason: Any) -> None: ...


def connect(address: str | tuple[str, int]) -> socket.socket:
    """A blocking socket to a UNIX path or a (host, port) over TCP, with a 5 s timeout."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(address)
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Read until the server closes the connection (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def handshake(address: str | tuple[str, int], secret: bytes, node: str) -> tuple[Link, SocketTransport]:
    """A client ``Link`` over a real socket, driven until it authenticates or fails (5 s at most)."""
    transport = SocketTransport(connect(address))
    link = LinkClientFactory(secret, node, _Quiet(), clock=Clock()).buildProtocol(None)  # type: ignore[arg-type]
    link.makeConnection(transport)  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while not link.authenticated and not link._dead and time.monotonic() < deadline:
        try:
            data = transport.sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:  # the server refused us first (it aborts: a reset)
            break
        if not data:
            break
        link.dataReceived(data)
    return link, transport


def send_now(link: Link, transport: SocketTransport, obj: Any) -> bytes:
    """Send ``obj`` on ``link`` at once; the bytes of its data frame."""
    link.send(obj)
    link.settings.clock.advance(0)  # type: ignore[union-attr]  # the Clock handshake() gave it
    return transport.written[-1]
