"""One asyncio connection to the default application: requests matched to replies by id, pushes.

Replies may come back in any order (a ``score`` waits for the index stage, a ``join`` does not),
so each request carries a fresh ``id`` and waits for the document with ``re`` equal to it.
Pushed documents go to ``on_push``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from stagetx.client.protocol import Command, Decoder, Document, ProtocolError, encode
from stagetx.client.websocket import WebSocketCodec, open_websocket

DEFAULT_TIMEOUT = 10.0
T = TypeVar("T")


class ConnectionClosed(ConnectionError):
    """The server closed the connection (or it broke) before a reply came."""


async def _within(awaitable: Awaitable[T], timeout: float, what: str) -> T:
    """``awaitable``'s result, or the built-in ``TimeoutError`` (a different class from asyncio's
    on Python 3.10, so callers catch one class whatever the version)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:  # noqa: UP041 (not yet the built-in one on Python 3.10)
        raise TimeoutError(f"timed out after {timeout:g} s {what}") from None


class Connection:
    """A connected client; use ``await Connection.open(host, port)`` and ``await close()``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_push: Callable[[Document], Any] | None = None,
        codec: WebSocketCodec | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._encode = codec.encode if codec is not None else encode  # BSON on TCP, JSON on a WebSocket
        self._decoder = codec.decoder if codec is not None else Decoder
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Document]] = {}
        self.on_push = on_push
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        timeout: float = DEFAULT_TIMEOUT,
        on_push: Callable[[Document], Any] | None = None,
        url: str | None = None,
    ) -> Connection:
        """Connect to ``host:port``, or with ``url`` (``ws://host:port/path``, ``wss://…``) to the
        application's WebSocket listener instead (JSON messages)."""
        if url is not None:
            reader, writer, codec = await _within(open_websocket(url), timeout, "connecting")
            return cls(reader, writer, on_push, codec)
        reader, writer = await _within(asyncio.open_connection(host, port), timeout, "connecting")
        return cls(reader, writer, on_push)

    async def request(self, command: Command, timeout: float = DEFAULT_TIMEOUT) -> Document:
        """Send ``command``; its reply document (``ok`` false replies included)."""
        if self.closed.done():
            raise ConnectionClosed("the connection is closed")
        request_id = next(self._ids)
        future: asyncio.Future[Document] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self._writer.write(self._encode(command.request(request_id)))
            return await _within(future, timeout, f"waiting for the reply to {command.op}")
        finally:
            self._waiting.pop(request_id, None)

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _read(self) -> None:
        decoder = self._decoder()
        reason: BaseException = ConnectionClosed("the server closed the connection")
        try:
            while data := await self._reader.read(1 << 16):
                for document in decoder.feed(data):
                    self._deliver(document)
        except (OSError, ProtocolError) as err:
            reason = ConnectionClosed(str(err))
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(reason)
            if not self.closed.done():
                self.closed.set_result(None)

    def _deliver(self, document: Document) -> None:
        """A reply to its waiting request, a push to ``on_push``; a ``re`` that is no request id
        this connection could have sent (a dict, a text, ``true``) is a ``ProtocolError``: the
        server is not speaking the protocol, and it must not crash the reader."""
        if "re" in document:
            re = document["re"]
            if isinstance(re, float) and re.is_integer():
                re = int(re)  # JSON numbers on a WebSocket may come back as 1.0
            if not isinstance(re, int) or isinstance(re, bool):
                raise ProtocolError(f"a reply whose re = {re!r} is not a request id")
            future = self._waiting.get(re)
            if future is not None and not future.done():
                future.set_result(document)
        elif self.on_push is not None:
            self.on_push(document)
