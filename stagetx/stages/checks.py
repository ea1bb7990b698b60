"""Checks that several settings share, so each setting is judged by one rule when the
configuration is read: numbers that must be finite and of a sane size, files that must be
readable, folders that must be usable. A value that passes here cannot fail later for the same
reason in a child process, where the failure would be a crash loop instead of one line.
"""

from __future__ import annotations

import math
import os
from typing import TypeGuard

#: The longest time setting in milliseconds (365 days): a longer one is a typo, and timers or
#: poll timeouts built from it would overflow.
MAX_MS = 365 * 24 * 3600 * 1000


def finite_number(value: object) -> TypeGuard[int | float]:
    """An int or a float that is neither NaN nor infinite (Python's json reads ``NaN`` and turns
    ``1e400`` into ``inf``); ``type`` (not ``isinstance``) keeps ``bool`` out."""
    return type(value) is int or (type(value) is float and math.isfinite(value))


def milliseconds(value: object) -> TypeGuard[int | float]:
    """A time in ms above 0 and at most ``MAX_MS``."""
    return finite_number(value) and 0 < value <= MAX_MS


def _not_a_name(path: str) -> str | None:
    """Why ``path`` cannot name a file whatever the file system holds (the calls raise
    ``ValueError`` on it, not ``OSError``), or None."""
    return f"{path!r} holds a NUL character" if "\0" in path else None


def unreadable(path: str) -> str | None:
    """None when ``path`` is a file this process can read, else why not."""
    if (problem := _not_a_name(path)) is not None:
        return problem
    try:
        with open(path, "rb"):
            return None
    except OSError as err:
        return f"cannot read {path}: {err.strerror}"


def unusable_directory(path: str) -> str | None:
    """None when ``path`` is a directory, or can be made one (its nearest existing ancestor is a
    writable directory), else why not."""
    if (problem := _not_a_name(path)) is not None:
        return problem
    if os.path.exists(path):
        return None if os.path.isdir(path) else f"{path} is not a directory"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None


def unwritable_file(path: str) -> str | None:
    """None when this process can append to the file ``path`` (creating it if need be), else why not."""
    if (problem := _not_a_name(path)) is not None:
        return problem
    if os.path.isdir(path):
        return f"{path} is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"directory {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"directory {folder} is not writable"
    return None
