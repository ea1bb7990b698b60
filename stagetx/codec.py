"""Values on the move: Lua values and Python natives to msgpack payloads and back.

A payload is one msgpack array holding the values of one message, in order. Mapping:

============================  =====================================  ==========================
Lua                           msgpack                                Python (``unpack_py``)
============================  =====================================  ==========================
nil                           nil                                    ``None``
boolean                       bool                                   ``bool``
integer (64-bit)              int                                    ``int``
float (also integral ones)    float 64                               ``float``
string                        bin (Python ``str`` packs as str)      ``bytes`` (both)
table with keys exactly 1..n  array (``{}`` too)                     ``list``
other table                   map (keys bool, int, float, string)    ``dict``
function                      ext 1: ``len(vm)`` byte, vm, bytecode  ``LuaFunctionBlob``
``stage.null``                ext 2, empty                           ``NULL``
============================  =====================================  ==========================

``vm`` is the runtime kind (``"lua54"``, ``"luajit21"``); a function only loads into a runtime of
the same kind. ``NULL`` arrives in Lua as nil: a table entry set to it is absent, an argument is
nil. Strings are byte strings end to end; a Python ``str`` is UTF-8 encoded with
``surrogateescape``, so text decoded from Lua bytes that way returns the original bytes.

What cannot move raises ``CodecError`` naming the problem: coroutines, userdata, Python objects,
C functions, tables nested deeper than ``MAX_DEPTH`` levels (which catches cyclic tables), table
keys that are tables or functions, functions of another VM kind. ``pack_py``/``unpack_py`` leave
depth to msgpack's own limits; a Lua runtime refuses a payload deeper than ``MAX_DEPTH`` in
``unpack_lua``. Known limits of the Python side: a Lua table with both ``true`` and ``1`` (or
``false`` and ``0``) as keys loses one of them in ``unpack_py``'s ``dict`` (``unpack_lua`` keeps
both); integers in 2^63..2^64-1 from Python cannot enter Lua (``CodecError`` at ``unpack_lua``).
Under ``luajit21`` every Lua number is a double: integers beyond ±2^53 lose precision, and lupa
hands integral numbers to Python as ``int``, so a LuaJIT ``1.0`` travels as the integer 1.

The Lua side reads tables through lupa once per table (``items()``) and builds them with
``table_from`` once per table; ``stage.null`` is recognised as the *empty* table that is
``rawequal`` to ``bridge.null`` (only empty tables pay that check, so ``stage.null`` must stay
empty). Two fast paths give the same results: a Lua 5.4 stage packs plain values (no functions,
at most 16 levels, 65,536 entries) in Lua itself (``stagetx/lua/pack.lua``, called by
``stage.signal``), and ``unpack_lua`` builds short payloads of only strings, integers, arrays and
maps with one recursive ``table_from`` (``_LuaSide._unpack_small``). Measured on the reference
machine (timeit, best of 5), for the values ``"player-1", 42, {a = 1, b = "two", c = 3.5,
d = true, e = {1, 2}}``: ``pack_lua`` 4.8 µs, ``unpack_lua`` 4.1 µs (luajit21: 4.8 / 6.3 µs);
three scalars only: 0.7 / 0.9 µs; ``pack_py`` 0.5 µs, ``unpack_py`` 0.45 µs.
"""

from __future__ import annotations

import re
import threading
from contextlib import AbstractContextManager
from typing import Any, Protocol

import attrs
import lupa.lua54
import lupa.luajit21
import msgpack

EXT_FUNCTION = 1
EXT_NULL = 2
MAX_DEPTH = 64
_MAX_ENTRIES = 1 << 22  # table entries read per pack_lua call: stops exponential shared subtables

LUA_INT_MIN, LUA_INT_MAX = -(2**63), 2**63 - 1  # the integers a Lua value can hold
_NoneType = type(None)
_SCALARS = frozenset({bytes, int, float, bool, _NoneType})
_KEYS = frozenset({bytes, int, float, bool})
_THREAD_TYPES = frozenset({"_LuaThread", "_LuaCoroutineFunction"})
# The type bytes of msgpack nil, false, true, ext, float: a payload without any of them (even
# inside a string) holds only strings, integers, arrays and maps.
_NOT_PLAIN = re.compile(b"[\xc0\xc2\xc3\xc7-\xcb\xd4-\xd8]")


class CodecError(ValueError):
    """A value that cannot move, or a payload that does not decode."""


@attrs.frozen(slots=True)
class LuaFunctionBlob:
    """A Lua function as bytecode: ``vm`` names the runtime kind that can load ``code``."""

    vm: str
    code: bytes


