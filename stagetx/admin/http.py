"""The admin HTTP side (twisted.web): the console's commands, a JSON API, ``/metrics``, ``/health``.

- ``GET /cmd/<command>?args=A&args=B`` or ``POST /cmd`` with a command line as the body: the
  console's text reply (ending ``OK``/``ERROR …``); status 200, or 400 for ``ERROR``.
- ``GET /api/<command>?args=…`` (``POST /api`` with a line): ``{"ok", "data", "error"}`` as JSON.
- ``GET /metrics``: Prometheus text. ``GET /health``: 200 or 503 with ``{"status", "reasons"}``.

With an ``#admin`` token every request needs ``Authorization: Bearer <TOKEN>`` (else 401).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from stagetx.admin import metrics
from stagetx.admin.commands import Commands, Reply, parse

MAX_BODY = 64 * 1024


class _Guarded(Resource):
    """A resource that checks the bearer token before rendering."""

    isLeaf = True

    def __init__(self, token: str | None) -> None:
        super().__init__()
        self.token = token

    def render(self, request: Request) -> Any:
        if self.token is not None:
            given = (request.getHeader("authorization") or "").strip()
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                request.setResponseCode(401)
                request.setHeader("www-authenticate", 'Bearer realm="stagetx"')
                return b"ERROR token required\n"
        return super().render(request)


def _command_of(request: Request) -> tuple[str, list[str]] | None:
    """The command a request names: ``/x/<name>?args=…`` or a POSTed command line."""
    if request.method == b"POST":
        body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(body) > MAX_BODY:
            return None
        return parse(body.decode("utf-8", "replace"))
    if not request.postpath or not request.postpath[0]:
        return None
    name = request.postpath[0].decode("utf-8", "replace")
    args = [a.decode("utf-8", "replace") for a in (request.args or {}).get(b"args", [])]
    return name, args


class _CommandResource(_Guarded):
    """Runs a command and answers with ``show(reply)`` (text or JSON)."""

    def __init__(self, commands: Commands, token: str | None, show: Callable[[Request, Reply], bytes]) -> None:
        super().__init__(token)
        self.commands = commands
        self.show = show

    def render_GET(self, request: Request) -> Any:
        command = _command_of(request)
        if command is None:
            return self.show(request, Reply(False, error="no command (GET /cmd/<command> or POST a line)"))
        d = self.commands.run(*command)
        finished = request.notifyFinish()
        gone: list[Failure] = []
        finished.addErrback(gone.append)

        def answer(reply: Reply) -> None:
            if not gone:
                request.write(self.show(request, reply))
                request.finish()

        d.addCallback(answer)
        return NOT_DONE_YET

    render_POST = render_GET


def _as_text(request: Request, reply: Reply) -> bytes:
    request.setResponseCode(200 if reply.ok else 400)
    request.setHeader("content-type", "text/plain; charset=utf-8")
    return reply.text().encode("utf-8", "replace")


def _as_json(request: Request, reply: Reply) -> bytes:
    request.setResponseCode(200 if reply.ok else 400)
    request.setHeader("content-type", "application/json")
    return json.dumps(reply.json(), default=str).encode()


class _Metrics(_Guarded):
    def __init__(self, supervisor: Any, token: str | None) -> None:
        super().__init__(token)
        self.registry = metrics.make_registry(supervisor)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", metrics.CONTENT_TYPE)
        return metrics.render(self.registry)


class _Health(_Guarded):
    def __init__(self, health: Callable[[], list[str]], token: str | None) -> None:
        super().__init__(token)
        self.health = health

    def render_GET(self, request: Request) -> bytes:
        reasons = self.health()
        request.setResponseCode(503 if reasons else 200)
        request.setHeader("content-type", "application/json")
        return json.dumps({"status": "fail" if reasons else "ok", "reasons": reasons}).encode() + b"\n"


def admin_site(supervisor: Any, commands: Commands, token: str | None) -> Site:
    """The admin ``Site`` of ``supervisor``; ``supervisor.health()`` lists what is wrong (empty: ok)."""
    root = Resource()
    root.putChild(b"cmd", _CommandResource(commands, token, _as_text))
    root.putChild(b"api", _CommandResource(commands, token, _as_json))
    root.putChild(b"metrics", _Metrics(supervisor, token))
    root.putChild(b"health", _Health(supervisor.health, token))
    from stagetx.admin.dashboard import DashboardSite  # it builds on this module's resources

    site = DashboardSite(root, supervisor, commands, token)  # GET /, /static, /api/events … (docs/dashboard.md)
    site.displayTracebacks = False
    site.noisy = False
    return site
