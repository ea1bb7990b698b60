"""The message as it travels inside a process: what every stage receives from the router."""

from __future__ import annotations

from typing import Any

import attrs
import msgpack

from stagetx.codec import unpack_py

#: Upper bounds (s) of the handler-time histogram each stage keeps (the last bucket is unbounded).
LATENCY_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@attrs.frozen
class Sender:
    """Who sent a message: server id, ``#startup`` group (0-based), stage id and instance number.

    ``instance`` numbers every stage of a server's ``#startup`` in reading order (0-based), so
    ``(server, instance)`` names one replica anywhere in a cluster.
    """

    server: str
    group: int
    stage: str
    instance: int


@attrs.define(slots=True)
class Message:
    """One delivered message.

    ``values`` holds the sent values as Python natives for built-in stages (strings as ``bytes``,
    sequences as ``list``, other tables as ``dict``) or as the encoded payload (``bytes``) until a
    Lua stage decodes it into its own runtime. ``reply`` is the opaque reply address (a string
    starting with ``^``) or ``None`` when the sender wants no reply.
    """

    msgid: str
    payload: bytes
    sender: Sender
    reply: str | None = None
    enqueued: float = 0.0
    _values: tuple[Any, ...] | None = None

    @property
    def values(self) -> tuple[Any, ...]:
        """The payload decoded to Python natives (decoded once, on first use)."""
        if self._values is None:
            self._values = unpack_py(self.payload)
        return self._values


#: The way (``Router.steady``) of messages to a stage of another server, where a process number
#: names the way to another process of this server.
CLUSTER_WAY = -2


class Run:
    """Messages of one sender to one stage, packed by the sender as one frame entry.

    ``body`` holds, per message, its id (msgpack str), payload (msgpack bin) and reply address
    (msgpack str or nil), back to back; a Lua stage reads them in Lua, so a run crosses from
    Python once per drain chunk, not once per message (``stagetx.router``, frame kind ``"r"``).
    Runs of the same sender queued one after the other are joined (``add``), their bodies joined
    once, when first read. ``pos`` is where the next message starts (1-based, as Lua counts),
    ``count`` how many remain.
    """

    __slots__ = ("sender", "_parts", "size", "count", "enqueued", "pos")

    def __init__(self, sender: Sender, body: bytes, count: int, enqueued: float = 0.0) -> None:
        self.sender = sender
        self._parts = [body]
        self.size = len(body)
        self.count = count
        self.enqueued = enqueued
        self.pos = 1

    def add(self, body: bytes, count: int) -> None:
        """The next run of the same sender to the same stage, joined to this one (not read yet)."""
        self._parts.append(body)
        self.size += len(body)
        self.count += count

    @property
    def body(self) -> bytes:
        parts = self._parts
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        return parts[0]

    def messages(self) -> list[Message]:
        """What is left of the run as single messages (for stages that take no runs)."""
        body = self.body
        fields = run_fields(body[self.pos - 1 :] if self.pos > 1 else body)
        sender, enqueued = self.sender, self.enqueued
        self.pos, self.count = len(body) + 1, 0
        return [Message(msgid, payload, sender, reply, enqueued) for msgid, payload, reply in fields]


def run_fields(body: bytes) -> list[tuple[str, bytes, str | None]]:
    """The id, payload and reply of each message of a run's ``body`` (``Run``), in order."""
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    fields = list(unpacker)
    return [(fields[i], fields[i + 1], fields[i + 2]) for i in range(0, len(fields) - 2, 3)]
