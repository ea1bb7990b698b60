"""The ``=index`` stage on Redis or Valkey (docs/index.md, Backends): holds no boards of its own.

One message → one request table → one reply; the tables of one router turn (a chunk of up to
``DRAIN_CHUNK`` messages) run as one script on Redis. Requests are answered as their script returns
(pipelined, several in flight on each pooled connection); when Redis cannot be reached each planned
entry is answered ``{error = …}`` (after waiting at most the timeout for a connection) while the
pool reconnects with back-off, so the process keeps serving its other stages.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from stagetx.codec import unpack_py
from stagetx.message import Message
from stagetx.stages.base import StageContext
from stagetx.stages.index.commands import IndexMessage, RequestError
from stagetx.stages.index.redis_backend import WRITE_STEPS, RedisExecutor, failed, fill, pack_steps, unpack_answer
from stagetx.stages.index.redis_link import RedisLink, RedisSettings, RedisUnavailable
from stagetx.stages.index.stage import message_form, send_answer, send_answers

#: One planned request of a turn: the message, how it is answered, its reply table (with the
#: ``Pending`` entries the script fills), and where its steps start in the turn's plan.
Planned = tuple[Message, IndexMessage, dict[Any, Any], int]


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
        self._turn: list[Planned] = []  # this turn's requests, with the first step of each
        self._steps: list[list[Any]] = []  # this turn's planned steps, all tables in order

    def start(self) -> Deferred[None]:
        """Start connecting; fires once the pool has its first connection, or once the probe
        found Redis unusable: a stage that cannot reach Redis still starts (and answers with
        errors while the pool retries) so the process serves its other stages."""
        self.link.on_switch = self._switched
        try:
            self.link.check()
        except RedisUnavailable as error:
            self._unreachable(Failure(error))
            return self._ready
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
        """Send this turn's requests, then close the pool; requests still in flight are answered
        with errors."""
        self.turn_ended()
        return self.link.close()

    def receive(self, message: Message) -> None:
        """Plan the request now; it is sent with the rest of the turn's (``turn_ended``). Read and
        answered as the embedded stage does: a request table or the direct form, answered to the
        reply address or the sender's handler (``read_message``)."""
        form = message_form(message.msgid, message.reply)
        try:
            values = unpack_py(message.payload)
            reply, plan = self.executor.plan(form.request(values[0] if values else None))
        except RequestError as error:
            send_answer(self.context, message, form, form.answer({"error": str(error)}))
            return
        except Exception:
            self.context.log.failure("index {stage}: request failed", stage=self.context.name)
            send_answer(self.context, message, form, form.answer({"error": "internal error in the index stage"}))
            return
        if not plan.steps:
            send_answer(self.context, message, form, form.answer(reply))
            return
        self._turn.append((message, form, reply, len(self._steps)))
        self._steps += plan.steps

    def receive_batch(self, messages: list[Message]) -> list[float]:
        """A run of messages (the router's): each planned as ``receive`` does, in one call; returns
        each message's share of the run's time (s), for the host's busy and latency figures."""
        started = perf_counter()
        receive = self.receive
        for message in messages:
            receive(message)
        return [(perf_counter() - started) / len(messages)] * len(messages)

    def turn_ended(self) -> None:
        """End of a chunk of messages (the router calls it): the chunk's request tables go to
        Redis as one script run (one round trip; atomic, in arrival order) and each is answered
        from its part of the script's answer."""
        if not self._turn:
            return
        turn, steps = self._turn, self._steps
        self._turn, self._steps = [], []
        writes = self.settings.wait > 0 and any(step[0] in WRITE_STEPS for step in steps)
        done = self.link.run(self._prefix, pack_steps(steps), writes)
        done.addCallbacks(self._answered, self._failed, callbackArgs=(turn,), errbackArgs=(turn,))

    def _answered(self, answer: bytes, turn: list[Planned]) -> None:
        if not self._reachable:
            self._reachable = True
            self.context.log.info("index {stage}: redis answers again", stage=self.context.name)
        try:
            results = unpack_answer(answer)
        except Exception:
            self.context.log.failure("index {stage}: unreadable redis answer", stage=self.context.name)
            self._failed(Failure(), turn)
            return
        answers = []
        for message, form, table, offset in turn:
            try:
                filled = fill(table, results, offset)
            except Exception:
                self.context.log.failure("index {stage}: unreadable redis answer", stage=self.context.name)
                filled = failed(table, "internal error in the index stage")
            answers.append((message, form, filled))
        send_answers(self.context, answers)

    def _failed(self, failure: Failure, turn: list[Planned]) -> None:
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
        send_answers(
            self.context, [(message, form, failed(table, f"redis: {reason}")) for message, form, table, _ in turn]
        )
