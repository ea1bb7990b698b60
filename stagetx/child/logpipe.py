"""A child's log stream to the supervisor that never blocks the child's reactor.

A child logs to its stdout, a pipe the supervisor reads. A blocking write on a full pipe (the
supervisor stopped or slow, e.g. because twistd's own stdout goes to a reader that stopped
reading) would hold the child's reactor until the supervisor reads again: no client served, not
even SIGTERM handled. Here the pipe is non-blocking; what it does not take waits in a buffer of at
most ``limit`` bytes, written by the reactor as the pipe drains; past that whole events are
dropped and counted. A warning gives the count as soon as the pipe takes data again, then at
most every 10 s (or whenever half the buffer is free) while the reader stays slower than the log.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from typing import Any

from twisted.internet import fdesc
from twisted.internet.interfaces import IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="stagetx.child")

LIMIT = 1 << 20  # bytes of log held for a pipe that does not drain; then events are dropped
REPORT_EVERY = 10.0  # seconds between drop counts while the reader stays slower than the log


@implementer(IWriteDescriptor)
class PipeStream:
    """A text stream (``write``, ``flush``) over pipe ``fd`` for the log observers.

    ``write`` may be called from any thread (worker threads log too); ``reactor`` writes what is
    pending when the pipe can take it again.
    """

    def __init__(self, reactor: Any, fd: int = 1, limit: int = LIMIT) -> None:
        self._reactor = reactor
        self._fd = fd
        self._limit = limit
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._dropped = 0
        self._broken = False  # the reader is gone (EPIPE): nothing more can be written
        self._reporting = False  # the drop count is being logged
        self._next_report = 0.0  # reactor time before which a count waits for half the buffer free
        fdesc.setNonBlocking(fd)

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        with self._lock:
            if self._broken:
                return 0
            if self._pending:
                if len(self._pending) + len(data) > self._limit and not self._reporting:
                    self._dropped += 1
                    return 0
                self._pending += data
                return len(text)
            written = self._send(data)
            if written < len(data) and not self._broken:
                self._pending += data[written:]
                self._reactor.callFromThread(self._reactor.addWriter, self)
        return len(text)

    def flush(self) -> None:
        """Nothing to flush: what is not written yet is the reactor's to write."""

    def _send(self, data: bytes | bytearray) -> int:
        """Write what the pipe takes now; how many bytes it took (0 when full or broken)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as error:
            if error.errno != errno.EPIPE:
                raise
            self._broken = True
            self._pending.clear()
            return 0

    def doWrite(self) -> None:
        with self._lock:
            del self._pending[: self._send(self._pending)]
            if not self._pending or self._broken:
                self._reactor.removeWriter(self)
            dropped, now = 0, self._reactor.seconds()
            if self._dropped and (len(self._pending) <= self._limit // 2 or now >= self._next_report):
                dropped, self._dropped, self._next_report = self._dropped, 0, now + REPORT_EVERY
        if dropped and not self._broken:
            self._reporting = True  # past the limit: a reader slower than the log still hears of it
            try:
                log.warn("{count} log events dropped: the supervisor was not reading", count=dropped)
            finally:
                self._reporting = False

    def drain(self, timeout: float) -> None:
        """Write what is pending for at most ``timeout`` seconds (after the reactor stopped)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending and not self._broken:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self._fd], [], left)[1]:
                    return
                del self._pending[: self._send(self._pending)]

    def fileno(self) -> int:
        return self._fd

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "log-pipe"
