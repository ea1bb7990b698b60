"""``/metrics``: Prometheus metrics built from the children's latest control snapshots.

One ``CollectorRegistry`` per supervisor holds a custom collector; nothing is counted twice:
counters are the children's own totals (a restarted process starts again from zero, which
Prometheus' ``rate()`` treats as a counter reset).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from stagetx.admin.view import AdminView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StageCollector(Collector):
    """Yields the metric families of the server (see docs/operations.md for the list)."""

    def __init__(self, supervisor: AdminView) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        p = ["process"]
        s = ["process", "stage", "type"]
        up = GaugeMetricFamily(
            "stagetx_process_up", "1 when the process is linked, its stages started and it reports", labels=p
        )
        restarts = CounterMetricFamily("stagetx_process_restarts", "restarts of the process", labels=p)
        rss = GaugeMetricFamily("stagetx_process_rss_bytes", "resident memory of the process", labels=p)
        queue = GaugeMetricFamily("stagetx_process_queue_length", "messages waiting in the router", labels=p)
        delay = GaugeMetricFamily("stagetx_process_queue_delay_seconds", "smoothed queue delay", labels=p)
        stage_up = GaugeMetricFamily(
            "stagetx_stage_up", "1 while the stage serves, 0 when it failed (its scripts did not load)", labels=s
        )
        received = CounterMetricFamily("stagetx_stage_messages_received", "messages handled", labels=s)
        sent = CounterMetricFamily("stagetx_stage_messages_sent", "messages sent", labels=s)
        errors = CounterMetricFamily(
            "stagetx_stage_errors", "handler errors (for curl stages: failed requests)", labels=s
        )
        latency = HistogramMetricFamily("stagetx_stage_handler_seconds", "time to handle one message", labels=s)
        memory = GaugeMetricFamily("stagetx_stage_lua_memory_bytes", "memory of the stage's main Lua runtime", labels=s)
        reloads = CounterMetricFamily("stagetx_stage_reloads", "hot reloads of the stage", labels=s)
        tickets = GaugeMetricFamily(
            "stagetx_ticket_slots", "ticket slots per category", labels=["process", "stage", "category", "state"]
        )
        subs = GaugeMetricFamily("stagetx_route_subscriptions", "subscribe ids registered at a route stage", labels=s)
        clients = _client_families("stagetx_stage", "all broker endpoints of the stage", s)
        listeners = _client_families(
            "stagetx_broker_endpoint", "one broker endpoint", ["process", "stage", "endpoint", "kind"]
        )
        peers = GaugeMetricFamily(
            "stagetx_cluster_peer_linked", "1 while a cluster peer is linked", labels=["peer", "addr"]
        )
        dropped = CounterMetricFamily(
            "stagetx_cluster_messages_dropped",
            "messages queued for a server that went away and could not go to another replica",
            labels=p,
        )
        control = self.supervisor.control
        children = control.children if control is not None else []
        for status in self.supervisor.status():
            proc = str(status.group + 1)
            child = children[status.group] if children else None
            serving = (
                child is not None and child.ready and status.pid and self.supervisor.unresponsive(status.group) is None
            )
            up.add_metric([proc], 1.0 if serving else 0.0)
            restarts.add_metric([proc], status.restarts)
            snap = child.snapshot if child is not None else None
            if snap is None:
                continue
            rss.add_metric([proc], snap["rss"])
            queue.add_metric([proc], snap["queue"])
            delay.add_metric([proc], snap["delay"])
            for st in snap["stages"]:
                labels = [proc, st["name"], st["type"]]
                stage_up.add_metric(labels, 0.0 if st.get("failure") else 1.0)
                received.add_metric(labels, st["received"])
                sent.add_metric(labels, st["sent"])
                errors.add_metric(labels, st["errors"])
                latency.add_metric(labels, _buckets(snap["buckets"], st["latency"]), st["busy"])
                if st.get("lua_memory") is not None:
                    memory.add_metric(labels, st["lua_memory"])
                    reloads.add_metric(labels, st.get("reloads", 0))
                for category, (held, waiting, limit) in (st.get("tickets") or {}).items():
                    for state, value in (("held", held), ("waiting", waiting), ("limit", limit)):
                        tickets.add_metric([proc, st["name"], category, state], value)
                if st.get("clients") is not None:
                    _add_clients(clients, labels, st["clients"])
                for endpoint in st.get("listeners") or ():
                    _add_clients(listeners, [proc, st["name"], endpoint["url"], endpoint["kind"]], endpoint)
                if st.get("subscriptions") is not None:
                    subs.add_metric(labels, len(st["subscriptions"]))
            for peer in snap.get("peers") or ():
                if "server" in peer:
                    peers.add_metric([peer["server"], peer["addr"]], 1.0 if peer["linked"] else 0.0)
                elif "dropped" in peer:  # the gateway's count, not a peer
                    dropped.add_metric([proc], peer["dropped"])
        yield from (
            up,
            restarts,
            rss,
            queue,
            delay,
            stage_up,
            received,
            sent,
            errors,
            latency,
            memory,
            reloads,
            tickets,
            subs,
            *clients.values(),
            *listeners.values(),
            peers,
            dropped,
        )


#: The broker client counters (``stagetx.broker.traffic``) as metrics: name suffix, help.
_CLIENT_COUNTERS = {
    "accepted": "client connections accepted",
    "refused": "client connections refused by the script",
    "closed": "client connections closed",
    "frames_in": "frames received",
    "frames_out": "frames sent",
    "bytes_in": "bytes received",
    "bytes_out": "bytes sent",
    "oversized": "frames dropped as over the size limit",
}


def _client_families(prefix: str, of: str, labels: list[str]) -> dict[str, Any]:
    """The connected-clients gauge and one counter per ``_CLIENT_COUNTERS`` entry, by field."""
    families: dict[str, Any] = {
        "connected": GaugeMetricFamily(f"{prefix}_clients_connected", f"client connections open ({of})", labels=labels)
    }
    for field, text in _CLIENT_COUNTERS.items():
        families[field] = CounterMetricFamily(f"{prefix}_client_{field}", f"{text} ({of})", labels=labels)
    return families


def _add_clients(families: dict[str, Any], labels: list[str], counts: dict[str, Any]) -> None:
    for field, family in families.items():
        family.add_metric(labels, counts[field])


def _buckets(bounds: list[float], counts: list[int]) -> list[tuple[str, float]]:
    """Prometheus' cumulative ``le`` buckets from per-bucket counts (the last one unbounded)."""
    out, total = [], 0
    for bound, count in zip([*map(repr, bounds), "+Inf"], counts):
        total += count
        out.append((bound, float(total)))
    return out


def make_registry(supervisor: AdminView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StageCollector(supervisor))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
