"""The server configuration: JSON → validated, frozen values.

Every error is one ``ConfigError`` line naming the JSON path and the problem, so start-up stops
with a message the operator can act on. Spellings of the original platform are normalised here
(``lua.so+stage`` → ``=lua+stage``) and settings stagetx does not have become ``notices`` for the
caller to log, once each.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stagetx.codec import LUA_INT_MAX, LUA_INT_MIN, MAX_DEPTH
from stagetx.lua.search import find_script
from stagetx.stages.checks import MAX_MS, unwritable_file
from stagetx.stages.registry import SettingsError, stage_type, stage_types

LUA_TYPES = ("lua", "luajit")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "critical", "fatal")  # fatal: log4cxx's name of critical
LUA_DEFAULTS: Mapping[str, Any] = {
    "%package": ["[0]"],
    "%memory": 256 * 1024 * 1024,
    "%budget": 1000,
    "%recheck": [600000, 60000],
}
DEFAULT_ROUTER = (1500, 900)
DEFAULT_THREADS = (4, 10000)

_COMPAT_NAME = re.compile(r"^([A-Za-z_]\w*)\.so(\+.*)?$", re.DOTALL)
_STAGE_NAME = re.compile(r"^=([^+]*)(?:\+(.*))?$", re.DOTALL)
_BAD_ID_CHARS = re.compile(r"[\s:+*=<>^?!,{}\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_DIGITS = re.compile(r"[0-9]+")
#: A host name (an IPv4 address is one too); anything else in an address (a blank, a NUL) would
#: make the resolver raise in the process that binds or dials it.
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_MEMORY = re.compile(r"^([0-9]+)\s*([kmg]?)b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MAX_MEMORY = 1024**4  # %memory: 1024g, far past any machine's Lua heap; lupa takes a C size
MAX_COUNT = 1_000_000_000  # #threads and #cluster queue: a bigger count is a typo
_UNSUPPORTED = ("%odbc", "%cluster", "verbose")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line: ``JSON.path: problem``."""


@attrs.frozen
class HostPort:
    """A ``host:port`` address (IPv6 hosts written ``[::1]:port``)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@attrs.frozen
class DiscoveryGroup:
    """A ``"udp://GROUP:PORT?interface=ADDR&ttl=N"`` entry of ``#cluster``: where to announce."""

    host: str  # the multicast group address
    port: int
    interface: str = "127.0.0.1"  # the address of the interface to join and send on
    ttl: int = 1  # how many routers an announcement may cross


@attrs.frozen
class DnsName:
    """A ``"dns://NAME:PORT?server=HOST:PORT&every=S"`` entry of ``#cluster``: every IPv4 address
    NAME resolves to, with PORT, is a peer; re-resolved every ``every`` seconds."""

    name: str
    port: int
    server: HostPort | None = None  # the DNS server to ask (default: the system's resolv.conf)
    every: float = 5.0

    def __str__(self) -> str:
        return f"dns://{self.name}:{self.port}"


@attrs.frozen
class ClusterTls:
    """``"tls"`` of the ``#cluster`` object: PEM files (absolute paths) for TLS between servers."""

    ca: str  # the cluster CA: a peer's certificate must be signed by it
    cert: str  # this server's certificate, signed by the cluster CA
    key: str  # its private key


@attrs.frozen
class ClusterConfig:
    """``#cluster``: own listening port, peers, backup servers, discovery (multicast groups, DNS
    names) and TLS."""

    listen: int | None = None
    peers: tuple[HostPort, ...] = ()
    backups: tuple[HostPort, ...] = ()
    discovery: tuple[DiscoveryGroup, ...] = ()
    dns: tuple[DnsName, ...] = ()
    listen_host: str = "127.0.0.1"  # the interface the cluster port binds to
    advertise: str | None = None  # "host:port" other servers reach this one at (default: listen)
    queue: int = 10_000  # frames kept per peer while it has no link
    tls: ClusterTls | None = None  # TLS with mutual authentication on the links between servers


@attrs.frozen
class LogGroup:
    """One ``#log`` entry: the level and optional file (absolute) of a logger group."""

    level: str = "info"
    file: str | None = None


@attrs.frozen
class AdminConfig:
    """``#admin``: Twisted server endpoint descriptions and the access token."""

    console: str | None = None
    http: str | None = None
    token: str | None = None


@attrs.frozen
class TlsConfig:
    """``#tls``: PEM files (absolute paths) for ``tls://``/``wss://`` listeners and joins.

    ``cert``/``key``: this server's certificate (chain) and key, needed to listen; ``client_ca``:
    listeners then require client certificates signed by it; ``ca``: what ``broker.join`` trusts
    (default: the system's trust store).
    """

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    ca: str | None = None


