"""WebSocket broker sockets (``ws://``, ``wss://``): one message is one frame.

The protocol work (handshake, framing, masking, fragments, ping/pong, close codes, UTF-8 checks
of text messages, the IN limit as close code 1009, the opening-handshake timeout) is autobahn's;
this module binds it to the broker's ``Endpoint``/``Connection`` model. A ``WebSocket`` is the
``Connection`` subclass the registry, the endpoint and the Lua binding see: its ``transport`` is
the TCP (or TLS) transport under the WebSocket protocol, so pausing it for a reload and idle
expiry act on it as on a tcp socket. The autobahn protocol object is kept
beside it (``protocol``): its own attribute names (``state``, ``peer``) would clash with the
socket's if one class were both.

A listener may serve one static page (``page``, see docs/broker.md) on the same port: a plain
HTTP GET without ``Upgrade`` gets it, so a browser loads the client and then connects back.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel

from stagetx.broker import addresses
from stagetx.broker.framing import BrokerURL, FrameError, FrameTooLarge
from stagetx.broker.sockets import Connection, Endpoint, connect_errno, listen_tcp
from stagetx.ratelog import RateLimitedLog

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # a message that does not decode in the socket's framing
CLOSE_TOO_BIG = 1009
HANDSHAKE_TIMEOUT = 10.0  # s for the HTTP upgrade: a slow-loris client is dropped after this
MAX_HANDSHAKE = 16 << 10  # bytes of HTTP request head a client may send before its upgrade is done
CLOSE_TIMEOUT = 2.0  # s the peer has to answer our close frame before the TCP connection is dropped
EXPIRE_GRACE = 0.5  # s an expired peer has to answer our close frame: it may be gone, nothing waits longer


class WebSocket(Connection):
    """The broker socket of one WebSocket connection (server or client side)."""

    __slots__ = ("protocol",)

    def __init__(self, endpoint: Endpoint, protocol: _Server | _Client) -> None:
        super().__init__(endpoint)
        self.protocol = protocol

    def opened(self) -> None:
        """The handshake is done: register with the endpoint (which asks the Lua accept function)."""
        self.transport = self.protocol.transport
        self.transport.bufferSize = self.endpoint.url.outbuf  # what may wait before reading pauses
        self.transport.registerProducer(self, True)  # backpressure: held while the peer does not read
        self.connected = 1
        address = self.transport.getPeer()
        self.peer = addresses.pack(address.host, address.port)
        host = self.transport.getHost()
        self.local = addresses.pack(host.host, host.port)
        self.endpoint.add(self)

    def message(self, payload: bytes) -> None:
        """One whole message (autobahn has checked its size against IN and, for text, its UTF-8)."""
        if not self.connected:
            return
        endpoint = self.endpoint
        if endpoint.expiring:
            self.last = endpoint.clock.seconds()
        endpoint.traffic.received(1, len(payload))
        self._deliver([payload])  # a bad BSON or JSON document aborts with CLOSE_POLICY

    def lost(self) -> None:
        self.connected = 0
        if self.id in self.endpoint.sockets:
            self.endpoint.remove(self)

    # -- the socket API (Connection's, by message instead of by byte stream) ----------------------
    def send_payload(self, payload: bytes, addr: bytes | None = None) -> str | None:
        if not self.connected:
            return "socket closed"
        framing = self.endpoint.framing
        try:
            framing.check_out(len(payload))
        except FrameTooLarge as err:
            self.endpoint.traffic.dropped()
            self.abort(str(err), CLOSE_TOO_BIG)
            return str(err)
        if not framing.binary:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:  # a value this framing cannot carry, as a table on a text socket
                raise FrameError(f"a {framing.name} WebSocket sends text messages, which must be UTF-8") from None
        protocol = self.protocol
        if protocol.state != protocol.STATE_OPEN:
            return "socket closing"  # the peer's close frame has come; the connection is going
        limit = protocol.maxMessagePayloadSize  # autobahn applies it both ways; the broker's OUT is checked
        protocol.maxMessagePayloadSize = 0
        try:
            protocol.sendMessage(payload, isBinary=framing.binary)
        finally:
            protocol.maxMessagePayloadSize = limit
        return self.sent(len(payload))

    def close(self) -> None:
        """Send a normal close frame; the peer's answer (or ``CLOSE_TIMEOUT``) ends the connection."""
        if self.connected:
            self.connected = 0
            self.protocol.sendClose(CLOSE_NORMAL)

    def expire(self) -> None:
        """Idle: a normal close frame, and the TCP connection dropped ``EXPIRE_GRACE`` later if the
        peer has not answered (a vanished peer's unsent output is not kept for minutes)."""
        if self.connected:
            self.close()
            self.endpoint.clock.callLater(EXPIRE_GRACE, self._drop)

    def _drop(self) -> None:
        if self.protocol.state != self.protocol.STATE_CLOSED:
            self.transport.abortConnection()

    def abort(self, reason: str, code: int = CLOSE_POLICY) -> None:
        """Close with ``code`` because of ``reason`` (logged, at a bounded rate); nothing more is
        sent or delivered."""
        self.endpoint.warnings.warn(
            "broker socket {sid} ({peer}) closed: {reason}", sid=self.id, peer=self.peer_text(), reason=reason
        )
        self.close_errno = self.close_errno or errno.ECONNABORTED
        if self.connected:
            self.connected = 0
            self.protocol.sendCloseFrame(code, reason.encode("ascii", "replace")[:120])  # 123 bytes at most


