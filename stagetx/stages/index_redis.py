"""The ``=index`` stage on Redis or Valkey (docs/index.md, Backends): holds no boards of its own.

One message → one request table → one script run on Redis → one reply. Requests are answered as
their script returns (pipelined, several in flight on each pooled connection); when Redis cannot
be reached each planned entry is answered ``{error = …}`` at once while the pool reconnects with
back-off, so the process keeps serving its other stages.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from stagetx.codec import unpack_py
from stagetx.index.commands import RequestError
from stagetx.index.redis_backend import RedisExecutor, failed, fill
from stagetx.index.redis_link import RedisLink, RedisSettings
from stagetx.message import Message
from stagetx.stages.base import StageContext


class RedisStage:
    """``"=index+rank": {"redis": "redis://127.0.0.1:6379/0", "prefix": "stagetx:"}``."""

    def __init__(self, context: StageContext, settings: RedisSettings) -> None:
        self.context = context
        self.settings = settings
        self.executor = RedisExecutor(settings.key_size)
        self.link = RedisLink(settings)
        self._prefix = settings.prefix.encode()
        self._reachable = True  # whether the last request reached Redis (logs state changes only)
        self._ready: Deferred[None] = Deferred()  # fired by the first connection or a failed probe

    def start(self) -> Deferred[None]:
        """Start connecting; fires once the pool has its first connection, or once the probe
        found Redis unusable: a stage that cannot reach Redis still starts (and answers with
        errors while the pool retries) so the process serves its other stages."""
        self.link.on_switch = self._switched
        self.link.start()
        self.link.probe().addErrback(self._unreachable)
        self._ready.addTimeout(self.settings.timeout * 2, self.context.clock, lambda *_: None)
        return self._ready

    def _switched(self, old: str | None, new: str) -> None:
        self._reachable = True
        if not self._ready.called:
            self._ready.callback(None)
        if old is None:
            self.context.log.info(
                "index {stage}: boards on redis {url} (server {address})",
                stage=self.context.name,
                url=self.settings.shown_url,
                address=new,
            )
        else:
            self.context.log.warn(
                "index {stage}: redis {url} switched from {old} to {new}",
                stage=self.context.name,
                url=self.settings.shown_url,
                old=old,
                new=new,
            )

    def _unreachable(self, failure: Failure) -> None:
        if not self._ready.called:
            self._ready.callback(None)
        self.context.log.error(
            "index {stage}: cannot use redis {url}: {reason} (requests get errors; retrying with back-off)",
            stage=self.context.name,
            url=self.settings.shown_url,
            reason=failure.getErrorMessage(),
        )

    def stop(self) -> Any:
        """Close the pool; requests still in flight are answered with errors."""
        return self.link.close()

    def receive(self, message: Message) -> None:
        """Plan the request table now; its reply leaves when Redis answered (or at once on an error)."""
        try:
            values = unpack_py(message.payload)
            reply, plan = self.executor.plan(values[0] if values else None)
        except RequestError as error:
            self.context.reply(message, {"error": str(error)})
            return
        except Exception:
            self.context.log.failure("index {stage}: request failed", stage=self.context.name)
            self.context.reply(message, {"error": "internal error in the index stage"})
            return
        if not plan.steps:
            self.context.reply(message, reply)
            return
        writes = self.settings.wait > 0 and any(step[0] in (b"set", b"del") for step in plan.steps)
        done = self.link.run(self._prefix, plan.pack(), writes)
        done.addCallbacks(self._answered, self._failed, callbackArgs=(message, reply), errbackArgs=(message, reply))

    def _answered(self, answer: bytes, message: Message, reply: dict[Any, Any]) -> None:
        if not self._reachable:
            self._reachable = True
            self.context.log.info("index {stage}: redis answers again", stage=self.context.name)
        try:
            filled = fill(reply, answer)
        except Exception:
            self.context.log.failure("index {stage}: unreadable redis answer", stage=self.context.name)
            filled = failed(reply, "internal error in the index stage")
        self.context.reply(message, filled)

    def _failed(self, failure: Failure, message: Message, reply: dict[Any, Any]) -> None:
        reason = failure.getErrorMessage()
        if self._reachable:  # one line per outage, not one per request
            self._reachable = False
            self.context.count_error()
            self.context.log.error(
                "index {stage}: redis {url} request failed: {reason}",
                stage=self.context.name,
                url=self.settings.shown_url,
                reason=reason,
            )
        self.context.reply(message, failed(reply, f"redis: {reason}"))
