"""The child's end of the control link (frames in ``stagetx.controllink``): stats, commands, watchdogs.

The process says ``Ready`` once its stages started, sends a ``Stats`` snapshot every second and
answers each admin ``Command``. The commands that need a process's own objects (stages, Lua
runtimes, log levels) run here; ``stagetx.admin`` merges the answers of all processes.
"""

from __future__ import annotations

import gc
import json
import os
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevelFilterPredicate

from stagetx.child.host import LATENCY_BUCKETS, ProcessHost, StageHost
from stagetx.child.links import local_retry
from stagetx.controllink import Command, CommandResult, Ready, Result, Stats, control_path, node_id, read_frame
from stagetx.logsetup import level_named
from stagetx.stages.index.commands import READS, RequestError, parse_key
from stagetx.wire import FrameTooLarge, Link, LinkClientFactory

if TYPE_CHECKING:
    from stagetx.stages.lua.stage import Stage as LuaStage

STATS_INTERVAL = 1.0
#: The first queue length that is warned about; each warning doubles the next threshold.
QUEUE_WARN = 1000
#: Lua memory growth is warned about past this many times the memory after start, then doubling.
MEMORY_GROWTH = 4
MEMORY_FLOOR = 8 << 20


def rss_bytes() -> int:
    """The resident set size of this process (Linux ``/proc``; else the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@attrs.define
class DoublingAlarm:
    """Warns once per doubling of a value above ``first``; re-arms when it falls under ``first``."""

    first: float
    next: float = attrs.field(default=0.0)

    def __attrs_post_init__(self) -> None:
        self.next = self.first

    def crossed(self, value: float) -> bool:
        if value < self.first:
            self.next = self.first
            return False
        if value < self.next:
            return False
        while self.next <= value:
            self.next *= 2
        return True


def lua_stage(stage: StageHost) -> LuaStage | None:
    """The Lua stage object of ``stage`` (None for built-in stages)."""
    return stage.stage if stage.config.type in ("lua", "luajit") else None  # type: ignore[return-value]


def stage_stats(stage: StageHost) -> dict[str, Any]:
    """One stage's counters, as the snapshot and ``stat`` carry them."""
    lua = lua_stage(stage)
    inner: Any = stage.stage
    stage.take_times()
    stats: dict[str, Any] = {
        "name": stage.name,
        "type": stage.config.type,
        "id": stage.stage_id,
        "instance": stage.instance,
        "received": stage.received,
        "sent": stage.sent,
        "errors": stage.errors,
        "busy": stage.busy,
        "latency": list(stage.latency),
        "failure": stage.failure,
        "last_errors": [{"time": at, "error": error} for at, error in stage.last_errors],
    }
    if lua is not None:
        stats["lua_memory"] = lua.vm.memory_used() if lua.vm is not None else None
        stats["reloads"] = lua.reloads
        listeners = lua.broker.endpoint_stats() if lua.broker is not None else []
        stats["listeners"] = listeners
        stats["clients"] = {"connected": sum(e["connected"] for e in listeners), **lua.traffic.as_dict()}
    if hasattr(inner, "categories"):
        stats["tickets"] = {name: list(counts) for name, counts in inner.categories().items()}
    if hasattr(inner, "subscriptions"):
        stats["subscriptions"] = dict(inner.subscriptions())
    return stats


