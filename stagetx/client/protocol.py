"""The default application's wire protocol, pure: BSON frames, typed commands, readable replies.

A request is one BSON document ``{op, id, ...}``; the server answers it with ``{re: id, ok, ...}``
and pushes chat lines as ``{push: "chat", channel, from, text}`` (docs/default-app.md). Nothing
here touches a socket, so framing and command parsing are unit-tested on their own.
"""

from __future__ import annotations

import math
import shlex
import struct
from typing import Any

import attrs
import bson

#: The server's IN limit for one document (``?bson=16k,...`` in etc/stage.json).
MAX_REQUEST = 16 * 1024
#: The largest document the client accepts (the server's OUT limit).
MAX_REPLY = 256 * 1024

_LENGTH = struct.Struct("<i")

Document = dict[str, Any]


class ProtocolError(ValueError):
    """A byte stream that is not a sequence of BSON documents within the size limit."""


class CommandError(ValueError):
    """A command line that does not name a message or lacks its arguments; the text is the usage."""


def encode(document: Document) -> bytes:
    """One request as a BSON document (its own leading length is the frame)."""
    data = bson.encode(document)
    if len(data) > MAX_REQUEST:
        raise ProtocolError(f"a request of {len(data)} bytes is over the server's {MAX_REQUEST}")
    return data


class Decoder:
    """Cuts a byte stream into BSON documents; keeps a partial document until the rest arrives."""

    def __init__(self, limit: int = MAX_REPLY) -> None:
        self.limit = limit
        self._buffer = b""

    def feed(self, data: bytes) -> list[Document]:
        buffer = self._buffer + data
        documents = []
        pos = 0
        while len(buffer) - pos >= 4:
            (size,) = _LENGTH.unpack_from(buffer, pos)
            if not 5 <= size <= self.limit:
                raise ProtocolError(f"a document length of {size} bytes (limit {self.limit})")
            if len(buffer) - pos < size:
                break
            try:
                documents.append(bson.decode(buffer[pos : pos + size]))
            except Exception as err:  # bson raises several types for a damaged document
                raise ProtocolError(f"bad BSON document: {err}") from None
            pos += size
        self._buffer = buffer[pos:]
        return documents


@attrs.frozen
class Command:
    """One client message: its ``op`` and its fields, without the request id."""

    op: str
    fields: dict[str, Any] = attrs.field(factory=dict)

    def request(self, request_id: int) -> Document:
        return {"op": self.op, "id": request_id, **self.fields}


USAGE = """\
login USER [PASSWORD]   log in (one login per connection)
score POINTS            post a score; the board keeps your best
top [N]                 the N best players (default 10)
rank [USER]             your rank (or USER's) with the players around it
join CHANNEL            receive the channel's chat lines
say CHANNEL TEXT...     say something on a channel you joined
leave [CHANNEL]         leave a channel, or all of them"""


#: Integers travel as BSON int64: outside this range the server could not be sent them.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _number(word: str, what: str) -> int | float:
    """An integer (within int64) or a finite float, else a usage error naming ``what``."""
    try:
        value = int(word)
    except ValueError:
        try:
            number = float(word)
        except ValueError:
            raise CommandError(f"{what} must be a number, not {word!r}") from None
        if not math.isfinite(number):
            raise CommandError(f"{what} must be a finite number, not {word!r}") from None
        return number
    if not INT64_MIN <= value <= INT64_MAX:
        raise CommandError(f"{what} is out of range ({INT64_MIN} to {INT64_MAX}), not {word}")
    return value


def _whole(word: str, what: str) -> int:
    """``_number`` as an integer (a float is cut), still within int64."""
    value = int(_number(word, what))
    if not INT64_MIN <= value <= INT64_MAX:
        raise CommandError(f"{what} is out of range ({INT64_MIN} to {INT64_MAX}), not {word}")
    return value


