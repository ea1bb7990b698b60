"""The index stage's connection to Redis or Valkey: settings, a bounded txredisapi pool (direct,
TLS or through Sentinel), the request script with an optional ``WAIT``, and the start-up probe.

txredisapi reconnects each pool connection with exponential back-off on its own; a request sent
while no connection is up waits for one at most the ``timeout`` (a failover shorter than that
costs only the requests in flight), then fails, so the stage answers it with an ``{error = …}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import attrs
import txredisapi
from twisted.internet import defer, ssl
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.python.failure import Failure

from stagetx import reactors
from stagetx.stages.checks import MAX_MS, milliseconds
from stagetx.stages.index.redis_backend import SCRIPT, SCRIPT_SHA
from stagetx.wire import write_now

SCHEMES = ("redis", "rediss", "redis+sentinel")
DEFAULT_POOL = 4
DEFAULT_TIMEOUT = 5.0  # seconds: connecting, and waiting for one reply
#: Seconds the Sentinels have to name a healthy primary before a connection attempt is retried:
#: while the old primary is down and none is promoted yet, every attempt waits this long.
DISCOVERY_TIMEOUT = 1.0


@attrs.frozen
class RedisSettings:
    """Where the boards live: ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS) or
    ``redis+sentinel://[user:password@]host:port,host:port/service[/db]``."""

    url: str
    scheme: str
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    service: str | None = None
    username: str | None = None
    password: str | None = None
    prefix: str = "stagetx:"
    key_size: int = 255
    pool: int = DEFAULT_POOL
    wait: int = 0  # replicas a set must reach (WAIT) before its reply
    timeout: float = DEFAULT_TIMEOUT
    ca: str | None = None  # rediss://: PEM file of the certificate authority to trust (else the system's)

    @property
    def shown_url(self) -> str:
        """The URL without its password, for logs."""
        if self.password is None:
            return self.url
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}" if "@" in rest else self.url


def parse_url(url: Any) -> dict[str, Any]:
    """The fields of a redis URL; ValueError naming what is wrong."""
    if not isinstance(url, str):
        raise ValueError("expected a URL string like redis://127.0.0.1:6379/0")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"{url!r}: the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        hostlist, userinfo = netloc, ""
    username, colon, password = userinfo.partition(":")
    fields: dict[str, Any] = {
        "url": url,
        "scheme": scheme,
        "username": unquote(username) or None,
        "password": unquote(password) if colon else None,
    }
    hosts = []
    for entry in (hostlist or "127.0.0.1").split(","):
        host, _, port_text = entry.rpartition(":") if ":" in entry.lstrip("[").rpartition("]")[2] else (entry, "", "")
        host = host.strip("[]") or "127.0.0.1"
        default = 26379 if scheme == "redis+sentinel" else 6379
        if port_text and not port_text.isdigit():
            raise ValueError(f"{url!r}: bad port {port_text!r}")
        port = int(port_text) if port_text else default
        if not 0 < port < 65536:
            raise ValueError(f"{url!r}: port {port} out of range")
        hosts.append((host, port))
    if scheme != "redis+sentinel" and len(hosts) != 1:
        raise ValueError(f"{url!r}: one host:port (several only for redis+sentinel://)")
    parts = [part for part in path.split("/") if part]
    if scheme == "redis+sentinel":
        if not parts:
            raise ValueError(f"{url!r}: name the Sentinel service: redis+sentinel://host:port,…/service[/db]")
        fields["service"] = parts.pop(0)
    if len(parts) > 1 or (parts and not parts[0].isdigit()):
        raise ValueError(f"{url!r}: the path is the database number, e.g. /0")
    fields["db"] = int(parts[0]) if parts else 0
    fields["hosts"] = tuple(hosts)
    return fields


KEYS = frozenset({"redis", "prefix", "key_size", "pool", "wait", "timeout", "ca"})


def parse_redis_settings(
    raw: dict[str, Any], key_size: int, resolve: Callable[[str], str] = lambda path: path
) -> RedisSettings:
    """``{"redis": URL, "prefix", "key_size", "pool", "wait", "timeout", "ca"}``; ValueError naming
    the key. ``resolve`` makes the ``ca`` path absolute (relative to the config file)."""
    unknown = set(raw) - KEYS
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} (a redis index takes {sorted(KEYS)})")
    try:
        fields = parse_url(raw["redis"])
    except ValueError as error:
        raise ValueError(f"redis: {error}") from None
    prefix = raw.get("prefix", "stagetx:")
    if not isinstance(prefix, str):
        raise ValueError("prefix: expected a string")
    pool = raw.get("pool", DEFAULT_POOL)
    if type(pool) is not int or not 1 <= pool <= 64:
        raise ValueError("pool: expected a number of connections from 1 to 64")
    wait = raw.get("wait", 0)
    if type(wait) is not int or wait < 0:
        raise ValueError("wait: expected a number of replicas (0 or more)")
    timeout = raw.get("timeout", DEFAULT_TIMEOUT * 1000)
    if not milliseconds(timeout):
        raise ValueError(f"timeout: expected milliseconds from above 0 to {MAX_MS}")
    ca = raw.get("ca")
    if ca is not None:
        if not isinstance(ca, str) or not ca:
            raise ValueError("ca: expected the path of a PEM certificate file")
        if fields["scheme"] != "rediss":
            raise ValueError("ca: only for rediss:// URLs")
        ca = resolve(ca)
    return RedisSettings(
        ca=ca, prefix=prefix, key_size=key_size, pool=pool, wait=wait, timeout=timeout / 1000.0, **fields
    )


