"""The ``stage.signal`` target grammar parsed into typed values; pure, no I/O.

Every form a Lua script may pass as ``t`` in ``stage.signal(t, ...)`` becomes one frozen value, so
the router dispatches on a type instead of re-reading strings. ``parse_target`` raises only
``AddressError`` (a ``ValueError``), whatever it is given.

Grammar (string forms; ``ID`` is a non-empty message id, ``STAGE`` a non-empty stage id)::

    ^SERVER/INSTANCE/MSGID   ReplyTo          opaque reply address (made by format_reply)
    >CMD.REPLY               LockAcquire      queue on lock CMD, REPLY called on our turn
    >>CMD[.ANY]              LockExtend       extend the holder's time on CMD
    <CMD[.ANY]               LockRelease      release CMD
    :ID                      LocalSync        this stage, synchronously
    [S]STAGE:ID[=REPLY]      ToStage          S = "*" all, "=" this server, "+" other servers
    [S]STAGE+ID[=REPLY]      ToStage          tag_sender: the receiver sees "<sender>:ID"
    SID[=REPLY]              ToStage          S one of "*=+": replicas of the sender's own stage id
    ID[=REPLY]               LocalAsync       this stage, asynchronously

Decisions the target grammar leaves open (see also ``docs/wire.md``):

- Ids are taken verbatim: no whitespace is stripped (a Lua id may hold any bytes).
- A message id must be non-empty: ``""``, ``"stage:"``, ``"*"``, ``":"`` are errors (handlers
  may still be *registered* under a ``"stage:"`` prefix, see ``match_candidates``).
- The stage part ends at the first ``:`` or ``+``; stage ids never contain either.
- The reply part starts at the first ``=`` of the id part that is not its first character, so
  ``"ticket:=category"`` is message ``"=category"`` and ``"a=b=c"`` is id ``a``,
  reply ``"b=c"``. An empty reply (``"id="``) is an error; so is a reply on ``":id"``.
- In lock forms ``CMD`` ends at the first ``.``; lock names never contain dots, the reply id may.
  ``>CMD.REPLY`` needs both parts; the part after the dot of ``>>`` and ``<`` is optional.
- The table form ``{id, addr [, timeout_ms]}`` arrives as a tuple or list; ``timeout_ms`` is a
  non-negative integer (an integral float is accepted, Lua numbers being what they are). The
  items after the id may be left out: ``{id}`` is the target ``id`` (the original's reading).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence

import attrs


class AddressError(ValueError):
    """A signal target that does not parse; the message names the problem."""


class Scope(enum.Enum):
    """Which replicas of a stage id receive a message."""

    ANY = "any"  # one replica, round-robin
    ALL = "*"  # every replica (broadcast)
    LOCAL = "="  # replicas in this server only, in turn
    REMOTE = "+"  # replicas on other servers only, in turn


@attrs.frozen(slots=True)
class ReplyHere:
    """``nil``: reply to the message being handled."""


@attrs.frozen(slots=True)
class LocalAsync:
    """``"id"`` / ``"id=reply"``: a message to this same stage, queued."""

    msgid: str
    reply: str | None = None


@attrs.frozen(slots=True)
class LocalSync:
    """``":id"``: this stage's handler, run now; its results are ``signal``'s results."""

    msgid: str


@attrs.frozen(slots=True)
class ToStage:
    """A message to replicas of a stage id; ``stage=None`` means the sender's own stage id."""

    stage: str | None
    msgid: str
    scope: Scope = Scope.ANY
    tag_sender: bool = False
    reply: str | None = None


@attrs.frozen(slots=True)
class LockAcquire:
    """``">CMD.reply"``: queue on server-wide lock ``cmd``; ``reply`` runs on our turn."""

    cmd: str
    reply: str


@attrs.frozen(slots=True)
class LockExtend:
    """``">>CMD.x"``: move the holder's deadline on ``cmd`` (the value sent is the ms)."""

    cmd: str


@attrs.frozen(slots=True)
class LockRelease:
    """``"<CMD.*"``: release ``cmd`` (only when sent by the holder)."""

    cmd: str


@attrs.frozen(slots=True)
class ToServer:
    """``{id, addr [, timeout_ms]}``: message ``msgid`` to the server at ``addr``."""

    msgid: str
    addr: str
    timeout_ms: int | None = None


@attrs.frozen(slots=True)
class ReplyTo:
    """An opaque reply address: message ``msgid`` to replica ``instance`` of server ``server``."""

    server: str
    instance: int
    msgid: str


Address = ReplyHere | LocalAsync | LocalSync | ToStage | LockAcquire | LockExtend | LockRelease | ToServer | ReplyTo

REPLY_HERE = ReplyHere()
_SCOPES = {"*": Scope.ALL, "=": Scope.LOCAL, "+": Scope.REMOTE}


def format_reply(server: str, instance: int, msgid: str) -> str:
    """The reply address string for ``ReplyTo(server, instance, msgid)``.

    Raises ``AddressError`` when the parts could not be parsed back (a ``/`` in the server id,
    an empty message id, a negative instance).
    """
    if not server or "/" in server:
        raise AddressError(f"bad server id in reply address: {server!r}")
    if type(instance) is not int or instance < 0:
        raise AddressError(f"bad instance in reply address: {instance!r}")
    if not msgid:
        raise AddressError("empty message id in reply address")
    return f"^{server}/{instance}/{msgid}"


