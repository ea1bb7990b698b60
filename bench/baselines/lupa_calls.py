"""Plain lupa: the cost of one Python↔Lua crossing, and whether Lua threads run in parallel.

In-process and single-purpose: stagetx's per-message cost is bounded below by the crossings
it makes, and ``stage.submit``'s speed-up by what two bare Lua threads achieve.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import lupa.lua54

from bench import budget
from bench.rows import row

PY_TO_LUA = "lupa calls Python → Lua"
LUA_TO_PY = "lupa calls Lua → Python"
THREADS = "Lua CPU-bound, 2 threads vs 1"

_SPIN = "function(n) local x = 0 for i = 1, n do x = (x + i * 7) % 1000003 end return x end"


def py_to_lua(n: int, limit: float) -> float:
    """Calls/s of a trivial Lua function from Python (in rounds of 10,000 until ``n`` or ``limit``)."""
    f = lupa.lua54.LuaRuntime(encoding=None).eval("function(x) return x end")
    done, start = 0, time.perf_counter()
    while done < n and time.perf_counter() - start < limit:
        for i in range(10_000):
            f(i)
        done += 10_000
    return done / (time.perf_counter() - start)


def lua_to_py(n: int) -> float:
    """Calls/s of a trivial Python function from a Lua loop."""
    loop = lupa.lua54.LuaRuntime(encoding=None).eval("function(f, n) for i = 1, n do f(i) end end")
    start = time.perf_counter()
    loop(lambda x: x, n)
    return n / (time.perf_counter() - start)


def thread_speedup(n: int) -> float:
    """Time of two CPU-bound Lua jobs one after the other / the same two in two threads."""
    spins = [lupa.lua54.LuaRuntime(encoding=None).eval(_SPIN) for _ in range(2)]
    spins[0](1000)
    start = time.perf_counter()
    spins[0](n)
    spins[0](n)
    serial = time.perf_counter() - start
    threads = [threading.Thread(target=spin, args=(n,)) for spin in spins]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return serial / (time.perf_counter() - start)


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows: calls/s each way and the two-thread speed-up."""
    n_spin = budget.count(60_000_000, 8_000_000)  # quick: the size of the submit row's jobs
    return [
        row(PY_TO_LUA, py_to_lua(budget.count(5_000_000, 1_000_000), budget.seconds(5, 2)), "calls/s"),
        row(LUA_TO_PY, lua_to_py(budget.count(5_000_000, 1_000_000)), "calls/s"),
        row(THREADS, statistics.median(thread_speedup(n_spin) for _ in range(3)), "x", note="median of 3"),
    ]
