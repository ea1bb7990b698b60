"""The admin line console: one command per line, usable with ``nc``.

Each reply is its text lines followed by ``OK`` or ``ERROR <reason>``. With an ``#admin`` token the
first line must be ``token <TOKEN>`` (answered ``OK``); until then every line gets
``ERROR token required``, and a wrong token closes the connection. Commands of one connection are
answered in order, one at a time.
"""

from __future__ import annotations

import hmac

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from stagetx.admin.commands import Commands, Reply

MAX_LINE = 64 * 1024


class ConsoleProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, commands: Commands, token: str | None) -> None:
        self.commands = commands
        self.token = token
        self.authorized = token is None
        self._last: Deferred[None] = succeed(None)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r").strip()
        if not text:
            return
        if not self.authorized:
            self._authorize(text)
            return
        if text in ("quit", "exit"):
            self.transport.loseConnection()
            return
        self._last.addCallback(lambda _: maybeDeferred(self.commands.run_line, text))
        self._last.addErrback(lambda f: Reply(False, error=f"internal error: {f.getErrorMessage()}"))
        self._last.addCallback(self._write)

    def _authorize(self, text: str) -> None:
        word, _, given = text.partition(" ")
        if word != "token":
            self._write(Reply(False, error="token required (first line: token <TOKEN>)"))
            return
        assert self.token is not None
        if hmac.compare_digest(given.strip().encode(), self.token.encode()):
            self.authorized = True
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

    def buildProtocol(self, addr: object) -> ConsoleProtocol:
        protocol = ConsoleProtocol(self.commands, self.token)
        protocol.factory = self
        return protocol