class ProcessControl:
    """What the admin side can see and do in this process (no I/O: the client carries it)."""

    log = Logger(namespace="stagetx.child.control")

    def __init__(
        self,
        host: ProcessHost,
        levels: LogLevelFilterPredicate | None,
        started: float,
        cluster: Callable[[], Any] | None = None,
    ) -> None:
        self.host = host
        self.levels = levels
        self.started = started
        self._cluster = cluster
        self._queue_alarm = DoublingAlarm(QUEUE_WARN)
        self._memory_alarms: dict[str, DoublingAlarm] = {}

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything ``/metrics``, ``/health`` and ``stat`` need from this process."""
        router = self.host.router
        return {
            "group": self.host.group,
            "pid": os.getpid(),
            "uptime": now - self.started,
            "rss": rss_bytes(),
            "queue": router.queue_length(),
            "delay": router.delay,
            "buckets": list(LATENCY_BUCKETS),
            "stages": [stage_stats(stage) for stage in self.host.stages],
            "peers": self.peers(),
        }

    def peers(self) -> list[dict[str, Any]] | None:
        """The cluster's view of its peers, or None when this process runs no cluster."""
        if self._cluster is None:
            return None
        return list(self._cluster())

    def watch(self, snapshot: dict[str, Any]) -> None:
        """Queue overload and Lua memory growth warnings, each at doubling thresholds."""
        if self._queue_alarm.crossed(snapshot["queue"]):
            self.log.warn(
                "queue overload: {queue} messages waiting in process {group}",
                queue=snapshot["queue"],
                group=self.host.group + 1,
            )
        for stats in snapshot["stages"]:
            used = stats.get("lua_memory")
            if used is None:
                continue
            alarm = self._memory_alarms.get(stats["name"])
            if alarm is None:
                self._memory_alarms[stats["name"]] = DoublingAlarm(max(used * MEMORY_GROWTH, MEMORY_FLOOR))
            elif alarm.crossed(used):
                self.log.warn(
                    "Lua memory growth: stage {stage} uses {mib:.1f} MiB",
                    stage=stats["name"],
                    mib=used / 1048576,
                )

    def command(self, name: str, args: list[str]) -> Deferred[Result]:
        """Run one admin command here; never fails (errors are ``(False, text, None)``)."""
        handler = getattr(self, f"cmd_{name}", None)
        if handler is None:
            return succeed((False, f"unknown command {name!r}", None))
        d = maybeDeferred(handler, *args)
        d.addErrback(lambda f: (False, f"{name}: {f.getErrorMessage() or f.type.__name__}", None))
        return d

    def _stage(self, name: str) -> StageHost:
        for stage in self.host.stages:
            if name in (stage.name, stage.stage_id):
                return stage
        raise LookupError(f"no stage {name!r} in process {self.host.group + 1}")

    def _lua_stage(self, name: str) -> LuaStage:
        lua = lua_stage(self._stage(name))
        if lua is None:
            raise LookupError(f"stage {name!r} is not a Lua stage")
        return lua

    # -- commands (arguments are strings) ---------------------------------------------------------
    def cmd_stat(self) -> Result:
        router = self.host.router
        stages = [stage_stats(stage) for stage in self.host.stages]
        return True, "", {"queue": router.queue_length(), "delay": router.delay, "stages": stages}

    def cmd_mem(self) -> Result:
        lua = {s["name"]: s["lua_memory"] for s in map(stage_stats, self.host.stages) if "lua_memory" in s}
        return True, "", {"rss": rss_bytes(), "lua": lua}

    def cmd_gc(self) -> Result:
        before = {name: used for name, used in self.cmd_mem()[2]["lua"].items()}
        collected = gc.collect()
        for stage in self.host.stages:
            lua = lua_stage(stage)
            if lua is not None and lua.vm is not None:  # a callback: finalizers run under %budget
                lua.vm.call("gc", lua.vm.compile(b"collectgarbage('collect')", b"=gc"))
        after = self.cmd_mem()[2]
        return (
            True,
            "",
            {"python_objects": collected, "lua_before": before, "lua_after": after["lua"], "rss": after["rss"]},
        )

    def cmd_reload(self, name: str) -> Deferred[Result]:
        """A failed reload (``ReloadError``) answers ``reload: <file:line: problem>``."""
        lua = self._lua_stage(name)
        return lua.reload().addCallback(lambda _: (True, f"{lua.config.name} reloaded", {"reloads": lua.reloads}))

    def cmd_eval(self, name: str, code: str) -> Result:
        lua = self._lua_stage(name)
        vm = lua.vm
        if vm is None:
            raise LookupError(f"stage {name!r} is reloading")
        source = code.encode("utf-8", "surrogateescape")
        try:
            chunk = vm.compile(b"return " + source, b"=eval")
        except Exception:
            chunk = vm.compile(source, b"=eval")
        ok, *results = vm.call("eval", chunk)
        tostring = vm.lua.globals()[b"tostring"]
        shown = [_text(tostring(value)) for value in results]
        if not ok:
            return False, f"eval: {shown[0] if shown else 'error'}", None
        return True, "\t".join(shown), shown

    def cmd_tickets(self) -> Result:
        out = {s.name: stage_stats(s)["tickets"] for s in self.host.stages if hasattr(s.stage, "categories")}
        return True, "", out

    def cmd_peers(self) -> Result:
        return True, "", self.peers()

    def cmd_index(self, name: str, request: str = "") -> Result:
        """Read an ``=index`` stage: its indexes (members per tier), or a JSON request of reads."""
        inner: Any = self._stage(name).stage
        executor = getattr(inner, "executor", None)
        if executor is None:
            raise LookupError(f"stage {name!r} is not an index stage")
        if not getattr(inner, "loaded", True):  # half-loaded boards answer nothing
            return False, f"index {name}: {inner.failure or 'still loading'}", None
        if not request:
            boards = inner.store.boards
            return True, "", {_text(n): [len(t) for t in boards[n].tiers] for n in sorted(boards)}
        table = json.loads(request)
        if not isinstance(table, dict) or not all(map(_reads_only, table)):
            raise ValueError("the admin side runs only get, range, forEach and total requests")
        return True, "", _plain(executor.run(table))

    def cmd_loglevel(self, namespace: str, level: str) -> Result:
        if self.levels is None:
            return False, "log levels are not adjustable in this process", None
        self.levels.setLogLevelForNamespace(namespace, level_named(level))
        return True, "", {"namespace": namespace, "level": level}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _reads_only(key: str) -> bool:
    """True unless ``key`` names a write (a bad key is answered by the executor as an error entry)."""
    try:
        return parse_key(key).op in READS
    except RequestError:
        return True


