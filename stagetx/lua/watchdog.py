"""The ``%budget`` watchdog of a stage's Lua 5.4 runtime, without a count hook while callbacks
keep their budget.

With a count hook set, Lua 5.4 takes its trap path on every VM instruction whatever the count
(``luaG_traceexec`` in ldebug.c): about 14 % of the instructions of a Lua stage that signals and
receives replies. So the prelude's hook stays registered (``debug.sethook``) but switched off on
the runtime's main thread, and one daemon thread per process looks at the callbacks running now
every ``POLL`` seconds; a callback past its budget gets the hook switched on (count 1) with
``lua_sethook``, which Lua makes safe to call asynchronously (it is how a signal handler stops a
running state). The hook raises the budget error as before, and the runtime switches the hook off
again on its own thread once the callback has returned. lupa releases the GIL while Lua runs, so
the watchdog thread gets to run beside a runaway loop.

Coroutines made by the stage's scripts keep a count hook of their own (the prelude sets it when one
starts): the watchdog cannot tell which coroutine runs.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from typing import Any

import lupa.lua54

#: Seconds between the watchdog's looks at the running callbacks (a runaway callback is
#: interrupted at most this long after its budget ran out).
POLL = 0.02
#: In a gap of more than this many seconds between two of the watchdog's looks, the time the
#: process did not run (SIGSTOP and SIGCONT, a suspended VM, a starved machine: the gap less the
#: process's CPU time in it) is not counted against the callback running then, which would
#: otherwise be interrupted, or its runtime rebuilt, for a pause it did not make.
PAUSE = 0.25
_LUA_MASKCOUNT = 1 << 3


def _lua_api() -> tuple[Any, Any, Any] | None:
    """``lua_sethook``, ``lua_gethook``, ``lua_gethookmask`` of the Lua 5.4 that lupa links in
    (already loaded), or None when this lupa build does not export them."""
    try:
        lua = ctypes.CDLL(lupa.lua54.__file__)
        sethook, gethook, gethookmask = lua.lua_sethook, lua.lua_gethook, lua.lua_gethookmask
    except (OSError, AttributeError):
        return None
    sethook.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    sethook.restype = None
    gethook.argtypes = [ctypes.c_void_p]
    gethook.restype = ctypes.c_void_p
    gethookmask.argtypes = [ctypes.c_void_p]
    gethookmask.restype = ctypes.c_int
    return sethook, gethook, gethookmask


_api = _lua_api()
#: Whether runtimes can be watched; without it they keep the plain count hook.
AVAILABLE = _api is not None
_sethook: Any
_gethook: Any
_gethookmask: Any
_sethook, _gethook, _gethookmask = _api or (None, None, None)


class Guard:
    """The main thread of one Lua 5.4 runtime under the watchdog.

    ``state`` is the address of the runtime's main ``lua_State`` and must hold the prelude's count
    hook when the guard is made; the guard switches it off. ``entered`` is the start time
    (``time.monotonic``) of the callback running now, None between callbacks: the runtime sets
    it around each outermost entry (``enter``), which is all a callback costs here.
    """

    def __init__(self, state: int, budget: float) -> None:
        self.state = state
        self.budget = budget
        self.entered: float | None = None
        self.paused_before = 0.0  # the process's paused seconds (``paused()``) when it was entered
        self.armed = False  # the hook is on, or being switched on: always with the hook's state
        self._switch = threading.Lock()
        self._hook = _gethook(state)
        if not self._hook or not _gethookmask(state) & _LUA_MASKCOUNT:
            raise RuntimeError("the runtime's budget hook is not set")
        _sethook(state, None, 0, 0)
        _watchdog().guards.add(self)

    def enter(self, started: float) -> None:
        """A callback starts (at ``started``)."""
        self.paused_before = paused()
        self.entered = started

    def ran(self, entered: float, now: float) -> float:
        """Seconds the callback entered at ``entered`` has run by ``now``, the process's pauses
        left out (``entered`` read once by the caller: the runtime may clear it meanwhile)."""
        return now - entered - (paused() - self.paused_before)

    def leave(self) -> float | None:
        """The callback returned: the seconds it ran (``ran``) if the hook was switched on for it,
        which is then switched off, else None (no clock read on the common path)."""
        entered, self.entered = self.entered, None  # first: the watchdog arms no callback after this
        if not self.armed or entered is None:
            return None
        self.disarm()
        return self.ran(entered, time.monotonic())

    def hooked(self) -> bool:
        """Whether the hook is on now (for tests: it must be off between callbacks)."""
        return bool(_gethookmask(self.state))

    def arm(self) -> None:
        """Switch the hook on: the running callback meets it at its next instruction."""
        with self._switch:
            self.armed = True
            _sethook(self.state, self._hook, _LUA_MASKCOUNT, 1)

    def disarm(self) -> None:
        """Switch the hook off again (on the runtime's own thread, no callback running)."""
        with self._switch:
            self.armed = False
            _sethook(self.state, None, 0, 0)

    def close(self) -> None:
        """Stop watching (before the runtime goes away)."""
        _watchdog().guards.discard(self)


class _Watchdog(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="stagetx-lua-budget", daemon=True)
        self.guards: weakref.WeakSet[Guard] = weakref.WeakSet()
        self.paused = 0.0  # seconds the process did not run (``PAUSE``), since the watchdog started

    def run(self) -> None:
        last, last_cpu = time.monotonic(), time.process_time()
        while True:
            time.sleep(POLL)
            now, cpu = time.monotonic(), time.process_time()
            if now - last > PAUSE:
                # what the process did not spend running: a callback in a C call that holds the
                # GIL (this thread could not look meanwhile) is busy all along and pays in full
                self.paused += max(0.0, now - last - POLL - (cpu - last_cpu))
            last, last_cpu = now, cpu
            for guard in list(self.guards):
                entered = guard.entered
                if entered is not None and not guard.armed and guard.ran(entered, now) > guard.budget:
                    guard.arm()


_lock = threading.Lock()
_running: _Watchdog | None = None


def paused() -> float:
    """Seconds this process has not run since the watchdog started (``PAUSE``)."""
    return _running.paused if _running is not None else 0.0


def _watchdog() -> _Watchdog:
    global _running
    with _lock:
        if _running is None:
            _running = _Watchdog()
            _running.start()
        return _running
