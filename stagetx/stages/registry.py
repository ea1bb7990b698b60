"""The open registry of stage types: every type, built-in or not, is an ``IStageType`` plugin.

Types are found with ``twisted.plugin.getPlugins`` in the ``twisted/plugins/`` dropin folders on
``sys.path``: the built-in ones in ``twisted/plugins/stagetx_stages.py``, any other package's in
its own dropin (docs/internals.md shows one). The supervisor asks a type to check its settings
when the configuration is read; the child process asks it for a stage. A dropin stays tiny: it
names the type and the module holding its code, which is imported only when the type is used.
"""

from __future__ import annotations

import importlib
from typing import Any

import attrs
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface, implementer


class SettingsError(ValueError):
    """A stage type's settings are wrong; the text is one line naming the JSON path and the problem."""


class IStageType(Interface):
    """A kind of stage, written ``=NAME+id`` in a configuration."""

    name = Attribute("The type's name in stage names: ``index`` for ``=index+rank``.")

    def check(settings: Any, path: str, base_dir: str) -> None:
        """Raise ``SettingsError`` (its text starting with ``path``, the stage's JSON key) if
        ``settings`` (the merged ``=NAME`` and ``=NAME+id`` values) cannot run; nothing starts.
        Relative paths in ``settings`` name files under ``base_dir`` (the config file's folder)."""

    def stage(context: Any, config: Any) -> Any:
        """A new stage (``stagetx.stages.base.Stage``) for ``config`` (a ``StageConfig``) hosted by
        ``context`` (a ``StageContext``)."""


@implementer(IPlugin, IStageType)
@attrs.frozen
class StageType:
    """A stage type whose code is module ``module``: its ``Stage(context, config)`` class, an
    optional ``check_settings(settings, path, base_dir)`` raising ``SettingsError``, and an
    optional ``held_paths(settings, base_dir)`` (see ``holds``)."""

    name: str
    module: str

    def check(self, settings: Any, path: str, base_dir: str) -> None:
        check = getattr(importlib.import_module(self.module), "check_settings", None)
        if check is not None:
            check(settings, path, base_dir)

    def holds(self, settings: Any, base_dir: str) -> tuple[str, ...]:
        """The paths a stage with these (checked) settings uses alone, one process at a time (an
        index directory): the configuration gives each to one stage in one process."""
        held = getattr(importlib.import_module(self.module), "held_paths", None)
        return () if held is None else tuple(held(settings, base_dir))

    def stage(self, context: Any, config: Any) -> Any:
        return importlib.import_module(self.module).Stage(context, config)


_types: dict[str, IStageType] | None = None


def stage_types() -> dict[str, IStageType]:
    """Every stage type on ``sys.path``, by name (found once per process)."""
    global _types
    if _types is None:
        found: dict[str, IStageType] = {}
        for provider in getPlugins(IStageType):
            found.setdefault(provider.name, provider)
        _types = found
    return _types


def stage_type(name: str) -> IStageType:
    """The stage type ``name``; ``KeyError`` when no plugin provides it."""
    return stage_types()[name]
