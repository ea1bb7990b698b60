"""How big and how long each benchmark may run: one place that scales every count.

A benchmark asks :func:`count` for its message count and :func:`seconds` for its time cap, giving
the full and the ``--quick`` figure; the harness sets the mode once.  ``--scale`` shrinks counts
further (the smoke test runs with tiny counts so the harness cannot rot).
"""

from __future__ import annotations

_mode = {"quick": False, "scale": 1.0}


def configure(quick: bool, scale: float = 1.0) -> None:
    """Set the run mode for every later :func:`count` / :func:`seconds` call."""
    _mode["quick"] = quick
    _mode["scale"] = scale


def quick() -> bool:
    """Whether this is a ``--quick`` run."""
    return bool(_mode["quick"])


def count(full: int, quick_count: int) -> int:
    """The number of operations to run: ``full`` or ``quick_count``, times the scale (at least 1)."""
    base = quick_count if _mode["quick"] else full
    return max(1, int(base * _mode["scale"]))


def seconds(full: float, quick_seconds: float) -> float:
    """The wall-clock cap for one measurement; counts stop early when it is reached."""
    return quick_seconds if _mode["quick"] else full
