"""Every acknowledged set survives a kill -9 of the process, a full disk and a restart;
a set that could not be stored is neither acknowledged nor visible, before or after the restart.

The full-disk tests mount a small tmpfs as the index directory (root only; skipped otherwise),
fill it to ENOSPC with a filler file in the middle of the load, then free it again.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore
from tests.support import ServerProcess

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index_writer.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Writer:
    """``index_writer.py`` as a child process; its ``ack``/``fail``/compaction lines read as they come."""

    def __init__(self, directory: str, first: int) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
        self.child = subprocess.Popen(
            [sys.executable, WRITER, directory, str(first)], stdout=subprocess.PIPE, env=env, text=True
        )
        self.acks: list[int] = []
        self.fails: list[int] = []
        self.compactions = 0
        self.compaction_failures = 0

    def until(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Read the writer's lines until ``condition()`` holds (the writer prints one per set)."""
        assert self.child.stdout is not None
        deadline = time.monotonic() + timeout
        while not condition():
            line = self.child.stdout.readline()
            assert line, f"the writer exited early, waiting for {what}"
            assert time.monotonic() < deadline, f"the writer is too slow: {what}"
            self._take(line)

    def kill(self) -> None:
        """SIGKILL the writer; then read what it printed before it died."""
        assert self.child.stdout is not None
        self.child.send_signal(signal.SIGKILL)
        for line in self.child.stdout:
            self._take(line)
        self.child.wait(timeout=10)
        assert self.child.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait(timeout=10)

    def _take(self, line: str) -> None:
        line = line.strip()
        if line == "compacted":
            self.compactions += 1
        elif line == "compaction failed":
            self.compaction_failures += 1
        else:
            verdict, number = line.split()
            (self.acks if verdict == "ack" else self.fails).append(int(number))


def _kill_mid_stream(directory: str, first: int, at_least: int) -> list[int]:
    """Run the writer, SIGKILL it after ``at_least`` acks; returns every ack it printed."""
    writer = Writer(directory, first)
    try:
        writer.until(lambda: len(writer.acks) >= at_least, f"{at_least} acks")
        writer.kill()
    finally:
        writer.close()
    return writer.acks


