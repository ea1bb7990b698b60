"""The curl stage's request: a Lua table (as Python natives) checked and made one HTTP request.

Pure code (no I/O) so that every rule of the request format is tested without a network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import quote_plus

import attrs
import hyperlink

from stagetx.stages.curl import errors
from stagetx.stages.curl.settings import CurlSettings

_FORM_TYPE = b"application/x-www-form-urlencoded"
_METHOD = re.compile(r"[A-Z][A-Z-]*\Z")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 5.1: what a header name may be


class ReadyURL(hyperlink.URL):
    """An URL already in ASCII form.

    treq calls ``to_uri()`` on every URL, which IDNA-encodes the host and so rejects IPv6
    literals (``[::1]``) with current ``idna``; the stage converts once itself and hands treq
    this subclass, for which the conversion is the identity.
    """

    def to_uri(self) -> ReadyURL:  # type: ignore[override]
        """Return the URL unchanged: it is ASCII already."""
        return self


@attrs.frozen
class CurlRequest:
    """One checked request: ``url`` as the caller wrote it, ``target`` as it is fetched."""

    url: str
    target: ReadyURL
    method: str
    headers: dict[bytes, list[bytes]]
    body: bytes | None
    timeout_ms: float | None
    extra: Any


class BadRequest(Exception):
    """A request the stage refuses before any network work; carries what the reply needs."""

    def __init__(self, code: int, message: str, url: str = "", extra: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.url = url
        self.extra = extra


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _scalar_bytes(value: Any, what: str) -> bytes:
    """A header or form value as bytes, the way Lua's ``tostring`` would write it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, (int, float)):
        return str(value).encode("ascii")
    raise ValueError(f"{what} must be a string or a number, got {type(value).__name__}")


def _fields(first: Any) -> dict[Any, Any]:
    """The request table as a dict with ``str`` names (a bare string is a URL alone)."""
    if isinstance(first, (bytes, str)):
        return {"url": first}
    if isinstance(first, list):
        return {1: first[0]} if first else {}
    if isinstance(first, Mapping):
        return {(_text(k) if isinstance(k, (bytes, str)) else k): v for k, v in first.items()}
    raise BadRequest(
        errors.URL_MALFORMAT,
        f"the request must be a table or a URL string, got {type(first).__name__}",
    )


def _target(url: str) -> ReadyURL:
    """The URL to fetch: scheme guessed as libcurl does, host converted to ASCII, checked."""
    if not url:
        raise BadRequest(errors.URL_MALFORMAT, "No URL set")
    if _BAD_URL_CHARS.search(url):
        raise BadRequest(errors.URL_MALFORMAT, "URL rejected: white space or control character in the URL")
    if "://" not in url:
        url = "http://" + url
    try:
        parsed = hyperlink.URL.from_text(url)
    except ValueError as e:
        raise BadRequest(errors.URL_MALFORMAT, f"URL rejected: {e}") from None
    if parsed.scheme.lower() not in ("http", "https"):
        raise BadRequest(errors.UNSUPPORTED_PROTOCOL, f'Protocol "{parsed.scheme}" not supported')
    if not parsed.host:
        raise BadRequest(errors.URL_MALFORMAT, "URL rejected: no host part in the URL")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise BadRequest(errors.URL_MALFORMAT, f"URL rejected: port number {parsed.port} out of range")
    if not url.isascii():
        try:
            url = parsed.to_uri().to_text()
        except UnicodeError as e:
            raise BadRequest(errors.URL_MALFORMAT, f"URL rejected: bad host name: {e}") from None
    return cast(ReadyURL, ReadyURL.from_text(url))


