"""A child process for the crash test: sets members one by one and prints ``ack N`` after each
durable set (the log ``write()`` returned), compacting along the way; runs until killed.

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
    for number in range(first, first + LIMIT):
        executor.run({b"set:crash": {b"m%d" % number: {b"v": b"value %d" % number, b"i": number}}})
        store.commit()
        sys.stdout.write(f"ack {number}\n")
        sys.stdout.flush()
        if compaction is None and store.wants_compaction():
            compaction = store.compaction()
        if compaction is not None and next(compaction, "done") == "done":
            compaction = None
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
