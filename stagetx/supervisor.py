"""The supervisor: one child process per ``#startup`` group, restarted with back-off whenever it
ends without being asked to (a crash, or a clean stop someone else caused).

Our own small service over ``spawnProcess`` rather than ``twisted.runner.procmon``: the children
must inherit the ``#services`` listening sockets (``childFDs``) and the environment, must get the
bootstrap line on stdin (docs/internals.md), and may log lines of any length.

It does what ``procmon`` does (spawn, back-off, kill, status, restart) and nothing of the admin
side (``stagetx.admin.service.AdminService``, which learns of spawns and of the final stop through
``on_spawn`` and ``on_stopped``). Start-up logs one line per bound service port and spawned process.
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
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.base import DelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, eventFromJSON, formatEvent
from twisted.python.failure import Failure

import stagetx
from stagetx import reactors
from stagetx.config import HostPort, ServerConfig

CHILD_COMMAND: tuple[str, ...] = (sys.executable, "-m", "stagetx.child")
FIRST_SERVICE_FD = 3
MAX_LINE = 1 << 20  # a longer line is relayed in pieces of this size, so memory stays bounded

_childLog = Logger(namespace="stagetx.child")
# One record of a child's text log ("- [stage.app#error] text"); continuation lines start with a tab.
_TEXT_RECORD = re.compile(r"- \[(?P<namespace>[^\]#\s]+)#(?P<level>[a-z]+)\] (?P<text>.*)", re.DOTALL)


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

    ``reactor`` (time and ``spawnProcess``; the global one when None, resolved on first use) runs
    everything; ``child_command`` (default ``CHILD_COMMAND``) is the argv of a child. A crashed
    child is restarted after ``backoff[0]`` seconds, doubling up to ``backoff[1]``, back to the
    start once a child stayed up ``stable_after`` seconds; ``environ`` is the environment the
    children inherit (default ``os.environ``).
    """

    log = Logger()

    def __init__(
        self,
        config: ServerConfig,
        *,
        reactor: Any = None,
        args: Sequence[str] = (),
        child_command: Sequence[str] | None = None,
        backoff: tuple[float, float] = (1.0, 60.0),
        stable_after: float = 60.0,
        grace: float = 10.0,
        environ: Mapping[str, str] | None = None,
        operations: Mapping[str, Any] | None = None,
        signals: bool = False,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._args = list(args)
        self._command = list(child_command or CHILD_COMMAND)
        self._backoff = backoff
        self._stable_after = stable_after
        self._grace = grace
        self._env = child_environment(os.environ if environ is None else environ)
        self._slots = [_Slot(group, backoff[0]) for group in range(len(config.startup))]
        self._sockets: list[socket.socket] | None = None
        self._rundir: str | None = None
        self.secret = ""  # hex; the children's and the control links' shared key
        self._server_id = ""
        self._operations = dict(operations or {})
        self._signals = signals  # handle SIGHUP (twistd; not in tests)
        self._old_hup: Any = None
        #: Called with the group after each spawn (the admin side forgets that process's state).
        self.on_spawn: list[Callable[[int], None]] = []
        #: Called once every process is gone at stop, before the run directory is removed.
        self.on_stopped: list[Callable[[], defer.Deferred[None] | None]] = []

    def clock(self) -> Any:
        """The supervisor's reactor (resolved once, on first use)."""
        if self._reactor is None:
            self._reactor = reactors.resolve()
        return self._reactor

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
        self.secret = secret.encode("utf-8").hex() if secret else os.urandom(32).hex()
        self._server_id = os.urandom(8).hex()
        for address, sock in zip(self.config.services, self._sockets or ()):
            self.log.info("service {address} bound, port {port}", address=str(address), port=sock.getsockname()[1])
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

    def _terminated(self, number: int = signal.SIGTERM) -> None:
        if reactors.stop(self.clock()):
            self.log.info("{signal}: stopping (grace {grace} s)", signal=_signal_name(number), grace=self._grace)
        else:  # again while the children stop
            self.log.info("{signal}: already stopping", signal=_signal_name(number))

    def hangup(self) -> None:
        """SIGHUP: every child reopens its ``#log`` files."""
        for slot in self._slots:
            if slot.process is not None:
                slot.process.signal("HUP")

    def stopService(self) -> defer.Deferred[None]:
        """SIGTERM every child (each drains, flushes and exits), SIGKILL after the grace period;
        fires when all are gone and ``on_stopped`` ran."""
        super().stopService()
        if self._old_hup is not None:
            signal.signal(signal.SIGHUP, self._old_hup)
            self._old_hup = None
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

    def kill(self, group: int) -> bool:
        """SIGKILL group ``group``'s process and start a new one at once: for a process whose
        reactor is stuck (it cannot run a SIGTERM handler). False when it is down or already
        being restarted."""
        slot = self._slots[group]
        if slot.process is None or slot.respawn:
            return False
        slot.respawn = True
        slot.process.signal("KILL")
        return True

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
            "secret": self.secret,
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
            cluster = self.config.cluster
            if cluster.listen is not None:  # process 1 listens there: one it cannot take would run without
                _listen(HostPort(cluster.listen_host, cluster.listen), "#cluster").close()
        except SystemExit:
            for sock in opened:
                sock.close()
            raise
        self._sockets = opened

    def _spawn(self, slot: _Slot) -> None:
        slot.pending = None
        line = json.dumps(self.bootstrap(slot.group)).encode("utf-8") + b"\n"
        protocol = _ChildProtocol(self, slot.group, line)
        fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for index, sock in enumerate(self._sockets or ()):
            fds[FIRST_SERVICE_FD + index] = sock.fileno()
        try:
            self.clock().spawnProcess(protocol, self._command[0], self._command, env=self._env, childFDs=fds)
        except Exception:
            self.log.failure("process {process}: cannot start {command}", process=slot.group + 1, command=self._command)
            self._schedule_restart(slot)
            return
        assert protocol.pid is not None  # set by connectionMade during spawnProcess
        slot.process = protocol
        slot.started = self.clock().seconds()
        for spawned_hook in self.on_spawn:
            spawned_hook(slot.group)
        self.log.info("process {process} started, pid {pid}", process=slot.group + 1, pid=protocol.pid)
        spawns, slot.spawns = slot.spawns, []
        for spawned in spawns:
            spawned.callback(protocol.pid)

    def _terminate(self, slot: _Slot) -> None:
        assert slot.process is not None
        slot.process.signal("TERM")
        if slot.killer is None or not slot.killer.active():
            slot.killer = self.clock().callLater(self._grace, self._kill, slot)

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
        else:  # not asked for: a crash whatever the status (exit 0 after a SIGTERM sent by hand too)
            uptime = self.clock().seconds() - (slot.started or 0.0)
            if uptime >= self._stable_after:
                slot.delay = self._backoff[0]
            self._schedule_restart(slot)

    def _schedule_restart(self, slot: _Slot) -> None:
        delay = slot.delay
        slot.delay = min(delay * 2, self._backoff[1])
        self.log.info("process {process} restarts in {delay}s", process=slot.group + 1, delay=delay)
        slot.pending = self.clock().callLater(delay, self._respawn, slot)

    def _respawn(self, slot: _Slot) -> None:
        slot.restarts += 1
        self._spawn(slot)

    def _cleanup(self, result: object) -> defer.Deferred[None]:
        """Close the shared sockets, run ``on_stopped``, then remove the run directory."""
        for sock in self._sockets or ():
            sock.close()
        self._sockets = None
        rundir, self._rundir = self._rundir, None
        stopped = defer.gatherResults([defer.maybeDeferred(hook) for hook in self.on_stopped])

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


def _listen(address: HostPort, key: str = "#services") -> socket.socket:
    """A non-blocking listening TCP socket on ``address`` (of the configuration's ``key``), for
    the children to accept on; a port that cannot be taken ends start-up with one line."""
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
        raise SystemExit(f"stage: {key}: cannot listen on {address}: {err}") from None
    sock.setblocking(False)
    return sock


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
