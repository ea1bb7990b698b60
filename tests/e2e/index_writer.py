"""A child process for the crash test: sets members in turns of 1 to 64 and prints ``ack N`` for
each once the turn's log ``write()`` returned, compacting along the way; runs until killed.

``python index_writer.py DIRECTORY FIRST`` sets ``m<FIRST>``, ``m<FIRST+1>``, … with score N.
"""

from __future__ import annotations

import sys

from stagetx.index.commands import Executor
from stagetx.index.store import IndexStore

LIMIT = 2_000_000  # a bound, in case nobody kills us


def main(directory: str, first: int) -> None:
    store = IndexStore(directory, compact_min_bytes=64 << 10, chunk=500)
    store.open()
    executor = Executor(store, key_size=32)
    compaction = None
    number = first
    for turn in range(LIMIT):
        # like the stage's reactor turns: 1 to 64 requests, one commit, then their acks
        batch = range(number, number + 1 + turn % 64)
        for n in batch:
            executor.run({b"set:crash": {b"m%d" % n: {b"v": b"value %d" % n, b"i": n}}})
        store.commit()
        sys.stdout.write("".join(f"ack {n}\n" for n in batch))
        sys.stdout.flush()
        number = batch[-1] + 1
        if compaction is None and store.wants_compaction():
            compaction = store.compaction()
        if compaction is not None and next(compaction, "done") == "done":
            compaction = None
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
