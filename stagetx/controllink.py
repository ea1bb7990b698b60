"""The control link between the supervisor and each child process: its socket and its frames.

A child (``stagetx.child.control``) connects to ``RUNDIR/control.sock`` with an authenticated
``wire.Link`` whose node id ``gN`` names its group, says ``Ready`` once its stages started, sends
``Stats`` every second and answers each ``Command`` with a ``CommandResult`` of the same id; the
supervisor's end is ``stagetx.admin.control``. Both ends build and read frames only here.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

SOCKET_NAME = "control.sock"

Result = tuple[bool, str, Any]  # ok, text (or the error), data for the JSON API


def control_path(rundir: str) -> str:
    """The control socket of the run directory ``rundir``."""
    return os.path.join(rundir, SOCKET_NAME)


def node_id(group: int) -> str:
    """The link node id of group ``group``'s process."""
    return f"g{group}"


@attrs.frozen
class Ready:
    """All stages of the process started."""

    def frame(self) -> list[Any]:
        return ["ready"]


@attrs.frozen
class Stats:
    """The process's stats snapshot (``stagetx.child.control.ProcessControl.snapshot``)."""

    snapshot: dict[str, Any]

    def frame(self) -> list[Any]:
        return ["stats", self.snapshot]


@attrs.frozen
class Command:
    """An admin command for the process; ``id`` pairs it with its ``CommandResult``."""

    id: int
    name: str
    args: list[str]

    def frame(self) -> list[Any]:
        return ["cmd", self.id, self.name, self.args]


@attrs.frozen
class CommandResult:
    """The outcome of the ``Command`` with the same ``id``."""

    id: int
    result: Result

    def frame(self) -> list[Any]:
        return ["result", self.id, *self.result]


Frame = Ready | Stats | Command | CommandResult


def read_frame(obj: Any) -> Frame | None:
    """The frame ``obj`` (a decoded link message) holds; None for anything else (ignored)."""
    if not isinstance(obj, list) or not obj:
        return None
    kind, fields = obj[0], obj[1:]
    if kind == "ready" and not fields:
        return Ready()
    if kind == "stats" and len(fields) == 1 and isinstance(fields[0], dict):
        return Stats(fields[0])
    if kind == "cmd" and len(fields) == 3 and isinstance(fields[2], list):
        return Command(fields[0], str(fields[1]), [str(arg) for arg in fields[2]])
    if kind == "result" and len(fields) == 4:
        return CommandResult(fields[0], (bool(fields[1]), str(fields[2]), fields[3]))
    return None
