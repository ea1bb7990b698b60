"""The ``broker`` Lua global of a Lua stage: Python side of ``broker.lua``.

``install(stage)`` (listed in ``stagetx.lua.extensions.EXTENSIONS``) loads ``broker.lua`` into the
stage's main runtime with the host callables of a ``BrokerAPI``. Each endpoint the stage makes is
bound to a ``LuaHandler`` that runs the script's callbacks through ``vm.call`` (budget, error
reports: a failing callback is logged, the socket and the stage keep serving).

Each sandbox of the stage (a worker thread's runtime, ``stagetx.lua.sandbox``) gets a ``broker``
too, over a ``SandboxBroker``: what only reads (``broker.f``, socket fields, addresses) is answered
in the worker thread, from socket state that does not change once connected; what writes (commit,
close, signal) is checked and encoded there, then handed to the reactor with ``callFromThread``,
so the calls of one thread arrive in order. ``broker.submit`` queues a ``SocketJob`` on the
process's keyed queue (``stagetx.lua.workers``) with the socket as its key.

A reload of the stage (``Stage.reload``) does not close the stage's endpoints: the parker puts
them in a ``stagetx.broker.reload.Kept`` (``Stage.handover["broker"]``), which the next runtime's
``BrokerAPI`` takes: its ``broker.ready``/``broker.join`` claim the kept endpoints of the same
address, and ``Kept.finish`` offers their sockets to the new callbacks. If the new runtime fails
to load, ``release`` gives back what it claimed and ``Kept.restore`` returns every endpoint to
the old runtime, its sockets with their old callbacks.

Values: frames reach Lua as strings (``packet``, ``text``) or data (``bson``, ``json``); a value to send
is a string or number, or a table on a ``bson``/``json`` socket. Addresses are packed strings (see
``stagetx.broker.addresses``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from importlib import resources
from math import isfinite
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from stagetx.broker import addresses
from stagetx.broker.framing import SCHEMES, BrokerAddressError, Data, FrameError, FrameTooLarge, parse_url
from stagetx.broker.reload import Kept, is_listener, worth_keeping
from stagetx.broker.sockets import (
    Connection,
    Datagram,
    Endpoint,
    Registry,
    Socket,
    connect_tcp,
    listen_tcp,
    listen_udp,
    registry_for,
    url_text,
)
from stagetx.broker.tls import SECURE_SCHEMES, client_context, connect_tls, listen_tls, server_context
from stagetx.broker.traffic import Traffic
from stagetx.broker.websocket import connect_ws, listen_ws, set_page
from stagetx.codec import CodecError, pack_lua, pack_py, unpack_lua, unpack_py
from stagetx.config import TlsConfig
from stagetx.lua.api import defined_at, lua_text, next_delay, text
from stagetx.lua.sandbox import on_new_sandbox
from stagetx.lua.workers import QueueFull, workers_of

if TYPE_CHECKING:
    from stagetx.lua.runtime import LuaVM
    from stagetx.lua.sandbox import Sandbox, Sandboxes
    from stagetx.lua.workers import Workers

_BAD_TARGET = b"broker.signal: the target is a socket id, a table of them, or a packed address"
_SCRIPT = resources.files("stagetx.broker").joinpath("broker.lua").read_bytes()


def install(stage: Any) -> None:
    """Add the ``broker`` global to ``stage``'s main runtime and its sandboxes; its endpoints close
    when the stage stops, and are kept for the next runtime when it reloads."""
    kept = stage.handover.get("broker")
    api = BrokerAPI(stage.vm, stage.context.process, stage.context.log, stage.context.clock, kept=kept)
    api.traffic = stage.traffic
    api.report = stage.api.report
    stage.broker = api
    api.socket = _load(stage.vm, api.host())

    def park() -> None:
        stage.handover["broker"] = api.detach()

    def stop() -> Any:
        if api.detached:  # its endpoints went to the next runtime, or come back with restore
            return None
        if stage.rolling_back:  # this runtime failed to load: what it claimed goes back
            return api.release()
        return api.shutdown()

    stage.on_park(park)
    stage.on_stop(stop)
    on_new_sandbox(stage, api.install_sandbox)


def _load(vm: LuaVM, host: dict[str, Any]) -> Any:
    """Run ``broker.lua`` in ``vm`` with ``host``, set the ``broker`` global; its socket maker."""
    lua = vm.lua
    parts = vm.compile(_SCRIPT, b"@broker.lua")(lua.table_from({k.encode(): v for k, v in host.items()}))
    lua.globals()[b"broker"] = parts[b"broker"]
    return parts[b"socket"]


class LuaHandler:
    """The Lua callbacks of one endpoint: ``f`` (accept), ``receive`` and ``close``."""

    __slots__ = ("api", "endpoint", "accept", "receive", "on_close", "joined")

    def __init__(self, api: BrokerAPI, accept: Any) -> None:
        self.api = api
        self.endpoint: Endpoint
        self.accept = accept
        self.receive: Any = None
        self.on_close: Any = None
        self.joined: Any = None  # a broker.join's socket table, held: the script's fields live on it

    def accepted(self, sock: Socket) -> bool:
        api = self.api
        lua_sock = api.socket(sock.id)
        sock.state = (lua_sock, None, None)
        if isinstance(sock, Datagram):  # f is the receive function of each datagram (the original)
            if self.receive is None:
                self.receive = self.accept
            return True
        if self.accept is not None:
            ok, *results = api.vm.call("broker accept", self.accept, lua_sock, sock.peer or sock.local)
            answer = results[0] if results else None
            if not ok or answer is False:
                sock.state = None  # refused: no close callback
                return False
            if api.vm.lua_type(answer) == "function":
                sock.state = (lua_sock, answer, None)
        if sock.state[1] is None and self.receive is None and self.joined is None:
            # nothing would read this client: refused, as the original ("proper function does not exist");
            # a line per connection, so at the endpoint's bounded rate
            sock.endpoint.warnings.warn(
                "broker socket {sid} ({peer}) refused: no receive function (f returned none, listener.receive unset)",
                sid=sock.id,
                peer=sock.peer_text(),
            )
            sock.state = None
            return False
        return True

    def received(self, sock: Socket, value: Data, addr: bytes | None) -> None:
        state = sock.state
        if state is None:
            return
        lua_sock, receive, _ = state
        if receive is None:
            receive = self.receive
            if receive is None:
                return
        api = self.api
        if not isinstance(value, bytes):
            value = api.to_lua(value)
        ok, *replies = api.vm.call("broker receive", receive, lua_sock, value, addr)
        if ok is not True:
            return
        for reply in replies:  # each value returned is a frame of its own, as in the original
            if reply.__class__ is bytes:
                try:
                    sock.send(reply, addr)  # the common case: no conversion
                except FrameError as err:  # not UTF-8 on a text WebSocket
                    api.not_sent(receive, lua_text(f"broker socket {sock.id}: {err}"))
            elif reply is not None:
                api.reply(sock, reply, addr, receive)

    def closed(self, sock: Socket) -> None:
        """``close(socket, errno)`` as the original: 0 for a clean close, ``ETIMEDOUT`` on expiry;
        the socket's own ``close`` when it has one, else the listener's."""
        state = sock.state
        if state is not None:
            on_close = state[2] if state[2] is not None else self.on_close
            if on_close is not None:
                self.api.vm.call("broker close", on_close, state[0], sock.close_errno)
        sock.state = None

    def failed(self, endpoint: Endpoint, reason: str, code: int) -> None:
        """A join that did not connect: ``close(socket, errno)``, as the original (a reconnecting
        script reads its own fields off that socket)."""
        self.api.log.warn("broker.join {url}: {reason}", url=url_text(endpoint.url), reason=reason)
        self.api.endpoints.pop(endpoint.id, None)
        if self.on_close is not None:
            self.api.vm.call("broker close", self.on_close, self.joined, code)


class _Reads:
    """What every runtime's ``broker`` may do in its own thread: read sockets, convert addresses,
    and ``broker.signal`` up to how each runtime writes (``deliver``) or posts (``post_signal``).

    Socket fields read here (``peer``, ``local``) are set once when the socket connects, and the
    registry lookups are single dict reads, so worker threads may use them too.
    """

    vm: LuaVM
    registry: Registry

    def open(self, sid: Any) -> bool:
        """``broker.f``: is ``sid`` an open socket (its table is made in Lua)."""
        return type(sid) is int and sid in self.registry.sockets  # not a boolean (True == 1)

    def field(self, sid: int, key: Any) -> Any:
        sock = self.registry.get(sid)
        if sock is None:
            return None
        if key == 0:  # the socket id, as the original (its packed peer address is accept's addr)
            return sid
        if key == 1:
            return lua_text(sock.peer_text() or sock.local_text())
        if key == -1:
            return lua_text(sock.local_text())
        return None

    def aton(self, address: bytes, into: Any = None) -> tuple[Any, ...]:
        try:
            found = addresses.aton(text(address))
        except BrokerAddressError as err:
            return False, lua_text(str(err))
        if into is None:
            return (found[0],) if found else (False, b"no address")
        for index, packed in enumerate(found, 1):
            into[index] = packed
        return (into,)

    def ntoa(self, address: bytes, into: Any = None) -> tuple[Any, ...]:
        """``broker.ntoa``: a packed or text address as the original formats it, or its fields into ``t``."""
        try:
            host, port = addresses.read(address)
        except BrokerAddressError as err:
            return None, lua_text(f"broker.ntoa: {err}")
        if into is None:
            return (lua_text(addresses.text(host, port)),)
        for key, value in addresses.fields(host, port).items():
            into[key.encode()] = lua_text(value) if isinstance(value, str) else value
        return (into,)

    def ifaddr(self, name: Any = None) -> Any:
        found = addresses.interface_addresses()
        lua = self.vm.lua
        if name is not None:
            values = found.get(text(name))
            return None if values is None else lua.table_from([lua_text(a) for a in values])
        return lua.table_from({lua_text(k): lua.table_from([lua_text(a) for a in v]) for k, v in found.items()})

    def signal(self, target: Any, value: Any) -> tuple[Any, ...]:
        """``broker.signal(id | addr, v)``: ``v`` to socket ``id``'s receive function as if its
        client had sent it (what it returns goes to the client), as the original does; to a
        packed address, ``v`` is sent there. (A table of targets is ``broker.lua``'s, over ``deliver``.)"""
        if type(target) is not int:
            return self.deliver(target, value)
        if target not in self.registry.sockets:
            return False, lua_text(f"no socket {target}")
        try:
            data = value if isinstance(value, bytes) else self.to_py(value)
        except CodecError as err:
            return None, lua_text(f"broker.signal: {err}")
        self.post_signal(target, data)
        return (True,)

    def deliver(self, target: Any, value: Any) -> tuple[Any, ...]:
        """``v`` sent to socket ``target`` or to a packed address (this runtime's way of writing)."""
        raise NotImplementedError

    def post_signal(self, sid: int, data: Data) -> None:
        """Hand ``data`` to socket ``sid``'s receive function on the reactor thread, in call order."""
        raise NotImplementedError

    def to_py(self, value: Any) -> Data:
        if value is None or isinstance(value, (bytes, int, float)):
            return value
        return unpack_py(pack_lua(self.vm, (value,)))[0]


class BrokerAPI(_Reads):
    """The host callables behind one stage's ``broker`` table (reactor thread only)."""

    def __init__(
        self, vm: LuaVM, process: Any, log: Logger, clock: Any, reactor: Any = None, kept: Kept | None = None
    ) -> None:
        self.vm = vm
        self.log = log
        self.clock = clock
        self.reactor = reactor if reactor is not None else global_reactor
        self.registry: Registry = registry_for(process)
        self.services: dict[str, int] = dict(getattr(process, "services", {}) or {})
        config = getattr(process, "config", None)
        self.tls: TlsConfig = getattr(config, "tls", None) or TlsConfig()  # #tls: tls:// and wss:// files
        self.base_dir: str = getattr(config, "base_dir", None) or os.getcwd()  # listener pages are relative to it
        self.endpoints: dict[int, Endpoint] = {}
        self.socket: Any = None  # broker.lua's socket table maker of the main runtime
        self._workers: Workers | None = None
        self.kept = kept  # the endpoints the previous runtime left (a reload), until claimed
        self.detached = False  # its endpoints are parked for the next runtime (a reload under way)
        self.traffic: Traffic | None = None  # the stage's client totals, parent of each endpoint's
        self.report: Callable[[bytes, bytes, bytes], None]  # the stage's Lua error report (StageAPI.report)

    def host(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "join": self.join,
            "commit": self.commit,
            "close": self.close,
            "field": self.field,
            "open": self.open,
            "get": self.get,
            "set": self.set,
            "signal": self.signal,
            "deliver": self.deliver,
            "submit": lambda sid, f, *args: self.submit(self.vm, sid, f, args),
            "aton": self.aton,
            "ntoa": self.ntoa,
            "ifaddr": self.ifaddr,
        }

    def install_sandbox(self, sandbox: Sandbox) -> None:
        """The ``broker`` global of a new sandbox of this stage (on its worker thread)."""
        broker = SandboxBroker(self, sandbox.vm)
        broker.socket = _load(sandbox.vm, broker.host())
        sandbox.extensions["broker"] = broker

    # -- endpoints --------------------------------------------------------------------------------
    def _endpoint(self, url: bytes, f: Any, schemes: tuple[str, ...], what: str) -> tuple[Endpoint, bool]:
        """A new endpoint for ``url`` with ``f`` as its accept callback, or the one of that address
        the previous runtime left (a reload; then True: it listens, or is connected, already)."""
        parsed = parse_url(text(url))
        if parsed.scheme not in schemes:
            raise BrokerAddressError(f"{what}: {parsed.scheme}:// is not supported here")
        handler = LuaHandler(self, f)
        kept = self.kept.claim(parsed, what == "broker.join", handler) if self.kept is not None else None
        endpoint = kept if kept is not None else Endpoint(parsed, handler, self.registry, self.clock)
        endpoint.traffic.parent = self.traffic
        handler.endpoint = endpoint
        self.endpoints[endpoint.id] = endpoint
        return endpoint, kept is not None

    def ready(self, url: bytes, f: Any) -> tuple[Any, ...]:
        """``broker.ready``: listen (TCP) or bind (UDP), or take over the listener of that address
        the previous runtime left; returns the endpoint id. An address the system will not give
        (in use, not permitted) returns its errno and True instead, as the original, with the
        reason logged; a malformed address raises."""
        try:
            endpoint, kept = self._endpoint(url, f, SCHEMES, "broker.ready")
        except BrokerAddressError as err:
            return None, lua_text(f"broker.ready: {err}")
        if kept:
            return (endpoint.id,)
        try:
            scheme = endpoint.url.scheme
            tls = server_context(self.tls, endpoint.url) if scheme in SECURE_SCHEMES else None
            if scheme == "udp":
                listen_udp(self.reactor, endpoint)
            elif scheme in ("ws", "wss"):
                listen_ws(self.reactor, endpoint, self.services, tls)
            elif tls is not None:
                listen_tls(self.reactor, endpoint, self.services, tls)
            else:
                listen_tcp(self.reactor, endpoint, self.services)
        except Exception as err:  # CannotListenError and friends carry the OS reason
            self.endpoints.pop(endpoint.id, None)
            code = _errno_of(err)
            if code is None:
                return None, lua_text(f"broker.ready: {text(url)}: {err}")
            self.log.warn("broker.ready {url}: {error}", url=text(url), error=str(err))
            return code, True
        return (endpoint.id,)

    def join(self, url: bytes, f: Any) -> tuple[Any, ...]:
        """``broker.join``: connect (TCP), or take over the connection to that address the previous
        runtime left; ``f`` is called once connected. Returns the socket's table (the original's
        join returns the socket itself), which also takes the listener settings."""
        try:
            endpoint, kept = self._endpoint(url, f, ("tcp", "tls", "ws", "wss"), "broker.join")
            scheme = endpoint.url.scheme
            tls = client_context(self.tls, endpoint.url) if scheme in SECURE_SCHEMES and not kept else None
        except (BrokerAddressError, OSError) as err:
            return None, lua_text(f"broker.join: {err}")
        handler: LuaHandler = endpoint.handler  # type: ignore[assignment]
        handler.joined = self.socket(endpoint.id)
        if kept:
            return (handler.joined,)
        endpoint.dials = True
        if scheme in ("ws", "wss"):
            connect_ws(self.reactor, endpoint, tls)
        elif tls is not None:
            connect_tls(self.reactor, endpoint, tls)
        else:
            connect_tcp(self.reactor, endpoint)
        return (handler.joined,)

    def get(self, eid: int, key: bytes) -> Any:
        """A setting read back from a listener, join or socket table (``expire``, ``receive``):
        a socket's own, else its listener's."""
        endpoint = self.endpoints.get(eid)
        own: Any = None
        if endpoint is None:
            sock = self.registry.get(eid)
            if sock is None or sock.state is None:
                return None
            endpoint = sock.endpoint
            own = sock.own_expire if key == b"expire" else sock.state[1]
        handler: LuaHandler = endpoint.handler  # type: ignore[assignment]
        if key == b"expire":
            ms = (endpoint.expire if own is None else own) * 1000
            return int(ms) if ms.is_integer() else ms
        if key == b"receive":
            return handler.receive if own is None else own
        return None

    def set(self, eid: int, key: bytes, value: Any) -> tuple[Any, ...]:
        """A setting of a listener, join or socket table (``broker.lua`` passes only these keys)."""
        if key == b"commit":  # the original's flush interval; stagetx writes each frame at once
            if value is not None and not isinstance(value, (int, float)):
                return None, b"broker: commit (the flush interval) is a number of ms"
            return (True,)
        if value is not None and key in (b"close", b"receive") and self.vm.lua_type(value) != "function":
            return None, lua_text(f"broker: {text(key)} must be a function")
        if key == b"expire" and value is not None and (not isinstance(value, (int, float)) or not isfinite(value)):
            return None, b"broker: expire is a finite number of ms"
        endpoint = self.endpoints.get(eid)
        if endpoint is None:
            return self.set_socket(eid, key, value)
        handler: LuaHandler = endpoint.handler  # type: ignore[assignment]
        if key == b"page":
            return self.set_page(endpoint, value)
        if key == b"expire":
            endpoint.set_expire(value or 0)
        elif key == b"close":
            handler.on_close = value
        else:
            handler.receive = value
        return (True,)

    def set_socket(self, sid: int, key: bytes, value: Any) -> tuple[Any, ...]:
        """A setting on an accepted socket, as the original's socket table takes them: its own
        ``receive`` function, ``close`` callback and idle ``expire`` (nil: the listener's again);
        ``page`` is a listener's; a closed socket ignores settings (``set`` checked the values)."""
        if key == b"page":
            return None, b"broker: page is set on the listener, not on a socket"
        sock = self.registry.get(sid)
        if sock is None or sock.state is None:
            return (True,)
        lua_sock, receive, on_close = sock.state
        if key == b"receive":
            sock.state = (lua_sock, value, on_close)
        elif key == b"close":
            sock.state = (lua_sock, receive, value)
        else:
            sock.endpoint.set_socket_expire(sock, value)
        return (True,)

    def set_page(self, endpoint: Endpoint, value: Any) -> tuple[Any, ...]:
        """``listener.page = "file.html"``: what a ws/wss listener answers a browser's plain GET of
        ``/``; the path is relative to the configuration file; nil serves nothing (404)."""
        if endpoint.url.scheme not in ("ws", "wss"):
            return None, b"broker: page is for ws:// and wss:// listeners"
        if value is None:
            set_page(endpoint, None)
            return (True,)
        if not isinstance(value, bytes):
            return None, b"broker: page is the path of an HTML file"
        path = os.path.join(self.base_dir, text(value))
        try:
            with open(path, encoding="utf-8") as page:
                set_page(endpoint, page.read())
        except (OSError, UnicodeDecodeError) as err:
            return None, lua_text(f"broker: page {path}: {err}")
        return (True,)

    # -- sockets ----------------------------------------------------------------------------------
    def commit(self, sid: int, value: Any, addr: Any = None) -> tuple[Any, ...]:
        """``socket.commit(v [, addr])``: ``v`` sent; ``commit(nil)`` is the original's flush of what
        its commit interval held back, and nothing is held back here: 0 bytes."""
        sock = self.registry.get(sid)
        if sock is None:
            return False, lua_text(f"socket {sid} is closed")
        if value is None:
            return (0,)
        return self.send(sock, value, addr)

    def send(self, sock: Socket, value: Any, addr: Any) -> tuple[Any, ...]:
        """Send a Lua value on ``sock``: ``(bytes,)`` (the payload's size, which the original's
        commit returns), ``(False, reason)`` or ``(None, error)`` to raise."""
        try:
            payload = sock.endpoint.framing.payload(value if isinstance(value, bytes) else self.to_py(value))
            reason = sock.send_payload(payload, addr if isinstance(addr, bytes) else None)
        except (FrameError, CodecError) as err:
            return None, lua_text(f"broker socket {sock.id}: {err}")
        if reason is None:
            return (len(payload),)
        return False, lua_text(reason)

    def reply(self, sock: Socket, value: Any, addr: bytes | None, receive: Any) -> None:
        """Send what ``receive`` returned; a value the framing cannot carry is that function's Lua
        error (it returned, so where it is defined is the line to name), the socket keeps serving."""
        ok, *why = self.send(sock, value, addr)
        if ok is None:
            self.not_sent(receive, why[0])

    def not_sent(self, receive: Any, error: bytes) -> None:
        """The reply of ``receive`` could not be sent: its Lua error, the socket keeps serving."""
        self.report(b"broker receive", b"", lua_text(f"{defined_at(self.vm, receive)}: reply not sent: ") + error)

    def close(self, sid: Any) -> None:
        """``broker.close``/``socket.close``: a whole endpoint of this stage (a join's id is also its
        socket's: the join goes with it), or a socket."""
        if type(sid) is not int:
            return
        endpoint = self.endpoints.pop(sid, None)
        if endpoint is not None:
            endpoint.shutdown()
            return
        sock = self.registry.get(sid)
        if sock is not None:
            sock.close()

    def post_signal(self, sid: int, data: Data) -> None:
        # after the running callback, in call order: the receive function is not re-entered
        self.reactor.callFromThread(self.signalled, sid, data)

    def signalled(self, sid: int, data: Data) -> None:
        """``broker.signal(id, v)`` arrives: socket ``sid``'s endpoint handles ``data`` as a frame."""
        sock = self.registry.get(sid)
        if sock is not None and sock.connected:
            sock.endpoint.handler.received(sock, data, None)

    def deliver(self, target: Any, value: Any) -> tuple[Any, ...]:
        """Send ``v`` to one target of ``broker.signal``: a socket id, or a packed address."""
        if type(target) is int:
            sock = self.registry.get(target)
            if sock is None:
                return False, lua_text(f"no socket {target}")
            return _sent(self.send(sock, value, None))
        if not isinstance(target, bytes):
            return None, _BAD_TARGET
        sock = self.by_address(target)
        if sock is None:
            return False, lua_text("no socket for that address")
        return _sent(self.send(sock, value, target))

    def by_address(self, packed: bytes) -> Socket | None:
        """The socket ``broker.signal`` uses for an address: a TCP client connected from it, else
        this stage's first UDP socket."""
        sock = self.registry.by_peer(packed)
        if sock is not None:
            return sock
        return next((s for e in self.endpoints.values() for s in e.sockets.values() if isinstance(s, Datagram)), None)

    def signal_data(self, target: bytes, data: Data) -> None:
        """``broker.signal(addr, v)`` from a sandbox, on the reactor: ``v`` already converted."""
        sock = self.by_address(target)
        if sock is None:
            self.log.warn("broker.signal from a job: no socket for {addr}", addr=_address_text(target))
            return
        try:
            sock.send(data, target)
        except FrameError as err:
            self.log.error("broker.signal from a job: {error}", error=f"broker socket {sock.id}: {err}")

    def submit(self, vm: LuaVM, sid: int, f: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """``broker.submit(socket, f, v...)`` from ``vm`` (the main runtime or a sandbox, in its thread)."""
        workers = self._workers or workers_of(self.vm)
        if workers is None or workers.sandboxes.stopping:
            return None, b"broker.submit: the stage is stopping"
        self._workers = workers
        try:
            payload = pack_lua(vm, (f, *args))
            workers.queue.submit(SocketJob(sid, payload, workers.sandboxes, self.registry))
        except (CodecError, QueueFull) as err:
            return None, lua_text(f"broker.submit: {err}")
        return (True,)

    def endpoint_stats(self) -> list[dict[str, Any]]:
        """Each endpoint of this runtime: its address, kind, connected clients and traffic counters."""
        out = []
        for endpoint in sorted(self.endpoints.values(), key=lambda e: e.id):
            kind = endpoint.url.scheme if is_listener(endpoint) else "join"
            connected = sum(1 for sock in endpoint.sockets.values() if isinstance(sock, Connection))
            out.append(
                {"id": endpoint.id, "url": url_text(endpoint.url), "kind": kind, "connected": connected}
                | endpoint.traffic.as_dict()
            )
        return out

    def shutdown(self) -> Deferred[Any]:
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        return DeferredList([maybeDeferred(e.shutdown) for e in endpoints])

    def detach(self) -> Kept:
        """The stage reloads: park the endpoints worth keeping for the next runtime, close the rest."""
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        kept = [e for e in endpoints if worth_keeping(e)]
        for endpoint in endpoints:
            if endpoint not in kept:
                endpoint.shutdown()
        self.detached = True
        return Kept(kept, self.log, self.reattach)

    def reattach(self, endpoints: list[Endpoint]) -> None:
        """The reload failed: this runtime's endpoints are back, with their callbacks."""
        self.endpoints.update((e.id, e) for e in endpoints)
        self.detached = False

    def release(self) -> Deferred[Any]:
        """This runtime failed to load (a reload): the endpoints it claimed go back to the kept
        ones, the ones it opened close."""
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        opened = [e for e in endpoints if self.kept is None or not self.kept.unclaim(e)]
        return DeferredList([maybeDeferred(e.shutdown) for e in opened])

    def to_lua(self, value: Data) -> Any:
        return unpack_lua(self.vm, pack_py((value,)))[0]


class SandboxBroker(_Reads):
    """The host callables behind ``broker`` in one sandbox (its worker thread only).

    Writes are checked and encoded here (a bad value raises at the script's line), then run on
    the reactor thread by the stage's ``BrokerAPI``; they return ``true`` once handed over.
    """

    def __init__(self, main: BrokerAPI, vm: LuaVM) -> None:
        self.main = main
        self.vm = vm
        self.registry = main.registry
        self.call = main.reactor.callFromThread
        self.socket: Any = None  # broker.lua's socket table maker of this sandbox

    def host(self) -> dict[str, Any]:
        return {
            "ready": lambda *_: (None, b"broker.ready: only on the stage's own thread, not in a job"),
            "get": lambda *_: None,
            "set": lambda *_: (None, b"broker: socket settings only on the stage's own thread, not in a job"),
            "join": lambda *_: (None, b"broker.join: only on the stage's own thread, not in a job"),
            "commit": self.commit,
            "close": lambda sid: self.call(self.main.close, sid),
            "field": self.field,
            "open": self.open,
            "signal": self.signal,
            "deliver": self.deliver,
            "submit": lambda sid, f, *args: self.main.submit(self.vm, sid, f, args),
            "aton": self.aton,
            "ntoa": self.ntoa,
            "ifaddr": self.ifaddr,
        }

    def commit(self, sid: int, value: Any, addr: Any = None) -> tuple[Any, ...]:
        sock = self.registry.get(sid)
        if sock is None:
            return False, lua_text(f"socket {sid} is closed")
        if value is None:  # the original's flush, as on the stage's thread
            return (0,)
        return self._send(sock, value, addr if isinstance(addr, bytes) else None)

    def post_signal(self, sid: int, data: Data) -> None:
        self.call(self.main.signalled, sid, data)

    def deliver(self, target: Any, value: Any) -> tuple[Any, ...]:
        if type(target) is int:
            sock = self.registry.get(target)
            if sock is None:
                return False, lua_text(f"no socket {target}")
            return _sent(self._send(sock, value, None))
        if not isinstance(target, bytes):
            return None, _BAD_TARGET
        try:  # which socket has that peer is for the reactor to say; the value is checked here
            data = value if isinstance(value, bytes) else self.to_py(value)
        except CodecError as err:
            return None, lua_text(f"broker.signal: {err}")
        self.call(self.main.signal_data, target, data)
        return (True,)

    def _send(self, sock: Socket, value: Any, addr: bytes | None) -> tuple[Any, ...]:
        framing = sock.endpoint.framing
        try:
            payload = framing.payload(value if isinstance(value, bytes) else self.to_py(value))
        except (FrameError, CodecError) as err:
            return None, lua_text(f"broker socket {sock.id}: {err}")
        if isinstance(sock, Datagram) and not addr:
            return False, b"a UDP socket needs the address to send to"
        reason = None
        try:
            framing.check_out(len(payload))
        except FrameTooLarge as err:
            reason = lua_text(str(err))
        self.call(sock.send_payload, payload, addr)  # oversized: the reactor closes the connection, in order
        return (len(payload),) if reason is None else (False, reason)


class SocketJob:
    """One ``broker.submit``: ``f(socket, v...)`` in a sandbox, keyed by its socket.

    Jobs already queued run even once the socket has closed (its ``commit`` then returns false);
    a re-run asked by the return value does not happen once it has.
    """

    __slots__ = ("key", "sid", "payload", "sandboxes", "registry", "label", "ran")

    def __init__(self, sid: int, payload: bytes, sandboxes: Sandboxes, registry: Registry) -> None:
        self.key: Hashable = ("broker.socket", sid)  # no stage.submit key (a number or a string) is equal
        self.sid = sid
        self.payload = payload
        self.sandboxes = sandboxes
        self.registry = registry
        self.label = f"broker.submit job of socket {sid}"
        self.ran = False

    def run(self) -> float | None:
        if self.ran and self.sid not in self.registry.sockets:
            return None
        self.ran = True
        return self.sandboxes.run(self)

    def run_in(self, sandbox: Sandbox) -> float | None:
        """Run in ``sandbox`` (worker thread): the ms to run again after, or None."""
        vm = sandbox.vm
        broker: SandboxBroker = sandbox.extensions["broker"]
        try:
            f, *args = unpack_lua(vm, self.payload)
        except CodecError as err:
            sandbox.api.report(self.label.encode(), b"", lua_text(str(err)))
            return None
        ok, *results = vm.call(self.label, f, broker.socket(self.sid), *args)
        again = next_delay(vm, sandbox.api.report, self.label, "job", f, results[0] if ok and results else None)
        return again if self.sid in self.registry.sockets else None


def _sent(result: tuple[Any, ...]) -> tuple[Any, ...]:
    """``broker.signal``'s answer for one target: ``true`` for the byte count of a send."""
    return (True,) if type(result[0]) is int else result


def _errno_of(err: Exception) -> int | None:
    """The errno behind a failed listen (Twisted wraps it in ``CannotListenError``), if any."""
    if isinstance(err, CannotListenError):
        err = err.socketError
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    return code if isinstance(code, int) and code > 0 else None


def _address_text(packed: bytes) -> str:
    try:
        return addresses.text(*addresses.unpack(packed))
    except BrokerAddressError:
        return repr(packed)
