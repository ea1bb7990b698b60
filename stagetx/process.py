"""The service tree of one child process: its stages (``ProcessHost``) and its links."""

from __future__ import annotations

from typing import Any, Mapping

from twisted.application.service import MultiService

from stagetx.cluster.gateway import GATEWAY_GROUP, ClusterGateway, RemoteView, cluster_enabled
from stagetx.config import ServerConfig
from stagetx.host import ProcessHost
from stagetx.links import ProcessLinks

#: The largest frame between processes of one server.
MAX_FRAME = 64 * 1024 * 1024


class ChildProcess(MultiService):
    """Links first (so early messages wait in their queues), then the stages in config order.

    With a ``#cluster``, the process of group 0 also runs the server's cluster gateway (started
    after its stages); the others route to other servers through it (``stagetx.cluster.gateway``).
    """

    def __init__(self, config: ServerConfig, boot: Mapping[str, Any], reactor: Any) -> None:
        super().__init__()
        group = int(boot["group"])
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
            else:
                self.host.router.remote = RemoteView(self.links)
