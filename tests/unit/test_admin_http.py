"""The admin HTTP channel on a string transport and a fake clock: the deadline of a whole request."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from stagetx.admin.http import REFUSED_LINGER, REQUEST_WAIT, AdminSite


class _Answers(Resource):
    """``/now`` answers at once; ``/later`` keeps its request open (as a long command does)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        if request.path == b"/later":
            self.open.append(request)
            return NOT_DONE_YET
        return b"ok"


def _channel() -> tuple[Any, StringTransport, Clock, _Answers]:
    clock, answers = Clock(), _Answers()
    site = AdminSite(answers, None, clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock, answers


def test_a_request_trickled_in_a_byte_at_a_time_is_answered_408_and_closed() -> None:
    channel, transport, clock, _ = _channel()
    for byte in b"GET /now HTTP/1.1\r\nHost: a\r\n":
        channel.dataReceived(bytes([byte]))
        clock.advance(REQUEST_WAIT / 40)
    assert transport.value() == b""
    clock.advance(REQUEST_WAIT)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    clock.advance(REFUSED_LINGER)
    assert transport.disconnecting
    channel.connectionLost()


def test_a_request_being_answered_is_not_cut_and_a_kept_alive_connection_waits_again() -> None:
    channel, transport, clock, answers = _channel()
    channel.dataReceived(b"GET /later HTTP/1.1\r\nHost: a\r\n\r\n")
    clock.advance(REQUEST_WAIT * 3)  # a command may take a while: its request is whole
    assert transport.value() == b"" and not transport.disconnecting
    answers.open[0].write(b"done")
    answers.open[0].finish()
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    channel.dataReceived(b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n")  # the next one in time
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2
    clock.advance(REQUEST_WAIT)  # then nothing: the kept-alive connection is closed
    assert b"HTTP/1.1 408 " in transport.value()
    clock.advance(REFUSED_LINGER)
    assert transport.disconnecting
    channel.connectionLost()
