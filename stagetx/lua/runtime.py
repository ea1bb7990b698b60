"""One Lua runtime: the lupa VM, its sandbox, its limits and the prelude that defines ``stage.*``.

A ``LuaVM`` is used by one thread only (the stage's reactor thread, or one worker thread for a
sandbox). It is also the *bridge* that ``stagetx.codec`` needs to move values in and out:
``lua``, ``vm_kind``, ``dump_function``, ``load_function`` and ``null``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import lupa.lua54
import lupa.luajit21

from stagetx.lua.watchdog import AVAILABLE as watchdog_available
from stagetx.lua.watchdog import Guard

VM_MODULES = {"lua": lupa.lua54, "luajit": lupa.luajit21}
VM_KINDS = {"lua": "lua54", "luajit": "luajit21"}

#: Instructions between two checks of the callback budget (a check costs one call into Python).
HOOK_COUNT = 100_000
#: Pattern-matching steps per ms of ``%budget`` a string.find/match/gmatch/gsub call may be
#: expected to take (patterns.lua); a fifth of what one core of a 2020s machine runs.
PATTERN_STEPS_PER_MS = 50_000
#: A callback still running this many budgets after it started was out of the hook's reach (C
#: code): its runtime is handed to ``LuaVM.overran`` to be rebuilt.
HARD_LIMIT = 3
#: Bytes a call from Python may need beyond its string arguments (userdata, the stack): with
#: less than this left under ``%memory``, its arguments are let in as ``LuaVM.admitted`` does.
PUSH_ROOM = 64 * 1024


# Upvalues of a moved function arrive as nil; its ``_ENV`` upvalue (Lua 5.4; not always
# the first one, which is all ``load`` sets) gets the receiver's globals.
_FUNCTION_LOADER = """
local load, getupvalue, setupvalue, G = load, debug.getupvalue, debug.setupvalue, _G
return function(code)
    local f, err = load(code, "=remote", "b", G)
    if not f then return nil, err end
    local i = 1
    while getupvalue(f, i) ~= nil do
        setupvalue(f, i, getupvalue(f, i) == "_ENV" and G or nil)
        i = i + 1
    end
    return f
end
"""

_NO_MEMORY = b"not enough memory"

# Arguments that would not fit under the memory limit are kept here first (the limit lifted),
# then the entry point is called from Lua with them: where the limit applies again.
_STASH = """
local unpack, select = table.unpack or unpack, select
local stashed, count
return function(...) stashed, count = {...}, select("#", ...) end,
    function()
        local t, n = stashed, count
        stashed = nil
        return t[1](unpack(t, 2, n))
    end