def parse_command(line: str) -> Command:
    """``"say lobby hi there"`` → ``Command("say", {"channel": "lobby", "text": "hi there"})``."""
    first = line.split(None, 1)[:1]
    if first and first[0].lower() == "say":
        words = line.split(None, 2)  # the text is kept as typed, quotes and all
    else:
        try:
            words = shlex.split(line)
        except ValueError as err:
            raise CommandError(str(err)) from None
    if not words:
        raise CommandError("an empty command")
    op, args = words[0].lower(), words[1:]

    def need(low: int, high: int, usage: str) -> None:
        if not low <= len(args) <= high:
            raise CommandError(f"usage: {usage}")

    if op == "login":
        need(1, 2, "login USER [PASSWORD]")
        fields: dict[str, Any] = {"user": args[0]}
        if len(args) == 2:
            fields["password"] = args[1]
        return Command(op, fields)
    if op == "score":
        need(1, 1, "score POINTS")
        return Command(op, {"points": _number(args[0], "POINTS")})
    if op == "top":
        need(0, 1, "top [N]")
        return Command(op, {"n": _whole(args[0], "N")} if args else {})
    if op == "rank":
        need(0, 1, "rank [USER]")
        return Command(op, {"user": args[0]} if args else {})
    if op == "join":
        need(1, 1, "join CHANNEL")
        return Command(op, {"channel": args[0]})
    if op == "say":
        need(2, 2, "say CHANNEL TEXT...")
        return Command(op, {"channel": args[0], "text": args[1].strip()})
    if op == "leave":
        need(0, 1, "leave [CHANNEL]")
        return Command(op, {"channel": args[0]} if args else {})
    raise CommandError(f"unknown command {op!r}; commands:\n{USAGE}")


def split_commands(text: str) -> list[str]:
    """``"login alice; score 10"`` → ``["login alice", "score 10"]`` (blank parts dropped)."""
    return [part.strip() for part in text.split(";") if part.strip()]


#: C0 and C1 control characters (and DEL) → ``\x1b``-style escapes.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` with its control characters shown as ``\\x1b`` escapes: chat lines come from other
    players, and raw ESC, CR or BEL would drive the reader's terminal (clear it, rewrite lines)."""
    return text.translate(_CONTROLS)


def _row(row: Document, me: str | None = None) -> str:
    mark = "  <-" if me is not None and row.get("user") == me else ""
    return f"{row.get('rank', '?'):>5}. {row.get('user', '?'):<20} {_points(row.get('score'))}{mark}"


def _points(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def describe(op: str, reply: Document) -> list[str]:
    """The lines a person reads for ``reply`` to a request of ``op``; a reply whose fields have
    the wrong shape (a server that does not speak this protocol) is shown as it came, not as a
    traceback."""
    try:
        return [printable(line) for line in _describe(op, reply)]
    except (AttributeError, TypeError, ValueError):
        return [f"unexpected reply: {reply!r}"]


def _describe(op: str, reply: Document) -> list[str]:
    if not reply.get("ok"):
        return [f"error: {reply.get('error', 'no reason given')}"]
    if op == "login":
        standing = f"rank {reply['rank']}, best {_points(reply.get('score'))}" if "rank" in reply else "no score yet"
        return [
            f"logged in as {reply.get('user')} on front process {reply.get('front', '?')} "
            f"({standing}; waited {reply.get('queued_ms', 0)} ms for a login slot)"
        ]
    if op == "score":
        best = " (new best)" if reply.get("improved") else f", best {_points(reply.get('best'))}"
        return [f"score {_points(reply.get('score'))}{best}: rank {reply.get('rank')}"]
    if op == "top":
        rows = [_row(r) for r in reply.get("rows", [])]
        return rows + [f"({reply.get('total', 0)} ranked)"]
    if op == "rank":
        user = reply.get("user")
        if "rank" not in reply:
            return [f"{user}: no score yet ({reply.get('total', 0)} ranked)"]
        score = _points(reply.get("score"))
        head = f"{user}: rank {reply['rank']} of {reply.get('total')}, score {score}"
        return [head] + [_row(r, user) for r in reply.get("around", [])]
    if op == "join":
        return [f"joined #{reply.get('channel')}"]
    if op == "say":
        return [f"sent to #{reply.get('channel')}"]
    if op == "leave":
        left = reply.get("left", [])
        return ["left " + ", ".join("#" + c for c in left) if left else "left no channel"]
    return [repr(reply)]


def describe_push(push: Document) -> str:
    """A pushed chat line as ``[#lobby] alice: hi``."""
    if push.get("push") == "chat":
        return printable(f"[#{push.get('channel')}] {push.get('from')}: {push.get('text')}")
    return f"push: {push!r}"
