"""Reading a response for the curl stage: head and body (bounded, cancellable), redirect chain,
cookies, charset."""

from __future__ import annotations

import zlib
from email.message import Message as MimeHeader
from http.cookiejar import Cookie, CookieJar
from typing import cast
from urllib.parse import urlsplit
from urllib.request import Request as UrlRequest

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol, ResponseFailed
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer


class BodyTooLarge(Exception):
    """The body is longer than the stage's ``max-size``: the download was stopped."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")
        self.limit = limit


#: The most bytes of a response's status line and headers, as curl's ``MAX_HTTP_RESP_HEADER_SIZE``.
MAX_HEAD = 300 * 1024


class HeadTooLarge(Exception):
    """The status line and headers went on past `MAX_HEAD`: the connection was dropped."""

    def __init__(self) -> None:
        super().__init__(f"the status line and headers are longer than {MAX_HEAD} bytes")


class BoundedHeadProtocol(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client protocol that gives up on a response whose head passes
    `MAX_HEAD`.

    Twisted's parser bounds each header line (16 KiB) but not their number, so a server sending
    header lines without end grew the process until the timeout.
    """

    _head_of: object = None  # the parser (one per request) whose head is being counted
    _head = 0

    def dataReceived(self, bytes: bytes) -> None:
        parser = self._parser
        if parser is not None and parser.state in (STATUS, HEADER):
            if parser is not self._head_of:
                self._head_of, self._head = parser, 0
            if self._head > MAX_HEAD:  # counted before this chunk: no false alarm at the end of a head
                self._giveUp(Failure(HeadTooLarge()))
                return
            self._head += len(bytes)
        super().dataReceived(bytes)


class _BodyReader(Protocol):
    """Collects a body of at most ``limit`` bytes; cancelling ``done`` drops the connection.

    treq's ``content()`` cannot be cancelled, so a total timeout could not stop a slow download,
    and it keeps any length in memory: an endless body would grow the process without bound.
    """

    def __init__(self, limit: int | None) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.cancelled = False
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        """Drop the connection; ``Deferred.cancel`` then fails ``done`` with CancelledError."""
        self.cancelled = True
        if self.transport is not None:  # deliverBody's transport is the response's IPushProducer
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:  # over the limit already: the connection is being dropped
            return
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            self.too_large()
            return
        self.chunks.append(data)

    def too_large(self) -> None:
        """Fail ``done`` with `BodyTooLarge`, forget what was read and drop the connection."""
        assert self.limit is not None
        self.chunks.clear()
        self.done.errback(BodyTooLarge(self.limit))
        cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.cancelled or self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse, limit: int | None) -> Deferred[bytes]:
    """The whole body of ``response``; cancelling the Deferred aborts the download.

    :param limit: the most bytes kept (None: no limit). A longer body, announced by its
        ``Content-Length`` or found while reading, fails with `BodyTooLarge` and the connection
        is dropped, so memory stays bounded even for an endless body.
    """
    reader = _BodyReader(limit)
    response.deliverBody(reader)
    announced = response.length
    if limit is not None and announced is not UNKNOWN_LENGTH and announced > limit and not reader.done.called:
        reader.too_large()  # as curl does: not a byte of a body known to be too long is read
    return reader.done


#: Decoded bytes of a gzip body handed on at a time: Twisted's decoder inflates each received chunk
#: whole, and 64 KiB of a gzip bomb are 64 MiB.
INFLATE_CHUNK = 64 * 1024


@implementer(IAgent)
class GzipAgent:
    """Decodes gzip bodies in steps of `INFLATE_CHUNK` and stops past ``limit`` decoded bytes
    (None: no limit), so a body that inflates past ``max-size`` never sits in memory whole.

    treq decodes gzip too, with Twisted's ``GzipDecoder`` above the redirects; this agent sits
    below them (it asks for nothing: treq's decoder sends ``Accept-Encoding: gzip``), so treq's
    finds no encoding left to decode.
    """

    def __init__(self, agent: IAgent, limit: int | None) -> None:
        self._agent = agent
        self._limit = limit

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(self._decoded)

    def _decoded(self, response: IResponse) -> IResponse:
        encodings = b",".join(response.headers.getRawHeaders(b"content-encoding", [])).split(b",")
        if encodings[-1].strip().lower() != b"gzip":
            return response
        if encodings[:-1]:
            response.headers.setRawHeaders(b"content-encoding", [b",".join(encodings[:-1])])
        else:
            response.headers.removeHeader(b"content-encoding")
        return _GzipResponse(response, self._limit)


