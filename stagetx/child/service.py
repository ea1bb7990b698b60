"""The service tree of one child process: links, stages, cluster gateway, control client, watcher."""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevelFilterPredicate

from stagetx.child.control import ControlClient, ProcessControl
from stagetx.child.host import ProcessHost
from stagetx.child.links import ProcessLinks
from stagetx.child.watcher import ScriptWatcher
from stagetx.cluster.gateway import GATEWAY_GROUP, ClusterGateway, RemoteView, cluster_enabled
from stagetx.config import ServerConfig

#: The largest frame between processes of one server.
MAX_FRAME = 64 * 1024 * 1024


class ChildProcess(MultiService):
    """Links first (so early messages wait in their queues), then the stages in config order.

    With a ``#cluster``, the process of group 0 also runs the server's cluster gateway (started
    after its stages); the others route to other servers through it (``stagetx.cluster.gateway``).
    The control client (``stagetx.child.control``) reports to the supervisor; on stop, the process first
    drains its router queue for up to ``operations.drain`` seconds of the bootstrap.
    """

    log = Logger()

    def __init__(
        self, config: ServerConfig, boot: Mapping[str, Any], reactor: Any, levels: LogLevelFilterPredicate | None = None
    ) -> None:
        super().__init__()
        group = int(boot["group"])
        operations = boot.get("operations", {})
        self.reactor = reactor
        self.drain = float(operations.get("drain", 5.0))
        self.host = ProcessHost(
            config, group, reactor, boot.get("server_id", "local"), boot.get("args", ()), boot.get("services", {})
        )
        self.links = ProcessLinks(
            self.host.router, boot["rundir"], len(config.startup), bytes.fromhex(boot["secret"]), reactor, MAX_FRAME
        )
        self.links.setServiceParent(self)
        self.host.setServiceParent(self)
        if cluster_enabled(config):
            if group == GATEWAY_GROUP:
                gateway = ClusterGateway(config, self.host.router, self.links, bytes.fromhex(boot["secret"]), reactor)
                gateway.setServiceParent(self)
                self.gateway = gateway
            else:
                self.host.router.remote = RemoteView(self.links)
        self.host.process.slow_ms = float(operations.get("slow_ms", self.host.process.slow_ms))
        control = ProcessControl(self.host, levels, reactor.seconds(), self._peers if cluster_enabled(config) else None)
        self.control = ControlClient(control, boot["rundir"], bytes.fromhex(boot["secret"]), reactor)
        self.control.setServiceParent(self)
        self.host.ready.addCallback(_freeze_start_up)
        self.host.ready.addCallback(lambda _: self.control.set_ready())
        self.watcher: ScriptWatcher | None = None
        if operations.get("watch"):
            self.watcher = ScriptWatcher(self.host, float(operations["watch"]), reactor)

    gateway: ClusterGateway | None = None

    def _peers(self) -> list[dict[str, Any]]:
        """The cluster peers as this process knows them: the gateway's table, else a note."""
        if self.gateway is None:
            return [{"note": "peers are known to process 1 (the cluster gateway)"}]
        return [{"dropped": self.gateway.dropped}] + [
            {
                "server": peer.server_id,
                "addr": peer.addr,
                "linked": peer.linked,
                "backup": peer.backup,
                "delay": peer.delay,
                "overloaded": peer.overloaded,
                "stages": len(peer.stages),
            }
            for peer in self.gateway.directory.peers.values()
        ]

    def startService(self) -> None:
        MultiService.startService(self)
        if self.watcher is not None:
            self.watcher.loop.start(self.watcher.period, now=True)

    def stopService(self) -> Deferred[None]:
        """Drain the router queue (bounded by ``drain`` seconds), then stop in reverse order."""
        if self.watcher is not None and self.watcher.loop.running:
            self.watcher.loop.stop()
        done: Deferred[None] = Deferred()
        deadline = time.monotonic() + self.drain

        def check() -> None:
            waiting = self.host.router.queue_length()
            if waiting and time.monotonic() < deadline:
                self.reactor.callLater(0.01, check)
                return
            if waiting:
                self.log.warn("stopping with {waiting} messages undelivered", waiting=waiting)
            MultiService.stopService(self).chainDeferred(done)  # type: ignore[union-attr]

        check()
        return done


def _freeze_start_up(result: object) -> object:
    """Move everything start-up made (modules, runtimes, loaded indexes) out of the cyclic
    collector's sight, so a full collection under traffic scans only what traffic made: the
    difference between tens of milliseconds and a few on a loaded process (GC pause,
    docs/performance.md)."""
    gc.collect()
    gc.freeze()
    return result
