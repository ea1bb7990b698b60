"""The Twisted edge of the broker: listeners, connections and UDP ports, each with a process-wide id.

Nothing here knows Lua. An ``Endpoint`` (what ``broker.ready``/``broker.join`` made) carries a
``Handler`` that the Lua binding implements: it is told of each new socket (and may refuse it),
of each decoded frame, and of each close. Sockets are small slotted objects kept in the
process's ``Registry`` by id, so any stage or sandbox of the process can find one by its id.
Idle expiry is one sweep per endpoint, not one timer per connection, to keep idle sockets cheap;
a socket may have its own limit (``socket.expire``, the original's per-socket setting), which the
sweep honours instead of its listener's.

Across a reload of its stage (docs/operations.md) an endpoint is *parked*: it stops reading (its
port and every socket), so what clients send waits in the kernel, in order, bounded by the TCP
window; then ``resume`` offers its sockets to the new runtime's handler and reads again.
"""

from __future__ import annotations

import errno
import itertools
import socket
import weakref
from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet import error, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from stagetx.broker import addresses
from stagetx.broker.framing import BrokerURL, Data, FrameError, FrameTooLarge, Framing, framing_for
from stagetx.broker.traffic import Traffic
from stagetx.ratelog import RateLimitedLog

log = Logger(namespace="stagetx.broker")
WARN_INTERVAL = 10.0  # s: an endpoint logs at most WARN_BURST warnings about its clients per interval
WARN_BURST = 10
# bytes read of each datagram: any UDP payload whole (Twisted's default, 8 KiB, cuts longer ones
# short, and a cut one would reach Lua as if whole, or pass an IN limit it is over)
MAX_DATAGRAM = 65536
CLOSE_LINGER = 10.0  # s a closed connection's peer may take nothing of what is still due before it is dropped


class Handler(Protocol):
    """What an endpoint tells its owner (the Lua binding of one stage)."""

    def accepted(self, sock: Socket) -> bool:
        """A new socket; False refuses (closes) it."""

    def received(self, sock: Socket, value: Data, addr: bytes | None) -> None:
        """One decoded frame (``addr``: the sender of a datagram)."""

    def closed(self, sock: Socket) -> None:
        """The socket is gone (either side closed, expiry, oversized frame); why: ``sock.close_errno``."""

    def failed(self, endpoint: Endpoint, reason: str, code: int) -> None:
        """``broker.join`` could not connect: why, and the errno the original reports."""


class Parked:
    """The handler of a parked endpoint: keeps the sockets that connect meanwhile, holds frames.

    Reading is paused, so frames arrive here only from a read the reactor had already begun
    (at most one read per socket); a socket that closes meanwhile goes without a close callback.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.frames: dict[int, list[tuple[Data, bytes | None]]] = {}

    def accepted(self, sock: Socket) -> bool:
        sock.hold(PARKED)
        return True

    def received(self, sock: Socket, value: Data, addr: bytes | None) -> None:
        self.frames.setdefault(sock.id, []).append((value, addr))

    def closed(self, sock: Socket) -> None:
        self.frames.pop(sock.id, None)
        log.info("broker socket {sid} ({peer}) closed during a reload", sid=sock.id, peer=sock.peer_text())

    def failed(self, endpoint: Endpoint, reason: str, code: int) -> None:
        log.warn("broker.join {url} failed during a reload: {reason}", url=url_text(endpoint.url), reason=reason)


class Registry:
    """The live sockets of one process by id; ids are never reused."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.sockets: dict[int, Socket] = {}

    def next_id(self) -> int:
        return next(self._ids)

    def get(self, sid: int) -> Socket | None:
        return self.sockets.get(sid)

    def by_peer(self, packed: bytes) -> Socket | None:
        """A live TCP socket whose peer is ``packed`` (the oldest one)."""
        for sock in self.sockets.values():
            if isinstance(sock, Connection) and sock.peer == packed:
                return sock
        return None


_registries: weakref.WeakKeyDictionary[Any, Registry] = weakref.WeakKeyDictionary()


