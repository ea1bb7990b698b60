"""Ordered execution locks (``>CMD.reply``, ``>>CMD``, ``<CMD``): FIFO turns with expiry.

Pure decisions with an injected clock; the router owns one table in the process that is the
lock authority of its server (the first ``#startup`` group) and forwards requests there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: How long a turn lasts when its holder neither extends nor releases it (100 ms, as in the original platform).
DEFAULT_HOLD_MS = 100


@attrs.define
class Turn:
    """One queued request: who asked, which message id to call, and the values to call it with."""

    who: Hashable
    reply: str
    payload: bytes


@attrs.define
class _Lock:
    waiting: deque[Turn] = attrs.field(factory=deque)
    holder: Turn | None = None
    expiry: IDelayedCall | None = None


class LockTable:
    """The server's ordered locks.

    @param grant: called with the turn that becomes the holder (the router then delivers
        ``turn.reply`` with ``turn.payload`` to ``turn.who``).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, grant: Callable[[Turn], None], hold_ms: int = DEFAULT_HOLD_MS) -> None:
        self._clock = clock
        self._grant = grant
        self._hold = hold_ms / 1000.0
        self._locks: dict[str, _Lock] = {}

    def acquire(self, cmd: str, turn: Turn) -> None:
        lock = self._locks.setdefault(cmd, _Lock())
        lock.waiting.append(turn)
        if lock.holder is None:
            self._next(cmd, lock)

    def extend(self, cmd: str, who: Hashable, ms: float) -> bool:
        """Move the holder's deadline to now + ``ms``; only the holder may (False otherwise)."""
        lock = self._locks.get(cmd)
        if lock is None or lock.holder is None or lock.holder.who != who:
            self.log.warn("lock {cmd}: extend by a stage that does not hold it, ignored", cmd=cmd)
            return False
        assert lock.expiry is not None
        lock.expiry.reset(max(ms, 0) / 1000.0)
        return True

    def release(self, cmd: str, who: Hashable) -> bool:
        """End the holder's turn; a release by anyone else is ignored and logged."""
        lock = self._locks.get(cmd)
        if lock is None or lock.holder is None or lock.holder.who != who:
            self.log.warn("lock {cmd}: release by a stage that does not hold it, ignored", cmd=cmd)
            return False
        assert lock.expiry is not None
        lock.expiry.cancel()
        self._next(cmd, lock)
        return True

    def holder(self, cmd: str) -> Hashable | None:
        lock = self._locks.get(cmd)
        return None if lock is None or lock.holder is None else lock.holder.who

    def waiting(self, cmd: str) -> int:
        lock = self._locks.get(cmd)
        return 0 if lock is None else len(lock.waiting)

    def _expire(self, cmd: str, lock: _Lock) -> None:
        self._next(cmd, lock)

    def _next(self, cmd: str, lock: _Lock) -> None:
        lock.holder = lock.expiry = None
        if not lock.waiting:
            del self._locks[cmd]
            return
        turn = lock.holder = lock.waiting.popleft()
        lock.expiry = self._clock.callLater(self._hold, self._expire, cmd, lock)
        self._grant(turn)