@attrs.frozen
class StageConfig:
    """One stage named in ``#startup`` (one entry per replica)."""

    name: str  # normalised "=type+id"
    type: str
    id: str
    group: int  # index of its process in #startup
    instance: int  # 0-based over the whole #startup, in reading order
    settings: Any  # merged "%…" settings for Lua stages, else the stage's raw value (or None)
    main: str | None  # absolute path of a Lua stage's main script


@attrs.frozen
class ServerConfig:
    """A whole validated configuration; ``raw`` is what the children receive and re-parse."""

    raw: Mapping[str, Any]
    base_dir: str
    startup: tuple[tuple[StageConfig, ...], ...]
    services: tuple[HostPort, ...] = ()
    router: tuple[int, int] = DEFAULT_ROUTER
    cluster: ClusterConfig = ClusterConfig()
    threads: tuple[int, int] = DEFAULT_THREADS
    secret: str | None = None
    log: Mapping[str, LogGroup] = attrs.field(factory=dict)
    admin: AdminConfig | None = None
    tls: TlsConfig = TlsConfig()
    values: Mapping[str, Any] = attrs.field(factory=dict)
    notices: tuple[str, ...] = ()

    @property
    def stages(self) -> tuple[StageConfig, ...]:
        """All stages of all groups, in ``instance`` order."""
        return tuple(stage for group in self.startup for stage in group)


def load_config(path: str) -> ServerConfig:
    """Read and validate the JSON file ``path`` (``"-"``: standard input).

    Relative paths in the file resolve against the file's directory (the current directory for
    standard input). Raises ``ConfigError``.
    """
    try:
        if path == "-":
            text, base_dir = sys.stdin.read(), os.getcwd()
        else:
            with open(path, encoding="utf-8") as stream:
                text = stream.read()
            base_dir = os.path.dirname(os.path.abspath(path))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    try:
        raw = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except _KeyTwice as err:
        twice = f"the key {json.dumps(err.key)} is written twice in one object"
        raise ConfigError(f"{path}: invalid JSON: {twice}") from None
    except RecursionError:  # json's decoder recurses per level
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the configuration must be a JSON object")
    return parse_config(raw, base_dir)


