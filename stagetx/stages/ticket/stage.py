"""The ``ticket`` stage: per-category concurrency limits with FIFO grants.

Decisions live in ``stagetx.stages.ticket.tickets``; this module turns messages into calls on the
``TicketBook`` and its effects into sends. A requester is one replica (the sender's
``(server, instance)``); callbacks, feedback and notices go to it by reply address. Message ids
this stage receives:

- ``CATEGORY[=callback_id][?feedback_id]``  a request (the router has split the part after the
  first ``=`` into the reply address; it is put back to read the request as written); without
  ``=callback_id`` and with a table, the original's form: one ticket per key of the table;
- ``=CATEGORY``  values for every requester holding or waiting in CATEGORY;
- ``@CATEGORY``  ``(limit, close_ms)``: a temporary category;
- ``#TICKET_ID`` replies from a callback (``signal(nil, ms)`` or its return values): a number
  moves the end of that ticket's hold to now + ms. Callbacks are sent with this reply id, which
  is also how the requester learns ``_TICKET``: a message whose reply address ends in
  ``/#@…`` is a ticket callback, and ``_TICKET`` is the part after the ``#``.
"""

from __future__ import annotations

from collections.abc import Hashable
from math import isfinite
from typing import Any, cast

import attrs

from stagetx.address import format_reply
from stagetx.bounded import OnceSet
from stagetx.message import Message, Sender
from stagetx.ratelog import RateLimitedLog
from stagetx.stages.base import StageContext
from stagetx.stages.msgids import as_written, brief
from stagetx.stages.registry import SettingsError
from stagetx.stages.ticket.tickets import (
    Accepted,
    Cancelled,
    Effect,
    Granted,
    Refused,
    Released,
    Request,
    Ticket,
    TicketBook,
    TicketConfigError,
    parse_request,
    parse_settings,
)

_LOGGED_ONCE_MAX = 10_000  # distinct refusal reasons remembered for "logged once"
_Owner = tuple[str, int]  # a requesting replica (server, instance): the book's opaque owner


@attrs.frozen
class _Requested:
    """What the stage keeps per ticket: who asked, what to call, and with which values."""

    text: str  # the request as the requester wrote it, "ticket:cat=cb?fb"
    sender: Sender
    callback: str | None  # the callback id on the requester
    feedback: str | None  # the feedback id on the requester
    values: tuple[Any, ...]

    def at(self, msgid: str) -> str:
        """The address of message ``msgid`` on the requesting replica."""
        return format_reply(self.sender.server, self.sender.instance, msgid)


def check_settings(settings: Any, path: str, base_dir: str) -> None:
    """The registry's check (``stagetx.stages.registry``): one line naming the stage's key."""
    try:
        parse_settings(settings)
    except TicketConfigError as error:
        raise SettingsError(f"{path}: {error}") from None


