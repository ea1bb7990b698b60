"""stage.submit, thread.new and sandboxes: real threads, real Lua.

The first tests drive ``KeyedQueue`` with plain Python jobs on a real ``ThreadPool``; the others run
a Lua stage in this process (real reactor, real worker threads) and read what its scripts logged.
Concurrency is proven by execution intervals and barriers, never by wall time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent
from twisted.python.threadpool import ThreadPool

from stagetx.lua import sandbox
from stagetx.lua.workers import KeyedQueue, QueueFull
from tests.support import InProcessServer, LogCapture, wait_for, wait_until, write_app


# -- KeyedQueue with Python jobs ------------------------------------------------------------------
class Recorded:
    """A job that records its run interval; ``body`` runs in between (on the worker thread)."""

    def __init__(
        self,
        key: Hashable,
        log: list[tuple[Hashable, int, float, float]],
        seq: int,
        body: Callable[[], float | None] = lambda: time.sleep(0.002),
    ) -> None:
        self.key = key
        self.seq = seq
        self._log = log
        self._body = body

    def run(self) -> float | None:
        start = time.monotonic()
        again = self._body()
        self._log.append((self.key, self.seq, start, time.monotonic()))
        return again


class ThreadReactor:
    """The two reactor calls the queue makes, done on a timer thread (no reactor needed)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> threading.Timer:
        timer = threading.Timer(delay, f, args)
        timer.start()
        return timer


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    tp = ThreadPool(4, 4, name="test-workers")
    tp.start()
    yield tp
    tp.stop()


def test_jobs_of_one_key_never_overlap_and_keep_submission_order(pool: ThreadPool) -> None:
    queue = KeyedQueue(pool, ThreadReactor(), 1000)
    log: list[tuple[Hashable, int, float, float]] = []
    for seq in range(40):
        queue.submit(Recorded("k" if seq % 2 else 7, log, seq))
    wait_until(lambda: len(log) == 40)
    for key in ("k", 7):
        runs = [r for r in log if r[0] == key]
        assert [r[1] for r in sorted(runs, key=lambda r: r[2])] == [r[1] for r in runs] == sorted(r[1] for r in runs)
        for before, after in zip(runs, runs[1:]):
            assert before[3] <= after[2], f"key {key!r}: job {before[1]} overlaps job {after[1]}"


def test_different_keys_and_key_zero_run_at_the_same_time(pool: ThreadPool) -> None:
    queue = KeyedQueue(pool, ThreadReactor(), 1000)
    barrier = threading.Barrier(4, timeout=5)
    log: list[tuple[Hashable, int, float, float]] = []
    for seq, key in enumerate([1, 2, 0, 0]):  # all four must be inside at once to pass the barrier
        queue.submit(Recorded(key, log, seq, lambda: barrier.wait() and None))
    wait_until(lambda: len(log) == 4)
    assert not barrier.broken
    assert max(r[2] for r in log) < min(r[3] for r in log)


def test_a_full_queue_refuses_new_jobs_and_runs_every_accepted_one(pool: ThreadPool) -> None:
    queue = KeyedQueue(pool, ThreadReactor(), 5)
    gate = threading.Event()
    log: list[tuple[Hashable, int, float, float]] = []
    queue.submit(Recorded(3, log, 0, lambda: gate.wait(5) and None))
    wait_until(lambda: queue.running == 1)
    accepted = refused = 0
    for seq in range(1, 9):
        try:
            queue.submit(Recorded(3, log, seq))
            accepted += 1
        except QueueFull as err:
            assert "#threads[1]" in str(err)
            refused += 1
    assert (accepted, refused, queue.waiting) == (5, 3, 5)
    gate.set()
    wait_until(lambda: len(log) == 6)
    assert [r[1] for r in log] == [0, 1, 2, 3, 4, 5]
    wait_until(lambda: queue.waiting == 0 and queue.running == 0)


