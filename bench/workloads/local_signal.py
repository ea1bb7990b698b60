"""Local ``stage.signal("id")`` → ``stage.waitfor`` in one stage: dispatch that stays in Lua.

Target: ≥ 1,000,000 msg/s.  The script posts chunks of messages; a ``chunk`` message
queued behind each chunk posts the next, so the measured time includes every dispatch.
"""

from __future__ import annotations

from typing import Any

from bench import budget
from bench.rows import row
from bench.workloads.server import bench_line, lua_stages, server

SCRIPT = """
local N, CHUNK, LIMIT = %(count)d, 20000, %(limit)f
local got, sent, t0 = 0, 0, 0
local signal, min = stage.signal, math.min
stage.waitfor("ping", function(v) got = got + 1 end)
stage.waitfor("chunk", function()
  local n = min(CHUNK, N - sent)
  for i = 1, n do signal("ping", i) end
  sent = sent + n
  if sent < N and process.tick - t0 < LIMIT then signal("chunk") else signal("done") end
end)
stage.waitfor("done", function() log4cxx.info("BENCH local_signal", got, process.tick - t0) end)
stage.addtask(50, function() t0 = process.tick; signal("chunk") end)
"""


def run(quick: bool) -> list[dict[str, Any]]:
    """One row: local signal→waitfor messages/s."""
    limit = budget.seconds(10, 4)
    text = SCRIPT % {"count": budget.count(5_000_000, 1_000_000), "limit": limit}
    with server(lua_stages("a"), {"a": text}) as peer:
        got, seconds = bench_line(peer, "local_signal", limit + 30)
    return [row("local signal → waitfor, one stage", got / seconds, "msg/s", target="≥ 1,000,000")]
