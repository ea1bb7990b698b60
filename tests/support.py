"""Test helpers: write a config with its scripts, run its groups in this process, read what Lua logged."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher

from stagetx.child.host import ProcessHost
from stagetx.config import load_config
from stagetx.stages.index.board import Board


def write_app(root: Path, config: dict[str, Any], scripts: dict[str, str]) -> Path:
    """Write ``stage.json`` and ``lua/NAME.lua`` files under ``root``; returns the config path."""
    lua = root / "lua"
    lua.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        path = lua / (name.replace(".", "/") + ".lua")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    path = root / "stage.json"
    path.write_text(json.dumps(config))
    return path


class LogCapture:
    """Collects log events while active: ``lines("stage.a")`` is what that namespace logged."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def lines(self, namespace: str | None = None, level: str | None = None) -> list[str]:
        out = []
        for e in self.events:
            if namespace is not None and e.get("log_namespace") != namespace:
                continue
            if level is not None and e["log_level"].name != level:
                continue
            out.append(e.get("message", e.get("error", e.get("log_format", ""))))
        return out

    def text(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Block until ``condition()`` holds, for tests that wait on threads or other processes; fail
    after ``timeout`` seconds. Not for code on the reactor thread: use ``wait_for`` there."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> Deferred[None]:
    """A Deferred that fires once ``condition()`` holds, checked on the reactor while it runs
    (``await`` it); it fails after ``timeout`` seconds."""

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            await deferLater(reactor, 0.01, lambda: None)

    return ensureDeferred(poll())


class InProcessServer:
    """All groups of a config hosted in this process, each with its own router (no links)."""

    def __init__(self, config_path: Path, groups: list[int] | None = None) -> None:
        self.config = load_config(str(config_path))
        wanted = range(len(self.config.startup)) if groups is None else groups
        self.hosts = [ProcessHost(self.config, g, reactor) for g in wanted]

    async def start(self) -> None:
        for host in self.hosts:
            host.startService()
            await host.ready

    async def stop(self) -> None:
        for host in reversed(self.hosts):
            await ensureDeferred(_as_deferred(host.stopService()))


def _as_deferred(d: Any) -> Deferred[Any]:
    if isinstance(d, Deferred):
        return d
    result: Deferred[Any] = Deferred()
    result.callback(d)
    return result


def iter_lines(capture: LogCapture, namespace: str) -> Iterator[list[str]]:
    """Each logged line of ``namespace`` split at tabs (log4cxx joins its arguments with tabs)."""
    for line in capture.lines(namespace):
        yield line.split("\t")


#: Lua handlers of the delivery tests: "n" logs its value, "slow" holds the thread 30 ms, "loop"
#: never returns (its budget stops it).
DELIVERY_HANDLERS = """
stage.waitfor("n", function(i) log4cxx.info("n", i) end)
stage.waitfor("slow", function()
    local t = process.tick
    while process.tick - t < 0.03 do end
end)
stage.waitfor("loop", function() while true do end end)
"""


def said(capture: LogCapture, namespace: str, prefix: str) -> list[list[str]]:
    """The fields after ``prefix`` of each line of ``namespace`` that starts with it."""
    return [row[1:] for row in iter_lines(capture, namespace) if row[0] == prefix]


def count_calls(obj: Any, *names: str) -> dict[str, int]:
    """Counts the calls of ``obj``'s methods ``names`` from now on (each wrapped on the object)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(obj, name)

        def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            counts[_name] += 1
            return _original(*args)

        setattr(obj, name, counted)
    return counts


def started_process(root: Path, config: dict[str, Any], links: Any) -> ProcessHost:
    """The process of group 0 of ``config`` (written to ``root/app.json``) on fake time, with
    ``links`` as its router's links, started."""
    (root / "app.json").write_text(json.dumps(config))
    host = ProcessHost(load_config(str(root / "app.json")), 0, Clock())
    host.router.links = links
    host.startService()
    return host


def env_path() -> str:
    """A PYTHONPATH that lets a child process import this checkout's stagetx."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


class ServerProcess:
    """``twistd -n stage -c CONFIG`` as a real child process; its output lines collected by a thread.

    ``prefix``: a command that runs it, e.g. ``("ip", "netns", "exec", NAME)`` (that execs, so
    the pid is still twistd's).
    """

    def __init__(self, config: Path, *args: str, prefix: tuple[str, ...] = ()) -> None:
        import subprocess
        import sys
        import threading

        twistd = str(Path(sys.executable).with_name("twistd"))
        self.process = subprocess.Popen(
            [*prefix, twistd, "-n", "--pidfile=", "stage", "-c", str(config), *args],
            cwd=config.parent,
            env={**os.environ, "PYTHONPATH": env_path()},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def pids(self, group: int) -> list[int]:
        """The pids ``#startup`` group ``group`` (0-based) was started with, in order."""
        marker = f"process {group + 1} started, pid "
        return [int(line.split(marker)[1]) for line in list(self.lines) if marker in line]

    def logged(self, stage: str, prefix: str) -> list[list[str]]:
        """Tab-separated fields after ``prefix`` of each line stage ``stage`` logged with it."""
        out = []
        for text in self.stage_lines(stage):
            fields = text.split("\t")
            if fields[0] == prefix:
                out.append(fields[1:])
        return out

    def stage_lines(self, stage: str) -> list[str]:
        """The text of each line stage ``stage`` logged, after the relay's ``pN[pid]`` prefix."""
        marker = f"[stage.{stage}#"
        out = []
        for line in list(self.lines):
            at = line.find(marker)
            if at >= 0:
                out.append(re.sub(r"^p\d+\[\d+\] ", "", line[line.index("] ", at) + 2 :], count=1))
        return out

    def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        """``wait_until`` that also fails at once if the server exits; both failures show its log."""

        def done() -> bool:
            if self.process.poll() is not None and not condition():
                raise AssertionError(f"server exited while waiting for {what}:\n" + "\n".join(self.lines[-60:]))
            return condition()

        try:
            wait_until(done, timeout, what)
        except AssertionError as error:
            if "server exited" in str(error):
                raise
            raise AssertionError(f"{error}:\n" + "\n".join(self.lines[-60:])) from None

    def stop(self, timeout: float = 20.0) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except Exception:
            self.process.kill()
            code = self.process.wait(10)
        self._reader.join(10)
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_PORTS_GIVEN: set[int] = set()


def free_port(family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on loopback a moment ago (for a server the test starts), never one
    this test run handed out before: two servers of one test must not get the same port."""
    for _ in range(100):
        with socket.socket(family, kind) as probe:
            probe.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
    raise RuntimeError("no fresh loopback port")


def packet(payload: bytes) -> bytes:
    """One frame of the broker's ``packet`` framing: 4-byte little-endian length, then payload."""
    return struct.pack("<I", len(payload)) + payload


class PacketClient(protocol.Protocol):
    """A broker client over ``packet`` framing: collects what the server sends; ``closed`` once the
    connection is gone."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def frames(self) -> list[bytes]:
        from stagetx.broker.framing import PacketFraming

        return PacketFraming(1 << 20, 1 << 20).split(self.data)[0]

    def send(self, *payloads: bytes) -> None:
        self.transport.write(b"".join(packet(p) for p in payloads))


async def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> PacketClient:
    """A ``PacketClient`` connected to ``host:port`` (IPv4 or IPv6 loopback)."""
    endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port, timeout=5)
    client = PacketClient()
    d = connectProtocol(endpoint, client)
    d.addTimeout(timeout, reactor)
    await d
    return client


class RunningStage:
    """One Lua stage ``a`` in this process running ``script`` (``kind``: ``lua`` or ``luajit``),
    with its log captured; ``lua(code)`` runs more code in it. Use with ``async with``."""

    def __init__(self, tmp_path: Path, script: str, kind: str = "lua", threads: tuple[int, int] | None = None) -> None:
        config: dict[str, Any] = {
            "#startup": [[f"={kind}+a"]],
            f"={kind}": {"%package": ["[0]lua"], f"={kind}+a": "a"},
        }
        if threads is not None:
            config["#threads"] = list(threads)
        self.server = InProcessServer(write_app(tmp_path, config, {"a": script}))
        self.log = LogCapture()

    @property
    def vm(self) -> Any:
        return self.server.hosts[0].stages[0].stage.vm

    def lua(self, code: str) -> list[Any]:
        """Run a chunk in the stage; its results as Python natives (raises on a Lua error)."""
        from stagetx.codec import pack_lua, unpack_py

        ok, *results = self.vm.call("test", self.vm.compile(code.encode(), b"=test"))
        assert ok is True, results
        return list(unpack_py(pack_lua(self.vm, tuple(results))))

    def said(self, prefix: str) -> list[list[str]]:
        """Tab-separated fields after ``prefix`` of each line stage ``a`` logged with it."""
        return [fields[1:] for fields in iter_lines(self.log, "stage.a") if fields[0] == prefix]

    def text(self) -> str:
        return self.log.text()

    async def __aenter__(self) -> RunningStage:
        self.log.__enter__()
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        self.log.__exit__()


def board_loaded_from(chunks: Iterable[list[Any]]) -> Board:
    """A board bulk-loaded from snapshot chunks (``Board.snapshot_chunks``), as a start loads it."""
    board = Board(loading=True)
    for chunk in chunks:
        board.add_columns(chunk)
    board.finish_load()
    return board
