"""The web dashboard (docs/dashboard.md): page, static files, live event stream, history, actions.

Built on what the console and ``/metrics`` use — the supervisor's ``status()``, the children's
control snapshots and the admin ``Commands`` — so the dashboard never shows numbers of its own.

- ``GET /``: the page; ``GET /static/…``: its scripts, styles and the uPlot charting library.
- ``GET /api/session``: ``{"readonly", "csrf", "interval"}`` (the CSRF token only with an ``#admin`` token).
- ``GET /api/overview``: one snapshot (see ``overview``); ``GET /api/events``: the same as
  server-sent events, one ``data:`` line per sample (every ``SAMPLE_INTERVAL`` seconds); a client
  that does not read them skips samples (``_Stream``) rather than have them pile up.
- ``GET /api/history[?stage=P/NAME]``: message rates and handler p50/p99 of the last 10 minutes.
- ``POST /api/action`` ``{"command", "args"}``: ``reload``, ``restart`` or ``loglevel``, with the
  ``X-CSRF-Token`` header; refused (403) when no token is configured (read-only dashboard).
- The scoreboard browser reads through the ``index`` command (``GET /api/index?args=…``).

Every ``/api`` path needs the token as ``/api`` itself does; the page and static files carry no
data and are served without it (the page asks for the token and sends it as a bearer header).
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from stagetx.admin.commands import Commands, Reply
from stagetx.admin.http import MAX_BODY, AdminSite, Guarded, StaticFiles, as_json

if TYPE_CHECKING:
    from stagetx.admin.view import AdminView

STATIC = Path(__file__).with_name("static")
SAMPLE_INTERVAL = 1.0
HISTORY_SECONDS = 600.0
#: Seconds over which the overview's handler-time quantiles are taken.
QUANTILE_WINDOW = 10
#: A snapshot older than this many seconds is not shown as live: the process is unresponsive, as
#: ``list`` and ``/health`` say (``stagetx.admin.service.STALE_SNAPSHOT``, 2 × the 1 s report beat).
STALE_AFTER = 2.0
ACTIONS = frozenset({"reload", "restart", "loglevel"})


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram (per-bucket counts, the last bucket unbounded), interpolated
    inside its bucket as Prometheus' ``histogram_quantile`` does; None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    wanted = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count > 0 and seen + count >= wanted:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (wanted - seen) / count
        seen += count
    return bounds[-1]


class History:
    """Per stage (``"P/NAME"``), the last ``size`` samples of message rates and handler quantiles.

    Rates come from the change of the children's own counters between two snapshots (on the
    child's clock, its ``uptime``); a restarted process starts a new baseline. A process that is
    down adds gaps (None), never repeated numbers.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.series: dict[str, deque[tuple[float, float | None, float | None, float | None, float | None]]] = {}
        self._last: dict[int, dict[str, Any]] = {}
        self._recent: dict[str, deque[tuple[float, list[int]]]] = {}
        self.current: dict[str, dict[str, float | None]] = {}

    def observe(self, now: float, group: int, snapshot: dict[str, Any] | None, stages: Sequence[str]) -> None:
        """Add one sample for group ``group`` (``snapshot`` None: the process is not live)."""
        previous = self._last.get(group)
        if snapshot is None or (previous is not None and snapshot is previous):
            if snapshot is None:
                self._last.pop(group, None)
                for name in stages:
                    key = f"{group + 1}/{name}"
                    self._add(key, (now, None, None, None, None))
                    self.current.pop(key, None)
                    self._recent.pop(key, None)
            return
        self._last[group] = snapshot
        restarted = previous is None or snapshot["pid"] != previous["pid"] or snapshot["uptime"] < previous["uptime"]
        before = {} if restarted else {s["name"]: s for s in previous["stages"]}  # type: ignore[index]
        elapsed = 0.0 if restarted else snapshot["uptime"] - previous["uptime"]  # type: ignore[index]
        bounds = snapshot["buckets"]
        for stats in snapshot["stages"]:
            key = f"{group + 1}/{stats['name']}"
            recent = self._recent.setdefault(key, deque(maxlen=QUANTILE_WINDOW + 1))
            if restarted:
                recent.clear()
            recent.append((snapshot["uptime"], list(stats["latency"])))
            old = before.get(stats["name"])
            if old is None or elapsed <= 0:
                rate_in = rate_out = p50 = p99 = None
            else:
                rate_in = (stats["received"] - old["received"]) / elapsed
                rate_out = (stats["sent"] - old["sent"]) / elapsed
                step = [a - b for a, b in zip(stats["latency"], old["latency"])]
                p50, p99 = quantile(bounds, step, 0.5), quantile(bounds, step, 0.99)
            window = [a - b for a, b in zip(recent[-1][1], recent[0][1])]
            self.current[key] = {
                "in_rate": rate_in,
                "out_rate": rate_out,
                "p50": quantile(bounds, window, 0.5),
                "p99": quantile(bounds, window, 0.99),
            }
            self._add(key, (now, rate_in, rate_out, p50, p99))

    def _add(self, key: str, point: tuple[float, float | None, float | None, float | None, float | None]) -> None:
        self.series.setdefault(key, deque(maxlen=self.size)).append(point)

    def columns(self, key: str | None = None) -> dict[str, dict[str, list[Any]]]:
        """``{"P/NAME": {"t", "in", "out", "p50", "p99"}}``: one list per column (uPlot's data shape)."""
        keys = [key] if key is not None else sorted(self.series)
        out = {}
        for k in keys:
            points = self.series.get(k)
            if points is not None:
                t, rate_in, rate_out, p50, p99 = (list(c) for c in zip(*points)) if points else ([],) * 5
                out[k] = {"t": t, "in": rate_in, "out": rate_out, "p50": p50, "p99": p99}
        return out


