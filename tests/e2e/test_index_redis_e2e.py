"""The =index stage on a real redis-server, end to end with real ``twistd stage`` servers: Lua in
another process asking it, Redis down at start (the process serves its other stages, requests get
error entries, then answers once Redis is up), and two servers of a cluster serving the same
boards, one of them SIGKILLed while a third keeps asking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.test_cluster_e2e import app
from tests.redis_servers import RedisServer, needs_redis
from tests.support import ServerProcess, env_path, free_port

WAIT = 40.0

# every 50 ms: one set of a new member and the board's total, answered to "got"
CLIENT = """
local i = 0
stage.waitfor("got", function(r)
  local set = r["set:top"]
  if set.error then log4cxx.info("failed", set.error, r["total:top"].error) return end
  for id, rank in pairs(set) do log4cxx.info("got", id, rank, r["total:top"]) end
end)
stage.addtask(50, function()
  i = i + 1
  stage.signal("%(target)s:q=got", {["set:top"] = {["p" .. i] = {i = i, v = "x"}}, ["total:top"] = true})
  return 50
end)
"""

TICK = """
local n = 0
stage.addtask(50, function() n = n + 1; log4cxx.info("tick", n) return 50 end)
"""


@needs_redis
def test_redis_down_at_start_the_process_serves_on_and_the_index_answers_once_redis_is_up(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    config = {
        "#startup": [["=index+rank", "=lua+tick"], ["=lua+client"]],
        "=index+rank": {"redis": url, "prefix": "down:", "timeout": 500},
    }
    path = app(tmp_path, "s", config, {"client": CLIENT % {"target": "rank"}, "tick": TICK})
    with ServerProcess(path) as server:
        server.wait_for(lambda: len(server.logged("client", "failed")) >= 3, WAIT, "error replies")
        assert server.logged("client", "failed")[0] == [f"redis: no connection to {url} within 0.5 s"] * 2
        assert any("=index+rank" in line and "cannot use redis" in line and url in line for line in server.lines)
        ticks = len(server.logged("tick", "tick"))
        server.wait_for(lambda: len(server.logged("tick", "tick")) >= ticks + 5, WAIT, "the index's process serving on")
        redis = RedisServer(tmp_path, port=port)
        try:
            server.wait_for(lambda: len(server.logged("client", "got")) >= 3, WAIT, "answers once redis is up")
            member, rank, total = server.logged("client", "got")[0]
            assert rank == "1" and int(total) == 1 and member.startswith("p")
        finally:
            redis.stop()


def _kill(server: ServerProcess) -> None:
    """SIGKILL a server's children and then the server: the crash of a machine's stagetx."""
    for pid in server.pids(0):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.process.kill()
    server.process.wait(10)


@needs_redis
def test_two_servers_serve_the_same_boards_and_one_killed_leaves_the_other_answering(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    try:
        ports = {name: free_port() for name in "XYC"}
        index = {"=index+rank": {"redis": redis.url, "prefix": "two:"}, "#startup": [["=index+rank"]]}
        paths: dict[str, Any] = {
            name: app(tmp_path, name, {"name": name, "#cluster": [ports[name]], **index}, {}) for name in "XY"
        }
        peers = [f"127.0.0.1:{ports['X']}", f"127.0.0.1:{ports['Y']}"]
        client_config = {"#router": [2000, 2000], "#cluster": [ports["C"], *peers], "#startup": [["=lua+client"]]}
        paths["C"] = app(tmp_path, "C", client_config, {"client": CLIENT % {"target": "+rank"}})
        with ServerProcess(paths["Y"]) as y, ServerProcess(paths["C"]) as client:
            x = ServerProcess(paths["X"])
            try:
                client.wait_for(lambda: len(client.logged("client", "got")) >= 20, WAIT, "answers from both servers")
                for server in (x, y):
                    assert any("boards on redis" in line for line in server.lines), "\n".join(server.lines[-30:])
            finally:
                _kill(x)
            killed_at = len(client.logged("client", "got"))
            client.wait_for(
                lambda: len(client.logged("client", "got")) >= killed_at + 20, WAIT, "answers from the surviving server"
            )
        got = client.logged("client", "got")
        # one board: every set acknowledged by either server counts in the totals the other gives
        members = {member for member, _, _ in got}
        assert max(int(total) for _, _, total in got) >= len(members)
        assert len(members) == len(got)
    finally:
        redis.stop()


def test_twistd_check_names_a_bad_redis_setting_in_one_line(tmp_path: Path) -> None:
    def check(settings: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "stage.json"
        config.write_text(json.dumps({"#startup": [["=index+rank"]], "=index+rank": settings}))
        twistd = str(Path(sys.executable).with_name("twistd"))
        return subprocess.run(
            [twistd, "-n", "--pidfile=", "stage", "-c", str(config), "--check"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": env_path()},
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad = check({"redis": "redis//127.0.0.1:6379/0"})
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "stage: =index+rank.redis: 'redis//127.0.0.1:6379/0': the scheme must be one of "
        "redis://, rediss://, redis+sentinel://"
    ]
    good = check({"redis": "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/games", "wait": 1})
    assert (good.returncode, good.stdout) == (0, "config OK\nprocess 1: =index+rank\n")
