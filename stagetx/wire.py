"""Authenticated, length-prefixed links between processes and servers (Twisted protocols).

A ``Link`` carries msgpack-able objects in order; nothing a peer sends is decoded before the peer
has proved it holds the shared secret, and every later frame is authenticated and sequenced.

Wire format (all integers little-endian)::

    frame     = length:u32 payload            length = len(payload) <= max_frame (16 MiB default)
    HELLO     = "STGX" version:u16 nonce:32B node_id:UTF-8      first frame of each side
    PROOF     = HMAC-SHA256(secret, "stagetx-auth" role own_nonce peer_nonce
                            len:u16 own_id len:u16 peer_id)        second frame of each side
    data      = tag:16B body                   every frame after PROOF
    tag       = BLAKE2b-128(key = key[sender role], seq:u64 body)   (keyed BLAKE2b: a MAC)
    key[role] = HMAC-SHA256(secret, "stagetx-session" role client_nonce server_nonce)
    body      = msgpack array of the messages of one batch

``role`` is ``b"C"`` for the side that connected, ``b"S"`` for the side that accepted. ``seq``
counts the data frames of one direction from 0, so a replayed, dropped or reordered frame fails
its tag. One session key per direction (instead of one for both) keeps a frame reflected back to
its sender from verifying. A proof that does not verify ("peer … refused: bad secret"), a frame
over ``max_frame``, a bad tag or a body that is not a msgpack array drops that connection (logged
once), never the process. A peer that has not authenticated within ``handshake_timeout`` seconds
is dropped; until then its frames may not exceed ``HANDSHAKE_MAX_FRAME`` (64 KiB), so a stranger
cannot make a link buffer up to ``max_frame``.

Messages queued with ``Link.send`` (or ``send_entries``, packed by the sender) during one reactor
turn leave as one frame (write coalescing,
flushed by ``clock.callLater(0, …)``, by the router after each chunk of its drain turn, or at once
past ``FLUSH_BYTES``); a flush hands the frame to the kernel at once (``Link._send_now``).
Strings inside messages travel as msgpack str (UTF-8 with ``surrogateescape``), bytes as bin;
both come back as sent.
A ``Link`` is used from the reactor thread only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Any
from typing import Protocol as TypingProtocol

import attrs
import msgpack
from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stagetx import reactors

VERSION = 2
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
FLUSH_BYTES = 256 * 1024  # a batch this large is written at once, not at the end of the turn
#: Bytes a link's transport may hold before the link is ``stalled``: a few batches, so one turn's
#: output to a peer that reads never counts as a stall (Twisted pauses a producer as soon as one
#: write takes its buffer past this, before trying to send it).
LINK_BUFFER = 4 * FLUSH_BYTES
TAG_SIZE = 16
NONCE_SIZE = 32

_MAGIC = b"STGX"
_HELLO = struct.Struct("<4sH32s")
_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_ROLE_CLIENT = b"C"
_ROLE_SERVER = b"S"
_ARRAY_HEADER_MAX = 5
#: Longest frame an unauthenticated peer may send (a HELLO with the longest node id): a stranger
#: never makes a link buffer more than this.
HANDSHAKE_MAX_FRAME = _HELLO.size + 0xFFFF

log = Logger(namespace="stagetx.wire")
#: One packer for ``pack_message`` (``msgpack.packb`` builds a packer per call); the reactor
#: thread's only.
_PACKER = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")


class FrameTooLarge(ValueError):
    """One message that cannot fit in a frame of the link's ``max_frame``."""


def message_room(max_frame: int) -> int:
    """The largest packed message a link of ``max_frame`` carries."""
    return max_frame - TAG_SIZE - _ARRAY_HEADER_MAX


def pack_message(obj: Any) -> bytes:
    """``obj`` packed as a link packs it: what ``Link.send_packed`` takes, to pass on as it is."""
    return _PACKER.pack(obj)  # type: ignore[no-any-return]


def unpack_message(data: bytes) -> Any:
    """A message of ``pack_message`` as the receiving link would decode it."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False, unicode_errors="surrogateescape")


def check_fits(obj: Any, max_frame: int) -> None:
    """Raise ``FrameTooLarge`` as ``Link.send`` would, for a message queued before its link exists
    (found at queueing time, it is refused to its sender instead of failing the link later);
    ``obj`` may be packed already (bytes of ``pack_message``)."""
    size = len(obj if type(obj) is bytes else pack_message(obj))
    if size > message_room(max_frame):
        raise FrameTooLarge(f"message of {size} bytes exceeds the frame limit")


class LinkHandler(TypingProtocol):
    """Who is told about a link's life and messages (the router, the cluster)."""

    def link_authenticated(self, link: Link) -> None:
        """``link`` passed the handshake; ``link.peer_id`` is set; messages may follow."""

    def message_received(self, link: Link, obj: Any) -> None:
        """One message from ``link``, in the order sent."""

    # Optional: ``frame_done(link)``, called after every message of one frame was handed over (a
    # place to act on a whole batch at once, outside any message handler); ``link_drained(link)``,
    # called when a ``stalled`` link has written out what waited in it.

    def link_lost(self, link: Link, reason: Failure) -> None:
        """An authenticated ``link`` is gone (not called for links that never authenticated)."""


