"""TLS for broker sockets: ``tls://`` connections and the contexts of ``tls://``/``wss://``
from the ``#tls`` configuration.

Twisted's ``CertificateOptions``/``optionsForClientTLS`` do the work (TLS 1.2+, hostname or IP
address checks with service_identity); this module only reads the configured PEM files. A
listener needs ``#tls.cert`` and ``#tls.key``; with ``#tls.client_ca`` it also requires a client
certificate signed by one of those CAs. ``broker.join`` trusts ``#tls.ca`` (else the system's
store) and presents ``cert``/``key`` when they are configured.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet import protocol, ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from stagetx.broker import addresses
from stagetx.broker.framing import BrokerAddressError, BrokerURL
from stagetx.broker.sockets import Connection, Endpoint, connect_errno, listen_tcp

if TYPE_CHECKING:
    from stagetx.config import TlsConfig

SECURE_SCHEMES = ("tls", "wss")
HANDSHAKE_TIMEOUT = 10.0  # s for a TLS handshake (either side): one that stalls is dropped, as on ws://


@implementer(IHandshakeListener)
class TlsConnection(Connection):
    """A ``tls://`` connection: the broker (and Lua's accept function) sees it once the TLS
    handshake is done, so a peer that fails it (a wrong CA, no client certificate) never reaches
    Lua; a ``broker.join`` whose handshake fails reports it as a failed join."""

    __slots__ = ("joining", "deadline")

    def __init__(self, endpoint: Endpoint, joining: bool) -> None:
        super().__init__(endpoint)
        self.joining = joining
        self.deadline: Any = None  # the handshake's timer: until it is done no expiry covers the socket

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # the handshake's own round trips must not wait either
        self.deadline = self.endpoint.clock.callLater(HANDSHAKE_TIMEOUT, self._stalled)

    def _stalled(self) -> None:
        """A peer silent or trickling through its handshake would hold the descriptor for ever (and a
        join's ``f`` or ``close`` would never run): dropped, a join then fails."""
        self.deadline = None
        self.endpoint.warnings.warn(
            "broker: {peer} did not finish its TLS handshake within {timeout} s; dropped",
            peer=_peer_text(self.transport),
            timeout=HANDSHAKE_TIMEOUT,
        )
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._cancel_deadline()
        super().connectionMade()

    def _cancel_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self.connected = 0
        if self.id in self.endpoint.sockets:
            self.lost_with(reason)
            self.endpoint.remove(self)
        elif self.joining and self.endpoint.port is not None:
            self.endpoint.port = None
            self.endpoint.handler.failed(self.endpoint, f"TLS: {reason.getErrorMessage()}", errno.ECONNABORTED)


def _peer_text(transport: Any) -> str:
    peer = transport.getPeer()
    return addresses.text(peer.host, peer.port)


class _ListenFactory(protocol.Factory):
    noisy = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def buildProtocol(self, addr: Any) -> TlsConnection:  # type: ignore[override]
        return TlsConnection(self.endpoint, joining=False)


class _JoinFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def buildProtocol(self, addr: Any) -> TlsConnection:  # type: ignore[override]
        return TlsConnection(self.endpoint, joining=True)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.endpoint.port = None
        self.endpoint.handler.failed(self.endpoint, reason.getErrorMessage(), connect_errno(reason))


def listen_tls(reactor: Any, endpoint: Endpoint, services: Mapping[str, int], context: Any) -> None:
    """A ``tls://`` listener (sharing a ``#services`` socket as ``listen_tcp`` does)."""
    listen_tcp(reactor, endpoint, services, _ListenFactory(endpoint), context)


def connect_tls(reactor: Any, endpoint: Endpoint, context: Any, timeout: float = 30.0) -> None:
    """A ``tls://`` ``broker.join``: ``f`` runs once the server's certificate passed ``context``."""
    url = endpoint.url
    endpoint.port = reactor.connectSSL(url.host, url.port, _JoinFactory(endpoint), context, timeout=timeout)


_BEGIN = b"-----BEGIN CERTIFICATE-----"


def _read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def _certificates(path: str) -> list[ssl.Certificate]:
    """Every certificate of a PEM file, in file order."""
    pem = _read(path)
    return [ssl.Certificate.loadPEM(_BEGIN + part) for part in pem.split(_BEGIN)[1:]]


def server_context(settings: TlsConfig, url: BrokerURL) -> Any:
    """The context factory of a ``tls``/``wss`` listener."""
    if settings.cert is None or settings.key is None:
        raise BrokerAddressError(f"{url.scheme}:// listeners need #tls.cert and #tls.key in the configuration")
    chain = _certificates(settings.cert)
    mine = ssl.PrivateCertificate.loadPEM(_read(settings.cert) + b"\n" + _read(settings.key))
    options: dict[str, Any] = {}
    if settings.client_ca is not None:
        options["trustRoot"] = ssl.trustRootFromCertificates(_certificates(settings.client_ca))
    context = ssl.CertificateOptions(
        privateKey=mine.privateKey.original,
        certificate=mine.original,
        extraCertChain=[c.original for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        **options,
    )
    # Twisted's own ALPN callback fails the handshake when nothing the client offers is acceptable
    # (browsers and curl offer h2 and http/1.1): pick http/1.1 for wss, else go on without ALPN
    wanted = (b"http/1.1",) if url.scheme == "wss" else ()
    context.getContext().set_alpn_select_callback(lambda connection, offered: _choose(wanted, offered))
    return context


def _choose(wanted: tuple[bytes, ...], offered: list[bytes]) -> Any:
    return next((p for p in wanted if p in offered), SSL.NO_OVERLAPPING_PROTOCOLS)


def client_context(settings: TlsConfig, url: BrokerURL) -> Any:
    """The context factory of a ``tls``/``wss`` ``broker.join``: checks the server's name (or IP)."""
    trust = ssl.trustRootFromCertificates(_certificates(settings.ca)) if settings.ca is not None else None
    client = None
    if settings.cert is not None and settings.key is not None:
        client = ssl.PrivateCertificate.loadPEM(_read(settings.cert) + b"\n" + _read(settings.key))
    return ssl.optionsForClientTLS(url.host, trustRoot=trust, clientCertificate=client)