def test_returned_ms_resubmits_with_the_same_key_and_counts_as_waiting(pool: ThreadPool) -> None:
    queue = KeyedQueue(pool, ThreadReactor(), 1)
    log: list[tuple[Hashable, int, float, float]] = []
    runs = iter([50, 50, None])
    queue.submit(Recorded("r", log, 0, lambda: next(runs)))
    wait_until(lambda: len(log) == 1)
    wait_until(lambda: queue.waiting == 1)  # the pending re-submission holds the only place
    with pytest.raises(QueueFull):
        queue.submit(Recorded("other", log, 1))
    wait_until(lambda: len(log) == 3)
    assert all(later[2] - earlier[3] >= 0.045 for earlier, later in zip(log, log[1:]))
    wait_until(lambda: queue.waiting == 0)


def test_a_failing_job_does_not_block_its_key(pool: ThreadPool) -> None:
    queue = KeyedQueue(pool, ThreadReactor(), 10)
    log: list[tuple[Hashable, int, float, float]] = []

    def boom() -> None:
        raise RuntimeError("job failed")

    with LogCapture() as capture:
        queue.submit(Recorded(9, log, 0, boom))
        queue.submit(Recorded(9, log, 1))
        wait_until(lambda: len(log) == 1)
    assert log[0][1] == 1
    assert any("worker job failed" in e.get("log_format", "") for e in capture.events)


# -- Lua stages -----------------------------------------------------------------------------------
def lua_app(tmp_path: Path, main: str, threads: list[int] | None = None, **files: str) -> Path:
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    config: dict[str, Any] = {
        "#startup": [["=lua+a"]],
        "#threads": threads or [4, 1000],
        "=lua+a": {"%package": ["[0]lua"], "=lua+a": "main"},
    }
    if "pre/p.lua" in files:
        config["=lua+a"]["%preload"] = "pre"
    return write_app(tmp_path, config, {"main": main})


async def run(path: Path, until: str, timeout: float = 20.0) -> LogCapture:
    """Start the app, wait until stage ``a`` logs a line starting with ``until``, stop it."""
    with LogCapture() as capture:
        server = InProcessServer(path)
        await server.start()
        try:
            await wait_for(lambda: any(line.startswith(until) for line in capture.lines("stage.a")), timeout, until)
        finally:
            await server.stop()
    return capture


def logged(capture: LogCapture, prefix: str) -> list[list[str]]:
    return [line.split("\t")[1:] for line in capture.lines("stage.a") if line.split("\t")[0] == prefix]


# A job that spins for `n` iterations of CPU-bound Lua and reports its interval to the stage.
SPIN = """
local function spin(key, seq, n)
    local t0 = thread.tick
    local x = 0
    for i = 1, n do x = (x + i * 7) % 1000003 end
    stage.signal("iv", key, seq, t0, thread.tick, thread.id)
end
"""


def spin_app(tmp_path: Path, jobs: int, submits: str) -> Path:
    """An app whose stage runs ``submits`` (Lua: ``spin`` jobs) and logs "done" after ``jobs`` intervals."""
    collect = f"""
local got = 0
stage.waitfor("iv", function(...)
    log4cxx.info("iv", ...)
    got = got + 1
    if got == {jobs} then log4cxx.info("done") end
end)
"""
    return lua_app(tmp_path, SPIN + collect + submits)


def intervals(capture: LogCapture) -> list[tuple[str, int, float, float, str]]:
    return [(k, int(s), float(a), float(b), tid) for k, s, a, b, tid in logged(capture, "iv")]


@pytest_twisted.ensureDeferred
async def test_lua_jobs_of_one_key_run_one_after_another_in_order(tmp_path: Path) -> None:
    submits = """
        for seq = 1, 12 do
            stage.submit("K", spin, "K", seq, 20000)
            stage.submit(5, spin, "5", seq, 20000)
        end
    """
    path = spin_app(tmp_path, 24, submits)
    capture = await run(path, "done")
    runs = intervals(capture)
    for key in ("K", "5"):
        mine = sorted((r for r in runs if r[0] == key), key=lambda r: r[2])
        assert [r[1] for r in mine] == list(range(1, 13))
        for before, after in zip(mine, mine[1:]):
            assert before[3] <= after[2], f"key {key}: jobs {before[1]} and {after[1]} overlap"


