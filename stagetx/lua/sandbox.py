"""Sandboxes: the Lua runtimes of a stage's worker threads.

Each worker thread that runs a job of a stage gets its own ``LuaVM`` for that stage, made lazily
in that thread with the stage's settings (VM kind, ``%memory``, ``%package``) and its ``%preload``
scripts run in it. Globals are the sandbox's own; ``stage.once`` and ``stage.v`` reach the
process-wide shared state, which is thread-safe.

What touches the reactor (sending through the router, ``stage.addtask``, logging, error reports)
is handed over with ``reactor.callFromThread``; what can be known in the thread (a bad address, a
value that cannot move) is raised at the script's own line. Handlers belong to the stage's main
runtime: in a sandbox ``stage.waitfor`` and the synchronous ``stage.signal(":id")`` raise, and
``stage.signal("id")`` goes to the stage's own handler through the router.

Jobs in a sandbox are not under ``%budget`` (they do not hold the stage's thread); instead a count
hook interrupts them once the stage has stopped and its grace period is over.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred

from stagetx.address import Address
from stagetx.codec import pack_lua, unpack_lua
from stagetx.lua.api import StageAPI, Task, lua_text, sender_fields
from stagetx.lua.loader import ScriptLoader
from stagetx.lua.runtime import HOOK_COUNT, LuaScriptError, LuaVM
from stagetx.lua.search import preload_files

if TYPE_CHECKING:
    from stagetx.stages.lua.stage import Stage

#: Seconds running jobs may go on after their stage stopped, before they are interrupted.
GRACE_SECONDS = 5.0
#: Seconds to wait for interrupted jobs to unwind before the stage stops without them.
UNWIND_SECONDS = 1.0
_POLL_SECONDS = 0.05

_INTERRUPTED = "the stage stopped: job interrupted after its grace period"

# Runs once in every sandbox, after the prelude: its replacements for what only the stage's main
# runtime can do, and the shutdown hook (which replaces the prelude's %budget hook).
_SANDBOX_LUA = """
local send, interrupted, hook_count, message, sethook, expire = ...
local type, error, find, sub = type, error, string.find, string.sub
stage.signal = function(t, ...)
    if t == nil then
        error("stage.signal(nil, ...): a job has no message to reply to (pass _WAITFOR[2] along)", 2)
    end
    if type(t) == "string" and sub(t, 1, 1) == ":" and not find(t, "=", 2, true) then
        error("stage.signal(':id'): synchronous calls run on the stage's thread; use 'id' in a job", 2)
    end
    local ok, reason = send(t, ...)
    if ok then return true end
    if ok == nil then error(reason, 2) end
    return false, reason
end
stage.waitfor = function()
    error("stage.waitfor: handlers belong to the stage's own runtime, not to a job's sandbox", 2)
end
sethook(function()
    if interrupted() then
        expire(message)  -- no pcall in the job catches it
        error(message, 2)
    end
end, "", hook_count)
"""


SandboxHook = Callable[["Sandbox"], None]

# Per stage runtime (keyed by the stage's main LuaVM, which a reload replaces): what other
# extension modules add to each of its sandboxes. Dropped when the stage stops (the hooks refer
# to the runtime, so a weak key alone would never go).
_hooks: weakref.WeakKeyDictionary[Any, list[SandboxHook]] = weakref.WeakKeyDictionary()


def on_new_sandbox(stage: Stage, hook: SandboxHook) -> None:
    """Call ``hook(sandbox)`` in every new sandbox of ``stage``'s current runtime.

    For extension modules (``stagetx.lua.extensions``) whose API also exists in jobs, e.g. the
    ``broker`` global; the hook runs on the worker thread, before ``%preload``. Independent of
    the order of ``EXTENSIONS``: the hooks are read when a sandbox is made.
    """
    vm = stage.vm
    hooks = _hooks.get(vm)
    if hooks is None:
        hooks = _hooks[vm] = []
        stage.on_stop(lambda: _hooks.pop(vm, None))
    hooks.append(hook)


class Job(Protocol):
    """A job as a sandbox runs it (``stagetx.lua.workers.LuaJob``)."""

    def run_in(self, sandbox: Sandbox) -> float | None: ...


class _SandboxTask:
    """A ``stage.addtask`` made in a sandbox: the task itself lives in the stage's main runtime."""

    __slots__ = ("task", "cancelled")

    def __init__(self) -> None:
        self.task: Task | None = None
        self.cancelled = False


class SandboxAPI(StageAPI):
    """The host callables of one sandbox (used on its worker thread only)."""

    def __init__(self, stage: Stage, reactor: Any, interrupted: Callable[[], bool]) -> None:
        settings = stage.settings
        super().__init__(
            stage.context,
            lambda vm: ScriptLoader(vm, settings["%package"], stage.context.base_dir, settings["%recheck"]),
        )
        self._main = stage
        self._reactor = reactor
        self.interrupted = interrupted

    def _route(self, address: Address, payload: bytes) -> tuple[Any, ...]:
        """The router lives on the reactor thread: the message is handed over, so it counts as sent."""
        self._reactor.callFromThread(self.stage.send_payload, address, payload)
        return (True,)

    def _steady(self, address: Address) -> None:
        """None: the router's state belongs to the reactor thread (every send is handed over)."""
        return None

    def report(self, where: bytes, msgid: bytes, error: bytes) -> None:
        self._reactor.callFromThread(StageAPI.report, self, where, msgid, error)

    def write_log(self, level: bytes, group: bytes | None, message: bytes) -> None:
        self._reactor.callFromThread(StageAPI.write_log, self, level, group, message)

    def schedule_drain(self) -> None:
        """Never needed: a sandbox has no local message queue (its ``stage.signal`` routes all)."""

    def addtask(self, delay_ms: float, f: Any, *args: Any) -> Any:
        """``f(args...)`` moves by value to the stage's main runtime and runs there as a task."""
        payload = pack_lua(self.vm, (f, *args))
        handle = _SandboxTask()
        self._reactor.callFromThread(self._arm, handle, delay_ms, payload)
        return handle

    def cancel(self, task: Any) -> None:
        if isinstance(task, _SandboxTask):
            task.cancelled = True
            self._reactor.callFromThread(self._disarm, task)

    def _arm(self, handle: _SandboxTask, delay_ms: float, payload: bytes) -> None:
        main = self._main
        if handle.cancelled or main.vm is None or main.api is None:
            return
        f, *args = unpack_lua(main.vm, payload)
        handle.task = main.api.addtask(delay_ms, f, *args)

    def _disarm(self, handle: _SandboxTask) -> None:
        if handle.task is not None and self._main.api is not None:
            self._main.api.cancel(handle.task)


