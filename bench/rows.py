"""The result row every benchmark returns, and how a row's target is judged.

A row is a plain dict (JSON as is) with the keys of :data:`KEYS`.  ``target`` is a short text
that is both shown and evaluated: ``"≥ 0.5 × baseline"``, ``"≥ 1000000"``, ``"≤ 1000"`` (in the
row's unit), or ``""`` for a figure without a target (baselines: status ``"info"``).
"""

from __future__ import annotations

import json
import re
from typing import Any

KEYS = (
    "workload",
    "figure",
    "unit",
    "baseline_name",
    "baseline",
    "ratio",
    "target",
    "status",
    "note",
)
STATUSES = ("pass", "short", "skip", "info")

_TARGET = re.compile(r"^\s*(≥|>=|≤|<=)\s*([0-9][0-9_,.]*)\s*(×\s*baseline)?\s*$")


def row(
    workload: str,
    figure: float | None,
    unit: str,
    *,
    baseline_name: str | None = None,
    baseline: float | None = None,
    target: str = "",
    status: str | None = None,
    note: str = "",
) -> dict[str, Any]:
    """A result row; ``status`` is left ``None`` to be judged once the baseline is known."""
    return {
        "workload": workload,
        "figure": figure,
        "unit": unit,
        "baseline_name": baseline_name,
        "baseline": baseline,
        "ratio": None,
        "target": target,
        "status": status,
        "note": note,
    }


def skip(workload: str, note: str, unit: str = "") -> dict[str, Any]:
    """A row for a benchmark that could not run here, saying why."""
    return row(workload, None, unit, status="skip", note=note)


def judge(r: dict[str, Any], baselines: dict[str, float]) -> dict[str, Any]:
    """Fill ``baseline``, ``ratio`` and ``status`` of ``r`` (a copy) from this run's baselines."""
    r = {key: r.get(key) for key in KEYS} | {"note": r.get("note") or "", "target": r.get("target") or ""}
    name = r["baseline_name"]
    if r["baseline"] is None and name:
        r["baseline"] = baselines.get(name)
    figure, base = r["figure"], r["baseline"]
    if isinstance(figure, (int, float)) and isinstance(base, (int, float)) and base:
        r["ratio"] = figure / base
    if r["status"] in STATUSES:
        return r
    if figure is None:
        r["status"] = "skip"
    elif not r["target"]:
        r["status"] = "info"
    else:
        r["status"] = _evaluate(r["target"], figure, base, r)
    return r


def _evaluate(target: str, figure: float, base: float | None, r: dict[str, Any]) -> str:
    m = _TARGET.match(target)
    if m is None:
        raise ValueError(f"target {target!r} of {r['workload']!r} is not '≥|≤ NUMBER [× baseline]'")
    op, number, relative = m.groups()
    bound = float(number.replace(",", "").replace("_", ""))
    if relative:
        if not base:
            r["note"] = (r["note"] + "; " if r["note"] else "") + f"no baseline {r['baseline_name']}"
            return "skip"
        bound *= base
    ok = figure >= bound if op in ("≥", ">=") else figure <= bound
    return "pass" if ok else "short"


def print_standalone(rows: list[dict[str, Any]], json_path: str | None) -> None:
    """The judged rows of a bench module run on its own, one line each, and as JSON when asked."""
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
        print(
            f"{r['workload']:<44} {r['figure']:>14,.1f} {r['unit']:<6} {ratio:>5} "
            f"{r['target']:<18} {r['status']:<5} {r['note']}"
        )
    if json_path:
        with open(json_path, "w") as out:
            json.dump(rows, out, indent=2)
