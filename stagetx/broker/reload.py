"""What a stage's broker keeps across a reload of its runtime (docs/broker.md, "Reload").

Listeners, UDP ports and ``broker.join`` connections are Python objects of the stage, not of a
Lua runtime. When the stage reloads, its ``BrokerAPI.detach`` parks them (``Endpoint.park``: no
reading, no expiry, no Lua callback) in a ``Kept``; the new runtime's ``broker.ready`` and
``broker.join`` *claim* the ones with the same address instead of listening or dialling again;
``finish`` (once the new main script and ``on_reload`` ran) offers the sockets of each claimed
endpoint to its new callbacks and reads again, and closes what nobody claimed, with a log line.
If the new runtime fails to load, its ``BrokerAPI.release`` hands its claims back (``unclaim``)
and ``restore`` gives every endpoint back to the old runtime as it was: its address, framing,
handler and each socket's callbacks, and reading resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from stagetx.broker.framing import BrokerURL, framing_for
from stagetx.broker.sockets import Endpoint, Handler, Parked, url_text


def is_listener(endpoint: Endpoint) -> bool:
    """A ``broker.ready`` endpoint (TCP listener or UDP port), not a ``broker.join``."""
    return hasattr(endpoint.port, "stopListening")


def worth_keeping(endpoint: Endpoint) -> bool:
    """A listener or UDP port still bound, or a ``broker.join`` connected or still connecting."""
    port = endpoint.port
    if port is None:
        return False
    return is_listener(endpoint) or bool(endpoint.sockets) or getattr(port, "state", None) == "connecting"


class Kept:
    """The parked endpoints of one stage between its old runtime and its new one."""

    def __init__(
        self, endpoints: list[Endpoint], log: Logger, owner: Callable[[list[Endpoint]], None] | None = None
    ) -> None:
        self.log = log
        self.owner = owner  # takes the endpoints back when the new runtime fails to load
        # by id: how each endpoint was before it was parked (for restore)
        self.previous: dict[int, tuple[Handler, BrokerURL, Any, dict[int, Any]]] = {
            e.id: (e.handler, e.url, e.framing, {sid: sock.state for sid, sock in e.sockets.items()}) for e in endpoints
        }
        # by id: the endpoint, what it holds while parked, whether it is a broker.join
        self.waiting: dict[int, tuple[Endpoint, Parked, bool]] = {
            e.id: (e, e.park(), not is_listener(e)) for e in endpoints
        }
        self.claimed: list[tuple[Endpoint, Parked, bool]] = []

    def claim(self, url: BrokerURL, joining: bool, handler: Handler) -> Endpoint | None:
        """The parked endpoint the new runtime's ``broker.ready`` (or ``broker.join``) takes over,
        now bound to ``handler``; None: listen (or dial) as usual.

        A listener or UDP port matches on scheme, host and port; if its framing or limits changed
        it takes the new ones and its TCP connections (which speak the old framing) are closed.
        A ``broker.join`` matches on the whole address, connected or still connecting.
        """
        for eid, (endpoint, parked, is_join) in sorted(self.waiting.items()):
            old = endpoint.url
            if is_join != joining or (old.scheme, old.host, old.port) != (url.scheme, url.host, url.port):
                continue
            if joining and (old != url or not worth_keeping(endpoint)):
                continue
            del self.waiting[eid]
            endpoint.handler = handler
            if old != url:
                self._reframe(endpoint, url)
            self.claimed.append((endpoint, parked, is_join))
            return endpoint
        return None

    def _reframe(self, endpoint: Endpoint, url: BrokerURL) -> None:
        streams = [s for s in endpoint.sockets.values() if s.transport is not endpoint.port]
        self.log.warn(
            "broker: {url} reloaded with another framing; its {n} connections are closed",
            url=url_text(url),
            n=len(streams),
        )
        for sock in streams:
            sock.close()
        endpoint.url = url
        endpoint.framing = framing_for(url)

    def finish(self) -> None:
        """The new runtime is up (or failed to start): resume what it claimed, close the rest."""
        claimed, self.claimed = self.claimed, []
        waiting, self.waiting = list(self.waiting.values()), {}
        for endpoint, parked, _ in claimed:
            if endpoint.port is not None:  # else the new script closed it already
                endpoint.resume(parked)
        for endpoint, _, is_join in waiting:
            if endpoint.port is not None:  # else a broker.join that failed meanwhile (logged)
                self._drop(endpoint, is_join)

    def unclaim(self, endpoint: Endpoint) -> bool:
        """``endpoint`` is back from a runtime that failed to load; False if it was not claimed."""
        for i, (claimed, parked, is_join) in enumerate(self.claimed):
            if claimed is endpoint:
                del self.claimed[i]
                self.waiting[endpoint.id] = (endpoint, parked, is_join)
                return True
        return False

    def restore(self) -> None:
        """The new runtime failed to load: every endpoint goes back to the old one as it was, its
        sockets with their callbacks (new ones are offered to its accept function), and reads again."""
        back = list(self.waiting.values()) + self.claimed
        self.waiting, self.claimed = {}, []
        returned = []
        for endpoint, parked, _ in back:
            handler, url, framing, states = self.previous[endpoint.id]
            endpoint.handler, endpoint.url, endpoint.framing = handler, url, framing
            if endpoint.port is not None:  # else a broker.join that failed meanwhile (logged)
                endpoint.resume(parked, states)
                returned.append(endpoint)
        if self.owner is not None:
            self.owner(returned)

    def _drop(self, endpoint: Endpoint, is_join: bool) -> None:
        url = url_text(endpoint.url)
        if not is_join:
            self.log.warn(
                "broker: {url} (listener {id}) not re-created by the reloaded script: closed with its {n} sockets",
                url=url,
                id=endpoint.id,
                n=len(endpoint.sockets),
            )
        else:
            sids = ", ".join(str(sid) for sid in sorted(endpoint.sockets)) or "still connecting"
            self.log.warn(
                "broker.join {url} (socket {sids}) not claimed by the reloaded script: closed",
                url=url,
                sids=sids,
            )
        endpoint.shutdown()