def process_state(pid: int | None, restarts: int, ready: bool, age: float | None) -> str:
    """``up``, ``starting`` (first start), ``restarting``, or ``unresponsive`` (no recent report)."""
    if pid is None or not ready:
        return "restarting" if restarts > 0 or pid is None else "starting"
    if age is None or age > STALE_AFTER:
        return "unresponsive"
    return "up"


def _live(child: Any, now: float) -> dict[str, Any] | None:
    """The child's snapshot if its process is ready and reported recently, else None."""
    if child is None or not child.ready or child.snapshot is None or child.snapshot_at is None:
        return None
    return child.snapshot if now - child.snapshot_at <= STALE_AFTER else None


def overview(supervisor: AdminView, history: History, now: float) -> dict[str, Any]:
    """Everything the page shows at one moment; numbers only from live snapshots (else None)."""
    control = supervisor.control
    children = control.children if control is not None else []
    processes, stages, tickets, subscriptions, listeners = [], [], [], [], []
    peers: list[dict[str, Any]] | None = None
    for status in supervisor.status():
        child = children[status.group] if status.group < len(children) else None
        age = None if child is None or child.snapshot_at is None else now - child.snapshot_at
        state = process_state(status.pid, status.restarts, bool(child and child.ready), age)
        snap = _live(child, now) if state == "up" else None
        processes.append(
            {
                "process": status.group + 1,
                "state": state,
                "pid": status.pid,
                "uptime": None if status.started is None else now - status.started,
                "restarts": status.restarts,
                "rss": snap and snap["rss"],
                "queue": snap and snap["queue"],
                "stages": [s.name for s in supervisor.config.startup[status.group]],
            }
        )
        reported = {s["name"]: s for s in snap["stages"]} if snap else {}
        for config in supervisor.config.startup[status.group]:
            stats = reported.get(config.name)
            row: dict[str, Any] = {"process": status.group + 1, "name": config.name, "type": config.type}
            if stats is None:
                row["state"] = "stopped" if state == "up" else state
                stages.append(row)
                continue
            lua = config.type in ("lua", "luajit")
            row["state"] = (
                "failed"
                if stats.get("failure")
                else "reloading"
                if lua and stats.get("lua_memory") is None
                else "running"
            )
            row["failure"] = stats.get("failure")
            row["last_errors"] = stats.get("last_errors") or []
            row["clients"] = (stats.get("clients") or {}).get("connected")
            row.update({k: stats[k] for k in ("received", "sent", "errors")})
            row.update(history.current.get(f"{status.group + 1}/{config.name}", {}))
            row["queue"] = snap["queue"] if snap else None
            row["lua_memory"] = stats.get("lua_memory")
            stages.append(row)
            for category, (held, waiting, limit) in (stats.get("tickets") or {}).items():
                tickets.append(
                    {"stage": config.name, "category": category, "held": held, "waiting": waiting, "limit": limit}
                )
            for endpoint in stats.get("listeners") or ():
                listeners.append({"process": status.group + 1, "stage": config.name, **endpoint})
            for sid, count in (stats.get("subscriptions") or {}).items():
                subscriptions.append({"stage": config.name, "subscribe_id": sid, "subscribers": count})
        found = (snap or {}).get("peers")
        if found is not None:
            peers = (peers or []) + [
                {**p, "state": "linked" if p["linked"] else "down"} for p in found if "server" in p
            ]
    return {
        "time": now,
        "processes": processes,
        "stages": stages,
        "peers": peers,
        "tickets": tickets,
        "subscriptions": subscriptions,
        "listeners": listeners,
    }


