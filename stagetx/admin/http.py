"""The admin HTTP side (twisted.web): the console's commands, a JSON API, ``/metrics``, ``/health``.

- ``GET /cmd/<command>?args=A&args=B`` or ``POST /cmd`` with a command line as the body: the
  console's text reply (ending ``OK``/``ERROR …``); status 200, or 400 for ``ERROR``.
- ``GET /api/<command>?args=…`` (``POST /api`` with a line): ``{"ok", "data", "error"}`` as JSON.
- ``GET /metrics``: Prometheus text. ``GET /health``: 200 or 503 with ``{"status", "reasons"}``.

With an ``#admin`` token every request needs ``Authorization: Bearer <TOKEN>`` (else 401).
A request body is checked as soon as its headers are in, before any of it is read: over
``MAX_BODY`` bytes is 413, and without the token (when one is set) 401; no body is ever spooled
to a temporary file (``AdminSite``). A whole request (line, headers, body) must be in
``REQUEST_WAIT`` seconds after the connection opened or the previous answer went out, else 408:
a client sending it a byte at a time would otherwise hold one of the port's few places for good
(twisted.web's idle timeout restarts at each byte).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File

from stagetx.admin import metrics
from stagetx.admin.commands import Commands, Reply, parse
from stagetx.admin.connections import OpenConnections, Refused

if TYPE_CHECKING:
    from stagetx.admin.view import AdminView

MAX_BODY = 64 * 1024
#: Seconds a whole request may take to arrive (from the connection's start, or the end of the
#: previous request): also how long a kept-alive connection may stay idle.
REQUEST_WAIT = 10.0
#: Seconds a refused request's body is still read (and dropped) so that the client gets the
#: answer rather than a connection reset; then the connection is closed.
REFUSED_LINGER = 2.0
_TOO_LARGE: tuple[int, bytes, bytes, list[bytes]] = (
    413,
    b"Content Too Large",
    f"ERROR request body over {MAX_BODY} bytes\n".encode(),
    [],
)


def _authorized(given: str | bytes | None, token: str) -> bool:
    """True when an ``Authorization`` header value carries ``token`` (compared in constant time)."""
    if isinstance(given, str):
        given = given.encode("utf-8", "replace")
    return hmac.compare_digest((given or b"").strip(), f"Bearer {token}".encode())


class Guarded(Resource):
    """A resource that checks the bearer token before rendering."""

    isLeaf = True

    def __init__(self, token: str | None) -> None:
        super().__init__()
        self.token = token

    def render(self, request: Request) -> Any:
        if self.token is not None:
            if not _authorized(request.getHeader("authorization"), self.token):
                request.setResponseCode(401)
                request.setHeader("www-authenticate", 'Bearer realm="stagetx"')
                return b"ERROR token required\n"
        return super().render(request)


def _command_of(request: Request) -> tuple[str, list[str]] | None:
    """The command a request names: ``/x/<name>?args=…`` or a POSTed command line."""
    if request.method == b"POST":
        body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(body) > MAX_BODY:
            return None
        return parse(body.decode("utf-8", "replace"))
    if not request.postpath or not request.postpath[0]:
        return None
    name = request.postpath[0].decode("utf-8", "replace")
    args = [a.decode("utf-8", "replace") for a in (request.args or {}).get(b"args", [])]
    return name, args


class CommandResource(Guarded):
    """Runs a command and answers with ``show(reply)`` (text or JSON)."""

    def __init__(self, commands: Commands, token: str | None, show: Callable[[Request, Reply], bytes]) -> None:
        super().__init__(token)
        self.commands = commands
        self.show = show

    def render_GET(self, request: Request) -> Any:
        command = _command_of(request)
        if command is None:
            return self.show(request, Reply(False, error="no command (GET /cmd/<command> or POST a line)"))
        d = self.commands.run(*command)
        finished = request.notifyFinish()
        gone: list[Failure] = []
        finished.addErrback(gone.append)

        def answer(reply: Reply) -> None:
            if not gone:
                request.write(self.show(request, reply))
                request.finish()

        d.addCallback(answer)
        return NOT_DONE_YET

    render_POST = render_GET


def as_text(request: Request, reply: Reply) -> bytes:
    request.setResponseCode(200 if reply.ok else 400)
    request.setHeader("content-type", "text/plain; charset=utf-8")
    return reply.text().encode("utf-8", "replace")


def as_json(request: Request, reply: Reply) -> bytes:
    request.setResponseCode(200 if reply.ok else 400)
    request.setHeader("content-type", "application/json")
    return json.dumps(reply.json(), default=str).encode()


class MetricsResource(Guarded):
    def __init__(self, supervisor: AdminView, token: str | None) -> None:
        super().__init__(token)
        self.registry = metrics.make_registry(supervisor)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", metrics.CONTENT_TYPE)
        return metrics.render(self.registry)


class HealthResource(Guarded):
    def __init__(self, health: Callable[[], list[str]], token: str | None) -> None:
        super().__init__(token)
        self.health = health

    def render_GET(self, request: Request) -> bytes:
        reasons = self.health()
        request.setResponseCode(503 if reasons else 200)
        request.setHeader("content-type", "application/json")
        return json.dumps({"status": "fail" if reasons else "ok", "reasons": reasons}).encode() + b"\n"


class StaticFiles(File):
    """``twisted.web.static.File`` that answers 404 for a path holding a NUL byte (which the file
    system calls would raise on)."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        if b"\0" in path:
            return notFound()
        return super().getChild(path, request)


