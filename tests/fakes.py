"""Fakes for unit tests: the router's neighbours (a stage that records what it receives, process
links that record what they send) and a pair of wire links joined by StringTransports."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from stagetx.message import Message, Sender
from stagetx.router import DRAIN_CHUNK
from stagetx.wire import Link, LinkClientFactory, LinkServerFactory, unpack_entries


class RecordingStage:
    """A router receiver that keeps every message it gets (a run's one by one)."""

    batches = False
    runs = False
    chunk = DRAIN_CHUNK

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

    def send_entries(self, group: int, entries: bytes, count: int) -> tuple[bool, str | None]:
        frames = unpack_entries(entries)
        assert len(frames) == count
        self.frames += [(group, frame) for frame in frames]
        return True, None

    def flush(self) -> None:
        self.flushes += 1


class ConnectedLinks(RecordingLinks):
    """Links to every group but those in ``down``, connected (steady); frames recorded."""

    room = 1 << 20

    def steady_room(self, group: int) -> int:
        return 0 if group in self.down else self.room


class LinkRecorder:
    """A link handler that writes down what happened."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.messages: list[Any] = []
        self.fail_on: object = object()

    def link_authenticated(self, link: Link) -> None:
        self.events.append(("auth", link.peer_id))

    def message_received(self, link: Link, obj: Any) -> None:
        if obj == self.fail_on:
            raise RuntimeError("handler bug")
        self.messages.append(obj)

    def link_lost(self, link: Link, reason: Failure) -> None:
        self.events.append(("lost", link.peer_id))

    @property
    def authentications(self) -> int:
        return sum(1 for event in self.events if event[0] == "auth")


class LinkPair:
    """A client and a server link joined by StringTransports; ``pump`` moves bytes across."""

    def __init__(self, client_secret: bytes = b"k", server_secret: bytes = b"k", max_frame: int = 1 << 20) -> None:
        self.clock = Clock()
        self.client_handler, self.server_handler = LinkRecorder(), LinkRecorder()
        client = LinkClientFactory(client_secret, "client-1", self.client_handler, max_frame, self.clock)
        server = LinkServerFactory(server_secret, "server-1", self.server_handler, max_frame, self.clock)
        self.client = client.buildProtocol(None)  # type: ignore[arg-type]
        self.server = server.buildProtocol(None)  # type: ignore[arg-type]
        self.ct, self.st = StringTransport(), StringTransport()
        self.client.makeConnection(self.ct)
        self.server.makeConnection(self.st)

    def pump(self) -> None:
        for _ in range(100):
            self.clock.advance(0)
            moved = False
            for src, link in ((self.ct, self.server), (self.st, self.client)):
                data = src.value()  # bytes already in flight arrive even after the sender aborts
                if data:
                    src.clear()
                    link.dataReceived(data)
                    moved = True
            if not moved:
                return

    def take(self, transport: StringTransport) -> list[bytes]:
        """The whole frames written on ``transport`` since the last take, as raw bytes."""
        data, frames = transport.value(), []
        transport.clear()
        while data:
            (n,) = struct.unpack_from("<I", data)
            frames.append(data[: 4 + n])
            data = data[4 + n :]
        return frames
