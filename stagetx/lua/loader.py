"""``stage.load``: scripts found along ``%package``, run once, cached, re-checked.

A cache entry remembers where its file was found; once it is older than the re-check period
(``%recheck``: long at position 0, short for a fail-over position > 0) the next load searches
again and re-runs the script if the winning file, its size or its mtime changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from stagetx.lua.runtime import LuaScriptError, LuaVM
from stagetx.lua.search import find_script

DEFAULT_RECHECK_MS = (600_000, 60_000)


class ScriptNotFound(LuaScriptError):
    """No file of that name along ``%package`` (``stage.require`` lets its callback decide)."""


@attrs.define
class _Cached:
    value: Any
    position: int
    path: str
    size: int
    mtime: float
    checked: float


class ScriptLoader:
    """The ``stage.load`` cache of one runtime.

    @param vm: the runtime scripts run in (the loader is used only from that runtime's thread).
    @param package: the ``%package`` entries.
    @param base_dir: the directory relative entries resolve against.
    @param recheck_ms: re-check periods ``(position 0, position > 0)``.
    @param clock: monotonic seconds (injected for tests).
    """

    def __init__(
        self,
        vm: LuaVM,
        package: Sequence[str],
        base_dir: str,
        recheck_ms: Sequence[int] = DEFAULT_RECHECK_MS,
        clock: Callable[[], float] = LuaVM.clock,
    ) -> None:
        self._vm = vm
        self._package = list(package)
        self._base_dir = base_dir
        self._recheck = (recheck_ms[0] / 1000.0, recheck_ms[1] / 1000.0)
        self._clock = clock
        self._cache: dict[str, _Cached] = {}

    def load(self, name: str) -> tuple[Any, Any]:
        """The value of ``"file"`` or ``"file+id"`` and its info table ``{position, path, mtime}``.

        ``"file+id"`` takes ``result[id]`` when the script returned a table, and the value itself
        when it returned anything else (as the original platform's ``stage.load`` does).
        Raises ``LuaScriptError`` naming the file (and line) when it is missing or fails.
        """
        file, _, key = name.partition("+")
        entry = self._entry(file)
        info = self._vm.lua.table_from([entry.position, entry.path.encode(), int(entry.mtime)])
        value = entry.value
        if not key or self._vm.lua_type(value) != "table":
            return value, info
        return value[key.encode()], info

    def run_file(self, path: str) -> Any:
        """Compile and run a script file with the runtime's globals; returns its first result."""
        with open(path, "rb") as f:
            text = f.read()
        chunk = self._vm.compile(text, b"@" + os.path.relpath(path, self._base_dir).encode())
        try:
            result = chunk()
        except Exception as err:  # lupa.LuaError, LuaMemoryError
            raise LuaScriptError(_lua_error_text(err)) from None
        return result[0] if isinstance(result, tuple) else result

    def _entry(self, file: str) -> _Cached:
        now = self._clock()
        cached = self._cache.get(file)
        if cached is not None:
            period = self._recheck[0] if cached.position == 0 else self._recheck[1]
            if now - cached.checked < period:
                return cached
        found = find_script(file, self._package, self._base_dir)
        if found is None:
            raise ScriptNotFound(f"stage.load: script '{file}' not found along %package")
        position, path = found
        stat = os.stat(path)
        if cached is not None and (cached.path, cached.size, cached.mtime) == (
            path,
            stat.st_size,
            stat.st_mtime,
        ):
            cached.checked = now
            cached.position = position
            return cached
        entry = _Cached(self.run_file(path), position, path, stat.st_size, stat.st_mtime, now)
        self._cache[file] = entry
        return entry


def _lua_error_text(err: BaseException) -> str:
    text = str(err) or "not enough memory"
    return text.removeprefix("error loading code: ")
