"""Route subscriptions and offer rounds of the ``route`` stage, decided without I/O.

``Subscriptions`` keeps, per subscriber replica, its ``subscribe_id → callback_id`` table with
pauses, and forgets a subscriber not heard from for ``expire_after`` seconds. ``Offers`` runs
offer rounds: one publish, one or more *units* (a subscribe id each, after fallback), each won
by the first candidate to accept it; a round still open after ``timeout`` seconds fails. Time
comes from an injected ``IReactorTime``; subscribers are opaque hashable keys; the stage does
the sending.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Hashable
from math import isfinite
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from stagetx.codec import NULL
from stagetx.stages.checks import MAX_MS, milliseconds

DEFAULT_EXPIRE = 30.0  # seconds without any route:@ before a subscriber is forgotten
DEFAULT_OFFER = 0.3  # seconds an offer round waits for acceptances


#: A pause of nan ms would never end (nothing compares with nan); pausing for ever is ``false``.
_NOT_FINITE = "a pause is a finite number of ms (false pauses until true), not {}"


class RouteConfigError(ValueError):
    """A ``=route`` configuration that is not ``{"expire_ms": ms, "offer_ms": ms}``."""


@attrs.frozen
class RouteSettings:
    """The route stage's configuration, in seconds."""

    expire: float = DEFAULT_EXPIRE
    offer: float = DEFAULT_OFFER


def parse_settings(value: Any) -> RouteSettings:
    """Validate a ``=route+ID`` value: absent/empty, or ``{"expire_ms": ms, "offer_ms": ms}``."""
    if value is None or value == "" or value == {}:
        return RouteSettings()
    if not isinstance(value, dict):
        raise RouteConfigError('expected {"expire_ms": ms, "offer_ms": ms}')
    unknown = set(value) - {"expire_ms", "offer_ms"}
    if unknown:
        raise RouteConfigError(f"unknown route settings: {', '.join(sorted(unknown))}")
    seconds = {}
    for name in ("expire_ms", "offer_ms"):
        ms = value.get(name)
        if ms is None:
            continue
        if not milliseconds(ms):
            raise RouteConfigError(f"{name} must be a number of ms from above 0 to {MAX_MS}, not {ms!r}")
        seconds[name[: -len("_ms")]] = ms / 1000.0
    return RouteSettings(**seconds)


@attrs.frozen
class PublishKey:
    """``subscribe_id[,…][?argument][=return_cb][!fail_cb]``, with ``*`` for broadcast."""

    text: str  # the key exactly as published, ``*`` included
    ids: tuple[str, ...]
    broadcast: bool = False
    argument: str | None = None
    return_cb: str | None = None
    fail_cb: str | None = None


_KEY = re.compile(r"(?P<ids>[^?=!]+)(?:\?(?P<arg>[^=!]*))?(?:=(?P<ret>[^!]+))?(?:!(?P<fail>.+))?")


def parse_key(text: str) -> PublishKey | None:
    """Parse a published key; None when it names no subscribe id or does not fit the grammar.

    The argument cannot hold ``=`` or ``!`` (they start the callback parts).
    """
    match = _KEY.fullmatch(text[1:] if text.startswith("*") else text)
    if match is None:
        return None
    ids = tuple(dict.fromkeys(i for i in match["ids"].split(",") if i))
    if not ids:
        return None
    return PublishKey(text, ids, text.startswith("*"), match["arg"], match["ret"], match["fail"])


def fallbacks(subscribe_id: str) -> list[str]:
    """``"a.b.c"`` → ``["a.b.c", "a.b.", "a."]``: the id, then cut after each earlier ``.``."""
    result = [subscribe_id]
    end = len(subscribe_id) - 1  # an id ending in "." is its own first prefix
    while (dot := subscribe_id.rfind(".", 0, end)) >= 0:
        result.append(subscribe_id[: dot + 1])
        end = dot
    return result


@attrs.define
class Registration:
    """One ``subscribe_id → callback_id`` of a subscriber, with its pause state."""

    callback: str
    paused: bool = False  # paused until resumed with true
    paused_until: float = 0.0  # paused for a time (clock seconds)


@attrs.define(eq=False)
class Subscriber:
    """One subscriber replica: its registrations, stage-wide pause and expiry timer."""

    key: Hashable
    registrations: dict[str, Registration] = attrs.field(factory=dict)
    paused_until: float = 0.0  # stage-wide pause: until this clock time or the next route:@
    expiry: IDelayedCall | None = None


