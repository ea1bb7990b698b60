"""The keyed job queue of one process: ``stage.submit`` and ``thread.new`` over a thread pool.

Key ``0`` (or ``None``) runs a job as soon as a pool thread is free. Any other key is a FIFO: jobs
of one key never overlap and start in submission order; different keys run in parallel. A job
that asks to run again (``stage.submit``'s return value) waits on a reactor timer, then joins the
end of its key's FIFO. ``limit`` (``#threads[1]``) bounds the jobs that wait, not-yet-started
jobs and pending re-submissions together; past it ``submit`` raises ``QueueFull`` so the caller
sees back-pressure and nothing is dropped silently.

The queue is used from the reactor thread and from worker threads (a job may submit another), so
its state sits behind one lock; the jobs themselves run outside it.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from stagetx import reactors
from stagetx.codec import CodecError, pack_lua, unpack_lua
from stagetx.lua.api import lua_text, next_delay, text
from stagetx.lua.runtime import LuaVM
from stagetx.lua.sandbox import Sandbox, Sandboxes

if TYPE_CHECKING:
    from stagetx.stages.lua.stage import Stage


class QueueFull(Exception):
    """The process's waiting jobs reached ``#threads[1]``."""


class Job(Protocol):
    """One unit of work; ``run`` is called on a pool thread and must not raise."""

    key: Hashable  # 0 or None: no serialization

    def run(self) -> float | None:
        """Do the work (or skip it, once its owner stopped); a number > 0 asks to run again
        after that many ms, with the same key."""


class Pool(Protocol):
    """What the queue needs of ``twisted.python.threadpool.ThreadPool``."""

    def callInThread(self, func: Any, *args: Any) -> None: ...


class Reactor(Protocol):
    """What the queue needs of the reactor (timers for re-submissions)."""

    def callFromThread(self, f: Any, *args: Any) -> None: ...

    def callLater(self, delay: float, f: Any, *args: Any) -> Any: ...


class KeyedQueue:
    """Per-key FIFOs over a thread pool.

    @param pool: where jobs run (the reactor's thread pool in a server).
    @param reactor: for re-submission timers (``callLater`` on the reactor thread).
    @param limit: the most jobs that may wait at once.
    """

    log = Logger(namespace="stagetx.workers")

    def __init__(self, pool: Pool, reactor: Reactor, limit: int) -> None:
        self._pool = pool
        self._reactor = reactor
        self.limit = limit
        self._lock = threading.Lock()
        self._keys: dict[Hashable, deque[Job]] = {}  # key -> jobs waiting behind the running one
        self._waiting = 0  # accepted, not started (in a FIFO, in the pool, or on a timer)
        self.running = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        """Accept ``job`` or raise ``QueueFull``; it runs once its key is free (any thread)."""
        with self._lock:
            if self._waiting >= self.limit:
                raise QueueFull(f"the worker queue is full ({self.limit} jobs waiting, #threads[1])")
            self._waiting += 1
            start = self._admit(job)
        if start:
            self._pool.callInThread(self._run, job)

    def _admit(self, job: Job) -> bool:
        """Under the lock: True when ``job`` may start now, else it waits in its key's FIFO."""
        key = job.key
        if key == 0 or key is None:
            return True
        fifo = self._keys.get(key)
        if fifo is None:
            self._keys[key] = deque()
            return True
        fifo.append(job)
        return False

    def _run(self, job: Job) -> None:
        with self._lock:
            self._waiting -= 1
            self.running += 1
        again = None
        try:
            again = job.run()
        except Exception:
            self.log.failure("worker job failed")
        finally:
            self._finish(job, again)

    def _finish(self, job: Job, again: float | None) -> None:
        follower = None
        resubmit = isinstance(again, (int, float)) and again > 0
        with self._lock:
            self.running -= 1
            key = job.key
            if key != 0 and key is not None:
                fifo = self._keys[key]
                if fifo:
                    follower = fifo.popleft()
                else:
                    del self._keys[key]
            if resubmit:
                self._waiting += 1
        if follower is not None:
            self._pool.callInThread(self._run, follower)
        if resubmit:
            assert again is not None
            self._reactor.callFromThread(self._reactor.callLater, again / 1000.0, self._resubmit, job)

    def _resubmit(self, job: Job) -> None:
        """A re-submission's timer fired (reactor thread); it was counted as waiting already."""
        with self._lock:
            start = self._admit(job)
        if start:
            self._pool.callInThread(self._run, job)