class RedisUnavailable(Exception):
    """No connection to Redis right now (down, unreachable, failing over or refused our login)."""


class _Watched:
    """A pool factory that reports each new connection's address (a failover shows as a switch)."""

    on_connection: Callable[[str], None] = staticmethod(lambda address: None)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)  # type: ignore[misc]
        if conn.connected:
            _no_delay(conn.transport)
            if isinstance(conn.transport, FileDescriptor):
                conn.transport = _WritesNow(conn.transport)
            peer = conn.transport.getPeer()
            self.on_connection(f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}")


def _no_delay(transport: Any) -> None:
    """Send each request at once: with Nagle's algorithm a script sent while the previous one's
    answer is outstanding waits for it, so pipelined turns would go one round trip at a time.
    (Under TLS the TCP transport is the TLS protocol's.)"""
    tcp = transport if hasattr(transport, "setTcpNoDelay") else getattr(transport, "transport", None)
    if tcp is not None and hasattr(tcp, "setTcpNoDelay"):
        tcp.setTcpNoDelay(True)


class _WritesNow:
    """A pooled connection's socket transport whose ``write`` is ``wire.write_now``: a script
    leaves as txredisapi writes it, so Redis runs it while the stage reads the next chunk (the
    reactor writes only once its whole turn is done), and the socket is not registered as a
    writer and taken off again for each script."""

    def __init__(self, transport: FileDescriptor) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        write_now(self._transport, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _PlainFactory(_Watched, txredisapi.RedisFactory):  # type: ignore[misc]
    pass


class _SentinelFactory(_Watched, txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    pass


def _endpoint(reactor: Any, settings: RedisSettings, host: str, port: int, trust: Any) -> Any:
    endpoint = HostnameEndpoint(reactor, host, port, timeout=settings.timeout)
    if settings.scheme == "rediss":
        return wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust), endpoint)
    return endpoint


def _trust(settings: RedisSettings) -> Any:
    """The certificate authority of ``ca`` (None: the system's); RedisUnavailable when unreadable."""
    if settings.ca is None:
        return None
    try:
        with open(settings.ca, "rb") as pem:
            return ssl.Certificate.loadPEM(pem.read())
    except Exception as error:  # OSError, or pyOpenSSL's error for a file that is no certificate
        raise RedisUnavailable(f"cannot read the ca file {settings.ca}: {error}") from None


def _script(conn: Any, prefix: bytes, plan: bytes) -> defer.Deferred[Any]:
    """The request script on ``conn``: by its hash once this connection loaded it (``EVAL`` the
    first time, and again when Redis lost it: a restart, ``SCRIPT FLUSH``)."""
    if SCRIPT_SHA in conn.script_hashes:
        return conn.evalsha(SCRIPT_SHA, (), (prefix, plan)).addErrback(_reload, conn, prefix, plan)
    return conn.eval(SCRIPT, (), (prefix, plan))


def _reload(failure: Failure, conn: Any, prefix: bytes, plan: bytes) -> defer.Deferred[Any]:
    failure.trap(txredisapi.ScriptDoesNotExist)
    return conn.eval(SCRIPT, (), (prefix, plan))


def _answer(answer: Any) -> bytes:
    """The script's msgpack answer as bytes (txredisapi decodes it as latin-1: one to one)."""
    if not isinstance(answer, str):
        raise RedisUnavailable(f"unexpected answer {answer!r}")
    return answer.encode("latin-1")