class Subscriptions:
    """Who subscribes to what; read by publishes, written by ``route:@`` messages."""

    def __init__(
        self,
        clock: IReactorTime,
        expire_after: float = DEFAULT_EXPIRE,
        on_expire: Callable[[Hashable], None] | None = None,
    ) -> None:
        self._clock = clock
        self._expire_after = expire_after
        self._on_expire = on_expire
        self._subscribers: dict[Hashable, Subscriber] = {}
        self._by_id: dict[str, dict[Hashable, None]] = {}  # subscribe id → subscribers, in order

    def update(self, key: Hashable, values: tuple[Any, ...]) -> list[str]:
        """Apply one ``route:@`` message from subscriber ``key``; returns what was ignored and why.

        ``()``/``nil`` removes all; ``true`` keeps alive; a number pauses all for that many ms;
        a table maps subscribe ids to a callback id (register), ``false``/``true`` (pause/resume),
        ms (pause for a time) or ``stage.null`` (remove). Any message refreshes the subscriber
        and ends its stage-wide pause, as route.cpp's ``timeUpdate = utimeNow()`` does.
        """
        value: Any = values[0] if values else None  # a Lua value: any type until checked
        if value is None or value is NULL:
            self.remove(key)
            return []
        sub = self._subscribers.get(key)
        if sub is not None:
            sub.paused_until = 0.0
        if value == []:  # an empty Lua table packs as an empty array
            value = {}
        if type(value) is dict:
            sub = sub or self._add(key)
            problems = [p for k, v in value.items() if (p := self._entry(sub, k, v))]
        elif value is True:
            problems = []
        elif type(value) in (int, float):
            problems = [] if isfinite(value) else [_NOT_FINITE.format(value)]
            if sub is not None and not problems:
                sub.paused_until = self._clock.seconds() + value / 1000.0
        else:
            problems = [f"a route:@ value is a table, true, a number or nil, not {value!r}"]
        if sub is not None:
            if sub.registrations:
                self._refresh(sub)
            else:
                self.remove(key)
        return problems

    def remove(self, key: Hashable) -> bool:
        """Forget subscriber ``key`` and all its registrations; False when it had none."""
        sub = self._subscribers.pop(key, None)
        if sub is None:
            return False
        if sub.expiry is not None and sub.expiry.active():
            sub.expiry.cancel()
        for subscribe_id in sub.registrations:
            self._unindex(subscribe_id, key)
        return True

    def candidates(self, subscribe_id: str) -> tuple[str, dict[Hashable, str]]:
        """The id used for ``subscribe_id`` and its unpaused subscribers → their callback ids.

        An id without an unpaused subscriber (unregistered, or every subscriber paused) falls
        back to its shorter ``.`` prefixes (``fallbacks``), as route.cpp does; the first with
        one is used. None has one: ``subscribe_id`` with no subscribers.
        """
        now = self._clock.seconds()
        for sid in fallbacks(subscribe_id):
            active = {}
            for key in self._by_id.get(sid, ()):
                sub = self._subscribers[key]
                reg = sub.registrations[sid]
                if not reg.paused and reg.paused_until <= now and sub.paused_until <= now:
                    active[key] = reg.callback
            if active:
                return sid, active
        return subscribe_id, {}

    def counts(self) -> dict[str, int]:
        """``{subscribe_id: number of subscribers}``, for the admin side."""
        return {sid: len(keys) for sid, keys in self._by_id.items()}

    def stop(self) -> None:
        """Cancel every expiry timer."""
        for sub in self._subscribers.values():
            if sub.expiry is not None and sub.expiry.active():
                sub.expiry.cancel()

    def _add(self, key: Hashable) -> Subscriber:
        sub = self._subscribers[key] = Subscriber(key)
        return sub

    def _refresh(self, sub: Subscriber) -> None:
        if sub.expiry is not None and sub.expiry.active():
            sub.expiry.reset(self._expire_after)
        else:
            sub.expiry = self._clock.callLater(self._expire_after, self._expire, sub.key)

    def _expire(self, key: Hashable) -> None:
        self.remove(key)
        if self._on_expire is not None:
            self._on_expire(key)

    def _entry(self, sub: Subscriber, raw_id: Any, value: Any) -> str | None:
        subscribe_id = _text(raw_id)
        if not subscribe_id or subscribe_id[0] in "@*#":
            return f"bad subscribe id {raw_id!r}"
        reg = sub.registrations.get(subscribe_id)
        if isinstance(value, bytes | str):
            callback = _text(value)
            if not callback:
                return f"{subscribe_id}: empty callback id"
            if reg is not None:  # route.cpp ignores it: the callback and any pause stay
                if reg.callback == callback:
                    return None
                return f"{subscribe_id}: registered already to {reg.callback!r}; remove it first to change it"
            self._by_id.setdefault(subscribe_id, {})[sub.key] = None
            sub.registrations[subscribe_id] = Registration(callback)
            return None
        if value is None or value is NULL:
            if reg is not None:
                del sub.registrations[subscribe_id]
                self._unindex(subscribe_id, sub.key)
            return None
        if reg is None:
            return f"{subscribe_id}: not registered, cannot pause or resume"
        if type(value) is bool:
            reg.paused, reg.paused_until = not value, 0.0
        elif type(value) in (int, float):
            if not isfinite(value):
                return f"{subscribe_id}: {_NOT_FINITE.format(value)}"
            reg.paused, reg.paused_until = False, self._clock.seconds() + value / 1000.0
        else:
            return f"{subscribe_id}: a callback id, true, false, ms or stage.null, not {value!r}"
        return None

    def _unindex(self, subscribe_id: str, key: Hashable) -> None:
        keys = self._by_id.get(subscribe_id)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_id[subscribe_id]


