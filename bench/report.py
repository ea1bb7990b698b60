"""The run's report: the machine it ran on, one printed table, the JSON file, the comparison."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Collection, Sequence
from typing import Any

_SCALES = ((1e9, "G"), (1e6, "M"), (1e3, "k"))


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, CPU model, Python and library versions."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("twisted", "lupa", "msgpack", "sortedcontainers"):
        info[name] = _version(name)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fmt(value: float | None, unit: str = "") -> str:
    """``value`` for a table cell: rates with k/M/G (``1.23 M msg/s``), others to 3 digits."""
    if value is None:
        return "—"
    if unit == "x":
        return f"{value:.2f}×"
    prefix = ""
    if unit.endswith("/s"):
        for scale, letter in _SCALES:
            if abs(value) >= scale:
                value, prefix = value / scale, letter + " "
                break
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f} {prefix}{unit}".strip()


def change(new: float | None, old: float | None) -> str:
    """The relative change from ``old`` to ``new`` as a signed percentage (``—`` when unknown)."""
    if not isinstance(new, (int, float)) or not isinstance(old, (int, float)) or not old:
        return "—"
    return f"{(new - old) / old * 100:+.0f}%"


def table(
    rows: Sequence[dict[str, Any]],
    baselines: Collection[str] = (),
    old: dict[str, dict[str, Any]] | None = None,
) -> str:
    """One text table: workload | stagetx | baseline | ratio | target | pass/short [| change].

    Rows named in ``baselines`` show their figure in the baseline column.
    """
    head = ["workload", "stagetx", "baseline", "ratio", "target", "pass/short"]
    if old is not None:
        head.append("change")
    lines = [head]
    for r in rows:
        is_baseline = r["workload"] in baselines
        stagetx = "" if is_baseline else fmt(r["figure"], r["unit"])
        base = fmt(r["figure"] if is_baseline else r["baseline"], r["unit"])
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        cells = [r["workload"], stagetx, base, ratio, r["target"], r["status"]]
        if old is not None:
            prior = old.get(r["workload"])
            cells.append(change(r["figure"], prior["figure"] if prior else None))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    notes = [f"  {r['workload']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def document(rows: Sequence[dict[str, Any]], started: str, seconds: float, quick: bool) -> dict[str, Any]:
    """The JSON document of one run."""
    return {
        "started": started,
        "seconds": round(seconds, 1),
        "quick": quick,
        "machine": machine(),
        "argv": sys.argv[1:],
        "rows": list(rows),
    }


def write(doc: dict[str, Any], path: str) -> None:
    """Write ``doc`` as JSON to ``path``, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


def load_rows(path: str) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run's JSON, by workload."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return {r["workload"]: r for r in doc.get("rows", [])}
