"""The index stage in-process: set / rank / top-100 on a large index beside bare ``SortedList``.

``python -m bench.bench_index [--quick] [--json PATH]`` or, from the harness, ``run(quick)``.
Every stagetx figure has its bare baseline measured in the same run on the same data: inserting
new members, score updates (remove + add + dict, what any sorted-set index must do), and rank
lookups. The stage runs with its real store (one log ``write()`` per reactor turn, before that
turn's replies; no fsync) and decodes a real msgpack payload per message; one message carries one
command, the worst case. A turn holds ``TURN`` messages (what 64 requests in flight give the
stage) except in the "1 message per turn" row; "small change" raises picked members' scores by
1 to 1,000 (a game's usual update: the member moves a few places). Rates are per second of
process CPU time (``time.process_time``), so other work on a shared machine does not bend them.
The start is timed on its own in a new process, as after a restart (wall clock and process CPU
time, beside redis-server's RDB load of a sorted set of as many members, measured in the same run); memory per member is
measured by another load of the snapshot under ``tracemalloc``; the GC pause is a full
``gc.collect()`` with the index alive: while serving (members set since the start, after the stage's growth check froze
them), unfrozen, and frozen after load as the stage does.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

from sortedcontainers import SortedList
from twisted.internet.task import Clock
from twisted.logger import Logger

from bench import budget
from bench.baselines.redis_zset import missing, rdb_load
from bench.rows import judge, print_standalone, row
from stagetx.codec import pack_py
from stagetx.message import Message, Sender
from stagetx.stages.index.stage import FREEZE_CHECK, Stage

_SENDER = Sender("bench", 0, "bench", 0)
_BATCH = 10_000  # messages prepared outside the timed loop at a time
TURN = 64  # messages per reactor turn: what 64 requests in flight give the stage


class _Context:
    """The smallest StageContext: replies are counted, not sent."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self.clock = Clock()
        self.stage_id, self.name, self.instance = "rank", "=index+rank", 0
        self.log = Logger(namespace="bench.index")
        self.replies = 0

    def resolve_path(self, path: str) -> str:
        return os.path.join(self.base_dir, path)

    def reply(self, message: Message, *values: Any) -> None:
        self.replies += 1

    def reply_all(self, replies: Sequence[tuple[Message, Any]]) -> None:
        self.replies += len(replies)

    def send(self, target: str, *values: Any) -> tuple[bool, str | None]:
        return False, "bench"


def _timed_messages(
    stage: Stage, context: _Context, requests: Callable[[int], Any], count: int, cap: float, per_turn: int = TURN
) -> float:
    """Rate of ``stage.receive`` over ``count`` messages, ``per_turn`` of them per reactor turn.

    A turn ends as the router ends it: ``turn_ended`` (one log write, then the replies).
    Payloads are packed outside the timing.
    """
    spent = 0.0
    done = 0
    while done < count and spent < cap:
        batch = [
            Message("b", pack_py((requests(i),)), _SENDER, reply="^b") for i in range(done, min(done + _BATCH, count))
        ]
        started = time.process_time()
        for start in range(0, len(batch), per_turn):
            for message in batch[start : start + per_turn]:
                stage.receive(message)
            stage.turn_ended()
        spent += time.process_time() - started
        done += len(batch)
    assert context.replies == done, "every message was answered"
    context.replies = 0
    return done / spent


def _bare(ids: list[bytes], scores: list[int], picks: list[int], new_scores: list[int]) -> dict[str, float]:
    """Bare SortedList + dict: inserts, score updates, rank lookups."""
    order: SortedList = SortedList()
    keys: dict[bytes, tuple[int, int, bytes]] = {}
    started = time.process_time()
    for seq, (member, score) in enumerate(zip(ids, scores)):
        key = (score, -seq, member)
        keys[member] = key
        order.add(key)
    insert = len(ids) / (time.process_time() - started)
    started = time.process_time()
    seq = -len(ids)
    for pick, score in zip(picks, new_scores):
        member = ids[pick]
        order.remove(keys[member])
        seq -= 1
        key = keys[member] = (score, seq, member)
        order.add(key)
    update = len(picks) / (time.process_time() - started)
    started = time.process_time()
    for pick in picks:
        order.bisect_left(keys[ids[pick]])
    rank = len(picks) / (time.process_time() - started)
    return {"insert": insert, "update": update, "rank": rank}