class _KeyTwice(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key written twice (``json`` keeps the last silently,
    so a second ``#admin`` or stage definition would replace the first without a word)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _KeyTwice(key)
        obj[key] = value
    return obj


def parse_config(raw: Mapping[str, Any], base_dir: str) -> ServerConfig:
    """Validate the decoded configuration ``raw``; relative paths resolve against ``base_dir``."""
    base_dir = os.path.abspath(base_dir)
    notices: list[str] = []
    top: dict[str, tuple[str, Any]] = {}  # normalised key -> (key as written, value)
    for key, value in raw.items():
        name = normalise_name(key)
        if name in top:
            raise ConfigError(f"{key}: duplicate of {top[name][0]!r}")
        top[name] = (key, value)

    settings: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for name, (key, value) in top.items():
        if name.startswith("#"):
            if name == "#license":
                notices.append(f"{key}: not used by stagetx, ignored")
            elif name in _SERVER_KEYS:
                settings[name] = _SERVER_KEYS[name](value, key, base_dir)
            else:
                raise ConfigError(f"{key}: unknown key")
        elif not name.startswith("="):
            values[name] = lua_value(value, key)

    if "#startup" not in settings:
        raise ConfigError("#startup: missing (which stages run in which process)")
    cluster = settings.get("#cluster", ClusterConfig())
    if cluster.listen is not None and not _is_loopback(cluster.listen_host) and "#secret" not in settings:
        raise ConfigError("#cluster: listening beyond loopback needs #secret (shared by the cluster's servers)")
    listening = [(f"#services.tcp[{i}]", address) for i, address in enumerate(settings.get("#services", ()))]
    if cluster.listen is not None:
        listening.append(("#cluster", HostPort(cluster.listen_host, cluster.listen)))
    admin = settings.get("#admin")
    for key in ("console", "http"):
        description = getattr(admin, key, None)
        address = endpoint_address(description, f"#admin.{key}") if description else None
        if address is not None:
            listening.append((f"#admin.{key}", address))
    _one_socket_per_port(listening)
    definitions = _Definitions(top, base_dir, notices)
    startup = definitions.startup(top["#startup"][1])
    return ServerConfig(
        raw=dict(raw),
        base_dir=base_dir,
        startup=startup,
        services=settings.get("#services", ()),
        router=settings.get("#router", DEFAULT_ROUTER),
        cluster=cluster,
        threads=settings.get("#threads", DEFAULT_THREADS),
        secret=settings.get("#secret"),
        log=settings.get("#log", {}),
        admin=settings.get("#admin"),
        tls=settings.get("#tls", TlsConfig()),
        values=values,
        notices=tuple(notices),
    )


def normalise_name(key: str) -> str:
    """The stagetx spelling of a key: ``lua.so+stage`` → ``=lua+stage``, ``lua.so`` → ``=lua``."""
    compat = _COMPAT_NAME.match(key)
    if compat:
        return f"={compat.group(1)}{compat.group(2) or ''}"
    return key


def parse_stage_name(text: str, path: str) -> tuple[str, str | None]:
    """Split ``"=type+id"`` (or ``"=type"``) into ``(type, id or None)``, checking both parts."""
    match = _STAGE_NAME.match(text)
    if not match:
        raise ConfigError(f'{path}: bad stage name "{text}" (expected "=type+id")')
    type_name, stage_id = match.group(1), match.group(2)
    if type_name not in stage_types():
        raise ConfigError(f'{path}: unknown stage type "={type_name}"')
    if stage_id is not None and (not stage_id or _BAD_ID_CHARS.search(stage_id)):
        raise ConfigError(f'{path}: bad stage id "{stage_id}" in "{text}"')
    return type_name, stage_id


def parse_memory(value: Any, path: str) -> int:
    """``%memory``: bytes as an integer, or a string with a ``k``/``m``/``g`` unit; at most
    ``MAX_MEMORY``."""
    amount = 0
    if isinstance(value, str):
        match = _MEMORY.match(value.strip())
        if match:
            amount = int(match.group(1)) * _UNITS[match.group(2).lower()]
    elif _is_int(value):
        amount = value
    if not 0 < amount <= MAX_MEMORY:
        raise ConfigError(f"{path}: expected a size such as 256m, at most 1024g, got {json.dumps(value)}")
    return amount


def lua_value(value: Any, path: str, depth: int = 0) -> Any:
    """``value``, checked to be what a Lua stage can read (``process["$NAME"]``): integers that
    fit a Lua integer, text without lone surrogates, at most ``MAX_DEPTH`` levels; else a child
    would fail to hand it over at every start."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{path}: nested deeper than {MAX_DEPTH} levels, more than Lua stages take")
    if isinstance(value, dict):
        for key, item in value.items():
            _text(key, f"{path}: key {json.dumps(key)}")
            lua_value(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            lua_value(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, str):
        _text(value, path)
    elif _is_int(value) and not LUA_INT_MIN <= value <= LUA_INT_MAX:
        raise ConfigError(f"{path}: {value} does not fit a Lua integer ({LUA_INT_MIN} to {LUA_INT_MAX})")
    return value


def _text(value: str, path: str) -> str:
    """``value`` unless it holds a lone surrogate (JSON ``"\\ud800"``): not Unicode text, so it
    cannot be encoded as UTF-8 for a process, a socket or Lua."""
    found = _SURROGATE.search(value)
    if found:
        raise ConfigError(f"{path}: {json.dumps(found.group())} is a lone surrogate, not text")
    return value


def endpoint_is_loopback(description: str, path: str) -> bool:
    """Whether a Twisted server endpoint description only listens on this machine.

    UNIX sockets and TCP/SSL endpoints bound to a loopback interface count; anything else (no
    ``interface``, another address, an endpoint type we cannot see into) does not.
    """
    if re.split(r"(?<!\\):", description)[0] == "unix":
        return True
    address = endpoint_address(description, path)
    if address is None:
        return False
    interface = address.host
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def endpoint_address(description: str, path: str) -> HostPort | None:
    """The interface (``""``: every one) and port a TCP or SSL server endpoint description
    listens on, or None for another type (UNIX sockets, types we cannot see into)."""
    parts = re.split(r"(?<!\\):", description)
    if _DIGITS.fullmatch(parts[0]):
        parts.insert(0, "tcp")
    kind, args = parts[0], parts[1:]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    positional = [arg for arg in args if "=" not in arg]
    keywords = dict(arg.split("=", 1) for arg in args if "=" in arg)
    port = keywords.get("port", positional[0] if positional else "")
    if not _DIGITS.fullmatch(port) or int(port) > 65535:
        raise ConfigError(f'{path}: bad endpoint "{description}": port must be an integer')
    # tcp/tcp6 take the interface as their second positional argument; ssl only as a keyword
    default = positional[1] if kind != "ssl" and len(positional) > 1 else ""
    return HostPort(keywords.get("interface", default).replace("\\:", ":"), int(port))


def _one_socket_per_port(listening: list[tuple[str, HostPort]]) -> None:
    """Refuse two of the server's listening sockets (``(JSON path, address)``, in start-up
    order) on one port of one interface: the second could only fail once the server runs (an
    admin port is then missing, or process 1 runs without its cluster port)."""
    for index, (path, address) in enumerate(listening):
        for earlier, taken in listening[:index]:
            if address.port and address.port == taken.port and _overlap(address.host, taken.host):
                raise ConfigError(f"{path}: port {address.port} is also the one of {earlier}")


def _overlap(one: str, other: str) -> bool:
    """Whether sockets bound to these two interfaces would take the same addresses (``""`` and
    ``::`` take every one; ``0.0.0.0`` every IPv4 one)."""
    if one == other or {one, other} & {"", "::"}:
        return True
    return "0.0.0.0" in (one, other) and ":" not in one + other


def parse_host_port(text: Any, path: str) -> HostPort:
    """``"host:port"`` or ``"[v6]:port"`` → ``HostPort``."""
    if isinstance(text, str):
        match = re.match(r"^(?:\[([^\]]+)\]|([^:\[\]]+)):(\d+)$", text.strip())
        if match:
            host, port = match.group(1) or match.group(2), int(match.group(3))
            if not (_HOST_NAME.fullmatch(host) or _is_ip(host)):
                raise ConfigError(f"{path}: {json.dumps(host)} is not a DNS name or an IP address")
            if 0 < port < 65536:
                return HostPort(host, port)
    raise ConfigError(f'{path}: bad address {json.dumps(text)} (expected "host:port")')


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_pair(value: Any, path: str, minimum: int, maximum: int) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and minimum <= v <= maximum for v in value)):
        raise ConfigError(f"{path}: expected [integer, integer], each from {minimum} to {maximum}")
    return (value[0], value[1])


def _string(value: Any, path: str) -> str:
    """A non-empty text setting (a file name, an endpoint, a secret): a NUL in it would make the
    file calls raise ``ValueError`` instead of failing with a reason, in a child at every start."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: expected a non-empty string, got {json.dumps(value)}")
    if "\0" in value:
        raise ConfigError(f"{path}: {json.dumps(value)} holds a NUL character")
    return _text(value, path)


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected an object, got {json.dumps(value)}")
    return value


