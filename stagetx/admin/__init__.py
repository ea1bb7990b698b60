"""The admin side of a server, in the supervisor process: console, HTTP, metrics, health.

``control`` keeps the links from the children; ``commands`` runs the admin commands over them;
``console`` (line protocol) and ``http`` (twisted.web) are two faces of the same commands;
``metrics`` turns the children's snapshots into Prometheus metrics. See docs/operations.md.
"""
