"""The Python side of ``stage.*``, ``log4cxx``, ``process`` and ``thread`` for one Lua runtime.

Each entry of ``StageAPI.host()`` is one operation the prelude (``prelude.lua``) cannot do in
Lua: sending through the router, timers, the shared process state, script loading, logging.
Values cross once, encoded by ``stagetx.codec``; errors go back to Lua as ``(nil, message)`` so
the prelude raises them at the script's own line.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel

from stagetx.address import Address, AddressError, ReplyTo, ToStage, parse_target
from stagetx.bounded import BoundedDict
from stagetx.codec import CodecError, function_kinds, pack_lua, pack_py, unpack_lua
from stagetx.lua.loader import ScriptLoader, ScriptNotFound
from stagetx.lua.runtime import LuaScriptError, LuaVM
from stagetx.message import CLUSTER_WAY, Sender, run_room
from stagetx.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from stagetx.child.host import StageHost

LEVELS = {
    b"info": LogLevel.info,
    b"out": LogLevel.info,
    b"warn": LogLevel.warn,
    b"error": LogLevel.error,
    b"trace": LogLevel.debug,
    b"debug": LogLevel.debug,
    b"fatal": LogLevel.critical,
}


#: Parsed signal targets kept per runtime, at most this many.
TARGET_CACHE = 4096
#: The Lua runtime kind of each Lua stage type: a function value loads only into its own kind.
VM_KINDS = {"lua": "lua54", "luajit": "luajit21"}
#: Seconds between two log lines about replies to removed ``stage.waitfor(f)`` ids (``~N``).
LATE_REPLY_LOG_INTERVAL = 10.0
#: A stage logs at most ``ERROR_LOG_BURST`` Lua errors in full per ``ERROR_LOG_INTERVAL`` seconds,
#: then one line with how many more (each is still counted, and kept among its last errors): a
#: client that makes the script fail on every frame must not fill the disk with tracebacks.
ERROR_LOG_INTERVAL = 10.0
ERROR_LOG_BURST = 20


class Task:
    """A ``stage.addtask`` timer; Lua holds it as an opaque userdata."""

    __slots__ = ("f", "args", "call", "cancelled")

    def __init__(self, f: Any, args: tuple[Any, ...]) -> None:
        self.f = f
        self.args = args
        self.call: IDelayedCall | None = None
        self.cancelled = False


def text(value: Any) -> str:
    """A Lua string (bytes) as text; Lua ids may hold any bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def lua_text(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def next_delay(
    vm: LuaVM, report: Callable[[bytes, bytes, bytes], Any], where: str, what: str, f: Any, value: Any
) -> float | None:
    """The ms ``f`` (``what``: a task, job or idle function) asked to run again after (its first
    result, ``value``: a number > 0), or None: it ends. nan or ±inf, which no timer can wait for
    (Twisted asserts on nan; an infinite wait would hold its timer, and a job's queue slot, for
    ever), is ``f``'s Lua error through ``report`` under ``where``, naming where ``f`` is defined."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        error = f"the {what} returned {value} as its next delay, not a finite number of ms: it ends"
        report(where.encode(), b"", lua_text(f"{defined_at(vm, f)}: {error}"))
        return None
    return value if value > 0 else None


_DEFINED_AT = "local info = debug.getinfo(..., 'S'); return info.short_src .. ':' .. info.linedefined"


def defined_at(vm: LuaVM, f: Any) -> str:
    """``"main.lua:12"``, where Lua function ``f`` is defined: the line to name for an error in
    what ``f`` returned, found after it returned (rare: compiled each time, nothing kept)."""
    try:
        return text(vm.lua.execute(_DEFINED_AT, f))
    except Exception:  # lupa's LuaError: not a Lua function, or the script replaced debug.getinfo
        return "?"


class StageAPI:
    """The host callables of one stage's main runtime (used on the reactor thread only)."""

    def __init__(self, stage: StageHost, loader_factory: Callable[[LuaVM], ScriptLoader]) -> None:
        self.stage = stage
        self.log: Logger = stage.log
        self._loader_factory = loader_factory
        self._drain_call: IDelayedCall | None = None
        self._unhandled: set[str] = set()
        self._late = 0  # replies to removed "~N" ids since the last line about them
        self._late_logged = float("-inf")
        self._errors = RateLimitedLog(self.log, stage.clock, ERROR_LOG_INTERVAL, ERROR_LOG_BURST)
        # parsed signal targets, by their Lua string
        self._targets: BoundedDict[bytes, Address] = BoundedDict(TARGET_CACHE)
        # target -> a Lua stage of another VM kind there
        self._foreign: BoundedDict[Address, str | None] = BoundedDict(TARGET_CACHE)
        self.vm: LuaVM
        self.loader: ScriptLoader

    def bind(self, vm: LuaVM) -> None:
        self.vm = vm
        self.loader = self._loader_factory(vm)

    def host(self) -> dict[str, Callable[..., Any]]:
        return {
            "now": time.monotonic,
            "send": self.send,
            "send_packed": self.send_packed,
            "send_batch": self.send_batch,
            "unpack": self.unpack,
            "report": self.report,
            "schedule_drain": self.schedule_drain,
            "log": self.write_log,
            "once": self.once,
            "load": self.load,
            "addtask": self.addtask,
            "cancel": self.cancel,
            "v_get": self.v_get,
            "v_set": self.v_set,
            "v_update": self.v_update,
            "process_get": self.process_get,
            "process_set": self.process_set,
            "thread_get": self.thread_get,
        }

    # -- messages ---------------------------------------------------------------------------------
    def send(self, target: Any, *values: Any) -> tuple[Any, ...]:
        """The general path (values ``pack.lua`` leaves to Python: functions, LuaJIT runtimes)."""
        try:
            address = self._address(target)
            payload = pack_lua(self.vm, values)
        except (AddressError, CodecError) as err:
            return None, lua_text(f"stage.signal: {err}")
        foreign = self._foreign_stage(address)
        if foreign is not None and self.vm.vm_kind in function_kinds(payload):
            return None, lua_text(
                f"stage.signal: cannot send a {self.vm.vm_kind} function to {foreign}: a function"
                " value moves only between Lua stages of the same kind (=lua or =luajit)"
            )
        return self._route(address, payload)

    def _foreign_stage(self, address: Address) -> str | None:
        """A Lua stage of another VM kind that ``address`` reaches in this server, as ``"=luajit+jit"``,
        or None. Replicas on other servers are not known here: their receiver logs the refusal."""
        if address in self._foreign:
            return self._foreign[address]
        own = self.stage.config.type
        config = self.stage.process.config
        reached = []
        if type(address) is ToStage:
            stage_id = address.stage or self.stage.stage_id
            reached = [s for s in config.stages if s.id == stage_id]
        elif type(address) is ReplyTo and address.server == self.stage.process.server_id:
            reached = [s for s in config.stages if s.instance == address.instance]
        foreign = next((s.name for s in reached if s.type in VM_KINDS and s.type != own), None)
        return self._foreign.put(address, foreign)

    def send_packed(self, target: Any, payload: bytes, steady: bool = False) -> tuple[Any, ...]:
        """``send`` of values the prelude packed itself (``pack.lua``, the fast path).

        With ``steady`` (the prelude asks from a target's second message in a turn on), more
        results tell the prelude that ``target`` routes the same way, and surely gets there,
        for the rest of this turn (the reactor does not run meanwhile): ``room, group`` of
        ``Router.steady``, and for another process or server ``Router.run_parts``. Payloads up to
        ``room`` bytes to it wait in the prelude's outbox and come back in one ``send_batch``.
        """
        try:
            address = self._address(target)
        except AddressError as err:
            return None, lua_text(f"stage.signal: {err}")
        result = self._route(address, payload)
        if steady and result[0] is True:
            route = self._steady(address)
            if route is not None:
                if route[1] == -1:  # a stage of this process: routed one by one
                    return (True, None, *route)
                head, msgid, reply, server, reroute = self.stage.run_parts(target, address)
                room = run_room(route[0], head, msgid, reply)
                return (True, None, room, route[1], head, msgid, reply, _lua(server), _lua(reroute))
        return result

    def _steady(self, address: Address) -> tuple[int, int] | None:
        """How a payload to ``address`` may wait in the prelude's outbox (``Router.steady``)."""
        return self.stage.router.steady(self.stage.sender, address)

    def send_batch(self, *outbox: Any) -> None:
        """The prelude's outbox, each message answered ``true`` already (see ``send_packed``):
        ``way, count, entry[, server, reroute]``, a run entry (``Router.run_parts``) of ``count``
        messages to one stage, in the order signalled: in the process of group ``way``, or on
        ``server`` (``way`` is ``CLUSTER_WAY``); or ``target, payload`` pairs, in the order
        signalled, to stages of this process."""
        if type(outbox[0]) is int:
            group, count, entry = outbox[:3]
            server = reroute = None
            if group == CLUSTER_WAY:
                server, reroute = text(outbox[3]), _text_or_none(outbox[4])
            ok, reason = self.stage.send_run(group, entry, count, server, reroute)
            if not ok:  # a steady route changed within one turn: a bug, not the sender's
                way = f"server {server}" if server is not None else f"process {group + 1}"
                self.log.error("{count} messages to {way} lost: {reason}", count=count, way=way, reason=reason)
            return
        for i in range(0, len(outbox), 2):
            result = self._route(self._address(outbox[i]), outbox[i + 1])
            if result[0] is not True:
                self.log.error(
                    "message to {target} from the outbox lost: {reason}", target=text(outbox[i]), reason=result[1]
                )

    def unpack(self, payload: bytes, msgid: bytes) -> tuple[Any, ...]:
        """A received payload the prelude did not decode itself: ``(True, values...)``, or
        ``(False,)`` for one that does not decode (logged and counted; the message is dropped)."""
        try:
            return (True, *unpack_lua(self.vm, payload))
        except CodecError as err:
            self.log.error("message {msgid!r} dropped: {error}", msgid=text(msgid), error=str(err))
            self.stage.count_error()
            return (False,)

    def _route(self, address: Address, payload: bytes) -> tuple[Any, ...]:
        """Hand one message to the router: ``(True,)`` or ``(False, reason)`` for ``stage.signal``."""
        ok, reason = self.stage.send_payload(address, payload)
        return (True,) if ok else (False, lua_text(reason or "not delivered"))

    def _address(self, target: Any) -> Address:
        """The parsed ``target``; string targets are parsed once and kept (by their Lua string)."""
        address = self._targets.get(target) if type(target) is bytes else None
        if address is None:
            address = parse_target(self._target(target))
            if type(target) is bytes:
                self._targets.put(target, address)
        return address

    def _target(self, target: Any) -> Any:
        if isinstance(target, bytes):
            return text(target)
        if self.vm.lua_type(target) == "table":
            return tuple(_native(target[i]) for i in range(1, len(target) + 1))
        return target

    def schedule_drain(self) -> None:
        if self._drain_call is None or not self._drain_call.active():
            self._drain_call = self.stage.clock.callLater(0, self.vm.drain)

    def report(self, where: bytes, msgid: bytes, error: bytes) -> None:
        mid = text(msgid)
        if where == b"nohandler":
            if mid.startswith("~"):
                self._late_reply(mid)
            elif mid not in self._unhandled:
                self._unhandled.add(mid)
                self.log.warn("no handler for message {msgid!r} (logged once)", msgid=mid)
            return
        about = f" of message {mid!r}" if mid else ""
        error_text = text(error) or "not enough memory"
        self.stage.count_error(f"{error_text.splitlines()[0]} (in {text(where)}{about})")
        self._errors.error("Lua error in {where}{msgid}: {error}", where=text(where), msgid=about, error=error_text)

    def _late_reply(self, mid: str) -> None:
        """A reply to a ``stage.waitfor(f)`` id already removed (it came after its timeout): each id
        is new, so they are counted and logged once per ``LATE_REPLY_LOG_INTERVAL``."""
        self._late += 1
        now = self.stage.clock.seconds()
        if now - self._late_logged >= LATE_REPLY_LOG_INTERVAL:
            self.log.warn(
                "{count} replies came after their waitfor was removed (late, e.g. after a timeout); last {msgid!r}",
                count=self._late,
                msgid=mid,
            )
            self._late, self._late_logged = 0, now

    def write_log(self, level: bytes, group: bytes | None, message: bytes) -> None:
        logger = self.log if group is None else self.stage.logger_for(text(group))
        logger.emit(LEVELS.get(level, LogLevel.info), "{message}", message=text(message))

    # -- timers -----------------------------------------------------------------------------------
    def addtask(self, delay_ms: float, f: Any, *args: Any) -> Task:
        task = Task(f, args)
        task.call = self.stage.clock.callLater(max(delay_ms, 0) / 1000.0, self._fire, task)
        return task

    def cancel(self, task: Task) -> None:
        task.cancelled = True
        if task.call is not None and task.call.active():
            task.call.cancel()

    def _fire(self, task: Task) -> None:
        ok, *results = self.vm.call("task", task.f, *task.args)
        if task.cancelled or not ok or not results:
            return
        again = next_delay(self.vm, self.report, "task", "task", task.f, results[0])
        if again is not None:
            task.call = self.stage.clock.callLater(again / 1000.0, self._fire, task)

    # -- shared process state ---------------------------------------------------------------------
    def once(self, key: Any, mark: bool) -> bool:
        return self.stage.process.shared.once(key, mark)

    def v_get(self, key: Any) -> Any:
        payload = self.stage.process.shared.get(key)
        return None if payload is None else unpack_lua(self.vm, payload)[0]

    def v_set(self, key: Any, value: Any) -> tuple[Any, Any]:
        try:
            payload = None if value is None else pack_lua(self.vm, (value,))
        except CodecError as err:
            return None, lua_text(f"stage.v: {err}")
        self.stage.process.shared.set(key, payload)
        return True, value

    def v_update(self, key: Any, change: Any) -> tuple[Any, Any]:
        def apply(old: bytes | None) -> bytes | None:
            new = change(None if old is None else unpack_lua(self.vm, old)[0])
            new = new[0] if isinstance(new, tuple) else new
            return None if new is None else pack_lua(self.vm, (new,))

        try:
            payload = self.stage.process.shared.update(key, apply)
        except CodecError as err:
            return None, lua_text(f"stage.v: {err}")
        return True, None if payload is None else unpack_lua(self.vm, payload)[0]

    # -- scripts ----------------------------------------------------------------------------------
    def load(self, name: bytes) -> tuple[Any, ...]:
        try:
            value, info = self.loader.load(text(name))
        except ScriptNotFound as err:
            return None, lua_text(str(err)), True  # the third value: "no such script"
        except LuaScriptError as err:
            return None, lua_text(str(err))
        except OSError as err:
            return None, lua_text(f"stage.load: {text(name)}: {err}")
        return True, value, info

    # -- process and thread -----------------------------------------------------------------------
    def process_get(self, key: Any) -> Any:
        process = self.stage.process
        if key == b"id":
            return os.getpid()
        if key == b"stage":
            return process.group + 1
        if key == b"title":
            return lua_text(process.title())
        if key == b"args":
            return self.vm.lua.table_from([lua_text(a) for a in process.args])
        if isinstance(key, bytes) and key[:1] == b"%":
            value = os.environ.get(text(key[1:]))
            return None if value is None else lua_text(value)
        if isinstance(key, bytes) and key[:1] == b"$":
            payload = process.config_value(text(key[1:]), self.stage.settings)
            return None if payload is None else unpack_lua(self.vm, payload)[0]
        return None

    def process_set(self, key: Any, value: Any) -> bytes | None:
        """Apply one ``process[key] = value``; returns an error message or None."""
        process = self.stage.process
        if key == b"title":
            process.set_title(text(value))
        elif key == b"$":
            try:
                values = json.loads(text(value))
            except ValueError as err:
                return lua_text(f'process["$"]: not JSON: {err}')
            if not isinstance(values, dict):
                return b'process["$"]: the JSON must be an object'
            process.replace_config_values({k: pack_py((v,)) for k, v in values.items()})
        elif isinstance(key, bytes) and key[:1] == b"%":
            name = text(key[1:])
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = text(value if isinstance(value, bytes) else str(value).encode())
        elif isinstance(key, bytes) and key[:1] == b"$":
            try:
                payload = None if value is None else pack_lua(self.vm, (value,))
            except CodecError as err:
                return lua_text(f"process: {err}")
            process.set_config_value(text(key[1:]), payload)
        else:
            return lua_text(f"process: {text(key)!r} cannot be written")
        return None

    def thread_get(self, key: Any) -> Any:
        if key == b"id":
            return threading.get_native_id()
        if key == b"tick":
            return time.monotonic()
        return None


def _lua(value: str | None) -> bytes | None:
    return None if value is None else lua_text(value)


def _text_or_none(value: bytes | None) -> str | None:
    return None if value is None else text(value)


def _native(value: Any) -> Any:
    return text(value) if isinstance(value, bytes) else value


def sender_fields(sender: Sender) -> dict[Any, Any]:
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