@pytest_twisted.ensureDeferred
async def test_cpu_bound_lua_with_different_keys_runs_in_parallel(tmp_path: Path) -> None:
    path = spin_app(tmp_path, 2, 'stage.submit(1, spin, "1", 1, 3000000)\nstage.submit(2, spin, "2", 1, 3000000)')
    capture = await run(path, "done", timeout=30)
    (_, _, a0, a1, ta), (_, _, b0, b1, tb) = intervals(capture)
    assert ta != tb
    assert max(a0, b0) < min(a1, b1), "the two keys' CPU-bound jobs did not overlap"
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0.5 * min(a1 - a0, b1 - b0)


@pytest_twisted.ensureDeferred
async def test_a_sandbox_has_the_preload_its_own_globals_and_moved_values(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        """
        MAIN_ONLY = "main"
        local up = "upvalue"
        local main_thread = thread.id
        stage.waitfor("r", function(...) log4cxx.info("r", ...) end)
        stage.submit(1, function(t, main_id)
            SANDBOX_GLOBAL = true
            stage.signal("r", PRE, tostring(MAIN_ONLY), tostring(up), t.x, t.y[2], thread.id ~= main_id)
            stage.signal("r", "thread", pcall(thread.new, function() end))
            stage.signal("r", "waitfor", pcall(stage.waitfor, "x", print))
            stage.signal("r", "sync", pcall(stage.signal, ":r"))
            stage.signal("r", "bad", pcall(stage.signal, ""))
            stage.signal("r", "move", pcall(stage.signal, "r", coroutine.create(print)))
            stage.signal("r", "reply", pcall(stage.signal, nil, 1))
            stage.signal("r", "gone", stage.signal("nobody:here", 1))
        end, {x = 1, y = {"a", "b"}}, main_thread)
        stage.addtask(200, function() log4cxx.info("main", tostring(SANDBOX_GLOBAL)) log4cxx.info("done") end)
    """,
        **{"pre/p.lua": 'PRE = "preloaded"\n'},
    )
    capture = await run(path, "done")
    r = {fields[0]: fields[1:] for fields in logged(capture, "r")}
    assert r["preloaded"] == ["nil", "nil", "1", "b", "true"]
    assert r["thread"][0] == "false" and "only on the stage's own thread" in r["thread"][1]
    assert r["waitfor"][0] == "false" and "stage's own runtime" in r["waitfor"][1]
    assert r["sync"][0] == "false" and "synchronous" in r["sync"][1]
    assert r["bad"][0] == "false" and "empty signal target" in r["bad"][1]
    assert r["move"][0] == "false" and "coroutine" in r["move"][1]
    assert r["reply"][0] == "false" and "no message to reply to" in r["reply"][1]
    assert r["gone"] == ["true"]  # handed over: only the reactor knows the stage is unknown
    assert logged(capture, "main") == [["nil"]]


@pytest_twisted.ensureDeferred
async def test_thread_new_delivers_signals_and_return_values_then_cleans_up(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        """
        local t = thread.new(function(a, b)
            for i = 1, 3 do thread.signal("sig", i, a) end
            return "ret", a + b
        end, 20, 22)
        t.waitfor(function(...) log4cxx.info("got", ...) end, "u1", "u2")
        local quiet = thread.new(function() thread.signal("never") return "never" end)
        quiet.waitfor(function(...) log4cxx.info("quiet", ...) end)
        quiet.waitfor(nil)
        log4cxx.info("bad", pcall(t.waitfor, 42))
        stage.addtask(300, function()
            t.waitfor(function(...) log4cxx.info("late", ...) end)
            log4cxx.info("done")
        end)
    """,
    )
    capture = await run(path, "done")
    assert logged(capture, "got") == [
        ["u1", "u2", "sig", "1", "20"],
        ["u1", "u2", "sig", "2", "20"],
        ["u1", "u2", "sig", "3", "20"],
        ["u1", "u2", "ret", "42"],
    ]
    assert logged(capture, "quiet") == [] and logged(capture, "late") == []
    assert logged(capture, "bad")[0][0] == "false" and "must be a function" in logged(capture, "bad")[0][1]