def _services(value: Any, path: str, base_dir: str) -> tuple[HostPort, ...]:
    addresses: list[HostPort] = []
    for proto, entries in _object(value, path).items():
        if proto != "tcp":
            raise ConfigError(f'{path}.{proto}: unknown protocol (only "tcp")')
        if not isinstance(entries, list):
            raise ConfigError(f'{path}.tcp: expected a list of "host:port"')
        for index, entry in enumerate(entries):
            address = parse_host_port(entry, f"{path}.tcp[{index}]")
            if address in addresses:
                raise ConfigError(f"{path}.tcp[{index}]: {address} is listed twice")
            addresses.append(address)
    return tuple(addresses)


def _int_pair_or_defaults(value: Any, path: str, defaults: tuple[int, int], maximum: int) -> tuple[int, int]:
    """``[a, b]``, ``[a]`` or ``a``: a value left out takes its default, as the original platform
    read ``#router`` and ``#threads``."""
    if _is_int(value):
        value = [value]
    if isinstance(value, list) and len(value) < 2:
        value = value + list(defaults[len(value) :])
    return _int_pair(value, path, 1, maximum)


def _router(value: Any, path: str, base_dir: str) -> tuple[int, int]:
    return _int_pair_or_defaults(value, path, DEFAULT_ROUTER, MAX_MS)


def _threads(value: Any, path: str, base_dir: str) -> tuple[int, int]:
    return _int_pair_or_defaults(value, path, DEFAULT_THREADS, MAX_COUNT)


