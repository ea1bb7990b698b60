"""Lua APIs added to a stage's runtime beyond the prelude (``stage.submit``, ``thread.new``, ``broker``).

Each module listed in ``EXTENSIONS`` has ``install(stage)``, called once the stage's main runtime
exists and before any script runs; ``stage`` is the ``stagetx.stages.lua.stage.Stage`` (its ``vm``,
``api`` and ``context``). An extension adds functions to ``stage.vm.extensions`` (they become
``stage.NAME``), ``stage.vm.thread_extensions`` (``thread.NAME``) or Lua globals, and registers
its clean-up with ``stage.on_stop``.
"""

from __future__ import annotations

import importlib
from typing import Any

EXTENSIONS: tuple[str, ...] = ("stagetx.broker.lua_api", "stagetx.lua.workers")


def install_all(stage: Any) -> None:
    for name in EXTENSIONS:
        importlib.import_module(name).install(stage)
