"""A UNIX listening socket that is made again when its file or directory is removed.

The processes of a server talk over sockets in a run directory under ``TMPDIR``; a tmp cleaner
(or an operator's ``rm -r /tmp/*``) may remove it under a running server. The listening sockets
then still work for links already made, but nothing can connect to them any more: a restarted
process could not even listen (its directory gone) and stayed up without links. Each owner checks
its socket file every ``interval`` seconds and, when it is not its own any more, makes the
directory again (mode 0700) and listens anew at the same path.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="stagetx.unixport")


class KeptUNIXPort:
    """Listens with ``factory`` at ``path`` (``listener.listenUNIX``), again whenever it is removed
    (checked every ``interval`` seconds of ``clock``)."""

    def __init__(
        self, listener: Any, clock: Any, path: str, factory: Factory, mode: int = 0o600, interval: float = 1.0
    ) -> None:
        self.path = path
        self._listener = listener
        self._factory = factory
        self._mode = mode
        self._interval = interval
        self._port: IListeningPort | None = None
        self._inode: int | None = None
        self._failing = False  # the last try to listen again failed (and was said)
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock

    def start(self) -> None:
        self._listen()
        self._loop.start(self._interval, now=False)

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening (and checking); the Deferred fires once the socket is closed."""
        if self._loop.running:
            self._loop.stop()
        return self._close()

    def _listen(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.lexists(self.path):
            os.unlink(self.path)
        self._port = self._listener.listenUNIX(self.path, self._factory, mode=self._mode)
        self._inode = _inode(self.path)
        self._failing = False

    def _close(self) -> defer.Deferred[Any]:
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        if _inode(self.path) != self._inode:
            # Twisted's port unlinks its path as it closes and fails (leaving its socket open)
            # when the path is gone: give it a file to unlink.
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            open(self.path, "wb").close()
        return defer.maybeDeferred(port.stopListening)

    def _check(self) -> defer.Deferred[Any] | None:
        if self._port is not None and _inode(self.path) == self._inode:
            return None
        if self._port is not None:
            log.warn("socket {path} was removed: listening there again", path=self.path)
        try:
            closed = self._close()
        except OSError as error:
            self._failed(error)
            return None
        return closed.addCallback(lambda _: self._listen()).addErrback(self._failed)

    def _failed(self, reason: Any) -> None:
        """Tried again at the next check; said once."""
        if not self._failing:
            log.warn("cannot listen at {path} again: {reason}", path=self.path, reason=str(reason))
        self._failing = True


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
