"""``twistd stage``: command-line options and the service tree built from the configuration."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.python import usage

from stagetx.admin.service import AdminService
from stagetx.config import ConfigError, ServerConfig, load_config
from stagetx.lua.search import preload_files
from stagetx.lua.syntax import compile_errors
from stagetx.supervisor import Supervisor


class Options(usage.Options):
    """``-c FILE`` (``-`` for standard input) and ``--check``.

    A bad configuration ends the program here, before anything starts: one line on stderr
    naming the JSON path and the problem, exit status 1.
    """

    synopsis = "-c FILE [--check] [--log-format text|json] [--watch SECONDS] [--slow-ms MS] [--grace S]"
    longdesc = "Run a stagetx server: the #startup groups of FILE as supervised processes."
    optParameters = [
        ["config", "c", None, "the JSON configuration file (- reads standard input)"],
        ["log-format", None, "text", "children's log events: text lines, or json (all fields kept)"],
        ["watch", None, 0.0, "dev mode: reload a Lua stage when its scripts change, polled every SECONDS", float],
        ["slow-ms", None, 100.0, "log a Lua callback holding the reactor longer than this as a slow handler", float],
        ["grace", None, 10.0, "seconds a stopping process may drain before SIGKILL (drain: half of it)", float],
        ["restart-delay", None, 1.0, "seconds before a crashed process is restarted (doubling up to 60)", float],
        [
            "unresponsive-restart",
            None,
            30.0,
            "seconds a process may send no report (its reactor stuck) before it is killed and restarted; 0: never",
            float,
        ],
    ]
    optFlags = [["check", None, "validate the configuration, compile its Lua scripts, print its processes and exit"]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("-c/--config FILE is required")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format is text or json")
        if self["unresponsive-restart"] < 0:
            raise usage.UsageError("--unresponsive-restart must not be negative")
        if self["grace"] <= 0 or self["watch"] < 0 or self["slow-ms"] <= 0 or self["restart-delay"] <= 0:
            raise usage.UsageError("--grace, --slow-ms and --restart-delay must be positive, --watch not negative")
        try:
            self["server"] = load_config(self["config"])
        except ConfigError as err:
            raise SystemExit(f"stage: {err}") from None
        if self["check"]:
            report, errors = check_report(self["server"])
            sys.stdout.write(report)
            raise SystemExit(1 if errors else 0)


def script_errors(config: ServerConfig) -> list[str]:
    """Each ``%preload`` file and main script of the Lua stages that does not compile (nothing runs)."""
    scripts: dict[tuple[str, str], None] = {}  # (VM kind, path), in config order, replicas once
    for stage in config.stages:
        if stage.main is not None:
            for path in [*preload_files(stage.settings.get("%preload")), stage.main]:
                scripts[(stage.type, path)] = None
    errors = []
    for kind, path in scripts:
        errors += compile_errors(kind, [path], config.base_dir)
    return errors


def check_report(config: ServerConfig) -> tuple[str, list[str]]:
    """The ``--check`` output and the script errors in it: ``config OK`` (or one ``error:`` line
    per script that does not compile), the notices, then one line per process (numbered from 1, as in
    ``list`` and the logs)."""
    errors = script_errors(config)
    lines = [f"error: {error}" for error in errors] or ["config OK"]
    lines += [f"notice: {notice}" for notice in config.notices]
    for group, stages in enumerate(config.startup):
        lines.append(f"process {group + 1}: " + " ".join(stage.name for stage in stages))
    return "\n".join(lines) + "\n", errors


def makeService(options: dict[str, Any]) -> service.MultiService:
    """The server's service tree; nothing starts (no thread, no process) before ``startService``."""
    root = service.MultiService()
    operations = {
        "log_format": options.get("log-format", "text"),
        "watch": options.get("watch", 0.0),
        "slow_ms": options.get("slow-ms", 100.0),
        "drain": options.get("grace", 10.0) / 2,
    }
    delay = options.get("restart-delay", 1.0)
    supervisor = Supervisor(
        options["server"],
        args=sys.argv,
        grace=options.get("grace", 10.0),
        operations=operations,
        signals=True,
        backoff=(delay, max(delay, 60.0)),
    )
    supervisor.setServiceParent(root)
    admin = AdminService(supervisor, unresponsive_restart=options.get("unresponsive-restart", 30.0))
    admin.setServiceParent(root)  # after the supervisor: its run directory exists
    return root
