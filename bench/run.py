"""Run the benchmarks and print one table: ``python -m bench.run [--quick] [--only NAME…]
[--json PATH] [--compare OLD.json]``.

Baselines run first, in the same run and on the same machine, so every stagetx figure is read as
a ratio to them.  Each entry is a module with ``run(quick) -> list[dict]`` (rows of
:mod:`bench.rows`); an entry that fails or is not installed yields a skip row with the reason,
never a stopped run.  Results go to ``bench/results/<timestamp>.json`` and to ``--json PATH``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import attrs

from bench import budget, report
from bench.rows import judge, skip

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@attrs.frozen
class Entry:
    """One benchmark module; ``needs`` names the baseline entries its ratios refer to."""

    name: str
    module: str
    needs: tuple[str, ...] = ()
    baseline: bool = False  # every row is a baseline figure (shown in the baseline column)
    optional: bool = False  # a missing module is a skip row (another engineer's, not yet written)


REGISTRY: tuple[Entry, ...] = (
    Entry("twisted_raw", "bench.baselines.twisted_raw", baseline=True),
    Entry("lupa", "bench.baselines.lupa_calls", baseline=True),
    Entry("redis", "bench.baselines.redis_zset", baseline=True),
    Entry("local_signal", "bench.workloads.local_signal"),
    Entry("two_processes", "bench.workloads.two_processes", needs=("twisted_raw",)),
    Entry("cluster", "bench.workloads.cluster", needs=("twisted_raw",)),
    Entry("submit", "bench.workloads.submit", needs=("lupa",)),
    Entry("broker", "bench.workloads.broker", needs=("twisted_raw",)),
    Entry("broker_websocket", "bench.workloads.broker_websocket"),  # measures its raw servers itself
    Entry("index", "bench.bench_index", needs=("redis",), optional=True),
    Entry("index_e2e", "bench.workloads.index_e2e"),  # measures redis itself, around its own run
    Entry("index_redis", "bench.workloads.index_redis"),  # the index on its Redis backend, redis around it
)


def select(names: Sequence[str] | None) -> list[Entry]:
    """The entries to run, in registry order: ``names`` and the baselines they need (all if none)."""
    if not names:
        return list(REGISTRY)
    known = {e.name: e for e in REGISTRY}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = set(names) | {need for n in names for need in known[n].needs}
    return [e for e in REGISTRY if e.name in wanted]


def run_entry(entry: Entry, quick: bool) -> list[dict[str, Any]]:
    """The rows of one entry; failures become a skip row naming the error."""
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as e:
        if entry.optional and e.name == entry.module:
            return [skip(entry.name, f"{entry.module} not present yet")]
        raise
    try:
        return list(module.run(quick))
    except Exception as e:  # noqa: BLE001 - one broken benchmark must not stop the others
        traceback.print_exc(file=sys.stderr)
        return [skip(entry.name, f"failed: {type(e).__name__}: {e}")]


def run_all(entries: Sequence[Entry], quick: bool, progress: bool = True) -> tuple[list[dict[str, Any]], set[str]]:
    """Run ``entries`` in order and judge every row against this run's baselines.

    Returns the rows and the names of the baseline rows: those of baseline entries and any row
    another row names as its baseline.
    """
    raw: list[dict[str, Any]] = []
    baselines: set[str] = set()
    for entry in entries:
        start = time.monotonic()
        if progress:
            print(f"[bench] {entry.name} …", file=sys.stderr, flush=True)
        rows = run_entry(entry, quick)
        if progress:
            print(f"[bench] {entry.name}: {len(rows)} rows in {time.monotonic() - start:.1f} s", file=sys.stderr)
        raw.extend(rows)
        if entry.baseline:
            baselines.update(r["workload"] for r in rows)
    baselines.update(r["baseline_name"] for r in raw if r.get("baseline_name"))
    figures = {r["workload"]: r["figure"] for r in raw if isinstance(r.get("figure"), (int, float))}
    return [judge(r, figures) for r in raw], baselines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts: the whole run in < 2 minutes")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these: {', '.join(e.name for e in REGISTRY)}")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--compare", metavar="OLD.json", help="add a column with the change vs that run")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every count (smoke tests use 0.001)")
    p.add_argument("--results", metavar="DIR", default=RESULTS, help="where the timestamped JSON goes")
    a = p.parse_args(argv)
    old = report.load_rows(a.compare) if a.compare else None
    budget.configure(a.quick, a.scale)
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    rows, baselines = run_all(select(a.only), a.quick)
    doc = report.document(rows, started.isoformat(timespec="seconds"), time.monotonic() - clock, a.quick)
    doc["baselines"] = sorted(baselines)
    paths = [os.path.join(a.results, started.strftime("%Y%m%dT%H%M%SZ") + ".json")]
    if a.json:
        paths.append(a.json)
    for path in paths:
        report.write(doc, path)
    m = doc["machine"]
    print(
        f"stagetx benchmarks — {m['nproc']} cores, {m['cpu']}, Python {m['python']}, "
        f"Twisted {m['twisted']}, lupa {m['lupa']}; {'quick' if a.quick else 'full'} run, {doc['seconds']} s"
    )
    print(report.table(rows, baselines, old))
    print(f"\nresults: {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
