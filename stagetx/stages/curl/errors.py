"""curl's error numbers, and the mapping of Twisted/treq failures onto them.

Lua code written for the original platform tests ``data.result`` against libcurl's ``CURLcode``
values, so failures are reported with the same numbers and a human message.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web import error as web_error
from twisted.web._newclient import (
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from stagetx.stages.curl.response import BodyTooLarge, HeadTooLarge

OK = 0
UNSUPPORTED_PROTOCOL = 1
INTERNAL = 2  # libcurl's CURLE_FAILED_INIT: used for failures nothing else describes
URL_MALFORMAT = 3
WEIRD_SERVER_REPLY = 8
COULDNT_RESOLVE_HOST = 6
COULDNT_CONNECT = 7
OPERATION_TIMEDOUT = 28
SSL_CONNECT_ERROR = 35
ABORTED = 42
BAD_FUNCTION_ARGUMENT = 43
TOO_MANY_REDIRECTS = 47
GOT_NOTHING = 52
SEND_ERROR = 55
RECV_ERROR = 56
PEER_FAILED_VERIFICATION = 60
FILESIZE_EXCEEDED = 63

_WRAPPERS = (
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestGenerationFailed,
)


def _reasons(failure: Failure) -> list[Failure]:
    """The failure itself followed by the failures Twisted's HTTP client wrapped inside it."""
    found = [failure]
    if isinstance(failure.value, _WRAPPERS):
        for inner in failure.value.reasons:
            found.extend(_reasons(inner))
    return found


def _tls(reasons: list[Failure]) -> tuple[int, str] | None:
    """A TLS failure among ``reasons``: certificate problems apart from other handshake errors."""
    for reason in reasons:
        if reason.check(SSL.Error):
            text = str(reason.value)
            if "certificate verify failed" in text:
                return PEER_FAILED_VERIFICATION, f"SSL peer certificate was not OK: {text}"
            return SSL_CONNECT_ERROR, f"SSL connect error: {text}"
        if type(reason.value).__name__ == "VerificationError":  # service_identity: host name mismatch
            return (
                PEER_FAILED_VERIFICATION,
                f"SSL certificate does not match the host name: {reason.value}",
            )
    return None


def _weird(failure: Failure) -> str | None:
    """What was malformed in a reply that is not HTTP (status line, a header line, a length), or
    None; Twisted's response parser raises ``ParseError`` or a plain ``ValueError`` for these."""
    if not isinstance(failure.value, (ResponseFailed, ResponseNeverReceived)):
        return None
    for reason in _reasons(failure)[1:]:
        value = reason.value
        if isinstance(value, ParseError) or type(value) is ValueError:
            return ": ".join(a.decode("latin-1") if isinstance(a, bytes) else str(a) for a in value.args)
    return None


def classify(failure: Failure, timeout_ms: float | None) -> tuple[int, str]:
    """``(curl error number, message)`` for a failed transfer.

    ``timeout_ms`` is the limit that was applied, named in the timeout message.
    """
    reasons = _reasons(failure)
    tls = _tls(reasons)
    if tls is not None:
        return tls
    for reason in reasons:
        value = reason.value
        if isinstance(value, defer.TimeoutError):
            return OPERATION_TIMEDOUT, f"Operation timed out after {timeout_ms:g} milliseconds"
        if isinstance(value, (defer.CancelledError, error.ConnectingCancelledError)):
            return ABORTED, "Request aborted: the stage is stopping"
        if isinstance(value, error.DNSLookupError):
            return COULDNT_RESOLVE_HOST, f"Could not resolve host: {value}"
        if isinstance(value, (error.TCPTimedOutError, error.TimeoutError)):
            return OPERATION_TIMEDOUT, f"Connection timed out: {value}"
        if isinstance(value, error.ConnectError):
            return COULDNT_CONNECT, f"Failed to connect: {value}"
        if isinstance(value, web_error.SchemeNotSupported):
            return UNSUPPORTED_PROTOCOL, f"Protocol not supported: {value}"
        if isinstance(value, HeadTooLarge):
            return RECV_ERROR, f"Too large response headers: {value}"
        if isinstance(value, BodyTooLarge):
            return FILESIZE_EXCEEDED, f"Maximum file size exceeded: {value}"
        if isinstance(value, web_error.InfiniteRedirection):
            return TOO_MANY_REDIRECTS, "Maximum number of redirects followed"
    weird = _weird(failure)
    if weird is not None:
        return WEIRD_SERVER_REPLY, f"Weird server reply: {weird}"
    value = failure.value
    if isinstance(value, ResponseNeverReceived):
        return GOT_NOTHING, "Server returned nothing (no headers, no data)"
    if isinstance(value, ResponseFailed):
        return RECV_ERROR, "Failure when receiving data from the peer"
    if isinstance(value, (RequestTransmissionFailed, RequestGenerationFailed)):
        return SEND_ERROR, "Failed sending data to the peer"
    return INTERNAL, f"{type(value).__name__}: {value}"
