"""The ``%budget`` watchdog (stagetx.lua.watchdog) on real Lua 5.4 runtimes: no hook while
callbacks keep their budget, a runaway callback or coroutine interrupted, the hook off again."""

from __future__ import annotations

import time
from typing import Any

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
    assert time.monotonic() - started < 2.0
    assert ok is False and b"budget of 100 ms exceeded" in error
    assert reports and b"budget of 100 ms exceeded" in reports[-1][-1]
    assert vm.guard is not None and not vm.guard.hooked()
    assert run(vm, "function(x) return x + 1 end", 41) == (True, 42)


def test_a_runaway_coroutine_is_interrupted_too() -> None:
    vm, _ = make_vm(budget_ms=100)
    ok, resumed, error = run(
        vm, "function() return coroutine.resume(coroutine.create(function() while true do end end)) end"
    )
    assert ok is True and resumed is False and b"budget of 100 ms exceeded" in error
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
