"""The ``%budget`` watchdog (stagetx.lua.watchdog) on real Lua 5.4 runtimes: no hook while
callbacks keep their budget, a runaway callback or coroutine interrupted, the hook off again."""

from __future__ import annotations

import time
from typing import Any

import pytest

from stagetx.lua.runtime import LuaVM

HOST_NAMES = (
    "send send_packed report schedule_drain log once load cancel addtask v_get v_set v_update"
    " process_get process_set thread_get"
)


def make_vm(kind: str = "lua", budget_ms: int = 100) -> tuple[LuaVM, list[tuple[Any, ...]]]:
    reports: list[tuple[Any, ...]] = []
    host: dict[str, Any] = {name: (lambda *args: None) for name in HOST_NAMES.split()}
    host["report"] = lambda *args: reports.append(args)
    host["now"] = time.monotonic
    vm = LuaVM(kind, host, budget_ms, None, {"server": "s", "process": 1, "stage": "a"}, watchdog=True)
    return vm, reports


def run(vm: LuaVM, source: str, *args: Any) -> tuple[Any, ...]:
    return vm.call("test", vm.lua.eval(source), *args)


def test_no_hook_runs_while_callbacks_keep_their_budget() -> None:
    vm, _ = make_vm()
    assert vm.guard is not None and not vm.guard.hooked()
    assert run(vm, "function() return debug.gethook() ~= nil end") == (True, False)  # inside a callback
    assert not vm.guard.hooked()


def test_a_runaway_callback_is_interrupted_and_the_runtime_serves_on_unhooked() -> None:
    vm, reports = make_vm(budget_ms=100)
    started = time.monotonic()
    ok, error = run(vm, "function() while true do end end")
    assert time.monotonic() - started < 10.0  # interrupted, not never: slack for a busy machine
    assert ok is False and b"budget of 100 ms exceeded" in error
    assert reports and b"budget of 100 ms exceeded" in reports[-1][-1]
    assert vm.guard is not None and not vm.guard.hooked()
    assert run(vm, "function(x) return x + 1 end", 41) == (True, 42)


def test_a_runaway_coroutine_is_interrupted_too() -> None:
    vm, _ = make_vm(budget_ms=100)
    ok, error = run(vm, "function() return coroutine.resume(coroutine.create(function() while true do end end)) end")
    assert ok is False and b"budget of 100 ms exceeded" in error  # resume cannot catch it either
    ok, error = run(vm, "function() coroutine.wrap(function() while true do end end)() end")
    assert ok is False and b"budget of 100 ms exceeded" in error
    ok, error = run(vm, "function() return coroutine.create(42) end")
    assert ok is False and b"bad argument #1 to 'create'" in error


def test_a_hook_armed_between_callbacks_does_not_interrupt_the_next_one() -> None:
    """The watchdog may arm just as a callback ends: the next callback, within its budget, runs
    to its end (the hook steps back to the plain count), and the hook is off after it."""
    vm, _ = make_vm(budget_ms=1000)
    assert vm.guard is not None
    vm.guard.arm()
    assert vm.guard.hooked()
    assert run(vm, "function() local x = 0 for i = 1, 300000 do x = x + i end return x end") == (True, 45000150000)
    assert not vm.guard.hooked()


def test_luajit_keeps_its_count_hook() -> None:
    vm, _ = make_vm("luajit")
    assert vm.guard is None
    assert run(vm, "function() return debug.gethook() ~= nil end") == (True, True)


CATCHING_LOOPS = {
    "pcall loop": "function() while true do pcall(function() while true do end end) end end",
    "retry loop": """function()
        local function long() local x = 0 for i = 1, 1e12 do x = x + i end end
        local ok repeat ok = pcall(long) until ok
    end""",
    "xpcall loop": "function() while true do xpcall(function() while true do end end, tostring) end end",
    # Lua runs the handler of an error raised in a hook with hooks off: this one (30 s unless
    # stopped) ran in full when the budget's error reached it
    "xpcall handler loop": """function()
        xpcall(error, function() local t = os.clock() + 30 while os.clock() < t do end end)
    end""",
    "resume loop": """function()
        while true do coroutine.resume(coroutine.create(function() while true do end end)) end
    end""",
}


