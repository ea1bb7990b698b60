"""The supervisor: one child process per ``#startup`` group, restarted with back-off on a crash.

Our own small service over ``spawnProcess`` rather than ``twisted.runner.procmon``: the children
must inherit the ``#services`` listening sockets (``childFDs``) and the environment, must get the
bootstrap line on stdin (docs/internals.md), and may log lines of any length.

The supervisor is also the admin side (docs/operations.md): children report over control links
(``stagetx.admin.control``); the ``#admin`` console and HTTP endpoints run here. Start-up logs one
line per bound port and spawned process, and one ``ready`` line once every process reported ready.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.base import DelayedCall
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, eventFromJSON, formatEvent
from twisted.python.failure import Failure

import stagetx
from stagetx.admin.commands import Commands
from stagetx.admin.console import ConsoleFactory
from stagetx.admin.control import ControlServer
from stagetx.admin.http import admin_site
from stagetx.config import HostPort, ServerConfig

CHILD_COMMAND: tuple[str, ...] = (sys.executable, "-m", "stagetx.child")
FIRST_SERVICE_FD = 3
MAX_LINE = 1 << 20  # a longer line is relayed in pieces of this size, so memory stays bounded
HEARTBEAT = 0.25  # the supervisor's own reactor is checked this often for /health
LAG_LIMIT = 1.0  # a heart-beat later than this means the supervisor's reactor is stuck
STALE_SNAPSHOT = 2.0  # a child with no snapshot for this long (2 × its 1 s stats beat) is unresponsive

_childLog = Logger(namespace="stagetx.child")
# One record of a child's text log ("- [stage.app#error] text"); continuation lines start with a tab.
_TEXT_RECORD = re.compile(r"- \[(?P<namespace>[^\]#\s]+)#(?P<level>[a-z]+)\] (?P<text>.*)", re.DOTALL)


class Clock(Protocol):
    """The part of ``IReactorTime`` the supervisor uses (``task.Clock`` in tests)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., Any], *a: Any) -> DelayedCall: ...


class Spawner(Protocol):
    """The part of ``IReactorProcess`` the supervisor uses."""

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = ...,
        path: str | None = ...,
        uid: int | None = ...,
        gid: int | None = ...,
        usePTY: bool = ...,
        childFDs: Mapping[int, int | str] | None = ...,
    ) -> Any: ...


@attrs.frozen
class ChildStatus:
    """What the admin console shows for one group: pid (None while down), start time, restarts."""

    group: int
    pid: int | None
    started: float | None
    restarts: int


class LineRelay:
    """Cuts a byte stream into text lines for the log, however long they are."""

    def __init__(self, emit: Callable[[str], None], max_line: int = MAX_LINE) -> None:
        self._emit = emit
        self._max_line = max_line
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        """Add received bytes; emit every complete line (and over-long partial ones)."""
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self._emit(line.rstrip(b"\r").decode("utf-8", "replace"))
        while len(self._buffer) >= self._max_line:
            piece, self._buffer = self._buffer[: self._max_line], self._buffer[self._max_line :]
            self._emit(piece.decode("utf-8", "replace"))

    def flush(self) -> None:
        """Emit what is left after the stream ended without a final newline."""
        if self._buffer:
            self._emit(self._buffer.rstrip(b"\r").decode("utf-8", "replace"))
            self._buffer = b""


