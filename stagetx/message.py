"""The message as it travels inside a process: what every stage receives from the router."""

from __future__ import annotations

import struct
from collections.abc import Iterator
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


#: Messages in one run entry at most: its count stays one msgpack byte (a positive fixint).
RUN_MAX = 127
#: Bytes of a run entry besides its parts and payloads: its count and the body's bin header.
_RUN_OVERHEAD = 8
#: A run entry packed in Python (``run_entries``) takes no more payloads once its body holds
#: this many bytes, as a Lua stage's outbox.
RUN_BODY_BYTES = 65536

#: The way (``Router.steady``) of messages to a stage of another server, where a process number
#: names the way to another process of this server.
CLUSTER_WAY = -2


class Run:
    """Messages of one sender to one stage, packed by the sender as one frame entry.

    ``body`` holds, per message, its id (msgpack str), payload (msgpack bin) and reply address
    (msgpack str or nil), back to back; a Lua stage reads them in Lua, so a run crosses from
    Python once per drain chunk, not once per message (``stagetx.router``, frame kind ``"r"``).
    Other stages take its messages a chunk at a time (``take``), decoded once. Runs of the same
    sender queued one after the other are joined (``add``), their bodies joined once, when first
    read. ``pos`` is where the next message starts (1-based, as Lua counts), ``count`` how many
    remain.
    """

    __slots__ = ("sender", "_parts", "size", "count", "enqueued", "pos", "_fields")

    def __init__(self, sender: Sender, body: bytes, count: int, enqueued: float = 0.0) -> None:
        self.sender = sender
        self._parts = [body]
        self.size = len(body)
        self.count = count
        self.enqueued = enqueued
        self.pos = 1
        self._fields: list[tuple[str, bytes, str | None]] | None = None  # what ``take`` has not taken

    @property
    def started(self) -> bool:
        """True once some of it was read: nothing may be joined to it then."""
        return self.pos > 1 or self._fields is not None

    def add(self, body: bytes, count: int) -> None:
        """The next run of the same sender to the same stage, joined to this one (not started)."""
        self._parts.append(body)
        self.size += len(body)
        self.count += count

    @property
    def body(self) -> bytes:
        parts = self._parts
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        return parts[0]

    def take(self, limit: int | None = None) -> list[Message]:
        """Up to ``limit`` (None: all) of the messages left, as single messages, for stages that
        take no runs; ``count`` is then what the body holds after them."""
        fields = self._fields
        if fields is None:
            body = self.body
            fields = run_fields(body[self.pos - 1 :] if self.pos > 1 else body)
            self.pos = len(body) + 1
        if limit is None or limit >= len(fields):
            taken, self._fields = fields, []
        else:
            taken, self._fields = fields[:limit], fields[limit:]
        self.count = len(self._fields)
        sender, enqueued = self.sender, self.enqueued
        return [Message(msgid, payload, sender, reply, enqueued) for msgid, payload, reply in taken]


def run_fields(body: bytes) -> list[tuple[str, bytes, str | None]]:
    """The id, payload and reply of each message of a run's ``body`` (``Run``), in order."""
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    fields = list(unpacker)
    return [(fields[i], fields[i + 1], fields[i + 2]) for i in range(0, len(fields) - 2, 3)]


_BIN8 = [bytes((0xC4, size)) for size in range(0x100)]  # bin 8 headers, by size


def bin_header(size: int) -> bytes:
    """The msgpack header of a bin of ``size`` bytes."""
    if size < 0x100:
        return _BIN8[size]
    if size < 0x10000:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)


def run_room(room: int, head: bytes, msgid: bytes, reply: bytes) -> int:
    """The largest payload that goes into a run entry to a steady address: ``room`` is the
    address's (``Router.steady``), ``head``, ``msgid`` and ``reply`` its parts (``Router.run_parts``)."""
    return room - len(head) - len(msgid) - len(reply) - _RUN_OVERHEAD


def run_entries(head: bytes, msgid: bytes, reply: bytes, payloads: list[bytes]) -> Iterator[tuple[bytes, int]]:
    """``payloads`` to one steady address as run entries, each with its message count: ``head``,
    ``msgid`` and ``reply`` are the address's parts (``Router.run_parts``), at most ``RUN_MAX``
    messages go in an entry and none is added once its body holds ``RUN_BODY_BYTES``."""
    parts: list[bytes] = []
    size = 0
    for payload in payloads:
        length = len(payload)
        parts += (msgid, _BIN8[length] if length < 0x100 else bin_header(length), payload, reply)
        size += length
        if len(parts) >= 4 * RUN_MAX or size >= RUN_BODY_BYTES:
            yield _run_entry(head, parts)
            parts, size = [], 0
    if parts:
        yield _run_entry(head, parts)


def _run_entry(head: bytes, parts: list[bytes]) -> tuple[bytes, int]:
    body = b"".join(parts)
    count = len(parts) // 4
    return head + bytes((count,)) + bin_header(len(body)) + body, count
