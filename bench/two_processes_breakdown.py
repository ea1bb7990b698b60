"""Where the CPU time of a message between two processes goes, piece by piece, in one process.

``python -m bench.two_processes_breakdown``: a real Lua stage and router (``task.Clock``, links
that only count), each piece timed alone by process CPU time per message, best of 5. The pieces
a real server adds on top (epoll, the socket calls, Twisted's transport) are the difference
between the receive total here and the ``two_processes`` bench's receiver CPU row.
"""

from __future__ import annotations

import gc
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from twisted.internet.task import Clock

from stagetx.child.host import ProcessHost
from stagetx.codec import pack_py
from stagetx.config import load_config
from stagetx.lua.runtime import _read_lua_file
from stagetx.message import Message

SCRIPT = """
stage.waitfor("ping", function(i) end)
stage.waitfor("echo", function(i) return i end)
stage.waitfor("send", function(n) for i = 1, n do stage.signal("b:ping", i) end end)
"""
N = 64_000
RUN = 16  # messages per frame and per crossing into Lua (the router's DRAIN_CHUNK)


class CountingLinks:
    """Links to the other process, always connected, that only count."""

    def __init__(self) -> None:
        self.messages = 0

    def reachable(self, group: int) -> bool:
        return True

    def send(self, group: int, frame: list[Any]) -> tuple[bool, None]:
        self.messages += 1
        return True, None

    def send_entries(self, group: int, entries: bytes, count: int) -> tuple[bool, None]:
        self.messages += count
        return True, None

    def flush(self) -> None:
        pass

    def steady_room(self, group: int) -> int:
        return 1 << 20


def host(base: Path) -> ProcessHost:
    """Stage ``a`` in this process (group 0), ``b`` in the other one; config and scripts in ``base``."""
    (base / "lua").mkdir()
    (base / "lua" / "a.lua").write_text(SCRIPT)
    (base / "lua" / "b.lua").write_text("")
    config = {"#startup": [["=lua+a"], ["=lua+b"]], "=lua": {"%package": ["[0]lua"], "=lua+a": "a", "=lua+b": "b"}}
    (base / "app.json").write_text(json.dumps(config))
    process = ProcessHost(load_config(str(base / "app.json")), 0, Clock())
    process.router.links = CountingLinks()  # type: ignore[assignment]
    process.startService()
    return process


def per_message(f: Callable[[], None]) -> float:
    """µs of process CPU time per message of ``f`` (which handles ``N``), best of 5."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        f()
        best = min(best, (time.process_time() - started) / N * 1e6)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="stagetx-breakdown-") as base:
        measure(host(Path(base)))


def measure(process: ProcessHost) -> None:
    router, stage = process.router, process.stages[0]
    vm = stage.stage.vm  # type: ignore[attr-defined]
    payloads = [pack_py((i,)) for i in range(RUN)]
    frame = [["m", 0, "ping", p, 1, None] for p in payloads]
    body = b"\xdc\x00\x10" + b"".join(msgpack.packb(m, use_bin_type=True) for m in frame)
    mac = hashlib.blake2b(key=b"k" * 32, digest_size=16)

    def frame_decode() -> None:
        for _ in range(N // RUN):
            tag = mac.copy()
            tag.update(b"12345678")
            tag.update(body)
            tag.digest()
            msgpack.unpackb(body, raw=False, strict_map_key=False, unicode_errors="surrogateescape")

    def frames_queued() -> None:
        for _ in range(N // RUN):
            for entry in frame:
                router.frame_received(1, entry)
            router._queue.clear()

    def messages_made() -> None:
        for _ in range(N // RUN):
            for payload in payloads:
                Message("ping", payload, stage.sender, None, 0.0)

    def received() -> None:
        for _ in range(N // RUN):
            for entry in frame:
                router.frame_received(1, entry)
            router.run_queue()

    def received_lua_stubbed() -> None:
        real = vm.deliver_batch
        vm.deliver_batch = lambda turn, args: (0.0,) * (len(args) // 5)
        try:
            received()
        finally:
            vm.deliver_batch = real

    args: list[Any] = []
    for payload in payloads:
        args += (*stage.stage._fields(vm, Message("ping", payload, stage.sender, None, 0.0)), -1, payload)  # type: ignore[attr-defined]

    def lua_delivered() -> None:
        for _ in range(N // RUN):
            vm.deliver_batch(router.turn, args)

    loop = vm.lua.eval("function(f, v, n) for _ = 1, n do f(v) end end")
    unpacker = vm.lua.execute("return load(...)()", _read_lua_file("unpack.lua").encode(), b"@unpack.lua")
    packer = vm.lua.execute("return load(...)", _read_lua_file("pack.lua").encode(), b"@pack.lua", b"t")(vm.null)

    def sent() -> None:
        for _ in range(N // 2000):
            stage.send("a:send", 2000)
            router.run_queue()

    def run_entry(msgid: str, reply: str | None, count: int) -> list[Any]:
        fields = b"".join(
            msgpack.packb(msgid) + msgpack.packb(p, use_bin_type=True) + msgpack.packb(reply) for p in payloads[:count]
        )
        return ["r", 0, 1, count, fields]

    pings, echoes, echo = (
        run_entry("ping", None, RUN),
        run_entry("echo", "^srv/1/pong", RUN),
        run_entry("echo", "^srv/1/pong", 1),
    )
    long_pings = ["r", 0, 1, 16 * RUN, pings[4] * 16]

    def runs_received(entry: list[Any]) -> Callable[[], None]:
        def received() -> None:
            for _ in range(N // entry[3]):
                router.frame_received(1, entry)
                router.run_queue()

        return received

    gc.disable()
    rows = [
        ("receive: a run of 16, frame_received to handler", per_message(runs_received(pings))),
        ("receive: a run of 256, frame_received to handler", per_message(runs_received(long_pings))),
        ("receive: a run of 16 requests, frame_received to the replies sent", per_message(runs_received(echoes))),
        ("receive: a run of 1 request, frame_received to the reply sent", per_message(runs_received(echo))),
        ("receive: frame tag and msgpack decode (a frame of 16)", per_message(frame_decode)),
        ("receive: Router.frame_received (Message, run queue)", per_message(frames_queued)),
        ("  of which the Message", per_message(messages_made)),
        ("receive: Python from frame_received to the Lua call (Lua stubbed)", per_message(received_lua_stubbed)),
        ("receive: Lua, deliver_batch of 16 (entry, budget, decode, handler, clock)", per_message(lua_delivered)),
        ("  of which unpack.lua decoding one integer", per_message(lambda: loop(unpacker, payloads[5], N))),
        ("receive: total, frame_received to handler", per_message(received)),
        ("send: pack.lua of one integer", per_message(lambda: loop(packer, 5, N))),
        ("send: total, stage.signal in a Lua loop to the links", per_message(sent)),
    ]
    for name, us in rows:
        print(f"{us:6.2f} µs/msg  {name}")


if __name__ == "__main__":
    main()