class _ChildProtocol(ProcessProtocol):
    """One child process: writes the bootstrap line, relays its output, reports its exit.

    A child's log records are re-emitted with their own namespace and level, the text prefixed
    ``pN[pid]`` (N: the process number, 1-based as everywhere); other output lines (a crash
    before logging started) go to ``stagetx.child`` at info (stdout) or warn (stderr).
    """

    def __init__(self, supervisor: Supervisor, group: int, bootstrap: bytes) -> None:
        self.group = group
        self.pid: int | None = None
        self._supervisor = supervisor
        self._bootstrap = bootstrap
        self._out = LineRelay(self._relay(LogLevel.info))
        self._err = LineRelay(self._relay(LogLevel.warn))
        self._loggers: dict[str, Logger] = {}

    def _relay(self, level: LogLevel) -> Callable[[str], None]:
        last: tuple[str, LogLevel] | None = None  # the record that a tab-indented line continues

        def emit(line: str) -> None:
            nonlocal last
            if line.startswith("{") and self._relay_event(line):
                return
            record = _TEXT_RECORD.fullmatch(line)
            if record is not None:
                try:
                    last = record["namespace"], LogLevel.levelWithName(record["level"])
                except InvalidLogLevelError:
                    last = None
                else:
                    self._emit(*last, record["text"])
                    return
            if line.startswith("\t") and last is not None:
                self._emit(*last, line)
                return
            last = None
            self._emit("stagetx.child", level, line)

        return emit

    def _emit(self, namespace: str, level: LogLevel, line: str, **fields: Any) -> None:
        logger = self._loggers.get(namespace)
        if logger is None:
            logger = self._loggers[namespace] = Logger(namespace=namespace)
        logger.emit(level, "p{process}[{pid}] {line}", process=self.group + 1, pid=self.pid, line=line, **fields)

    def _relay_event(self, line: str) -> bool:
        """Re-emit a child's JSON-lines event with its fields (``--log-format json``)."""
        try:
            event = eventFromJSON(line)
        except ValueError:
            return False
        if not isinstance(event, dict) or "log_namespace" not in event or "log_level" not in event:
            return False
        fields = {k: v for k, v in event.items() if not k.startswith("log_") and k not in ("process", "pid", "line")}
        self._emit(event["log_namespace"], event["log_level"], formatEvent(event), **fields)
        return True

    def connectionMade(self) -> None:
        transport: Any = self.transport  # an IProcessTransport (mypy cannot see zope interfaces)
        self.pid = transport.pid
        transport.write(self._bootstrap)

    def outReceived(self, data: bytes) -> None:
        self._out.feed(data)

    def errReceived(self, data: bytes) -> None:
        self._err.feed(data)

    def outConnectionLost(self) -> None:
        self._out.flush()

    def errConnectionLost(self) -> None:
        self._err.flush()

    def processExited(self, reason: Failure) -> None:
        self._supervisor._exited(self, reason)

    def signal(self, name: str) -> None:
        """Send signal ``name`` ("TERM", "KILL") unless the process is already gone."""
        transport: Any = self.transport
        try:
            transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


@attrs.define
class _Slot:
    """The supervisor's state for one group: its current process and back-off."""

    group: int
    delay: float
    process: _ChildProtocol | None = None
    started: float | None = None
    restarts: int = 0
    pending: DelayedCall | None = None  # a scheduled restart
    killer: DelayedCall | None = None  # SIGKILL after the grace period
    respawn: bool = False  # restart at once when the current process exits
    exits: list[defer.Deferred[None]] = attrs.field(factory=list)
    spawns: list[defer.Deferred[int]] = attrs.field(factory=list)


