"""Index requests: parse ``"[#N.]command:name[/TIER]"`` keys and run the commands on boards.

Pure: no files, no reactor. The caller supplies the boards and learns about every changed member
through ``Boards.changed`` (the store turns that into a log record).

Every backend reads messages the same way (``read_message``): a request table answered to the
sender's handler named by the message id, or to its ``=reply``; or the original platform's
*direct* form, a message id that is itself one command (``"rank:t?board=cb"``,
``"rank:cb=g?board"``, ``"rank:s?board"``). Commands are named in full (``get``) or by the
original's one-letter short forms (``g``), with ``:`` or ``?`` before the index name.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from stagetx.bounded import BoundedDict
from stagetx.stages.index.board import TIERS, Board, Score

WRITES = frozenset({b"set", b"del"})
READS = frozenset({b"get", b"range", b"forEach", b"total"})
#: The original platform's one-letter commands (``"g?board"``, ``"#1.s:board/2"``).
SHORT = {b"s": b"set", b"d": b"del", b"g": b"get", b"r": b"range", b"f": b"forEach", b"t": b"total"}
_KEY_CACHE_SIZE = 4096


@attrs.frozen
class IndexMessage:
    """How one message to an index stage is read and answered.

    ``command``: the direct form's command key (the message's first value is its argument and
    the command's own result is the answer), or None for a request table (answered with the
    reply table). ``callback``: the sender's handler that gets the answer, or None for the
    message's reply address (no answer when it has none).
    """

    command: str | None
    callback: str | None

    def request(self, argument: Any) -> Any:
        """The request table to run: the message's value, or the direct form's one command."""
        return argument if self.command is None else {self.command: argument}

    def answer(self, reply: dict[Any, Any]) -> Any:
        """What goes back: the reply table, or the direct form's own result (the whole table
        when the request failed as a whole: ``{error = …}``)."""
        return reply if self.command is None else reply.get(self.command, reply)


@functools.lru_cache(maxsize=4096)
def read_message(msgid: str, reply_msgid: str | None) -> IndexMessage:
    """Read ``stage.signal("rank:" .. msgid [.. "=" .. reply_msgid], …)`` (docs/index.md).

    - ``"t?board=cb"``, ``"s?board"``: one command; its result goes to ``=cb``, or nowhere.
    - ``"cb=g?board"``: one command; its result goes to the sender's handler ``cb``.
    - ``"q=got"``: a request table; the reply table goes to ``=got``.
    - ``"got"``, ``"=got"``: a request table; the reply table goes to the sender's ``waitfor("got")``.
    """
    if "?" in msgid:
        return IndexMessage(msgid, None)
    if reply_msgid is not None:
        if "?" in reply_msgid:
            return IndexMessage(reply_msgid, msgid)
        return IndexMessage(None, None)
    return IndexMessage(None, msgid)


class RequestError(Exception):
    """A bad request entry; its text becomes that entry's ``{error = …}``."""


class Boards(Protocol):
    """Where commands find boards and report changes (implemented by the store)."""

    def board(self, name: bytes, create: bool) -> Board | None:
        """The board ``name``; created when ``create``, else None when it does not exist."""

    def changing(self, name: bytes, board: Board, member: bytes) -> None:
        """``member`` of ``board`` is about to be set or deleted (keep its old state: a change
        whose log write fails is undone)."""

    def changed(self, name: bytes, board: Board, member: bytes) -> None:
        """``member`` of ``board`` was set or deleted (record its new state)."""

    def set_one(
        self, name: bytes, board: Board, member: bytes, number: int, score: Any, value: Any, has_value: bool
    ) -> int:
        """``changing``, ``board.set_one`` and ``changed`` in one call: the member's new rank in
        tier ``number``, or 0 when its score did not change."""

    def check_value(self, value: Any) -> None:
        """Raise RequestError when ``value`` cannot be stored (checked before any change)."""


@attrs.frozen
class Command:
    """One parsed request key."""

    op: bytes
    name: bytes
    tier: int
    order: tuple[int, int]  # sort key: (0, N) for "#N." keys, then (1, 0) writes, (1, 1) reads


