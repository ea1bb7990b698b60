"""The ``=lua`` / ``=luajit`` stage: scripts in one Lua runtime on the reactor thread.

Start-up runs ``%preload`` (a file, or every ``*.lua`` of a directory in name order), then the main
script; a main script that returns a function makes it the *idle function*, called again after
the number of ms it returns. Messages are decoded into the runtime and handed to the prelude,
which finds the waitfor handler. Errors are logged with file and line; the stage keeps serving.

Operations (docs/operations.md): ``reload()`` rebuilds the runtime from the current scripts while
messages wait outside it, and every callback is timed: one that holds the reactor longer than the
process's ``slow_ms`` is logged as a "slow handler" with the script and line of its function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from time import monotonic
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall

from stagetx.codec import CodecError, pack_lua, unpack_lua
from stagetx.config import StageConfig
from stagetx.host import StageHost
from stagetx.lua.api import StageAPI, Task, lua_text, text
from stagetx.lua.extensions import install_all
from stagetx.lua.loader import ScriptLoader
from stagetx.lua.runtime import HARD_LIMIT, LuaScriptError, LuaVM
from stagetx.message import Message, Sender

#: Message ids and reply addresses kept as Lua strings per stage, at most this many.
TEXT_CACHE = 4096
#: ``_WAITFOR[1]`` tables kept per stage, at most this many.
SENDER_CACHE = 1024


class Handover(Protocol):
    """What an extension keeps from one runtime of a stage for the next (a reload), e.g. sockets."""

    def finish(self) -> None:
        """The new runtime's main script and ``on_reload`` ran (or failed): take up or release the rest."""


