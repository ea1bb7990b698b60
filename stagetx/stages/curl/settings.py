"""The ``=curl+ID`` stage's settings: user-agent, timeout, concurrency, per-host, verify,
ca-file, max-size."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from stagetx.stages.checks import MAX_MS, finite_number

DEFAULT_USER_AGENT = "stagetx-curl"
DEFAULT_TIMEOUT_MS = 30000.0
#: The most requests in flight to one host by default: each is a connection of its own.
DEFAULT_PER_HOST = 32
#: The longest body kept by default: half the largest frame between servers
#: (``stagetx.cluster.gateway``), so that the reply still reaches a Lua stage anywhere.
DEFAULT_MAX_SIZE = 8 * 1024 * 1024
_MAX_MAX_SIZE = 1 << 40  # a terabyte in one Lua string: a bigger number is a typo


@attrs.frozen
class CurlSettings:
    """Validated settings; ``timeout_ms``, ``concurrency``, ``per_host`` or ``max_size`` None means
    no limit."""

    user_agent: str = DEFAULT_USER_AGENT
    timeout_ms: float | None = DEFAULT_TIMEOUT_MS
    concurrency: int | None = None
    per_host: int | None = DEFAULT_PER_HOST
    verify: bool = True
    ca_file: str | None = None
    max_size: int | None = DEFAULT_MAX_SIZE


def _timeout(value: Any) -> bool:
    """Milliseconds; 0 or less means no limit."""
    return finite_number(value) and value <= MAX_MS


def _concurrency(value: Any) -> bool:
    """Requests at once, a whole number; 0 or less means no cap."""
    return finite_number(value) and int(value) == value and value <= _MAX_CONCURRENCY


_MAX_CONCURRENCY = 1_000_000  # far past any pool's size: a bigger number is a typo


def _max_size(value: Any) -> bool:
    """Body bytes, a whole number; 0 or less means no limit."""
    return finite_number(value) and int(value) == value and value <= _MAX_MAX_SIZE


#: The check of each known setting's value (the original platform's files carry other keys too).
_VALID: dict[str, Any] = {
    "user-agent": lambda value: isinstance(value, str),
    "timeout": _timeout,
    "concurrency": _concurrency,
    "per-host": _concurrency,
    "verify": lambda value: isinstance(value, bool),
    "ca-file": lambda value: isinstance(value, str),
    "max-size": _max_size,
}


def wrong_setting(raw: Any) -> str | None:
    """What is wrong with ``raw`` that no default can stand in for: not an object, or a known
    setting with a value of the wrong kind (``"timeout: expected …"``); None when it can run."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        return f"expected an object of settings, got {json.dumps(raw)}"
    for key, value in raw.items():
        if key in _VALID and not _VALID[key](value):
            return f"{key}: wrong value {json.dumps(value)}"
    return None


def parse_settings(raw: Any) -> tuple[CurlSettings, list[str]]:
    """Settings from the stage's raw config value, and notices about what was ignored.

    The stage must start even with a doubtful configuration (the original platform's files carry
    keys stagetx lacks), so bad or unknown entries are reported and replaced by defaults.
    """
    notices: list[str] = []
    if raw is None:
        return CurlSettings(), notices
    if not isinstance(raw, Mapping):
        return CurlSettings(), [f"curl settings must be an object, got {type(raw).__name__}: ignored"]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "user-agent" and isinstance(value, str):
            values["user_agent"] = value
        elif key == "timeout" and _timeout(value):
            values["timeout_ms"] = float(value) if value > 0 else None
        elif key == "concurrency" and _concurrency(value):
            values["concurrency"] = int(value) if value > 0 else None
        elif key == "per-host" and _concurrency(value):
            values["per_host"] = int(value) if value > 0 else None
        elif key == "verify" and isinstance(value, bool):
            values["verify"] = value
        elif key == "ca-file" and isinstance(value, str):
            values["ca_file"] = value
        elif key == "max-size" and _max_size(value):
            values["max_size"] = int(value) if value > 0 else None
        elif key in _VALID:
            notices.append(f"curl setting {key!r} has a wrong value {value!r}: default used")
        else:
            notices.append(f"curl setting {key!r} is not known: ignored")
    return CurlSettings(**values), notices
