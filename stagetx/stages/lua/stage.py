"""The ``=lua`` / ``=luajit`` stage: scripts in one Lua runtime on the reactor thread.

Start-up runs ``%preload`` (a file, or every ``*.lua`` of a directory in name order), then the main
script; a main script that returns a function makes it the *idle function*, called again after
the number of ms it returns. Messages are decoded into the runtime and handed to the prelude,
which finds the waitfor handler. Errors are logged with file and line; the stage keeps serving.

A stage whose ``%preload`` or main script fails (a syntax or run-time error) is *failed*
(``failure``: the error's first line, ``file:line: problem``): it is shown so in ``stat``,
``/metrics`` and ``/health``, and the process keeps its other stages running.

Operations (docs/operations.md): ``reload()`` first compiles the new ``%preload`` and main
scripts apart from the running runtime, then loads them in a new runtime while messages wait
outside; only if they loaded is the new runtime swapped in. Otherwise the reload fails with the
file and line, and the running runtime keeps its state, timers and sockets. Every callback is timed:
one that holds the reactor longer than the process's ``slow_ms`` is logged as a "slow handler"
with the script and line of its function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.interfaces import IDelayedCall

from stagetx.bounded import BoundedDict
from stagetx.broker.traffic import Traffic
from stagetx.codec import CodecError, pack_lua, unpack_lua
from stagetx.config import StageConfig
from stagetx.lua.api import StageAPI, Task, lua_text, next_delay, sender_fields, text
from stagetx.lua.extensions import install_all
from stagetx.lua.loader import ScriptLoader
from stagetx.lua.runtime import HARD_LIMIT, LuaOutOfMemory, LuaScriptError, LuaVM
from stagetx.lua.search import preload_files
from stagetx.lua.syntax import compile_errors
from stagetx.message import LATENCY_BUCKETS, Message, Run, Sender

if TYPE_CHECKING:
    from stagetx.child.host import StageHost

#: Message ids and reply addresses kept as Lua strings per stage, at most this many.
TEXT_CACHE = 4096
#: ``_WAITFOR[1]`` tables kept per stage, at most this many.
SENDER_CACHE = 1024


class ReloadError(Exception):
    """A reload that failed; its message names the file and line of each error."""


class Handover(Protocol):
    """What an extension keeps from one runtime of a stage for the next (a reload), e.g. sockets."""

    def finish(self) -> None:
        """The new runtime's main script and ``on_reload`` ran: take up or release the rest."""

    def restore(self) -> None:
        """The new runtime failed to load: give everything back to the old one, as it was."""


class _Running:
    """The runtime a reload replaces, kept whole until the new one has loaded."""

    def __init__(self, stage: Stage) -> None:
        assert stage.vm is not None and isinstance(stage.api, _TrackedAPI)
        self.vm: LuaVM = stage.vm
        self.api: _TrackedAPI = stage.api
        self.stoppers = stage._stoppers
        self.parkers = stage._parkers
        self.idle_call = stage._idle_call
        self.failure = stage.failure  # a runtime whose own scripts failed may be reloaded too
        self.broker = stage.broker  # its endpoints, as stat and /metrics read them