def _plain(value: Any) -> Any:
    """An index reply as JSON natives: bytes as text, every key a string."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_text(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def _answer(link: Link, command: Command, result: Result) -> None:
    """Send ``command``'s result; one too large for a frame (``eval`` of a huge string) is answered
    with an error saying so, or the supervisor would wait out its timeout for an answer never sent."""
    try:
        link.send(CommandResult(command.id, result).frame())
    except FrameTooLarge as err:
        error = f"{command.name}: the answer is too large for the control link ({err})"
        link.send(CommandResult(command.id, (False, error, None)).frame())


class _ClientHandler:
    """Carries the control protocol over the link to the supervisor."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    def link_authenticated(self, link: Link) -> None:
        self.client.connected(link)

    def message_received(self, link: Link, obj: Any) -> None:
        frame = read_frame(obj)
        if isinstance(frame, Command):
            self.client.control.command(frame.name, frame.args).addCallback(lambda result: _answer(link, frame, result))

    def link_lost(self, link: Link, reason: object) -> None:
        self.client.link = None


class ControlClient(MultiService):
    """Keeps this process linked to its supervisor; pushes snapshots, answers commands."""

    log = Logger(namespace="stagetx.child.control")

    def __init__(self, control: ProcessControl, rundir: str, secret: bytes, reactor: Any) -> None:
        super().__init__()
        self.control = control
        self.reactor = reactor
        self.link: Link | None = None
        self.ready = False
        factory = LinkClientFactory(secret, node_id(control.host.group), _ClientHandler(self))
        factory.noisy = False
        endpoint = UNIXClientEndpoint(reactor, control_path(rundir))
        ClientService(endpoint, factory, retryPolicy=local_retry(), clock=reactor).setServiceParent(self)
        self._loop = LoopingCall(self.push)
        self._loop.clock = reactor

    def startService(self) -> None:
        MultiService.startService(self)
        self._loop.start(STATS_INTERVAL, now=False)

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        return MultiService.stopService(self)

    def connected(self, link: Link) -> None:
        self.link = link
        if self.ready:
            link.send(Ready().frame())
        self.push()

    def set_ready(self) -> None:
        """The process's stages all started: tell the supervisor (now or once linked)."""
        self.ready = True
        if self.link is not None:
            self.link.send(Ready().frame())
            self.push()

    def push(self) -> None:
        """Send a snapshot (and run the watchdogs); a LoopingCall: never raises."""
        try:
            snapshot = self.control.snapshot(self.reactor.seconds())
            self.control.watch(snapshot)
            if self.link is not None:
                self.link.send(Stats(snapshot).frame())
        except Exception:
            self.log.failure("control snapshot failed")
