"""A real server whose index loads a large snapshot while Lua stages send to it: the requests wait
and are answered after the load, from the whole index, at the first start and after a kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore
from tests.support import ServerProcess

MEMBERS = 200_000

# Started before the index in its process: every request it sends at load reaches the index
# while it loads (the host holds them until the index's start returns, the index until loaded).
EARLY = """
local SENT = 20
for n = 1, SENT do
  stage.signal("rank:early", {["total:pre"] = true, ["set:early"] = {["e" .. n] = {i = n}}})
end
stage.waitfor("early", function(r)
  log4cxx.info("EARLY", tostring(r["total:pre"]), tostring(r["set:early"].error))
end)
"""

# In the other process: 16 requests in flight from its start on, each reply logged.
CLIENT = """
local WINDOW, inflight, n, tick, sent = 16, 0, 0, 0, {}
local function send()
  n = n + 1
  sent[n], inflight = tick, inflight + 1
  stage.signal("rank:got", {["#" .. n .. ".total:pre"] = true, ["set:client"] = {["c" .. n] = {i = n}}})
end
stage.waitfor("got", function(r)
  for key, total in pairs(r) do
    local k = tonumber(string.match(key, "^#(%d+)%."))
    if k and sent[k] then
      sent[k], inflight = nil, inflight - 1
      log4cxx.info("TOTAL", type(total) == "table" and tostring(total.error) or tostring(total))
    end
  end
  while inflight < WINDOW do send() end
end)
stage.addtask(100, function()
  tick = tick + 1
  for k, at in pairs(sent) do  -- lost with the killed process: forget them after 2 s
    if tick - at > 20 then sent[k], inflight = nil, inflight - 1 end
  end
  while inflight < WINDOW do send() end
  return 100
end)
"""

LOADED = re.compile(r"index =index\+rank: \d+ indexes, (\d+) members loaded from .* \((\d+) requests waited\)")


def _prefill(directory: Path) -> None:
    """``MEMBERS`` members of index ``pre``, in a snapshot (the start loads it in many steps)."""
    store = IndexStore(str(directory))
    store.open()
    executor = Executor(store, key_size=32)
    for start in range(0, MEMBERS, 1000):
        executor.run({b"set:pre": {b"p%d" % n: {b"v": b"value", b"i": n} for n in range(start, start + 1000)}})
        store.commit()
    for _ in store.compaction():
        pass
    store.close()


def _loads(server: ServerProcess) -> list[tuple[int, int]]:
    """(members, requests that waited) of each completed load, in order."""
    found = (LOADED.search(line) for line in list(server.lines))
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


def _totals(server: ServerProcess, stage: str) -> list[str]:
    prefix = "TOTAL" if stage == "client" else "EARLY"
    return [fields[0] for fields in server.logged(stage, prefix)]


def test_requests_sent_while_a_large_index_loads_are_answered_after_it_from_the_whole_index(tmp_path) -> None:
    _prefill(tmp_path / "scores")
    (tmp_path / "early.lua").write_text(EARLY)
    (tmp_path / "client.lua").write_text(CLIENT)
    config = {
        "#startup": [["=lua+early", "=index+rank"], ["=lua+client"]],
        "=index+rank": "scores",
        "=lua+early": {"=lua+early": "early"},
        "=lua+client": {"=lua+client": "client"},
    }
    (tmp_path / "stage.json").write_text(json.dumps(config))
    server = ServerProcess(tmp_path / "stage.json")
    try:
        server.wait_for(lambda: len(_loads(server)) == 1, 60, "the first load")
        server.wait_for(lambda: len(_totals(server, "early")) == 20, 30, "the early requests' answers")
        server.wait_for(lambda: len(_totals(server, "client")) >= 500, 60, "the client's answers")
        acknowledged = len(_totals(server, "client"))  # each answer acknowledged one new member
        os.kill(server.pids(0)[-1], signal.SIGKILL)
        server.wait_for(lambda: len(_loads(server)) == 2, 60, "the load after the restart")
        server.wait_for(lambda: len(_totals(server, "early")) == 40, 30, "the early requests' answers again")
        answered = len(_totals(server, "client"))
        server.wait_for(lambda: len(_totals(server, "client")) >= answered + 500, 60, "answers after the restart")
        # the answers while it served (a request that reaches a stopping index gets an error)
        totals = {stage: _totals(server, stage) for stage in ("early", "client")}
    finally:
        server.stop()
    loads = _loads(server)
    assert loads[0][0] == MEMBERS
    assert loads[1][0] >= MEMBERS + 20 + acknowledged, "what was acknowledged before the kill -9 is loaded"
    assert all(waited >= 20 for _, waited in loads), "the early stage's requests waited for each load"
    # every answer came from the whole index: never a partly loaded count, never an error
    for stage, answers in totals.items():
        assert all(total == str(MEMBERS) for total in answers), (stage, set(answers) - {str(MEMBERS)})
    assert all(fields[1] == "nil" for fields in server.logged("early", "EARLY")), "no set was refused"
