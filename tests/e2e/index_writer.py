"""A child process for the crash tests: sets members in turns of 1 to 64 and prints ``ack N`` for
each once the turn's log ``write()`` returned (``fail N`` when the write failed), compacting along
the way (``compacted`` / ``compaction failed``); runs until killed.

``python index_writer.py DIRECTORY FIRST`` sets ``m<FIRST>``, ``m<FIRST+1>``, … with score N.
"""

from __future__ import annotations

import sys
import time

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore

LIMIT = 2_000_000  # a bound, in case nobody kills us
RETRY_TURNS = 50  # turns to wait after a failed compaction (the stage waits seconds)


def main(directory: str, first: int) -> None:
    store = IndexStore(directory, compact_min_bytes=64 << 10, chunk=500)
    store.open()
    executor = Executor(store, key_size=32)
    compaction = None
    retry_at = 0
    number = first
    for turn in range(LIMIT):
        # like the stage's reactor turns: 1 to 64 requests, one commit, then their acks
        batch = range(number, number + 1 + turn % 64)
        for n in batch:
            executor.run({b"set:crash": {b"m%d" % n: {b"v": b"value %d" % n, b"i": n}}})
        try:
            store.commit()
            verdict = "ack"
        except OSError:
            verdict = "fail"
        sys.stdout.write("".join(f"{verdict} {n}\n" for n in batch))
        sys.stdout.flush()
        number = batch[-1] + 1
        if verdict == "fail":
            time.sleep(0.001)  # a full disk fails at once: do not spin
        if compaction is None and turn >= retry_at and store.wants_compaction():
            try:
                compaction = store.compaction()
            except OSError:
                retry_at = turn + RETRY_TURNS
        if compaction is not None:
            try:
                if next(compaction, "done") == "done":
                    compaction = None
                    print("compacted", flush=True)
            except OSError:
                compaction = None
                retry_at = turn + RETRY_TURNS
                print("compaction failed", flush=True)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
