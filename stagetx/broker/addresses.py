"""Network addresses for ``broker.aton``/``broker.ntoa``/``broker.ifaddr`` and socket fields.

A *packed address* is the binary form Lua scripts pass around (the ``addr`` of an accept or a
receive function, ``stage.signal({id, addr})``): the 4 or 16 address bytes in network order,
then the port as 2 bytes big-endian (6 bytes for IPv4, 18 for IPv6). Text forms are
``"1.2.3.4:80"`` and ``"[::1]:80"``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from stagetx.broker.framing import BrokerAddressError

_PORT = struct.Struct("!H")
_SIOCGIFADDR = 0x8915
_IF_INET6 = "/proc/net/if_inet6"


def pack(host: str, port: int) -> bytes:
    """The packed form of a numeric ``host`` and ``port``."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    return ip.packed + _PORT.pack(port)


def unpack(packed: bytes) -> tuple[str, int | None]:
    """``(host text, port)`` of a packed address; a bare 4/16-byte address has port None."""
    size = len(packed)
    if size in (6, 18):
        return str(ipaddress.ip_address(packed[:-2])), _PORT.unpack(packed[-2:])[0]
    if size in (4, 16):
        return str(ipaddress.ip_address(packed)), None
    raise BrokerAddressError(f"not a packed address ({size} bytes; expected 4, 6, 16 or 18)")


def read(address: bytes) -> tuple[str, int | None]:
    """``(host text, port)`` of a numeric text address (``socket[1]`` is one) or a packed one.

    Text is tried first: a packed address that is also a numeric address's text is too unlikely
    to matter (its bytes would all have to be digits, dots, colons and brackets)."""
    try:
        host, port = split(address.decode("ascii"))
        ipaddress.ip_address(host)
    except (UnicodeDecodeError, BrokerAddressError, ValueError):
        return unpack(address)
    return str(ipaddress.ip_address(host)), (port if _has_port(address) else None)


def _has_port(address: bytes) -> bool:
    """Whether a text address names a port (``"[::1]:80"``, ``"1.2.3.4:80"``; not ``"::1"``)."""
    return address.startswith(b"[") and b"]:" in address or address.count(b":") == 1


def fields(host: str, port: int | None) -> dict[str, str | int]:
    """The original's ``broker.ntoa(addr, t)`` fields: ``family`` (the AF_ number), ``addr``,
    ``port``, and ``scope_id`` for IPv6 (a packed address carries none: 0)."""
    ip = ipaddress.ip_address(host)
    out: dict[str, str | int] = {"family": int(socket.AF_INET6 if ip.version == 6 else socket.AF_INET)}
    out["addr"] = str(ip)
    out["port"] = port or 0
    if ip.version == 6:
        out["scope_id"] = 0
    return out


def text(host: str, port: int | None) -> str:
    """``"1.2.3.4:80"``, ``"[::1]:80"``, or the host alone when there is no port."""
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split(address: str) -> tuple[str, int]:
    """``"scheme://host:port"``, ``"host:port"``, ``"[v6]:port"``, ``"host"`` → (host, port); no port = 0."""
    rest = address.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    rest = rest.split("?", 1)[0].rstrip("/")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""  # a bare IPv6 address or a name
    if not host or (port and not port.isdigit()) or int(port or 0) > 65535:
        raise BrokerAddressError(f"bad address {address!r}")
    return host, int(port or 0)


def aton(address: str) -> list[bytes]:
    """Every packed address ``address`` resolves to, in resolver order without duplicates."""
    host, port = split(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError) as err:
        raise BrokerAddressError(f"cannot resolve {host!r}: {err}") from None
    found: list[bytes] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            packed = pack(str(sockaddr[0]), port)
            if packed not in found:
                found.append(packed)
    return found


def is_multicast(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_multicast
    except ValueError:
        return False


def interface_addresses() -> dict[str, list[str]]:
    """The IPv4 and IPv6 addresses of each network interface (Linux), by interface name."""
    result: dict[str, list[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            addresses = result.setdefault(name, [])
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            addresses.append(socket.inet_ntoa(reply[20:24]))
    if os.path.exists(_IF_INET6):
        with open(_IF_INET6) as lines:
            for line in lines:
                fields = line.split()
                if len(fields) >= 6:
                    raw = bytes.fromhex(fields[0])
                    result.setdefault(fields[5], []).append(str(ipaddress.IPv6Address(raw)))
    return result
