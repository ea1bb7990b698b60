"""Stage types: one package per built-in type (``stagetx.stages.<type>``), adapter ``stage.Stage`` by its core."""

import importlib
from typing import Any

STAGE_TYPES = ("lua", "luajit", "index", "curl", "route", "ticket")


def stage_class(type_name: str) -> Any:
    """Return the ``Stage`` class implementing stage type ``type_name`` (``luajit`` shares ``lua``)."""
    module = "lua" if type_name == "luajit" else type_name
    return importlib.import_module(f"stagetx.stages.{module}.stage").Stage
