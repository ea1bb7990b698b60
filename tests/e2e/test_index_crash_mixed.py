"""``kill -9`` of a process in the middle of mixed requests (every tier, int and float scores that
tie, values, ``I``, ``del``) while it compacts: after each restart the boards are exactly those
the acknowledged turns made, value, score and tie order (sequence number) of every member.

The child (``index_mixed_writer.py``) runs the same turns for the same seed; the test runs them
again on a copy of the directory as it was before the child started, as far as the last ack.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore
from tests.e2e.index_mixed_writer import turns

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index_mixed_writer.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: (seed, acks before the kill) of each round; the rounds go on in the same directory. The writer
#: compacts about half of its turns, so about half of the kills land in a half written snapshot
#: (the kill cannot be aimed: the writer runs ahead of the acks read from its pipe).
ROUNDS = [(11, 150), (12, 1800), (13, 60), (14, 900), (15, 2500), (16, 400)]
ROUNDS += [(seed + 10, acks + 37) for seed, acks in ROUNDS]


def _state(directory: str) -> dict[bytes, dict[bytes, Any]]:
    """Every member's value and (score, seq) per tier, as a restart loads them."""
    store = IndexStore(directory)
    store.open()
    try:
        return {name: {m: board.state(m) for m in board.members()} for name, board in store.boards.items()}
    finally:
        store.close()


def _expected(start: str, seed: int, last: int) -> list[dict[bytes, dict[bytes, Any]]]:
    """The states after turn ``last`` and after the next one (written, maybe, but not yet acked
    when the kill came), from the turns run again on a copy of ``start``."""
    work = start + ".model"
    shutil.copytree(start, work)
    store = IndexStore(work)
    store.open()
    executor = Executor(store, key_size=32)
    states = []
    for turn, requests in enumerate(turns(seed)):
        for request in requests:
            executor.run(request)
        store.commit()
        if turn >= last:
            states.append({name: {m: b.state(m) for m in b.members()} for name, b in store.boards.items()})
        if turn == last + 1:
            break
    store.close()
    shutil.rmtree(work)
    return states


def _kill_after(directory: str, seed: int, acks: int) -> tuple[int, bool]:
    """Run the writer, SIGKILL it after ``acks`` acks: the last turn it acked, and whether a
    snapshot was half written at the kill."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    child = subprocess.Popen([sys.executable, WRITER, directory, str(seed)], stdout=subprocess.PIPE, env=env, text=True)
    last = -1
    deadline = time.monotonic() + 60
    try:
        assert child.stdout is not None
        while last < acks - 1:
            line = child.stdout.readline()
            assert line, "the writer exited early"
            assert time.monotonic() < deadline, "the writer is too slow"
            last = int(line.split()[1])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        halfway = any(name.endswith(".snap.tmp") for name in os.listdir(directory))
        for line in child.stdout:
            last = int(line.split()[1])
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
    return last, halfway


def test_kill_9_during_mixed_requests_and_compactions_keeps_every_acknowledged_state(tmp_path) -> None:
    directory = str(tmp_path / "index")
    os.makedirs(directory)
    halfway_kills = 0
    for round_, (seed, acks) in enumerate(ROUNDS):
        start = str(tmp_path / f"start{round_}")
        shutil.copytree(directory, start)
        last, halfway = _kill_after(directory, seed, acks)
        halfway_kills += halfway
        found = _state(directory)
        assert found in _expected(start, seed, last), f"round {round_}: the state after turn {last} differs"
        assert found.get(b"x") and found.get(b"y")
    assert halfway_kills >= 1, "some kills landed while a snapshot was half written"