class RedisLink:
    """A lazy pool of ``settings.pool`` connections; ``run`` sends one planned request table."""

    def __init__(self, settings: RedisSettings, reactor: IReactorTCP | IReactorTime | None = None) -> None:
        reactor = reactors.resolve(reactor)
        self.settings = settings
        self.reactor = reactor
        self._sentinel: Any = None
        self.factory: Any = None
        self.address: str | None = None  # the server of the last connection made
        self.on_switch: Callable[[str | None, str], None] = lambda old, new: None
        self._trust: Any = None

    def check(self) -> None:
        """Read what the connections need from disk (the ``ca`` file); RedisUnavailable if it fails."""
        self._trust = _trust(self.settings)

    def start(self) -> None:
        """Start connecting (in the background, retrying with back-off)."""
        s = self.settings
        options = {
            # latin-1 maps bytes to text one to one: the script's msgpack answer is recovered exactly,
            # and txredisapi's own replies (ROLE, Sentinel's) are the text it compares with
            "charset": "latin-1",
            "convertNumbers": False,
            "password": s.password,
            "username": s.username,
            "replyTimeout": s.timeout,
        }
        if s.scheme == "redis+sentinel":
            self._sentinel = txredisapi.Sentinel(list(s.hosts), replyTimeout=s.timeout)
            self._sentinel.discovery_timeout = min(s.timeout, DISCOVERY_TIMEOUT)
            handler = self._sentinel.master_for(
                s.service, factory_class=_SentinelFactory, dbid=s.db, poolsize=s.pool, isLazy=True, **options
            )
            self.factory = handler._factory  # the pool behind the handler: connections are taken from it
        else:
            host, port = s.hosts[0]
            self.factory = _PlainFactory(f"{host}:{port}", s.db, s.pool, True, **options)
            self.factory.startConnecting(_endpoint(self.reactor, s, host, port, self._trust))
        # fails when a login is refused; the probe reports that with the stage's name and URL
        self.factory.deferred.addErrback(lambda failure: None)
        self.factory.on_connection = self._connected

    def _connected(self, address: str) -> None:
        if address != self.address:
            old, self.address = self.address, address
            self.on_switch(old, address)

    @property
    def connected(self) -> bool:
        return bool(self.factory is not None and self.factory.size)

    def run(self, prefix: bytes, plan: bytes, wait: bool) -> defer.Deferred[bytes]:
        """Run the request script on the pool's first live connection (pipelined behind what it
        carries, so the requests of successive turns run on Redis in the order they were sent);
        with ``wait``, follow it by ``WAIT`` on the same connection and fail unless enough
        replicas acknowledged. While no connection is up (Redis restarting, a failover) the
        request waits for one at most ``timeout``; it fails with RedisUnavailable after that, or
        at once when the pool gave up (a refused login) or never started (an unreadable ``ca``)."""
        factory = self.factory
        if factory is None or (factory.stopped and not factory.size):
            return defer.fail(RedisUnavailable(f"not connected to {self.settings.shown_url}"))
        for conn in factory.pool:
            if conn.connected:
                if wait:
                    return defer.ensureDeferred(self._acknowledged(conn, prefix, plan))
                return _script(conn, prefix, plan).addCallback(_answer)
        return defer.ensureDeferred(self._run(prefix, plan, wait))

    async def _run(self, prefix: bytes, plan: bytes, wait: bool) -> bytes:
        # without a live connection, waiting for the next one is bounded (the request then fails
        # instead of hanging until Redis returns)
        taking = self.factory.getConnection(peek=True)
        taking.addTimeout(self.settings.timeout, self.reactor)
        try:
            conn = await taking
        except defer.TimeoutError:
            raise RedisUnavailable(
                f"no connection to {self.settings.shown_url} within {self.settings.timeout:g} s"
            ) from None
        if wait:
            return await self._acknowledged(conn, prefix, plan)
        return _answer(await _script(conn, prefix, plan))

    async def _acknowledged(self, conn: Any, prefix: bytes, plan: bytes) -> bytes:
        script = _script(conn, prefix, plan)
        # WAIT gives up after half the reply timeout, so its own answer arrives in time
        acked = conn.execute_command(b"WAIT", self.settings.wait, int(self.settings.timeout * 500))
        try:
            answer = _answer(await script)
        except Exception:
            acked.addErrback(lambda failure: None)  # fails the same way; the script's error tells
            raise
        replicas = await acked
        if not isinstance(replicas, int) or replicas < self.settings.wait:
            raise RedisUnavailable(f"written, but {replicas} of {self.settings.wait} replicas acknowledged in time")
        return answer

    def probe(self) -> defer.Deferred[str]:
        """One connection of its own, made once: fires with the server's address or fails with
        the reason (refused, unreachable, wrong password, no primary known to Sentinel)."""
        return defer.ensureDeferred(self._probe())

    async def _probe(self) -> str:
        s = self.settings
        options = {"password": s.password, "username": s.username, "replyTimeout": s.timeout}
        if s.scheme == "redis+sentinel":
            sentinel = txredisapi.Sentinel(list(s.hosts), replyTimeout=s.timeout)
            sentinel.discovery_timeout = min(s.timeout, DISCOVERY_TIMEOUT)
            try:
                host, port = await sentinel.discover_master(s.service)
            finally:
                await sentinel.disconnect()
        else:
            host, port = s.hosts[0]
        factory = txredisapi.RedisFactory(f"{host}:{port}", s.db, 1, False, **options)
        factory.reconnect = False
        factory.startConnecting(_endpoint(self.reactor, s, host, port, self._trust))
        deferred = factory.deferred
        deferred.addTimeout(s.timeout, self.reactor)
        try:
            handler = await deferred
        except defer.TimeoutError:
            await factory.disconnect()
            raise RedisUnavailable(f"no answer from {host}:{port} within {s.timeout:g} s") from None
        except Exception as error:
            await factory.disconnect()
            raise RedisUnavailable(str(error)) from None
        await handler.disconnect()
        return f"{host}:{port}"

    def close(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the pool (and the Sentinel connections)."""
        return defer.ensureDeferred(self._close())

    async def _close(self) -> None:
        if self.factory is not None:
            await self.factory.disconnect()
        if self._sentinel is not None:
            await self._sentinel.disconnect()