@pytest.mark.parametrize("loop", sorted(CATCHING_LOOPS))
def test_a_callback_cannot_catch_its_budget(loop: str) -> None:
    vm, reports = make_vm(budget_ms=100)
    started = time.monotonic()
    ok, error = run(vm, CATCHING_LOOPS[loop])
    assert time.monotonic() - started < 10.0  # interrupted, not never: slack for a busy machine
    assert ok is False and b"budget of 100 ms exceeded" in error
    assert reports and b"budget of 100 ms exceeded" in reports[-1][-1]
    # the next callback has a budget of its own and may catch its own errors again
    assert run(vm, "function() return pcall(error, 'mine') end") == (True, False, b"mine")


# Loops that run 5 s unless interrupted, after a script tried to clear the hooks.
UNHOOKED_LOOPS = {
    "main thread": "function() pcall(debug.sethook) local t = os.clock() + 5 while os.clock() < t do end end",
    "coroutine": """function()
        coroutine.wrap(function() pcall(debug.sethook) local t = os.clock() + 5 while os.clock() < t do end end)()
    end""",
}


@pytest.mark.parametrize("loop", sorted(UNHOOKED_LOOPS))
def test_scripts_cannot_take_the_budget_hook_away(loop: str) -> None:
    """A bare ``debug.sethook()`` cleared the budget hook: any loop after it held the thread for
    ever. Scripts may read the hooks, not set them (LuaJIT too, whose compiled loops the hook
    does not reach anyway)."""
    for kind in ("lua", "luajit"):
        ok, error = run(make_vm(kind)[0], "function() debug.sethook() end")
        assert ok is False and b"debug.sethook: the hooks belong to the stage (its %budget)" in error
    vm, _ = make_vm(budget_ms=100)
    ok, error = run(vm, UNHOOKED_LOOPS[loop])
    assert ok is False and b"budget of 100 ms exceeded" in error
    assert run(vm, "function(x) return x + 1 end", 41) == (True, 42)


def test_finalizers_run_in_callbacks_under_the_budget() -> None:
    """Lua runs ``__gc`` with hooks off; the prelude queues the object and runs the finalizer at
    the end of the callback, where the budget interrupts a slow one."""
    vm, reports = make_vm(budget_ms=100)
    run(
        vm,
        """function()
            finalized = {}
            local mt = {__gc = function(o) finalized[#finalized + 1] = o.name end}
            setmetatable({name = "quick"}, mt)
            setmetatable({name = "slow"}, {__gc = function() while true do end end})
        end""",
    )
    started = time.monotonic()
    assert run(vm, "function() collectgarbage() collectgarbage() return #finalized end") == (True, 0)
    assert time.monotonic() - started < 10.0  # interrupted, not never: slack for a busy machine
    assert reports and reports[-1][0] == b"finalizer" and b"budget of 100 ms exceeded" in reports[-1][-1]
    vm.drain()  # the turn the prelude scheduled for the finalizers still queued
    assert run(vm, "function() return finalized[1] end") == (True, b"quick")


def test_a_finalizer_set_by_debug_setmetatable_runs_under_the_budget_too() -> None:
    """debug.setmetatable kept the finalizer as given: Lua ran it in the collection, out of the
    budget's reach (this one 30 s; one that never returns held the thread for ever)."""
    vm, reports = make_vm(budget_ms=100)
    started = time.monotonic()
    slow = "function() local t = os.clock() + 30 while os.clock() < t do end end"
    assert run(vm, f"function() debug.setmetatable({{}}, {{__gc = {slow}}}) collectgarbage() collectgarbage() end") == (
        True,
    )
    assert time.monotonic() - started < 10.0  # interrupted, not after 30 s: slack for a busy machine
    assert reports[-1][0] == b"finalizer" and b"budget of 100 ms exceeded" in reports[-1][-1]
    assert run(vm, "function() return debug.setmetatable(1, nil), getmetatable(debug.setmetatable({}, {})) end")[0]