@pytest_twisted.ensureDeferred
async def test_an_error_in_a_job_is_logged_with_file_line_and_key_and_the_key_goes_on(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        """
        stage.waitfor("ok", function(n) log4cxx.info("ok", n) if n == 3 then log4cxx.info("done") end end)
        stage.submit("user-7", function() stage.signal("ok", 1) end)
        stage.submit("user-7", function() local t = nil; return t.field end)
        stage.submit("user-7", function() stage.signal("ok", 3) end)
    """,
    )
    capture = await run(path, "done")
    assert logged(capture, "ok") == [["1"], ["3"]]
    errors = [formatEvent(e) for e in capture.events if e["log_level"].name == "error"]
    assert len(errors) == 1
    assert "job of key 'user-7'" in errors[0] and "lua/main.lua:4:" in errors[0]


@pytest_twisted.ensureDeferred
async def test_submitting_past_the_queue_limit_raises_and_nothing_is_dropped(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        """
        local ran = 0
        stage.waitfor("ran", function() ran = ran + 1 end)
        local function hold() while not stage.v("go") do end end
        stage.submit(1, hold)
        stage.addtask(50, function()  -- the first job is running now: 3 may wait behind it
            local accepted, err = 0, nil
            for i = 1, 6 do
                local ok, e = pcall(function() stage.submit(1, function() stage.signal("ran") end) end)
                if ok then accepted = accepted + 1 else err = e end
            end
            log4cxx.info("limit", accepted, err)
            stage.v("go", true)
            stage.addtask(20, function()
                if ran < accepted then return 20 end
                log4cxx.info("ran", ran)
                log4cxx.info("done")
            end)
        end)
    """,
        threads=[2, 3],
    )
    capture = await run(path, "done")
    ((accepted, err),) = logged(capture, "limit")
    assert accepted == "3"
    assert "main.lua:9: stage.submit: the worker queue is full" in err
    assert logged(capture, "ran") == [["3"]]


@pytest_twisted.ensureDeferred
async def test_once_and_v_are_exact_under_contention_from_many_threads(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        """
        local jobs = 16
        local function work(rounds)
            for r = 1, rounds do
                stage.once("init-" .. r, function() stage.v("ran-" .. r, function(n) return (n or 0) + 1 end) end)
                stage.v("counter", function(n) return (n or 0) + 1 end)
                stage.v("list", function(t) t = t or {} t[#t + 1] = thread.id return t end)
            end
            stage.signal("finished")
        end
        local finished = 0
        stage.waitfor("finished", function()
            finished = finished + 1
            if finished < jobs then return end
            local twice = 0
            for r = 1, 50 do if stage.v("ran-" .. r) ~= 1 then twice = twice + 1 end end
            local threads = {}
            for _, id in ipairs(stage.v("list")) do threads[id] = true end
            local distinct = 0
            for _ in pairs(threads) do distinct = distinct + 1 end
            log4cxx.info("result", stage.v("counter"), #stage.v("list"), twice, distinct > 1)
            log4cxx.info("done")
        end)
        for i = 1, jobs do stage.submit(0, work, 50) end
    """,
        threads=[8, 1000],
    )
    capture = await run(path, "done", timeout=30)
    assert logged(capture, "result") == [["800", "800", "0", "true"]]


@pytest_twisted.ensureDeferred
async def test_returned_ms_runs_the_job_again_with_the_same_key(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        """
        stage.waitfor("tick", function(n, at) log4cxx.info("tick", n, at) if n == 3 then log4cxx.info("done") end end)
        stage.submit("again", function()
            local n = stage.v("n", function(n) return (n or 0) + 1 end)
            stage.signal("tick", n, thread.tick)
            if n < 3 then return 40 end
        end)
    """,
    )
    capture = await run(path, "done")
    ticks = logged(capture, "tick")
    assert [t[0] for t in ticks] == ["1", "2", "3"]
    times = [float(t[1]) for t in ticks]
    assert all(b - a >= 0.035 for a, b in zip(times, times[1:]))


@pytest_twisted.ensureDeferred
async def test_stop_interrupts_a_runaway_job_after_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "GRACE_SECONDS", 0.3)
    path = lua_app(
        tmp_path,
        """
        stage.submit(1, function() stage.signal("started") while true do end end)
        stage.submit(1, function() stage.signal("never") end)
        stage.waitfor("started", function() log4cxx.info("started") end)
        stage.waitfor("never", function() log4cxx.info("never") end)
    """,
    )
    with LogCapture() as capture:
        server = InProcessServer(path)
        await server.start()
        await wait_for(lambda: "started" in capture.lines("stage.a"), 20, "job start")
        began = time.monotonic()
        await server.stop()
        took = time.monotonic() - began
    assert took > 0.25  # the job had its grace period; that the stop ended at all is the interruption
    text = capture.text()
    assert "interrupting" in text and "grace period" in text
    assert "1 queued job(s) not run" in text
    assert "never" not in capture.lines("stage.a")
    assert reactor.running