def registry_for(process: Any) -> Registry:
    """The registry of the process whose ``ProcessServices`` is ``process``."""
    registry = _registries.get(process)
    if registry is None:
        registry = _registries[process] = Registry()
    return registry


class Endpoint:
    """One ``broker.ready`` listener, UDP port or ``broker.join`` connector, and its sockets."""

    __slots__ = (
        "id",
        "url",
        "framing",
        "handler",
        "registry",
        "clock",
        "sockets",
        "expire",
        "port",
        "traffic",
        "dials",
        "warnings",
        "_sweeper",
        "_every",
        "__weakref__",
    )

    def __init__(self, url: BrokerURL, handler: Handler, registry: Registry, clock: IReactorTime) -> None:
        self.id = registry.next_id()
        self.url = url
        self.framing: Framing = framing_for(url)
        self.handler = handler
        self.registry = registry
        self.clock = clock
        self.sockets: dict[int, Socket] = {}
        self.expire = 0.0  # seconds idle before close; 0 = never
        self.port: Any = None  # IListeningPort, IConnector or the UDP port
        self.traffic = Traffic()  # its clients' counters (stagetx.broker.traffic)
        self.dials = False  # a broker.join: its one connection takes the endpoint's id
        # what its clients did wrong: a client that reconnects in a loop must not fill the log
        self.warnings = RateLimitedLog(log, clock, interval=WARN_INTERVAL, burst=WARN_BURST)
        self._sweeper: LoopingCall | None = None
        self._every = 0.0  # s between sweeps while the sweeper runs

    def socket_id(self) -> int:
        """The id of a new socket: a join's connection has the endpoint's own (the original's
        ``broker.join`` returns the socket itself), a listener's sockets new ones."""
        return self.id if self.dials else self.registry.next_id()

    @property
    def expiring(self) -> bool:
        """Whether idle time is being measured (some socket of this endpoint has a limit)."""
        return self._sweeper is not None

    def set_expire(self, ms: float) -> None:
        """Close sockets idle for ``ms`` (0 or less: never), those without a limit of their own;
        checked every eighth of the shortest limit."""
        self.expire = max(ms, 0) / 1000.0
        if self.expire:
            now = self.clock.seconds()
            for sock in self.sockets.values():
                sock.last = now
        self._stop_sweeper()
        self._schedule()

    def set_socket_expire(self, sock: Socket, ms: float | None) -> None:
        """``sock``'s own idle limit in ``ms`` (0 or less: never), or its listener's again (None);
        its idle time counts from now."""
        sock.own_expire = None if ms is None else max(ms, 0) / 1000.0
        sock.last = self.clock.seconds()
        limit = sock.own_expire
        if limit and (self._sweeper is None or _period(limit) < self._every):
            self._start_sweeper(limit)

    def _limit(self, sock: Socket) -> float:
        own = sock.own_expire
        return self.expire if own is None else own

    def _schedule(self) -> None:
        """Sweep for the shortest limit: the listener's or a socket's own (none: no sweep)."""
        limits = [limit for s in self.sockets.values() if (limit := s.own_expire)]
        if self.expire:
            limits.append(self.expire)
        if limits:
            self._start_sweeper(min(limits))

    def _start_sweeper(self, limit: float) -> None:
        self._stop_sweeper()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._every = _period(limit)
        self._sweeper.start(self._every, now=False)

    def _stop_sweeper(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None

    def _sweep(self) -> None:
        """Close the sockets idle past their limit; sweep less often (or stop) when the shortest
        limit left is longer (or gone), e.g. after the socket with a short one closed."""
        now = self.clock.seconds()
        limits = [self.expire] if self.expire else []  # new sockets get the listener's
        idle = []
        for sock in self.sockets.values():
            limit = self._limit(sock)
            if limit:
                if now - sock.last >= limit:
                    idle.append(sock)
                else:
                    limits.append(limit)
        for sock in idle:
            log.debug("broker socket {sid} idle; closing", sid=sock.id)
            sock.close_errno = errno.ETIMEDOUT
            sock.expire()
        if not limits:
            self._stop_sweeper()
        elif self._sweeper is not None and _period(min(limits)) > 2 * self._every:
            self._start_sweeper(min(limits))

    def add(self, sock: Socket) -> bool:
        """Register a new socket and ask the handler; False when it was refused."""
        sock.last = self.clock.seconds()
        self.sockets[sock.id] = sock
        self.registry.sockets[sock.id] = sock
        accepted = self.handler.accepted(sock)
        if isinstance(sock, Connection):
            self.traffic.opened(accepted)
        if not accepted:
            sock.close()
            return False
        return True

    def remove(self, sock: Socket) -> None:
        if self.sockets.pop(sock.id, None) is not None:
            self.registry.sockets.pop(sock.id, None)
            if isinstance(sock, Connection):
                self.traffic.gone()
            self.handler.closed(sock)

    def park(self) -> Parked:
        """Stop reading and expiring until ``resume``; the owner's handler is let go (a reload).

        Each socket's ``state`` (the old owner's value) is dropped with it.
        """
        self._stop_sweeper()
        parked = self.handler = Parked(self)
        _pause(self.port)
        for sock in self.sockets.values():
            sock.state = None
            sock.hold(PARKED)
        return parked

    def resume(self, parked: Parked, states: Mapping[int, Any] | None = None) -> None:
        """Offer every socket to the current ``handler`` as if it had just connected (in id order),
        hand it the frames ``parked`` held, then read and expire again. Idle time survives.

        A socket in ``states`` gets that ``state`` back instead of being offered (its owner's
        callbacks from before it was parked: a reload that failed)."""
        handler = self.handler
        for sock in sorted(self.sockets.values(), key=lambda s: s.id):
            if not sock.connected:
                continue
            if states is not None and sock.id in states:
                sock.state = states[sock.id]
            elif not handler.accepted(sock):
                sock.close()
                continue
            for value, addr in parked.frames.pop(sock.id, ()):
                if not sock.connected:
                    break
                handler.received(sock, value, addr)
            sock.release(PARKED)
        _resume(self.port)
        if self._sweeper is None:
            self._schedule()

    def shutdown(self) -> Any:
        """Stop listening (or connecting) and close every socket; may return a Deferred."""
        self._stop_sweeper()
        self.warnings.stop()
        for sock in list(self.sockets.values()):
            sock.close()
        port, self.port = self.port, None
        if port is None or isinstance(getattr(port, "protocol", None), Datagram):
            return None  # a UDP port stops with its Datagram (stopping it twice breaks Twisted's count)
        if hasattr(port, "stopListening"):
            return port.stopListening()
        port.disconnect()
        return None


#: Why a socket is not being read (bits of ``Connection.held``): its endpoint is parked for a
#: reload, its peer does not read what is written (``outbuf``), or it has ``inflight`` frames
#: unanswered.
PARKED, WRITES, INFLIGHT = 1, 2, 4


@implementer(IProtocol, IHalfCloseableProtocol, IPushProducer)
class Connection:
    """One TCP connection: frames in, values out. Slotted: thousands may sit idle.

    It is the producer of its own transport: when more than the URL's ``outbuf`` bytes wait to be
    written, Twisted pauses it and it stops reading the peer until they drained; past ``outmax``
    the peer is dropped. With ``inflight``, reading also pauses while that many frames received
    have had no frame sent back (a request/reply peer that pipelines without reading)."""

    __slots__ = (
        "id",
        "endpoint",
        "transport",
        "buf",
        "last",
        "peer",
        "local",
        "state",
        "connected",
        "held",
        "inflight",
        "half_closed",
        "backlog",
        "close_errno",
        "own_expire",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.id = endpoint.socket_id()
        self.endpoint = endpoint
        self.transport: Any = None
        self.buf = b""
        self.last = 0.0
        self.peer = b""
        self.local = b""  # packed local address, kept so that worker threads need not ask the transport
        self.state: Any = None  # the owner's per-socket value (the Lua binding's receive function)
        self.connected = 0
        self.held = 0  # PARKED | WRITES | INFLIGHT: reading is paused while any is set
        self.inflight = 0  # frames received minus frames sent, not below 0 (requests awaiting a reply)
        self.half_closed = False  # the peer shut down its write side
        self.backlog: list[bytes] = []  # frames of a read that came after the socket was held
        self.close_errno = 0  # why it closed, for the close callback (the original's errno): 0 = cleanly
        self.own_expire: float | None = None  # s idle before close (``socket.expire``); None: the listener's

    # -- IProtocol --------------------------------------------------------------------------------
    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = 1
        self.connectionMade()

    def connectionMade(self) -> None:
        # small replies must not wait for the client's delayed ACK (Nagle): ~40 ms per reply otherwise
        self.transport.setTcpNoDelay(True)
        self.transport.bufferSize = self.endpoint.url.outbuf
        self.transport.registerProducer(self, True)
        address = self.transport.getPeer()
        self.peer = addresses.pack(address.host, address.port)
        self.local = _packed_host(self.transport)
        self.endpoint.add(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.connected:
            return  # closed: what a peer still sends is not read (``close`` waits for its end)
        endpoint = self.endpoint
        if endpoint.expiring:
            self.last = endpoint.clock.seconds()
        size = len(data)
        if self.buf:
            data = self.buf + data
        try:
            frames, self.buf = endpoint.framing.split(data)
        except (FrameTooLarge, FrameError) as err:
            endpoint.traffic.received(0, size)
            if isinstance(err, FrameTooLarge):
                endpoint.traffic.dropped()
            self.buf = b""
            self.abort(str(err))
            return
        endpoint.traffic.received(len(frames), size)
        if frames:
            self._deliver(frames)

    def _deliver(self, frames: list[bytes]) -> None:
        """Hand ``frames`` to the handler in order; once the socket is held for its peer (WRITES,
        INFLIGHT), the rest of this read waits in ``backlog`` until it is released."""
        endpoint = self.endpoint
        framing, limit = endpoint.framing, endpoint.url.inflight
        for i, frame in enumerate(frames):
            if not self.connected:
                return
            if self.held & (WRITES | INFLIGHT):
                self.backlog.extend(frames[i:])  # after any frames already waiting (a WebSocket's next message)
                return
            try:
                value = framing.decode(frame)
            except FrameError as err:
                self.abort(str(err))
                return
            self.inflight += 1
            if limit and self.inflight >= limit:
                self.hold(INFLIGHT)
            endpoint.handler.received(self, value, None)

    def readConnectionLost(self) -> None:
        """The peer shut down its write side: it still gets a reply to each frame it sent (or
        until idle expiry), then the socket closes."""
        self.half_closed = True
        if not self.inflight and not self.backlog:
            self.close()

    def writeConnectionLost(self) -> None:
        pass  # only the peer half-closes; the socket closes as a whole

    # -- IPushProducer (of the transport's write buffer) -------------------------------------------
    def pauseProducing(self) -> None:
        self.hold(WRITES)

    def resumeProducing(self) -> None:
        self.release(WRITES)

    def stopProducing(self) -> None:
        pass  # the connection is going: connectionLost follows

    def hold(self, why: int) -> None:
        """Stop reading the peer for reason ``why`` (until ``release(why)``)."""
        if not self.held and self.transport is not None:
            self.transport.pauseProducing()
        self.held |= why

    def release(self, why: int) -> None:
        """Read again once no reason is left, after the frames of the last read that waited."""
        if self.held & why:
            self.held &= ~why
            if not self.held and self.backlog:
                frames, self.backlog = self.backlog, []
                self._deliver(frames)
            if not self.held and self.connected:
                self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected = 0
        self.lost_with(reason)
        self.endpoint.remove(self)

    def lost_with(self, reason: Failure) -> None:
        """Note why the connection went, unless expiry or an abort already said: a reset or other
        unclean loss is ``ECONNRESET`` (or the OS's errno)."""
        if not self.close_errno and not reason.check(error.ConnectionDone):
            code = getattr(reason.value, "osError", None)
            self.close_errno = code if isinstance(code, int) and code > 0 else errno.ECONNRESET

    def logPrefix(self) -> str:
        return f"broker socket {self.id}"

    # -- the socket API ---------------------------------------------------------------------------
    def send(self, value: Data, addr: bytes | None = None) -> str | None:
        """Send one value as one frame; returns None, or why it was not sent (the socket then closes)."""
        return self.send_payload(self.endpoint.framing.payload(value), addr)

    def send_payload(self, payload: bytes, addr: bytes | None = None) -> str | None:
        """``send`` of a value already made a payload by ``framing.payload`` (e.g. in a worker thread)."""
        if not self.connected:
            return "socket closed"
        framing = self.endpoint.framing
        try:
            framing.check_out(len(payload))
        except FrameTooLarge as err:
            self.endpoint.traffic.dropped()
            self.abort(str(err))
            return str(err)
        wrapped = framing.wrap(payload)
        self.transport.write(wrapped)
        return self.sent(len(wrapped))

    def sent(self, size: int) -> str | None:
        """Account for a frame of ``size`` bytes just written: the traffic counters, the requests
        in flight (a reply answers one), and a peer that does not read (past ``outmax`` unwritten
        bytes the connection is aborted: returns why)."""
        self.endpoint.traffic.sent(size)
        if self.inflight:
            self.inflight -= 1
            if self.held & INFLIGHT and self.inflight < self.endpoint.url.inflight:
                self.release(INFLIGHT)
            if self.half_closed and not self.inflight and not self.backlog:
                self.close()
        if self.held & WRITES and (unwritten := _unwritten(self.transport)) > self.endpoint.url.outmax:
            self.abort(f"{unwritten} bytes unwritten, over outmax (the peer does not read)")
            return "the peer does not read: connection closed"
        return None

    def close(self) -> None:
        """Close once what was sent is written; nothing is sent or delivered after this call.

        A peer that takes nothing of what is due for ``CLOSE_LINGER`` s is dropped."""
        if self.connected and self.transport is not None:
            self.connected = 0
            # a registered producer that the buffer once paused keeps Twisted from ever closing,
            # and TLS waits for the peer's close_notify, so it must read again (nothing is delivered)
            self.transport.unregisterProducer()
            if self.held:
                self.transport.resumeProducing()
            self.transport.loseConnection()
            if due := _unwritten(self.transport):
                self.endpoint.clock.callLater(CLOSE_LINGER, self._linger, due)

    def _linger(self, due: int) -> None:
        """Drop a closing connection whose peer took nothing of the ``due`` bytes since the last
        look: Twisted would wait for them for ever, and the descriptor with them."""
        if self.id not in self.endpoint.sockets:
            return  # gone
        left = _unwritten(self.transport)
        if left < due:
            self.endpoint.clock.callLater(CLOSE_LINGER, self._linger, left)
            return
        self.endpoint.warnings.warn(
            "broker socket {sid} ({peer}) closed: the peer took nothing of its last {due} bytes in {linger} s",
            sid=self.id,
            peer=self.peer_text(),
            due=left,
            linger=CLOSE_LINGER,
        )
        self.close_errno = self.close_errno or errno.ECONNABORTED
        self.transport.abortConnection()

    def expire(self) -> None:
        """Drop an idle connection at once: its peer may be gone, so nothing waits for unsent output."""
        if self.connected and self.transport is not None:
            self.connected = 0
            self.transport.abortConnection()

    def abort(self, reason: str) -> None:
        """Drop the connection at once because of ``reason`` (logged, at a bounded rate)."""
        self.endpoint.warnings.warn(
            "broker socket {sid} ({peer}) closed: {reason}", sid=self.id, peer=self.peer_text(), reason=reason
        )
        self.close_errno = self.close_errno or errno.ECONNABORTED
        if self.connected and self.transport is not None:
            self.transport.abortConnection()

    def peer_text(self) -> str:
        return addresses.text(*addresses.unpack(self.peer)) if self.peer else ""

    def local_text(self) -> str:
        return addresses.text(*addresses.unpack(self.local)) if self.local else ""


class Datagram(protocol.DatagramProtocol):
    """One bound UDP port (joined to its multicast group when the address is one)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.id = endpoint.id  # the port is its one socket: what broker.ready returned sends too
        self.endpoint = endpoint
        self.last = 0.0
        self.peer = b""
        self.local = b""
        self.state: Any = None
        self.connected = 0
        self.close_errno = 0
        self.own_expire: float | None = None

    def startProtocol(self) -> None:
        self.connected = 1
        self.local = _packed_host(self.transport)
        url = self.endpoint.url
        if addresses.is_multicast(url.host):
            loopback = "::1" if url.ipv6 else "127.0.0.1"
            self.transport.setTTL(1)
            self.transport.setLoopbackMode(1)
            if not url.ipv6:
                self.transport.setOutgoingInterface(loopback)
            self.transport.joinGroup(url.host, loopback)
        self.endpoint.add(self)

    def stopProtocol(self) -> None:
        self.connected = 0
        self.endpoint.remove(self)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        endpoint = self.endpoint
        if endpoint.expiring:
            self.last = endpoint.clock.seconds()
        sender = addresses.pack(addr[0], addr[1])
        try:
            endpoint.framing.check_in(len(data))
            value = endpoint.framing.decode(data)
        except (FrameTooLarge, FrameError) as err:
            endpoint.traffic.received(0, len(data))
            if isinstance(err, FrameTooLarge):
                endpoint.traffic.dropped()
            endpoint.warnings.warn(
                "broker UDP {sid}: datagram from {peer} dropped: {reason}",
                sid=self.id,
                peer=addresses.text(addr[0], addr[1]),
                reason=str(err),
            )
            return
        endpoint.traffic.received(1, len(data))
        endpoint.handler.received(self, value, sender)

    def send(self, value: Data, addr: bytes | None = None) -> str | None:
        """Send one datagram to ``addr`` (packed); returns None or why it was not sent."""
        return self.send_payload(self.endpoint.framing.payload(value), addr)

    def send_payload(self, payload: bytes, addr: bytes | None = None) -> str | None:
        """``send`` of a value already made a payload by ``framing.payload``."""
        if not self.connected:
            return "socket closed"
        if not addr:
            return "a UDP socket needs the address to send to"
        try:
            self.endpoint.framing.check_out(len(payload))
            host, port = addresses.unpack(addr)
        except (FrameTooLarge, ValueError) as err:
            if isinstance(err, FrameTooLarge):
                self.endpoint.traffic.dropped()
            return str(err)
        try:
            self.transport.write(payload, (host, port or 0))
        except OSError as err:
            return f"cannot send to {addresses.text(host, port)}: {err}"
        self.endpoint.traffic.sent(len(payload))
        return None

    def close(self) -> None:
        """Unbind; nothing is sent or delivered after this call."""
        if self.connected and self.transport is not None:
            self.connected = 0
            self.transport.stopListening()

    def hold(self, why: int) -> None:
        _pause(self.transport)

    def release(self, why: int) -> None:
        _resume(self.transport)

    def expire(self) -> None:
        self.close()

    def peer_text(self) -> str:
        return ""

    def local_text(self) -> str:
        return addresses.text(*addresses.unpack(self.local)) if self.local else ""


Socket = Connection | Datagram


def _period(limit: float) -> float:
    """How often to sweep for an idle limit of ``limit`` s: an eighth of it (at least 5 ms), so a
    socket closes between its limit and 1.125 × it."""
    return max(limit / 8, 0.005)


def _pause(transport: Any) -> None:
    """Stop reading from a port or connection (not a connector: it has nothing to read)."""
    if hasattr(transport, "pauseProducing"):
        transport.pauseProducing()


def _resume(transport: Any) -> None:
    if hasattr(transport, "resumeProducing"):
        transport.resumeProducing()


def _unwritten(transport: Any) -> int:
    """Bytes a TCP transport still holds for its peer (Twisted keeps no public count of them); a
    TLS connection is counted at the TCP transport beneath it."""
    while not hasattr(transport, "dataBuffer") and getattr(transport, "transport", None) is not None:
        transport = transport.transport
    if not hasattr(transport, "dataBuffer"):
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def url_text(url: BrokerURL) -> str:
    """``scheme://host:port`` of a broker URL, for log lines."""
    return f"{url.scheme}://{addresses.text(url.host, url.port)}"


def _packed_host(transport: Any) -> bytes:
    host = transport.getHost()
    return addresses.pack(host.host, host.port)


class _ListenFactory(protocol.Factory):
    noisy = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def buildProtocol(self, addr: Any) -> Connection:  # type: ignore[override]
        return Connection(self.endpoint)


class _JoinFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def buildProtocol(self, addr: Any) -> Connection:  # type: ignore[override]
        return Connection(self.endpoint)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.endpoint.port = None
        self.endpoint.handler.failed(self.endpoint, reason.getErrorMessage(), connect_errno(reason))


def connect_errno(reason: Failure) -> int:
    """The errno of a failed connect, which the original hands to the close callback."""
    err = reason.value
    code = getattr(err, "osError", None)
    if isinstance(code, int):
        return code
    if isinstance(err, error.TimeoutError):
        return errno.ETIMEDOUT
    if isinstance(err, error.ConnectionRefusedError):
        return errno.ECONNREFUSED
    if isinstance(err, error.DNSLookupError):
        return errno.EHOSTUNREACH
    return errno.ECONNABORTED


def listen_tcp(
    reactor: Any, endpoint: Endpoint, services: Mapping[str, int], factory: Any = None, tls: Any = None
) -> None:
    """Listen on the endpoint's address, adopting the inherited ``#services`` socket of that port.

    ``factory`` replaces the ``Connection`` one (a WebSocket or TLS listener); ``tls`` (a server
    context factory) puts TLS under it (``tls://``, ``wss://``)."""
    url = endpoint.url
    if factory is None:
        factory = _ListenFactory(endpoint)
    if tls is not None:
        factory = TLSMemoryBIOFactory(tls, False, factory)
    shared = shared_fd(url, services)
    if shared is not None:
        host, fd = shared
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        endpoint.port = reactor.adoptStreamPort(fd, family, factory)
        log.info(
            "broker: {scheme}://{address} on the shared #services socket",
            scheme=url.scheme,
            address=addresses.text(host, url.port),
        )
        return
    endpoint.port = reactor.listenTCP(url.port, factory, backlog=1024, interface=url.host)


def shared_fd(url: BrokerURL, services: Mapping[str, int]) -> tuple[str, int] | None:
    """(host, inherited fd) of the ``#services`` address with the URL's port (and host, unless the URL says any)."""
    for address, fd in services.items():
        host, port = addresses.split(address)
        if port == url.port and (url.host in ("0.0.0.0", "::") or url.host == host):
            return host, fd
    return None


def connect_tcp(reactor: Any, endpoint: Endpoint, timeout: float = 30.0) -> None:
    url = endpoint.url
    endpoint.port = reactor.connectTCP(url.host, url.port, _JoinFactory(endpoint), timeout=timeout)


def listen_udp(reactor: Any, endpoint: Endpoint) -> Datagram:
    """Bind the endpoint's UDP address; a multicast group is joined on the loopback interface only."""
    url = endpoint.url
    datagram = Datagram(endpoint)
    if addresses.is_multicast(url.host):
        endpoint.port = reactor.listenMulticast(
            url.port, datagram, interface=url.host, maxPacketSize=MAX_DATAGRAM, listenMultiple=True
        )
    else:
        endpoint.port = reactor.listenUDP(url.port, datagram, interface=url.host, maxPacketSize=MAX_DATAGRAM)
    return datagram