class Supervisor(service.Service):
    """Runs the ``#startup`` groups of ``config`` as child processes.

    ``clock`` and ``spawner`` default to the global reactor; ``child_command`` (default
    ``CHILD_COMMAND``, looked up when the supervisor is made) is the argv of a child. A crashed
    child is restarted after ``backoff[0]`` seconds, doubling up to ``backoff[1]``, back to the
    start once a child stayed up ``stable_after`` seconds; ``environ`` is the environment the
    children inherit (default ``os.environ``).
    """

    log = Logger()

    def __init__(
        self,
        config: ServerConfig,
        *,
        args: Sequence[str] = (),
        clock: Clock | None = None,
        spawner: Spawner | None = None,
        child_command: Sequence[str] | None = None,
        backoff: tuple[float, float] = (1.0, 60.0),
        stable_after: float = 60.0,
        grace: float = 10.0,
        environ: Mapping[str, str] | None = None,
        operations: Mapping[str, Any] | None = None,
        listener: Any = None,
        signals: bool = False,
        unresponsive_restart: float = 30.0,
    ) -> None:
        self.config = config
        self._args = list(args)
        self._clock = clock
        self._spawner = spawner
        self._command = list(child_command or CHILD_COMMAND)
        self._backoff = backoff
        self._stable_after = stable_after
        self._grace = grace
        self._unresponsive_restart = unresponsive_restart  # seconds; 0: never
        self._env = child_environment(os.environ if environ is None else environ)
        self._slots = [_Slot(group, backoff[0]) for group in range(len(config.startup))]
        self._sockets: list[socket.socket] | None = None
        self._rundir: str | None = None
        self._secret = ""
        self._server_id = ""
        self._operations = dict(operations or {})
        self._listener = listener
        self._signals = signals  # handle SIGHUP (twistd; not in tests)
        self._old_hup: Any = None
        self.control: ControlServer | None = None
        self.commands = Commands(self)
        self._admin_ports: list[IListeningPort] = []
        self._announced = False
        self._heartbeat: LoopingCall | None = None
        self._last_beat = 0.0

    def clock(self) -> Clock:
        """The supervisor's time source (the reactor, or the clock given for tests)."""
        return self._reactor_clock()

    @property
    def rundir(self) -> str | None:
        """The directory of this run's UNIX sockets (exists while the service runs)."""
        return self._rundir

    @property
    def sockets(self) -> Sequence[socket.socket]:
        """The shared ``#services`` listening sockets, in config order."""
        return list(self._sockets or ())

    def privilegedStartService(self) -> None:
        """Open the ``#services`` sockets before twistd drops privileges."""
        super().privilegedStartService()
        self._open_services()

    def startService(self) -> None:
        super().startService()
        self._open_services()
        for notice in self.config.notices:
            self.log.warn("config: {notice}", notice=notice)
        self._rundir = tempfile.mkdtemp(prefix="stagetx-")
        secret = self.config.secret
        self._secret = secret.encode("utf-8").hex() if secret else os.urandom(32).hex()
        self._server_id = os.urandom(8).hex()
        for address, sock in zip(self.config.services, self._sockets or ()):
            self.log.info("service {address} bound, port {port}", address=str(address), port=sock.getsockname()[1])
        listener = self._reactor_listener()
        if listener is not None:
            self.control = ControlServer(
                self._rundir, bytes.fromhex(self._secret), len(self._slots), self.clock(), listener, self._ready
            )
            self.control.startService()
            self._start_admin(listener)
        self._last_beat = self.clock().seconds()
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.clock()  # type: ignore[assignment]
        self._heartbeat.start(HEARTBEAT, now=False)
        if self._signals:
            reactor: Any = self.clock()
            self._old_hup = signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.hangup))
            # SIGTERM, and SIGINT (Ctrl-C in the terminal), are the operator's graceful stop: drain,
            # then exit 0 (Twisted's own handler would make twistd end by re-raising the signal).
            # Installed once the reactor runs, over the handlers the reactor installs then. The
            # children ignore SIGINT (stagetx.child): the terminal sends it to them too.
            for number in (signal.SIGTERM, signal.SIGINT):
                reactor.callWhenRunning(signal.signal, number, lambda n, _: reactor.callFromThread(self._terminated, n))
        for slot in self._slots:
            self._spawn(slot)

    def _reactor_listener(self) -> Any:
        """What listens (``IReactorUNIX``/``IReactorTCP``): given, else the clock's reactor.

        A bare ``task.Clock`` (unit tests) listens nowhere: no control links, no admin ports.
        """
        if self._listener is None:
            clock = self._reactor_clock()
            self._listener = clock if IReactorUNIX.providedBy(clock) else False
        return self._listener or None

    def _start_admin(self, listener: Any) -> None:
        """Listen on the ``#admin`` endpoints (console, HTTP); each bound port is logged."""
        admin = self.config.admin
        if admin is None:
            return
        factories: list[tuple[str, str | None, Factory[Any]]] = [
            ("console", admin.console, ConsoleFactory(self.commands, admin.token)),
            ("http", admin.http, admin_site(self, self.commands, admin.token)),
        ]
        for kind, description, factory in factories:
            if description is None:
                continue
            d = serverFromString(listener, description).listen(factory)
            d.addCallback(self._admin_listening, kind)
            d.addErrback(
                lambda f, k=kind, e=description: self.log.error(
                    "admin {kind} cannot listen on {endpoint}: {error}", kind=k, endpoint=e, error=f.getErrorMessage()
                )
            )

    def _admin_listening(self, port: IListeningPort, kind: str) -> None:
        if not self.running:
            port.stopListening()
            return
        self._admin_ports.append(port)
        address: Any = port.getHost()
        self.log.info("admin {kind} listening on {host}:{port}", kind=kind, host=address.host, port=address.port)

    @property
    def admin_ports(self) -> dict[str, int]:
        """The bound admin ports, ``{"console": port, "http": port}`` (for tests and tools)."""
        ports = {}
        for port in self._admin_ports:
            factory = getattr(port, "factory", None)
            ports["console" if isinstance(factory, ConsoleFactory) else "http"] = port.getHost().port  # type: ignore[attr-defined]
        return ports

    def _beat(self) -> None:
        self._last_beat = self.clock().seconds()
        if self._unresponsive_restart > 0:
            for slot in self._slots:
                silent = self.unresponsive(slot.group)
                if silent is not None and silent >= self._unresponsive_restart and not slot.respawn:
                    self._restart_stuck(slot, silent)

    def unresponsive(self, group: int) -> float | None:
        """Seconds since a ready process last reported, when that is past ``STALE_SNAPSHOT`` (its
        reactor stopped beating: a callback stuck where no hook reaches), else None."""
        slot = self._slots[group]
        if self.control is None or slot.process is None:
            return None
        child = self.control.children[group]
        if not child.ready or child.snapshot_at is None:
            return None
        silent = self.clock().seconds() - child.snapshot_at
        return silent if silent > STALE_SNAPSHOT else None

    def _restart_stuck(self, slot: _Slot, silent: float) -> None:
        """SIGKILL a process whose reactor stopped (it cannot run a SIGTERM handler) and start a new one."""
        assert slot.process is not None
        self.log.error(
            "process {process} pid {pid} unresponsive for {silent:.1f} s: SIGKILL and restart",
            process=slot.group + 1,
            pid=slot.process.pid,
            silent=silent,
        )
        slot.respawn = True
        slot.process.signal("KILL")

    def _ready(self, group: int) -> None:
        slot = self._slots[group]
        pid = slot.process.pid if slot.process else None
        self.log.info("process {process} ready, pid {pid}", process=group + 1, pid=pid)
        control = self.control
        if not self._announced and control is not None and all(c.ready for c in control.children):
            self._announced = True
            self.log.info(
                "ready: {processes} processes, {stages} stages",
                processes=len(self._slots),
                stages=len(self.config.stages),
            )

    def health(self) -> list[str]:
        """What is wrong with the server, for ``/health`` (empty when everything is up)."""
        now = self.clock().seconds()
        reasons = []
        if now - self._last_beat > LAG_LIMIT + HEARTBEAT:
            reasons.append(f"supervisor reactor lagging {now - self._last_beat:.1f} s")
        children = self.control.children if self.control is not None else []
        for slot, child in zip(self._slots, children):
            name = f"process {slot.group + 1}"
            if slot.process is None:
                reasons.append(f"{name} is down")
            elif not child.ready:
                reasons.append(f"{name} is starting (not ready)")
            elif child.snapshot_at is None or now - child.snapshot_at > STALE_SNAPSHOT:
                silent = now - (child.snapshot_at or now)
                reasons.append(f"{name} is unresponsive (no report for {max(silent, STALE_SNAPSHOT):.1f} s)")
            for stage in (child.snapshot or {}).get("stages", ()):
                if stage.get("failure"):
                    reasons.append(f"stage {stage['name']} failed: {stage['failure']}")
        return reasons

    def _terminated(self, number: int = signal.SIGTERM) -> None:
        self.log.info("{signal}: stopping (grace {grace} s)", signal=_signal_name(number), grace=self._grace)
        reactor: Any = self.clock()
        if reactor.running:
            reactor.stop()

    def hangup(self) -> None:
        """SIGHUP: every child reopens its ``#log`` files."""
        for slot in self._slots:
            if slot.process is not None:
                slot.process.signal("HUP")

    def stopService(self) -> defer.Deferred[None]:
        """Stop accepting admin requests, SIGTERM every child (each drains, flushes and exits),
        SIGKILL after the grace period; fires when all are gone."""
        super().stopService()
        for port in self._admin_ports:
            port.stopListening()
        self._admin_ports = []
        if self._old_hup is not None:
            signal.signal(signal.SIGHUP, self._old_hup)
            self._old_hup = None
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        waits = []
        for slot in self._slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            slot.pending = None
            if slot.process is not None:
                exited: defer.Deferred[None] = defer.Deferred()
                slot.exits.append(exited)
                waits.append(exited)
                self._terminate(slot)
        return defer.gatherResults(waits).addBoth(self._cleanup)

    def restart(self, group: int) -> defer.Deferred[int]:
        """Restart group ``group`` now (terminating its process first); fires with the new pid."""
        slot = self._slots[group]
        spawned: defer.Deferred[int] = defer.Deferred()
        slot.spawns.append(spawned)
        if slot.process is not None:
            slot.respawn = True
            self._terminate(slot)
        else:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            slot.restarts += 1
            self._spawn(slot)
        return spawned

    def status(self) -> list[ChildStatus]:
        """One ``ChildStatus`` per group, in group order."""
        return [
            ChildStatus(
                slot.group,
                slot.process.pid if slot.process else None,
                slot.started if slot.process else None,
                slot.restarts,
            )
            for slot in self._slots
        ]

    def bootstrap(self, group: int) -> dict[str, Any]:
        """The bootstrap object written to group ``group``'s stdin (docs/internals.md)."""
        return {
            "config": self.config.raw,
            "base_dir": self.config.base_dir,
            "group": group,
            "secret": self._secret,
            "rundir": self._rundir,
            "services": {str(address): FIRST_SERVICE_FD + index for index, address in enumerate(self.config.services)},
            "args": self._args,
            "server_id": self._server_id,
            "operations": self._operations,
        }

    def _open_services(self) -> None:
        if self._sockets is not None:
            return
        opened: list[socket.socket] = []
        try:
            for address in self.config.services:
                opened.append(_listen(address))
        except SystemExit:
            for sock in opened:
                sock.close()
            raise
        self._sockets = opened

    def _reactor_clock(self) -> Clock:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        assert self._clock is not None
        return self._clock

    def _reactor_spawner(self) -> Spawner:
        if self._spawner is None:
            from twisted.internet import reactor

            self._spawner = reactor  # type: ignore[assignment]
        assert self._spawner is not None
        return self._spawner

    def _spawn(self, slot: _Slot) -> None:
        slot.pending = None
        line = json.dumps(self.bootstrap(slot.group)).encode("utf-8") + b"\n"
        protocol = _ChildProtocol(self, slot.group, line)
        fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for index, sock in enumerate(self._sockets or ()):
            fds[FIRST_SERVICE_FD + index] = sock.fileno()
        try:
            self._reactor_spawner().spawnProcess(protocol, self._command[0], self._command, env=self._env, childFDs=fds)
        except Exception:
            self.log.failure("process {process}: cannot start {command}", process=slot.group + 1, command=self._command)
            self._schedule_restart(slot)
            return
        assert protocol.pid is not None  # set by connectionMade during spawnProcess
        slot.process = protocol
        slot.started = self._reactor_clock().seconds()
        if self.control is not None:
            self.control.children[slot.group].ready = False
        self.log.info("process {process} started, pid {pid}", process=slot.group + 1, pid=protocol.pid)
        spawns, slot.spawns = slot.spawns, []
        for spawned in spawns:
            spawned.callback(protocol.pid)

    def _terminate(self, slot: _Slot) -> None:
        assert slot.process is not None
        slot.process.signal("TERM")
        if slot.killer is None or not slot.killer.active():
            slot.killer = self._reactor_clock().callLater(self._grace, self._kill, slot)

    def _kill(self, slot: _Slot) -> None:
        slot.killer = None
        if slot.process is not None:
            self.log.warn(
                "process {process} pid {pid} ignored SIGTERM for {grace}s: SIGKILL",
                process=slot.group + 1,
                pid=slot.process.pid,
                grace=self._grace,
            )
            slot.process.signal("KILL")

    def _exited(self, protocol: _ChildProtocol, reason: Failure) -> None:
        slot = self._slots[protocol.group]
        if slot.process is not protocol:
            return
        slot.process = None
        if slot.killer is not None and slot.killer.active():
            slot.killer.cancel()
        slot.killer = None
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"signal {_signal_name(sig)}" if sig is not None else f"exit code {code}"
        self.log.info("process {process} pid {pid} ended: {how}", process=slot.group + 1, pid=protocol.pid, how=how)
        exits, slot.exits = slot.exits, []
        for exited in exits:
            exited.callback(None)
        if not self.running:
            return
        if slot.respawn:
            slot.respawn = False
            slot.restarts += 1
            self._spawn(slot)
        elif code != 0 or sig is not None:
            uptime = self._reactor_clock().seconds() - (slot.started or 0.0)
            if uptime >= self._stable_after:
                slot.delay = self._backoff[0]
            self._schedule_restart(slot)

    def _schedule_restart(self, slot: _Slot) -> None:
        delay = slot.delay
        slot.delay = min(delay * 2, self._backoff[1])
        self.log.info("process {process} restarts in {delay}s", process=slot.group + 1, delay=delay)
        slot.pending = self._reactor_clock().callLater(delay, self._respawn, slot)

    def _respawn(self, slot: _Slot) -> None:
        slot.restarts += 1
        self._spawn(slot)

    def _cleanup(self, result: object) -> defer.Deferred[None]:
        """Close the shared sockets and the control socket, then remove the run directory."""
        for sock in self._sockets or ():
            sock.close()
        self._sockets = None
        control, self.control = self.control, None
        rundir, self._rundir = self._rundir, None
        stopped = defer.maybeDeferred(control.stopService) if control is not None else defer.succeed(None)

        def remove(_: object) -> None:
            if rundir is not None:
                shutil.rmtree(rundir, ignore_errors=True)

        return stopped.addBoth(remove)


def child_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus a ``PYTHONPATH`` leading to this ``stagetx``: children import the same code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(stagetx.__file__)))
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, base.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"  # child log lines reach the supervisor as they are written
    return env


def _listen(address: HostPort) -> socket.socket:
    """A non-blocking listening TCP socket on ``address``, for the children to accept on."""
    sock = None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        if sock is not None:
            sock.close()
        raise SystemExit(f"stage: #services: cannot listen on {address}: {err}") from None
    sock.setblocking(False)
    return sock


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