def parse_key(key: Any) -> Command:
    """Parse a request key such as ``b"#2.get:board/3"``; raises RequestError."""
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise RequestError('request keys must be strings like "get:board/1"')
    order: tuple[int, int] | None = None
    rest = key
    if rest.startswith(b"#"):
        number, dot, rest = rest[1:].partition(b".")
        if not dot or not number.isdigit():
            raise RequestError('an order prefix looks like "#1."')
        order = (0, int(number))
    op, colon, target = rest.partition(b":")
    if b"?" in op or not colon:
        op, colon, target = rest.partition(b"?")
    if not colon:
        raise RequestError('a request key looks like "command:index/tier"')
    op = SHORT.get(op, op)
    if op not in WRITES and op not in READS:
        raise RequestError(f"unknown command {op.decode(errors='replace')!r}")
    name, slash, tier_text = target.rpartition(b"/")
    if not slash:
        name, tier_text = target, b"1"
    if not name:
        raise RequestError("the index name is empty")
    if not tier_text.isdigit() or not 1 <= int(tier_text) <= TIERS:
        raise RequestError(f"the tier must be 1 to {TIERS}")
    if order is None:
        order = (1, 0) if op in WRITES else (1, 1)
    return Command(op, name, int(tier_text), order)


class Executor:
    """Runs whole request tables: writes first, then reads, or in ``#N.`` order."""

    def __init__(self, boards: Boards, key_size: int) -> None:
        self.boards = boards
        self.key_size = key_size
        self._keys: BoundedDict[Any, Command | RequestError] = BoundedDict(_KEY_CACHE_SIZE)  # request keys parsed
        self._handlers: dict[bytes, Callable[[Command, Any], Any]] = {
            b"set": self._set,
            b"del": self._del,
            b"get": self._get,
            b"range": self._range,
            b"forEach": self._for_each,
            b"total": self._total,
        }

    def run(self, request: Any) -> dict[Any, Any]:
        """Execute every entry of ``request``; returns the reply table keyed as the request."""
        if type(request) is dict and len(request) == 1:  # the common case: nothing to order
            ((key, argument),) = request.items()
            command = self._keys.get(key) or self._parse(key)
            if type(command) is RequestError:
                return {key: {"error": str(command)}}
            try:
                if command.op == b"set" and type(argument) is dict and len(argument) == 1:  # type: ignore[union-attr]
                    fast = self._set_one(command, argument)  # type: ignore[arg-type]
                    if fast is not None:
                        return {key: fast}
                return {key: self._handlers[command.op](command, argument)}  # type: ignore[union-attr, arg-type]
            except RequestError as error:
                return {key: {"error": str(error)}}
        if not isinstance(request, dict):
            raise RequestError('an index request is a table {["command:index/tier"] = argument}')
        reply: dict[Any, Any] = {}
        parsed: list[tuple[tuple[int, int], int, Any, Command]] = []
        for position, key in enumerate(request):
            command = self._parse(key)
            if isinstance(command, RequestError):
                reply[key] = {"error": str(command)}
            else:
                parsed.append((command.order, position, key, command))
        if len(parsed) > 1:
            parsed.sort(key=lambda item: item[:2])
        for _, _, key, command in parsed:
            try:
                reply[key] = self._handlers[command.op](command, request[key])
            except RequestError as error:
                reply[key] = {"error": str(error)}
        return reply

    def _parse(self, key: Any) -> Command | RequestError:
        cached = self._keys.get(key)
        if cached is None:
            try:
                cached = parse_key(key)
            except RequestError as error:
                cached = error
            self._keys.put(key, cached)
        return cached

    def _member(self, member: Any) -> bytes:
        if isinstance(member, str):
            member = member.encode()
        if not isinstance(member, bytes) or not member:
            raise RequestError("member ids must be non-empty strings")
        if len(member) > self.key_size:
            raise RequestError(f"member id longer than {self.key_size} bytes")
        return member

    def set_updates(self, command: Command, argument: Any) -> list[tuple[bytes, dict[int, Score], Any, bool]]:
        """A ``set`` argument checked: ``(member, scores by tier, value, has value)`` per member.

        Raises RequestError before anything changes (shared with the Redis backend).
        """
        if not isinstance(argument, dict):
            raise RequestError("set takes {ID = {v = value, i = score}}")
        updates = [(self._member(member), *_set_spec(command.tier, spec)) for member, spec in argument.items()]
        for _, _, value, has_value in updates:
            if has_value:
                self.boards.check_value(value)
        return updates

    def members(self, argument: Any, usage: str) -> list[bytes]:
        """The member ids of a ``get``/``del`` argument, checked."""
        return [self._member(member) for member in _sequence(argument, usage)]

    def range_query(self, argument: Any) -> tuple[Score, int] | tuple[bytes, int, int]:
        """A ``range`` argument checked: ``(score, count)``, or ``(member, rows before it, count)``.
        ``{SCORE}`` and ``{ID}`` alone are one row, as on the original (its COUNT and DELTA
        default to 0 and it reads at least the first row): the highest at most SCORE, ID's own."""
        usage = "range takes {SCORE, COUNT}, {ID, DELTA, COUNT}, {ID, DELTA}, {SCORE} or {ID}"
        items = _sequence(argument, usage)
        if len(items) in (1, 2) and _is_score(items[0]):
            return items[0], _integer(items[1], usage) if len(items) == 2 else 1
        if len(items) not in (1, 2, 3) or _is_score(items[0]):
            raise RequestError(usage)
        member = self._member(items[0])
        if len(items) == 1:
            return member, 0, 1
        delta = _integer(items[1], usage)
        if len(items) == 3:
            return member, delta, _integer(items[2], usage)
        return member, delta // 2, delta

    def _set(self, command: Command, argument: Any) -> dict[bytes, int]:
        if not argument:
            return {}
        if isinstance(argument, dict) and len(argument) == 1:
            fast = self._set_one(command, argument)
            if fast is not None:
                return fast
        updates = self.set_updates(command, argument)
        board = self.boards.board(command.name, True)
        assert board is not None
        reply: dict[bytes, int] = {}
        for member, scores, value, has_value in updates:
            self.boards.changing(command.name, board, member)
            changed = board.set(member, scores, value, has_value)
            self.boards.changed(command.name, board, member)
            # the tier as it is now: a score a dense tier cannot hold (inf, 1e300) replaced it
            reply[member] = board.tier(command.tier).rank(member) if command.tier in changed else 0  # type: ignore[assignment]
        return reply

    def _set_one(self, command: Command, argument: dict[Any, Any]) -> dict[bytes, int] | None:
        """One member (``argument`` has exactly one entry) with ``{i = score}`` or ``{i = score,
        v = value}`` (bytes keys, as from Lua): checked and applied without the general path's
        lists and mappings; None for anything else."""
        ((member, spec),) = argument.items()
        if type(member) is not bytes or type(spec) is not dict:
            return None
        score: Any = spec.get(b"i")
        kind = type(score)
        if kind is not int and (kind is not float or score != score):  # a float NaN is refused
            return None
        size = len(spec)
        if size == 1:
            value = None
            has_value = False
        elif size == 2 and b"v" in spec:
            value = spec[b"v"]
            has_value = True
            self.boards.check_value(value)
        else:
            return None
        if not 0 < len(member) <= self.key_size:
            member = self._member(member)  # raises the right error
        name = command.name
        board = self.boards.board(name, True)
        assert board is not None
        return {member: self.boards.set_one(name, board, member, command.tier, score, value, has_value)}

    def _del(self, command: Command, argument: Any) -> int:
        members = self.members(argument, "del takes {ID, …}")
        board = self.boards.board(command.name, False)
        removed = 0
        if board is not None:
            for member in members:
                if member in board:
                    self.boards.changing(command.name, board, member)
                    board.delete(member)
                    removed += 1
                    self.boards.changed(command.name, board, member)
        return removed

    def _get(self, command: Command, argument: Any) -> dict[bytes, Any]:
        members = self.members(argument, "get takes {ID, …}")
        board = self.boards.board(command.name, False)
        reply: dict[bytes, Any] = {}
        if board is None:
            return reply
        for member in members:
            if member not in board:
                continue
            ranks = {}
            for number, tier in enumerate(board.tiers, 1):
                score = tier.score(member)
                if score is not None:
                    ranks[number] = {"i": score, "d": tier.rank(member)}
            entry: dict[str, Any] = {"I": ranks}
            value = board.value(member)
            if value is not None:
                entry["v"] = value
            reply[member] = entry
        return reply

    def _range(self, command: Command, argument: Any) -> list[dict[str, Any]]:
        query = self.range_query(argument)
        board = self.boards.board(command.name, False)
        if board is None:
            return []
        tier = board.tier(command.tier)
        if len(query) == 2:
            first = tier.rank_at_most(query[0])
            return [] if first is None else _rows(board, command.tier, first, query[1])
        member, before, count = query
        rank = tier.rank(member)
        return [] if rank is None else _rows(board, command.tier, max(rank - before, 1), count)

    def _for_each(self, command: Command, argument: Any) -> list[dict[str, Any]]:
        first, count = for_each_query(argument)
        board = self.boards.board(command.name, False)
        return [] if board is None else _rows(board, command.tier, first, count)

    def _total(self, command: Command, argument: Any) -> int:
        board = self.boards.board(command.name, False)
        return 0 if board is None else len(board.tier(command.tier))