class _ClientLog:
    """autobahn's logger of one connection with what it says about the peer (a failed handshake,
    a protocol error: a line per bad connection) sent through the endpoint's rate-limited
    ``warnings``, so a client failing in a loop cannot fill the log; other levels pass through."""

    __slots__ = ("_log", "_warnings")

    def __init__(self, log: Any, warnings: RateLimitedLog) -> None:
        self._log = log
        self._warnings = warnings

    def info(self, format: str, **fields: Any) -> None:
        self._emit(LogLevel.info, format, fields)

    def warn(self, format: str, **fields: Any) -> None:
        self._emit(LogLevel.warn, format, fields)

    def error(self, format: str, **fields: Any) -> None:
        self._emit(LogLevel.error, format, fields)

    def _emit(self, level: LogLevel, format: str, fields: dict[str, Any]) -> None:
        if not fields:  # a plain text (autobahn passes some so): never a format, braces and all
            format, fields = "{message}", {"message": format}
        self._warnings.emit(level, format, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


class _Server(WebSocketServerProtocol):
    """autobahn's server protocol for one client of a ``ws``/``wss`` listener."""

    factory: _ServerFactory

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__()
        self.sock = WebSocket(endpoint, self)
        self.log = _ClientLog(self.log, endpoint.warnings)

    def connectionMade(self) -> None:
        super().connectionMade()
        _no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.state == self.STATE_CONNECTING and len(self.data) > MAX_HANDSHAKE:
            self.sock.endpoint.warnings.warn(
                "broker: {peer} sent an HTTP request head over 16 KiB; dropped", peer=self.peer
            )
            self.dropConnection(abort=True)

    def onConnect(self, request: ConnectionRequest) -> None:
        endpoint = self.sock.endpoint
        if request.path != endpoint.url.path:
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, f"no WebSocket at {request.path}")
        # the endpoint's limit now, not the factory's copy: a reload may have changed the framing
        self.maxMessagePayloadSize = self.maxFramePayloadSize = endpoint.framing.limit_in

    def onOpen(self) -> None:
        self.sock.opened()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sock.message(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.sock.lost()

    def sendServerStatus(self, redirectUrl: str | None = None, redirectAfter: int = 0) -> None:
        """A plain GET (no ``Upgrade``): the listener's page at ``/``, else 404.

        Answered, the exchange is over: marked clean, so autobahn's close that follows is not
        logged as a warning for every page a browser loads."""
        self.wasClean = True
        page = self.factory.page
        if page is not None and self.http_request_path in ("/", "/index.html"):
            self.sendHtml(page)
        else:
            self.sendHttpErrorResponse(404, "Not Found")


def _no_delay(transport: Any) -> None:
    """Small frames must not wait for the peer's delayed ACK (Nagle: about 40 ms for the second
    of two frames sent back to back), as on the TCP broker sockets. autobahn means to set it but
    reads its option before the factory has copied it to the protocol, and lets that pass."""
    transport.setTcpNoDelay(True)


def _protocol_options(endpoint: Endpoint) -> dict[str, Any]:
    """The autobahn options of both ends: IN bounds a message and a frame, the handshakes have
    deadlines, and a failed connection gets its close code (1009, 1002, 1007) before the drop."""
    limit = endpoint.framing.limit_in
    return {
        "maxMessagePayloadSize": limit,
        "maxFramePayloadSize": limit,
        "openHandshakeTimeout": HANDSHAKE_TIMEOUT,
        "closeHandshakeTimeout": CLOSE_TIMEOUT,
        "failByDrop": False,
    }


class _ServerFactory(WebSocketServerFactory):
    noisy = False

    def __init__(self, endpoint: Endpoint, reactor: Any, page: str | None) -> None:
        super().__init__(reactor=reactor)
        self.endpoint = endpoint
        self.page = page
        # plain GETs reach sendServerStatus: the page or a 404
        self.setProtocolOptions(**_protocol_options(endpoint), webStatus=True)

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = _Server(self.endpoint)
        protocol.factory = self
        return protocol


class _Client(WebSocketClientProtocol):
    """autobahn's client protocol of one ``broker.join("ws://…")``."""

    factory: _ClientFactory

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__()
        self.sock = WebSocket(endpoint, self)
        self.log = _ClientLog(self.log, endpoint.warnings)
        self.opened = False

    def connectionMade(self) -> None:
        super().connectionMade()
        _no_delay(self.transport)

    def onOpen(self) -> None:
        self.opened = True
        self.sock.opened()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sock.message(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.opened:
            self.sock.lost()
            return
        endpoint = self.sock.endpoint
        if endpoint.port is not None:  # the handshake failed: a failed join, like a refused connect
            endpoint.port = None
            why = reason or getattr(self, "wasNotCleanReason", None) or "the WebSocket handshake failed"
            endpoint.handler.failed(endpoint, str(why), errno.ECONNABORTED)


class _ClientFactory(WebSocketClientFactory):
    noisy = False

    def __init__(self, endpoint: Endpoint, reactor: Any) -> None:
        url = endpoint.url
        super().__init__(url=ws_url(url), reactor=reactor)
        self.endpoint = endpoint
        self.setProtocolOptions(**_protocol_options(endpoint))

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = _Client(self.endpoint)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.endpoint.port = None
        self.endpoint.handler.failed(self.endpoint, reason.getErrorMessage(), connect_errno(reason))


def ws_url(url: BrokerURL) -> str:
    """The ``ws://host:port/path`` a client asks for (the framing stays on the broker's side)."""
    return f"{url.scheme}://{addresses.text(url.host, url.port)}{url.path}"


def listen_ws(
    reactor: Any, endpoint: Endpoint, services: Mapping[str, int], tls: Any = None, page: str | None = None
) -> None:
    """Listen for WebSocket clients (over TLS with the server context ``tls``), sharing a
    ``#services`` socket as ``listen_tcp`` does; ``page`` is served to plain GETs of ``/``."""
    listen_tcp(reactor, endpoint, services, _ServerFactory(endpoint, reactor, page), tls)


def connect_ws(reactor: Any, endpoint: Endpoint, tls: Any = None, timeout: float = 30.0) -> None:
    """Dial a WebSocket server (``wss``: with the client context ``tls``) for ``broker.join``."""
    url = endpoint.url
    factory = _ClientFactory(endpoint, reactor)
    if tls is not None:
        endpoint.port = reactor.connectSSL(url.host, url.port, factory, tls, timeout=timeout)
    else:
        endpoint.port = reactor.connectTCP(url.host, url.port, factory, timeout=timeout)


def set_page(endpoint: Endpoint, page: str | None) -> None:
    """Serve ``page`` (HTML) to plain GETs of ``/`` on this ws/wss listener (None: 404)."""
    factory = getattr(endpoint.port, "factory", None)
    factory = getattr(factory, "wrappedFactory", factory)  # under TLS
    if isinstance(factory, _ServerFactory):
        factory.page = page