class _Null:
    """The type of ``NULL``: ``stage.null`` as Python sees it (nil where Lua cannot hold nil)."""

    _instance: _Null | None = None

    def __new__(cls) -> _Null:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NULL"


NULL = _Null()
_NULL_EXT = msgpack.ExtType(EXT_NULL, b"")


class LuaBridge(Protocol):
    """What ``pack_lua``/``unpack_lua`` need from one Lua runtime (offered by the Lua host)."""

    lua: Any  # lupa LuaRuntime, encoding=None
    vm_kind: str  # "lua54" or "luajit21"
    null: Any  # the runtime's stage.null table (an empty table)

    def dump_function(self, f: Any) -> bytes:
        """``string.dump(f)``; raises for C functions."""

    def load_function(self, code: bytes) -> Any:
        """Bytecode → function with nil upvalues and the runtime's globals as its environment."""

    def admitted(self) -> AbstractContextManager[None]:
        """A context in which tables built from Python cannot meet the runtime's memory limit
        (lupa's pushes are not protected: a failed allocation there aborts the process)."""


# The codec keeps its per-runtime state (helpers looked up once) in the bridge's attribute
# ``_stagetx_codec``: a bridge must accept new attributes (no __slots__ without a __dict__).


def _function_ext(vm: str, code: bytes) -> msgpack.ExtType:
    tag = vm.encode("ascii")
    return msgpack.ExtType(EXT_FUNCTION, bytes((len(tag),)) + tag + code)


def _split_function_ext(data: bytes) -> tuple[str, bytes]:
    if not data or len(data) < 1 + data[0]:
        raise CodecError("malformed function value")
    try:
        vm = data[1 : 1 + data[0]].decode("ascii")
    except UnicodeDecodeError:
        raise CodecError("malformed function value: bad VM kind") from None
    return vm, data[1 + data[0] :]


class _BoolKey:
    """A boolean table key kept apart from the integer keys 1 and 0 inside a Python dict."""

    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value


def _py_default(obj: object) -> object:
    if obj is NULL:
        return _NULL_EXT
    if type(obj) is LuaFunctionBlob:
        return _function_ext(obj.vm, obj.code)
    if type(obj) is _BoolKey:
        return obj.value
    raise CodecError(f"cannot send a Python {type(obj).__name__} value")


_local = threading.local()


def _packer() -> msgpack.Packer:
    """A per-thread packer (``Packer`` objects are not thread-safe; creating one costs)."""
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape", default=_py_default)
        return _local.packer


def _pack(obj: object) -> bytes:
    try:
        return _packer().pack(obj)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot send value: {e}") from e


def pack_py(values: tuple[Any, ...]) -> bytes:
    """Encode Python natives (see the module table) as one payload."""
    return _pack(values)


def function_kinds(data: bytes) -> set[str]:
    """The VM kinds (``"lua54"``, ``"luajit21"``) of the functions a payload holds, found by
    decoding it without building anything else worth keeping (for a check at the sender)."""
    kinds: set[str] = set()

    def hook(code: int, ext: bytes) -> None:
        if code == EXT_FUNCTION:
            kinds.add(_split_function_ext(ext)[0])

    msgpack.unpackb(data, ext_hook=hook, raw=True, strict_map_key=False)
    return kinds


def _py_ext(code: int, data: bytes) -> object:
    if code == EXT_FUNCTION:
        vm, bytecode = _split_function_ext(data)
        return LuaFunctionBlob(vm, bytecode)
    if code == EXT_NULL:
        return NULL
    raise CodecError(f"unknown extension type {code}")


def unpack_py(data: bytes) -> tuple[Any, ...]:
    """Decode a payload to Python natives; raises only ``CodecError`` on bad input."""
    try:
        values = msgpack.unpackb(data, raw=True, strict_map_key=False, ext_hook=_py_ext)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises many types on garbage; all mean "malformed"
        raise CodecError(f"malformed payload: {e}") from e
    if type(values) is not list:
        raise CodecError("malformed payload: not an array of values")
    return tuple(values)


class _Pairs(list):  # type: ignore[type-arg]
    """A msgpack map as its list of pairs (a dict would merge the keys ``True`` and ``1``)."""

    __slots__ = ()


def _side(bridge: LuaBridge) -> _LuaSide:
    """The conversion state of ``bridge``, made on first use and kept on the bridge itself."""
    try:
        return bridge._stagetx_codec  # type: ignore[attr-defined,no-any-return]
    except AttributeError:
        side = _LuaSide(bridge)
        bridge._stagetx_codec = side  # type: ignore[attr-defined]
        return side


