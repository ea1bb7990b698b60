"""The admin line console on a string transport and a fake clock: order, back-pressure, the token's
wait, the idle timeout and the cap on open connections."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from stagetx.admin.commands import Reply
from stagetx.admin.connections import MAX_CONNECTIONS
from stagetx.admin.console import IDLE_TIMEOUT, TOKEN_WAIT, ConsoleFactory, ConsoleProtocol

ADDRESS = IPv4Address("TCP", "127.0.0.1", 4242)


class EchoCommands:
    """Answers each command line with itself."""

    def run_line(self, line: str) -> Deferred[Reply]:
        return succeed(Reply(True, (line,)))


def _console(token: str | None = None, factory: ConsoleFactory | None = None) -> tuple[Any, StringTransport, Clock]:
    factory = factory or ConsoleFactory(EchoCommands(), token)  # type: ignore[arg-type]
    console = factory.buildProtocol(ADDRESS)
    clock = Clock()
    console.callLater = clock.callLater  # type: ignore[attr-defined]
    transport = StringTransport()
    console.makeConnection(transport)
    return console, transport, clock


def test_a_client_that_does_not_read_is_not_read_until_it_does() -> None:
    console, transport, _ = _console()
    assert isinstance(console, ConsoleProtocol)
    console.pauseProducing()  # the transport's write buffer is full
    console.dataReceived(b"a\nb\nc\n")
    assert transport.value() == b"" and transport.producerState == "paused"
    console.resumeProducing()
    assert transport.value() == b"a\nOK\nb\nOK\nc\nOK\n" and transport.producerState == "producing"


def test_a_connection_without_the_token_is_closed_after_the_token_wait_whatever_it_sends() -> None:
    console, transport, clock = _console(token="s3")
    for _ in range(9):
        clock.advance(TOKEN_WAIT / 10)
        console.dataReceived(b"help\n")
    assert not transport.disconnecting
    clock.advance(TOKEN_WAIT / 10)
    assert transport.value().endswith(b"ERROR no token within 10 s, closing\n") and transport.disconnecting


def test_an_idle_console_is_closed_after_the_idle_timeout_and_each_line_restarts_it() -> None:
    console, transport, clock = _console(token="s3")
    console.dataReceived(b"token s3\n")
    clock.advance(IDLE_TIMEOUT - 1)
    console.dataReceived(b"list\n")
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.value() == b"OK\nlist\nOK\nERROR idle for 600 s, closing\n" and transport.disconnecting


def test_a_port_keeps_at_most_max_connections_open() -> None:
    factory = ConsoleFactory(EchoCommands(), None)  # type: ignore[arg-type]
    consoles = [_console(factory=factory)[0] for _ in range(MAX_CONNECTIONS)]
    refused, transport, _ = _console(factory=factory)
    assert not isinstance(refused, ConsoleProtocol)
    assert transport.value() == b"ERROR too many console connections (64 open)\n" and transport.disconnecting
    consoles[0].connectionLost()
    assert isinstance(_console(factory=factory)[0], ConsoleProtocol)