@attrs.frozen
class LinkSettings:
    """What both ends of a link are configured with."""

    secret: bytes = attrs.field(converter=lambda s: s.encode() if isinstance(s, str) else bytes(s))
    node_id: str
    handler: LinkHandler
    max_frame: int = DEFAULT_MAX_FRAME
    clock: IReactorTime | None = None
    handshake_timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        if not self.secret:
            raise ValueError("a link needs a non-empty secret")
        if len(self.node_id.encode("utf-8", "surrogateescape")) > 0xFFFF:
            raise ValueError("node id too long")
        if self.max_frame < 256:
            raise ValueError("max_frame must be at least 256 bytes")


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.sha256)


def _tag(keyed: Any, seq: int, body: bytes) -> bytes:
    """The tag of data frame ``seq``: ``keyed`` is the direction's keyed BLAKE2b, copied per frame
    (cheaper than HMAC-SHA256's two hashes and key setup per frame, and no concatenated copy)."""
    mac = keyed.copy()
    mac.update(_SEQ.pack(seq))
    mac.update(body)
    return mac.digest()  # type: ignore[no-any-return]


def _proof(secret: bytes, role: bytes, own_nonce: bytes, peer_nonce: bytes, own: bytes, peer: bytes) -> bytes:
    return _mac(
        secret,
        b"".join(
            (
                b"stagetx-auth",
                role,
                own_nonce,
                peer_nonce,
                len(own).to_bytes(2, "little"),
                own,
                len(peer).to_bytes(2, "little"),
                peer,
            )
        ),
    )


