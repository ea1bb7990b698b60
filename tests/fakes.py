"""Fakes of the router's neighbours: a stage that records what it receives, process links that
record what they send."""

from __future__ import annotations

from typing import Any

from stagetx.message import Message, Sender


class RecordingStage:
    """A router receiver that keeps every message it gets."""

    batches = False

    def __init__(self, instance: int, stage_id: str, server: str = "srv") -> None:
        self.instance = instance
        self.stage_id = stage_id
        self.sender = Sender(server, 0, stage_id, instance)
        self.got: list[Message] = []

    def receive(self, message: Message) -> None:
        self.got.append(message)

    def turn_ended(self) -> None:
        pass


class RecordingLinks:
    """Process links that keep every frame sent; groups in ``down`` are unreachable."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, list[Any]]] = []
        self.down: set[int] = set()
        self.flushes = 0

    def reachable(self, group: int) -> bool:
        return group not in self.down

    def send(self, group: int, frame: list[Any]) -> tuple[bool, str | None]:
        self.frames.append((group, frame))
        return True, None

    def flush(self) -> None:
        self.flushes += 1
