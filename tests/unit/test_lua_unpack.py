"""unpack.lua, the Lua 5.4 fast path of ``unpack_lua``: the same values, or false for the general
path (which decodes what it can or names the problem)."""

from __future__ import annotations

import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings

from stagetx.codec import NULL, CodecError, pack_lua, pack_py, unpack_lua, unpack_py
from stagetx.lua.runtime import LuaVM, _read_lua_file
from tests.unit.test_codec import _ARGS, strict


class Unpacker:
    """The decoder of one runtime, reached as the prelude reaches it."""

    def __init__(self) -> None:
        host: dict[str, Any] = {name: (lambda *a: None) for name in ("send", "send_packed", "report", "log")}
        host["now"] = time.monotonic
        self.vm = LuaVM("lua", host, 1000, None, {"stage": "t"})
        self.unpack = self.vm.lua.execute("return load(...)()", _read_lua_file("unpack.lua").encode(), b"@unpack.lua")

    def fast(self, payload: bytes) -> tuple[Any, ...] | None:
        """The values unpack.lua decodes, seen through the general packer; None: "not here"."""
        result = self.unpack(payload)
        result = result if isinstance(result, tuple) else (result,)
        if result[0] is not True:
            assert result == (False,)
            return None
        return strict(unpack_py(pack_lua(self.vm, result[1:])))

    def general(self, payload: bytes) -> Any:
        return strict(unpack_py(pack_lua(self.vm, unpack_lua(self.vm, payload))))


@pytest.fixture(scope="module")
def unpacker() -> Unpacker:
    return Unpacker()


@given(_ARGS)
@settings(max_examples=300, deadline=None)
def test_payloads_decode_as_the_general_path_decodes_them(values: tuple[Any, ...]) -> None:
    u = _shared()
    payload = pack_py(values)
    fast = u.fast(payload)
    if fast is not None:
        assert fast == u.general(payload)


def test_plain_payloads_are_decoded_here_with_their_count_and_types(unpacker: Unpacker) -> None:
    cases = [
        (),
        (None,),
        (1, None, 3),
        (True, False, 0, -1, -32, -33, 127, 128, 255, 256, 65535, 65536, 2**32, -(2**63), 2**63 - 1),
        (0.5, 1.0, float("inf"), b"", b"x" * 300, b"y" * 70000, "h\u00e9"),
        ([1, [2, [3, None, 4]]], {"k": {"n": [1.5]}, "e": {}}, []),
        tuple(range(40)),
    ]
    for values in cases:
        payload = pack_py(values)
        assert unpacker.fast(payload) == unpacker.general(payload), values
    assert unpacker.fast(b"\x94" + b"\xca" + struct.pack(">f", 0.25) + b"\xc0\xc0\xc0") == unpacker.general(
        b"\x94\xca" + struct.pack(">f", 0.25) + b"\xc0\xc0\xc0"
    )
    assert unpacker.fast(b"\xdc\x00\x02\x01\x02") == unpacker.general(b"\xdc\x00\x02\x01\x02")


def test_what_needs_the_general_path_is_left_to_it(unpacker: Unpacker) -> None:
    left = [
        pack_py((NULL,)),  # extension type
        pack_py(({1: "a", "b": 2},)),  # a key that is not a string
        pack_py(({True: 1},)),
        msgpack.packb([2**64 - 1]),  # above Lua's integer range
        pack_py((_nested(20),)),  # deeper than the fast path goes
    ]
    for payload in left:
        assert unpacker.fast(payload) is None
    with pytest.raises(CodecError):
        unpack_lua(unpacker.vm, msgpack.packb([2**64 - 1]))


def test_malformed_payloads_are_left_to_the_general_path_which_refuses_them(unpacker: Unpacker) -> None:
    good = pack_py((1, b"abc", [1, 2], {"k": 1}))
    for bad in [b"", b"\x01", b"\x91", good[:-1], good + b"\x00", b"\x92\xc4\x05ab\x01", b"\x91\xcd\x01"]:
        assert unpacker.fast(bad) is None, bad
        with pytest.raises(CodecError):
            unpack_lua(unpacker.vm, bad)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(depth):
        value = [value]
    return value


_UNPACKER: list[Unpacker] = []


def _shared() -> Unpacker:
    if not _UNPACKER:
        _UNPACKER.append(Unpacker())
    return _UNPACKER[0]