def _gc_pause() -> float:
    started = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - started) * 1000.0


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows for the bench harness (see ``bench.rows``)."""
    members = budget.count(1_000_000, 100_000)
    updates = budget.count(200_000, 30_000)
    cap = budget.seconds(60.0, 15.0)
    rng = random.Random(1)
    ids = [b"member%07d" % i for i in range(members)]
    scores = [rng.randrange(1 << 30) for _ in ids]
    picks = [rng.randrange(members) for _ in range(updates)]
    new_scores = [rng.randrange(1 << 30) for _ in range(updates)]
    bare = _bare(ids, scores, picks, new_scores)
    gc.collect()

    directory = tempfile.mkdtemp(prefix="bench-index-")
    try:
        context = _Context(directory)
        stage = Stage(context, "scores")
        stage.start()
        context.clock.advance(0)  # the load's steps
        stage.store.compact_min_bytes = 1 << 40  # compaction is measured apart, below
        insert = _timed_messages(
            stage, context, lambda i: {b"set:top": {ids[i]: {b"v": b"v", b"i": scores[i]}}}, members, cap
        )
        update = _timed_messages(
            stage, context, lambda i: {b"set:top": {ids[picks[i]]: {b"i": new_scores[i]}}}, updates, cap
        )
        current = dict(zip(ids, scores))
        current.update((ids[pick], score) for pick, score in zip(picks, new_scores))
        gains = []
        for pick in picks:
            current[ids[pick]] += 1 + rng.randrange(1000)
            gains.append(current[ids[pick]])
        small = _timed_messages(stage, context, lambda i: {b"set:top": {ids[picks[i]]: {b"i": gains[i]}}}, updates, cap)
        alone = _timed_messages(
            stage, context, lambda i: {b"set:top": {ids[picks[i]]: {b"i": gains[i] + 1}}}, updates, cap, 1
        )
        rank = _timed_messages(stage, context, lambda i: {b"get:top": [ids[picks[i]]]}, updates, cap)
        top = _timed_messages(stage, context, lambda i: {b"forEach:top": [1, 100]}, budget.count(20_000, 5_000), cap)
        context.clock.advance(FREEZE_CHECK)  # the stage's growth check, as a serving process runs it
        serving_pause = _gc_pause()
        log_bytes = stage.store.log_bytes
        stage.store.compact_min_bytes = 0  # the next turn's end starts a compaction
        stage.turn_ended()
        started = time.perf_counter()
        context.clock.advance(0)  # every step of it, as reactor turns would
        compaction = time.perf_counter() - started
        assert not stage.store.compacting
        stage.store.compact_min_bytes = 1 << 40
        gc.unfreeze()
        bare_pause = _gc_pause()
        stage.stop()
        del stage
        gc.collect()

        load, load_cpu = start_time(directory)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        again = Stage(_Context(directory), "scores")
        again.start()
        again.context.clock.advance(0)
        assert again.loaded
        per_member = (tracemalloc.get_traced_memory()[0] - before) / members
        tracemalloc.stop()
        frozen_pause = max(_gc_pause() for _ in range(3))
        again.stop()
    finally:
        gc.unfreeze()
        shutil.rmtree(directory, ignore_errors=True)

    n = f"{members:,} members"
    return [
        row("index: bare SortedList insert", bare["insert"], "ops/s", note=n),
        row("index: bare SortedList score update", bare["update"], "ops/s", note=n),
        row("index: bare SortedList rank", bare["rank"], "ops/s", note=n),
        row(
            "index: new members, in stage",
            insert,
            "msg/s",
            baseline_name="index: bare SortedList insert",
            baseline=bare["insert"],
            target="≥ 150000",
            note=f"one set per message, {TURN} messages per turn, durable log write, reply",
        ),
        row(
            "index: score update, in stage",
            update,
            "msg/s",
            baseline_name="index: bare SortedList score update",
            baseline=bare["update"],
            target="≥ 0.8 × baseline",
            note=f"one set per message incl. rank reply, {TURN} per turn, durable log write",
        ),
        row(
            "index: score update, small change, in stage",
            small,
            "msg/s",
            baseline_name="index: bare SortedList score update",
            baseline=bare["update"],
            note=f"score raised by 1 to 1,000, {TURN} per turn, durable log write",
        ),
        row(
            "index: score update, 1 message per turn",
            alone,
            "msg/s",
            target="≥ 100000",
            note="one log write() per message: a lone request in flight",
        ),
        row(
            "index: rank (get), in stage",
            rank,
            "msg/s",
            baseline_name="index: bare SortedList rank",
            baseline=bare["rank"],
        ),
        row("index: top-100 (forEach), in stage", top, "msg/s"),
        row("index: memory per member", per_member, "B", target="≤ 200", note=f"reloaded from snapshot, {n}"),
        row(
            "index: GC pause, serving",
            serving_pause,
            "ms",
            target="≤ 20",
            note=f"gc.collect() with {n} set since the start, after the stage's growth check (FREEZE_CHECK)",
        ),
        row("index: GC pause, bare", bare_pause, "ms", note="gc.collect() with the index alive, not frozen"),
        row("index: GC pause, frozen after load", frozen_pause, "ms", target="≤ 20"),
        row("index: snapshot (compaction)", compaction, "s", note=f"log was {log_bytes:,} B, now {members:,} members"),
        *start_rows("index", members, load, load_cpu),
    ]


def start_time(directory: str) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds of a start of the index stage on ``directory`` (the
    stage's config ``"scores"`` under it) in a new process, as after a restart (and as
    redis-server's load, a new process too): from ``start()`` to the end of the load's last step.
    A start in this process would also measure the heap the benchmark churned before it."""
    command = [sys.executable, "-c", f"import bench.bench_index as b; b.timed_start({directory!r})"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=root, check=True, capture_output=True, text=True, timeout=600)
    wall, cpu = done.stdout.split()
    return float(wall), float(cpu)


