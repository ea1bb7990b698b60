"""The HTTPS policy of the curl stage: verify by default, an extra CA file, or no verification."""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without any certificate or host name check (the ``"verify": false`` setting)."""

    def __init__(self, hostname: bytes, context: SSL.Context) -> None:
        self._hostname = hostname
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        name = self._hostname.decode("ascii")
        if not (isIPAddress(name) or isIPv6Address(name)):
            connection.set_tlsext_host_name(self._hostname)  # SNI: virtual hosts need it
        return connection


@implementer(IPolicyForHTTPS)
class _NoVerification:
    def __init__(self) -> None:
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def creatorForNetloc(self, hostname: bytes, port: int) -> _Unverified:
        return _Unverified(hostname, self._context)


def https_policy(verify: bool, ca_file: str | None) -> BrowserLikePolicyForHTTPS | _NoVerification:
    """The ``IPolicyForHTTPS`` of the stage's Agent.

    :param verify: False turns every check off (development and tests only).
    :param ca_file: a PEM file of certificates to trust instead of the system's store.
    """
    if not verify:
        return _NoVerification()
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    with open(ca_file, "rb") as f:
        blocks = _PEM_CERT.findall(f.read())
    if not blocks:
        raise ValueError(f"{ca_file}: no PEM certificate found")
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    return BrowserLikePolicyForHTTPS(trustRoot=trust)
