"""Broker addresses and framings, pure: no reactor, no Lua.

``parse_url`` reads ``"tcp://host:port?packet=IN,OUT"``; a ``Framing`` cuts a byte stream into
frames and encodes frames back, within the IN/OUT limits:

- ``packet``: 4-byte little-endian length, then that many bytes of payload;
- ``text``: lines ending in ``\\n`` (a ``\\r`` before it is dropped); the limit counts the line;
- ``bson``: BSON documents (their own little-endian int32 length leads), decoded to data only:
  dict/list/str/bytes/int/float/bool/None — never code, whatever type the peer sent;
- ``json``: JSON documents, one per line (on a WebSocket, one per text message), data only.

A decoded frame is data Lua can hold: a document nested deeper than ``MAX_DEPTH``, or a JSON
integer beyond 64 bits or string with a lone surrogate escape (``"\\ud800"``, not text), does not
decode (``FrameError``), like malformed bytes.

On a WebSocket (``ws``, ``wss``) one message is one frame: only ``decode``/``payload`` and the
limits are used, ``split``/``wrap`` are not; ``binary`` says which message type a framing sends.

A frame over the IN limit raises ``FrameTooLarge`` as soon as its length is known (before its
bytes arrive); the caller closes that connection.
"""

from __future__ import annotations

import datetime
import json
import re
import struct
from typing import Any

import attrs
import bson
from bson.codec_options import CodecOptions, DatetimeConversion

SCHEMES = ("tcp", "udp", "tls", "ws", "wss")
FRAMINGS = ("packet", "text", "bson", "json")
DEFAULT_LIMIT = 1 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_URL = re.compile(
    r"^(tcp|udp|tls|wss|ws)://(?:\[([^\]]*)\]|([^:/?\[\]]*))(?::(\d+))?(/[^?]*)?(?:\?(.*))?$", re.IGNORECASE
)
_LENGTH = struct.Struct("<I")
_BSON_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_MS)
MAX_DEPTH = 64  # levels of a received document: stagetx.codec.MAX_DEPTH, what Lua can receive
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1  # a Lua integer: stagetx.codec.LUA_INT_MIN/MAX

Data = bytes | dict | list | str | int | float | bool | None


class BrokerAddressError(ValueError):
    """A broker URL or address text that cannot be used; the message says why."""


class FrameTooLarge(ValueError):
    """A frame over the IN or OUT limit: the connection carrying it is closed."""


class FrameError(ValueError):
    """A frame that does not decode (bad BSON), or a value the framing cannot send."""


#: Bytes waiting to be written to one connection at which it stops being read, and at which it
#: is closed (a peer that does not read while the stage keeps writing to it).
DEFAULT_OUTBUF = 256 * 1024
DEFAULT_OUTMAX = 16 * 1024 * 1024
BACKPRESSURE = ("outbuf", "outmax", "inflight")


