"""values on the move, between Python natives, payloads and real Lua runtimes."""

from __future__ import annotations

import math
import timeit
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lupa.lua54
import lupa.luajit21
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagetx import codec
from stagetx.codec import (
    MAX_DEPTH,
    NULL,
    CodecError,
    LuaFunctionBlob,
    pack_lua,
    pack_py,
    unpack_lua,
    unpack_py,
)

_LOADER = """
local load, getupvalue, setupvalue, G = load, debug.getupvalue, debug.setupvalue, _G
return function(code)
    local f = assert(load(code, "=remote", "b", G))
    local i = 1
    while true do  -- fresh upvalues: nil, except _ENV (Lua 5.4) which gets our globals
        local name = getupvalue(f, i)
        if name == nil then return f end
        setupvalue(f, i, name == "_ENV" and G or nil)
        i = i + 1
    end
end
"""


class Bridge:
    """The minimal Lua bridge the codec needs (the Lua host provides the real one)."""

    def __init__(self, vm_kind: str = "lua54") -> None:
        module = {"lua54": lupa.lua54, "luajit21": lupa.luajit21}[vm_kind]
        self.vm_kind = vm_kind
        self.lua = module.LuaRuntime(encoding=None)
        self.null = self.lua.execute(
            "stage = {null = setmetatable({}, {__newindex = function() error('read-only') end})} return stage.null"
        )
        self._dump = self.lua.eval("string.dump")
        self._load = self.lua.execute(_LOADER)

    def dump_function(self, f: Any) -> bytes:
        return self._dump(f)  # type: ignore[no-any-return]

    def load_function(self, code: bytes) -> Any:
        return self._load(code)

    def admitted(self) -> AbstractContextManager[None]:
        return nullcontext()

    def run(self, code: str, *args: Any) -> Any:
        return self.lua.execute(code, *args)


@pytest.fixture(params=["lua54", "luajit21"])
def bridge(request: pytest.FixtureRequest) -> Bridge:
    return Bridge(request.param)


@pytest.fixture
def lua54() -> Bridge:
    return Bridge("lua54")


def strict(v: Any, doubles: bool = False) -> Any:
    """``v`` with every scalar tagged by its type, so True != 1 and 1.0 != 1 in comparisons.

    ``doubles``: compare numbers as LuaJIT holds them (every number a double).
    """
    if isinstance(v, (list, tuple)):
        return ("list", [strict(x, doubles) for x in v])
    if isinstance(v, dict):
        items = ((strict(k, doubles), strict(x, doubles)) for k, x in v.items())
        return ("dict", sorted(items, key=repr))
    if doubles and type(v) in (int, float):
        return ("number", float(v))
    return (type(v).__name__, v)


def as_lua_sees_it(v: Any) -> Any:
    """What a value looks like after a trip through a Lua table (nil entries gone, 1..n → list)."""
    if isinstance(v, (list, tuple)):
        v = {i: x for i, x in enumerate(v, 1)}
    if isinstance(v, dict):
        d = {k: as_lua_sees_it(x) for k, x in v.items() if x is not None and x is not NULL}
        if all(type(k) is int for k in d) and set(d) == set(range(1, len(d) + 1)):
            return [d[i] for i in range(1, len(d) + 1)]
        return d
    return v


_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_SCALAR = st.none() | st.booleans() | _INT64 | st.floats(allow_nan=False) | st.binary(max_size=20)
_KEY = (
    st.binary(max_size=8)
    | st.booleans()
    | _INT64
    | st.floats(allow_nan=False, allow_infinity=True).filter(lambda f: not f.is_integer())
)
_VALUES = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_KEY, inner, max_size=5),
    max_leaves=30,
)
_ARGS = st.lists(_VALUES, max_size=4).map(tuple)


# -- Python side ---------------------------------------------------------------------------------


@given(_ARGS)
def test_python_values_round_trip(values: tuple[Any, ...]) -> None:
    assert strict(unpack_py(pack_py(values))) == strict(values)


def test_python_text_arrives_as_bytes_and_surrogates_restore_lua_bytes() -> None:
    assert unpack_py(pack_py(("héllo", "caf\udce9", {"k": "v"}))) == (
        "héllo".encode(),
        b"caf\xe9",
        {b"k": b"v"},
    )


