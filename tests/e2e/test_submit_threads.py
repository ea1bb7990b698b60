"""``twistd -n stage`` as a real server process: submit and thread.new across processes, and a
SIGTERM while a job runs (issue 4's shutdown rule)."""

from __future__ import annotations

from pathlib import Path

from tests.support import ServerProcess, write_app

CONFIG = {
    "#startup": [["=lua+a"], ["=lua+b"]],
    "#threads": [2, 100],
    "=lua": {"%package": ["[0]lua"], "=lua+a": "a", "=lua+b": "b"},
}

# Stage a: keyed jobs that message stage b in another process and a thread.new; when b has seen
# every job, a long job that is still running when the server is told to stop.
A = """
for seq = 1, 6 do
    stage.submit("k", function(n)
        log4cxx.info("job", n, thread.id)
        stage.signal("b:seen", n)
    end, seq)
end
local t = thread.new(function(x) thread.signal("step", x) return "end", x + 1 end, 41)
t.waitfor(function(...) log4cxx.info("thread", ...) end)
stage.waitfor("go", function()
    stage.submit(9, function()
        log4cxx.info("long", "start")
        local stop = process.tick + 1.0
        while process.tick < stop do end
        log4cxx.info("long", "end")
    end)
end)
"""

B = """
stage.waitfor("seen", function(n)
    log4cxx.info("seen", n, _WAITFOR[1].stage)
    if n == 6 then stage.signal("a:go") end
end)
"""


def test_jobs_threads_and_a_graceful_stop_in_a_real_server(tmp_path: Path) -> None:
    path = write_app(tmp_path, CONFIG, {"a": A, "b": B})
    with ServerProcess(path) as server:
        server.wait_for(lambda: server.logged("a", "long") == [["start"]], 30, "the long job to start")
        code = server.stop(30)
    assert code == 0  # SIGTERM is the graceful stop (docs/operations.md)
    assert [fields[0] for fields in server.logged("a", "job")] == ["1", "2", "3", "4", "5", "6"]
    assert [fields for fields in server.logged("b", "seen")] == [[str(n), "a"] for n in range(1, 7)]
    assert server.logged("a", "thread") == [["step", "41"], ["end", "42"]]
    assert server.logged("a", "long") == [["start"], ["end"]]  # finished inside the grace period
