"""Ticket grants of the ``ticket`` stage, decided without I/O.

A ``TicketBook`` keeps, per category, a FIFO queue of waiting tickets and the set of held ones,
and never lets more than the category's limit hold at once. Time comes from an injected
``IReactorTime``: every hold is one ``DelayedCall`` (reset on extension), every temporary
category one closing call. What the stage must do about a decision (tell a feedback id, call a
callback, send a cancel notice) leaves the book as an effect value passed to ``sink``, in the
order the decisions were taken; ``data`` is the stage's own, opaque to the book.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeGuard

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from stagetx.stages.checks import MAX_MS, milliseconds

DEFAULT_HOLD = 1.0  # seconds a granted ticket holds its slot unless extended


class TicketConfigError(ValueError):
    """A ``=ticket`` value that is not ``[max_tickets, {category: concurrent} [, hold_ms]]``."""


@attrs.frozen
class TicketSettings:
    """The ticket stage's configuration: ``[max_tickets, {category: concurrent} [, hold_ms]]``."""

    max_tickets: int
    categories: Mapping[str, int]
    hold: float = DEFAULT_HOLD  # seconds


def parse_settings(value: Any) -> TicketSettings:
    """Validate a ``=ticket+ID`` value; raises ``TicketConfigError`` naming the problem."""
    if not isinstance(value, list | tuple) or not 2 <= len(value) <= 3:
        raise TicketConfigError("expected [max_tickets, {category: concurrent} [, hold_ms]]")
    max_tickets, categories = value[0], value[1]
    if not _positive_int(max_tickets):
        raise TicketConfigError(f"max_tickets must be a positive integer, not {max_tickets!r}")
    if not isinstance(categories, dict):
        raise TicketConfigError("the categories must be an object {category: concurrent}")
    for name, limit in categories.items():
        if not valid_category(name):
            raise TicketConfigError(f"bad category name {name!r}")
        if not _positive_int(limit):
            raise TicketConfigError(f"category {name!r}: concurrent must be a positive integer")
    hold = DEFAULT_HOLD
    if len(value) == 3:
        if not milliseconds(value[2]):
            raise TicketConfigError(f"hold_ms must be a positive number up to {MAX_MS}, not {value[2]!r}")
        hold = value[2] / 1000.0
    return TicketSettings(max_tickets, dict(categories), hold)


def valid_category(name: object) -> bool:
    """Category names are non-empty, hold no ``?`` or ``=`` and do not start with ``@`` or ``#``.

    Those characters are the request grammar's (``cat=cb?fb``) and the stage's reserved prefixes.
    """
    return isinstance(name, str) and bool(name) and name[0] not in "@#" and "?" not in name and "=" not in name


def _positive_int(value: object) -> TypeGuard[int]:
    return type(value) is int and value > 0


def _positive_number(value: object) -> TypeGuard[int | float]:
    """A positive int or float; ``type`` (not ``isinstance``) keeps ``bool`` out."""
    return (type(value) is int or type(value) is float) and value > 0


@attrs.define(eq=False)
class Category:
    """One category: its limit, FIFO of waiting tickets and the tickets holding a slot."""

    name: str
    limit: int
    temporary: bool = False
    open: bool = True
    waiting: collections.deque[Ticket] = attrs.field(factory=collections.deque)
    holding: dict[str, Ticket] = attrs.field(factory=dict)
    closer: IDelayedCall | None = None
    # owner -> its tickets here, holding or waiting: ``ticket:=category`` reaches each owner
    # without walking every ticket
    owners: dict[Hashable, int] = attrs.field(factory=dict)

    def own(self, owner: Hashable) -> None:
        """One more ticket of ``owner`` in this category."""
        self.owners[owner] = self.owners.get(owner, 0) + 1

    def disown(self, owner: Hashable) -> None:
        """One ticket of ``owner`` less in this category."""
        left = self.owners[owner] - 1
        if left:
            self.owners[owner] = left
        else:
            del self.owners[owner]


