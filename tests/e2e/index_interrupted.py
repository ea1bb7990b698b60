"""A child process for the crash tests that stops in the middle of a load or a compaction and waits
to be killed (``kill -9``), so the kill lands exactly there.

``python index_interrupted.py load DIRECTORY K``: starts loading the directory as a stage's start
does (``IndexStore.opening``), prints ``paused`` after step K, then waits.

``python index_interrupted.py compact DIRECTORY FIRST``: opens the directory, starts a compaction
and writes three chunks of its snapshot while setting ``m<FIRST>``, ``m<FIRST+1>``, … with score
N in ``crash`` between them (``ack N`` once each turn's log write returned, as index_writer.py),
then prints ``paused`` and waits.
"""

from __future__ import annotations

import sys
import time

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore

WAIT = 120.0  # a bound, in case nobody kills us


def load(directory: str, pause_after: int) -> None:
    store = IndexStore(directory)
    for step, _ in enumerate(store.opening(), 1):
        if step == pause_after:
            break
    else:
        raise SystemExit(f"the load has fewer than {pause_after} steps")
    print("paused", flush=True)
    time.sleep(WAIT)


def compact(directory: str, first: int) -> None:
    store = IndexStore(directory, chunk=500)
    store.open()
    executor = Executor(store, key_size=32)
    steps = store.compaction()
    number = first
    for _ in range(3):
        next(steps)
        batch = range(number, number + 50)
        for n in batch:
            executor.run({b"set:crash": {b"m%d" % n: {b"v": b"value %d" % n, b"i": n}}})
        store.commit()
        sys.stdout.write("".join(f"ack {n}\n" for n in batch))
        number += 50
    print("paused", flush=True)
    time.sleep(WAIT)


if __name__ == "__main__":
    if sys.argv[1] == "load":
        load(sys.argv[2], int(sys.argv[3]))
    else:
        compact(sys.argv[2], int(sys.argv[3]))