class Stage:
    """A Lua stage (``config.type`` is ``lua`` or ``luajit``)."""

    def __init__(self, context: StageHost, config: StageConfig) -> None:
        self.context = context
        self.config = config
        self.log = context.log
        self.settings: dict[str, Any] = config.settings
        self.vm: LuaVM | None = None
        self.api: StageAPI | None = None
        # by id(): the Sender and its Lua table
        self._senders: BoundedDict[int, tuple[Sender, Any]] = BoundedDict(SENDER_CACHE)
        # message ids and reply addresses as Lua strings
        self._texts: BoundedDict[str, bytes] = BoundedDict(TEXT_CACHE)
        self._idle_call: IDelayedCall | None = None
        self._stoppers: list[Callable[[], Any]] = []
        self._parkers: list[Callable[[], None]] = []
        self.rolling_back = False  # while a runtime that failed to load is stopped (a reload)
        self._held: list[Message] | None = None  # messages that arrive while the runtime is rebuilt
        #: Whether runs are read in Lua (``receive_run``): Lua 5.4 has ``string.unpack``, which
        #: the reading needs; a LuaJIT stage gets a run's messages one by one.
        self.runs = config.type == "lua"
        # handler times of runs not yet taken (``take_times``) from runtimes replaced since
        self._kept_busy = 0.0
        self._kept_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.reloads = 0
        self.failure: str | None = None  # why the last start failed (file:line: problem), if it did
        self.traffic = Traffic()  # the broker clients of all its endpoints, across reloads
        self.broker: Any = None  # the broker extension's BrokerAPI of the current runtime (its endpoints)
        # by extension: what the old runtime leaves the new one during a reload (broker sockets)
        self.handover: dict[str, Handover] = {}

    def on_stop(self, stopper: Callable[[], Any]) -> None:
        """Run ``stopper`` when the stage stops, or its runtime is replaced (it may return a
        Deferred to wait for); ``rolling_back`` is true while the new runtime of a reload that
        failed is stopped."""
        self._stoppers.append(stopper)

    def on_park(self, park: Callable[[], None]) -> None:
        """Run ``park`` when a reload begins, before the new runtime loads: it puts in
        ``handover`` what the new runtime takes up (broker sockets) and gets back if it fails."""
        self._parkers.append(park)

    def start(self) -> None:
        result = self._load()
        if self.failure is not None:
            self.log.error("stage {name} failed: {failure}", name=self.config.name, failure=self.failure)
            return
        assert self.vm is not None
        if result is not None and self.vm.lua_type(result) == "function":
            self._idle(result)
        self.log.info("stage {name} started", name=self.config.name)

    def _load(self) -> Any:
        """A new runtime with the extensions, then ``%preload`` and the main script; the main
        script's first result (``failure`` says whether a script failed)."""
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
            buckets=LATENCY_BUCKETS,
        )
        vm.overran = self._abandon
        self.on_stop(vm.close)
        api.bind(vm)
        self.api = api
        install_all(self)
        self.failure = None
        for path in preload_files(settings.get("%preload")):
            self._run_script(path, "preload")
        assert self.config.main is not None
        return self._run_script(self.config.main, "main script")

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
            self.reload(abandon=True).addErrback(lambda _: None)  # a failed rebuild is logged by reload

    def reload(self, abandon: bool = False) -> Deferred[None]:
        """Load the current scripts in a new runtime and swap it in; messages arriving meanwhile
        wait, in order (docs/operations.md, "Hot reload").

        Fails with ``ReloadError`` (file and line), the running runtime untouched, when the
        ``%preload`` or main scripts do not compile; and when they raise while they load: the new
        runtime is then stopped and the running one carries on with its timers and its broker
        sockets (what the new one opened is closed).

        The old runtime's global ``on_unload()``, if defined, returns a value; it is copied by
        value (as a message is) and handed to the new runtime's global ``on_reload(old)``, if
        defined, after the new main script ran. Then the old runtime stops: its timers, waitfor
        handlers and sandboxes go with it; its broker endpoints are taken up by the new one or
        closed.

        ``abandon``: the old runtime is not to run any more code (no drain, no ``on_unload``): a
        callback of it ran past the hard limit.
        """
        if self._held is not None:
            raise RuntimeError(f"{self.config.name} is already reloading")
        assert self.config.main is not None
        scripts = [*preload_files(self.settings.get("%preload")), self.config.main]
        errors = compile_errors(self.config.type, scripts, self.context.base_dir)
        if errors:
            self.log.error(
                "reload of {name} refused, the running scripts are kept: {errors}",
                name=self.config.name,
                errors="; ".join(errors),
            )
            return fail(ReloadError("; ".join(errors)))
        old = _Running(self)
        self._keep_times(old.vm)
        self._held = []
        carried = None
        if not abandon:
            old.vm.drain()
            carried = self._unload(old.vm)
        for park in old.parkers:
            park()
        self._stoppers, self._parkers, self._idle_call = [], [], None
        self._senders.clear()  # _WAITFOR[1] tables of the old runtime
        try:
            result = self._load()
        except Exception as err:  # a runtime that could not even be made (memory): as a failed load
            self.log.failure("reload of {name}: the new runtime failed", name=self.config.name)
            self.failure = f"{type(err).__name__}: {err}"
        if self.failure is not None:
            return self._roll_back(old)
        return self._swap(old, result, carried)

    def _swap(self, old: _Running, result: Any, carried: bytes | None) -> Deferred[None]:
        """The new runtime loaded: hand it the old one's state and sockets, then stop the old one."""
        vm = self.vm
        assert vm is not None
        old.api.cancel_all()
        if old.idle_call is not None and old.idle_call.active():
            old.idle_call.cancel()
        stopped = DeferredList([maybeDeferred(stop) for stop in reversed(old.stoppers)])
        try:
            if result is not None and vm.lua_type(result) == "function":
                self._idle(result)
            hook = vm.lua.globals()[b"on_reload"]
            if vm.lua_type(hook) == "function":
                vm.call("on_reload", hook, unpack_lua(vm, carried)[0] if carried is not None else None)
            self.reloads += 1
            self.log.info("stage {name} reloaded", name=self.config.name)
        finally:
            self._hand_over("finish")
        return stopped.addCallback(lambda _: None)

    def _roll_back(self, old: _Running) -> Deferred[None]:
        """The new runtime failed to load: stop it, give the old one back its sockets and messages."""
        failure = self.failure or "error"
        self.log.error(
            "reload of {name} failed, the running scripts are kept: {failure}", name=self.config.name, failure=failure
        )
        if isinstance(self.api, _TrackedAPI):
            self.api.cancel_all()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self.rolling_back = True
        try:
            stopped = DeferredList([maybeDeferred(stop) for stop in reversed(self._stoppers)])
        finally:
            self.rolling_back = False
        self.vm, self.api, self.broker, self._stoppers, self._parkers, self._idle_call = (
            old.vm,
            old.api,
            old.broker,
            old.stoppers,
            old.parkers,
            old.idle_call,
        )
        self.failure = old.failure
        self._senders.clear()  # _WAITFOR[1] tables of the failed runtime
        self._hand_over("restore")

        def failed(_: Any) -> None:
            raise ReloadError(failure)

        return stopped.addCallback(failed)

    def _hand_over(self, how: str) -> None:
        """Finish (or restore) what the old runtime parked, then deliver the waiting messages."""
        try:
            handover, self.handover = list(self.handover.values()), {}
            for kept in handover:
                getattr(kept, how)()
        finally:
            held, self._held = self._held or [], None
            for message in held:
                self.receive(message)

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

    def _run_script(self, path: str, where: str) -> Any:
        """Run one script file as a callback; returns its first result (None after an error, which
        makes the stage failed)."""
        assert self.vm is not None and self.api is not None
        try:
            with open(path, "rb") as f:
                chunk = self.vm.compile(f.read(), b"@" + lua_text(os.path.relpath(path, self.context.base_dir)))
        except (OSError, LuaScriptError) as err:
            self.log.error("{where} {path}: {error}", where=where, path=path, error=str(err))
            self.context.count_error(str(err))
            self.failure = self.failure or str(err)
            return None
        ok, *results = self.vm.call(where, chunk)
        if not ok:
            error = text(results[0]) if results and isinstance(results[0], bytes) else "error"
            self.failure = self.failure or (error.splitlines() or ["error"])[0]
            return None
        return results[0] if results else None

    def _idle(self, f: Any) -> None:
        assert self.vm is not None
        ok, *results = self.vm.call("idle function", f)
        if not ok or not results:
            return
        assert self.api is not None
        again = next_delay(self.vm, self.api.report, "idle function", "idle function", f, results[0])
        if again is not None:
            self._idle_call = self.context.clock.callLater(again / 1000.0, self._idle, f)

    def _lost(self, count: int, msgid: str | None, error: LuaOutOfMemory) -> None:
        """Messages the runtime had no memory to take (``LuaOutOfMemory``): logged and counted."""
        if count == 1 and msgid is not None:
            what = f"message {msgid!r}"
        else:
            what = f"{count} messages" + ("" if msgid is None else f" from {msgid!r} on")
        self.log.error("{what} dropped: {error}", what=what, error=str(error))
        self.context.count_error(f"{what} dropped: {error}")

    def receive(self, message: Message) -> None:
        if self._held is not None:
            self._held.append(message)
            return
        vm = self.vm
        if vm is None:
            return
        arguments = self._arguments(vm, message)
        if arguments is not None:
            try:
                vm.deliver(self.context.router.turn, *arguments)
            except LuaOutOfMemory as error:
                self._lost(1, message.msgid, error)

    def receive_batch(self, messages: list[Message]) -> list[float]:
        """Deliver a run of messages in as few crossings into Lua as the drain slice allows (the
        prelude decodes their payloads).

        Returns each message's handler time (s), in order: 0.0 for one held during a reload or
        arriving with no runtime (``receive`` spends no handler time on those either).
        """
        times: list[float] = []
        while len(times) < len(messages):
            vm = self.vm
            if self._held is not None or vm is None:
                if self._held is not None:
                    self._held.extend(messages[len(times) :])
                times.extend([0.0] * (len(messages) - len(times)))
                break
            args: list[Any] = []
            if vm.decodes:
                for message in messages[len(times) :]:
                    args += self._fields(vm, message)
                    args += (-1, message.payload)
            else:  # decoded here (LuaJIT): a dropped message (logged, counted) has no values: False
                for message in messages[len(times) :]:
                    args += self._fields(vm, message)
                    values = self._values(vm, message)
                    args += (False,) if values is None else (len(values), *values)
            try:
                times += vm.deliver_batch(self.context.router.turn, args)
            except LuaOutOfMemory as error:
                self._lost(len(messages) - len(times), messages[len(times)].msgid, error)
                times.extend([0.0] * (len(messages) - len(times)))
        return times

    def receive_run(self, run: Run, limit: int) -> int:
        """Deliver up to ``limit`` messages of ``run``: read and dispatched in Lua, one crossing;
        their handler times stay in Lua until ``take_times``. Returns how many were delivered (the
        rest of a malformed run is dropped, logged and counted)."""
        vm = self.vm
        if self._held is not None or vm is None:
            messages = run.take()
            if self._held is not None:
                self._held.extend(messages)
            return len(messages)
        sender = self._sender_table(vm, run.sender)
        turn = self.context.router.turn
        body = run.body
        try:
            pos, done, *slow = vm.deliver_run(turn, sender, body, run.pos, min(limit, run.count), self._slow())
        except LuaOutOfMemory as error:
            lost, run.count = run.count, 0
            self._lost(lost, None, error)
            return lost
        if pos < 0 or (pos > len(body) and run.count > done):
            self.log.error(
                "a run of {count} messages from {sender} is malformed: {lost} of them dropped",
                count=run.count,
                sender=run.sender.stage,
                lost=run.count - done,
            )
            self.context.count_error()
            run.count = done
        run.pos = pos
        run.count -= done
        if slow:
            assert isinstance(vm, WatchedVM)
            for i in range(0, len(slow), 2):
                vm.slow_handler(slow[i], slow[i + 1])
        return done

    def _slow(self) -> float:
        """The handler time (s) from which a message's handler is logged as slow."""
        return float(self.context.process.slow_ms) / 1000.0

    def take_times(self) -> tuple[float, list[int]]:
        """The handler times of runs since the last call: seconds in all, and the count per
        ``LATENCY_BUCKETS`` bucket (``StageHost.take_times``)."""
        if self.vm is not None:
            self._keep_times(self.vm)
        busy, counts = self._kept_busy, self._kept_counts
        self._kept_busy, self._kept_counts = 0.0, [0] * len(counts)
        return busy, counts

    def _keep_times(self, vm: LuaVM) -> None:
        if vm.decodes:
            busy, counts = vm.take_times()
            self._kept_busy += busy
            for i, n in enumerate(counts):
                self._kept_counts[i] += n

    def _arguments(self, vm: LuaVM, message: Message) -> tuple[bytes, Any, bytes | None, tuple[Any, ...]] | None:
        """What ``deliver`` takes for ``message``: its values decoded into ``vm``, its id, sender
        and reply as Lua values; None when the payload does not decode (logged, counted)."""
        values = self._values(vm, message)
        return None if values is None else (*self._fields(vm, message), values)

    def _values(self, vm: LuaVM, message: Message) -> tuple[Any, ...] | None:
        """``message``'s values decoded into ``vm``; None when the payload does not decode (logged,
        counted)."""
        try:
            return unpack_lua(vm, message.payload)
        except CodecError as err:
            self.log.error("message {msgid!r} dropped: {error}", msgid=message.msgid, error=str(err))
            self.context.count_error()
            return None

    def _fields(self, vm: LuaVM, message: Message) -> tuple[bytes, Any, bytes | None]:
        """``message``'s id, sender and reply as Lua values (kept for the next messages)."""
        sender = self._sender_table(vm, message.sender)
        texts = self._texts
        msgid = texts.get(message.msgid)
        if msgid is None:
            msgid = self._text(message.msgid)
        reply = None if message.reply is None else texts.get(message.reply) or self._text(message.reply)
        return msgid, sender, reply

    def _sender_table(self, vm: LuaVM, sender: Sender) -> Any:
        """``sender`` as the ``_WAITFOR[1]`` table of ``vm`` (kept for the next messages)."""
        # by identity: the entry holds the Sender, so its id cannot be reused while cached
        entry = self._senders.get(id(sender))
        if entry is None:
            entry = self._senders.put(id(sender), (sender, vm.table(sender_fields(sender))))
        return entry[1]

    def _text(self, value: str) -> bytes:
        """``value`` as a Lua string, kept for the next message with the same id or reply address."""
        return self._texts.put(value, lua_text(value))


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

    def deliver(
        self, turn: int | None, msgid: bytes, sender: Any, reply: bytes | None, values: tuple[Any, ...]
    ) -> None:
        started = monotonic()
        try:
            self.enter(self._deliver, started, turn, msgid, sender, reply, *values)
        finally:
            if (monotonic() - started) * 1000.0 >= self._context.process.slow_ms:
                self._check(started, f"handler of message {text(msgid)!r}", None, handler_keys(msgid))

    def deliver_batch(self, turn: int | None, args: list[Any]) -> tuple[float, ...]:
        times = super().deliver_batch(turn, args)
        slow = self._context.process.slow_ms / 1000.0
        at = 0  # where the message of times[i] starts in args
        for elapsed in times:
            if elapsed >= slow:
                msgid = args[at]
                self._warn(elapsed * 1000.0, f"handler of message {text(msgid)!r}", None, handler_keys(msgid))
            count = args[at + 3]
            at += 5 if count == -1 else 4 + (count or 0)
        return times

    def slow_handler(self, msgid: bytes, elapsed: float) -> None:
        """Log the handler of ``msgid``, which took ``elapsed`` s in a run, as slow."""
        self._warn(elapsed * 1000.0, f"handler of message {text(msgid)!r}", None, handler_keys(msgid))

    def _check(self, started: float, where: str, f: Any, keys: tuple[bytes, ...]) -> None:
        elapsed_ms = (monotonic() - started) * 1000.0
        if elapsed_ms >= self._context.process.slow_ms:
            self._warn(elapsed_ms, where, f, keys)

    def _warn(self, elapsed_ms: float, where: str, f: Any, keys: tuple[bytes, ...]) -> None:
        """Log a slow handler, with where its function was defined."""
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
    """The waitfor ids tried for ``msgid``, in handler lookup order (the prelude's ``lookup``)."""
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
