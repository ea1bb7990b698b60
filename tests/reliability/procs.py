"""Helpers for the reliability tests: a real server's processes, their memory and file limits."""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import pytest

from tests.support import ServerProcess

_STARTED = re.compile(r"process (\d+) started, pid (\d+)")

LUA_APP = {"%package": ["[0]lua"]}


def raise_nofile(needed: int) -> None:
    """Raise this process's open-file limit (soft → hard; children inherit it) or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} file descriptors needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard))


def group_pids(server: ServerProcess) -> dict[int, int]:
    """The current pid of each group (0-based), from the supervisor's "process N started, pid P" lines."""
    pids: dict[int, int] = {}
    for line in list(server.lines):
        match = _STARTED.search(line)
        if match:
            pids[int(match.group(1)) - 1] = int(match.group(2))
    return pids


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
