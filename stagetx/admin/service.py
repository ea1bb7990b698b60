"""The admin side of a server, beside the supervisor: the children's control links, the
supervisor's own heart-beat, and one listening service per ``#admin`` endpoint (console, HTTP).

Start-up logs one line per bound admin port and one ``ready`` line once every process reported
ready. It reads and drives the processes only through ``stagetx.admin.view.Processes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from stagetx.admin.commands import Commands
from stagetx.admin.console import ConsoleFactory
from stagetx.admin.control import ControlServer
from stagetx.admin.site import admin_site
from stagetx.admin.view import Processes, ProcessStatus
from stagetx.config import ServerConfig

HEARTBEAT = 0.25  # the supervisor's own reactor is checked this often for /health
LAG_LIMIT = 1.0  # a heart-beat later than this means the supervisor's reactor is stuck
STALE_SNAPSHOT = 2.0  # a child with no snapshot for this long (2 × its 1 s stats beat) is unresponsive


class _LoggedEndpoint:
    """An endpoint whose ``listen`` logs the bound address, or the reason it could not bind (the
    server keeps running without that admin port)."""

    def __init__(self, endpoint: Any, kind: str, description: str, log: Logger) -> None:
        self._endpoint, self._kind, self._description, self._log = endpoint, kind, description, log

    def listen(self, factory: Factory[Any]) -> Deferred[IListeningPort | None]:
        return self._endpoint.listen(factory).addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        address: Any = port.getHost()
        self._log.info("admin {kind} listening on {host}:{port}", kind=self._kind, host=address.host, port=address.port)
        return port

    def _failed(self, failure: Failure) -> None:
        self._log.error(
            "admin {kind} cannot listen on {endpoint}: {error}",
            kind=self._kind,
            endpoint=self._description,
            error=failure.getErrorMessage(),
        )


class AdminService(MultiService):
    """The admin side of ``processes`` (the ``Supervisor``): its children are the heart-beat and
    the admin ports; the control server listens in the supervisor's run directory from start
    until the supervisor's processes are gone. A reactor that cannot listen (``task.Clock`` in
    unit tests) gets neither control links nor admin ports."""

    log = Logger()

    def __init__(self, processes: Processes, listener: Any = None, unresponsive_restart: float = 30.0) -> None:
        super().__init__()
        self._unresponsive_restart = unresponsive_restart  # seconds; 0: never
        self.processes = processes
        self.config: ServerConfig = processes.config
        self.control: ControlServer | None = None
        self.commands = Commands(self)
        self._listener = listener
        self._announced = False
        self._last_beat = 0.0
        self._heartbeat = TimerService(HEARTBEAT, self._beat)
        self._heartbeat.setServiceParent(self)
        processes.on_spawn.append(self._spawned)
        processes.on_stopped.append(self._stop_control)

    # -- the view the admin parts read (stagetx.admin.view.AdminView) ----------------------------
    def clock(self) -> Any:
        return self.processes.clock()

    def status(self) -> Sequence[ProcessStatus]:
        return self.processes.status()

    def restart(self, group: int) -> Deferred[int]:
        return self.processes.restart(group)

    # -- service -----------------------------------------------------------------------------------
    def startService(self) -> None:
        listener = self._listener if self._listener is not None else self.clock()
        self._heartbeat.clock = self.clock()
        self._last_beat = self.clock().seconds()
        if IReactorUNIX.providedBy(listener) and self.processes.rundir is not None:
            self.control = ControlServer(
                self.processes.rundir,
                bytes.fromhex(self.processes.secret),
                len(self.config.startup),
                self.clock(),
                listener,
                self._ready,
            )
            self.control.startService()
            self._add_ports(listener)
        super().startService()

    def _add_ports(self, listener: Any) -> None:
        admin = self.config.admin
        if admin is None:
            return
        factories: list[tuple[str, str | None, Factory[Any]]] = [
            ("console", admin.console, ConsoleFactory(self.commands, admin.token)),
            ("http", admin.http, admin_site(self, self.commands, admin.token)),
        ]
        for kind, description, factory in factories:
            if description is not None:
                endpoint = _LoggedEndpoint(serverFromString(listener, description), kind, description, self.log)
                StreamServerEndpointService(endpoint, factory).setServiceParent(self)

    def _stop_control(self) -> Deferred[None] | None:
        """Once the processes are gone (before their run directory is removed)."""
        control, self.control = self.control, None
        return control.stopService() if control is not None else None

    # -- state ---------------------------------------------------------------------------------------
    def _beat(self) -> None:
        self._last_beat = self.clock().seconds()
        if self._unresponsive_restart > 0:
            for status in self.status():
                silent = self.unresponsive(status.group)
                if silent is not None and silent >= self._unresponsive_restart and self.processes.kill(status.group):
                    self.log.error(
                        "process {process} pid {pid} unresponsive for {silent:.1f} s: SIGKILL and restart",
                        process=status.group + 1,
                        pid=status.pid,
                        silent=silent,
                    )

    def unresponsive(self, group: int) -> float | None:
        """Seconds since a ready process last reported, when that is past ``STALE_SNAPSHOT`` (its
        reactor stopped beating: a callback stuck where no hook reaches), else None."""
        if self.control is None or self.status()[group].pid is None:
            return None
        child = self.control.children[group]
        if not child.ready or child.snapshot_at is None:
            return None
        silent = self.clock().seconds() - child.snapshot_at
        return silent if silent > STALE_SNAPSHOT else None

    def _spawned(self, group: int) -> None:
        if self.control is not None:
            self.control.children[group].ready = False

    def _ready(self, group: int) -> None:
        pid = self.status()[group].pid
        self.log.info("process {process} ready, pid {pid}", process=group + 1, pid=pid)
        control = self.control
        if not self._announced and control is not None and all(c.ready for c in control.children):
            self._announced = True
            self.log.info(
                "ready: {processes} processes, {stages} stages",
                processes=len(self.config.startup),
                stages=len(self.config.stages),
            )

    def health(self) -> list[str]:
        """What is wrong with the server, for ``/health`` (empty when everything is up)."""
        now = self.clock().seconds()
        reasons = []
        if now - self._last_beat > LAG_LIMIT + HEARTBEAT:
            reasons.append(f"supervisor reactor lagging {now - self._last_beat:.1f} s")
        children = self.control.children if self.control is not None else []
        for status, child in zip(self.status(), children):
            name = f"process {status.group + 1}"
            if status.pid is None:
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