@attrs.define(eq=False)
class Ticket:
    """One request: waiting while ``timer`` is None, holding a slot until ``timer`` fires."""

    id: str
    category: Category
    owner: Hashable  # who to tell about the category (``ticket:=category``); deduplicated
    data: Any
    timer: IDelayedCall | None = None


@attrs.frozen
class Accepted:
    """The request is queued or granted: tell its feedback id the ticket id."""

    ticket: Ticket


@attrs.frozen
class Refused:
    """The request is refused (``reason`` says why): tell its feedback id ``false``."""

    data: Any
    reason: str


@attrs.frozen
class Granted:
    """A slot is the ticket's: call its callback, then tell its feedback id ``true``."""

    ticket: Ticket


@attrs.frozen
class Released:
    """The ticket's hold ended: its slot is free.

    ``revoked``: the hold ran out, the holder did not give it back (``signal(nil, 0)``); the
    original platform tells the holder then, and only then.
    """

    ticket: Ticket
    revoked: bool


@attrs.frozen
class Cancelled:
    """A waiting ticket was cancelled (its temporary category closed): feedback ``false``, notice."""

    ticket: Ticket


Effect = Accepted | Refused | Granted | Released | Cancelled


class TicketBook:
    """Categories, queues and holds of one ticket stage; every decision goes to ``sink``."""

    def __init__(
        self,
        clock: IReactorTime,
        settings: TicketSettings,
        sink: Callable[[Effect], None],
        prefix: str | None = None,
    ) -> None:
        self._clock = clock
        self._max = settings.max_tickets
        self._hold = settings.hold
        self._sink = sink
        self._categories = {n: Category(n, limit) for n, limit in settings.categories.items()}
        self._held: dict[str, Ticket] = {}
        self._live = 0  # waiting + held over all categories, closed ones included
        # A fresh prefix per book, so that a hold message meant for a previous run of the
        # stage never matches a ticket of this one.
        self._prefix = prefix if prefix is not None else os.urandom(4).hex()
        self._seq = 0

    def request(self, category: str, owner: Hashable, data: Any) -> Ticket | None:
        """Queue a request in ``category``; grant it at once when a slot is free.

        Emits ``Refused`` (and returns None) for an unknown or closed category or when
        ``max_tickets`` tickets are already waiting or held; otherwise ``Accepted``, then
        ``Granted`` when its turn comes (now or later).
        """
        cat = self._categories.get(category)
        if cat is None:
            self._sink(Refused(data, f"unknown category {category!r}"))
            return None
        if self._live >= self._max:
            self._sink(Refused(data, f"max_tickets ({self._max}) reached"))
            return None
        self._seq += 1
        ticket = Ticket(f"@{self._prefix}.{self._seq:x}", cat, owner, data)
        self._live += 1
        cat.waiting.append(ticket)
        cat.own(owner)
        self._sink(Accepted(ticket))
        self._grant(cat)
        return ticket

    def extend(self, ticket_id: str, seconds: float) -> bool:
        """Move the end of a held ticket's hold to now + ``seconds`` (≤ 0 releases it now).

        Returns False when ``ticket_id`` holds no slot (unknown, still waiting, or released).
        """
        ticket = self._held.get(ticket_id)
        if ticket is None or ticket.timer is None:
            return False
        if seconds <= 0:
            ticket.timer.cancel()
            self._release(ticket, revoked=False)
        else:
            ticket.timer.reset(seconds)
        return True

    def create(self, name: str, limit: object, close_after: float) -> str | None:
        """Create (or re-arm) temporary category ``name``: ``limit`` slots for ``close_after`` s.

        ``limit`` comes from Lua as it was sent: it is validated here, like ``close_after``. When
        it closes, its waiting tickets are cancelled and it disappears; held tickets keep their
        slot until their hold ends. Returns a problem description, or None when done.
        """
        if not valid_category(name):
            return f"bad category name {name!r}"
        if not _positive_int(limit) or not _positive_number(close_after):
            return "a temporary category needs a positive integer limit and a positive close time"
        cat = self._categories.get(name)
        if cat is not None and not cat.temporary:
            return f"category {name!r} is configured, not temporary"
        if cat is None:
            cat = self._categories[name] = Category(name, limit, temporary=True)
            cat.closer = self._clock.callLater(close_after, self._close, cat)
        else:
            cat.limit = limit
            if cat.closer is not None:
                cat.closer.reset(close_after)
        self._grant(cat)
        return None

    def forget(self, owners: frozenset[Hashable]) -> int:
        """Drop every ticket of ``owners`` (their process went away): waiting ones leave their
        queue unannounced, held ones give their slot back at once (``Released``, not revoked),
        which grants the next in line. Returns how many tickets were dropped."""
        dropped = 0
        for cat in list(self._categories.values()):
            kept = collections.deque(t for t in cat.waiting if t.owner not in owners)
            for ticket in cat.waiting:
                if ticket.owner in owners:
                    cat.disown(ticket.owner)
            dropped += len(cat.waiting) - len(kept)
            self._live -= len(cat.waiting) - len(kept)
            cat.waiting = kept
        for ticket in [t for t in self._held.values() if t.owner in owners]:
            assert ticket.timer is not None
            ticket.timer.cancel()
            self._release(ticket, revoked=False)
            dropped += 1
        return dropped

    def owners(self, category: str) -> list[Hashable]:
        """Distinct owners holding or waiting for a ticket of ``category``, in the order they
        came (since they last had none there); as many steps as owners, not tickets."""
        cat = self._categories.get(category)
        return [] if cat is None else list(cat.owners)

    def stats(self) -> dict[str, tuple[int, int, int]]:
        """``{category: (held, waiting, limit)}`` of the open categories, for the admin side."""
        return {n: (len(c.holding), len(c.waiting), c.limit) for n, c in self._categories.items()}

    def stop(self) -> None:
        """Cancel every timer; the book is not used afterwards (its state dies with the stage)."""
        for ticket in self._held.values():
            if ticket.timer is not None and ticket.timer.active():
                ticket.timer.cancel()
        for cat in self._categories.values():
            if cat.closer is not None and cat.closer.active():
                cat.closer.cancel()

    def _grant(self, cat: Category) -> None:
        while cat.open and cat.waiting and len(cat.holding) < cat.limit:
            ticket = cat.waiting.popleft()
            ticket.timer = self._clock.callLater(self._hold, self._expire, ticket)
            cat.holding[ticket.id] = ticket
            self._held[ticket.id] = ticket
            self._sink(Granted(ticket))

    def _expire(self, ticket: Ticket) -> None:
        self._release(ticket, revoked=True)

    def _release(self, ticket: Ticket, revoked: bool) -> None:
        ticket.timer = None
        cat = ticket.category
        del cat.holding[ticket.id]
        del self._held[ticket.id]
        cat.disown(ticket.owner)
        self._live -= 1
        self._sink(Released(ticket, revoked))
        self._grant(cat)

    def _close(self, cat: Category) -> None:
        cat.open = False
        cat.closer = None
        if self._categories.get(cat.name) is cat:
            del self._categories[cat.name]
        cancelled = list(cat.waiting)
        cat.waiting.clear()
        self._live -= len(cancelled)
        for ticket in cancelled:
            cat.disown(ticket.owner)
            self._sink(Cancelled(ticket))


@attrs.frozen
class Request:
    """A parsed ``category[=callback_id][?feedback_id]`` (the two parts in either order)."""

    category: str
    callback: str | None = None
    feedback: str | None = None


_REQUEST = re.compile(r"(?P<cat>[^=?]+)(?P<parts>(?:[=?][^=?]+)*)")
_PART = re.compile(r"([=?])([^=?]+)")


def parse_request(text: str) -> Request | None:
    """Parse a ticket request id; None when it does not fit (empty parts, a part twice)."""
    match = _REQUEST.fullmatch(text)
    if match is None:
        return None
    parts: dict[str, str] = {}
    for mark, name in _PART.findall(match["parts"]):
        if mark in parts:
            return None
        parts[mark] = name
    return Request(match["cat"], parts.get("="), parts.get("?"))