@implementer(IPushProducer)
class _Stream:
    """One open event stream, the producer of its request: paused while the connection's write
    buffer is full (its client does not read), when samples skip it; it gets the latest sample
    once the client reads again. What one stream buffers stays bounded by that buffer."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class Dashboard:
    """Samples the children every ``interval`` seconds into the history and the open event streams."""

    log = Logger(namespace="stagetx.admin")

    def __init__(
        self, supervisor: AdminView, commands: Commands, token: str | None, interval: float = SAMPLE_INTERVAL
    ) -> None:
        self.supervisor = supervisor
        self.commands = commands
        self.token = token
        self.interval = interval
        self.csrf = secrets.token_urlsafe(32)
        self.history = History(int(HISTORY_SECONDS / interval))
        self.streams: list[_Stream] = []
        self.latest: dict[str, Any] | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = supervisor.clock()

    @property
    def readonly(self) -> bool:
        return self.token is None

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.request.unregisterProducer()
            stream.request.finish()

    def tick(self) -> None:
        """One sample: history, overview, a ``data:`` event to every stream (a LoopingCall: never raises)."""
        try:
            now = self.supervisor.clock().seconds()
            control = self.supervisor.control
            children = control.children if control is not None else []
            for group, members in enumerate(self.supervisor.config.startup):
                child = children[group] if group < len(children) else None
                self.history.observe(now, group, _live(child, now), [s.name for s in members])
            self.latest = overview(self.supervisor, self.history, now)
            event = self.event()
            for stream in list(self.streams):
                if not stream.paused:
                    stream.request.write(event)
        except Exception:
            self.log.failure("dashboard sample failed")

    def event(self) -> bytes:
        """The latest overview as one server-sent event."""
        if self.latest is None:
            self.latest = overview(self.supervisor, self.history, self.supervisor.clock().seconds())
        return b"data: " + json.dumps(self.latest, default=str).encode() + b"\n\n"

    def install(self, root: Resource) -> None:
        """Add ``/``, ``/static`` and the dashboard's ``/api`` paths beside the command API."""
        token = self.token
        api = _Api(root.children[b"api"])
        api.putChild(b"session", _Session(self, token))
        api.putChild(b"overview", _Overview(self, token))
        api.putChild(b"events", _Events(self, token))
        api.putChild(b"history", _History(self, token))
        api.putChild(b"action", _Action(self, token))
        root.putChild(b"api", api)
        root.putChild(b"", _Page((STATIC / "index.html").read_bytes()))
        root.putChild(b"static", StaticFiles(str(STATIC)))


class _Api(Resource):
    """``/api``: the dashboard's own paths, every other name is an admin command."""

    def __init__(self, commands_api: Resource) -> None:
        super().__init__()
        self.commands_api = commands_api

    def getChild(self, path: bytes, request: Request) -> Resource:
        request.postpath.insert(0, request.prepath.pop())  # the command resource reads its name there
        return self.commands_api

    def render(self, request: Request) -> Any:
        return self.commands_api.render(request)


