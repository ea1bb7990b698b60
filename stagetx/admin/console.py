"""The admin line console: one command per line, usable with ``nc``.

Each reply is its text lines followed by ``OK`` or ``ERROR <reason>``. With an ``#admin`` token the
first line must be ``token <TOKEN>`` (answered ``OK``); until then every line gets
``ERROR token required``, and a wrong token closes the connection. Commands of one connection are
answered in order, one at a time.

Memory per connection is bounded whatever the client does: while a command runs, or while the
client does not read its answers (the transport's write buffer is full and pauses this protocol,
its producer), the lines already read wait and nothing more is read from the socket.

A connection holds one of the port's few places (``stagetx.admin.connections``), so none is held
for good: one that has not presented the token ``TOKEN_WAIT`` seconds after it opened, or that
sent no line for ``IDLE_TIMEOUT`` seconds, is told so and closed.
"""

from __future__ import annotations

import hmac
from collections import deque

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from stagetx.admin.commands import Commands, Reply
from stagetx.admin.connections import OpenConnections, Refused

MAX_LINE = 64 * 1024
#: Seconds a connection has, from its start, to present the ``#admin`` token.
TOKEN_WAIT = 10.0
#: Seconds an (authorized) connection may send no line before it is closed.
IDLE_TIMEOUT = 600.0


@implementer(IPushProducer)
class ConsoleProtocol(LineOnlyReceiver, TimeoutMixin):
    """One console connection; also the producer of its answers, so that a client that does not
    read them stops the reading of its commands instead of filling the supervisor's memory."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, commands: Commands, token: str | None) -> None:
        self.commands = commands
        self.token = token
        self.authorized = token is None
        self._lines: deque[str] = deque()  # read, not yet run: at most one read's worth
        self._running = False  # a command's answer is awaited
        self._stalled = False  # the client does not read: the write buffer is full
        self._pumping = False
        self._reading = True

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.setTimeout(IDLE_TIMEOUT if self.authorized else TOKEN_WAIT)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self.factory.connections.closed()

    def timeoutConnection(self) -> None:
        waited = f"no token within {TOKEN_WAIT:g} s" if not self.authorized else f"idle for {IDLE_TIMEOUT:g} s"
        self.transport.write(f"ERROR {waited}, closing\n".encode())
        self.transport.loseConnection()
        if self._stalled:  # a client that does not read would hold the connection open
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._pump()

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r").strip()
        if self.authorized:  # the token's wait counts from the start, whatever is sent meanwhile
            self.resetTimeout()
        if text:
            self._lines.append(text)

    def _pump(self) -> None:
        """Run the waiting lines in order while the client keeps up; read more only once none waits."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._lines and not (self._running or self._stalled or self.transport.disconnecting):
                text = self._lines.popleft()
                if not self.authorized:
                    self._authorize(text)
                elif text in ("quit", "exit"):
                    self.transport.loseConnection()
                else:
                    self._running = True
                    d = maybeDeferred(self.commands.run_line, text)
                    d.addErrback(lambda f: Reply(False, error=f"internal error: {f.getErrorMessage()}"))
                    d.addCallback(self._answered)
        finally:
            self._pumping = False
        idle = not (self._lines or self._running or self._stalled)
        if idle != self._reading and not self.transport.disconnecting:
            self._reading = idle
            (self.transport.resumeProducing if idle else self.transport.pauseProducing)()

    def _answered(self, reply: Reply) -> None:
        self._running = False
        self._write(reply)
        self._pump()

    # -- IPushProducer: called by the transport as its write buffer fills and drains --------------
    def pauseProducing(self) -> None:
        self._stalled = True

    def resumeProducing(self) -> None:
        self._stalled = False
        self._pump()

    def stopProducing(self) -> None:
        self._lines.clear()
        self._stalled = True

    def _authorize(self, text: str) -> None:
        word, _, given = text.partition(" ")
        if word != "token":
            self._write(Reply(False, error="token required (first line: token <TOKEN>)"))
            return
        assert self.token is not None
        if hmac.compare_digest(given.strip().encode(), self.token.encode()):
            self.authorized = True
            self.setTimeout(IDLE_TIMEOUT)
            self._write(Reply(True))
        else:
            self._write(Reply(False, error="bad token"))
            self.transport.loseConnection()

    def _write(self, reply: Reply) -> None:
        self.transport.write(reply.text().encode("utf-8", "replace"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._write(Reply(False, error=f"line longer than {MAX_LINE} bytes"))
        self.transport.loseConnection()


class ConsoleFactory(Factory):
    noisy = False

    def __init__(self, commands: Commands, token: str | None) -> None:
        self.commands = commands
        self.token = token
        self.connections = OpenConnections("console")

    def buildProtocol(self, addr: object) -> Protocol:
        if not self.connections.admit():
            return Refused(f"ERROR too many console connections ({self.connections.limit} open)\n".encode())
        protocol = ConsoleProtocol(self.commands, self.token)
        protocol.factory = self
        return protocol