"""


def _deny_attributes(obj: object, name: object, is_setting: bool) -> None:
    """Scripts must not reach Python attributes through the callables the host gives them."""
    raise AttributeError("Python attributes are not accessible from Lua")


def _read_lua_file(name: str) -> str:
    return resources.files("stagetx.lua").joinpath(name).read_text(encoding="utf-8")


class LuaVM:
    """A sandboxed Lua runtime with the stagetx prelude loaded.

    @param kind: ``"lua"`` (Lua 5.4) or ``"luajit"``.
    @param host: the Python callables the prelude needs (see ``stagetx.lua.api``).
    @param budget_ms: how long one callback may hold the thread before it is interrupted.
    @param max_memory: the most bytes this runtime may allocate (``None``: no limit).
    @param sender: the ``_WAITFOR[1]`` value of messages the stage sends itself (Python natives).
    @param watchdog: keep the budget hook off between overruns (``stagetx.lua.watchdog``; Lua 5.4
        only, and only for a runtime whose callbacks all start on one thread).
    @param buckets: upper bounds (s) of the handler-time histogram kept for runs (``deliver_run``).
    """

    def __init__(
        self,
        kind: str,
        host: Mapping[str, Callable[..., Any]],
        budget_ms: int,
        max_memory: int | None,
        sender: Mapping[str, Any],
        slice_ms: float = 20.0,
        watchdog: bool = False,
        buckets: Sequence[float] = (),
    ) -> None:
        module = VM_MODULES[kind]
        self.kind = kind
        self.vm_kind = VM_KINDS[kind]
        self.lua_type = module.lua_type
        self.lua = module.LuaRuntime(
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny_attributes,
            max_memory=max_memory,
        )
        globals_ = self.lua.globals()
        globals_[b"python"] = None
        globals_[b"package"][b"loaded"][b"python"] = None  # lupa's module: require("python") gave it back
        self._load = globals_[b"load"]
        # %memory applies from the first callback on: the set-up below and the host's (the
        # prelude, the sandbox, compiling the scripts) hands values over from Python, unprotected
        self._limit = max_memory or 0
        self._armed = False
        if self._limit:
            self.lua.set_max_memory(0)
        self._memory_error = module.LuaMemoryError
        self._report = host["report"]
        self._lifted = False
        self._stash, self._unstash = self.lua.execute(_STASH)
        self._dump = self.lua.eval("string.dump")
        self._loader = self.lua.execute(_FUNCTION_LOADER)
        cfg = {
            b"budget": budget_ms,
            b"slice": min(slice_ms, budget_ms / 2),
            b"hook_count": HOOK_COUNT,
            b"watchdog": watchdog and self.vm_kind == "lua54" and watchdog_available,
            b"sender": self.table(sender),
            b"buckets": self.lua.table_from(list(buckets)),
            b"extensions": self.lua.table(),
            b"thread_extensions": self.lua.table(),
        }
        #: Whether the prelude decodes received payloads itself (``deliver_batch``).
        self.decodes = self.vm_kind == "lua54"
        if self.decodes:  # pack.lua and unpack.lua need string.pack, which LuaJIT lacks
            cfg[b"packer"] = self._load(_read_lua_file("pack.lua").encode(), b"@pack.lua", b"t")
            cfg[b"unpacker"] = self._load(_read_lua_file("unpack.lua").encode(), b"@unpack.lua", b"t")()
        cfg[b"extensions"][b"proxy"] = self._load(_read_lua_file("proxy.lua").encode(), b"@proxy.lua", b"t")()
        host_table = self.lua.table_from({k.encode(): v for k, v in host.items()})
        chunk = self._load(_read_lua_file("prelude.lua").encode(), b"@prelude.lua", b"t")
        self.core = chunk(host_table, self.lua.table_from(cfg))
        patterns = self._load(_read_lua_file("patterns.lua").encode(), b"@patterns.lua", b"t")
        patterns(float(budget_ms * PATTERN_STEPS_PER_MS))
        self.null = self.core[b"null"]
        self.extensions = cfg[b"extensions"]
        self.thread_extensions = cfg[b"thread_extensions"]
        self._call = self.core[b"call"]
        self._deliver = self.core[b"deliver"]
        self._drain = self.core[b"drain"]
        self._deliver_batch = self.core[b"deliver_batch"]
        self._deliver_run = self.core[b"deliver_run"]
        self._take_times = self.core[b"take_times"]
        self._chunk = self.core[b"chunk"]
        self.guard: Guard | None = None
        #: Called with the seconds a callback took when that was past ``HARD_LIMIT`` budgets.
        self.overran: Callable[[float], None] | None = None
        if cfg[b"watchdog"]:
            thread = self.lua.eval("tostring((coroutine.running()))")  # b"thread: 0x…", its lua_State
            self.guard = Guard(int(thread.split(b":")[1], 16), budget_ms / 1000.0)

    # -- the codec bridge -------------------------------------------------------------------------
    def dump_function(self, f: Any) -> bytes:
        """The bytecode of Lua function ``f`` (raises for C functions)."""
        return bytes(self._dump(f))

    def load_function(self, code: bytes) -> Any:
        """A function of this runtime from bytecode of the same VM kind; its ``_ENV`` is ``_G``."""
        f, err = _two(self._loader(code))
        if f is None:
            raise ValueError(f"cannot load function bytecode: {err!r}")
        return f

    def table(self, value: Mapping[Any, Any]) -> Any:
        """A Lua table from a flat mapping of Python natives (``str`` keys and values as strings)."""
        with self.admitted():
            return self.lua.table_from({_lua_key(k): _lua_value(v) for k, v in value.items()})

    # -- running code -----------------------------------------------------------------------------
    def call(self, where: str, f: Any, *args: Any) -> tuple[Any, ...]:
        """Run ``f(*args)`` as one callback: ``(True, results...)`` or ``(False, error)``.

        Errors are reported through the host's ``report`` under ``where`` before this returns.
        """
        try:
            result = self.enter(self._call, time.monotonic(), where.encode(), f, *args)
        except LuaOutOfMemory as error:
            self._report(where.encode(), b"", str(error).encode())
            return (False, _NO_MEMORY)
        return result if isinstance(result, tuple) else (result,)

    def deliver(
        self, turn: int | None, msgid: bytes, sender: Any, reply: bytes | None, values: tuple[Any, ...]
    ) -> None:
        """Hand one message (its decoded values) to the stage's waitfor handlers, in the router's
        drain turn ``turn`` (entries of one turn keep their steady routes, see ``deliver_run``)."""
        self.enter(self._deliver, time.monotonic(), turn, msgid, sender, reply, *values)

    def deliver_batch(self, turn: int | None, args: list[Any]) -> tuple[float, ...]:
        """Hand a run of messages to the handlers in one call, in drain turn ``turn`` (as
        ``deliver``): ``args`` holds, per message, its id,
        sender and reply, then either -1 and the payload, which the prelude decodes (when
        ``decodes``: ``unpack.lua``, else the host's ``unpack``), or the number of values and the
        values, or False for a message with nothing to run. Returns each handler's time (s), in
        order, for the messages delivered: fewer than given when the run reached the drain slice."""
        times = self.enter(self._deliver_batch, time.monotonic(), turn, *args)
        return times if isinstance(times, tuple) else (times,)

    def deliver_run(
        self, turn: int | None, sender: Any, body: bytes, pos: int, limit: int, slow: float
    ) -> tuple[Any, ...]:
        """Hand up to ``limit`` messages of a run (``stagetx.message.Run``; only when ``decodes``)
        from position ``pos`` of ``body`` to the handlers, ``sender`` their ``_WAITFOR[1]``;
        ``turn`` numbers the router's drain turn (runs of one turn keep their routes steady):
        returns the position after the last one delivered (-1 where the body is malformed), how
        many were delivered, then the id and seconds of each that took ``slow`` s or longer."""
        result = self.enter(self._deliver_run, time.monotonic(), turn, sender, body, pos, limit, slow)
        return result if isinstance(result, tuple) else (result,)

    def take_times(self) -> tuple[float, list[int]]:
        """The handler time of runs since the last call, in all (s) and per bucket (``buckets``)."""
        try:
            busy, *counts = self._take_times()
        except self._memory_error:  # a runtime at its limit: nothing to read until it frees some
            return 0.0, []
        return busy, counts

    def drain(self) -> None:
        """Run the stage's queued local messages."""
        try:
            self.enter(self._drain, time.monotonic())
        except LuaOutOfMemory as error:
            self._report(b"local messages", b"", str(error).encode())

    def enter(self, entry: Any, started: float, *args: Any) -> Any:
        """Run prelude entry point ``entry`` (``started`` is its first argument) as one callback
        under the budget watchdog, if this runtime has one."""
        guard = self.guard
        if guard is None or guard.entered is not None:  # no watchdog, or inside a callback already
            return self._run(entry, started, args)
        guard.enter(started)
        try:
            return self._run(entry, started, args)
        finally:
            elapsed = guard.leave()
            if elapsed is not None and elapsed > HARD_LIMIT * guard.budget and self.overran is not None:
                self.overran(elapsed)

    def _run(self, entry: Any, started: float, args: tuple[Any, ...]) -> Any:
        """``entry(started, *args)``; arguments that might not fit under the memory limit are let
        in first (``admitted``), so that the limit meets the Lua code, never lupa's push. Raises
        ``LuaOutOfMemory`` when the entry point itself found no memory (the scripts' callbacks
        report their own failed allocations as Lua errors)."""
        limit = self._limit
        try:
            if limit and not self._lifted:
                if not self._armed:
                    self._armed = True
                    self.lua.set_max_memory(limit)
                need = PUSH_ROOM + self.lua.get_memory_used()
                for arg in args:
                    if type(arg) is bytes:
                        need += len(arg)
                if need > limit:
                    with self.admitted():
                        self._stash(entry, started, *args)
                    return self._unstash()
            return entry(started, *args)
        except self._memory_error:
            raise LuaOutOfMemory(f"not enough memory (%memory {limit} bytes)") from None

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Lift ``%memory`` while Python hands this runtime values (a message's tables, a frame's
        bytes). lupa's pushes from Python are not protected calls: an allocation that fails in one
        is Lua's panic, which aborts the process. What comes in this way is bounded by the frame
        and message limits; the scripts' own allocations meet the limit again once it is back
        (``not enough memory`` in the script, which goes on)."""
        if not self._armed or self._lifted:
            yield
            return
        self._lifted = True
        self.lua.set_max_memory(0)
        try:
            yield
        finally:
            self.lua.set_max_memory(self._limit)
            self._lifted = False

    def close(self) -> None:
        """Stop watching this runtime's callbacks (it is being replaced or the stage stops)."""
        if self.guard is not None:
            self.guard.close()

    def compile(self, text: bytes, chunkname: bytes) -> Any:
        """Compile script text (never bytecode) with the stage's globals; raises on syntax errors."""
        f, err = _two(self._chunk(text, chunkname))
        if f is None:
            raise LuaScriptError(err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err))
        return f

    def memory_used(self) -> int:
        return int(self.lua.get_memory_used() or 0)

    @staticmethod
    def clock() -> float:
        return time.monotonic()


class LuaOutOfMemory(Exception):
    """An entry point into a runtime could not run for want of memory under its ``%memory``:
    the messages or the callback it carried are lost; the stage goes on."""


class LuaScriptError(Exception):
    """A script could not be compiled or failed while running; the message names file and line."""


def _two(result: Any) -> tuple[Any, Any]:
    """The first two of a Lua call's results (lupa returns a lone result unwrapped)."""
    if isinstance(result, tuple):
        return (result + (None, None))[:2]
    return result, None


def _lua_key(key: Any) -> Any:
    return key.encode() if isinstance(key, str) else key


def _lua_value(value: Any) -> Any:
    return value.encode() if isinstance(value, str) else value