@pytest_twisted.ensureDeferred
async def test_a_job_cannot_catch_its_interruption_at_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interruption at stop is an error a job's pcall caught: a retry loop ran on after it (the
    job never unwound, its worker thread spun on). Like the budget, it cannot be caught."""
    monkeypatch.setattr(sandbox, "GRACE_SECONDS", 0.3)
    path = lua_app(
        tmp_path,
        """
        stage.submit(1, function()
            stage.signal("started")
            local t = os.clock() + 10  -- retries 10 s unless interrupted
            while os.clock() < t do
                pcall(function() while os.clock() < t do end end)
                xpcall(function() while os.clock() < t do end end, function(e) return e end)
            end
            stage.signal("never")
        end)
        stage.waitfor("started", function() log4cxx.info("started") end)
        stage.waitfor("never", function() log4cxx.info("never") end)
    """,
    )
    capture = await run(path, "started")
    text = capture.text()
    assert "interrupting" in text and "did not unwind" not in text
    assert "job interrupted after its grace period" in text
    assert "never" not in capture.lines("stage.a")


@pytest_twisted.ensureDeferred
async def test_a_job_cannot_clear_the_hook_that_interrupts_it_at_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's ``debug.sethook()`` cleared the sandbox's interrupt hook: at stop the job ran on
    for ever, its worker thread with it. It is refused; the job is interrupted as any other."""
    monkeypatch.setattr(sandbox, "GRACE_SECONDS", 0.3)
    path = lua_app(
        tmp_path,
        """
        stage.submit(1, function()
            local ok, err = pcall(debug.sethook)
            stage.signal("started", err)
            local t = os.clock() + 10  -- runs 10 s unless interrupted
            while os.clock() < t do end
            stage.signal("never")
        end)
        stage.waitfor("started", function(err) log4cxx.info("started", err) end)
        stage.waitfor("never", function() log4cxx.info("never") end)
    """,
    )
    capture = await run(path, "started")
    [[refused]] = logged(capture, "started")
    assert "debug.sethook: the hooks belong to the stage" in refused
    text = capture.text()
    assert "interrupting" in text and "did not unwind" not in text
    assert "job interrupted after its grace period" in text


@pytest_twisted.ensureDeferred
async def test_addtask_in_a_job_runs_the_task_on_the_stages_thread_and_can_be_cancelled(tmp_path: Path) -> None:
    path = lua_app(
        tmp_path,
        """
        local main_thread = thread.id
        stage.submit(1, function(main_id)
            stage.addtask(10, function(main_id, word)
                log4cxx.info("task", word, thread.id == main_id, tostring(WHERE))
                log4cxx.info("done")
            end, main_id, "moved")
            local h = stage.addtask(5, function() log4cxx.info("cancelled task ran") end)
            stage.addtask(h, nil)
            print("printed", thread.id ~= main_id)
        end, main_thread)
        WHERE = "main"
    """,
    )
    capture = await run(path, "done")
    assert logged(capture, "task") == [["moved", "true", "main"]]
    assert logged(capture, "printed") == [["true"]]
    assert "cancelled task ran" not in capture.lines("stage.a")


@pytest_twisted.ensureDeferred
async def test_a_luajit_stage_submits_into_luajit_sandboxes(tmp_path: Path) -> None:
    path = write_app(
        tmp_path,
        {
            "#startup": [["=luajit+a"]],
            "=luajit+a": {"%package": ["[0]lua"], "=luajit+a": "main"},
        },
        {
            "main": """
        local up = 1
        stage.waitfor("r", function(...) log4cxx.info("r", ...) log4cxx.info("done") end)
        stage.submit(1, function(t) stage.signal("r", jit ~= nil, t[1] + t[2], tostring(up)) end, {20, 22})
    """
        },
    )
    capture = await run(path, "done")
    assert logged(capture, "r") == [["true", "42", "nil"]]
