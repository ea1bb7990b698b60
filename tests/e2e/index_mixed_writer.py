"""A child process for the crash tests: turns of mixed requests (``set`` in every tier with int and
float scores that tie, with and without values, ``I`` of several tiers, ``del``), the same turns
for the same seed, prints ``ack T`` once turn T's log write returned; compacts all the time.

``python index_mixed_writer.py DIRECTORY SEED``; runs until killed (or ``LIMIT`` turns).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from typing import Any

from stagetx.stages.index.commands import Executor
from stagetx.stages.index.store import IndexStore

LIMIT = 100_000  # a bound, in case nobody kills us
MEMBERS = 300  # few: members are set again, moved into ties and deleted
VALUES: list[Any] = [b"a", b"bb", 7, -1.5, [1, 2], {b"k": b"v"}, None]


def turns(seed: int) -> Iterator[list[dict[bytes, Any]]]:
    """The request tables of each turn, the same ones for the same seed."""
    rng = random.Random(seed)
    for turn in range(LIMIT):
        requests: list[dict[bytes, Any]] = []
        for _ in range(rng.randint(1, 12)):
            member = b"m%d" % rng.randrange(MEMBERS)
            board = rng.choice([b"x", b"y"])
            kind = rng.random()
            if kind < 0.5:
                spec: dict[bytes, Any] = {b"i": rng.choice([rng.randrange(20), rng.randrange(20) + 0.5])}
                if rng.random() < 0.5:
                    spec[b"v"] = rng.choice(VALUES)
                requests.append({b"set:%s/%d" % (board, rng.randint(1, 4)): {member: spec}})
            elif kind < 0.75:
                tiers = {rng.randint(1, 4): rng.randrange(10) for _ in range(2)}
                other = b"m%d" % rng.randrange(MEMBERS)
                requests.append({b"set:" + board: {member: {b"I": tiers, b"v": b"V%d" % turn}, other: {b"i": 3}}})
            else:
                requests.append({b"del:" + board: [member, b"m%d" % rng.randrange(MEMBERS)]})
        yield requests


def main(directory: str, seed: int) -> None:
    store = IndexStore(directory, compact_min_bytes=4096, chunk=2)  # a snapshot spans many turns
    store.open()
    executor = Executor(store, key_size=32)
    compaction = None
    for turn, requests in enumerate(turns(seed)):
        for request in requests:
            executor.run(request)
        store.commit()
        sys.stdout.write(f"ack {turn}\n")
        sys.stdout.flush()
        if compaction is None and store.wants_compaction():
            compaction = store.compaction()
        if compaction is not None and next(compaction, "done") == "done":
            compaction = None
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