_queues: weakref.WeakKeyDictionary[Any, KeyedQueue] = weakref.WeakKeyDictionary()
_queues_lock = threading.Lock()


def process_queue(process: Any, reactor: Any, threads: tuple[int, int]) -> KeyedQueue:
    """The one queue of a process (``process`` is its ``ProcessServices``), made on first use.

    ``threads`` is ``#threads``: the reactor's thread pool is sized to ``threads[0]`` and the
    queue bounded by ``threads[1]``.
    """
    with _queues_lock:
        queue = _queues.get(process)
        if queue is None:
            reactor.suggestThreadPoolSize(threads[0])
            queue = _queues[process] = KeyedQueue(reactor.getThreadPool(), reactor, threads[1])
        return queue


# -- the Lua side: stage.submit, thread.new, thread.signal ----------------------------------------

# Host callables answer (true, value) or (nil, message); this wrapper raises the message at the
# script's own line (level 2: the caller of the wrapper).
_RAISING = """
local error = error
return function(f)
    return function(...)
        local ok, v = f(...)
        if ok == nil then error(v, 2) end
        return v
    end
end
"""


class LuaJob:
    """A function and its arguments, moved by value into a worker thread's sandbox."""

    __slots__ = ("key", "payload", "sandboxes", "label", "thread")

    def __init__(
        self, key: Hashable, payload: bytes, sandboxes: Sandboxes, label: str, thread: ThreadHandle | None
    ) -> None:
        self.key = key
        self.payload = payload
        self.sandboxes = sandboxes
        self.label = label
        self.thread = thread

    def run(self) -> float | None:
        return self.sandboxes.run(self)

    def run_in(self, sandbox: Sandbox) -> float | None:
        """Run in ``sandbox`` (worker thread): the number ``f`` returns, or None."""
        vm = sandbox.vm
        try:
            f, *args = unpack_lua(vm, self.payload)
        except CodecError as err:
            sandbox.api.report(self.label.encode(), b"", lua_text(str(err)))
            return None
        sandbox.thread = self.thread
        try:
            ok, *results = vm.call(self.label, f, *args)
        finally:
            sandbox.thread = None
        if self.thread is not None:
            self.thread.finish(vm, results if ok else [])
            return None
        return next_delay(vm, sandbox.api.report, self.label, "job", f, results[0] if ok and results else None)


class ThreadHandle:
    """One ``thread.new``: its handler in the creating stage's runtime and the values coming back.

    Values are sent from the worker (``signal``, ``finish``) with ``callFromThread``, so they
    arrive in order; the handler is dropped once the thread has ended and all is delivered.
    """

    def __init__(self, stage: Stage, reactor: Reactor) -> None:
        self._stage = stage
        self._reactor = reactor
        self._handler: tuple[Any, tuple[Any, ...]] | None = None
        self.ended = False

    def waitfor(self, g: Any, *bound: Any) -> tuple[Any, ...]:
        """``obj.waitfor(g, u...)`` / ``obj.waitfor(nil)`` (reactor thread)."""
        vm = self._stage.vm
        assert vm is not None
        if g is None:
            self._handler = None
        elif vm.lua_type(g) != "function":
            return None, b"obj.waitfor: the handler must be a function (or nil)"
        elif not self.ended:
            self._handler = (g, bound)
        return (True,)

    def signal(self, vm: LuaVM, values: tuple[Any, ...]) -> None:
        """Send ``values`` from the worker thread; raises ``CodecError`` for what cannot move."""
        self._reactor.callFromThread(self._deliver, pack_lua(vm, values))

    def finish(self, vm: LuaVM, results: list[Any]) -> None:
        """The thread's function ended (worker thread): deliver its results, if any, then end."""
        if results:
            try:
                self.signal(vm, tuple(results))
            except CodecError as err:
                self._stage.log.error("thread.new: return values not delivered: {error}", error=str(err))
        self._reactor.callFromThread(self._end)

    def _deliver(self, payload: bytes) -> None:
        vm = self._stage.vm
        if self._handler is None or vm is None:
            return
        g, bound = self._handler
        vm.call("thread handler", g, *bound, *unpack_lua(vm, payload))

    def _end(self) -> None:
        self.ended = True
        self._handler = None


