"""SPEC 4.1: every acknowledged set survives a kill -9 of the process and a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from stagetx.index.store import IndexStore

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index_writer.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kill_mid_stream(directory: str, first: int, at_least: int) -> list[int]:
    """Run the writer, SIGKILL it after ``at_least`` acks; returns every ack it printed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    child = subprocess.Popen(
        [sys.executable, WRITER, directory, str(first)], stdout=subprocess.PIPE, env=env, text=True
    )
    acks: list[int] = []
    deadline = time.monotonic() + 60
    try:
        assert child.stdout is not None
        while len(acks) < at_least:
            line = child.stdout.readline()
            assert line, "the writer exited early"
            assert time.monotonic() < deadline, "the writer is too slow"
            acks.append(int(line.split()[1]))
        child.send_signal(signal.SIGKILL)
        acks.extend(int(line.split()[1]) for line in child.stdout if line.startswith("ack "))
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    return acks


def _check(directory: str, acked: list[int]) -> int:
    store = IndexStore(directory)
    store.open()
    try:
        board = store.boards[b"crash"]
        missing = [n for n in acked if b"m%d" % n not in board]
        assert not missing, f"{len(missing)} acknowledged sets lost, first {missing[:5]}"
        for n in acked[:: max(1, len(acked) // 500)]:
            value, tiers = board.state(b"m%d" % n)
            assert value == b"value %d" % n and tiers[0][0] == n and tiers[1:] == [None, None, None]
        tier = board.tier(1)
        assert tier.rank(b"m%d" % acked[-1]) == 1
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