class Sandbox:
    """One worker thread's runtime for one stage.

    ``thread`` is the ``thread.new`` handle of the job running in it (``None`` for ``stage.submit``
    jobs), for ``thread.signal``.
    """

    def __init__(self, stage: Stage, reactor: Any, interrupted: Callable[[], bool]) -> None:
        settings = stage.settings
        self.api = api = SandboxAPI(stage, reactor, interrupted)
        self.vm = vm = LuaVM(
            stage.config.type,
            api.host(),
            budget_ms=settings["%budget"],
            max_memory=settings["%memory"],
            sender=sender_fields(stage.context.sender),
        )
        api.bind(vm)
        vm.lua.execute(
            _SANDBOX_LUA,
            api.send,
            interrupted,
            HOOK_COUNT,
            _INTERRUPTED.encode(),
            vm.core[b"sethook"],
            vm.core[b"expire"],
        )
        self.thread: Any = None
        self.extensions: dict[str, Any] = {}  # an extension module's state in this sandbox, by module
        self._base_dir = stage.context.base_dir

    def preload(self, paths: list[str]) -> None:
        """Run the stage's ``%preload`` scripts here; failures are reported, the sandbox is kept."""
        for path in paths:
            try:
                with open(path, "rb") as f:
                    name = b"@" + lua_text(os.path.relpath(path, self._base_dir))
                    chunk = self.vm.compile(f.read(), name)
            except (OSError, LuaScriptError) as err:
                self.api.report(b"preload", b"", lua_text(f"{path}: {err}"))
                continue
            self.vm.call("preload", chunk)


class Sandboxes:
    """The sandboxes of one stage, one per worker thread, and the stage's share of shutdown.

    @param stage: the Lua stage (its settings, context and main runtime).
    @param reactor: for ``callFromThread`` and the stop timers.
    @param extend: adds the worker APIs (``stage.submit``, ``thread.signal``) to a new sandbox.
    @param grace: seconds running jobs may go on after ``stop`` (default ``GRACE_SECONDS``).
    """

    def __init__(
        self,
        stage: Stage,
        reactor: Any,
        extend: Callable[[Sandbox], None],
        grace: float | None = None,
    ) -> None:
        self._stage = stage
        self._main_vm = stage.vm
        self._reactor = reactor
        self._extend = extend
        self._grace = GRACE_SECONDS if grace is None else grace
        self._local = threading.local()
        self._lock = threading.Lock()
        self.running = 0
        self.skipped = 0
        self.stopping = False
        self.interrupted = False
        self.log = stage.log

    def current(self) -> Sandbox:
        """The calling worker thread's sandbox, made (and preloaded) on first use."""
        sandbox: Sandbox | None = getattr(self._local, "sandbox", None)
        if sandbox is None:
            sandbox = Sandbox(self._stage, self._reactor, self._is_interrupted)
            self._extend(sandbox)
            for hook in _hooks.get(self._main_vm, ()):
                hook(sandbox)
            sandbox.preload(preload_files(self._stage.settings.get("%preload")))
            self._local.sandbox = sandbox
        return sandbox

    def _is_interrupted(self) -> bool:
        return self.interrupted

    def run(self, job: Job) -> float | None:
        """Run ``job`` in this thread's sandbox (worker thread); skipped once the stage stopped."""
        with self._lock:
            if self.stopping:
                self.skipped += 1
                return None
            self.running += 1
        try:
            return job.run_in(self.current())
        finally:
            with self._lock:
                self.running -= 1

    def stop(self) -> Deferred[None]:
        """Stop taking jobs; fires once running jobs are done, interrupting them after the grace."""
        self.stopping = True
        done: Deferred[None] = Deferred()
        clock = self._reactor
        deadline = clock.seconds() + self._grace

        def check() -> None:
            nonlocal deadline
            with self._lock:
                running = self.running
            if running and clock.seconds() < deadline:
                clock.callLater(_POLL_SECONDS, check)
                return
            if running and not self.interrupted:
                self.log.warn("{n} job(s) still running {s} s after stop: interrupting", n=running, s=self._grace)
                self.interrupted = True
                deadline = clock.seconds() + UNWIND_SECONDS
                clock.callLater(_POLL_SECONDS, check)
                return
            if running:
                self.log.error("{n} job(s) did not unwind; stopping without them", n=running)
            if self.skipped:
                self.log.warn("{n} queued job(s) not run: the stage stopped", n=self.skipped)
            done.callback(None)

        check()
        return done