class Workers:
    """``stage.submit``, ``thread.new`` and ``thread.signal`` of one Lua stage, for all its runtimes."""

    def __init__(self, stage: Stage, reactor: Any) -> None:
        self._stage = stage
        self._reactor = reactor
        process = stage.context.process
        self.queue = process_queue(process, reactor, process.config.threads)
        self.sandboxes = Sandboxes(stage, reactor, self._extend)

    def install(self, vm: LuaVM, sandbox: Sandbox | None) -> None:
        """Add the APIs to ``vm``: the stage's main runtime (``sandbox`` None) or a sandbox."""
        wrap = vm.lua.execute(_RAISING)
        vm.extensions[b"submit"] = wrap(lambda key, f, *args: self.submit(vm, key, f, args))
        if sandbox is None:
            vm.thread_extensions[b"new"] = wrap(lambda f, *args: self.thread_new(vm, wrap, f, args))
            vm.thread_extensions[b"signal"] = wrap(lambda *values: (None, b"thread.signal: only inside thread.new"))
        else:
            vm.thread_extensions[b"new"] = wrap(
                lambda *_: (None, b"thread.new: only on the stage's own thread, not in a job")
            )
            vm.thread_extensions[b"signal"] = wrap(lambda *values: self.thread_signal(sandbox, values))

    def _extend(self, sandbox: Sandbox) -> None:
        self.install(sandbox.vm, sandbox)

    def submit(self, vm: LuaVM, key: Any, f: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """``stage.submit(key, f, args...)`` from any runtime of the stage."""
        if isinstance(key, bool) or not isinstance(key, (int, float, bytes)):
            return None, b"stage.submit: the key must be a number or a string"
        label = f"job of key {text(key)!r}" if isinstance(key, bytes) else f"job of key {key}"
        error = self._queue_job(vm, key, f, args, label, None, "stage.submit")
        return (True,) if error is None else (None, error)

    def thread_new(self, vm: LuaVM, wrap: Any, f: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """``thread.new(f, args...)`` from the stage's main runtime: the thread object."""
        handle = ThreadHandle(self._stage, self._reactor)
        error = self._queue_job(vm, 0, f, args, "thread.new", handle, "thread.new")
        if error is not None:
            return None, error
        return True, vm.lua.table_from({b"waitfor": wrap(handle.waitfor)})

    def thread_signal(self, sandbox: Sandbox, values: tuple[Any, ...]) -> tuple[Any, ...]:
        if sandbox.thread is None:
            return None, b"thread.signal: only inside a function started by thread.new"
        try:
            sandbox.thread.signal(sandbox.vm, values)
        except CodecError as err:
            return None, lua_text(f"thread.signal: {err}")
        return (True,)

    def _queue_job(
        self, vm: LuaVM, key: Hashable, f: Any, args: tuple[Any, ...], label: str, thread: ThreadHandle | None, api: str
    ) -> bytes | None:
        """Queue ``f(args...)``; the error message for Lua when it cannot be."""
        if vm.lua_type(f) != "function":
            return lua_text(f"{api}: the job must be a function")
        if self.sandboxes.stopping:
            return lua_text(f"{api}: the stage is stopping")
        try:
            payload = pack_lua(vm, (f, *args))
            self.queue.submit(LuaJob(key, payload, self.sandboxes, label, thread))
        except (CodecError, QueueFull) as err:
            return lua_text(f"{api}: {err}")
        return None


# The Workers of each stage runtime, keyed by its main LuaVM (a reload makes new ones); dropped
# when the stage stops (the Workers refer to the runtime, so a weak key alone would never go).
_workers: weakref.WeakKeyDictionary[Any, Workers] = weakref.WeakKeyDictionary()


def workers_of(main_vm: LuaVM) -> Workers | None:
    """The worker APIs of the stage whose main runtime is ``main_vm`` (for other extensions that
    queue jobs, e.g. ``broker.submit``); None before ``install`` ran."""
    return _workers.get(main_vm)


def install(stage: Stage) -> None:
    """The extension hook (``stagetx.lua.extensions``): the worker APIs of a Lua stage."""
    reactor: Any = stage.context.clock
    if not IReactorThreads.providedBy(reactor):  # a stage under a fake clock still gets real workers
        reactor = reactors.resolve()
    assert stage.vm is not None
    workers = Workers(stage, reactor)
    workers.install(stage.vm, None)
    vm = stage.vm
    _workers[vm] = workers
    stage.on_stop(lambda: _workers.pop(vm, None))
    stage.on_stop(workers.sandboxes.stop)
