"""Reading a response for the curl stage: body (cancellable), redirect chain, cookies, charset."""

from __future__ import annotations

from email.message import Message as MimeHeader
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse


class _BodyReader(Protocol):
    """Collects a body; cancelling ``done`` drops the connection.

    treq's ``content()`` cannot be cancelled, so a total timeout could not stop a slow download.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.cancelled = False
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        """Drop the connection; ``Deferred.cancel`` then fails ``done`` with CancelledError."""
        self.cancelled = True
        if self.transport is not None:  # deliverBody's transport is the response's IPushProducer
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.cancelled or self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    """The whole body of ``response``; cancelling the Deferred aborts the download."""
    reader = _BodyReader()
    response.deliverBody(reader)
    return reader.done


def chain(response: IResponse) -> list[IResponse]:
    """The responses of a redirect chain, first request first, ``response`` last."""
    found = [response]
    while found[-1].previousResponse is not None:
        found.append(found[-1].previousResponse)
    return found[::-1]


def url_of(response: IResponse) -> str:
    """The absolute URL that was requested to get ``response``."""
    return response.request.absoluteURI.decode("ascii", "replace")


def set_cookies(responses: list[IResponse]) -> dict[str, str]:
    """``name → value`` of every ``Set-Cookie`` in ``responses``; later ones win."""
    cookies: dict[str, str] = {}
    for response in responses:
        for line in response.headers.getRawHeaders(b"set-cookie", []):
            pair = line.split(b";", 1)[0]
            name, sep, value = pair.partition(b"=")
            if sep and name.strip():
                cookies[name.strip().decode("latin-1")] = value.strip().strip(b'"').decode("latin-1")
    return cookies


def content_type(response: IResponse) -> tuple[str | None, str | None]:
    """The ``Content-Type`` header and its ``charset`` (lower case); each None if absent."""
    values = response.headers.getRawHeaders(b"content-type")
    if not values:
        return None, None
    text = values[-1].decode("latin-1")
    header = MimeHeader()
    header["content-type"] = text
    return text, header.get_content_charset()
