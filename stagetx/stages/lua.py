"""The ``=lua`` / ``=luajit`` stage: scripts in one Lua runtime on the reactor thread.

Start-up runs ``%preload`` (a file, or every ``*.lua`` of a directory in name order), then the main
script; a main script that returns a function makes it the *idle function*, called again after
the number of ms it returns. Messages are decoded into the runtime and handed to the prelude,
which finds the waitfor handler. Errors are logged with file and line; the stage keeps serving.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall

from stagetx.codec import CodecError, unpack_lua
from stagetx.config import StageConfig
from stagetx.host import StageHost
from stagetx.lua.api import StageAPI, lua_text
from stagetx.lua.extensions import install_all
from stagetx.lua.loader import ScriptLoader
from stagetx.lua.runtime import LuaScriptError, LuaVM
from stagetx.message import Message, Sender


class Stage:
    """A Lua stage (``config.type`` is ``lua`` or ``luajit``)."""

    def __init__(self, context: StageHost, config: StageConfig) -> None:
        self.context = context
        self.config = config
        self.log = context.log
        self.settings: dict[str, Any] = config.settings
        self.vm: LuaVM | None = None
        self.api: StageAPI | None = None
        self._senders: dict[Sender, Any] = {}
        self._idle_call: IDelayedCall | None = None
        self._stoppers: list[Callable[[], Any]] = []

    def on_stop(self, stopper: Callable[[], Any]) -> None:
        """Run ``stopper`` when the stage stops (it may return a Deferred to wait for)."""
        self._stoppers.append(stopper)

    def start(self) -> None:
        settings = self.settings
        package = settings["%package"]
        recheck = settings["%recheck"]
        api = StageAPI(
            self.context,
            lambda vm: ScriptLoader(vm, package, self.context.base_dir, recheck),
        )
        self.vm = vm = LuaVM(
            self.config.type,
            api.host(),
            budget_ms=settings["%budget"],
            max_memory=settings["%memory"],
            sender=_sender_fields(self.context.sender),
        )
        api.bind(vm)
        self.api = api
        install_all(self)
        for path in _preload_files(settings.get("%preload")):
            self._run_script(path, "preload")
        assert self.config.main is not None
        result = self._run_script(self.config.main, "main script")
        if result is not None and vm.lua_type(result) == "function":
            self._idle(result)
        self.log.info("stage {name} started", name=self.config.name)

    def stop(self) -> Deferred[Any]:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        return DeferredList([maybeDeferred(stop) for stop in reversed(self._stoppers)])

    def _run_script(self, path: str, where: str) -> Any:
        """Run one script file as a callback; returns its first result (None after an error)."""
        assert self.vm is not None and self.api is not None
        try:
            with open(path, "rb") as f:
                chunk = self.vm.compile(f.read(), b"@" + lua_text(os.path.relpath(path, self.context.base_dir)))
        except (OSError, LuaScriptError) as err:
            self.log.error("{where} {path}: {error}", where=where, path=path, error=str(err))
            self.context.count_error()
            return None
        ok, *results = self.vm.call(where, chunk)
        return results[0] if ok and results else None

    def _idle(self, f: Any) -> None:
        assert self.vm is not None
        ok, *results = self.vm.call("idle function", f)
        again = results[0] if ok and results else None
        if isinstance(again, (int, float)) and again > 0:
            self._idle_call = self.context.clock.callLater(again / 1000.0, self._idle, f)

    def receive(self, message: Message) -> None:
        vm = self.vm
        if vm is None:
            return
        try:
            values = unpack_lua(vm, message.payload)
        except CodecError as err:
            self.log.error("message {msgid!r} dropped: {error}", msgid=message.msgid, error=str(err))
            self.context.count_error()
            return
        sender = self._senders.get(message.sender)
        if sender is None:
            sender = self._senders[message.sender] = vm.table(_sender_fields(message.sender))
        reply = None if message.reply is None else lua_text(message.reply)
        vm.deliver(lua_text(message.msgid), sender, reply, *values)


def _sender_fields(sender: Sender) -> dict[Any, Any]:
    """``_WAITFOR[1]``: server address, process (1-based group), stage id, also by position."""
    return {
        "server": sender.server,
        "process": sender.group + 1,
        "stage": sender.stage,
        "instance": sender.instance,
        1: sender.server,
        2: sender.group + 1,
        3: sender.stage,
    }


def _preload_files(preload: str | None) -> list[str]:
    if not preload:
        return []
    if os.path.isdir(preload):
        names = sorted(n for n in os.listdir(preload) if n.endswith(".lua"))
        return [os.path.join(preload, n) for n in names]
    return [preload]
