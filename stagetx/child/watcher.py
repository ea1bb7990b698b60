"""Dev mode (``--watch``): reloads a Lua stage when one of its script files changes."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from stagetx.child.control import lua_stage
from stagetx.child.host import ProcessHost
from stagetx.stages.lua.stage import ReloadError


class ScriptWatcher:
    """Dev mode: reloads a Lua stage when one of its script files changes (polling mtimes)."""

    log = Logger(namespace="stagetx.child.watcher")

    def __init__(self, host: ProcessHost, period: float, reactor: Any) -> None:
        self.host = host
        self._seen: dict[str, dict[str, float]] = {}
        self.loop = LoopingCall(self.check)
        self.loop.clock = reactor
        self.period = period

    @staticmethod
    def _mtimes(files: list[str]) -> dict[str, float]:
        out = {}
        for path in files:
            try:
                out[path] = os.stat(path).st_mtime
            except OSError:
                out[path] = -1.0
        return out

    def check(self) -> None:
        for stage in self.host.stages:
            lua = lua_stage(stage)
            if lua is None or lua.vm is None:
                continue
            name = stage.name
            try:
                now = self._mtimes(lua.script_files())
                before = self._seen.setdefault(name, now)
                if now != before:
                    self._seen[name] = now
                    self.log.info("scripts of {stage} changed: reloading", stage=name)
                    lua.reload().addErrback(self._failed, name)
            except Exception:
                self.log.failure("script watch of {stage} failed", stage=name)

    def _failed(self, failure: Failure, name: str) -> None:
        """A reload's ``ReloadError`` was logged by the stage with its file and line; anything else is a bug."""
        if not failure.check(ReloadError):
            self.log.failure("reload of {stage} failed", failure, stage=name)
