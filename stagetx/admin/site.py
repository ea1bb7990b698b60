"""The admin HTTP site: the command, metrics and health resources of ``stagetx.admin.http`` under
the dashboard of ``stagetx.admin.dashboard`` (docs/operations.md, docs/dashboard.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import Site

from stagetx.admin.commands import Commands
from stagetx.admin.dashboard import DashboardSite
from stagetx.admin.http import CommandResource, HealthResource, MetricsResource, as_json, as_text

if TYPE_CHECKING:
    from stagetx.admin.view import AdminView


def admin_site(supervisor: AdminView, commands: Commands, token: str | None) -> Site:
    """The admin ``Site`` of ``supervisor``; ``supervisor.health()`` lists what is wrong (empty: ok)."""
    root = Resource()
    root.putChild(b"cmd", CommandResource(commands, token, as_text))
    root.putChild(b"api", CommandResource(commands, token, as_json))
    root.putChild(b"metrics", MetricsResource(supervisor, token))
    root.putChild(b"health", HealthResource(supervisor.health, token))
    site = DashboardSite(root, supervisor, commands, token)  # GET /, /static, /api/events … (docs/dashboard.md)
    site.displayTracebacks = False
    site.noisy = False
    return site
