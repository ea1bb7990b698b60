"""End to end: a Lua stage in one process uses the =index stage in another (real twistd),
and the scores are still there after the server is stopped and started again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tests.support import ServerProcess

WAIT = 30.0

WRITE = """
stage.waitfor("got", function(r)
  local set, get = r["#1.set:board/2"], r["#2.get:board"]
  log4cxx.info(string.format("SET alice=%d bob=%d GET alice=%s/%d bad=%s",
    set.alice, set.bob, get.alice.v, get.alice.I[2].d, r["set:board/9"].error))
end)
stage.addtask(500, function()
  stage.signal("rank:q=got", {
    ["#1.set:board/2"] = {alice = {v = "A", i = 10}, bob = {v = "B", i = 20}},
    ["#2.get:board"] = {"alice"},
    ["set:board/9"] = {x = {i = 1}},
  })
end)
"""

READ = """
stage.waitfor("got", function(r)
  local rows = r["range:board/2"]
  log4cxx.info(string.format("TOP %s:%d:%d %s:%d:%d TOTAL %d",
    rows[1].k, rows[1].i, rows[1].d, rows[2].k, rows[2].i, rows[2].d, r["total:board/2"]))
end)
stage.addtask(500, function()
  stage.signal("rank:q=got", {["range:board/2"] = {100, 10}, ["total:board/2"] = true})
end)
"""


def run_server(tmp_path: Path, script: str, pattern: str) -> str:
    """Run the server until ``pattern`` is logged (or ``WAIT`` s), stop it cleanly; return the log."""
    (tmp_path / "client.lua").write_text(script)
    config = {
        "#startup": [["=index+rank"], ["=lua+client"]],
        "=index+rank": ["scores", 16, 100],
        "=lua+client": {"=lua+client": "client"},
    }
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(config))
    server = ServerProcess(path)
    try:
        server.wait_for(lambda: re.search(pattern, "\n".join(server.lines)) is not None, WAIT, pattern)
    finally:
        server.stop()
    return "\n".join(server.lines)


def test_a_lua_stage_in_another_process_sets_and_reads_ranks_that_survive_a_restart(tmp_path: Path) -> None:
    out = run_server(tmp_path, WRITE, r"SET alice")
    # each set replies the rank at its own moment; Lua table order decides who went first
    assert re.search(r"SET alice=[12] bob=1 GET alice=A/2 bad=the tier must be 1 to 4", out), out[-3000:]
    out = run_server(tmp_path, READ, r"TOP ")
    assert "TOP bob:20:1 alice:10:2 TOTAL 2" in out, out[-3000:]
    assert any(name.endswith(".log") for name in os.listdir(tmp_path / "scores"))
