"""The cap on the open connections of one admin port (console or HTTP).

Every open connection holds a file descriptor of the supervisor, the process that must still
open pipes to restart a crashed child: without a cap, idle clients could take them all. A
connection over the cap is answered with one line and closed at once.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

#: Open connections one admin port keeps; more are refused.
MAX_CONNECTIONS = 64


class Refused(Protocol):
    """Writes ``answer`` to a connection over the cap and closes it."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        self.transport.write(self.answer)
        self.transport.loseConnection()


class OpenConnections:
    """The count of one port's open connections; ``admit`` refuses the one past ``limit``, and logs
    that once until the count is back under it."""

    log = Logger(namespace="stagetx.admin")

    def __init__(self, kind: str, limit: int = MAX_CONNECTIONS) -> None:
        self.kind = kind
        self.limit = limit
        self.open = 0
        self._warned = False

    def admit(self) -> bool:
        """Count one more open connection, or refuse it (False) when ``limit`` are open."""
        if self.open >= self.limit:
            if not self._warned:
                self._warned = True
                self.log.warn(
                    "admin {kind}: {limit} connections open, refusing more until one closes",
                    kind=self.kind,
                    limit=self.limit,
                )
            return False
        self.open += 1
        return True

    def closed(self) -> None:
        self.open -= 1
        if self.open < self.limit:
            self._warned = False