def _cluster(value: Any, path: str, base_dir: str) -> ClusterConfig:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list")
    listen: int | None = None
    settings: dict[str, Any] = {}
    peers: list[HostPort] = []
    backups: list[HostPort] = []
    discovery: list[DiscoveryGroup] = []
    dns: list[DnsName] = []
    for index, entry in enumerate(value):
        where = f"{path}[{index}]"
        if _is_int(entry):
            if listen is not None:
                raise ConfigError(f"{where}: a second listening port ({listen} is already set)")
            if not 0 < entry < 65536:
                raise ConfigError(f"{where}: port out of range: {entry}")
            listen = entry
        elif isinstance(entry, dict):
            if listen is not None:
                raise ConfigError(f"{where}: a second listening port ({listen} is already set)")
            listen, settings = _cluster_settings(entry, where, base_dir)
        elif isinstance(entry, str) and entry.startswith("udp://"):
            discovery.append(_discovery_group(entry, where))
        elif isinstance(entry, str) and entry.startswith("dns://"):
            dns.append(_dns_name(entry, where))
        elif isinstance(entry, str) and entry.startswith("="):
            backups.append(parse_host_port(entry[1:], where))
        else:
            peers.append(parse_host_port(entry, where))
    return ClusterConfig(listen, tuple(peers), tuple(backups), tuple(discovery), tuple(dns), **settings)


def _discovery_group(entry: str, where: str) -> DiscoveryGroup:
    """``"udp://GROUP:PORT"``, optionally ``?interface=ADDR&ttl=N`` (default 127.0.0.1 and 1).

    The interface must be an address of this host: joining a group on an address that no
    interface has would fail only once the server runs.
    """
    address, _, query = entry[len("udp://") :].partition("?")
    group = parse_host_port(address, where)
    try:
        multicast = ipaddress.ip_address(group.host).is_multicast
    except ValueError:
        multicast = False
    if not multicast:
        raise ConfigError(f'{where}: "{group.host}" is not a multicast group address')
    if ":" in group.host:
        raise ConfigError(f'{where}: "{group.host}" is an IPv6 group; discovery announces on IPv4 groups')
    options = _query_options(query, {"interface": "ADDR", "ttl": "N"}, where)
    interface = options.get("interface", "127.0.0.1")
    try:
        ipaddress.IPv4Address(interface)
    except ValueError:
        raise ConfigError(f"{where}: interface {json.dumps(interface)} is not an IPv4 address") from None
    error = _local_address_error(interface)
    if error:
        raise ConfigError(f"{where}: interface {interface} is not an address of this host ({error})")
    ttl_text = options.get("ttl", "1")
    if not (_DIGITS.fullmatch(ttl_text) and 0 <= int(ttl_text) <= 255):
        raise ConfigError(f"{where}: ttl {json.dumps(ttl_text)} is not an integer from 0 to 255")
    return DiscoveryGroup(group.host, group.port, interface, int(ttl_text))