def for_each_query(argument: Any) -> tuple[int, int]:
    """A ``forEach`` argument checked: ``(first rank, count)``; ``{START}`` alone is the row at
    rank START, as on the original (its COUNT defaults to 0 and it reads at least one row)."""
    usage = "forEach takes {START, COUNT} or {START}"
    items = _sequence(argument, usage)
    if len(items) not in (1, 2):
        raise RequestError(usage)
    return _integer(items[0], usage), _integer(items[1], usage) if len(items) == 2 else 1


def _set_spec(tier: int, spec: Any) -> tuple[dict[int, Score], Any, bool]:
    """``{v = value, i = score, I = {…}}`` → (scores by tier, value, whether v was given)."""
    if not isinstance(spec, dict):
        raise RequestError("set takes {ID = {v = value, i = score}}")
    scores: dict[int, Score] = {}
    many = spec.get(b"I", spec.get("I"))
    if many is not None:
        pairs = enumerate(many, 1) if isinstance(many, list) else many.items() if isinstance(many, dict) else None
        if pairs is None:
            raise RequestError("I must be {[1] = score, …, [4] = score}")
        for number, score in pairs:
            if type(number) is not int or not 1 <= number <= TIERS or not _is_score(score):
                raise RequestError(f"I must map tiers 1 to {TIERS} to numbers")
            scores[number] = score
    one = spec.get(b"i", spec.get("i"))
    if one is not None:
        if not _is_score(one):
            raise RequestError("i must be a number")
        scores[tier] = one
    if b"v" in spec:
        return scores, spec[b"v"], True
    if "v" in spec:
        return scores, spec["v"], True
    return scores, None, False


def _rows(board: Board, tier: int, first: int, count: int) -> list[dict[str, Any]]:
    rows = []
    for rank, score, member, value in board.rows(tier, first, count):
        row = {"k": member, "i": score, "d": rank}
        if value is not None:
            row["v"] = value
        rows.append(row)
    return rows


def _sequence(argument: Any, usage: str) -> list[Any]:
    if isinstance(argument, list):
        return argument
    if isinstance(argument, bytes | str):  # the original's "get": ID and "del": ID
        return [argument]
    if isinstance(argument, dict) and not argument:
        return []
    raise RequestError(usage)


def _is_score(value: Any) -> bool:
    kind = type(value)
    return kind is int or (kind is float and not math.isnan(value))


def _integer(value: Any, usage: str) -> int:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    raise RequestError(usage)