def parse_size(text: str) -> int:
    """``"64k"`` → 65536; units ``k``, ``m``, ``g`` (powers of 1024)."""
    match = _SIZE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise BrokerAddressError(f"bad frame size {text!r} (expected e.g. 512, 64k, 1m)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


@attrs.frozen
class BrokerURL:
    """A parsed ``broker.ready``/``broker.join`` address."""

    scheme: str
    host: str
    port: int
    framing: str = "packet"
    limit_in: int = DEFAULT_LIMIT
    limit_out: int = DEFAULT_LIMIT
    path: str = "/"  # the HTTP path of a ws/wss address
    #: Backpressure per connection: bytes waiting to be written at which reading pauses, bytes at
    #: which the connection is closed, and frames received but not answered at which reading
    #: pauses (0: no bound).
    outbuf: int = DEFAULT_OUTBUF
    outmax: int = DEFAULT_OUTMAX
    inflight: int = 0

    @property
    def ipv6(self) -> bool:
        return ":" in self.host


def parse_url(url: str) -> BrokerURL:
    """``scheme://host:port?framing=IN,OUT&outbuf=SIZE&outmax=SIZE&inflight=N`` (``IN:OUT`` too;
    ``[v6]`` hosts; empty or ``*`` host = any).

    ``ws``/``wss`` addresses may have a path: ``ws://host:port/play?json``. Without a framing the
    socket uses ``packet``; without limits, 1 MiB each way; the backpressure parameters default to
    ``DEFAULT_OUTBUF``, ``DEFAULT_OUTMAX`` and no ``inflight``.
    """
    match = _URL.match(url.strip())
    if not match:
        raise BrokerAddressError(
            f"bad broker address {url!r} (expected tcp://, udp://, tls://, ws:// or wss://host:port)"
        )
    scheme, v6, host, port, path, query = match.groups()
    scheme = scheme.lower()
    if path and path != "/" and scheme not in ("ws", "wss"):
        raise BrokerAddressError(f"bad broker address {url!r}: only ws:// and wss:// addresses have a path")
    host = v6 if v6 is not None else host
    if host in ("", "*"):
        host = "::" if v6 is not None else "0.0.0.0"
    if port is None or not 0 <= int(port) <= 65535:
        raise BrokerAddressError(f"bad broker address {url!r}: a port 0..65535 is needed")
    framing_part, options = "", {}
    for part in (query or "").split("&"):
        name, _, value = part.partition("=")
        key = name.strip().lower()
        if key in BACKPRESSURE:
            options[key] = _option(key, value, url)
        elif framing_part:
            known = ", ".join(BACKPRESSURE)
            raise BrokerAddressError(f"bad broker address {url!r}: unknown parameter {name!r} ({known})")
        else:
            framing_part = part
    framing, limits = _framing(framing_part, url)
    parsed = BrokerURL(scheme, host, int(port), framing, *limits, path=path or "/", **options)
    if parsed.outmax < parsed.outbuf:
        raise BrokerAddressError(f"bad broker address {url!r}: outmax is less than outbuf")
    return parsed


def _option(name: str, value: str, url: str) -> int:
    """One backpressure parameter: ``outbuf``/``outmax`` are sizes, ``inflight`` a count (0: none)."""
    if name == "inflight":
        if not value.strip().isdigit():
            raise BrokerAddressError(f"bad broker address {url!r}: inflight is a number of frames (0: no bound)")
        return int(value)
    try:
        return parse_size(value.strip())
    except BrokerAddressError as err:
        raise BrokerAddressError(f"bad broker address {url!r}: {name}: {err}") from None


def _framing(query: str, url: str) -> tuple[str, tuple[int, int]]:
    name, _, values = query.partition("=")
    name = name.strip().lower() or "packet"
    if name not in FRAMINGS:
        raise BrokerAddressError(f"bad broker address {url!r}: unknown framing {name!r} (packet, text, bson, json)")
    if not values.strip():
        return name, (DEFAULT_LIMIT, DEFAULT_LIMIT)
    parts = re.split(r"[,:]", values)
    if len(parts) > 2:
        raise BrokerAddressError(f"bad broker address {url!r}: expected {name}=IN,OUT")
    limit_in = parse_size(parts[0])
    limit_out = parse_size(parts[1]) if len(parts) == 2 else limit_in
    return name, (limit_in, limit_out)


class Framing:
    """One framing with its limits; stateless, so one instance serves all connections of a listener."""

    __slots__ = ("limit_in", "limit_out")

    name = ""
    binary = True  # a WebSocket sends this framing's frames as binary messages (else as text)

    def __init__(self, limit_in: int, limit_out: int) -> None:
        self.limit_in = limit_in
        self.limit_out = limit_out

    def split(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        """The complete frames' payloads at the head of ``buffer`` and the bytes left over."""
        raise NotImplementedError

    def decode(self, payload: bytes) -> Data:
        """The value handed to Lua for one frame's payload."""
        return payload

    def payload(self, value: Data) -> bytes:
        """The payload of ``value`` (raises ``FrameError`` for a value this framing cannot carry)."""
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8", "surrogateescape")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return repr(value).encode()
        raise FrameError(f"a {self.name} socket sends strings and numbers, not {_kind(value)}")

    def encode(self, value: Data) -> bytes:
        """The bytes on the wire for one value; ``FrameTooLarge`` past the OUT limit."""
        payload = self.payload(value)
        self.check_out(len(payload))
        return self.wrap(payload)

    def wrap(self, payload: bytes) -> bytes:
        return payload

    def check_out(self, size: int) -> None:
        if size > self.limit_out:
            raise FrameTooLarge(f"frame of {size} bytes is over the OUT limit of {self.limit_out}")

    def check_in(self, size: int) -> None:
        if size > self.limit_in:
            raise FrameTooLarge(f"frame of {size} bytes is over the IN limit of {self.limit_in}")


class PacketFraming(Framing):
    """4-byte little-endian length + payload."""

    __slots__ = ()
    name = "packet"

    def split(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        frames = []
        pos, end = 0, len(buffer)
        unpack = _LENGTH.unpack_from
        while end - pos >= 4:
            (size,) = unpack(buffer, pos)
            if size > self.limit_in:
                self.check_in(size)
            stop = pos + 4 + size
            if stop > end:
                break
            frames.append(buffer[pos + 4 : stop])
            pos = stop
        return frames, buffer[pos:] if pos else buffer

    def wrap(self, payload: bytes) -> bytes:
        return _LENGTH.pack(len(payload)) + payload


class TextFraming(Framing):
    """Lines: ``\\n``-terminated, ``\\r\\n`` accepted; sent with ``\\n``, unless the value already
    ends with one (the original wrote strings as they were, so its scripts end replies with it)."""

    __slots__ = ()
    name = "text"
    binary = False

    def split(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        *lines, rest = buffer.split(b"\n")
        frames = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            self.check_in(len(line))
            frames.append(line)
        self.check_in(len(rest) - 1 if rest[-1:] == b"\r" else len(rest))  # only one \r is dropped
        return frames, rest

    def wrap(self, payload: bytes) -> bytes:
        return payload if payload[-1:] == b"\n" else payload + b"\n"


class BsonFraming(Framing):
    """BSON documents, decoded into plain data; Lua tables are sent as documents."""

    __slots__ = ()
    name = "bson"

    def split(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        frames = []
        pos, end = 0, len(buffer)
        while end - pos >= 4:
            (size,) = _LENGTH.unpack_from(buffer, pos)
            self.check_in(size)
            if size < 5:
                raise FrameError(f"BSON document length {size} is too small")
            if pos + size > end:
                break
            frames.append(buffer[pos : pos + size])
            pos += size
        return frames, buffer[pos:]

    def decode(self, payload: bytes) -> Data:
        try:
            document = bson.decode(payload, codec_options=_BSON_OPTIONS)
        except Exception as err:  # bson raises several types (InvalidBSON, struct/utf-8 errors)
            raise FrameError(f"bad BSON document: {err}") from None
        return _plain(document, 0)

    def payload(self, value: Data) -> bytes:
        if isinstance(value, list) and not value:
            value = {}
        if not isinstance(value, dict):
            raise FrameError(f"a bson socket sends tables, not {_kind(value)}")
        return bson.encode(_bson_safe(value))


class JsonFraming(TextFraming):
    """JSON documents, one per line (``\n``), decoded into plain data; Lua tables are sent as JSON.

    Received documents are data by nature; sent byte strings must be UTF-8 (JSON has no binary),
    and NaN or infinity is refused (JSON has neither).
    """

    __slots__ = ()
    name = "json"

    def decode(self, payload: bytes) -> Data:
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise FrameError(f"bad JSON document: {err}") from None
        _check_lua(document, 0)
        return document  # type: ignore[no-any-return]

    def payload(self, value: Data) -> bytes:
        try:
            return json.dumps(_json_safe(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as err:
            raise FrameError(f"a json socket cannot send this value: {err}") from None


FRAMING_CLASSES: dict[str, type[Framing]] = {
    "packet": PacketFraming,
    "text": TextFraming,
    "bson": BsonFraming,
    "json": JsonFraming,
}


def framing_for(url: BrokerURL) -> Framing:
    return FRAMING_CLASSES[url.framing](url.limit_in, url.limit_out)


def _plain(value: Any, depth: int) -> Data:
    """BSON values as data: strings stay text, binary becomes bytes, the rest numbers or text.

    Documents nested deeper than ``MAX_DEPTH`` are refused here, as Lua could not receive them.
    """
    if isinstance(value, (dict, list, tuple)):
        if depth >= MAX_DEPTH:
            raise FrameError(f"BSON document nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            return {str(k): _plain(v, depth + 1) for k, v in value.items()}
        return [_plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return int(value)  # Int64 and DatetimeMS are int-like
    if isinstance(value, str):
        return str(value)  # Code (JavaScript) arrives as its text, never as something callable
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, bson.DatetimeMS):
        return int(value)
    if isinstance(value, bson.Regex):
        return str(value.pattern)
    if isinstance(value, bson.Timestamp):
        return value.time
    if isinstance(value, (bson.MinKey, bson.MaxKey)):
        return None
    return str(value)  # ObjectId, Decimal128, DBRef, UUID: their text form


def _bson_safe(value: Any) -> Any:
    """Lua data for ``bson.encode``: string keys; byte strings as BSON strings when they are UTF-8."""
    if isinstance(value, dict):
        return {_key(k): _bson_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bson_safe(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return bson.Binary(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise FrameError(f"integer {value} does not fit BSON's 64 bits")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise FrameError(f"a bson socket cannot send {_kind(value)}")


def _check_lua(value: Any, depth: int) -> None:
    """Refuse a received JSON document Lua cannot hold (``FrameError``): nested deeper than
    ``MAX_DEPTH``, an integer beyond 64 bits, a string (or key) with a lone surrogate."""
    if isinstance(value, str):
        if not value.isascii():
            _check_text(value)
    elif isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise FrameError(f"JSON document nested deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            if not key.isascii():
                _check_text(key)
            _check_lua(item, depth + 1)
    elif isinstance(value, list):
        if depth >= MAX_DEPTH:
            raise FrameError(f"JSON document nested deeper than {MAX_DEPTH} levels")
        for item in value:
            _check_lua(item, depth + 1)
    elif type(value) is int and not _INT_MIN <= value <= _INT_MAX:
        raise FrameError(f"bad JSON document: integer {value} does not fit 64 bits (a Lua integer)")


def _check_text(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = value[err.start]
        raise FrameError(f"bad JSON document: a lone surrogate \\u{ord(bad):04x} in a string (not text)") from None


def _json_safe(value: Any) -> Any:
    """Lua data for ``json.dumps``: string keys, UTF-8 byte strings as text."""
    if isinstance(value, dict):
        return {_key(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("a json socket sends UTF-8 strings only (JSON has no binary)") from None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise FrameError(f"a json socket cannot send {_kind(value)}")


def _key(key: Any) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _kind(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "tables"
    if isinstance(value, bool):
        return "booleans"
    if value is None:
        return "nil"
    return type(value).__name__