def test_integral_float_stays_float_and_int_stays_int() -> None:
    out = unpack_py(pack_py((1.0, 1, 2**63 - 1, -(2**63))))
    assert [type(x) for x in out] == [float, int, int, int]
    assert out == (1.0, 1, 2**63 - 1, -(2**63))


def test_null_and_function_blobs_round_trip_in_python() -> None:
    blob = LuaFunctionBlob("lua54", b"\x1bLua\x00bytes")
    assert unpack_py(pack_py((NULL, [NULL], blob))) == (NULL, [NULL], blob)
    assert repr(NULL) == "NULL" and not NULL


@pytest.mark.parametrize("value", [{1, 2}, object(), 2**64, 1j])
def test_python_values_that_cannot_move(value: object) -> None:
    with pytest.raises(CodecError):
        pack_py((value,))


def test_packer_recovers_after_an_error() -> None:
    with pytest.raises(CodecError):
        pack_py(([1, 2, object()],))
    assert unpack_py(pack_py((1, 2))) == (1, 2)


@given(st.binary(max_size=200))
@settings(max_examples=1000)
def test_unpack_py_of_garbage_raises_only_codec_error(data: bytes) -> None:
    try:
        unpack_py(data)
    except CodecError:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",  # not an array
        msgpack.packb([msgpack.ExtType(9, b"")]),  # unknown extension
        msgpack.packb([msgpack.ExtType(1, b"")]),  # empty function value
        msgpack.packb([msgpack.ExtType(1, b"\x09lua")]),  # truncated VM kind
        msgpack.packb([1]) + b"\x00",  # trailing bytes
        b"\x91" * 5000 + b"\x00",  # absurd nesting
    ],
)
def test_unpack_py_refuses_malformed_payloads(data: bytes) -> None:
    with pytest.raises(CodecError):
        unpack_py(data)


# -- Lua side ------------------------------------------------------------------------------------


# hypothesis tests take no pytest fixtures (pytest-twisted wraps the call); runtimes are shared
_SHARED = {"lua54": Bridge("lua54"), "luajit21": Bridge("luajit21")}


@given(_ARGS)
@settings(max_examples=150)
def test_values_round_trip_through_lua(values: tuple[Any, ...]) -> None:
    expected = tuple(as_lua_sees_it(v) if isinstance(v, (list, dict)) else v for v in values)
    for vm, bridge in _SHARED.items():
        in_lua = unpack_lua(bridge, pack_py(values))
        copied = bridge.run("return select('#', ...), {...}", *in_lua)  # rebuilt by Lua code
        back = unpack_py(pack_lua(bridge, tuple(copied[1][i] for i in range(1, copied[0] + 1))))
        doubles = vm == "luajit21"
        assert strict(back, doubles) == strict(expected, doubles)


def test_lua_tables_become_lists_and_dicts(bridge: Bridge) -> None:
    values = bridge.run("return {1, 2, 3}, {}, {a = 1, [2] = true, [1.5] = 'x'}, {1, nil, 3}, {[2] = 'b', [1] = 'a'}")
    assert unpack_py(pack_lua(bridge, values)) == (
        [1, 2, 3],
        [],
        {b"a": 1, 2: True, 1.5: b"x"},
        {1: 1, 3: 3},
        [b"a", b"b"],
    )


def test_all_256_byte_values_survive(bridge: Bridge) -> None:
    data = bytes(range(256))
    (s, t) = unpack_lua(bridge, pack_py((data, {data: data})))
    ok = bridge.run(
        "local s, t = ... if #s ~= 256 then return false end "
        "for i = 1, 256 do if s:byte(i) ~= i - 1 then return false end end return t[s] == s",
        s,
        t,
    )
    assert ok is True
    assert unpack_py(pack_lua(bridge, (s, t))) == (data, {data: data})


def test_integers_and_floats_stay_apart_in_lua(lua54: Bridge) -> None:
    args = unpack_lua(lua54, pack_py((1, 1.0, 2**63 - 1, -(2**63), [2.0, 3])))
    kinds = lua54.run(
        "local a, b, c, d, t = ... return table.concat({math.type(a), math.type(b), "
        "math.type(c), math.type(d), math.type(t[1]), math.type(t[2])}, ',')",
        *args,
    )
    assert kinds == b"integer,float,integer,integer,float,integer"
    packed = pack_lua(lua54, lua54.run("return 3, 3.0, math.maxinteger, math.mininteger"))
    assert strict(unpack_py(packed)) == strict((3, 3.0, 2**63 - 1, -(2**63)))


