"""pack.lua, the Lua 5.4 fast path of ``pack_lua``: the same payloads, or nil for the general path."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings

from stagetx.codec import MAX_DEPTH, NULL, pack_lua, pack_py, unpack_lua, unpack_py
from stagetx.lua.runtime import LuaVM, _read_lua_file
from tests.unit.test_codec import _ARGS, strict


def _vm() -> LuaVM:
    host: dict[str, Any] = {name: (lambda *a: None) for name in ("send", "send_packed", "report", "log")}
    host["now"] = time.monotonic
    return LuaVM("lua", host, 1000, None, {"stage": "t"})


class Packer:
    """The packer of one runtime, reached as the prelude reaches it."""

    def __init__(self) -> None:
        self.vm = _vm()
        factory = self.vm.lua.execute("return load(...)", _read_lua_file("pack.lua").encode(), b"@pack.lua", b"t")
        self.pack = factory(self.vm.null)

    def both(self, code: str) -> tuple[Any, Any]:
        """(fast payload decoded or None, ``pack_lua``'s payload decoded) of the values ``code`` returns."""
        values = self.vm.lua.execute(f"return {code}")
        values = values if isinstance(values, tuple) else (values,)
        fast = self.vm.lua.execute("local p = ... return p(select(2, ...))", self.pack, *values)
        return (None if fast is None else unpack_py(fast)), unpack_py(pack_lua(self.vm, values))


@pytest.fixture(scope="module")
def packer() -> Packer:
    return Packer()


@pytest.mark.parametrize(
    "code",
    [
        "nil, true, false, 0, 1, -1",
        "127, 128, 255, 256, 65535, 65536, 4294967295, 4294967296, math.maxinteger, math.mininteger",
        "-32, -33, -128, -129, -32768, -32769, -2147483648, -2147483649",
        "0.0, -0.0, 1.5, 1e300, 1/0, -1/0, 3.0",
        "'', 'x', string.rep('a', 255), string.rep('b', 256), string.rep('c', 65535), string.rep('d', 65536)",
        "{}, stage.null, {stage.null}, {a = stage.null}, {1, 2, 3}, {1, nil, 3}, {[2] = 'b', [1] = 'a'}",
        "{a = 1, [2] = true, [1.5] = 'x', [true] = 1, [1] = 2, [false] = 0, [0] = 'zero'}",
        "{[-1] = 1}, {[0] = 1}, {[1] = 1, [3] = 3}, {1, 2, x = 3}",
        "(function() local t = {} for i = 1, 15 do t[i] = i end return t end)()",
        "(function() local t = {} for i = 1, 16 do t[i] = i end return t end)()",
        "(function() local t = {} for i = 1, 65536 do t[i] = i end return t end)()",
        "(function() local t = {} for i = 1, 16 do t['k' .. i] = i end return t end)()",
        "(function() local t = {} for i = 1, 65536 do t['k' .. i] = i end return t end)()",
        "{['set:top'] = {['m:12345'] = {i = 123456789, v = {name = 'x', 1.5}}}}",
    ],
)
def test_plain_values_pack_as_pack_lua_packs_them(packer: Packer, code: str) -> None:
    fast, general = packer.both(code)
    assert fast is not None, "the fast path refused plain values"
    assert strict(fast) == strict(general)


@pytest.mark.parametrize(
    "code",
    [
        "function() end",  # functions: bytecode, by the general path
        "{f = print}",  # and its error for C functions
        "coroutine.create(function() end)",
        "{[{}] = 1}",  # a table key: the general path names the problem
        "(function() local t = {} t.self = t return t end)()",  # cyclic
        "(function() local t = {} for _ = 1, 17 do t = {t} end return t end)()",  # deeper than 16
        "(function() local t = {} for i = 1, 70000 do t[i] = {i} end return t end)()",  # > 65536 entries
    ],
)
def test_values_beyond_the_fast_path_go_to_the_general_one(packer: Packer, code: str) -> None:
    values = packer.vm.lua.execute(f"return {code}")
    assert packer.vm.lua.execute("local p = ... return p(select(2, ...))", packer.pack, values) is None


def test_the_packer_is_reusable_after_a_refusal(packer: Packer) -> None:
    assert packer.vm.lua.execute("local p = ... return p(print)", packer.pack) is None
    fast, general = packer.both("{1, {a = 2}}, 'x'")
    assert fast == general == ([1, {b"a": 2}], b"x")


def test_a_small_message_after_a_big_one_carries_none_of_its_parts(packer: Packer) -> None:
    big, _ = packer.both("(function() local t = {} for i = 1, 300 do t['k' .. i] = i end return t end)()")
    assert big is not None and len(big[0]) == 300
    fast, general = packer.both("{a = 1}, 2")
    assert fast == general == ({b"a": 1}, 2)


def test_depth_up_to_the_fast_limit_stays_fast(packer: Packer) -> None:
    fast, general = packer.both("(function() local t = {} for _ = 1, 16 do t = {t} end return t end)()")
    assert fast is not None and fast == general
    assert MAX_DEPTH > 16  # deeper tables are the general path's to refuse or pack


@given(_ARGS)
@settings(max_examples=200)
def test_random_values_pack_as_pack_lua_packs_them(values: tuple[Any, ...]) -> None:
    packer = _SHARED
    in_lua = unpack_lua(packer.vm, pack_py(values))
    fast = packer.vm.lua.execute("local p = ... return p(select(2, ...))", packer.pack, *in_lua)
    assert fast is not None
    assert strict(unpack_py(fast)) == strict(unpack_py(pack_lua(packer.vm, in_lua)))


_SHARED = Packer()  # hypothesis tests take no fixtures (pytest-twisted wraps the call)


def test_null_packs_as_the_null_extension(packer: Packer) -> None:
    fast, _ = packer.both("stage.null")
    assert fast == (NULL,)