def pack_lua(bridge: LuaBridge, values: tuple[Any, ...]) -> bytes:
    """Encode values of ``bridge``'s runtime (as lupa hands them to Python) as one payload."""
    return _side(bridge).pack(values)


def unpack_lua(bridge: LuaBridge, data: bytes) -> tuple[Any, ...]:
    """Decode a payload into fresh values of ``bridge``'s runtime; raises ``CodecError``."""
    return _side(bridge).unpack(data)


class _LuaSide:
    """Per-runtime conversion state: the runtime's helpers looked up once."""

    def __init__(self, bridge: LuaBridge) -> None:
        self.vm = bridge.vm_kind
        module = {"lua54": lupa.lua54, "luajit21": lupa.luajit21}.get(self.vm)
        if module is None:
            raise CodecError(f"unknown Lua VM kind {self.vm!r}")
        self.lua_type = module.lua_type
        self.table_from = bridge.lua.table_from
        self.dump = bridge.dump_function
        self.load = bridge.load_function
        self.admitted = bridge.admitted
        self.is_null = bridge.lua.execute(
            "local rawequal, null = rawequal, ...; return function(x) return rawequal(x, null) end",
            bridge.null,
        )
        self.find_cycle = bridge.lua.execute(_FIND_CYCLE)

    # -- Lua → payload -------------------------------------------------------------------------

    def pack(self, values: tuple[Any, ...]) -> bytes:
        budget = [_MAX_ENTRIES]
        out = [v if type(v) in _SCALARS else self._value(v, 0, budget, values) for v in values]
        return _pack(out)

    def _value(self, v: Any, depth: int, budget: list[int], root: tuple[Any, ...]) -> object:
        kind = self.lua_type(v)
        if kind == "table":
            return self._table(v, depth + 1, budget, root)
        if kind == "function":
            if type(v).__name__ in _THREAD_TYPES:
                raise CodecError("cannot send a coroutine (thread) value")
            try:
                code = self.dump(v)
            except Exception as e:
                raise CodecError(f"cannot send a C function (no bytecode): {e}") from e
            return _function_ext(self.vm, code)
        if kind == "thread":
            raise CodecError("cannot send a coroutine (thread) value")
        if kind == "userdata":
            raise CodecError("cannot send a userdata value")
        if v is NULL:
            return _NULL_EXT
        if type(v) is LuaFunctionBlob:
            if v.vm != self.vm:
                raise CodecError(f"cannot send a {v.vm} function from a {self.vm} runtime")
            return _function_ext(v.vm, v.code)
        raise CodecError(f"cannot send a Python {type(v).__name__} value")

    def _table(self, t: Any, depth: int, budget: list[int], root: tuple[Any, ...]) -> object:
        if depth > MAX_DEPTH:
            if self.find_cycle(*root):
                raise CodecError("cannot send a cyclic table")
            raise CodecError(f"cannot send tables nested deeper than {MAX_DEPTH} levels")
        items = list(t.items())
        n = len(items)
        if n == 0:
            return _NULL_EXT if self.is_null(t) else []
        budget[0] -= n
        if budget[0] < 0:
            raise CodecError(f"cannot send more than {_MAX_ENTRIES} table entries in one message")
        sequence = True
        in_order = True
        for i, (k, _) in enumerate(items, 1):
            if type(k) is not int or not 0 < k <= n:
                sequence = False
                break
            if k != i:
                in_order = False
        scalars = _SCALARS
        if sequence:
            if not in_order:
                items.sort(key=lambda kv: kv[0])  # type: ignore[no-any-return]
            return [v if type(v) in scalars else self._value(v, depth, budget, root) for _, v in items]
        result: dict[object, object] = {}
        for k, v in items:
            if type(k) not in _KEYS:
                raise CodecError(f"cannot send a table with a {self._kind(k)} key")
            if type(k) is bool:
                k = _BoolKey(k)
            result[k] = v if type(v) in scalars else self._value(v, depth, budget, root)
        return result

    def _kind(self, v: Any) -> str:
        return self.lua_type(v) or f"Python {type(v).__name__}"

    # -- payload → Lua -------------------------------------------------------------------------

    def _ext(self, code: int, data: bytes) -> object:
        if code == EXT_FUNCTION:
            vm, bytecode = _split_function_ext(data)
            if vm != self.vm:
                raise CodecError(f"cannot load a {vm} function into a {self.vm} runtime")
            try:
                return self.load(bytecode)
            except Exception as e:
                raise CodecError(f"cannot load function: {e}") from e
        if code == EXT_NULL:
            return None
        raise CodecError(f"unknown extension type {code}")

    def unpack(self, data: bytes) -> tuple[Any, ...]:
        if len(data) <= MAX_DEPTH and _NOT_PLAIN.search(data) is None:
            with self.admitted():
                small = self._unpack_small(data)
            if small is not None:
                return small
        try:
            values = msgpack.unpackb(
                data,
                raw=True,
                strict_map_key=False,
                ext_hook=self._ext,
                object_pairs_hook=_Pairs,
                timestamp=0,
            )
        except CodecError:
            raise
        except Exception as e:  # malformed input: msgpack raises many types
            raise CodecError(f"malformed payload: {e}") from e
        if type(values) is not list:
            raise CodecError("malformed payload: not an array of values")
        for v in values:  # the common case, scalars only, needs no conversion
            tv = type(v)
            if tv is int:
                if not LUA_INT_MIN <= v <= LUA_INT_MAX:
                    break
            elif tv not in _SCALARS:
                break
        else:
            return tuple(values)
        try:
            with self.admitted():
                return tuple(self._top(v) for v in values)
        except CodecError:
            raise
        except Exception as e:  # lupa: integer out of range, NaN key, out of memory
            raise CodecError(f"cannot build Lua value: {e}") from e

    def _unpack_small(self, data: bytes) -> tuple[Any, ...] | None:
        """The fast path for short payloads of strings, integers, arrays and maps (most replies):
        plain dicts, and one recursive ``table_from`` per table argument.

        The byte check (``_NOT_PLAIN``) leaves no key that a dict would merge (``true`` and
        ``1``) or that Lua refuses (nil, NaN: lupa would abort the process), and a payload of at
        most ``MAX_DEPTH`` bytes cannot nest deeper than that. An integer Lua cannot hold makes
        lupa raise. None: take the general path, which decodes the same or raises the
        ``CodecError`` that names the problem.
        """
        try:
            values = msgpack.unpackb(data, raw=True, strict_map_key=False)
            if type(values) is not list:
                return None
            for i, v in enumerate(values):
                tv = type(v)
                if tv is dict or tv is list:
                    values[i] = self.table_from(v, recursive=True)
                elif tv is int and not LUA_INT_MIN <= v <= LUA_INT_MAX:
                    return None
            return tuple(values)
        except Exception:  # malformed, or a value Lua cannot hold: the general path says which
            return None

    def _top(self, v: Any) -> Any:
        """One argument: tables built; integers checked here, as lupa pushes them later."""
        tv = type(v)
        if tv is int:
            if not LUA_INT_MIN <= v <= LUA_INT_MAX:
                raise CodecError(f"integer {v} does not fit a Lua integer")
            return v
        return v if tv in _SCALARS else self._to_lua(v, 0)

    def _to_lua(self, v: Any, depth: int) -> Any:
        tv = type(v)
        if tv is list:
            if depth >= MAX_DEPTH:
                raise CodecError(f"cannot receive tables nested deeper than {MAX_DEPTH} levels")
            for i, x in enumerate(v):
                if type(x) not in _SCALARS:
                    v[i] = self._to_lua(x, depth + 1)
            return self.table_from(v)
        if tv is _Pairs:
            if depth >= MAX_DEPTH:
                raise CodecError(f"cannot receive tables nested deeper than {MAX_DEPTH} levels")
            plain: dict[Any, Any] = {}
            bools: list[tuple[bool, Any]] = []
            for k, x in v:
                if type(k) not in _KEYS or k != k:
                    raise CodecError(f"cannot receive a table key of type {type(k).__name__}")
                if type(x) not in _SCALARS:
                    x = self._to_lua(x, depth + 1)
                if type(k) is bool:
                    bools.append((k, x))
                else:
                    plain[k] = x
            table = self.table_from(plain)
            for k, x in bools:
                table[k] = x
            return table
        if self.lua_type(v) == "function":  # loaded by _ext
            return v
        raise CodecError(f"cannot receive a {tv.__name__} value")


# Whether a table holds itself, looked for down to SEARCH_DEPTH levels: a cycle further down is
# reported as nesting, which it also is (a walk to any depth ran out of Lua stack on a table
# nested 100,000 deep, an error of this code rather than the script's).
_FIND_CYCLE = """
local type, next, select = type, next, select
local SEARCH_DEPTH = 1000
local function walk(t, path, done, depth)
    if path[t] then return true end
    if done[t] or depth > SEARCH_DEPTH then return false end
    path[t] = true
    for k, v in next, t do
        if (type(k) == "table" and walk(k, path, done, depth + 1))
            or (type(v) == "table" and walk(v, path, done, depth + 1)) then
            return true
        end
    end
    path[t], done[t] = nil, true
    return false
end
return function(...)
    local path, done = {}, {}
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        if type(v) == "table" and walk(v, path, done, 1) then return true end
    end
    return false
end
"""
