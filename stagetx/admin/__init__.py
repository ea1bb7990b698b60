"""The admin side of a server, in the supervisor process: console, HTTP, metrics, health.

``service`` (``AdminService``) runs it beside the supervisor, read through ``view``; ``control``
keeps the links from the children; ``commands`` runs the admin commands over them; ``console``
(line protocol) and ``http``/``dashboard`` (twisted.web, put together by ``site``) are faces of
the same commands; ``metrics`` turns the children's snapshots into Prometheus metrics. See
docs/operations.md.
"""
