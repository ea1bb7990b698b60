"""Index requests on Redis or Valkey: the embedded board's commands, replies and errors, kept in
sorted sets and hashes and run by one Lua script per request table (docs/index.md, Backends).

``RedisExecutor`` is the embedded ``Executor`` with its handlers turned into steps of a plan: the
request table is parsed and checked by the shared code (same keys, same ``#N.`` and writes-first
order, same error texts), each valid entry becomes one operation, and the whole table runs as one
``EVALSHA`` — atomic, so a ``set`` of several members (or a whole table) is all or nothing, and
one round trip. The script's msgpack answer is then shaped into the embedded board's reply.

Keys, for index ``NAME`` under ``PREFIX``:

- ``PREFIX NAME:v`` hash member → its value (msgpack; every member has an entry)
- ``PREFIX NAME:tN`` sorted set of tier N: score = the score as a double, member = ``SEQ`` + id
- ``PREFIX NAME:sN`` hash member → ``SEQ`` + kind + exact score text (``i42``, ``f1.5``, ``z0``)
- ``PREFIX NAME:q`` the index's counter of score changes

``SEQ`` is 15 decimal digits, ``999999999999999 − counter`` at the change: Redis orders equal
scores by member bytes, and ``ZREVRANGE`` puts the larger first, so among equal scores the earlier
change ranks higher — the embedded board's "earlier set first".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import msgpack

from stagetx.codec import CodecError, pack_py, unpack_py
from stagetx.stages.index.commands import Command, Executor, RequestError, for_each_query

SCRIPT = rb"""
local prefix = ARGV[1]
local plan = cmsgpack.unpack(ARGV[2])
local TOP = 999999999999999
local TIER = {'1', '2', '3', '4'}  -- a tier's number as key text, without Lua's number formatting
local out = {}
local counters = {}  -- each index's change counter, read once and written once per run

local function counter(base)
  local seq = counters[base]
  if not seq then
    seq = tonumber(redis.call('GET', base .. ':q') or '0')
  end
  return seq
end

local function rows(base, tier, first, count)
  local zkey = base .. ':t' .. tier
  local found = {}
  if first < 1 then first = 1 end
  if count <= 0 then return found end
  local entries = redis.call('ZREVRANGE', zkey, first - 1, first + count - 2)
  for i, entry in ipairs(entries) do
    local id = string.sub(entry, 16)
    local state = redis.call('HGET', base .. ':s' .. tier, id)
    found[i] = {id, string.sub(state, 16), first + i - 1, redis.call('HGET', base .. ':v', id)}
  end
  return found
end

local function rank(base, tier, id)
  local state = redis.call('HGET', base .. ':s' .. tier, id)
  if not state then return false end
  return redis.call('ZREVRANK', base .. ':t' .. tier, string.sub(state, 1, 15) .. id) + 1
end

-- the member's value: replaced when the request carries one, else kept (a new member gets nil)
local function value(base, id, given, packed)
  if given then
    redis.call('HSET', base .. ':v', id, packed)
  else
    redis.call('HSETNX', base .. ':v', id, packed)
  end
end

-- tier t's score of the member, stamped: whether it changed (unchanged: nothing written), and
-- whether the member had a score in that tier (then it is a member: it has a value entry)
local function put(base, id, t, double, kind, text, stamp)
  local skey, zkey = base .. ':s' .. t, base .. ':t' .. t
  local old = redis.call('HGET', skey, id)
  if old and string.sub(old, 17) == text then return false, true end
  if old then redis.call('ZREM', zkey, string.sub(old, 1, 15) .. id) end
  redis.call('HSET', skey, id, stamp .. kind .. text)
  redis.call('ZADD', zkey, double, stamp .. id)
  return true, old ~= false
end