def _json(request: Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader("content-type", "application/json")
    request.setHeader("cache-control", "no-store")
    return json.dumps(value, default=str).encode()


class _Page(Resource):
    """``GET /``: the single page, with headers that keep it out of frames and other origins' scripts."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/html; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-frame-options", "DENY")
        request.setHeader(
            "content-security-policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
        )
        return self.body


class _Part(Guarded):
    def __init__(self, dashboard: Dashboard, token: str | None) -> None:
        super().__init__(token)
        self.dashboard = dashboard


class _Session(_Part):
    def render_GET(self, request: Request) -> bytes:
        d = self.dashboard
        return _json(request, {"readonly": d.readonly, "csrf": None if d.readonly else d.csrf, "interval": d.interval})


class _Overview(_Part):
    def render_GET(self, request: Request) -> bytes:
        if self.dashboard.latest is None:
            self.dashboard.event()
        return _json(request, self.dashboard.latest)


class _History(_Part):
    def render_GET(self, request: Request) -> bytes:
        wanted = (request.args or {}).get(b"stage")
        key = wanted[0].decode("utf-8", "replace") if wanted else None
        d = self.dashboard
        return _json(request, {"interval": d.interval, "seconds": HISTORY_SECONDS, "stages": d.history.columns(key)})


class _Events(_Part):
    """``text/event-stream``: the latest overview now, then one per sample until the client leaves."""

    def render_GET(self, request: Request) -> Any:
        request.setHeader("content-type", "text/event-stream")
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-accel-buffering", "no")
        request.write(b"retry: 2000\n\n" + self.dashboard.event())
        stream = _Stream(request)
        request.registerProducer(stream, True)
        streams = self.dashboard.streams
        streams.append(stream)

        def forget(_: object) -> None:
            if stream in streams:
                streams.remove(stream)

        request.notifyFinish().addBoth(forget)
        return NOT_DONE_YET


class _Action(_Part):
    """``POST /api/action``: a state-changing command, behind the token, the CSRF token and same-origin checks."""

    def render_POST(self, request: Request) -> Any:
        d = self.dashboard
        refused = self._refusal(request)
        if refused is not None:
            return _forbid(request, refused)
        command = _action_of(request)
        if isinstance(command, str):
            return as_json(request, Reply(False, error=command))
        finished = request.notifyFinish()
        gone: list[Any] = []
        finished.addErrback(gone.append)

        def answer(reply: Reply) -> None:
            d.log.info(
                "dashboard action {command}: {result}",
                command=" ".join(command),
                result="OK" if reply.ok else reply.error,
            )
            if not gone:
                request.write(as_json(request, reply))
                request.finish()

        d.commands.run(command[0], command[1:]).addCallback(answer)
        return NOT_DONE_YET

    def _refusal(self, request: Request) -> str | None:
        if self.dashboard.readonly:
            return "read-only: no #admin token is configured"
        given = (request.getHeader("x-csrf-token") or "").encode()
        if not hmac.compare_digest(given, self.dashboard.csrf.encode()):
            return "missing or wrong X-CSRF-Token"
        origin = request.getHeader("origin")
        if origin is not None and urlsplit(origin).netloc != (request.getHeader("host") or ""):
            return "cross-origin request refused"
        if (request.getHeader("content-type") or "").split(";")[0].strip() != "application/json":
            return "content type application/json expected"
        return None


def _forbid(request: Request, why: str) -> bytes:
    request.setResponseCode(403)
    request.setHeader("content-type", "application/json")
    return json.dumps(Reply(False, error=why).json()).encode()


def _action_of(request: Request) -> list[str] | str:
    """``[command, *args]`` from a JSON body, or the reason it is refused."""
    body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    try:
        value = json.loads(body) if len(body) <= MAX_BODY else None
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("command"), str):
        return 'the body is {"command": NAME, "args": [...]}'
    args = value.get("args", [])
    if value["command"] not in ACTIONS or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return f"actions are {', '.join(sorted(ACTIONS))} with string arguments"
    return [value["command"], *args]


class DashboardSite(AdminSite):
    """The admin ``Site`` with the dashboard installed; samples only while it listens."""

    def __init__(self, root: Resource, supervisor: AdminView, commands: Commands, token: str | None) -> None:
        self.dashboard = Dashboard(supervisor, commands, token)
        self.dashboard.install(root)
        super().__init__(root, token, supervisor.clock())

    def startFactory(self) -> None:
        super().startFactory()
        self.dashboard.start()

    def stopFactory(self) -> None:
        self.dashboard.stop()
        super().stopFactory()
