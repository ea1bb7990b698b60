"""stage.proxy, run as real Lua in both VMs through lupa."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import lupa.lua54
import lupa.luajit21
import pytest

PROXY_LUA = (Path(__file__).resolve().parents[2] / "stagetx" / "lua" / "proxy.lua").read_bytes()

# `log` collects watcher calls; `rec(name [, result])` makes a watcher that records
# {name, second argument (old value or crossed list), key, new value, proxy} and returns `result`.
HELPERS = b"""
log = {}
function rec(name, result)
    return function(p, arg, k, v)
        log[#log + 1] = {name = name, arg = arg, key = k, new = v, proxy = p}
        return result
    end
end
"""


@pytest.fixture(params=[lupa.lua54, lupa.luajit21], ids=["lua54", "luajit21"])
def lua(request: pytest.FixtureRequest) -> Any:
    """A fresh runtime with `proxy` loaded from the module file and the test helpers."""
    vm: ModuleType = request.param
    runtime = vm.LuaRuntime(encoding=None)
    runtime.globals().proxy = runtime.eval(b"load")(PROXY_LUA, b"@proxy.lua", b"t")()
    runtime.execute(HELPERS)
    return runtime


def run(lua: Any, source: str) -> Any:
    """Runs `source` as the chunk `watchers.lua` (so error locations can be checked)."""
    chunk = lua.eval(b"load")(source.encode(), b"@watchers.lua", b"t")
    assert not isinstance(chunk, tuple), chunk  # (nil, syntax error)
    return chunk()


def to_py(value: Any) -> Any:
    """Lua tables → lists (keys 1..n, or empty) or dicts; Lua strings → str."""
    if isinstance(value, bytes):
        return value.decode()
    if lupa.lua54.lua_type(value) == "table" or lupa.luajit21.lua_type(value) == "table":
        items = {to_py(k): to_py(v) for k, v in value.items()}
        if list(items) == list(range(1, len(items) + 1)):
            return list(items.values())
        return items
    return value


def calls(lua: Any) -> list[tuple[Any, ...]]:
    """The recorded watcher calls as (name, arg, key, new)."""
    return [
        (to_py(c[b"name"]), to_py(c[b"arg"]), to_py(c[b"key"]), to_py(c[b"new"])) for c in lua.globals().log.values()
    ]


F12 = "{10, 20, rec'F1', 30, 40, rec'F2'}"

# (id, t2, t1, statements using proxy `p`, expected calls, expected t1 afterwards)
CASES = [
    (
        "spec-example",
        f"{{A = {F12}}}",
        "{A = 12}",
        "p.A = 34",
        [("F1", [20], "A", 34), ("F2", [30], "A", 34)],
        {"A": 34},
    ),
    (
        "absent-old-crosses-all-below",
        f"{{A = {F12}}}",
        "{}",
        "p.A = 34",
        [("F1", [10, 20], "A", 34), ("F2", [30], "A", 34)],
        {"A": 34},
    ),
    ("downwards-crosses-nothing", f"{{A = {F12}}}", "{A = 34}", "p.A = 12", [], {"A": 12}),
    (
        "several-at-once",
        "{A = {10, 20, 30, rec'F'}}",
        "{A = 0}",
        "p.A = 100",
        [("F", [10, 20, 30], "A", 100)],
        {"A": 100},
    ),
    ("reaching-threshold-crosses", "{A = {20, rec'F'}}", "{A = 19}", "p.A = 20", [("F", [20], "A", 20)], {"A": 20}),
    ("leaving-threshold-does-not", "{A = {20, rec'F'}}", "{A = 20}", "p.A = 25", [], {"A": 25}),
    ("group-boundary", "{A = {10, rec'F1', 20, rec'F2'}}", "{A = 5}", "p.A = 15", [("F1", [10], "A", 15)], {"A": 15}),
    (
        "only-later-group",
        "{A = {10, rec'F1', 20, rec'F2'}}",
        "{A = 15}",
        "p.A = 25",
        [("F2", [20], "A", 25)],
        {"A": 25},
    ),
    (
        "first-position-every-time",
        "{A = {rec'F0', 10, rec'F1'}}",
        "{A = 5}",
        "p.A = 5; p.A = 12",
        [("F0", [], "A", 5), ("F0", [], "A", 12), ("F1", [10], "A", 12)],
        {"A": 12},
    ),
    ("empty-later-group-never", "{A = {10, rec'F1', rec'F2'}}", "{}", "p.A = 50", [("F1", [10], "A", 50)], {"A": 50}),
    ("equal-value-crosses-nothing", "{A = {20, rec'F'}}", "{A = 20}", "p.A = 20", [], {"A": 20}),
    (
        "equal-value-runs-plain-watcher",
        "{A = rec'F'}",
        "{A = 20}",
        "p.A = 20; p.A = 20",
        [("F", 20, "A", 20), ("F", 20, "A", 20)],
        {"A": 20},
    ),
    (
        "plain-watcher-gets-old",
        "{A = rec'F'}",
        "{A = 1}",
        "p.A = 2; p.A = nil",
        [("F", 1, "A", 2), ("F", 2, "A", None)],
        {},
    ),
    (
        "integer-and-float",
        "{A = {10, 20.5, 30, rec'F'}}",
        "{A = 10.5}",
        "p.A = 30.0",
        [("F", [20.5, 30], "A", 30)],
        {"A": 30},
    ),
    (
        "old-of-other-type-counts-absent",
        "{A = {10, 20, rec'F'}}",
        "{A = 'x'}",
        "p.A = 15",
        [("F", [10], "A", 15)],
        {"A": 15},
    ),
    ("nil-new-value", "{A = {rec'F0', 10, rec'F1'}}", "{A = 50}", "p.A = nil", [("F0", [], "A", None)], {}),
    (
        "string-threshold",
        "{A = {'gold', rec'F'}}",
        "{A = 'silver'}",
        "p.A = 'gold'; p.A = 'gold'; p.A = 'iron'",
        [("F", ["gold"], "A", "gold")],
        {"A": "iron"},
    ),
    (
        "string-threshold-from-absent",
        "{A = {'gold', 'iron', rec'F'}}",
        "{}",
        "p.A = 'gold'",
        [("F", ["gold"], "A", "gold")],
        {"A": "gold"},
    ),
    (
        "boolean-thresholds",
        "{A = {true, rec'T', false, rec'N'}}",
        "{}",
        "p.A = true; p.A = true; p.A = false; p.A = false",
        [("T", [True], "A", True), ("N", [False], "A", False)],
        {"A": False},
    ),
    ("mixed-types-number", "{A = {10, '10', true, rec'F'}}", "{}", "p.A = 10", [("F", [10], "A", 10)], {"A": 10}),
    (
        "mixed-types-string",
        "{A = {10, '10', true, rec'F'}}",
        "{}",
        "p.A = '10'",
        [("F", ["10"], "A", "10")],
        {"A": "10"},
    ),
    (
        "mixed-types-boolean",
        "{A = {10, '10', true, rec'F'}}",
        "{A = 5}",
        "p.A = true",
        [("F", [True], "A", True)],
        {"A": True},
    ),
    (
        "star-for-string-keys",
        "{A = rec'A', ['*'] = rec'S'}",
        "{}",
        "p.A = 1; p.B = 2; p[3] = 3",
        [("A", None, "A", 1), ("S", None, "B", 2)],
        {"A": 1, "B": 2, 3: 3},
    ),
    (
        "hash-for-numeric-keys",
        "{['#'] = rec'N'}",
        "{}",
        "p[1] = 'a'; p[1.5] = 'b'; p.x = 'c'",
        [("N", None, 1, "a"), ("N", None, 1.5, "b")],
        {1: "a", 1.5: "b", "x": "c"},
    ),
    (
        "empty-string-for-the-rest",
        "{['*'] = rec'S', [''] = rec'E'}",
        "{}",
        "p.a = 1; p[2] = 2; p[true] = 3",
        [("S", None, "a", 1), ("E", None, 2, 2), ("E", None, True, 3)],
        {"a": 1, 2: 2, True: 3},
    ),
    (
        "function-t2-watches-all",
        "rec'G'",
        "{}",
        "p.a = 1; p[2] = 2",
        [("G", None, "a", 1), ("G", None, 2, 2)],
        {"a": 1, 2: 2},
    ),
    ("fallback-with-thresholds", "{['#'] = {5, rec'F'}}", "{}", "p[1] = 7; p[2] = 3", [("F", [5], 1, 7)], [7, 3]),
    (
        "false-entry-means-unwatched",
        "{A = false, [''] = rec'E'}",
        "{}",
        "p.A = 1; p.B = 2",
        [("E", None, "B", 2)],
        {"A": 1, "B": 2},
    ),
    ("plain-veto", "{A = rec('F', false)}", "{A = 1}", "p.A = 2", [("F", 1, "A", 2)], {"A": 1}),
    (
        "nil-or-true-result-stores",
        "{A = rec('F', true), B = rec'G'}",
        "{}",
        "p.A = 1; p.B = 2",
        [("F", None, "A", 1), ("G", None, "B", 2)],
        {"A": 1, "B": 2},
    ),
    (
        "veto-stops-later-groups",
        "{A = {10, rec('F1', false), 20, rec'F2'}}",
        "{A = 0}",
        "p.A = 30",
        [("F1", [10], "A", 30)],
        {"A": 0},
    ),
    ("veto-by-first-position", "{A = {rec('F0', false), 10, rec'F1'}}", "{}", "p.A = 30", [("F0", [], "A", 30)], {}),
]


@pytest.mark.parametrize(
    ("t2", "t1", "statements", "expected", "after"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_watcher_rules(lua: Any, t2: str, t1: str, statements: str, expected: list[Any], after: Any) -> None:
    t1_table = run(lua, f"t1 = {t1}; p = proxy(t1, {t2}); {statements}; return t1")
    assert calls(lua) == expected
    assert (to_py(t1_table) or {}) == (after or {})


def test_watchers_receive_the_proxy_and_proxy_stays_empty(lua: Any) -> None:
    same, empty = run(
        lua,
        "p = proxy({}, {A = rec'F'}); p.A = 1; p.A = 1 return log[1].proxy == p and log[2].proxy == p, next(p) == nil",
    )
    assert (same, empty) == (True, True)


def test_writes_from_a_watcher_run_no_watchers(lua: Any) -> None:
    t1 = run(
        lua,
        """
        t1 = {}
        p = proxy(t1, {
            A = function(p, old, k, v) rec'A'(p, old, k, v); p.B = v * 10; p.A = v + 1 end,
            B = rec'B',
        })
        p.A = 1
        p.B = 5
        return t1
        """,
    )
    # The watcher's own write to A is overwritten by the assignment it watched.
    assert calls(lua) == [("A", None, "A", 1), ("B", 10, "B", 5)]
    assert to_py(t1) == {"A": 1, "B": 5}


def test_watcher_may_replace_the_value_by_vetoing(lua: Any) -> None:
    hp = run(
        lua,
        """
        t1 = {}
        p = proxy(t1, {hp = function(p, old, k, v) if v > 100 then p[k] = 100 return false end end})
        p.hp = 250
        return t1.hp
        """,
    )
    assert hp == 100


def test_watchers_of_another_proxy_still_run(lua: Any) -> None:
    run(
        lua,
        """
        local level = proxy({}, {lv = rec'LV'})
        local exp = proxy({}, {xp = {100, function(p, crossed, k, v) level.lv = #crossed end}})
        exp.xp = 150
        """,
    )
    assert calls(lua) == [("LV", None, "lv", 1)]


def test_proxy_over_a_proxy_chains_watchers(lua: Any) -> None:
    run(lua, "local inner = proxy({}, {A = rec'in'}); local outer = proxy(inner, {A = rec'out'}) outer.A = 1")
    assert calls(lua) == [("out", None, "A", 1), ("in", None, "A", 1)]


ERROR_CASES = [
    ("error-call", "error('boom')", "watchers.lua:3: boom"),
    ("error-level-0", "error('boom', 0)", "watchers.lua:3: boom"),
    ("runtime-error", "local x = nil; return x + 1", "watchers.lua:3: attempt to perform"),
    ("c-function-error", "local s = string.rep()", "watchers.lua:3: bad argument #1 to"),
]


@pytest.mark.parametrize(("body", "prefix"), [pytest.param(*c[1:], id=c[0]) for c in ERROR_CASES])
@pytest.mark.parametrize("form", ["plain", "group"])
def test_watcher_error_is_raised_at_the_assignment_with_its_location(
    lua: Any, body: str, prefix: str, form: str
) -> None:
    wrap = "{1, %s}" if form == "group" else "%s"
    ok, msg, stored, again = run(
        lua,
        "local t1 = {}\n"
        "local w = function()\n"
        f"    {body}\n"
        "end\n"
        f"p = proxy(t1, {{A = {wrap % 'w'}, B = rec'B'}})\n"
        "local ok, msg = pcall(function() p.A = 5 end)\n"
        "p.B = 1\n"
        "return ok, msg, t1.A, #log\n",
    )
    assert ok is False
    assert msg.decode().startswith(prefix), msg
    assert stored is None  # the failed assignment stored nothing
    assert again == 1  # watchers run again after the error


def test_error_objects_pass_unchanged(lua: Any) -> None:
    same = run(
        lua,
        "local e = {code = 7}; local p = proxy({}, {A = function() error(e) end})"
        " local ok, got = pcall(function() p.A = 1 end) return got == e",
    )
    assert same is True


def test_reads_see_t1(lua: Any) -> None:
    got = run(
        lua,
        "local t1 = {1, 2, 3, x = 'a'}; local p = proxy(t1, {x = rec'X'})"
        " t1.y = 'late'; p[4] = 4"
        " return p.x, p.y, p[4], p()[4], rawget(p, 4)",
    )
    assert got == (b"a", b"late", 4, 4, None)


def test_len_pairs_ipairs_through_call_in_both_vms(lua: Any) -> None:
    got = run(
        lua,
        """
        local t1 = {10, 20, 30, x = 1}
        local p = proxy(t1, {})
        local n, m = 0, 0
        for _ in pairs(p()) do n = n + 1 end
        for _, v in ipairs(p()) do m = m + v end
        return #p(), n, m
        """,
    )
    assert got == (3, 4, 60)


def test_len_pairs_ipairs_on_the_proxy_under_lua54() -> None:
    runtime = lupa.lua54.LuaRuntime(encoding=None)
    runtime.globals().proxy = runtime.eval(b"load")(PROXY_LUA, b"@proxy.lua", b"t")()
    got = runtime.execute(
        b"""
        local p = proxy({10, 20, 30, x = 1}, {})
        local keys, sum = {}, 0
        for k in pairs(p) do keys[#keys + 1] = tostring(k) end
        for _, v in ipairs(p) do sum = sum + v end
        table.sort(keys)
        return #p, table.concat(keys, ","), sum
        """
    )
    assert got == (3, b"1,2,3,x", 60)


def test_call_forms(lua: Any) -> None:
    got = run(
        lua,
        """
        local t1 = {}
        local seen
        local p = proxy(t1, {A = rec'A'})
        local r1 = p(function(q) seen = q; q.A = 1 end)
        local seen3
        local r3 = proxy(t1, {B = rec'B'}, function(q) seen3 = q; q.B = 2 end)
        return r1 == t1, seen == p, p() == t1, r3 == t1, seen3 ~= t1 and seen3.B == 2
        """,
    )
    assert got == (True, True, True, True, True)
    assert calls(lua) == [("A", None, "A", 1), ("B", None, "B", 2)]


def test_seed_document_example_runs(lua: Any) -> None:
    t = run(
        lua,
        """
        return proxy({}, {
            ["count"] = {10, 20, 30, rec'COUNT'},
            ["hello"] = rec'HELLO',
        })(function(v)
            v.count = 9
            v.count = 25
            v.hello = "hello"
        end)
        """,
    )
    assert calls(lua) == [("COUNT", [10, 20], "count", 25), ("HELLO", None, "hello", "hello")]
    assert to_py(t) == {"count": 25, "hello": "hello"}


@pytest.mark.parametrize(
    ("args", "message"),
    [("nil, {}", "t1 must be a table"), ("{}, 5", "t2 must be a table or a function")],
)
def test_bad_arguments_are_lua_errors_at_the_caller(lua: Any, args: str, message: str) -> None:
    ok, msg = run(lua, f"return pcall(function()\n local p = proxy({args})\n end)")
    assert ok is False
    assert msg.decode() == f"watchers.lua:2: stage.proxy: {message}, got " + (
        "nil" if args.startswith("nil") else "number"
    )


def test_unwatched_assignments_allocate_nothing(lua: Any) -> None:
    grown = run(
        lua,
        """
        local p = proxy({x = 0}, {y = rec'Y', ['*'] = false})
        local function assign(n) for i = 1, n do p.x = i end end
        assign(10000) -- LuaJIT's compiled traces are garbage-collected objects too
        collectgarbage('collect'); collectgarbage('stop')
        local before = collectgarbage('count')
        assign(10000)
        local grown = collectgarbage('count') - before
        collectgarbage('restart')
        return grown
        """,
    )
    assert grown < 1  # KiB