def unpack_entries(entries: bytes) -> list[Any]:
    """The messages of msgpack objects packed back to back (what ``Link.send_entries`` takes)."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, unicode_errors="surrogateescape", max_buffer_size=max(len(entries), 1)
    )
    unpacker.feed(entries)
    return list(unpacker)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, straight to its socket while nothing waits in it.

    A socket transport only queues in ``write()`` and registers itself as a writer with the
    reactor, which writes at its next write turn and takes it off again: two ``epoll_ctl`` calls
    and a wait for the turn's end. While nothing waits in the transport, the socket is written
    directly (``writeSomeData``, as the transport's own ``doWrite`` does); what the socket does
    not take, or meets with an error, goes through ``write()``, where the reactor writes it when
    it can or closes the connection as usual. Another transport (TLS) just gets ``write()``.
    """
    if (
        isinstance(transport, FileDescriptor)
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        sent = transport.writeSomeData(data)
        if type(sent) is int:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


@implementer(IPushProducer)
class Link(protocol.Protocol):
    """One authenticated connection to a peer process or server."""

    def __init__(self, settings: LinkSettings, role: bytes) -> None:
        self.settings = settings
        self.role = role
        self.peer_id: str | None = None
        self.authenticated = False
        self._clock = settings.clock
        self._node = settings.node_id.encode("utf-8", "surrogateescape")
        self._nonce = os.urandom(NONCE_SIZE)
        self._peer_nonce = b""
        self._peer_node = b""
        self._state = self._on_hello
        self._buffer = bytearray()
        self._dead = False  # dropped or lost: ignore further input and sends
        self._send_mac = self._recv_mac = hashlib.blake2b(digest_size=TAG_SIZE)  # keyed once authenticated
        self._send_seq = self._recv_seq = 0
        self._pending: list[bytes] = []  # packed messages, one or several (send_entries) each
        self._pending_bytes = 0
        self._pending_count = 0  # messages in _pending
        self._flush_call: IDelayedCall | None = None
        self._timeout_call: IDelayedCall | None = None
        self._packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        self.stalled = False  # the transport holds more than it takes: the peer is not reading

    # -- connection life -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._clock = reactors.resolve(self._clock)
        self._timeout_call = self._clock.callLater(self.settings.handshake_timeout, self._timed_out)
        self._write_frame(_HELLO.pack(_MAGIC, VERSION, self._nonce) + self._node)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._dead = True
        for call in (self._flush_call, self._timeout_call):
            if call is not None and call.active():
                call.cancel()
        self._pending.clear()
        self._pending_count = 0
        if self.authenticated:
            self.settings.handler.link_lost(self, reason)
        elif reason.check(SSL.Error):  # a TLS link whose peer has no certificate of the cluster CA
            log.warn(
                "peer at {address} refused: TLS handshake failed ({error})",
                address=self.peer_address,
                error=reason.getErrorMessage(),
            )

    def close(self) -> None:
        """Send what is queued, then close the connection."""
        self.flush()
        self._dead = True
        self.transport.unregisterProducer()  # a registered producer would keep it open
        self.transport.loseConnection()

    # -- flow control (IPushProducer of the link's own transport) ------------------------------

    def pauseProducing(self) -> None:
        """The transport's buffer passed its size: what is written now waits in this process."""
        self.stalled = True

    def resumeProducing(self) -> None:
        """The transport wrote out its buffer: the peer reads again."""
        self.stalled = False
        if getattr(self.transport, "disconnecting", False):
            # closed while paused (``ClientService`` stopping): Twisted closes once no producer is left
            self.transport.unregisterProducer()
            return
        link_drained = getattr(self.settings.handler, "link_drained", None)
        if link_drained is not None and not self._dead:
            link_drained(self)

    def stopProducing(self) -> None:
        """The connection is going; ``connectionLost`` follows."""

    @property
    def peer_address(self) -> IAddress | None:
        return self.transport.getPeer() if self.transport is not None else None

    def _describe_peer(self) -> str:
        claimed = self._peer_node.decode("utf-8", "replace") if self._peer_node else "?"
        return f"{claimed} at {self.peer_address}"

    def _drop(self, problem: str) -> None:
        """Abort the connection after a protocol violation, logged once."""
        if self._dead:
            return
        self._dead = True
        log.warn("peer {peer} refused: {problem}", peer=self._describe_peer(), problem=problem)
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def _timed_out(self) -> None:
        self._timeout_call = None
        self._drop(f"no handshake within {self.settings.handshake_timeout:g} s")

    # -- receiving -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._dead:
            return
        buf = self._buffer
        buf += data
        pos, size = 0, len(buf)
        while size - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            limit = self.settings.max_frame if self.authenticated else HANDSHAKE_MAX_FRAME
            if length > limit:
                self._drop(f"frame of {length} bytes over the limit of {limit}")
                return
            end = pos + 4 + length
            if end > size:
                break
            frame = bytes(buf[pos + 4 : end])
            pos = end
            self._state(frame)
            if self._dead:
                return
        del buf[:pos]

    def _on_hello(self, frame: bytes) -> None:
        if len(frame) < _HELLO.size:
            self._drop("not a stagetx peer")
            return
        magic, version, nonce = _HELLO.unpack_from(frame)
        if magic != _MAGIC:
            self._drop("not a stagetx peer")
            return
        self._peer_nonce, self._peer_node = nonce, frame[_HELLO.size :]
        if version != VERSION:
            self._drop(f"wire version {version}, this node speaks {VERSION}")
            return
        self._write_frame(_proof(self.settings.secret, self.role, self._nonce, nonce, self._node, self._peer_node))
        self._state = self._on_proof

    def _on_proof(self, frame: bytes) -> None:
        secret = self.settings.secret
        peer_role = _ROLE_SERVER if self.role == _ROLE_CLIENT else _ROLE_CLIENT
        expected = _proof(secret, peer_role, self._peer_nonce, self._nonce, self._peer_node, self._node)
        if not hmac.compare_digest(frame, expected):
            self._drop("bad secret")
            return
        if self.role == _ROLE_CLIENT:
            nonces = self._nonce + self._peer_nonce
        else:
            nonces = self._peer_nonce + self._nonce
        send_key = _mac(secret, b"stagetx-session" + self.role + nonces)
        recv_key = _mac(secret, b"stagetx-session" + peer_role + nonces)
        self._send_mac = hashlib.blake2b(key=send_key, digest_size=TAG_SIZE)
        self._recv_mac = hashlib.blake2b(key=recv_key, digest_size=TAG_SIZE)
        self.peer_id = self._peer_node.decode("utf-8", "surrogateescape")
        self.authenticated = True
        # ``stalled`` follows the transport's buffer (LINK_BUFFER); under TLS the TCP transport's
        for transport in (self.transport, getattr(self.transport, "transport", None)):
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = LINK_BUFFER
        self.transport.registerProducer(self, True)
        self._state = self._on_data
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None
        self.settings.handler.link_authenticated(self)
        self.flush()

    def _on_data(self, frame: bytes) -> None:
        body = frame[TAG_SIZE:]
        tag = _tag(self._recv_mac, self._recv_seq, body)
        if len(frame) < TAG_SIZE or not hmac.compare_digest(frame[:TAG_SIZE], tag):
            self._drop("bad frame tag (tampered, replayed or out of order)")
            return
        self._recv_seq += 1
        try:
            batch = msgpack.unpackb(body, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
        except Exception as e:  # an authenticated peer sent garbage: msgpack raises many types
            self._drop(f"undecodable frame: {e}")
            return
        if type(batch) is not list:
            self._drop("frame body is not a batch")
            return
        handler = self.settings.handler
        for obj in batch:
            try:
                handler.message_received(self, obj)
            except Exception:
                log.failure("message handler failed on a message from {peer}", peer=self.peer_id)
        frame_done = getattr(handler, "frame_done", None)
        if frame_done is not None:
            try:
                frame_done(self)
            except Exception:
                log.failure("frame handler failed on a frame from {peer}", peer=self.peer_id)

    # -- sending -------------------------------------------------------------------------------

    def send(self, obj: Any) -> bool:
        """Queue one msgpack-able object; ``False`` when the link is gone.

        Objects queued before authentication wait for it. Raises ``FrameTooLarge`` for an object
        that cannot fit in one frame, and msgpack's errors for objects it cannot pack.
        """
        if self._dead:
            return False
        return self.send_packed(self._packer.pack(obj))

    def send_packed(self, data: bytes) -> bool:
        """``send`` of a message packed already (``pack_message``): a frame passed on as it came."""
        if self._dead:
            return False
        if len(data) > message_room(self.settings.max_frame):
            raise FrameTooLarge(f"message of {len(data)} bytes exceeds the frame limit")
        self._queue(data, 1)
        return True

    def send_entries(self, entries: bytes, count: int) -> bool:
        """Queue ``count`` messages already packed back to back, as ``send`` queues them one by
        one; ``False`` when the link is gone. The sender keeps ``entries`` within ``message_room``."""
        if self._dead:
            return False
        self._queue(entries, count)
        return True

    def _queue(self, data: bytes, count: int) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._pending_count += count
        if self.authenticated:
            if self._pending_bytes >= FLUSH_BYTES:
                self.flush()
            elif self._flush_call is None:
                assert self._clock is not None
                self._flush_call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write what is queued now, as one frame (or several, past the frame limit)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self.authenticated or self._dead or not self._pending:
            return
        pending, count = self._pending, self._pending_count
        self._pending, self._pending_bytes, self._pending_count = [], 0, 0
        room = message_room(self.settings.max_frame)
        if sum(map(len, pending)) <= room:
            self._send_now(self._batch(pending, count))
            return
        one_each = count == len(pending)
        frames: list[bytes] = []
        batch: list[bytes] = []
        size = in_batch = 0
        for data in pending:
            if batch and size + len(data) > room:
                frames.append(self._batch(batch, in_batch))
                batch, size, in_batch = [], 0, 0
            batch.append(data)
            size += len(data)
            in_batch += 1 if one_each else len(unpack_entries(data))
        frames.append(self._batch(batch, in_batch))
        self._send_now(b"".join(frames))

    def _send_now(self, data: bytes) -> None:
        """Hand ``data`` to the kernel now rather than at the reactor's next write turn: the peer
        process would otherwise get the frame only after this process finishes its whole turn;
        writing at once lets the peer work meanwhile (``write_now``)."""
        write_now(self.transport, data)

    def _batch(self, parts: list[bytes], count: int) -> bytes:
        """One data frame holding the ``count`` messages packed in ``parts``."""
        body = _array_header(count) + b"".join(parts)
        tag = _tag(self._send_mac, self._send_seq, body)
        self._send_seq += 1
        return _LEN.pack(TAG_SIZE + len(body)) + tag + body

    def _write_frame(self, payload: bytes) -> None:
        self.transport.write(_LEN.pack(len(payload)) + payload)


class _LinkFactory(protocol.Factory):
    """What both ends' factories share: the settings, and building a ``Link`` in a role."""

    noisy = False  # no "Starting factory"/"Stopping factory" line at each (re)connection

    role: bytes

    def __init__(
        self,
        secret: bytes | str,
        node_id: str,
        handler: LinkHandler,
        max_frame: int = DEFAULT_MAX_FRAME,
        clock: IReactorTime | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.settings = LinkSettings(secret, node_id, handler, max_frame, clock, handshake_timeout)

    def buildProtocol(self, addr: IAddress | None) -> Link:
        link = Link(self.settings, self.role)
        link.factory = self
        return link


class LinkServerFactory(_LinkFactory):
    """Accepts links (TCP or UNIX); each connection is authenticated before use."""

    role = _ROLE_SERVER


class LinkClientFactory(_LinkFactory, protocol.ClientFactory):
    """Opens links (for ``connectTCP``/``connectUNIX``, endpoints or ``ClientService``)."""

    role = _ROLE_CLIENT
