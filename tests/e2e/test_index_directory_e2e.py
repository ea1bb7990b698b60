"""A real server whose index directory cannot be locked when it starts (another process holds it,
or its file system is read-only): the index answers every request with why, and serves the
whole index once the directory is free, without a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore
from tests.e2e.test_index_crash import small_tmpfs
from tests.support import ServerProcess

# In the other process: a read every 100 ms, its answer logged
CLIENT = """
stage.waitfor("got", function(r)
  local got, total = r["get:b"], r["total:b"]
  if r.error ~= nil or type(total) ~= "number" then  -- a failed stage answers {error = why}
    log4cxx.info("REFUSED", tostring(r.error or (type(total) == "table" and total.error)))
  else
    local old = got.old
    log4cxx.info("ANSWERED", tostring(total), old and tostring(old.I[1].i) or "absent")
  end
end)
stage.addtask(100, function()
  stage.signal("rank:q=got", {["get:b"] = {"old"}, ["total:b"] = true})
  return 100
end)
"""

# Holds the directory's lock as an index process does (flock) until its standard input closes.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def _app(tmp_path: Path, directory: Path) -> Path:
    """Index ``b`` holding ``old`` = 7 in ``directory``, the index in process 1, CLIENT in process 2."""
    store = IndexStore(str(directory))
    store.open()
    Executor(store, key_size=32).run({b"set:b": {b"old": {b"i": 7}}})
    store.commit()
    store.close()
    (tmp_path / "client.lua").write_text(CLIENT)
    config = {
        "#startup": [["=index+rank"], ["=lua+client"]],
        "=index+rank": str(directory),
        "=lua+client": {"=lua+client": "client"},
    }
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(config))
    return path


def _unavailable_then_free(path: Path, reason: str, free: Callable[[], None]) -> None:
    server = ServerProcess(path)
    try:
        server.wait_for(lambda: len(server.logged("client", "REFUSED")) >= 3, 30, "refused reads")
        assert all(reason in fields[0] for fields in server.logged("client", "REFUSED"))
        assert not server.logged("client", "ANSWERED"), "nothing is answered from an index not loaded"
        logged = [line for line in list(server.lines) if "index =index+rank: index directory unavailable" in line]
        assert len(logged) == 1, "logged once, not once per try"
        free()
        server.wait_for(lambda: bool(server.logged("client", "ANSWERED")), 30, "reads answered once it is free")
    finally:
        server.stop()
    assert {tuple(fields) for fields in server.logged("client", "ANSWERED")} == {("1", "7")}


def test_an_index_whose_directory_another_process_holds_serves_once_it_is_free(tmp_path) -> None:
    directory = tmp_path / "scores"
    path = _app(tmp_path, directory)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory / "LOCK")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        _unavailable_then_free(path, "in use by another process", lambda: holder.communicate(timeout=10))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_an_index_on_a_read_only_file_system_serves_once_it_is_writable(tmp_path) -> None:
    with small_tmpfs(tmp_path / "scores", "4m") as directory:
        path = _app(tmp_path, directory)
        (directory / "LOCK").unlink()  # so that opening it has to create it
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)

        def writable() -> None:
            subprocess.run(["mount", "-o", "remount,rw", str(directory)], check=True)

        _unavailable_then_free(path, "Read-only file system", writable)