class Stage:
    """A Lua stage (``config.type`` is ``lua`` or ``luajit``)."""

    def __init__(self, context: StageHost, config: StageConfig) -> None:
        self.context = context
        self.config = config
        self.log = context.log
        self.settings: dict[str, Any] = config.settings
        self.vm: LuaVM | None = None
        self.api: StageAPI | None = None
        self._senders: dict[int, tuple[Sender, Any]] = {}  # by id(): the Sender and its Lua table
        self._texts: dict[str, bytes] = {}  # message ids and reply addresses as Lua strings
        self._idle_call: IDelayedCall | None = None
        self._stoppers: list[Callable[[], Any]] = []
        self._held: list[Message] | None = None  # messages that arrive while the runtime is rebuilt
        self.reloads = 0
        # by extension: what the old runtime leaves the new one during a reload (broker sockets)
        self.handover: dict[str, Handover] = {}

    def on_stop(self, stopper: Callable[[], Any]) -> None:
        """Run ``stopper`` when the stage stops (it may return a Deferred to wait for)."""
        self._stoppers.append(stopper)

    def start(self) -> None:
        settings = self.settings
        package = settings["%package"]
        recheck = settings["%recheck"]
        api = _TrackedAPI(
            self.context,
            lambda vm: ScriptLoader(vm, package, self.context.base_dir, recheck),
        )
        self.vm = vm = WatchedVM(
            self.context,
            self.config.type,
            api.host(),
            budget_ms=settings["%budget"],
            max_memory=settings["%memory"],
            sender=sender_fields(self.context.sender),
            watchdog=True,
        )
        vm.overran = self._abandon
        self.on_stop(vm.close)
        api.bind(vm)
        self.api = api
        install_all(self)
        for path in preload_files(settings.get("%preload")):
            self._run_script(path, "preload")
        assert self.config.main is not None
        result = self._run_script(self.config.main, "main script")
        if result is not None and vm.lua_type(result) == "function":
            self._idle(result)
        self.log.info("stage {name} started", name=self.config.name)

    def stop(self) -> Deferred[Any]:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        stoppers, self._stoppers = self._stoppers, []
        return DeferredList([maybeDeferred(stop) for stop in reversed(stoppers)])

    def script_files(self) -> list[str]:
        """The files a dev-mode watcher looks at: preload, main and every ``*.lua`` on ``%package``."""
        files = preload_files(self.settings.get("%preload"))
        if self.config.main is not None:
            files.append(self.config.main)
        for entry in self.settings.get("%package") or ():
            folder = self.context.resolve_path(
                str(entry).split("]", 1)[-1] if str(entry).startswith("[") else str(entry)
            )
            for root, _, names in os.walk(folder) if os.path.isdir(folder) else ():
                files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".lua"))
        return files

    def _abandon(self, elapsed: float) -> None:
        """A callback ran past the hard limit, out of the budget hook's reach (C code): what it
        changed may be half done, so the runtime is rebuilt from the scripts (a reload that carries
        nothing over: the old runtime runs no more code)."""
        if self._held is not None:
            return
        self.log.error(
            "stage {name}: a callback held the thread {ms:.0f} ms, over {limit} × %budget: its runtime is"
            " abandoned and rebuilt",
            name=self.config.name,
            ms=elapsed * 1000.0,
            limit=HARD_LIMIT,
        )
        self.context.count_error()
        self.context.clock.callLater(0, self._rebuild)

    def _rebuild(self) -> None:
        if self._held is None and self.vm is not None:
            self.reload(abandon=True)

    def reload(self, abandon: bool = False) -> Deferred[None]:
        """Rebuild the runtime from the current scripts; messages arriving meanwhile wait, in order.

        The old runtime's global ``on_unload()``, if defined, returns a value; it is copied by
        value (as a message is) and handed to the new runtime's global ``on_reload(old)``, if
        defined, after the new main script ran. Old timers are cancelled, old waitfor handlers,
        broker endpoints and sandboxes are gone with the old runtime (docs/operations.md).
        ``abandon``: the old runtime is not to run any more code (no drain, no ``on_unload``).
        """
        if self._held is not None:
            raise RuntimeError(f"{self.config.name} is already reloading")
        old_vm, old_api = self.vm, self.api
        assert old_vm is not None and isinstance(old_api, _TrackedAPI)
        self._held = []
        carried = None
        if not abandon:
            old_vm.drain()
            carried = self._unload(old_vm)
        old_api.cancel_all()
        self.vm = None
        self._senders.clear()  # _WAITFOR[1] tables of the old runtime
        return self.stop().addCallback(lambda _: self._restart(carried))

    def _unload(self, vm: LuaVM) -> bytes | None:
        f = vm.lua.globals()[b"on_unload"]
        if vm.lua_type(f) != "function":
            return None
        ok, *results = vm.call("on_unload", f)
        if not ok:
            return None
        try:
            return pack_lua(vm, (results[0] if results else None,))
        except CodecError as err:
            self.log.error("on_unload: its value cannot be carried: {error}", error=str(err))
            return None

    @property
    def reloading(self) -> bool:
        """True from ``reload()`` until the new runtime got the waiting messages."""
        return self._held is not None

    def _restart(self, carried: bytes | None) -> None:
        try:
            self.start()
            assert self.vm is not None
            hook = self.vm.lua.globals()[b"on_reload"]
            if self.vm.lua_type(hook) == "function":
                old = unpack_lua(self.vm, carried)[0] if carried is not None else None
                self.vm.call("on_reload", hook, old)
            self.reloads += 1
            self.log.info("stage {name} reloaded", name=self.config.name)
        finally:
            try:
                handover, self.handover = list(self.handover.values()), {}
                for kept in handover:
                    kept.finish()
            finally:
                held, self._held = self._held or [], None
                for message in held:
                    self.receive(message)

    def _run_script(self, path: str, where: str) -> Any:
        """Run one script file as a callback; returns its first result (None after an error)."""
        assert self.vm is not None and self.api is not None
        try:
            with open(path, "rb") as f:
                chunk = self.vm.compile(f.read(), b"@" + lua_text(os.path.relpath(path, self.context.base_dir)))
        except (OSError, LuaScriptError) as err:
            self.log.error("{where} {path}: {error}", where=where, path=path, error=str(err))
            self.context.count_error()
            return None
        ok, *results = self.vm.call(where, chunk)
        return results[0] if ok and results else None

    def _idle(self, f: Any) -> None:
        assert self.vm is not None
        ok, *results = self.vm.call("idle function", f)
        again = results[0] if ok and results else None
        if isinstance(again, (int, float)) and again > 0:
            self._idle_call = self.context.clock.callLater(again / 1000.0, self._idle, f)

    def receive(self, message: Message) -> None:
        if self._held is not None:
            self._held.append(message)
            return
        vm = self.vm
        if vm is None:
            return
        try:
            values = unpack_lua(vm, message.payload)
        except CodecError as err:
            self.log.error("message {msgid!r} dropped: {error}", msgid=message.msgid, error=str(err))
            self.context.count_error()
            return
        # by identity: the entry holds the Sender, so its id cannot be reused while cached
        entry = self._senders.get(id(message.sender))
        if entry is None:
            if len(self._senders) >= SENDER_CACHE:
                self._senders.clear()
            entry = self._senders[id(message.sender)] = (message.sender, vm.table(sender_fields(message.sender)))
        texts = self._texts
        msgid = texts.get(message.msgid)
        if msgid is None:
            msgid = self._text(message.msgid)
        reply = None if message.reply is None else texts.get(message.reply) or self._text(message.reply)
        vm.deliver(msgid, entry[1], reply, values)

    def _text(self, value: str) -> bytes:
        """``value`` as a Lua string, kept for the next message with the same id or reply address."""
        if len(self._texts) >= TEXT_CACHE:
            self._texts.clear()
        lua = self._texts[value] = lua_text(value)
        return lua