for step, op in ipairs(plan) do
  local kind, base = op[1], prefix .. op[2]
  if kind == 'one' then  -- one member, one score in the command's tier: the common set, flat
    local tier, id, seq = TIER[op[3]], op[4], counter(base)
    local skey, zkey = base .. ':s' .. tier, base .. ':t' .. tier
    local old = redis.call('HGET', skey, id)
    if old and string.sub(old, 17) == op[9] then  -- unchanged: nothing written
      counters[base] = seq
      out[step] = 0
    else
      local stamp = string.format('%015d', TOP - seq - 1)
      local member = stamp .. id
      if old then redis.call('ZREM', zkey, string.sub(old, 1, 15) .. id) end
      redis.call('HSET', skey, id, stamp .. op[8] .. op[9])
      redis.call('ZADD', zkey, op[7], member)
      counters[base] = seq + 1
      out[step] = redis.call('ZREVRANK', zkey, member) + 1
    end
    if op[5] or not old then value(base, id, op[5], op[6]) end
  elseif kind == 'set' then
    local tier, seq = op[3], counter(base)
    local ranks = {}
    for i, m in ipairs(op[4]) do
      local id = m[1]
      value(base, id, m[2], m[3])
      local stamp = string.format('%015d', TOP - seq - 1)
      local changed, reply = false, 0
      for _, score in ipairs(m[4]) do
        local t = score[1]
        if put(base, id, t, score[2], score[3], score[4], stamp) then
          changed = true
          if t == tier then reply = redis.call('ZREVRANK', base .. ':t' .. t, stamp .. id) + 1 end
        end
      end
      if changed then seq = seq + 1 end
      ranks[i] = reply
    end
    counters[base] = seq
    out[step] = ranks
  elseif kind == 'del' then
    local removed = 0
    for _, id in ipairs(op[3]) do
      if redis.call('HDEL', base .. ':v', id) == 1 then
        removed = removed + 1
        for t = 1, 4 do
          local state = redis.call('HGET', base .. ':s' .. t, id)
          if state then
            redis.call('HDEL', base .. ':s' .. t, id)
            redis.call('ZREM', base .. ':t' .. t, string.sub(state, 1, 15) .. id)
          end
        end
      end
    end
    out[step] = removed
  elseif kind == 'get' then
    local found = {}
    for i, id in ipairs(op[3]) do
      local value = redis.call('HGET', base .. ':v', id)
      if value then
        local tiers = {}
        for t = 1, 4 do
          local state = redis.call('HGET', base .. ':s' .. t, id)
          if state then
            tiers[#tiers + 1] = {t, string.sub(state, 16), rank(base, t, id)}
          end
        end
        found[i] = {value, tiers}
      else
        found[i] = false
      end
    end
    out[step] = found
  elseif kind == 'rank' then
    out[step] = rows(base, op[3], op[4], op[5])
  elseif kind == 'score' then
    local zkey = base .. ':t' .. op[3]
    local above = redis.call('ZCOUNT', zkey, '(' .. op[4], '+inf')
    if above < redis.call('ZCARD', zkey) then
      out[step] = rows(base, op[3], above + 1, op[5])
    else
      out[step] = {}
    end
  elseif kind == 'member' then
    local r = rank(base, op[3], op[4])
    if r then
      out[step] = rows(base, op[3], math.max(r - op[5], 1), op[6])
    else
      out[step] = {}
    end
  else
    out[step] = redis.call('ZCARD', base .. ':t' .. op[3])
  end
end
for base, seq in pairs(counters) do redis.call('SET', base .. ':q', seq) end
return cmsgpack.pack(out)
"""

WRITE_STEPS = frozenset({b"one", b"set", b"del"})  # the script's steps that change boards (``WAIT`` after them)
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest()  # what EVALSHA names it by (txredisapi's script_hashes too)
_pack_plan = msgpack.Packer(use_bin_type=False).pack  # cmsgpack reads no bin types: bytes as raw str
_NIL = pack_py((None,))
EXACT = 2**53  # ints up to this size are doubles exactly


class Pending:
    """The place of an entry's reply in the script's answer; ``shape`` turns that into the reply."""

    __slots__ = ("step", "shape")

    def __init__(self, step: int, shape: Callable[[Any], Any]) -> None:
        self.step = step
        self.shape = shape


class Plan:
    """The operations of one request table, in the order the executor ran its entries."""

    def __init__(self) -> None:
        self.steps: list[list[Any]] = []

    def add(self, operation: list[Any], shape: Callable[[Any], Any]) -> Pending:
        self.steps.append(operation)
        return Pending(len(self.steps) - 1, shape)

    def pack(self) -> bytes:
        return pack_steps(self.steps)


def pack_steps(steps: list[list[Any]]) -> bytes:
    """The script's plan argument: the steps of one or several request tables, run in order."""
    return _pack_plan(steps)


class RedisExecutor(Executor):
    """Plans request tables for the Redis script; every check is the embedded executor's."""

    def __init__(self, key_size: int) -> None:
        super().__init__(self, key_size)  # type: ignore[arg-type]  # only check_value is used
        self._plan = Plan()

    def plan(self, request: Any) -> tuple[dict[Any, Any], Plan]:
        """The reply table with ``Pending`` entries for the script, and the script's plan.

        Raises RequestError for a request that is not a table at all.
        """
        self._plan = Plan()
        reply = self.run(request)
        return reply, self._plan

    def check_value(self, value: Any) -> None:
        """A value is stored as the message carried it (msgpack); what cannot be packed is refused."""
        self._packed(value)

    def _set(self, command: Command, argument: Any) -> Any:
        if not argument:
            return {}
        if type(argument) is dict and len(argument) == 1:
            fast = self._set_one(command, argument)
            if fast is not None:
                return fast
        updates = self.set_updates(command, argument)
        members = [
            [
                member,
                has_value,
                pack_py((value,)) if has_value else _NIL,
                [[t, *_score_parts(s)] for t, s in tiers.items()],
            ]
            for member, tiers, value, has_value in updates
        ]
        ids = [member for member, _, _, _ in updates]
        return self._plan.add([b"set", command.name, command.tier, members], lambda ranks: dict(zip(ids, ranks)))

    def _set_one(self, command: Command, argument: dict[Any, Any]) -> Pending | None:  # type: ignore[override]
        """One member with ``{i = score}`` or ``{i = score, v = value}`` (bytes keys, as from Lua):
        planned as one flat step, without the general path's lists (the embedded ``_set_one``'s
        checks); None for anything else."""
        ((member, spec),) = argument.items()
        if type(member) is not bytes or type(spec) is not dict or not 0 < len(member) <= self.key_size:
            return None
        score: Any = spec.get(b"i")
        kind = type(score)
        if kind is not int and (kind is not float or score != score):
            return None
        size = len(spec)
        if size == 1:
            packed, has_value = _NIL, False
        elif size == 2 and b"v" in spec:
            packed, has_value = self._packed(spec[b"v"]), True
        else:
            return None
        step = [b"one", command.name, command.tier, member, has_value, packed, *_score_parts(score)]
        return self._plan.add(step, lambda rank: {member: rank})

    def _packed(self, value: Any) -> bytes:
        try:
            return pack_py((value,))
        except CodecError as error:
            raise RequestError(f"value cannot be stored: {error}") from None

    def _del(self, command: Command, argument: Any) -> Any:
        members = self.members(argument, "del takes {ID, …}")
        return self._plan.add([b"del", command.name, members], int)

    def _get(self, command: Command, argument: Any) -> Any:
        members = self.members(argument, "get takes {ID, …}")
        return self._plan.add([b"get", command.name, members], lambda found: _entries(members, found))

    def _range(self, command: Command, argument: Any) -> Any:
        query = self.range_query(argument)
        if len(query) == 2:
            score, count = query
            return self._plan.add([b"score", command.name, command.tier, _double(score), count], _rows)
        member, before, count = query
        return self._plan.add([b"member", command.name, command.tier, member, before, count], _rows)

    def _for_each(self, command: Command, argument: Any) -> Any:
        first, count = for_each_query(argument)
        return self._plan.add([b"rank", command.name, command.tier, first, count], _rows)

    def _total(self, command: Command, argument: Any) -> Any:
        return self._plan.add([b"total", command.name, command.tier], int)


def unpack_answer(answer: bytes) -> list[Any]:
    """The script's results, one per planned step, in plan order."""
    return _list(msgpack.unpackb(answer, raw=True, strict_map_key=False))


def fill(reply: dict[Any, Any], results: list[Any], offset: int = 0) -> dict[Any, Any]:
    """The reply table with every ``Pending`` entry replaced by its shaped result; ``offset`` is
    where this table's steps start among ``results`` (several tables share one script run)."""
    return {
        key: entry.shape(results[offset + entry.step]) if type(entry) is Pending else entry
        for key, entry in reply.items()
    }


def failed(reply: dict[Any, Any], error: str) -> dict[Any, Any]:
    """The reply table of a request whose script did not run: ``{error = …}`` for every planned entry."""
    return {key: {"error": error} if type(entry) is Pending else entry for key, entry in reply.items()}


def _double(score: int | float) -> bytes:
    """The score as Redis's sorted-set double (ints beyond 2**53 round to the nearest double)."""
    try:
        return repr(float(score)).encode()
    except OverflowError:
        return b"inf" if score > 0 else b"-inf"


def _score_parts(score: int | float) -> tuple[bytes, bytes, bytes]:
    """(double for ZADD, kind, exact text): equal numbers have equal texts, so ``1`` then ``1.0``
    is an unchanged score as on the embedded board; the kind gives the score back as it was set."""
    if type(score) is int:
        if -EXACT <= score <= EXACT:  # its decimal text is its double too (the common score)
            text = b"%d" % score
            return text, b"i", text
        return _double(score), b"i", str(score).encode()
    assert type(score) is float
    if score == 0 and math.copysign(1.0, score) < 0:
        return b"0", b"z", b"0"
    if score.is_integer():
        return _double(score), b"f", str(int(score)).encode()
    return _double(score), b"f", repr(score).encode()


def _score(state: bytes) -> int | float:
    kind, text = state[:1], state[1:]
    if kind == b"i":
        return int(text)
    if kind == b"z":
        return -0.0
    return float(text)


def _value(packed: Any) -> Any:
    return unpack_py(packed)[0] if type(packed) is bytes else None


def _rows(found: Any) -> list[dict[str, Any]]:
    rows = []
    for member, state, rank, packed in _list(found):
        row = {"k": member, "i": _score(state), "d": rank}
        value = _value(packed)
        if value is not None:
            row["v"] = value
        rows.append(row)
    return rows


def _entries(members: list[bytes], found: Any) -> dict[bytes, Any]:
    reply: dict[bytes, Any] = {}
    for member, hit in zip(members, _list(found)):
        if not hit:
            continue
        packed, tiers = hit
        entry: dict[str, Any] = {"I": {tier: {"i": _score(state), "d": rank} for tier, state, rank in _list(tiers)}}
        value = _value(packed)
        if value is not None:
            entry["v"] = value
        reply[member] = entry
    return reply


def _list(found: Any) -> list[Any]:
    """A Lua array from cmsgpack: an empty one arrives as a map, one with holes as a map too."""
    if isinstance(found, dict):
        return [found.get(i) for i in range(1, max(found, default=0) + 1)]
    return found
