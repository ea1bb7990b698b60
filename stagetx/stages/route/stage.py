"""The ``route`` stage: subscriptions, offer rounds and delivery to one or all.

The decisions live in ``stagetx.stages.route.subscriptions``; this module turns messages into calls
on it and its decisions into sends. Every subscriber is one replica, named by the sender's
``(server, instance)`` and addressed with reply addresses (``format_reply``), so an offer, a
delivery and a fail callback reach exactly the replica meant. Message ids this stage receives:

- ``@``        registration, pause, removal, keep-alive (``route:@``); with a reply address
               (``route:@=cb``) it is answered once applied: ``true``, or ``false`` and the
               problems, so a subscriber can tell when its registrations are in place;
- ``#offer``   an acceptance (``signal(nil, token[?cb,…])`` in a ``route:@`` handler): offers
               are sent with this id as their reply id;
- anything else is a published KEY (the router has already split ``=return_cb`` off into the
  message's reply address; it is put back to rebuild the key as published).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs

from stagetx.address import format_reply
from stagetx.bounded import OnceSet
from stagetx.message import Message, Sender
from stagetx.ratelog import RateLimitedLog
from stagetx.stages.base import StageContext
from stagetx.stages.msgids import as_written, brief
from stagetx.stages.registry import SettingsError
from stagetx.stages.route.subscriptions import (
    Offers,
    PublishKey,
    Round,
    RouteConfigError,
    Subscriptions,
    parse_key,
    parse_settings,
)

ACCEPT = "#offer"  # reply id of offers: acceptances arrive here
_LOGGED_ONCE_MAX = 10_000  # distinct keys remembered for "dropped, logged once"
_PROBLEMS_SHOWN = 3  # problems of one route:@ logged and answered, then how many more


def check_settings(settings: Any, path: str, base_dir: str) -> None:
    """The registry's check (``stagetx.stages.registry``): one line naming the stage's key."""
    try:
        parse_settings(settings)
    except RouteConfigError as error:
        raise SettingsError(f"{path}: {error}") from None


class Stage:
    """One route stage replica; its state (registrations, open rounds) lives in memory only."""

    def __init__(self, context: StageContext, config: Any) -> None:
        settings = parse_settings(getattr(config, "settings", config))  # a StageConfig
        self._context = context
        self._prefix = f"{context.stage_id}:"
        self._subs = Subscriptions(context.clock, settings.expire, self._expired)
        self._offers = Offers(context.clock, settings.offer, self._failed)
        self._dropped: OnceSet[str] = OnceSet(_LOGGED_ONCE_MAX)  # keys whose drop was logged
        # a subscriber that stops reading (SIGSTOP, stuck) fails every delivery until it expires
        self._failures = RateLimitedLog(context.log, context.clock)

    def start(self) -> None:
        """Nothing to load: subscribers register again within their keep-alive period."""

    def stop(self) -> None:
        """Cancel timers; open rounds end without fail callbacks."""
        self._subs.stop()
        self._offers.stop()
        self._failures.stop()

    def receive(self, message: Message) -> None:
        """Dispatch one message by id; errors are logged, never raised."""
        try:
            if message.msgid == "@":
                self._register(message)
            elif message.msgid == ACCEPT:
                self._accept(message)
            else:
                self._publish(message)
        except Exception:
            self._context.log.failure("route: message {msgid} failed", msgid=message.msgid)

    def replicas_lost(self, lost: frozenset[tuple[str, int]]) -> None:
        """Replicas whose process went away lose their registrations and their place in open
        rounds: a restarted process has the same address and must start from its own
        ``route:@``, not inherit its predecessor's registrations and pauses."""
        for who in lost:
            if self._subs.remove(who):
                self._context.log.info("route: subscriber {who} removed (its process went away)", who=who)
            self._offers.withdraw_everywhere(who)

    def subscriptions(self) -> dict[str, int]:
        """``{subscribe_id: subscribers}``, for the admin side."""
        return self._subs.counts()

    def _register(self, message: Message) -> None:
        sender = message.sender
        problems = self._subs.update(_who(sender), message.values)
        if not problems:
            self._context.reply(message, True)
            return
        text = _summary(problems)
        self._context.log.warn(
            "route:@ from {stage} (instance {instance}): {problem}",
            stage=sender.stage,
            instance=sender.instance,
            problem=text,
        )
        self._context.reply(message, False, text)

    def _expired(self, who: Hashable) -> None:
        self._context.log.info("route: subscriber {who} expired (no route:@ in time)", who=who)

    def _publish(self, message: Message) -> None:
        text = as_written(message.msgid, message.reply)
        key = parse_key(text)
        if key is None:
            self._context.log.warn("route: cannot parse published key {key}", key=brief(text))
            return
        payload = _Publish(message.sender, message.values)
        units: dict[str, dict[Hashable, str]] = {}
        for subscribe_id in key.ids:
            sid, cands = self._subs.candidates(subscribe_id)
            units.setdefault(sid, {}).update(cands)
        if key.broadcast:
            self._broadcast(key, units, payload)
            return
        rnd = self._offers.open(key, units, payload)
        for who in rnd.candidates():
            ok, reason = self._context.send(_target(who, f"{self._prefix}@"), key.text, rnd.token, reply_to=ACCEPT)
            if not ok:
                self._context.log.debug("route: offer to {who} not sent: {reason}", who=who, reason=reason)
                self._offers.withdraw(rnd.token, who)

    def _broadcast(self, key: PublishKey, units: dict[str, dict[Hashable, str]], payload: _Publish) -> None:
        pairs = dict.fromkeys((who, cb) for cands in units.values() for who, cb in cands.items())
        if not pairs:
            self._fail(key, payload)
            return
        for who, callback in pairs:
            self._deliver(key, payload, who, callback)

    def _accept(self, message: Message) -> None:
        values = message.values
        if not values or not isinstance(values[0], bytes):
            return  # a handler's other replies (e.g. its return values) are not acceptances
        raw = values[0].decode("utf-8", "surrogateescape")
        token, mark, only = raw.partition("?")
        callbacks = frozenset(c for c in only.split(",") if c) if mark else None
        result = self._offers.accept(token, _who(message.sender), callbacks)
        if result is None:
            return
        rnd, won = result
        for callback in won:
            self._deliver(rnd.key, rnd.payload, _who(message.sender), callback)

    def _deliver(self, key: PublishKey, payload: _Publish, who: Hashable, callback: str) -> None:
        """``callback`` of ``who`` gets ``(STAGE:KEY, v...)``; its replies go to the publisher."""
        publisher = payload.sender
        answer = key.return_cb or f"{self._prefix}{key.text}"
        ok, reason = self._context.send(
            _target(who, callback),
            f"{self._prefix}{key.text}",
            *payload.values,
            reply_to=format_reply(publisher.server, publisher.instance, answer),
        )
        if not ok:
            self._failures.warn(
                "route: delivery of {key} to {who} {callback} failed: {reason}",
                key=brief(key.text),
                who=who,
                callback=callback,
                reason=reason,
            )

    def _failed(self, rnd: Round) -> None:
        self._fail(rnd.key, rnd.payload)

    def _fail(self, key: PublishKey, payload: _Publish) -> None:
        """The publisher's ``fail_cb`` gets ``(STAGE:KEY, v...)``; without one, log once per key."""
        if key.fail_cb is not None:
            publisher = payload.sender
            self._context.send(
                format_reply(publisher.server, publisher.instance, key.fail_cb),
                f"{self._prefix}{key.text}",
                *payload.values,
            )
            return
        text = brief(key.text)
        if self._dropped.first(text):
            self._context.log.info("route: no subscriber took {key}; dropped", key=text)


@attrs.frozen
class _Publish:
    """What a round carries for its deliveries: the publisher and the published values."""

    sender: Sender
    values: tuple[Any, ...]


def _summary(problems: list[str]) -> str:
    """One line for a ``route:@``'s problems: a table of 10,000 entries all wrong (pausing every
    channel after the route stage restarted) is one log line and a short answer, not 10,000."""
    shown = "; ".join(brief(p) for p in problems[:_PROBLEMS_SHOWN])
    more = len(problems) - _PROBLEMS_SHOWN
    return f"{shown}; and {more} more" if more > 0 else shown


def _who(sender: Sender) -> tuple[str, int]:
    """A subscriber is one replica: ``(server, instance)``."""
    return (sender.server, sender.instance)


def _target(who: Hashable, msgid: str) -> str:
    """The address of message ``msgid`` on replica ``who`` (a ``_who`` tuple)."""
    assert isinstance(who, tuple)
    return format_reply(who[0], who[1], msgid)
