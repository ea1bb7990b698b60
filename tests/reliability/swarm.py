"""Many loopback TCP clients of a broker port, driven from one thread with ``selectors``.

Kinds of client: *holders* send a small packet every ``interval`` and expect its echo (they are
the well-behaved players); *dead* ones connect, send half a frame header and go silent;
*slowloris* ones trickle one byte of a never-finished frame every 0.2 s; *oversized* ones send a
length over the IN limit, reconnecting each time they are dropped.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time

import attrs


def packet(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


@attrs.define(eq=False)
class Client:
    kind: str
    sock: socket.socket
    opened: float
    inbox: bytes = b""
    sent: int = 0
    echoed: int = 0
    due: float = 0.0
    sent_at: dict[int, float] = attrs.field(factory=dict)
    closed_at: float | None = None


@attrs.define
class Stats:
    latencies: list[float] = attrs.field(factory=list)
    oversized_drops: list[float] = attrs.field(factory=list)  # seconds from the bad length to the close


class Swarm:
    """The clients of one run; ``run(seconds)`` drives them; ``clients`` lists them all."""

    def __init__(self, port: int, interval: float, limit_in: int) -> None:
        self.port = port
        self.interval = interval
        self.limit_in = limit_in
        self.selector = selectors.DefaultSelector()
        self.clients: list[Client] = []
        self.stats = Stats()

    def _connect(self, kind: str) -> Client:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setblocking(False)
        client = Client(kind, sock, time.monotonic())
        self.selector.register(sock, selectors.EVENT_READ, client)
        self.clients.append(client)
        return client

    def open(self, holders: int, dead: int, slowloris: int, oversized: int) -> None:
        now = time.monotonic()
        for i in range(holders):
            client = self._connect("holder")
            client.due = now + self.interval * (i / max(holders, 1))  # spread the pings
        for _ in range(dead):
            self._connect("dead").sock.send(b"\x10\x00")  # half a length field, then silence
        for _ in range(slowloris):
            self._connect("slowloris").sock.send(struct.pack("<I", self.limit_in))
        for _ in range(oversized):
            self._oversized()

    def _oversized(self) -> None:
        client = self._connect("oversized")
        client.sock.send(struct.pack("<I", self.limit_in + 1) + b"x" * 64)
        client.due = time.monotonic()

    def of(self, kind: str) -> list[Client]:
        return [c for c in self.clients if c.kind == kind]

    def run(self, seconds: float) -> None:
        """Drive every client for ``seconds``."""
        end = time.monotonic() + seconds
        next_trickle = 0.0
        while (now := time.monotonic()) < end:
            for key, _ in self.selector.select(timeout=0.01):
                self._readable(key.data, now)
            for client in self.clients:
                if client.kind == "holder" and client.closed_at is None and now >= client.due:
                    self._ping(client, now)
            if now >= next_trickle:
                next_trickle = now + 0.2
                for client in self.of("slowloris"):
                    if client.closed_at is None:
                        try:
                            client.sock.send(b"s")
                        except OSError:
                            self._closed(client, now)

    def _ping(self, client: Client, now: float) -> None:
        client.due = now + self.interval
        client.sent_at[client.sent] = now
        try:
            client.sock.send(packet(b"%d" % client.sent))
        except OSError:
            self._closed(client, now)
            return
        client.sent += 1

    def _readable(self, client: Client, now: float) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed(client, now)
            return
        client.inbox += data
        while len(client.inbox) >= 4:
            (size,) = struct.unpack_from("<I", client.inbox)
            if len(client.inbox) < 4 + size:
                break
            number = int(client.inbox[4 : 4 + size])
            client.inbox = client.inbox[4 + size :]
            self.stats.latencies.append(now - client.sent_at.pop(number))
            client.echoed += 1

    def _closed(self, client: Client, now: float) -> None:
        if client.closed_at is not None:
            return
        client.closed_at = now
        self.selector.unregister(client.sock)
        client.sock.close()
        if client.kind == "oversized":
            self.stats.oversized_drops.append(now - client.due)
            if len(self.stats.oversized_drops) < 200:  # keep abusing, boundedly
                self._oversized()

    def close(self) -> None:
        for client in self.clients:
            if client.closed_at is None:
                self.selector.unregister(client.sock)
                client.sock.close()
        self.selector.close()