class _BoundedRequest(Request):
    """A request whose body is kept in memory: the channel lets through at most ``MAX_BODY``."""

    content: BytesIO | None  # type: ignore[assignment]  # Twisted declares None

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        assert self.content is not None
        if self.content.tell() + len(data) > MAX_BODY:  # a chunked body of no announced length
            channel = self.channel
            assert isinstance(channel, _BodyCheckingChannel)
            channel.refuse(*_TOO_LARGE)
            return
        super().handleContentChunk(data)


class _BodyCheckingChannel(HTTPChannel):
    """An ``HTTPChannel`` that refuses a request body on its headers, before reading any of it."""

    _refused = False
    _closing: IDelayedCall | None = None
    _waiting: IDelayedCall | None = None  # the deadline of the next request
    site: AdminSite  # set by Site.buildProtocol

    def connectionMade(self) -> None:
        super().connectionMade()
        self._await_request()

    def _await_request(self) -> None:
        self._waiting = self.callLater(REQUEST_WAIT, self._too_slow)

    def _too_slow(self) -> None:
        self._waiting = None
        self.refuse(408, b"Request Timeout", f"ERROR no whole request within {REQUEST_WAIT:g} s\n".encode())

    def requestDone(self, request: Request) -> None:
        """Arm the next request's deadline before ``super`` runs requests already buffered."""
        if self.persistent and not self._refused and self._waiting is None:
            self._await_request()
        super().requestDone(request)

    def allHeadersReceived(self) -> None:
        refusal = _body_refusal(self.requests[-1].requestHeaders, self.length, self.site.token)
        if refusal is None:
            super().allHeadersReceived()
        else:
            self.refuse(*refusal)

    def refuse(self, code: int, phrase: bytes, body: bytes, headers: Sequence[bytes] = ()) -> None:
        """Answer ``code`` now and drop whatever else the client sends until the connection closes."""
        if self._refused:
            return
        self._refused = True
        self.persistent = False
        head = [
            b"HTTP/1.1 %d %s" % (code, phrase),
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
            *headers,
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._closing = self.callLater(REFUSED_LINGER, self.transport.loseConnection)

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if not self._refused:
            super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._closing, self._waiting):
            if call is not None and call.active():
                call.cancel()
        self.site.connections.closed()
        super().connectionLost(reason)


def _body_refusal(
    headers: Headers, length: int | None, token: str | None
) -> tuple[int, bytes, bytes, list[bytes]] | None:
    """Why a request with these headers and body ``length`` (None: chunked) is refused, or None.

    Only requests with a body are judged here; the resources check the token of the others.
    """
    if length == 0:
        return None
    if token is not None and not _authorized((headers.getRawHeaders(b"authorization") or [b""])[0], token):
        return 401, b"Unauthorized", b"ERROR token required\n", [b'WWW-Authenticate: Bearer realm="stagetx"']
    if length is not None and length > MAX_BODY:
        return _TOO_LARGE
    return None


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
)


class AdminSite(Site):
    """The admin ``Site``: request bodies judged on their headers (``_BodyCheckingChannel``), at
    most ``MAX_CONNECTIONS`` connections open (``stagetx.admin.connections``)."""

    protocol = _BodyCheckingChannel  # type: ignore[assignment]  # plain HTTP/1.1, no HTTP/2 wrapper
    requestFactory = _BoundedRequest

    def __init__(self, resource: Resource, token: str | None, reactor: Any = None) -> None:
        """``reactor``: the admin side's (its timers: the request log's clock, idle connections)."""
        super().__init__(resource, reactor=reactor)
        self.token = token
        self.connections = OpenConnections("http")

    def buildProtocol(self, addr: Any) -> Any:
        if not self.connections.admit():
            text = f"ERROR too many admin HTTP connections ({self.connections.limit} open)\n".encode()
            return Refused(_TOO_MANY % (len(text), text))
        return super().buildProtocol(addr)
