"""Client traffic counters of one broker endpoint, and of all the endpoints of a stage.

An endpoint's ``Traffic`` has the stage's as its ``parent``: every count goes to both, so a
stage's totals keep what its closed listeners and earlier runtimes (reloads) counted. Read by
``stat``, ``/metrics`` and the dashboard (docs/operations.md, "Client metrics").
"""

from __future__ import annotations

from typing import Any

FIELDS = ("accepted", "refused", "closed", "frames_in", "frames_out", "bytes_in", "bytes_out", "oversized")


class Traffic:
    """Sockets accepted, refused by the script, closed; frames and bytes in and out; frames
    dropped as over the size limit (the connection with them)."""

    __slots__ = (*FIELDS, "parent")

    def __init__(self, parent: Traffic | None = None) -> None:
        self.parent = parent
        self.accepted = self.refused = self.closed = 0
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = self.oversized = 0

    def opened(self, accepted: bool) -> None:
        counter: Traffic | None = self
        while counter is not None:
            if accepted:
                counter.accepted += 1
            else:
                counter.refused += 1
            counter = counter.parent

    def gone(self) -> None:
        counter: Traffic | None = self
        while counter is not None:
            counter.closed += 1
            counter = counter.parent

    def received(self, frames: int, size: int) -> None:
        counter: Traffic | None = self
        while counter is not None:
            counter.frames_in += frames
            counter.bytes_in += size
            counter = counter.parent

    def sent(self, size: int) -> None:
        counter: Traffic | None = self
        while counter is not None:
            counter.frames_out += 1
            counter.bytes_out += size
            counter = counter.parent

    def dropped(self) -> None:
        counter: Traffic | None = self
        while counter is not None:
            counter.oversized += 1
            counter = counter.parent

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}