def test_a_callable_table_as_finalizer_runs_under_the_budget_too() -> None:
    """Lua calls a ``__gc`` that is a table with ``__call`` as it calls a function: only functions
    were queued, so such a finalizer ran in the collection, out of the budget's reach."""
    vm, reports = make_vm(budget_ms=100)
    slow = "setmetatable({}, {__call = function() local t = os.clock() + 30 while os.clock() < t do end end})"
    started = time.monotonic()
    assert run(vm, f"function() setmetatable({{}}, {{__gc = {slow}}}) collectgarbage() collectgarbage() end") == (True,)
    assert time.monotonic() - started < 10.0  # interrupted, not after 30 s: slack for a busy machine
    assert reports[-1][0] == b"finalizer" and b"budget of 100 ms exceeded" in reports[-1][-1]


def test_finalizers_interrupted_anywhere_keep_their_queue() -> None:
    """The budget may stop the finalizer queue between two finalizers as well as inside one: the
    queue went on from its start then, calling the finalizers already run (``attempt to call a nil
    value``, once per slot, every callback after) and never reaching the rest. Now each
    interruption costs at most the finalizer it stopped; later turns run the others."""
    vm, reports = make_vm(budget_ms=50)
    run(vm, "function() done, keep = 0, {} mt = {__gc = function() done = done + 1 for j = 1, 100 do end end} end")
    for _ in range(1000):  # 300,000 objects to finalize, a few µs each: many budgets' worth
        ok, made = run(vm, "function() for i = 1, 2000 do keep[#keep + 1] = setmetatable({}, mt) end return #keep end")
        if ok and made >= 300000:  # (a chunk a busy machine stopped at the budget is made again)
            break
    reports.clear()
    run(vm, "function() keep = nil collectgarbage() end")
    for _ in range(400):  # each drain: a turn of its own for what waits
        if run(vm, "function() return done end") == (True, made):
            break
        vm.drain()
    ok, done = run(vm, "function() return done end")
    assert reports and all(b"budget of 50 ms exceeded" in report[-1] for report in reports)
    assert made - len(reports) <= done <= made


def test_patterns_too_complex_for_their_subject_are_refused_at_the_scripts_line() -> None:
    """Pattern matching runs in C, out of the budget's reach: a call whose backtracking could hold
    the thread is refused (patterns.lua) before it starts; ordinary patterns are not."""
    vm, _ = make_vm(budget_ms=1000)
    started = time.monotonic()
    ok, error = run(vm, "function() local i = string.find(string.rep('a', 200), '.-.-.-.-b') return i end")
    assert time.monotonic() - started < 10.0  # refused at once, not after 25 s: slack for a busy machine
    assert ok is False and b'pattern ".-.-.-.-b" is too complex for a subject of 200 bytes' in error
    assert error.startswith(b'[string "<python>"]:1:')  # the script's line
    for call in ("s:match('.-.-.-b')", "s:gsub('.-.-.-b', 'x')", "s:gmatch('(.-)(.-)(.-)b')()"):
        ok, error = run(vm, f"function() local s = string.rep('a', 200) return {call} end")
        assert ok is False and b"too complex" in error, call
    ordinary = {
        "('key = value'):match('^(%w+)%s*=%s*(%w+)$')": (True, b"key", b"value"),
        "(string.rep(' ', 300) .. 'x' .. string.rep(' ', 300)):match('^%s*(.-)%s*$')": (True, b"x"),
        "string.rep('a', 5000):find('b')": (True, None),
        "string.rep('a', 200):find('.-.-.-.-b', 1, true)": (True, None),
        "(string.rep('ab,', 300)):gsub('(%w+),', '%1;'):sub(1, 6)": (True, b"ab;ab;"),
    }
    for call, expected in ordinary.items():
        assert run(vm, f"function() return {call} end") == expected, call


def test_an_error_is_reported_with_its_first_4096_bytes() -> None:
    """A script may raise a whole payload: each such error logged megabytes and kept them among
    the stage's last errors."""
    vm, reports = make_vm()
    ok, error = run(vm, "function() error(string.rep('x', 10000000)) end")
    assert ok is False
    text = reports[-1][-1]
    assert text.startswith(b'[string "<python>"]:1: ' + b"x" * 100)
    assert b"... (10000023 bytes in all)\nstack traceback:" in text and len(text) < 8192
    ok, error = run(vm, "function() error({}) end")
    assert ok is False and reports[-1][-1].startswith(b"table: 0x")