def _cluster_tls(value: Any, where: str, base_dir: str) -> ClusterTls:
    """``{"ca": PATH, "cert": PATH, "key": PATH}`` (relative to the configuration's folder),
    each file read and checked now, so a wrong path or a key not matching its certificate is
    reported before anything starts."""
    from twisted.internet import ssl

    entries = _object(value, where)
    unknown = sorted(set(entries) - {"ca", "cert", "key"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (ca, cert, key)")
    paths: dict[str, str] = {}
    pem: dict[str, bytes] = {}
    for key in ("ca", "cert", "key"):
        if key not in entries:
            raise ConfigError(f"{where}.{key}: missing (a PEM file)")
    for key in ("ca", "cert", "key"):
        paths[key] = os.path.join(base_dir, _string(entries[key], f"{where}.{key}"))
        try:
            with open(paths[key], "rb") as f:
                pem[key] = f.read()
        except OSError as err:
            raise ConfigError(f"{where}.{key}: cannot read {paths[key]}: {err.strerror}") from None
    try:
        ssl.Certificate.loadPEM(pem["ca"])
    except Exception as err:  # OpenSSL's errors: the file is not a PEM certificate
        raise ConfigError(f"{where}.ca: not a PEM certificate ({err})") from None
    try:
        ssl.PrivateCertificate.loadPEM(pem["cert"] + pem["key"])
    except Exception as err:  # a broken certificate or key, or a key of another certificate
        raise ConfigError(f"{where}.key: not the PEM key of {where}.cert ({err})") from None
    return ClusterTls(paths["ca"], paths["cert"], paths["key"])


def _query_options(query: str, allowed: dict[str, str], where: str) -> dict[str, str]:
    """The ``key=value`` pairs of an address's query; ``allowed`` maps each key to its value's form."""
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if key not in allowed or not sep or key in options:
            usage = ", ".join(f"{name}={form}" for name, form in allowed.items())
            raise ConfigError(f"{where}: bad option {json.dumps(pair)} ({usage}, each once)")
        options[key] = value
    return options


def _dns_name(entry: str, where: str) -> DnsName:
    """``"dns://NAME:PORT"``, optionally ``?server=HOST:PORT&every=SECONDS`` (default: the
    system's resolvers, every 5 s)."""
    address, _, query = entry[len("dns://") :].partition("?")
    target = parse_host_port(address, where)
    if not _HOST_NAME.fullmatch(target.host):
        raise ConfigError(f"{where}: {json.dumps(target.host)} is not a DNS name")
    options = _query_options(query, {"server": "HOST:PORT", "every": "SECONDS"}, where)
    server = parse_host_port(options["server"], f"{where} server") if "server" in options else None
    try:
        every = float(options.get("every", "5"))
    except ValueError:
        every = 0.0
    if not 0.1 <= every <= 3600:
        raise ConfigError(f"{where}: every {json.dumps(options.get('every'))} is not a number of seconds (0.1-3600)")
    return DnsName(target.host, target.port, server, every)


def _local_address_error(address: str) -> str | None:
    """None when a socket can bind ``address`` (an interface of this host has it), else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as err:
            return err.strerror or str(err)
    return None


def _cluster_settings(entry: dict[str, Any], where: str, base_dir: str) -> tuple[int | None, dict[str, Any]]:
    """``{"listen": "HOST:PORT", "advertise": "HOST:PORT", "queue": N, "tls": {...}}`` (stagetx addition)."""
    unknown = sorted(set(entry) - {"listen", "advertise", "queue", "tls"})
    if unknown:
        raise ConfigError(f"{where}: unknown setting {json.dumps(unknown[0])} (listen, advertise, queue, tls)")
    settings: dict[str, Any] = {}
    if "tls" in entry:
        settings["tls"] = _cluster_tls(entry["tls"], f"{where}.tls", base_dir)
    listen = None
    if "listen" in entry:
        address = parse_host_port(entry["listen"], f"{where}.listen")
        listen, settings["listen_host"] = address.port, address.host
    if "advertise" in entry:
        advertised = parse_host_port(entry["advertise"], f"{where}.advertise")
        if _is_unspecified(advertised.host):  # each other server would dial itself there
            raise ConfigError(f"{where}.advertise: {advertised} is no address another server can dial")
        settings["advertise"] = str(advertised)
    elif settings.get("listen_host") in ("0.0.0.0", "::", ""):
        raise ConfigError(f"{where}.advertise: needed when listening on every interface")
    if "queue" in entry:
        if not _is_int(entry["queue"]) or not 1 <= entry["queue"] <= MAX_COUNT:
            raise ConfigError(f"{where}.queue: expected a positive integer up to {MAX_COUNT}")
        settings["queue"] = entry["queue"]
    return listen, settings


def _secret(value: Any, path: str, base_dir: str) -> str:
    return _string(value, path)


def _log(value: Any, path: str, base_dir: str) -> dict[str, LogGroup]:
    groups = {}
    for group, entry in _object(value, path).items():
        where = f"{path}.{group}"
        unknown = set(_object(entry, where)) - {"level", "file"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
        level = entry.get("level", "info")
        level = "warn" if level == "warning" else level
        if level not in LOG_LEVELS:
            raise ConfigError(f"{where}.level: unknown level {json.dumps(level)}")
        file = entry.get("file")
        if file is not None:
            file = os.path.join(base_dir, _string(file, f"{where}.file"))
            problem = unwritable_file(file)
            if problem is not None:
                raise ConfigError(f"{where}.file: {problem}")
        groups[group] = LogGroup(level, file)
    return groups


def _admin(value: Any, path: str, base_dir: str) -> AdminConfig:
    entries = _object(value, path)
    for key in entries:
        if key not in ("console", "http", "token"):
            raise ConfigError(f"{path}.{key}: unknown key")
    token = _token(entries["token"], f"{path}.token") if "token" in entries else None
    endpoints: dict[str, str] = {}
    for key in ("console", "http"):
        if key in entries:
            where = f"{path}.{key}"
            endpoints[key] = _string(entries[key], where)
            loopback = endpoint_is_loopback(endpoints[key], where)
            _check_endpoint(endpoints[key], where)
            if token is None and not loopback:
                raise ConfigError(
                    f'{where}: listens beyond loopback without {path}.token (add a token or ":interface=127.0.0.1")'
                )
    return AdminConfig(endpoints.get("console"), endpoints.get("http"), token)


def _token(value: Any, path: str) -> str:
    """The admin token: printable ASCII without blanks, what both the console's ``token`` line
    and an HTTP ``Authorization`` header carry unchanged (either strips blanks at its ends, and
    HTTP headers are not UTF-8), so that the configured token can be presented at all."""
    token = _string(value, path)
    if not re.fullmatch(r"[!-~]+", token):
        raise ConfigError(f"{path}: expected printable ASCII without blanks (such as a random hex string)")
    return token


def _check_endpoint(description: str, path: str) -> None:
    """Whether Twisted's own parser accepts a server endpoint description: building the endpoint
    listens on nothing, yet finds an unknown type or argument, a bad port or a missing certificate."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_NO_REACTOR, description)
    except Exception as err:  # each endpoint type raises its own (ValueError, TypeError, OSError, OpenSSL's)
        raise ConfigError(f'{path}: bad endpoint "{description}": {err}') from None


#: What endpoints are built with to be checked: they only keep it, and the check must not
#: install the global reactor in a process that has not chosen its own yet.
_NO_REACTOR: Any = object()


def _tls(value: Any, path: str, base_dir: str) -> TlsConfig:
    """``#tls``: each file is read and parsed now, so a missing or bad one stops start-up naming its key."""
    entries = _object(value, path)
    files: dict[str, str] = {}
    for key, entry in entries.items():
        where = f"{path}.{key}"
        if key not in ("cert", "key", "client_ca", "ca"):
            raise ConfigError(f"{where}: unknown key (cert, key, client_ca, ca)")
        files[key] = os.path.join(base_dir, _string(entry, where))
        try:
            with open(files[key], "rb") as stream:
                pem = stream.read()
        except OSError as err:
            raise ConfigError(f"{where}: cannot read {files[key]}: {err.strerror}") from None
        try:
            if key == "key":
                serialization.load_pem_private_key(pem, password=None)
            else:
                x509.load_pem_x509_certificates(pem)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"{where}: {files[key]} is not a PEM {key if key == 'key' else 'certificate'}: {err}"
            ) from None
    if ("cert" in files) != ("key" in files):
        raise ConfigError(f"{path}: cert and key go together")
    return TlsConfig(files.get("cert"), files.get("key"), files.get("client_ca"), files.get("ca"))


_SERVER_KEYS: dict[str, Callable[[Any, str, str], Any]] = {
    "#services": _services,
    "#router": _router,
    "#cluster": _cluster,
    "#threads": _threads,
    "#secret": _secret,
    "#log": _log,
    "#admin": _admin,
    "#tls": _tls,
    "#startup": lambda value, path, base_dir: value,  # checked with the stage definitions
}


@attrs.frozen
class _LuaObject:
    """One Lua settings object as written: its settings and the main scripts it names."""

    settings: dict[str, Any]
    mains: dict[str, tuple[str, str]]  # stage name -> (script name, JSON path)


class _Definitions:
    """The stage definitions at the top level, checked once each and merged per started stage."""

    def __init__(self, top: Mapping[str, tuple[str, Any]], base_dir: str, notices: list[str]) -> None:
        self._top = top
        self._base_dir = base_dir
        self._notices = notices
        self._lua: dict[str, _LuaObject] = {}
        for name, (key, value) in top.items():
            if name.startswith("="):
                self._check_definition(name, key, value)

    def startup(self, value: Any) -> tuple[tuple[StageConfig, ...], ...]:
        """Build the ``#startup`` groups."""
        if not isinstance(value, list) or not value:
            raise ConfigError("#startup: expected a non-empty list of process lists")
        groups: list[tuple[StageConfig, ...]] = []
        instance = 0
        held: dict[str, tuple[str, str]] = {}  # path a stage uses alone -> (its stage, where listed)
        for group, entries in enumerate(value):
            where = f"#startup[{group}]"
            if not isinstance(entries, list) or not entries:
                raise ConfigError(f"{where}: expected a non-empty list of stage names")
            stages = []
            for index, entry in enumerate(entries):
                stage = self._stage(entry, f"{where}[{index}]", group, instance)
                self._hold(stage, f"{where}[{index}]", held)
                stages.append(stage)
                instance += 1
            groups.append(tuple(stages))
        return tuple(groups)

    def _hold(self, stage: StageConfig, path: str, held: dict[str, tuple[str, str]]) -> None:
        """Refuse a second stage, or a second process of one stage, on a path one process at a
        time uses (an index directory): it could never start, or would answer from nothing."""
        holds = None if stage.type in LUA_TYPES else getattr(stage_type(stage.type), "holds", None)
        if holds is None:  # Lua stages hold nothing; another package's type may not say
            return
        for used in holds(stage.settings, self._base_dir):
            if used in held:
                other, where = held[used]
                problem = f"{used} is used by one process at a time, as {other} at {where}"
                raise ConfigError(f"{path}: {stage.name}: {problem}")
            held[used] = (stage.name, path)

    def _check_definition(self, name: str, key: str, value: Any) -> None:
        type_name, stage_id = parse_stage_name(name, key)
        if type_name not in LUA_TYPES:
            return
        if stage_id is None:
            self._lua[name] = self._lua_object(name, key, _object(value, key), type_name)
        elif isinstance(value, dict):
            self._lua[name] = self._lua_object(name, key, value, type_name)
        elif not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a settings object or a main script name")

    def _lua_object(self, name: str, path: str, value: dict[str, Any], type_name: str) -> _LuaObject:
        settings: dict[str, Any] = {}
        mains: dict[str, tuple[str, str]] = {}
        for key, item in value.items():
            where = f"{path}.{key}"
            inner = normalise_name(key)
            if inner.startswith("="):
                inner_type, inner_id = parse_stage_name(inner, where)
                type_wide = name == f"={type_name}"
                if inner_type != type_name or inner_id is None or (not type_wide and inner != name):
                    raise ConfigError(f'{where}: not a main script of "{name}"')
                mains[inner] = (_string(item, where), where)
            elif key in _UNSUPPORTED or (key.startswith("%") and key not in _LUA_SETTINGS):
                self._notices.append(f"{where}: not supported by stagetx, ignored")
            elif key in _LUA_SETTINGS:
                settings[key] = _LUA_SETTINGS[key](item, where, self._base_dir)
            else:
                settings[key] = lua_value(item, where)
        return _LuaObject(settings, mains)

    def _stage(self, entry: Any, path: str, group: int, instance: int) -> StageConfig:
        if not isinstance(entry, str):
            raise ConfigError(f"{path}: expected a stage name, got {json.dumps(entry)}")
        name = normalise_name(entry)
        type_name, stage_id = parse_stage_name(name, path)
        if stage_id is None:
            raise ConfigError(f'{path}: "{entry}" names no stage id (expected "=type+id")')
        if type_name in LUA_TYPES:
            settings, main = self._lua_stage(name, type_name, path)
        else:
            settings, main = self._builtin_settings(name, type_name), None
            try:
                stage_type(type_name).check(settings, name, self._base_dir)
            except SettingsError as error:
                raise ConfigError(str(error)) from None
        return StageConfig(name, type_name, stage_id, group, instance, settings, main)

    def _builtin_settings(self, name: str, type_name: str) -> Any:
        own = self._top.get(name, (None, None))[1]
        shared = self._top.get(f"={type_name}", (None, None))[1]
        if isinstance(own, dict) and isinstance(shared, dict):
            return {**shared, **own}
        return own if own is not None else shared

    def _lua_stage(self, name: str, type_name: str, path: str) -> tuple[dict[str, Any], str]:
        empty = _LuaObject({}, {})
        shared = self._lua.get(f"={type_name}", empty)
        own = self._lua.get(name, empty)
        settings = {**LUA_DEFAULTS, **shared.settings, **own.settings}
        script = own.mains.get(name) or shared.mains.get(name)
        if script is None and name in self._top and isinstance(self._top[name][1], str):
            script = (self._top[name][1], self._top[name][0])
        if script is None:
            raise ConfigError(f'{path}: "{name}" has no main script (set "{name}": "script")')
        script_name, where = script
        found = find_script(script_name, settings["%package"], self._base_dir)
        if found is None:
            raise ConfigError(
                f'{where}: script "{script_name}" not found along %package {json.dumps(settings["%package"])}'
            )
        preload = settings.get("%preload")
        if preload is not None and not os.path.exists(preload):
            raise ConfigError(f"{path}: %preload {json.dumps(preload)} does not exist")
        return settings, found[1]


def _package(value: Any, path: str, base_dir: str) -> list[str]:
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{path}: expected a list of directories")
    return list(entries)


def _preload(value: Any, path: str, base_dir: str) -> str:
    return os.path.join(base_dir, _string(value, path))


def _budget(value: Any, path: str, base_dir: str) -> int:
    if not _is_int(value) or not 0 < value <= MAX_MS:
        raise ConfigError(f"{path}: expected milliseconds (an integer from 1 to {MAX_MS})")
    return int(value)


def _recheck(value: Any, path: str, base_dir: str) -> list[int]:
    return list(_int_pair(value, path, 0, MAX_MS))


_LUA_SETTINGS: dict[str, Callable[[Any, str, str], Any]] = {
    "%preload": _preload,
    "%package": _package,
    "%memory": lambda value, path, base_dir: parse_memory(value, path),
    "%budget": _budget,
    "%recheck": _recheck,
}