def _headers(raw: Any, user_agent: str) -> dict[bytes, list[bytes]]:
    """Request headers from ``{NAME = VALUE}`` (VALUE may be a list) or ``{"Name: value", …}``."""
    headers: dict[bytes, list[bytes]] = {}
    if isinstance(raw, Mapping):
        for name, value in raw.items():
            values = value if isinstance(value, list) else [value]
            key = _scalar_bytes(name, "a header name")
            headers.setdefault(key, []).extend(_scalar_bytes(v, f"header {_text(key)}") for v in values)
    elif isinstance(raw, list):
        for line in raw:
            name, sep, value = _scalar_bytes(line, "a header line").partition(b":")
            if not sep:
                raise ValueError(f"header line {_text(line)!r} has no ':'")
            headers.setdefault(name.strip(), []).append(value.strip())
    elif raw is not None:
        raise ValueError(f"header must be a table, got {type(raw).__name__}")
    for name in headers:
        if not _TOKEN.match(name):  # else Twisted raises while sending: an internal error, not 43
            raise ValueError(f"header name {_text(name)!r} is not an HTTP token")
    if not _has(headers, b"user-agent"):
        headers[b"User-Agent"] = [user_agent.encode("utf-8")]
    return headers


def _has(headers: dict[bytes, list[bytes]], name: bytes) -> bool:
    return any(key.lower() == name for key in headers)


def _form(data: Mapping[Any, Any]) -> bytes:
    """``application/x-www-form-urlencoded`` text of a table; list values repeat their name."""
    pairs = []
    for name, value in data.items():
        key = quote_plus(_scalar_bytes(name, "a form field name"))
        for item in value if isinstance(value, list) else [value]:
            pairs.append(f"{key}={quote_plus(_scalar_bytes(item, f'form field {key}'))}")
    return "&".join(pairs).encode("ascii")


def _body(data: Any) -> bytes | None:
    """The POST body: a string as is, a table as a form (an empty table is an empty form)."""
    if data is None:
        return None
    if isinstance(data, (bytes, str)):
        return _scalar_bytes(data, "data")
    if isinstance(data, Mapping):
        return _form(data)
    if isinstance(data, list) and not data:
        return b""
    raise ValueError("data must be a string or a table of NAME = VALUE form fields")


def _timeout(raw: Any, default: float | None) -> float | None:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"timeout must be a number of milliseconds, got {type(raw).__name__}")
    return float(raw) if raw > 0 else None


def _method(raw: Any, has_body: bool) -> str:
    if raw is None:
        return "POST" if has_body else "GET"
    method = _text(raw).upper()
    if not _METHOD.match(method):
        raise ValueError(f"method {method!r} is not an HTTP method name")
    return method


def parse_request(values: tuple[Any, ...], settings: CurlSettings) -> CurlRequest:
    """Check the values of one curl request; raises `BadRequest` with curl's error number."""
    if not values:
        raise BadRequest(errors.URL_MALFORMAT, "No URL set: the message carries no request")
    fields = _fields(values[0])
    extra = fields.get("extra")
    raw_url = fields.get("url", fields.get(1))
    if not isinstance(raw_url, (bytes, str)):
        raise BadRequest(errors.URL_MALFORMAT, "No URL set: url must be a string", extra=extra)
    try:
        url = raw_url.decode("utf-8") if isinstance(raw_url, bytes) else raw_url
    except UnicodeDecodeError:
        raise BadRequest(errors.URL_MALFORMAT, "URL rejected: not UTF-8", _text(raw_url), extra) from None
    try:
        target = _target(url.strip())
        body = _body(fields.get("data"))
        headers = _headers(fields.get("header"), settings.user_agent)
        if body is not None and not _has(headers, b"content-type"):  # as libcurl does for POSTFIELDS
            headers[b"Content-Type"] = [_FORM_TYPE]
        return CurlRequest(
            url=url,
            target=target,
            method=_method(fields.get("method"), body is not None),
            headers=headers,
            body=body,
            timeout_ms=_timeout(fields.get("timeout"), settings.timeout_ms),
            extra=extra,
        )
    except BadRequest as e:
        raise BadRequest(e.code, e.message, url, extra) from None
    except ValueError as e:
        raise BadRequest(errors.BAD_FUNCTION_ARGUMENT, str(e), url, extra) from None