def timed_start(directory: str) -> None:
    """``start_time``'s new process: start the stage, run the load's steps back to back on the
    clock, print the wall-clock and CPU seconds it took."""
    context = _Context(directory)
    stage = Stage(context, "scores")
    started, cpu = time.perf_counter(), time.process_time()
    stage.start()
    context.clock.advance(0)
    assert stage.loaded
    print(time.perf_counter() - started, time.process_time() - cpu)
    stage.stop()


def start_rows(name: str, members: int, load: float, load_cpu: float) -> list[dict[str, Any]]:
    """The start rows of index ``name`` (``"index"``, ``"index large"``) beside redis-server's load
    of a sorted set of ``members`` from its RDB file, measured now: wall clock (what redis logs)
    and process CPU time, each a ratio. The target is on the CPU ratio: on a shared machine the
    wall clock of either load measures the other work of that moment as much as the load."""
    n = f"{members:,} members"
    wall_name, cpu_name = "redis: start (RDB load of a sorted set)", "redis: start, CPU time"
    reason = missing()
    if reason is not None:
        wall = cpu = None
        redis = [row(wall_name, None, "s", status="skip", note=reason)]
    else:
        with tempfile.TemporaryDirectory(prefix="bench-redis-rdb-") as directory:
            wall, cpu = rdb_load(members, directory)
        redis = [
            row(wall_name, wall, "s", note=f"{n}, the load time redis-server logs"),
            row(cpu_name, cpu, "s", note=f"{n}, the process's CPU time once it answers"),
        ]
    return [
        *redis,
        row(
            f"{name}: start (load snapshot)",
            load,
            "s",
            baseline_name=wall_name,
            baseline=wall,
            note=f"{n}: Stage.start() to loaded in a new process, wall clock",
        ),
        row(
            f"{name}: start, CPU time",
            load_cpu,
            "s",
            baseline_name=cpu_name,
            baseline=cpu,
            target="≤ 1.5 × baseline",
            note=f"{n}: Stage.start() to loaded in a new process, process CPU time",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 members instead of 1,000,000")
    parser.add_argument("--json", metavar="PATH", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    budget.configure(args.quick)
    print_standalone([judge(r, {}) for r in run(args.quick)], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
