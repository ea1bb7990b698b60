"""Syntax checks of script files, nothing run: ``--check`` and the first step of a reload.

Each file is compiled (Lua's ``load`` of its text) in a bare runtime of the stage's VM kind, so a
script meant for LuaJIT is judged by LuaJIT. The chunk name is the path relative to the server's
base directory, as when the stage runs it, so the errors read ``lua/app.lua:3: ...``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from stagetx.lua.runtime import VM_MODULES


def compile_errors(kind: str, paths: Iterable[str], base_dir: str) -> list[str]:
    """One ``file:line: problem`` line per file of ``paths`` that cannot be read or compiled."""
    lua = VM_MODULES[kind].LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
    load = lua.globals()[b"load"]
    errors = []
    for path in paths:
        name = os.path.relpath(path, base_dir)
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as err:
            errors.append(f"{name}: {err.strerror}")
            continue
        result = load(source, b"@" + name.encode("utf-8", "surrogateescape"), b"t")
        if isinstance(result, tuple) and result[0] is None:
            errors.append(result[1].decode("utf-8", "replace"))
    return errors
