"""The ``broker`` Lua global of a Lua stage: Python side of ``broker.lua``.

``install(stage)`` (listed in ``stagetx.lua.extensions.EXTENSIONS``) loads ``broker.lua`` into the
stage's main runtime with the host callables of a ``BrokerAPI``. Each endpoint the stage makes is
bound to a ``LuaHandler`` that runs the script's callbacks through ``vm.call`` (budget, error
reports: a failing callback is logged, the socket and the stage keep serving).

Values: frames reach Lua as strings (``packet``, ``text``) or tables (``bson``); a value to send
is a string or number, or a table on a ``bson`` socket. Addresses are packed strings (see
``stagetx.broker.addresses``).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from stagetx.broker import addresses
from stagetx.broker.framing import BrokerAddressError, Data, FrameError, parse_url
from stagetx.broker.sockets import (
    Datagram,
    Endpoint,
    Registry,
    Socket,
    connect_tcp,
    listen_tcp,
    listen_udp,
    registry_for,
)
from stagetx.codec import CodecError, pack_lua, pack_py, unpack_lua, unpack_py
from stagetx.lua.api import lua_text, text

if TYPE_CHECKING:
    from stagetx.lua.runtime import LuaVM

_LISTENER_FIELDS = (b"expire", b"close", b"receive")


def install(stage: Any) -> None:
    """Add the ``broker`` global to ``stage``'s main runtime; its endpoints close when the stage stops."""
    api = BrokerAPI(stage.vm, stage.context.process, stage.context.log, stage.context.clock)
    chunk = stage.vm.compile(
        resources.files("stagetx.broker").joinpath("broker.lua").read_bytes(), b"@broker.lua"
    )
    lua = stage.vm.lua
    parts = chunk(lua.table_from({k.encode(): v for k, v in api.host().items()}))
    api.new_socket = parts[b"socket"]
    lua.globals()[b"broker"] = parts[b"broker"]
    stage.on_stop(api.shutdown)


class LuaHandler:
    """The Lua callbacks of one endpoint: ``f`` (accept), ``receive`` and ``close``."""

    __slots__ = ("api", "endpoint", "accept", "receive", "on_close")

    def __init__(self, api: BrokerAPI, accept: Any) -> None:
        self.api = api
        self.endpoint: Endpoint
        self.accept = accept
        self.receive: Any = None
        self.on_close: Any = None

    def accepted(self, sock: Socket) -> bool:
        api = self.api
        lua_sock = api.new_socket(sock.id)
        sock.state = (lua_sock, None)
        if self.accept is None:
            return True
        ok, *results = api.vm.call("broker accept", self.accept, lua_sock, sock.peer or _local(sock))
        answer = results[0] if results else None
        if not ok or answer is False:
            sock.state = None  # refused: no close callback
            return False
        if api.vm.lua_type(answer) == "function":
            sock.state = (lua_sock, answer)
        return True

    def received(self, sock: Socket, value: Data, addr: bytes | None) -> None:
        state = sock.state
        if state is None:
            return
        lua_sock, receive = state
        if receive is None:
            receive = self.receive
            if receive is None:
                return
        api = self.api
        if not isinstance(value, bytes):
            value = api.to_lua(value)
        result = api.vm.call("broker receive", receive, lua_sock, value, addr)
        if len(result) > 1 and result[0] is True:
            reply = result[1]
            if reply.__class__ is bytes:
                sock.send(reply, addr)  # the common case: no conversion
            elif reply is not None:
                api.send(sock, reply, addr)

    def closed(self, sock: Socket) -> None:
        state = sock.state
        if state is not None and self.on_close is not None:
            self.api.vm.call("broker close", self.on_close, state[0])
        sock.state = None

    def failed(self, endpoint: Endpoint, reason: str) -> None:
        self.api.log.warn("broker.join {url}: {reason}", url=_url_text(endpoint), reason=reason)
        self.api.endpoints.pop(endpoint.id, None)
        if self.on_close is not None:
            self.api.vm.call("broker close", self.on_close, None, lua_text(reason))