class Stage:
    """One ticket stage replica: the single authority over its categories' slots."""

    def __init__(self, context: StageContext, config: Any) -> None:
        self._context = context
        self._prefix = f"{context.stage_id}:"
        settings = parse_settings(getattr(config, "settings", config))  # a StageConfig
        self._book = TicketBook(context.clock, settings, self._effect)
        self._logged: OnceSet[str] = OnceSet(_LOGGED_ONCE_MAX)  # refusal reasons logged
        # a requester that stops reading fails the callback of each of its tickets in turn
        self._failures = RateLimitedLog(context.log, context.clock)

    def start(self) -> None:
        """Nothing to load: tickets live in memory only (a restart forgets them)."""

    def stop(self) -> None:
        """Cancel the hold and closing timers."""
        self._book.stop()
        self._failures.stop()

    def receive(self, message: Message) -> None:
        """Dispatch one message by the first character of its id; never raises."""
        try:
            first = message.msgid[:1]
            if first == "#":
                self._hold(message)
            elif first == "=":
                self._broadcast(message)
            elif first == "@":
                self._create(message)
            else:
                self._request(message)
        except Exception:
            self._context.log.failure("ticket: message {msgid} failed", msgid=message.msgid)

    def replicas_lost(self, lost: frozenset[tuple[str, int]]) -> None:
        """Tickets of replicas whose process went away are dropped: a restarted process has the
        same address, and must not be called back for what its predecessor asked, nor keep
        others waiting behind slots nobody holds any more."""
        dropped = self._book.forget(cast(frozenset[Hashable], lost))
        if dropped:
            self._context.log.info("ticket: {n} ticket(s) of a process that went away dropped", n=dropped)

    def categories(self) -> dict[str, tuple[int, int, int]]:
        """``{category: (held, waiting, limit)}``, for the admin side."""
        return self._book.stats()

    def _request(self, message: Message) -> None:
        text = as_written(message.msgid, message.reply)
        request = parse_request(text)
        values = message.values
        if request is not None and request.callback is None and values and type(values[0]) is dict:
            self._request_each(request, message, values[0], f"{self._prefix}{text}")
            return
        if request is None or (request.callback is None and request.feedback is None):
            self._log_once(f"ticket: ignored request {self._prefix}{text} (see docs/ticket.md)")
            return
        requested = _Requested(
            f"{self._prefix}{text}",
            message.sender,
            request.callback,
            request.feedback,
            message.values,
        )
        owner: _Owner = (message.sender.server, message.sender.instance)
        self._book.request(request.category, owner, requested)

    def _request_each(self, request: Request, message: Message, table: dict[Any, Any], text: str) -> None:
        """The original's table form ``ticket:CAT?fb`` with ``{callback_id = value, …, [""] = data}``:
        one ticket per callback id (called with its value), and one feedback message
        ``(text, {[""] = data, callback_id = result, …})``, each result ``true`` (granted at once),
        the ticket id (waiting) or ``false`` (refused)."""
        owner: _Owner = (message.sender.server, message.sender.instance)
        results: dict[Any, Any] = {}
        for key, value in table.items():
            name = key.decode("utf-8", "surrogateescape") if type(key) is bytes else str(key)
            if not name:
                results[key] = value
                continue
            requested = _Requested(text, message.sender, name, None, (value,))
            ticket = self._book.request(request.category, owner, requested)
            results[key] = False if ticket is None else True if ticket.timer is not None else ticket.id
        if request.feedback is not None:
            self._context.send(
                format_reply(message.sender.server, message.sender.instance, request.feedback), text, results
            )

    def _hold(self, message: Message) -> None:
        values = message.values
        if values and type(values[0]) in (int, float):
            if isfinite(values[0]):
                self._book.extend(message.msgid[1:], values[0] / 1000.0)
            else:  # no timer waits nan; a hold for ever is not a hold
                self._warn(message, f"a hold is a finite number of ms, not {values[0]}")

    def _broadcast(self, message: Message) -> None:
        category = message.msgid[1:]
        for owner in self._book.owners(category):
            server, instance = cast(_Owner, owner)
            self._context.send(format_reply(server, instance, f"{self._prefix}{category}"), *message.values)

    def _create(self, message: Message) -> None:
        values = message.values
        limit = values[0] if values else None
        close_ms = values[1] if len(values) > 1 else None
        problem: str | None
        if (type(close_ms) is int or type(close_ms) is float) and isfinite(close_ms):  # not bool, nan or inf
            problem = self._book.create(message.msgid[1:], limit, close_ms / 1000.0)
        else:
            problem = "a temporary category needs (limit, close_ms), close_ms a finite number"
        if problem is not None:
            self._warn(message, problem)

    def _warn(self, message: Message, problem: str) -> None:
        """A message this stage cannot act on: logged, nothing else happens."""
        self._context.log.warn(
            "ticket: {msgid} from {stage}: {problem}",
            msgid=brief(message.msgid),
            stage=message.sender.stage,
            problem=brief(problem),
        )

    def _effect(self, effect: Effect) -> None:
        """Carry out one decision of the book."""
        match effect:
            case Accepted(ticket):
                self._feedback(ticket.data, ticket.id)
            case Granted(ticket):
                self._call(ticket)
            case Refused(requested, reason):
                self._feedback(requested, False)
                self._log_once(f"ticket: request refused: {reason}")
            case Cancelled(ticket):
                self._feedback(ticket.data, False)
                self._notice(ticket)
            case Released(ticket, revoked):
                # The book gives the slot to the next in line after this effect.
                if revoked:
                    self._notice(ticket)

    def _call(self, ticket: Ticket) -> None:
        requested: _Requested = ticket.data
        if requested.callback is not None:
            ok, reason = self._context.send(
                requested.at(requested.callback),
                *requested.values,
                reply_to=f"#{ticket.id}",
            )
            if not ok:
                self._failures.warn(
                    "ticket: callback {request} not delivered: {reason}",
                    request=brief(requested.text),
                    reason=reason,
                )
                # Not from inside the book's own grant loop: give the slot back on the next turn.
                self._context.clock.callLater(0, self._book.extend, ticket.id, 0)
                self._feedback(requested, False)
                return
        self._feedback(requested, True)

    def _notice(self, ticket: Ticket) -> None:
        """``("cancel", {ticket_id = callback_id})`` at the requester's ``waitfor("ticket:@")``:
        the ticket was ended for it (cancelled, or its hold ran out), not by it."""
        requested: _Requested = ticket.data
        self._context.send(requested.at(f"{self._prefix}@"), "cancel", {ticket.id: requested.callback or False})

    def _feedback(self, requested: _Requested, result: Any) -> None:
        if requested.feedback is not None:
            self._context.send(requested.at(requested.feedback), requested.text, result)

    def _log_once(self, text: str) -> None:
        text = brief(text)
        if self._logged.first(text):
            self._context.log.info("{text}", text=text)
