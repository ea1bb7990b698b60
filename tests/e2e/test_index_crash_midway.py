"""A ``kill -9`` in the middle of a compaction and in the middle of a (bulk) load loses no
acknowledged set: the child process (``index_interrupted.py``) stops exactly there and is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stagetx.stages.index.store import IndexStore
from tests.e2e.test_index_crash import _check, _kill_mid_stream

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index_interrupted.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_until_paused_then_kill(*args: str) -> tuple[list[int], list[str]]:
    """Run the helper until it prints ``paused``, SIGKILL it; returns the sets it acknowledged
    and the directory's files at the moment of the kill."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    child = subprocess.Popen([sys.executable, HELPER, *args], stdout=subprocess.PIPE, env=env, text=True)
    acks: list[int] = []
    deadline = time.monotonic() + 60
    try:
        assert child.stdout is not None
        for line in child.stdout:
            assert time.monotonic() < deadline, "the helper is too slow"
            if line.strip() == "paused":
                break
            verdict, number = line.split()
            assert verdict == "ack"
            acks.append(int(number))
        else:
            pytest.fail(f"the helper exited before pausing (code {child.wait(10)})")
        files = os.listdir(args[1])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    return acks, files


def _load_steps(directory: str) -> int:
    store = IndexStore(directory)
    try:
        return sum(1 for _ in store.opening())
    finally:
        store.close()


def test_a_kill_9_in_the_middle_of_a_compaction_loses_no_acknowledged_set(tmp_path) -> None:
    directory = str(tmp_path / "index")
    acked = _kill_mid_stream(directory, 0, at_least=5000)  # snapshots and logs, a torn tail maybe
    during, files = _run_until_paused_then_kill("compact", directory, str(acked[-1] + 1))
    acked += during
    assert any(f.endswith(".snap.tmp") for f in files), "killed while the snapshot was half written"
    assert _check(directory, acked) >= len(acked)
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]
    # and the stream goes on from there, through compactions, to another kill
    more = _kill_mid_stream(directory, acked[-1] + 1, at_least=3000)
    assert _check(directory, acked + more) >= len(acked) + len(more)


def test_a_kill_9_in_the_middle_of_a_load_loses_no_acknowledged_set(tmp_path) -> None:
    directory = str(tmp_path / "index")
    acked = _kill_mid_stream(directory, 0, at_least=20_000)
    steps = _load_steps(directory)
    assert steps >= 3, "the load takes several steps"
    for pause_after in (1, steps // 2, steps - 1):
        _run_until_paused_then_kill("load", directory, str(pause_after))
        assert _check(directory, acked) >= len(acked)
    more = _kill_mid_stream(directory, acked[-1] + 1, at_least=3000)
    assert _check(directory, acked + more) >= len(acked) + len(more)
