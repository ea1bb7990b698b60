"""A real stagetx server for one workload: temp config and scripts, ``twistd -n stage``, reaped.

The workload's Lua scripts do the measuring and log ``log4cxx.info("BENCH name", v1, v2, …)``;
:func:`bench_line` waits for that line in the server's relayed log and returns the numbers.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.procs import Peer, PeerError, spawn

TWISTD = "from twisted.scripts.twistd import run; run()"


@contextmanager
def server(config: Mapping[str, Any], scripts: Mapping[str, str]) -> Iterator[Peer]:
    """Run ``twistd -n stage`` on ``config`` with ``scripts`` (name → Lua text) beside it."""
    with tempfile.TemporaryDirectory(prefix="stagetx-bench-") as tmp:
        base = Path(tmp)
        for name, text in scripts.items():
            (base / f"{name}.lua").write_text(text, encoding="utf-8")
        (base / "stage.json").write_text(json.dumps(config), encoding="utf-8")
        argv = [
            sys.executable,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile=-",
            "stage",
            "-c",
            str(base / "stage.json"),
        ]
        with spawn(argv) as peer:
            yield peer


def bench_line(peer: Peer, name: str, timeout: float) -> list[float]:
    """The numbers of the first ``BENCH name`` log line, waiting at most ``timeout`` seconds."""
    pattern = re.compile(rb"BENCH " + re.escape(name.encode()) + rb"\b([-0-9.eE\t ]*)")
    errors: list[str] = []
    try:
        while True:
            line = peer.read_line(timeout)
            m = pattern.search(line)
            if m:
                return [float(v) for v in m.group(1).split()]
            if b"Error" in line or b"error" in line:
                errors.append(line.decode("utf-8", "replace")[-200:])
    except PeerError as e:
        raise PeerError(f"{e}; last errors: {errors[-3:]}") from None


def lua_stages(*names: str, groups: list[list[str]] | None = None, **settings: Any) -> dict[str, Any]:
    """A config running Lua stage ``names`` (main script = the stage id), one group each by default."""
    config: dict[str, Any] = {"#startup": groups or [[f"=lua+{n}"] for n in names]}
    for n in names:
        config[f"=lua+{n}"] = {"%package": ["[0]"], f"=lua+{n}": n, **settings}
    return config