class _GzipResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """``response`` with its body delivered decoded, in bounded steps."""

    def __init__(self, response: IResponse, limit: int | None) -> None:
        self.original = response
        self.length = UNKNOWN_LENGTH
        self._limit = limit

    def deliverBody(self, protocol: IProtocol) -> None:
        self.original.deliverBody(_GzipBody(protocol, self.original, self._limit))


class _GzipBody(proxyForInterface(IProtocol)):  # type: ignore[misc]
    """Inflates each received chunk `INFLATE_CHUNK` bytes at a time into ``original``; past
    ``limit`` decoded bytes it inflates nothing more (``original``, the body reader, has failed
    the request and dropped the connection by then)."""

    def __init__(self, original: IProtocol, response: IResponse, limit: int | None) -> None:
        self.original = original
        self._response = response
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._left = limit  # decoded bytes still allowed (None: no limit)

    def dataReceived(self, data: bytes) -> None:
        while data and (self._left is None or self._left >= 0):
            try:
                raw = self._inflate.decompress(data, INFLATE_CHUNK)
            except zlib.error:
                raise ResponseFailed([Failure()], self._response) from None
            data = self._inflate.unconsumed_tail
            if raw:
                if self._left is not None:
                    self._left -= len(raw)
                self.original.dataReceived(raw)

    def connectionLost(self, reason: Failure) -> None:
        if self._left is None or self._left >= 0:
            try:
                raw = self._inflate.flush()
            except zlib.error:
                raise ResponseFailed([reason, Failure()], self._response) from None
            if raw:
                self.original.dataReceived(raw)
        self.original.connectionLost(reason)


def chain(response: IResponse) -> list[IResponse]:
    """The responses of a redirect chain, first request first, ``response`` last."""
    found = [response]
    while found[-1].previousResponse is not None:
        found.append(found[-1].previousResponse)
    return found[::-1]


def url_of(response: IResponse) -> str:
    """The absolute URL that was requested to get ``response``."""
    return response.request.absoluteURI.decode("ascii", "replace")


class _SetCookie:
    """One ``Set-Cookie`` line as the response that ``CookieJar.make_cookies`` reads."""

    def __init__(self, line: str) -> None:
        self._headers = MimeHeader()
        self._headers["Set-Cookie"] = line

    def info(self) -> MimeHeader:
        return self._headers


def set_cookies(responses: list[IResponse]) -> dict[int | str, str]:
    """The cookies the servers set during one request, redirects included, read by the standard
    library's cookie rules: the original's array of them in curl's cookie-list form (``[1]``, …,
    one Netscape cookie-file line each) and each cookie's value by its name. A cookie set again
    (same domain, path and name) replaces the earlier one in place; of a name, the last one set
    gives the value."""
    jar = CookieJar()
    lines: dict[tuple[str, str, str], str] = {}
    values: dict[int | str, str] = {}
    for response in responses:
        url = url_of(response)
        host = urlsplit(url).hostname or ""
        for raw in response.headers.getRawHeaders(b"set-cookie", []):
            line = raw.decode("latin-1")
            # make_cookies reads only the response's info(): no HTTPResponse is needed
            for cookie in jar.make_cookies(_SetCookie(line), UrlRequest(url)):  # type: ignore[arg-type]
                http_only = any(part.strip().lower() == "httponly" for part in line.split(";")[1:])
                domain = cookie.domain if cookie.domain_specified else host
                lines[(domain, cookie.path, cookie.name)] = _cookie_line(cookie, domain, http_only)
                values[cookie.name] = (cookie.value or "").strip('"')
    return {**dict(enumerate(lines.values(), 1)), **values}


def _cookie_line(cookie: Cookie, domain: str, http_only: bool) -> str:
    """The cookie as curl's ``CURLINFO_COOKIELIST`` lists it (its Netscape cookie-file line)."""
    fields = (
        ("#HttpOnly_" if http_only else "") + domain,
        "TRUE" if cookie.domain_specified else "FALSE",
        cookie.path,
        "TRUE" if cookie.secure else "FALSE",
        str(cookie.expires or 0),
        cookie.name,
        cookie.value or "",
    )
    return "\t".join(fields)


def content_type(response: IResponse) -> tuple[str | None, str | None]:
    """The ``Content-Type`` header and its ``charset`` (lower case); each None if absent."""
    values = response.headers.getRawHeaders(b"content-type")
    if not values:
        return None, None
    text = values[-1].decode("latin-1")
    header = MimeHeader()
    header["content-type"] = text
    return text, header.get_content_charset()