class BrokerAPI:
    """The host callables behind one stage's ``broker`` table (reactor thread only)."""

    def __init__(self, vm: LuaVM, process: Any, log: Logger, clock: Any, reactor: Any = None) -> None:
        self.vm = vm
        self.log = log
        self.clock = clock
        self.reactor = reactor if reactor is not None else global_reactor
        self.registry: Registry = registry_for(process)
        self.services: dict[str, int] = dict(getattr(process, "services", {}) or {})
        self.endpoints: dict[int, Endpoint] = {}
        self.new_socket: Any = None

    def host(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "join": self.join,
            "commit": self.commit,
            "close": self.close,
            "field": self.field,
            "find": self.find,
            "get": self.get,
            "set": self.set,
            "signal": self.signal,
            "aton": self.aton,
            "ntoa": self.ntoa,
            "ifaddr": self.ifaddr,
        }

    # -- endpoints --------------------------------------------------------------------------------
    def _endpoint(self, url: bytes, f: Any, schemes: tuple[str, ...], what: str) -> Endpoint:
        parsed = parse_url(text(url))
        if parsed.scheme not in schemes:
            raise BrokerAddressError(f"{what}: {parsed.scheme}:// is not supported here")
        handler = LuaHandler(self, f)
        endpoint = Endpoint(parsed, handler, self.registry, self.clock)
        handler.endpoint = endpoint
        return endpoint

    def ready(self, url: bytes, f: Any) -> tuple[Any, ...]:
        """``broker.ready``: listen (TCP) or bind (UDP); returns the endpoint id."""
        try:
            endpoint = self._endpoint(url, f, ("tcp", "udp"), "broker.ready")
            self.endpoints[endpoint.id] = endpoint
            if endpoint.url.scheme == "udp":
                listen_udp(self.reactor, endpoint)
            else:
                listen_tcp(self.reactor, endpoint, self.services)
        except (BrokerAddressError, OSError) as err:
            return None, lua_text(f"broker.ready: {err}")
        except Exception as err:  # CannotListenError and friends carry the OS reason
            return None, lua_text(f"broker.ready: {text(url)}: {err}")
        return (endpoint.id,)

    def join(self, url: bytes, f: Any) -> tuple[Any, ...]:
        """``broker.join``: connect (TCP); ``f`` is called once connected."""
        try:
            endpoint = self._endpoint(url, f, ("tcp",), "broker.join")
        except BrokerAddressError as err:
            return None, lua_text(f"broker.join: {err}")
        self.endpoints[endpoint.id] = endpoint
        connect_tcp(self.reactor, endpoint)
        return (endpoint.id,)

    def get(self, eid: int, key: bytes) -> Any:
        endpoint = self.endpoints.get(eid)
        if endpoint is None:
            return None
        handler: LuaHandler = endpoint.handler  # type: ignore[assignment]
        if key == b"expire":
            ms = endpoint.expire * 1000
            return int(ms) if ms.is_integer() else ms
        if key == b"close":
            return handler.on_close
        if key == b"receive":
            return handler.receive
        return None

    def set(self, eid: int, key: bytes, value: Any) -> tuple[Any, ...]:
        endpoint = self.endpoints.get(eid)
        if key not in _LISTENER_FIELDS:
            return None, lua_text(f"broker listener: unknown field {text(key)!r} (expire, close, receive)")
        if endpoint is None:
            return (True,)  # a closed listener ignores settings
        handler: LuaHandler = endpoint.handler  # type: ignore[assignment]
        if key == b"expire":
            if not isinstance(value, (int, float)) and value is not None:
                return None, b"broker listener: expire is a number of ms"
            endpoint.set_expire(value or 0)
        elif value is not None and self.vm.lua_type(value) != "function":
            return None, lua_text(f"broker listener: {text(key)} must be a function")
        elif key == b"close":
            handler.on_close = value
        else:
            handler.receive = value
        return (True,)

    # -- sockets ----------------------------------------------------------------------------------
    def find(self, sid: Any) -> Any:
        """``broker.f(id)``: the socket table (this stage's own, or a new one naming the id)."""
        sock = self.registry.get(sid) if isinstance(sid, int) else None
        if sock is None:
            return None
        state = sock.state
        if state is not None and sock.endpoint.handler.__class__ is LuaHandler and sock.endpoint.handler.api is self:
            return state[0]
        return self.new_socket(sid)

    def field(self, sid: int, key: Any) -> Any:
        sock = self.registry.get(sid)
        if sock is None:
            return None
        if key == 0:
            return sock.peer or _local(sock)
        if key == 1:
            return lua_text(sock.peer_text() or sock.local_text())
        if key == -1:
            return lua_text(sock.local_text())
        return None

    def commit(self, sid: int, value: Any, addr: Any = None) -> tuple[Any, ...]:
        sock = self.registry.get(sid)
        if sock is None:
            return False, lua_text(f"socket {sid} is closed")
        return self.send(sock, value, addr, raise_errors=True)

    def send(self, sock: Socket, value: Any, addr: Any, raise_errors: bool = False) -> tuple[Any, ...]:
        """Send a Lua value on ``sock``: ``(True,)``, ``(False, reason)`` or ``(None, error)`` to raise."""
        try:
            data = value if isinstance(value, bytes) else self.to_py(value)
            reason = sock.send(data, addr if isinstance(addr, bytes) else None)
        except (FrameError, CodecError) as err:
            message = f"broker socket {sock.id}: {err}"
            if not raise_errors:
                self.log.error("{message}", message=message)
            return None, lua_text(message)
        if reason is None:
            return (True,)
        return False, lua_text(reason)

    def close(self, sid: Any) -> None:
        """``broker.close``/``socket.close``: a socket or a whole endpoint of this stage."""
        if not isinstance(sid, int):
            return
        sock = self.registry.get(sid)
        if sock is not None:
            sock.close()
            return
        endpoint = self.endpoints.pop(sid, None)
        if endpoint is not None:
            endpoint.shutdown()

    def signal(self, target: Any, value: Any) -> tuple[Any, ...]:
        """``broker.signal(id | addr, v)``: send ``v`` to a client by socket id or by its address.

        An address names a TCP client connected from it, else gets a datagram from this stage's
        first UDP socket.
        """
        if isinstance(target, int):
            sock = self.registry.get(target)
            if sock is None:
                return False, lua_text(f"no socket {target}")
            return self.send(sock, value, None, raise_errors=True)
        if not isinstance(target, bytes):
            return None, b"broker.signal: the target is a socket id or a packed address"
        sock = self.registry.by_peer(target)
        if sock is None:
            sock = next((s for e in self.endpoints.values() for s in e.sockets.values() if isinstance(s, Datagram)), None)
        if sock is None:
            return False, lua_text("no socket for that address")
        return self.send(sock, value, target, raise_errors=True)

    # -- addresses --------------------------------------------------------------------------------
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

    def ntoa(self, packed: bytes, into: Any = None) -> tuple[Any, ...]:
        try:
            host, port = addresses.unpack(packed)
        except BrokerAddressError as err:
            return None, lua_text(f"broker.ntoa: {err}")
        if into is None:
            return (lua_text(addresses.text(host, port)),)
        into[1] = lua_text(host)
        into[2] = port
        return (into,)

    def ifaddr(self, name: Any = None) -> Any:
        found = addresses.interface_addresses()
        if name is not None:
            values = found.get(text(name))
            return None if values is None else self.vm.lua.table_from([lua_text(a) for a in values])
        lua = self.vm.lua
        return lua.table_from({lua_text(k): lua.table_from([lua_text(a) for a in v]) for k, v in found.items()})

    # -- values -----------------------------------------------------------------------------------
    def to_lua(self, value: Data) -> Any:
        return unpack_lua(self.vm, pack_py((value,)))[0]

    def to_py(self, value: Any) -> Data:
        if value is None or isinstance(value, (bytes, int, float)):
            return value
        return unpack_py(pack_lua(self.vm, (value,)))[0]

    def shutdown(self) -> Deferred[Any]:
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        return DeferredList([maybeDeferred(e.shutdown) for e in endpoints])


def _local(sock: Socket) -> bytes:
    """The packed local address (a UDP socket has no single peer)."""
    if sock.transport is None:
        return b""
    host = sock.transport.getHost()
    return addresses.pack(host.host, host.port)


def _url_text(endpoint: Endpoint) -> str:
    url = endpoint.url
    return f"{url.scheme}://{addresses.text(url.host, url.port)}"
