"""The message as it travels inside a process: what every stage receives from the router."""

from __future__ import annotations

from typing import Any

import attrs

from stagetx.codec import unpack_py


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