def _text(value: Any) -> str:
    """Lua strings arrive as bytes; ids are text (undecodable bytes kept by surrogateescape)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else ""


@attrs.define(eq=False)
class Round:
    """One offer round: open units (subscribe id → candidates → callback) and the winners."""

    token: str
    key: PublishKey
    payload: Any  # the stage's own: publisher and values
    open: dict[str, dict[Hashable, str]]
    unserved: int = 0  # units that had no candidate left
    timer: IDelayedCall | None = None

    def candidates(self) -> list[Hashable]:
        """Every subscriber to offer to, once each."""
        return list(dict.fromkeys(k for cands in self.open.values() for k in cands))


class Offers:
    """Open offer rounds by token; ``on_fail(round)`` when a round ends with a unit not taken."""

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        on_fail: Callable[[Round], None],
        prefix: str | None = None,
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._on_fail = on_fail
        self._rounds: dict[str, Round] = {}
        self._prefix = prefix if prefix is not None else os.urandom(4).hex()
        self._seq = 0

    def open(self, key: PublishKey, units: dict[str, dict[Hashable, str]], payload: Any) -> Round:
        """Start a round over ``units``; the stage then offers ``(key.text, token)`` to each of
        ``round.candidates()``. A round with no candidate at all fails at once."""
        self._seq += 1
        rnd = Round(f"{self._prefix}.{self._seq:x}", key, payload, {})
        for sid, cands in units.items():
            if cands:
                rnd.open[sid] = dict(cands)
            else:
                rnd.unserved += 1
        if rnd.open:
            self._rounds[rnd.token] = rnd
            rnd.timer = self._clock.callLater(self._timeout, self._time_out, rnd)
        else:
            self._on_fail(rnd)
        return rnd

    def accept(self, token: str, who: Hashable, only: frozenset[str] | None = None) -> tuple[Round, list[str]] | None:
        """``who`` accepts ``token`` (only the units whose callback is in ``only``, if given).

        Returns the round and the distinct callbacks ``who`` won, or None when it won nothing
        (unknown or ended round, not a candidate, or every such unit already taken).
        """
        rnd = self._rounds.get(token)
        if rnd is None:
            return None
        won = []
        for sid, cands in list(rnd.open.items()):
            callback = cands.get(who)
            if callback is not None and (only is None or callback in only):
                del rnd.open[sid]
                won.append(callback)
        if not won:
            return None
        self._settle(rnd)
        return rnd, list(dict.fromkeys(won))

    def withdraw(self, token: str, who: Hashable) -> None:
        """``who`` cannot be offered to (not reachable): drop it from the round's units."""
        rnd = self._rounds.get(token)
        if rnd is None:
            return
        for sid, cands in list(rnd.open.items()):
            cands.pop(who, None)
            if not cands:
                del rnd.open[sid]
                rnd.unserved += 1
        self._settle(rnd)

    def withdraw_everywhere(self, who: Hashable) -> None:
        """``withdraw`` ``who`` from every open round (its process went away)."""
        for token in list(self._rounds):
            self.withdraw(token, who)

    def stop(self) -> None:
        """Cancel every round's timer; pending rounds end silently."""
        for rnd in self._rounds.values():
            if rnd.timer is not None and rnd.timer.active():
                rnd.timer.cancel()
        self._rounds.clear()

    def _settle(self, rnd: Round) -> None:
        if rnd.open:
            return
        del self._rounds[rnd.token]
        if rnd.timer is not None and rnd.timer.active():
            rnd.timer.cancel()
        if rnd.unserved:
            self._on_fail(rnd)

    def _time_out(self, rnd: Round) -> None:
        rnd.timer = None
        rnd.unserved += len(rnd.open)
        rnd.open.clear()
        self._settle(rnd)