class _TrackedAPI(StageAPI):
    """``StageAPI`` that remembers its timers, so a reload can cancel the old runtime's tasks."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._tasks: list[Task] = []

    def addtask(self, delay_ms: float, f: Any, *args: Any) -> Task:
        task = super().addtask(delay_ms, f, *args)
        if len(self._tasks) >= 64 and len(self._tasks) & (len(self._tasks) - 1) == 0:
            self._tasks = [t for t in self._tasks if t.call is not None and t.call.active()]
        self._tasks.append(task)
        return task

    def cancel_all(self) -> None:
        for task in self._tasks:
            self.cancel(task)
        self._tasks.clear()
        call = self._drain_call
        if call is not None and call.active():
            call.cancel()


# Finds where a callback's function was defined: the function itself, else the waitfor handler
# registered under the first of the given message ids.
_WHERE = b"""
local getinfo, waitfor, type, select = debug.getinfo, stage.waitfor, type, select
return function(f, ...)
    if type(f) ~= "function" then
        f = nil
        for i = 1, select("#", ...) do
            local h = waitfor((select(i, ...)))
            if type(h) == "function" then f = h break end
        end
    end
    if f == nil then return nil end
    local info = getinfo(f, "S")
    return info.short_src, info.linedefined
end
"""


class WatchedVM(LuaVM):
    """A stage's main runtime whose callbacks are timed against the process's ``slow_ms``."""

    def __init__(self, context: StageHost, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._context = context
        self._where = self.lua.execute(_WHERE)

    def call(self, where: str, f: Any, *args: Any) -> tuple[Any, ...]:
        started = monotonic()
        try:
            return super().call(where, f, *args)
        finally:
            self._check(started, where, f, ())

    def deliver(self, msgid: bytes, sender: Any, reply: bytes | None, values: tuple[Any, ...]) -> None:
        started = monotonic()
        try:
            self.enter(self._deliver, started, msgid, sender, reply, *values)
        finally:
            if (monotonic() - started) * 1000.0 >= self._context.process.slow_ms:
                self._check(started, f"handler of message {text(msgid)!r}", None, handler_keys(msgid))

    def _check(self, started: float, where: str, f: Any, keys: tuple[bytes, ...]) -> None:
        elapsed_ms = (monotonic() - started) * 1000.0
        if elapsed_ms < self._context.process.slow_ms:
            return
        try:
            script, line = self._where(f, *keys)
        except Exception:  # a script replaced stage.waitfor: report without the place
            script, line = None, None
        self._context.log.warn(
            "slow handler: {where} held the reactor {ms:.0f} ms ({script}:{line})",
            where=where,
            ms=elapsed_ms,
            stage=self._context.stage_id,
            script=text(script) if script is not None else "?",
            line=line if line is not None else "?",
        )


def handler_keys(msgid: bytes) -> tuple[bytes, ...]:
    """The waitfor ids tried for ``msgid``, in SPEC 2.6 order (the prelude's ``lookup``)."""
    keys = [msgid]
    colon = msgid.find(b":")
    head, rest = (msgid[: colon + 1], msgid[colon + 1 :]) if colon >= 0 else (b"", msgid)
    stop = len(rest) - 1
    while stop > 0:
        dot = rest.rfind(b".", 0, stop)
        if dot < 0:
            break
        keys.append(head + rest[: dot + 1])
        stop = dot
    if head:
        keys.append(head)
    return tuple(keys)


def sender_fields(sender: Sender) -> dict[Any, Any]:
    """``_WAITFOR[1]``: server address, process (1-based group), stage id, also by position."""
    return {
        "server": sender.server,
        "process": sender.group + 1,
        "stage": sender.stage,
        "instance": sender.instance,
        1: sender.server,
        2: sender.group + 1,
        3: sender.stage,
    }


def preload_files(preload: str | None) -> list[str]:
    if not preload:
        return []
    if os.path.isdir(preload):
        names = sorted(n for n in os.listdir(preload) if n.endswith(".lua"))
        return [os.path.join(preload, n) for n in names]
    return [preload]
