"""The admin commands: parsing a command line, running it over the control links, the reply.

A ``Reply`` is text lines for people (the console, ``/cmd``) and data for programs (``/api``);
rendered as text, every reply ends with one marker line: ``OK`` or ``ERROR <reason>``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed

from stagetx.config import LOG_LEVELS
from stagetx.controllink import Result

if TYPE_CHECKING:
    from stagetx.admin.view import AdminView


@attrs.frozen
class Reply:
    """The outcome of one command: ``lines`` for people, ``data`` for the JSON API."""

    ok: bool
    lines: tuple[str, ...] = ()
    data: Any = None
    error: str | None = None

    def text(self) -> str:
        marker = "OK" if self.ok else "ERROR " + ((self.error or "").splitlines() or ["failed"])[0]
        return "".join(line + "\n" for line in (*self.lines, marker))

    def json(self) -> dict[str, Any]:
        return {"ok": self.ok, "data": self.data, "error": self.error}


class CommandError(Exception):
    """A command that cannot run as asked; its message is the ``ERROR`` text."""


HELP: dict[str, tuple[str, str]] = {
    "help": ("", "this list"),
    "list": ("", "processes: pid, uptime, restarts, ready, stages"),
    "stat": ("", "per stage: messages in/out, handler time, errors, broker clients; queue per process"),
    "mem": ("", "Lua memory per runtime, RSS per process"),
    "gc": ("", "full garbage collection in every process (Python and Lua)"),
    "reload": ("<stage>", "rebuild a Lua stage's runtime from its current scripts"),
    "eval": ("<stage> <lua>", "run Lua in a stage's main runtime, show the results"),
    "restart": ("<process>", "restart a process (1-based, as in list)"),
    "peers": ("", "cluster peers, or: no cluster"),
    "tickets": ("", "ticket categories: held, waiting, limit"),
    "loglevel": ("<namespace> <level>", "set a log level in every child process"),
    "index": ("<stage> [json]", "an index stage's indexes, or a JSON get/range/forEach/total request"),
}


def parse(line: str) -> tuple[str, list[str]]:
    """``"eval app return 1 + 1"`` → ``("eval", ["app", "return 1 + 1"])``; other commands split on blanks."""
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if name in ("eval", "index"):
        stage, _, code = rest.partition(" ")
        return name, [a for a in (stage, code.strip()) if a]
    return name, rest.split()


class Commands:
    """Runs admin commands for ``supervisor`` (its status, restart and control server)."""

    def __init__(self, supervisor: AdminView) -> None:
        self.supervisor = supervisor

    def run_line(self, line: str) -> Deferred[Reply]:
        name, args = parse(line)
        return self.run(name, args)

    def run(self, name: str, args: Sequence[str]) -> Deferred[Reply]:
        """Run one command; never fails: errors come back as ``Reply(ok=False)``."""
        handler: Callable[..., Any] | None = getattr(self, f"cmd_{name}", None)
        if handler is None or name not in HELP:
            return succeed(Reply(False, error=f"unknown command {name!r} (try help)"))
        try:
            inspect.signature(handler).bind(*args)
        except TypeError:
            return succeed(Reply(False, error=f"usage: {name} {HELP[name][0]}".strip()))
        d = maybeDeferred(handler, *args)
        d.addErrback(_as_reply, name)
        return d

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def _control(self) -> Any:
        control = self.supervisor.control
        if control is None:
            raise CommandError("the server is not running")
        return control

    def _groups_of(self, stage: str) -> list[int]:
        groups = sorted({s.group for s in self.supervisor.config.stages if stage in (s.name, s.id)})
        if not groups:
            raise CommandError(f"no stage {stage!r}")
        return groups

    def _all(self, name: str, args: list[str], groups: list[int] | None = None) -> Deferred[list[tuple[int, Any]]]:
        """Ask the processes; fails with the first error, else ``[(group, data), ...]``."""

        def check(results: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
            errors = [text for _, (ok, text, _) in results if not ok]
            if errors:
                raise CommandError("; ".join(errors))
            return [(group, data) for group, (_, _, data) in results]

        return self._control.ask_all(name, args, groups).addCallback(check)

    # -- commands ---------------------------------------------------------------------------------
    def cmd_help(self) -> Reply:
        lines = [f"{name} {args}".strip().ljust(28) + text for name, (args, text) in HELP.items()]
        return Reply(True, tuple(lines), {name: text for name, (_, text) in HELP.items()})

    def cmd_list(self) -> Reply:
        now = self.supervisor.clock().seconds()
        children = self._control.children
        rows = []
        for status in self.supervisor.status():
            rows.append(
                {
                    "process": status.group + 1,
                    "pid": status.pid,
                    "uptime": None if status.started is None else round(now - status.started, 3),
                    "restarts": status.restarts,
                    "ready": children[status.group].ready,
                    "unresponsive": self.supervisor.unresponsive(status.group) is not None,
                    "stages": [s.name for s in self.supervisor.config.startup[status.group]],
                }
            )
        lines = ["process  pid      uptime(s)  restarts  ready  stages"]
        for r in rows:
            uptime = "-" if r["uptime"] is None else f"{r['uptime']:.0f}"
            lines.append(
                f"{r['process']:<8} {r['pid'] or '-'!s:<8} {uptime:<10} {r['restarts']:<9} "
                f"{'unresponsive' if r['unresponsive'] else 'yes' if r['ready'] else 'no':<6} {' '.join(r['stages'])}"
            )
        return Reply(True, tuple(lines), rows)

    def cmd_stat(self) -> Deferred[Reply]:
        def show(results: list[tuple[int, Any]]) -> Reply:
            lines = ["process  stage                     in        out       errors  handler(ms)  queue"]
            data = []
            for group, stat in results:
                for s in stat["stages"]:
                    lines.append(
                        f"{group + 1:<8} {s['name']:<25} {s['received']:<9} {s['sent']:<9} {s['errors']:<7} "
                        f"{s['busy'] * 1000:<12.1f} {stat['queue']}"
                    )
                    if s.get("failure"):
                        lines.append(f"{'':<8} {s['name']} FAILED: {s['failure']}")
                    clients = s.get("clients")
                    if clients is not None and (clients["accepted"] or clients["frames_in"] or s["listeners"]):
                        lines.append(f"{'':<8} {s['name']} clients: {_traffic(clients)}")
                        lines += [f"{'':<10} {e['url']} ({e['kind']} {e['id']}): {_traffic(e)}" for e in s["listeners"]]
                data.append({"process": group + 1, **stat})
            return Reply(True, tuple(lines), data)

        return self._all("stat", []).addCallback(show)

    def cmd_mem(self) -> Deferred[Reply]:
        def show(results: list[tuple[int, Any]]) -> Reply:
            lines, data = [], []
            for group, mem in results:
                lines.append(f"process {group + 1}: rss {mem['rss'] / 1048576:.1f} MiB")
                lines += [
                    f"  {name}: Lua {used / 1048576:.2f} MiB" for name, used in mem["lua"].items() if used is not None
                ]
                data.append({"process": group + 1, **mem})
            return Reply(True, tuple(lines), data)

        return self._all("mem", []).addCallback(show)

    def cmd_gc(self) -> Deferred[Reply]:
        def show(results: list[tuple[int, Any]]) -> Reply:
            lines = [
                f"process {group + 1}: {gc['python_objects']} Python objects freed, rss {gc['rss'] / 1048576:.1f} MiB"
                for group, gc in results
            ]
            return Reply(True, tuple(lines), [{"process": group + 1, **gc} for group, gc in results])

        return self._all("gc", []).addCallback(show)

    def cmd_reload(self, stage: str) -> Deferred[Reply]:
        def show(results: list[tuple[int, Result]]) -> Reply:
            lines: list[str] = []
            data, errors = [], []
            for group, (ok, text, values) in results:
                if ok:
                    lines.append(f"process {group + 1}: {stage} reloaded")
                else:
                    errors.append(_failed(group, text, lines, len(results) > 1))
                reloads = values["reloads"] if ok else None
                data.append({"process": group + 1, "ok": ok, "reloads": reloads, "error": None if ok else text})
            if errors:
                return Reply(False, tuple(lines), data, error="; ".join(errors))
            return Reply(True, tuple(lines), data)

        return self._control.ask_all("reload", [stage], self._groups_of(stage)).addCallback(show)

    def cmd_eval(self, stage: str, code: str) -> Deferred[Reply]:
        def show(results: list[tuple[int, Result]]) -> Reply:
            lines: list[str] = []
            data, errors = [], []
            for group, (ok, text, values) in results:
                if ok:
                    lines.append(_from(group, text, len(results) > 1))
                else:
                    errors.append(_failed(group, text, lines, len(results) > 1))
                data.append({"process": group + 1, "ok": ok, "results": values, "error": None if ok else text})
            if errors:
                return Reply(False, tuple(lines), data, error="; ".join(errors))
            return Reply(True, tuple(lines), data)

        return self._control.ask_all("eval", [stage, code], self._groups_of(stage)).addCallback(show)

    def cmd_restart(self, process: str) -> Deferred[Reply]:
        groups = len(self.supervisor.config.startup)
        if not (process.isascii() and process.isdigit()) or not 1 <= int(process) <= groups:
            raise CommandError(f"no process {process!r} (1 to {groups})")
        return self.supervisor.restart(int(process) - 1).addCallback(
            lambda pid: Reply(True, (f"process {process} restarted, pid {pid}",), {"process": int(process), "pid": pid})
        )

    def cmd_peers(self) -> Deferred[Reply]:
        def show(results: list[tuple[int, Any]]) -> Reply:
            peers = [p for _, found in results if found for p in found if "server" in p]
            if all(found is None for _, found in results):
                return Reply(True, ("no cluster",), None)
            lines = [
                f"{p['server']} {p['addr']} {'linked' if p['linked'] else 'not linked'}"
                f"{' backup' if p['backup'] else ''} delay {p['delay'] * 1000:.1f} ms"
                f"{' overloaded' if p['overloaded'] else ''} stages {p['stages']}"
                for p in peers
            ]
            return Reply(True, tuple(lines) or ("no peers yet",), peers)

        return self._all("peers", []).addCallback(show)

    def cmd_tickets(self) -> Deferred[Reply]:
        def show(results: list[tuple[int, Any]]) -> Reply:
            lines, data = [], {}
            for _, stages in results:
                for name, categories in stages.items():
                    data[name] = categories
                    lines.append(name)
                    lines += [f"  {c}: held {h} waiting {w} limit {lim}" for c, (h, w, lim) in categories.items()]
            return Reply(True, tuple(lines) or ("no ticket stage",), data)

        return self._all("tickets", []).addCallback(show)

    def cmd_loglevel(self, namespace: str, level: str) -> Deferred[Reply]:
        level = "warn" if level == "warning" else level
        if level not in LOG_LEVELS:
            raise CommandError(f"unknown level {level!r} ({', '.join(LOG_LEVELS)})")
        return self._all("loglevel", [namespace, level]).addCallback(
            lambda results: Reply(
                True, (f"{namespace}: {level} in {len(results)} processes",), {"namespace": namespace, "level": level}
            )
        )

    def cmd_index(self, stage: str, request: str = "") -> Deferred[Reply]:
        def show(results: list[tuple[int, Any]]) -> Reply:
            data = results[0][1]
            return Reply(True, (json.dumps(data, ensure_ascii=False),), data)

        args = [stage, request] if request else [stage]
        return self._all("index", args, self._groups_of(stage)[:1]).addCallback(show)


def _from(group: int, text: str, several: bool) -> str:
    """``text`` as one process's part of an answer: named by its process when several answered
    (unless it names its process already, as the control server's own errors do)."""
    name = f"process {group + 1}"
    if not several or text.startswith((name + ":", name + " ")):
        return text
    return f"{name}: {text}"


def _failed(group: int, error: str, lines: list[str], several: bool) -> str:
    """One process's error for the marker line (its first line, named by ``_from``); the rest of
    it (a traceback) goes to ``lines``, above the marker."""
    first, *rest = error.splitlines() or [""]
    lines += rest
    return _from(group, first, several)


def _traffic(counts: dict[str, Any]) -> str:
    """One ``stat`` line of broker client counters (a stage's totals or one endpoint's)."""
    return (
        f"{counts['connected']} connected, accepted {counts['accepted']} refused {counts['refused']} "
        f"closed {counts['closed']}, frames in {counts['frames_in']} out {counts['frames_out']}, "
        f"bytes in {counts['bytes_in']} out {counts['bytes_out']}, oversized {counts['oversized']}"
    )


def _as_reply(failure: Any, name: str) -> Reply:
    if failure.check(CommandError):
        return Reply(False, error=str(failure.value))
    return Reply(False, error=f"{name}: {failure.getErrorMessage()}")
