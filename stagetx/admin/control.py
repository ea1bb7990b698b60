"""The supervisor side of the control links: one authenticated link per child process.

Children connect to ``RUNDIR/control.sock`` (``stagetx.controllink``); the link's node id ``gN``
names the group. The server keeps each group's latest stats snapshot and ready flag, and sends commands
(``["cmd", id, name, args]``) whose results come back by id, with a timeout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from stagetx.controllink import Command, CommandResult, Ready, Result, Stats, control_path, read_frame
from stagetx.unixport import KeptUNIXPort
from stagetx.wire import Link, LinkServerFactory

#: Seconds a child has to answer one command.
COMMAND_TIMEOUT = 10.0


@attrs.define
class ChildState:
    """What the supervisor knows of one group's current process over its control link."""

    group: int
    link: Link | None = None
    ready: bool = False
    snapshot: dict[str, Any] | None = None
    snapshot_at: float | None = None
    pending: dict[int, Deferred[Result]] = attrs.field(factory=dict)


class ControlServer(Service):
    """Listens for the children's control links; ``ask``/``ask_all`` run commands in them.

    ``on_ready(group)`` is called when a group's process reports that all its stages started.
    ``clock`` times commands out; ``listener`` (an ``IReactorUNIX``) opens the socket.
    """

    log = Logger(namespace="stagetx.admin")

    def __init__(
        self,
        rundir: str,
        secret: bytes,
        groups: int,
        clock: Any,
        listener: Any,
        on_ready: Callable[[int], None],
    ) -> None:
        self.path = control_path(rundir)
        self.reactor = clock
        self.listener = listener
        self.children = [ChildState(group) for group in range(groups)]
        self._on_ready = on_ready
        self._ids = itertools.count(1)
        self._factory = LinkServerFactory(secret, "supervisor", self, clock=clock)
        self._factory.noisy = False
        self._port: KeptUNIXPort | None = None

    def startService(self) -> None:
        super().startService()
        self._port = KeptUNIXPort(self.listener, self.reactor, self.path, self._factory)
        self._port.start()

    def stopService(self) -> Any:
        super().stopService()
        for child in self.children:
            if child.link is not None:
                child.link.close()
        if self._port is not None:
            return self._port.stop()
        return None

    # -- LinkHandler ------------------------------------------------------------------------------
    def _child(self, link: Link) -> ChildState | None:
        peer = link.peer_id or ""
        if peer.startswith("g") and peer[1:].isdigit() and int(peer[1:]) < len(self.children):
            return self.children[int(peer[1:])]
        return None

    def link_authenticated(self, link: Link) -> None:
        child = self._child(link)
        if child is None:
            self.log.warn("control link from unknown node {peer!r} closed", peer=link.peer_id)
            link.close()
            return
        if child.link is not None and child.link is not link:
            self._lost(child, "replaced by a new control link")
        child.link = link

    def message_received(self, link: Link, obj: Any) -> None:
        child = self._child(link)
        frame = read_frame(obj)
        if child is None or child.link is not link:
            return
        if isinstance(frame, Stats):
            child.snapshot = frame.snapshot
            child.snapshot_at = self.reactor.seconds()
        elif isinstance(frame, Ready):
            if not child.ready:
                child.ready = True
                child.snapshot_at = self.reactor.seconds()  # silence is counted from here
                self._on_ready(child.group)
        elif isinstance(frame, CommandResult):
            waiting = child.pending.pop(frame.id, None)
            if waiting is not None:
                waiting.callback(frame.result)

    def link_lost(self, link: Link, reason: object) -> None:
        child = self._child(link)
        if child is not None and child.link is link:
            self._lost(child, "process went away")

    def _lost(self, child: ChildState, why: str) -> None:
        child.link = None
        child.ready = False
        child.snapshot = None
        pending, child.pending = child.pending, {}
        for waiting in pending.values():
            waiting.callback((False, f"process {child.group + 1}: {why}", None))

    # -- commands -------------------------------------------------------------------------------
    def ask(self, group: int, name: str, args: list[str], timeout: float = COMMAND_TIMEOUT) -> Deferred[Result]:
        """Run command ``name`` in group ``group``'s process; fires with ``(ok, text, data)``."""
        child = self.children[group]
        if child.link is None:
            return succeed((False, f"process {group + 1} is not connected", None))
        rid = next(self._ids)
        waiting: Deferred[Result] = Deferred()
        child.pending[rid] = waiting
        child.link.send(Command(rid, name, args).frame())

        def expire() -> None:
            if child.pending.pop(rid, None) is waiting:
                waiting.callback((False, f"process {group + 1} did not answer {name!r} within {timeout:g} s", None))

        call = self.reactor.callLater(timeout, expire)
        return waiting.addBoth(lambda result: (call.active() and call.cancel(), result)[1])

    def ask_all(
        self, name: str, args: list[str], groups: list[int] | None = None
    ) -> Deferred[list[tuple[int, Result]]]:
        """``ask`` in every process (or ``groups``); fires with ``[(group, result), ...]``."""
        chosen = range(len(self.children)) if groups is None else groups
        asks = [self.ask(g, name, args).addCallback(lambda r, g=g: (g, r)) for g in chosen]
        return gatherResults(asks)
