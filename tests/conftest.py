"""Fixtures shared by the unit and end-to-end tests; the ``e2e`` and ``slow`` markers by folder.

``tests/unit`` is the fast loop (fake time and transports, real Lua; ``tests/unit/conftest.py``
refuses the real reactor, talking sockets and processes there): ``make test-fast``. Tests in
``tests/integration`` (the real reactor in this process, loopback sockets, redis) and ``tests/e2e``
(real servers, child processes) are marked ``e2e``; ``tests/reliability`` and ``tests/fuzz`` are
``e2e`` and ``slow``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import setproctitle

WriteConfig = Callable[[dict[str, Any]], Path]

# setproctitle finds the memory it writes titles into (argv and the environment, contiguous) at its
# first use; once a test has changed an environment variable (monkeypatch.setenv) there is none
# left, and a stage's process.title reads back empty. It is used once before any test runs.
setproctitle.setproctitle(setproctitle.getproctitle())


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A server directory with the scripts the test configurations name.

    ``lua/start.lua``, ``lua/other.lua``, ``lib/util/strings.lua`` and ``preload/`` exist.
    """
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "start.lua").write_text('log4cxx.info("started")\n')
    (tmp_path / "lua" / "other.lua").write_text("return {}\n")
    (tmp_path / "lib" / "util").mkdir(parents=True)
    (tmp_path / "lib" / "util" / "strings.lua").write_text("return {}\n")
    (tmp_path / "preload").mkdir()
    return tmp_path


@pytest.fixture
def write_config(app_dir: Path) -> WriteConfig:
    """Write a configuration as ``stage.json`` in ``app_dir`` and return its path."""

    def write(raw: dict[str, Any]) -> Path:
        path = app_dir / "stage.json"
        path.write_text(json.dumps(raw))
        return path

    return write


_FOLDER_MARKS = {"integration": ("e2e",), "e2e": ("e2e",), "reliability": ("e2e", "slow"), "fuzz": ("e2e", "slow")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder, so ``-m "not e2e and not slow"`` is the unit loop."""
    root = Path(__file__).parent
    for item in items:
        try:
            folder = item.path.relative_to(root).parts[0]
        except ValueError:
            continue
        for mark in _FOLDER_MARKS.get(folder, ()):
            item.add_marker(mark)


_failures: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember each failing test, for the one line printed at the very end."""
    if report.failed:
        _failures.append(report.nodeid if report.when == "call" else f"{report.nodeid} ({report.when})")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Name the failed tests on the last line of the output, where a log tail (CI) still shows them."""
    if _failures:
        sys.__stdout__.write(f"failed tests: {' '.join(_failures)}\n")