def test_bool_and_integer_keys_are_kept_apart_between_runtimes(bridge: Bridge) -> None:
    t = bridge.run("return {[true] = 'yes', [1] = 'one', [false] = 'no', [0] = 'zero'}")
    (copy,) = unpack_lua(bridge, pack_lua(bridge, (t,)))
    assert bridge.run(
        "local t = ... return t[true] == 'yes' and t[1] == 'one' and t[false] == 'no' and t[0] == 'zero'",
        copy,
    )


def test_receiver_never_shares_a_table_with_the_sender(bridge: Bridge) -> None:
    t = bridge.run("return {inner = {1}}")
    (copy,) = unpack_lua(bridge, pack_lua(bridge, (t,)))
    assert bridge.run(
        "local a, b = ... b.inner[1] = 99 return a ~= b and a.inner ~= b.inner and a.inner[1] == 1", t, copy
    )


def test_null_is_nil_in_lua_tables_and_arguments(bridge: Bridge) -> None:
    packed = pack_lua(bridge, bridge.run("return stage.null, {a = stage.null, b = 1}, {stage.null, 2}"))
    assert unpack_py(packed) == (NULL, {b"a": NULL, b"b": 1}, [NULL, 2])
    a, t, seq = unpack_lua(bridge, packed)
    assert a is None
    assert bridge.run(
        "local t, s = ... return next(t) == 'b' and next(t, 'b') == nil and s[1] == nil and s[2] == 2", t, seq
    )
    assert unpack_lua(bridge, pack_py((NULL, {"k": NULL})))[0] is None


def test_an_empty_table_is_not_null(bridge: Bridge) -> None:
    assert unpack_py(pack_lua(bridge, bridge.run("return {}, stage.null"))) == ([], NULL)


def test_nesting_limit(bridge: Bridge) -> None:
    nest = "local n = ... local t = {} for i = 2, n do t = {t} end return t"
    assert pack_lua(bridge, (bridge.run(nest, MAX_DEPTH),))
    with pytest.raises(CodecError, match="deeper than 64"):
        pack_lua(bridge, (bridge.run(nest, MAX_DEPTH + 1),))
    with pytest.raises(CodecError, match="deeper than 64"):  # not the cycle search's stack overflow
        pack_lua(bridge, (bridge.run(nest, 200000),))
    deep: Any = []
    for _ in range(MAX_DEPTH):
        deep = [deep]
    with pytest.raises(CodecError, match="deeper than 64"):
        unpack_lua(bridge, pack_py((deep,)))
    assert unpack_lua(bridge, pack_py((deep[0],)))


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("return coroutine.create(function() end)", "coroutine"),
        ("return {co = coroutine.create(function() end)}", "coroutine"),
        ("return io.stdout", "userdata"),
        ("return print", "C function"),
        ("local t = {} t.self = t return t", "cyclic"),
        ("local t = {} t[1] = {{t}} return t", "cyclic"),
        ("return {[{}] = 1}", "table key"),
        ("return {[print] = 1}", "function key"),
    ],
)
def test_lua_values_that_cannot_move(bridge: Bridge, code: str, problem: str) -> None:
    with pytest.raises(CodecError, match=problem):
        pack_lua(bridge, (bridge.run(code),))


def test_python_objects_inside_lua_cannot_move(lua54: Bridge) -> None:
    with pytest.raises(CodecError, match="Python"):
        pack_lua(lua54, (object(),))
    with pytest.raises(CodecError, match="Python"):
        pack_lua(lua54, (lua54.lua.table_from([object()]),))


def test_shared_subtables_are_copied_not_refused(bridge: Bridge) -> None:
    t = bridge.run("local s = {1} return {s, s, s}")
    assert unpack_py(pack_lua(bridge, (t,))) == ([[1], [1], [1]],)


@pytest.mark.parametrize("vm", ["lua54", "luajit21"])
def test_functions_run_in_another_runtime_with_its_globals_and_nil_upvalues(vm: str) -> None:
    sender, receiver = Bridge(vm), Bridge(vm)
    f = sender.run(
        "WHO = 'sender' local up = 10 return function(x) return x * 2, up, WHO, up == nil and 'nil upvalue' end"
    )
    receiver.run("WHO = 'receiver'")
    (g,) = unpack_lua(receiver, pack_lua(sender, (f,)))
    assert g(21) == (42, None, b"receiver", b"nil upvalue")
    (blob,) = unpack_py(pack_lua(sender, (f,)))
    assert isinstance(blob, LuaFunctionBlob) and blob.vm == vm