def parse_target(target: object) -> Address:
    """Parse one ``stage.signal`` target: ``None``, a string, or the ``{id, addr[, ms]}`` table.

    Raises ``AddressError`` (and nothing else) when ``target`` is not a valid address.
    """
    if target is None:
        return REPLY_HERE
    if type(target) is str:
        return _parse_string(target)
    if isinstance(target, str):
        return _parse_string(str.__str__(target))
    if type(target) is tuple or type(target) is list:
        return _parse_server(target)
    raise AddressError(f"a signal target is nil, a string or a table, not {type(target).__name__}")


def match_candidates(msgid: str) -> list[str]:
    """The handler ids to try for ``msgid``, in handler lookup order (docs/messaging.md).

    ``"stage:group.msg.cb"`` → ``["stage:group.msg.cb", "stage:group.msg.", "stage:group.",
    "stage:"]``; dots before the first ``:`` are not separators; without ``:``, ``"a.b.c"`` →
    ``["a.b.c", "a.b.", "a."]``.
    """
    colon = msgid.find(":")
    start = colon + 1  # 0 when there is no colon
    result = [msgid]
    end = len(msgid) - 1  # an id ending in "." is already its own first prefix
    while True:
        dot = msgid.rfind(".", start, end)
        if dot < 0:
            break
        result.append(msgid[: dot + 1])
        end = dot
    if colon >= 0 and len(msgid) > start:
        result.append(msgid[:start])
    return result


@functools.lru_cache(maxsize=4096)
def _parse_string(s: str) -> Address:
    if not s:
        raise AddressError("empty signal target")
    first = s[0]
    if first == "^":
        return _parse_reply(s)
    if first == ">":
        if s.startswith(">>"):
            return LockExtend(_lock_name(s, 2, need_reply=False)[0])
        cmd, lock_reply = _lock_name(s, 1, need_reply=True)
        return LockAcquire(cmd, lock_reply)
    if first == "<":
        return LockRelease(_lock_name(s, 1, need_reply=False)[0])
    if first == ":":
        msgid = s[1:]
        if not msgid:
            raise AddressError(f"empty message id in {s!r}")
        if _reply_split(msgid) >= 0:
            raise AddressError(f"a synchronous ':id' target takes no '=reply': {s!r}")
        return LocalSync(msgid)
    scope = _SCOPES.get(first)
    body = s if scope is None else s[1:]
    sep = _stage_separator(body)
    if sep < 0:
        msgid, reply = _split_reply(body, s)
        if scope is None:
            return LocalAsync(msgid, reply)
        return ToStage(None, msgid, scope, False, reply)
    stage = body[:sep]
    if not stage:
        raise AddressError(f"empty stage id in {s!r}")
    msgid, reply = _split_reply(body[sep + 1 :], s)
    return ToStage(stage, msgid, scope or Scope.ANY, body[sep] == "+", reply)


def _stage_separator(body: str) -> int:
    """Index of the first ``:`` or ``+`` (the end of the stage part), or -1."""
    colon = body.find(":")
    plus = body.find("+")
    if colon < 0:
        return plus
    if plus < 0:
        return colon
    return min(colon, plus)


def _reply_split(idpart: str) -> int:
    """Index of the ``=`` starting the reply part (never the first character), or -1."""
    return idpart.find("=", 1)


def _split_reply(idpart: str, whole: str) -> tuple[str, str | None]:
    if not idpart:
        raise AddressError(f"empty message id in {whole!r}")
    eq = _reply_split(idpart)
    if eq < 0:
        return idpart, None
    reply = idpart[eq + 1 :]
    if not reply:
        raise AddressError(f"empty reply id after '=' in {whole!r}")
    return idpart[:eq], reply


def _lock_name(s: str, start: int, need_reply: bool) -> tuple[str, str]:
    dot = s.find(".", start)
    cmd = s[start:] if dot < 0 else s[start:dot]
    if not cmd:
        raise AddressError(f"empty lock name in {s!r}")
    reply = "" if dot < 0 else s[dot + 1 :]
    if need_reply and not reply:
        raise AddressError(f"'>CMD.reply' needs a reply id: {s!r}")
    return cmd, reply


def _parse_reply(s: str) -> ReplyTo:
    server, slash1, rest = s[1:].partition("/")
    instance, slash2, msgid = rest.partition("/")
    if not (server and slash1 and slash2 and msgid):
        raise AddressError(f"malformed reply address {s!r}")
    if not (instance.isascii() and instance.isdigit()):
        raise AddressError(f"bad instance in reply address {s!r}")
    return ReplyTo(server, int(instance), msgid)


def _parse_server(target: Sequence[object]) -> Address:
    """``{id, addr [, timeout_ms]}``; the document lets every item after the id be left out, and
    ``{id}`` (or ``{id, nil}``) is then the id's own string target, as on the original."""
    if not 1 <= len(target) <= 3:
        raise AddressError(f"a server target is {{id, addr [, timeout_ms]}}, got {len(target)} items")
    msgid = target[0]
    if not isinstance(msgid, str) or not msgid:
        raise AddressError(f"server target: the message id must be a non-empty string: {msgid!r}")
    if len(target) == 1 or (len(target) == 2 and target[1] is None):
        return _parse_string(str.__str__(msgid))
    addr = target[1]
    if not isinstance(addr, str) or not addr:
        raise AddressError(f"server target: the address must be a non-empty string: {addr!r}")
    timeout = target[2] if len(target) == 3 else None
    return ToServer(str.__str__(msgid), str.__str__(addr), _timeout_ms(timeout))


def _timeout_ms(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is float and math.isfinite(value) and value.is_integer():
        value = int(value)
    if type(value) is not int or value < 0:
        raise AddressError(f"server target: timeout_ms must be a non-negative integer: {value!r}")
    return value