def _check(directory: str, acked: list[int], failed: Iterable[int] = (), last_on_top: bool = True) -> int:
    """Open the directory as a restart would: every acked set there, no failed one; its size.

    ``last_on_top``: the last ack ranks among the highest scores stored: above it at most the
    members of one turn (64), written but not yet printed when the kill came (the writer prints
    a turn's acks right after its write; a server's client may still hold acks when it stops).
    """
    store = IndexStore(directory)
    store.open()
    try:
        board = store.boards[b"crash"]
        missing = [n for n in acked if b"m%d" % n not in board]
        assert not missing, f"{len(missing)} acknowledged sets lost, first {missing[:5]}"
        visible = [n for n in failed if b"m%d" % n in board]
        assert not visible, f"{len(visible)} failed sets visible after the restart, first {visible[:5]}"
        for n in acked[:: max(1, len(acked) // 500)]:
            value, tiers = board.state(b"m%d" % n)
            assert value == b"value %d" % n and tiers[0][0] == n and tiers[1:] == [None, None, None]
        if last_on_top:
            rank = board.tier(1).rank(b"m%d" % max(acked))
            assert rank is not None and rank <= 64 + 1
        return len(board)
    finally:
        store.close()


def test_acknowledged_sets_survive_kill_9_twice_with_compactions(tmp_path) -> None:
    directory = str(tmp_path / "index")
    first = _kill_mid_stream(directory, 0, at_least=5000)
    assert _check(directory, first) >= len(first)
    second = _kill_mid_stream(directory, first[-1] + 1, at_least=5000)
    assert _check(directory, first + second) >= len(first) + len(second)
    files = os.listdir(directory)
    assert any(f.endswith(".snap") for f in files), "compaction ran during the stream"
    assert not [f for f in files if f.endswith(".tmp")]


# -- a full disk ----------------------------------------------------------------------------------


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the test; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "stagetx-test", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """A file that takes every free byte of the file system but ``leave`` (then ENOSPC)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        block = b"\0" * 65536
        try:
            while out.write(block):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
        if leave:
            out.truncate(max(0, out.tell() - leave))
    return filler


def test_a_full_disk_during_compactions_loses_no_acknowledged_set_and_shows_no_failed_one(tmp_path) -> None:
    with small_tmpfs(tmp_path / "index", "2m") as directory:
        filler = fill(directory, leave=512 << 10)  # the load itself runs the disk full
        writer = Writer(str(directory), 0)
        try:
            writer.until(
                lambda: len(writer.fails) >= 1000 and writer.compaction_failures >= 1,
                "failed writes and a failed compaction",
            )
            assert writer.compactions >= 1, "compactions ran before the disk was full"
            assert len([f for f in os.listdir(directory) if f.endswith(".log")]) <= 3, "no segment storm"
            filler.unlink()
            acked, compacted = len(writer.acks), writer.compactions
            writer.until(
                lambda: len(writer.acks) >= acked + 5000 and writer.compactions > compacted,
                "acks and a compaction after the disk was freed",
            )
            writer.kill()
        finally:
            writer.close()
        assert _check(str(directory), writer.acks, writer.fails) >= len(writer.acks)


CLIENT = """
-- sets m<N> = N through the index stage, 16 in flight; "#N.total" carries N into the reply
-- (a failed turn answers every key of the request with an error, keys as sent)
local WINDOW, next_n, inflight, sent, tick = 16, 0, 0, {}, 0
local acks, fails = {}, {}

local function send()
  local n = next_n
  next_n, inflight, sent[n] = n + 1, inflight + 1, tick
  stage.signal("rank:set=got", {
    ["set:crash"] = {["m" .. n] = {v = "value " .. n, i = n}},
    ["#" .. n .. ".total:crash"] = true,
  })
end

local function flush()
  if #acks > 0 then log4cxx.info("ACKS", table.concat(acks, " ")); acks = {} end
  if #fails > 0 then log4cxx.info("FAILS", table.concat(fails, " ")); fails = {} end
end

stage.waitfor("got", function(r)
  local n
  for key in pairs(r) do n = n or tonumber(string.match(key, "^#(%d+)%.")) end
  if n == nil or sent[n] == nil then return end
  sent[n], inflight = nil, inflight - 1
  local set = r["set:crash"]
  if type(set) == "table" and set.error == nil then
    acks[#acks + 1] = n
  else
    fails[#fails + 1] = n
    stage.signal("rank:get=seen", {["get:crash"] = {"m" .. n}})  -- must not be there
  end
  if #acks >= 500 then flush() end
  while inflight < WINDOW do send() end
end)

stage.waitfor("seen", function(r)
  local got = r["get:crash"]
  if type(got) == "table" and got.error == nil then
    for member in pairs(got) do log4cxx.info("VISIBLE", member) end
  end
end)

stage.addtask(100, function()
  tick = tick + 1
  for n, at in pairs(sent) do  -- lost with a killed process: forget them after 3 s
    if tick - at > 30 then sent[n], inflight = nil, inflight - 1 end
  end
  flush()
  while inflight < WINDOW do send() end
  return 100
end)
"""


def _numbers(server: ServerProcess, prefix: str) -> list[int]:
    return [int(n) for fields in server.logged("client", prefix) for n in fields[0].split()]


def _storage_errors(server: ServerProcess) -> float:
    """``stagetx_stage_errors_total`` of the index stage, from the server's ``/metrics``."""
    port = next(
        int(found.group(1))
        for line in list(server.lines)
        if (found := re.search(r"admin http listening on 127\.0\.0\.1:(\d+)", line))
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as response:
        text = response.read().decode()
    found = re.search(r'^stagetx_stage_errors_total\{[^}]*stage="=index\+rank"[^}]*\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _logged(server: ServerProcess, text: str) -> bool:
    return any(text in line for line in list(server.lines))


def _rewritten(server: ServerProcess) -> bool:
    """The index logged that its log was gone and started a new one, then a compaction after that."""
    lines = list(server.lines)
    moved = next((i for i, line in enumerate(lines) if "is no longer there; started" in line), None)
    return moved is not None and any(": compacted, snapshot " in line for line in lines[moved:])


def _server_app(tmp_path: Path) -> Path:
    """A server with the index stage in process 1 and the CLIENT script in process 2."""
    (tmp_path / "client.lua").write_text(CLIENT)
    config = {
        "#admin": {"http": "tcp:0:interface=127.0.0.1"},
        "#startup": [["=index+rank"], ["=lua+client"]],
        "=index+rank": "scores",
        "=lua+client": {"=lua+client": "client"},
    }
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(config))
    return path


def _kill_restart_and_check(
    server: ServerProcess, directory: Path, writes_failed: bool = True
) -> tuple[list[int], list[int]]:
    """More acks, ``kill -9`` of the index process, acks after its restart; then stop the server
    and check the directory: every ack there, no failed set there nor ever seen by the client.
    ``writes_failed``: log writes failed on the way (logged at a bounded rate), else none did."""
    try:
        acked = len(_numbers(server, "ACKS"))
        server.wait_for(lambda: len(_numbers(server, "ACKS")) >= acked + 3000, 60, "acks after the disk was freed")
        os.kill(server.pids(0)[-1], signal.SIGKILL)
        server.wait_for(lambda: len(server.pids(0)) == 2, 30, "the index process restarted")
        acked = len(_numbers(server, "ACKS"))
        server.wait_for(lambda: len(_numbers(server, "ACKS")) >= acked + 3000, 60, "acks after the restart")
    finally:
        server.stop()
    acks, fails = _numbers(server, "ACKS"), _numbers(server, "FAILS")
    assert not server.logged("client", "VISIBLE"), "a failed set was visible while the server ran"
    assert not set(acks) & set(fails)
    assert _check(str(directory), acks, fails, last_on_top=False) >= len(acks)
    write_errors = [line for line in server.lines if "log write failed" in line]
    if writes_failed:
        assert 1 <= len(write_errors) < len(fails) // 10, "log write failures are logged at a bounded rate"
    else:
        assert not fails and not write_errors
    return acks, fails


def test_a_server_loses_no_acknowledged_set_to_a_full_disk_and_a_kill_9(tmp_path) -> None:
    path = _server_app(tmp_path)
    with small_tmpfs(tmp_path / "scores", "2m") as directory:
        server = ServerProcess(path)
        try:
            server.wait_for(lambda: len(_numbers(server, "ACKS")) >= 3000, 60, "acks before the disk is full")
            filler = fill(directory)
            server.wait_for(lambda: len(_numbers(server, "FAILS")) >= 1000, 60, "failed sets on the full disk")
            server.wait_for(lambda: _storage_errors(server) >= 1, 30, "storage errors in /metrics")
            filler.unlink()
        except BaseException:
            server.stop()
            raise
        _kill_restart_and_check(server, directory)


def _prefill(directory: Path, log_bytes: int) -> int:
    """Write members of board ``pre`` until the log holds ``log_bytes``: at its next start the
    stage wants a compaction (the logs are over 4 MiB and there is no snapshot yet). Returns
    how many members were written."""
    store = IndexStore(str(directory))
    store.open()
    executor = Executor(store, key_size=32)
    written = 0
    while store.log_bytes < log_bytes:
        for n in range(written, written + 1000):
            executor.run({b"set:pre": {b"p%d" % n: {b"v": b"%032d" % n, b"i": n}}})
        store.commit()
        written += 1000
    store.close()
    return written


def test_a_server_loses_no_acknowledged_set_to_a_full_disk_during_a_compaction(tmp_path) -> None:
    path = _server_app(tmp_path)
    # room for the 5 MiB of logs, the snapshot that replaces them (about 6 MB) and the sets logged
    # meanwhile once the filler is gone
    with small_tmpfs(tmp_path / "scores", "24m") as directory:
        members = _prefill(directory, 5 << 20)
        filler = fill(directory, leave=1 << 20)  # too little room for the snapshot, then for the log
        server = ServerProcess(path)
        try:
            server.wait_for(lambda: _logged(server, "compaction failed"), 60, "a compaction failed on the full disk")
            server.wait_for(lambda: len(_numbers(server, "FAILS")) >= 1000, 60, "failed sets on the full disk")
            assert len([f for f in os.listdir(directory) if f.endswith(".log")]) <= 2, "no segment storm"
            filler.unlink()
            server.wait_for(lambda: _logged(server, ": compacted, snapshot "), 90, "the compaction once there is room")
        except BaseException:
            server.stop()
            raise
        _kill_restart_and_check(server, directory)
        store = IndexStore(str(directory))
        store.open()
        try:
            assert len(store.boards[b"pre"]) == members  # what the snapshot replaced is all there
            assert [f for f in os.listdir(directory) if f.endswith(".snap")]
        finally:
            store.close()


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_server_loses_no_acknowledged_set_when_its_index_directory_is_removed_or_renamed(tmp_path, how) -> None:
    """The directory taken away under a running load (``rm -r``, or ``mv`` elsewhere): the sets
    acknowledged afterwards, and those from before it, are in the directory a restart reads."""
    path = _server_app(tmp_path)
    directory = tmp_path / "scores"
    server = ServerProcess(path)
    try:
        server.wait_for(lambda: len(_numbers(server, "ACKS")) >= 3000, 60, "acks before the directory goes")
        if how == "removed":
            # the stage may make the directory again while rm -r empties it (rmdir then fails):
            # either way its log is gone from under it
            shutil.rmtree(directory, ignore_errors=True)
        else:
            directory.rename(tmp_path / "scores.old")
        server.wait_for(lambda: _rewritten(server), 30, "the new log started, then every index written to it")
    except BaseException:
        server.stop()
        raise
    _kill_restart_and_check(server, directory, writes_failed=False)