def test_functions_nested_in_tables_arrive_callable(bridge: Bridge) -> None:
    t = bridge.run("return {cb = function(a) return a + 1 end, list = {function() return 'x' end}}")
    (copy,) = unpack_lua(bridge, pack_lua(bridge, (t,)))
    assert bridge.run("local t = ... return t.cb(1), t.list[1]()", copy) == (2, b"x")


def test_bytecode_of_another_vm_kind_is_refused() -> None:
    jit, lua = Bridge("luajit21"), Bridge("lua54")
    jit_payload = pack_lua(jit, (jit.run("return function() return 1 end"),))
    with pytest.raises(CodecError, match="luajit21 function into a lua54"):
        unpack_lua(lua, jit_payload)
    lua_payload = pack_lua(lua, (lua.run("return function() return 1 end"),))
    with pytest.raises(CodecError, match="lua54 function into a luajit21"):
        unpack_lua(jit, lua_payload)
    with pytest.raises(CodecError, match="luajit21 function from a lua54"):
        pack_lua(lua, (LuaFunctionBlob("luajit21", b"x"),))


def test_unloadable_bytecode_is_a_codec_error(lua54: Bridge) -> None:
    with pytest.raises(CodecError, match="cannot load function"):
        unpack_lua(lua54, pack_py((LuaFunctionBlob("lua54", b"\x1bLua not really"),)))


@pytest.mark.parametrize(
    "values",
    [
        (2**64 - 1,),  # beyond a Lua integer
        ({None: 1},),  # nil key
        ({float("nan"): 1},),  # NaN key
        ({(1, 2): 1},),  # table key
        ({b"a": [1, 2**63]},),  # beyond a Lua integer, inside a table
    ],
)
def test_payloads_lua_cannot_hold_are_codec_errors(lua54: Bridge, values: tuple[Any, ...]) -> None:
    with pytest.raises(CodecError):
        unpack_lua(lua54, msgpack.packb(list(values), use_bin_type=True))


_PLAIN = st.recursive(
    st.binary(max_size=6) | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.binary(max_size=4) | st.integers(-1000, 1000), inner, max_size=4)
    ),
    max_leaves=8,
)


@given(st.lists(_PLAIN, max_size=3))
@settings(max_examples=300)
def test_short_plain_payloads_take_the_fast_path_to_the_same_tables(values: list[Any]) -> None:
    bridge = _SHARED["lua54"]
    payload = pack_py(tuple(values))
    fast = codec._side(bridge)._unpack_small(payload)
    if len(payload) <= MAX_DEPTH and not codec._NOT_PLAIN.search(payload):
        assert fast is not None
    if fast is not None:
        expected = tuple(as_lua_sees_it(v) if isinstance(v, (list, dict)) else v for v in values)
        assert strict(unpack_py(pack_lua(bridge, fast))) == strict(expected)


def test_a_short_payload_with_true_and_1_as_keys_keeps_both(lua54: Bridge) -> None:
    payload = b"\x91\x82\xc3\xc4\x03yes\x01\xc4\x03one"  # [{true: "yes", 1: "one"}] (a dict would merge them)
    assert len(payload) <= MAX_DEPTH
    (table,) = unpack_lua(lua54, payload)
    assert lua54.run("local t = ... return t[true], t[1]", table) == (b"yes", b"one")


@given(st.binary(max_size=120))
@settings(max_examples=500)
def test_unpack_lua_of_garbage_raises_only_codec_error(data: bytes) -> None:
    try:
        unpack_lua(_SHARED["lua54"], data)
    except CodecError:
        pass


def test_lua_conversions_are_fast(lua54: Bridge) -> None:
    values = lua54.run("return 'player-1', 42, {a = 1, b = 'two', c = 3.5, d = true, e = {1, 2}}")
    payload = pack_lua(lua54, values)
    per_pack = min(timeit.repeat(lambda: pack_lua(lua54, values), number=2000, repeat=3)) / 2000
    per_unpack = min(timeit.repeat(lambda: unpack_lua(lua54, payload), number=2000, repeat=3)) / 2000
    assert per_pack < 100e-6 and per_unpack < 100e-6  # a few µs each on the reference machine
    assert math.isfinite(per_pack + per_unpack)
