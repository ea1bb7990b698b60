"""The index stage at ten million members: ``make bench-large`` (opt-in; about 3 GB of memory).

``python -m bench.bench_large [--members N] [--json PATH]``. Builds one index of N random members
(10,000,000 by default) by a bulk load and writes its snapshot, then measures the stage on it:
the start (load of the snapshot in a new process, as after a restart: wall clock and CPU time
beside redis-server's RDB load of a sorted set of as many members in the same run), memory per
member (resident memory a load added), the GC pause while serving (after sets and the stage's
growth check), and a compaction while serving: its
time, and the latency of requests served during it. Requests are real messages through
``Stage.receive`` (64 per reactor turn, one log write each), as in ``bench/bench_index.py``; a
turn's requests are taken to arrive as the compaction step before them starts, so their latency
includes the wait for that step. Every phase is bounded in count and time.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any

from bench import budget
from bench.bench_index import TURN, _Context, _gc_pause, start_rows, start_time
from bench.rows import judge, print_standalone, row
from stagetx.codec import pack_py
from stagetx.message import Message, Sender
from stagetx.stages.index.board import Board
from stagetx.stages.index.stage import FREEZE_CHECK, Stage, return_free_memory
from stagetx.stages.index.store import IndexStore

_SENDER = Sender("bench", 0, "bench", 0)
_BUILD_CHUNK = 100_000
_SERVE_SETS = 200_000  # requests served before the GC pause is measured
_CAP = 600.0  # seconds any one phase may take


def _rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(directory: str, members: int, rng: random.Random) -> None:
    """A snapshot of index ``top`` with ``members`` random members, built by a bulk load."""
    store = IndexStore(directory)
    store.open()
    board = Board(loading=True)
    for start in range(0, members, _BUILD_CHUNK):
        ids = [b"member%08d" % n for n in range(start, min(start + _BUILD_CHUNK, members))]
        scores = [rng.randrange(1 << 30) for _ in ids]
        seqs = list(range(-start - 1, -start - len(ids) - 1, -1))
        board.add_columns([ids, [b"v"] * len(ids), [scores, seqs]])
    board.finish_load()
    board.next_seq = -members - 1
    store.boards[b"top"] = board
    for _ in store.compaction():
        pass
    store.close()


def _message(request: Any) -> Message:
    return Message("b", pack_py((request,)), _SENDER, reply="^b")


def _serve(stage: Stage, requests: list[Any]) -> None:
    for start in range(0, len(requests), TURN):
        for request in requests[start : start + TURN]:
            stage.receive(_message(request))
        stage.turn_ended()


def _compaction_while_serving(stage: Stage, context: _Context, members: int, rng: random.Random) -> dict[str, float]:
    """Run a compaction step by step with a turn of requests after each step; its wall time and
    the requests' latencies (from the start of the step before them)."""
    stage.store.compact_min_bytes = stage.store.snapshot_bytes = 0  # as if the logs outgrew the snapshot
    stage.turn_ended()  # a turn's end starts the compaction
    assert stage.store.compacting
    latencies: list[float] = []
    started = time.perf_counter()
    while stage.store.compacting and time.perf_counter() - started < _CAP:
        call = context.clock.calls.pop(0)  # the compaction's next step (nothing else is due)
        step_started = time.perf_counter()
        call.func(*call.args, **call.kw)
        for _ in range(TURN):
            member = b"member%08d" % rng.randrange(members)
            stage.receive(_message({b"set:top": {member: {b"i": rng.randrange(1 << 30)}}}))
        stage.turn_ended()
        latencies.append(time.perf_counter() - step_started)
    took = time.perf_counter() - started
    assert not stage.store.compacting, "the compaction ended within the cap"
    latencies.sort()
    return {
        "seconds": took,
        "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000.0,
        "max": latencies[-1] * 1000.0,
        "steps": len(latencies),
    }


def run(members: int) -> list[dict[str, Any]]:
    """The rows (``bench.rows``) for an index of ``members``."""
    rng = random.Random(10)
    directory = tempfile.mkdtemp(prefix="bench-large-index-")
    try:
        started = time.perf_counter()
        _build(os.path.join(directory, "scores"), members, rng)
        build = time.perf_counter() - started
        snapshot = sum(os.path.getsize(os.path.join(directory, "scores", f)) for f in os.listdir(directory + "/scores"))
        load, load_cpu = start_time(directory)
        gc.collect()
        return_free_memory()  # what the build freed is not counted as the load's, nor against it
        before = _rss()
        context = _Context(directory)
        stage = Stage(context, "scores")
        stage.start()
        context.clock.advance(0)
        assert stage.loaded and len(stage.store.boards[b"top"]) == members
        per_member = (_rss() - before) / members
        frozen_pause = max(_gc_pause() for _ in range(3))
        sets = budget.count(_SERVE_SETS, 20_000)
        new = [{b"set:top": {b"new%08d" % n: {b"v": b"v", b"i": rng.randrange(1 << 30)}}} for n in range(sets // 2)]
        updates = [
            {b"set:top": {b"member%08d" % rng.randrange(members): {b"i": rng.randrange(1 << 30)}}}
            for _ in range(sets - len(new))
        ]
        _serve(stage, new + updates)
        del new, updates  # the bench's own request tables: not the stage's heap
        context.clock.advance(FREEZE_CHECK)  # the stage's growth check, as a serving process runs it
        serving_pause = max(_gc_pause() for _ in range(3))
        compaction = _compaction_while_serving(stage, context, members, rng)
        chunk = stage.store.chunk
        stage.stop()
        gc.unfreeze()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    n = f"{members:,} members"
    return [
        row("index large: build (bulk load + snapshot)", build, "s", note=f"{n}, snapshot {snapshot:,} B"),
        *start_rows("index large", members, load, load_cpu),
        row(
            "index large: memory per member",
            per_member,
            "B",
            target="≤ 200",
            note=f"resident memory the load added, {n}",
        ),
        row("index large: GC pause, frozen after load", frozen_pause, "ms", target="≤ 20"),
        row(
            "index large: GC pause, serving",
            serving_pause,
            "ms",
            target="≤ 20",
            note=f"gc.collect() after {sets:,} sets (half new members) and the stage's growth check",
        ),
        row(
            "index large: compaction while serving",
            compaction["seconds"],
            "s",
            note=f"{compaction['steps']:,} steps of {chunk:,} members, a turn of {TURN} sets after each",
        ),
        row(
            "index large: request p99 during compaction",
            compaction["p99"],
            "ms",
            target="≤ 50",
            note=f"from the start of the step before it; max {compaction['max']:.1f} ms",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10_000_000, help="members in the index (default 10,000,000)")
    parser.add_argument("--json", metavar="PATH", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    print_standalone([judge(r, {}) for r in run(args.members)], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