def test_an_error_values_tostring_meets_the_budget() -> None:
    """The error's text is made by its ``__tostring``, the script's code: made after the deadline
    was lifted, one that never returned held the process's thread for ever."""
    vm, reports = make_vm(budget_ms=100)
    loop = "function() local t = os.clock() + 5 while os.clock() < t do end return 'late' end"  # 5 s unless stopped
    ok, error = run(vm, f"function() error(setmetatable({{}}, {{__tostring = {loop}}})) end")
    assert ok is False and b"budget of 100 ms exceeded" in error
    assert b"budget of 100 ms exceeded" in reports[-1][-1]
    assert run(vm, "function(x) return x + 1 end", 41) == (True, 42)


def test_a_close_method_run_by_an_error_meets_the_budget() -> None:
    """A ``<close>`` variable's ``__close`` runs as an error unwinds the callback: after the entry's
    handler had lifted the deadline, out of the budget's reach (this one 30 s, one that never
    returns for ever)."""
    vm, reports = make_vm(budget_ms=100)
    slow = "function() local t = os.clock() + 30 while os.clock() < t do end end"
    started = time.monotonic()
    ok, error = run(vm, f"function() local x <close> = setmetatable({{}}, {{__close = {slow}}}) error('first') end")
    assert time.monotonic() - started < 10.0  # interrupted, not after 30 s: slack for a busy machine
    assert ok is False and b"budget of 100 ms exceeded" in error
    assert run(vm, "function() local x <close> = setmetatable({}, {__close = function() end}) return 1 end") == (
        True,
        1,
    )


@pytest.mark.parametrize("kind", ["lua", "luajit"])
def test_the_empty_string_repeated_is_empty_at_once(kind: str) -> None:
    """Lua's string.rep copies the empty string n times, in C out of the budget's reach: 3e9 took
    7 s against a budget of 100 ms (and 1e15, days); no memory limit bounds an empty result."""
    vm, _ = make_vm(kind, budget_ms=100)
    started = time.monotonic()
    assert run(vm, "function() return string.rep('', 3e9), ('').rep('', 1e15, '') end") == (True, b"", b"")
    assert time.monotonic() - started < 5.0  # at once, not after 7 s: slack for a busy machine
    assert run(vm, "function() return string.rep('ab', 3, ','), string.rep(5, 2), string.rep('', 0) end") == (
        True,
        b"ab,ab,ab",
        b"55",
        b"",
    )
    if kind == "lua":
        ok, error = run(vm, "function() local s = string.rep('', 1.5) return s end")
        assert ok is False and error.startswith(b"[string \"<python>\"]:1: bad argument #2 to 'rep'")


def test_a_long_table_move_meets_the_budget() -> None:
    """table.move loops in C over its range, which no memory bounds when it holds nothing:
    ``table.move({}, 1, 1e9, 1, {})`` held the thread 17 s against a budget of 100 ms (1e12:
    hours). A long range moves in chunks, the budget met between them, in Lua's order."""
    vm, reports = make_vm(budget_ms=100)
    started = time.monotonic()
    ok, error = run(vm, "function() table.move({}, 1, 1e9, 1, {}) end")
    assert time.monotonic() - started < 8.0  # interrupted, not after 17 s: slack for a busy machine
    assert ok is False and b"budget of 100 ms exceeded" in error
    same = """function(n, f, e, t)
        local a, b = {}, {}
        for i = 1, n do a[i], b[i] = i, i end
        table.move(a, f, e, t)
        if t > e or t <= f then  -- Lua's order, by hand
            for i = 0, e - f do b[t + i] = b[f + i] end
        else
            for i = e - f, 0, -1 do b[t + i] = b[f + i] end
        end
        for i = 1, n + t do if a[i] ~= b[i] then return i end end
        return 0
    end"""
    vm, _ = make_vm(budget_ms=60000)  # the comparison's own loops: a budget a busy machine meets
    for f, e, t in ((1, 150000, 20), (20, 180000, 1), (1, 140000, 70000), (70000, 140000, 1), (5, 100000, 150001)):
        assert run(vm, same, 200000, f, e, t) == (True, 0), (f, e, t)
    ok, error = run(vm, "function() local r = table.move({}, 1.5, 1e6, 1) return r end")
    assert ok is False and error.startswith(b"[string \"<python>\"]:1: bad argument #2 to 'move'")
