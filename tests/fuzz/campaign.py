"""A bounded mutation campaign over every decoder that reads untrusted bytes or text.

Each target has seeds (valid inputs) and the exceptions its documentation allows; the campaign
mutates seeds at random (bit flips, inserted/deleted/repeated bytes, splices, length fields set
to extremes) and feeds them, for a fixed number of rounds or until a deadline. Anything else
raised is a finding. Deterministic for a given seed, so a finding can be replayed.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import attrs
import bson
import lupa.lua54
import lupa.luajit21
import msgpack
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogPublisher

from stagetx.address import AddressError, parse_target
from stagetx.broker import addresses
from stagetx.broker.framing import (
    BrokerAddressError,
    BsonFraming,
    FrameError,
    FrameTooLarge,
    PacketFraming,
    TextFraming,
    parse_url,
)
from stagetx.codec import NULL, CodecError, pack_py, unpack_lua, unpack_py
from stagetx.wire import HANDSHAKE_MAX_FRAME, LinkServerFactory

_EXTREMES = (0, 1, 4, 5, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


@attrs.frozen
class Target:
    """One decoder: ``run(data)`` feeds it; ``allowed`` are the errors its docs promise."""

    name: str
    seeds: list[bytes]
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]


@attrs.define
class Report:
    runs: dict[str, int] = attrs.field(factory=dict)
    findings: list[tuple[str, bytes, str]] = attrs.field(factory=list)


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    """One to four random edits of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(out))
        if op == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and out:  # delete a run
            del out[pos : pos + rng.randint(1, 8)]
        elif op == 3:  # a length-sized field set to an extreme
            value = rng.choice(_EXTREMES)
            out[pos : pos + 4] = struct.pack("<I", value)
        elif op == 4 and out:  # repeat a run
            run = out[pos : pos + rng.randint(1, 16)]
            out[pos:pos] = run * rng.randint(1, 50)
        elif op == 5:  # splice another seed
            other = rng.choice(seeds)
            cut = rng.randint(0, len(other))
            out[pos:] = other[cut:]
        elif op == 6:  # truncate
            del out[pos:]
    return bytes(out)


class _Bridge:
    """The codec's view of a Lua runtime, with a memory cap (what a stage has)."""

    def __init__(self, module: Any, vm_kind: str) -> None:
        self.vm_kind = vm_kind
        self.lua = module.LuaRuntime(encoding=None, max_memory=32 << 20)
        self.null = self.lua.table()

    def dump_function(self, f: Any) -> bytes:
        raise ValueError("not sent by the campaign")

    def load_function(self, code: bytes) -> Any:
        raise ValueError("bytecode comes only from authenticated peers; never loaded here")

    def admitted(self) -> AbstractContextManager[None]:
        return nullcontext()


def _silent_link_feed(data: bytes) -> None:
    """A fresh accepting link fed ``data`` before authentication; its buffer must stay bounded."""
    link = LinkServerFactory(b"k", "g0", _NoHandler(), clock=Clock()).buildProtocol(None)  # type: ignore[arg-type]
    link.makeConnection(StringTransport())
    link.dataReceived(data)
    if len(link._buffer) >= 4 + HANDSHAKE_MAX_FRAME:
        raise AssertionError(f"link buffered {len(link._buffer)} bytes before authentication")
    if link.authenticated:
        raise AssertionError("a mutated stream authenticated")


class _NoHandler:
    def link_authenticated(self, link: Any) -> None: ...
    def message_received(self, link: Any, obj: Any) -> None: ...
    def link_lost(self, link: Any, reason: Any) -> None: ...


def _stream(framing: Any) -> Callable[[bytes], object]:
    """Split ``data`` in two reads and decode every frame, as a connection would."""

    def run(data: bytes) -> None:
        half = len(data) // 2
        frames, rest = framing.split(data[:half])
        more, rest = framing.split(rest + data[half:])
        if len(rest) > framing.limit_in + 4:
            raise AssertionError(f"{framing.name}: {len(rest)} bytes pending")
        for payload in frames + more:
            framing.decode(payload)

    return run


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def targets() -> list[Target]:
    sample = (b"player-1", 42, 1.5, True, None, [1, [2, [3]]], {b"a": 1, 2: b"x", True: False}, NULL)
    payloads = [pack_py(sample), pack_py((b"",)), msgpack.packb([[[]]]), msgpack.packb([{"k": [1.0, -1]}])]
    lua54, luajit = _Bridge(lupa.lua54, "lua54"), _Bridge(lupa.luajit21, "luajit21")
    link_seed = struct.pack("<I", 38 + 2) + b"STGX" + struct.pack("<H", 1) + bytes(32) + b"g1"
    docs = [bson.encode({"name": "p1", "list": [1, 2.5, "x"], "sub": {"b": b"\x00\xff", "n": None}}), bson.encode({})]
    packets = [struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0), b"\x02\x00\x00\x00hi"]
    lines = [b"hello\r\nworld\n", b"\r\n\r\n", b"partial"]
    targets = ["b:echo=reply", "*stage+id", "^server/3/msg", ">L.turn", ">>L", "<L.*", ":sync", "+b:x", "id=r"]
    urls = ["tcp://127.0.0.1:80?packet=1k,2k", "udp://[::1]:9?text", "tcp://*:7?bson=1m:64k", "1.2.3.4:5"]
    packed = [addresses.pack("127.0.0.1", 80), addresses.pack("::1", 9), bytes(4), bytes(16)]

    def address_text(data: bytes) -> None:
        parse_target(_text(data))
        parse_target([_text(data), _text(data[::-1]), len(data) - 5])

    def broker_address(data: bytes) -> None:
        try:
            parse_url(_text(data))
        finally:
            addresses.split(_text(data))

    return [
        Target("link", [link_seed, link_seed + struct.pack("<I", 32) + bytes(32)], _silent_link_feed, ()),
        Target("packet", packets, _stream(PacketFraming(64, 64)), (FrameTooLarge, FrameError)),
        Target("text", lines, _stream(TextFraming(16, 16)), (FrameTooLarge, FrameError)),
        Target("bson", docs, _stream(BsonFraming(256, 256)), (FrameTooLarge, FrameError)),
        Target("unpack_py", payloads, unpack_py, (CodecError,)),
        Target("unpack_lua54", payloads, lambda d: unpack_lua(lua54, d), (CodecError,)),
        Target("unpack_luajit", payloads, lambda d: unpack_lua(luajit, d), (CodecError,)),
        Target("address", [t.encode() for t in targets], address_text, (AddressError,)),
        Target("broker_url", [u.encode() for u in urls], broker_address, (BrokerAddressError,)),
        Target("packed", packed, addresses.unpack, (BrokerAddressError,)),
    ]


def run_campaign(seed: int, rounds: int, seconds: float) -> Report:
    """``rounds`` inputs per target, each target stopping early after ``seconds``."""
    rng = random.Random(seed)
    report = Report()
    quiet = Logger(observer=LogPublisher())  # the link logs each refusal; nobody needs them here
    import stagetx.wire as wire

    loud, wire.log = wire.log, quiet
    try:
        for target in targets():
            deadline = time.monotonic() + seconds
            count = 0
            for count in range(1, rounds + 1):
                data = mutate(rng, rng.choice(target.seeds), target.seeds)
                try:
                    target.run(data)
                except target.allowed:
                    pass
                except Exception as e:  # a finding: anything the docs do not promise
                    report.findings.append((target.name, data, f"{type(e).__name__}: {e}"))
                if count % 64 == 0 and time.monotonic() > deadline:
                    break
            report.runs[target.name] = count
    finally:
        wire.log = loud
    return report
