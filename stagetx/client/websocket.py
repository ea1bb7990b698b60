"""The client's WebSocket transport: the default application's documents as JSON text messages.

``--url ws://127.0.0.1:8082/play`` (or ``wss://``) makes the client talk to the front stages'
browser listener instead of the BSON TCP port. wsproto does the protocol (sans-IO) over the same
asyncio streams the TCP connection uses; this module only turns messages into documents.
``wss`` checks the server's certificate against the system's trust store (``SSL_CERT_FILE``
names another CA file).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request, TextMessage

from stagetx.client.protocol import MAX_REPLY, MAX_REQUEST, Document, ProtocolError


class WebSocketCodec:
    """Encodes requests as text messages and decodes the server's messages into documents; answers
    pings and the server's close frame on ``writer`` as they arrive."""

    def __init__(self, ws: WSConnection, writer: asyncio.StreamWriter) -> None:
        self.ws = ws
        self.writer = writer
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0

    def encode(self, document: Document) -> bytes:
        text = json.dumps(document, separators=(",", ":"))
        if len(text) > MAX_REQUEST:
            raise ProtocolError(f"a request of {len(text)} bytes is over the server's {MAX_REQUEST}")
        return self.ws.send(TextMessage(data=text))

    def decoder(self) -> WebSocketCodec:
        return self

    def feed(self, data: bytes) -> list[Document]:
        self.ws.receive_data(data)
        documents = []
        for event in self.ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._parts.append(event.data)
                self._size += len(event.data)
                if self._size > MAX_REPLY:
                    raise ProtocolError(f"a reply over {MAX_REPLY} bytes")
                if event.message_finished:
                    documents.append(self._document())
            elif isinstance(event, Ping):
                self.writer.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection) and self.ws.state is not ConnectionState.CLOSED:
                self.writer.write(self.ws.send(event.response()))
        return documents

    def _document(self) -> Document:
        parts, self._parts, self._size = self._parts, [], 0
        raw = "".join(p if isinstance(p, str) else p.decode("utf-8", "replace") for p in parts)
        try:
            document = json.loads(raw)
        except ValueError as err:
            raise ProtocolError(f"the server sent a message that is not JSON: {err}") from None
        if not isinstance(document, dict):
            raise ProtocolError("the server sent a JSON message that is not an object")
        return document


async def open_websocket(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, WebSocketCodec]:
    """Connect to ``url`` and finish the opening handshake; raises ``OSError`` when refused."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise OSError(f"{url}: expected ws://host:port/path or wss://host:port/path")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    context: Any = ssl.create_default_context() if secure else None
    reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
    ws = WSConnection(ConnectionType.CLIENT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    writer.write(ws.send(Request(host=parts.netloc, target=target)))
    while True:
        data = await reader.read(1 << 16)
        if not data:
            writer.close()
            raise OSError(f"{url}: the server closed the connection during the WebSocket handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return reader, writer, WebSocketCodec(ws, writer)
            if isinstance(event, RejectConnection):
                writer.close()
                raise OSError(f"{url}: the server refused the WebSocket (HTTP {event.status_code})")
