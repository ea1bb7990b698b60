"""The ``%package`` search of ``stage.load``: script name → (position, file).

Pure file-system lookup shared by the config check (a Lua stage's main script must exist) and the
Lua loader, so both find the same file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

_FORCED_POSITION = re.compile(r"^\[(\d+)\](.*)$", re.DOTALL)


def package_entry(entry: str, index: int) -> tuple[int, str]:
    """Split one ``%package`` entry into ``(position, directory)``.

    An entry's position is its index in the list, unless it is written ``"[N]dir"``, which fixes
    the position to ``N`` (``"[0]"`` alone names the base directory at position 0).
    """
    forced = _FORCED_POSITION.match(entry)
    if forced:
        return int(forced.group(1)), forced.group(2)
    return index, entry


def script_relpath(name: str) -> str | None:
    """The relative file path of a dotted script name (``"a.b"`` → ``a/b.lua``).

    Returns None for a name that cannot be a file below a package directory: empty parts
    (``"a..b"``, ``".a"``), parent references or absolute paths.
    """
    parts = name.replace("/", ".").split(".")
    if not name or any(part in ("", "..") for part in parts):
        return None
    return os.path.join(*parts) + ".lua"


def find_script(name: str, package_entries: Sequence[str], base_dir: str) -> tuple[int, str] | None:
    """Find script ``name`` along ``package_entries``; relative entries start at ``base_dir``.

    Returns ``(position, absolute_path)`` of the first entry holding the file, or None when no
    entry does (or the name is not a valid script name).
    """
    relpath = script_relpath(name)
    if relpath is None:
        return None
    for index, entry in enumerate(package_entries):
        position, directory = package_entry(entry, index)
        path = os.path.join(base_dir, directory, relpath)
        if os.path.isfile(path):
            return position, os.path.abspath(path)
    return None


def preload_files(preload: str | None) -> list[str]:
    """The ``%preload`` scripts: the file itself, or every ``*.lua`` of the directory in name order."""
    if not preload:
        return []
    if os.path.isdir(preload):
        names = sorted(n for n in os.listdir(preload) if n.endswith(".lua"))
        return [os.path.join(preload, n) for n in names]
    return [preload]
