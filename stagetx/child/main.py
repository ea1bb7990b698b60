"""Entry point of a stage process: ``python -m stagetx.child`` (spawned by the supervisor).

Reads the bootstrap JSON line (see ``docs/internals.md``) from stdin, logs to stdout for the
supervisor to relay, runs the ``ProcessHost`` of its group, and stops when told (SIGTERM) or when
the supervisor is gone (EOF on stdin, or the parent-death signal).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat
import sys
from typing import IO, Any, cast

from twisted.internet import fdesc
from twisted.internet.interfaces import IReactorThreads, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from stagetx import reactors
from stagetx.child.logpipe import PipeStream

log = Logger(namespace="stagetx.child")


@implementer(IReadDescriptor)
class _SupervisorWatch:
    """Stops the reactor when stdin (a pipe from the supervisor) reaches EOF."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        fdesc.setNonBlocking(0)

    def fileno(self) -> int:
        return 0

    def doRead(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        if not data:
            self.reactor.removeReader(self)
            log.info("supervisor gone; stopping")
            reactors.stop(self.reactor)

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "supervisor-watch"


def _terminated(reactor: Any) -> None:
    log.info("SIGTERM: stopping" if reactors.stop(reactor) else "SIGTERM: already stopping")


def _raise_file_limit() -> None:
    """Thousands of broker clients need as many descriptors as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the supervisor dies (belt and braces with the stdin watch)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    # Ctrl-C in a terminal reaches the whole process group; the supervisor stops us (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    boot = json.loads(sys.stdin.buffer.readline())
    _die_with_parent()
    _raise_file_limit()
    from twisted.internet import reactor

    from stagetx.child.service import ChildProcess
    from stagetx.config import parse_config
    from stagetx.logsetup import begin_logging, reopen_log_files

    config = parse_config(boot["config"], boot["base_dir"])
    json_lines = boot.get("operations", {}).get("log_format") == "json"
    stream = _log_stream(reactor)
    levels = begin_logging(config.log, stream, json_lines)
    threads = IReactorThreads(reactor)  # the reactor itself: every installable reactor provides it
    signal.signal(signal.SIGHUP, lambda *_: threads.callFromThread(reopen_log_files))
    threads.suggestThreadPoolSize(config.threads[0])
    child = ChildProcess(config, boot, reactor, levels)
    reactor.addReader(_SupervisorWatch(reactor))
    # over the handler the reactor installs as it starts, which would stop a stopping reactor again
    reactor.callWhenRunning(signal.signal, signal.SIGTERM, lambda *_: threads.callFromThread(_terminated, reactor))
    reactor.callWhenRunning(child.startService)
    reactor.addSystemEventTrigger("before", "shutdown", child.stopService)
    reactor.run()
    if isinstance(stream, PipeStream):
        stream.drain(timeout=2.0)  # the last lines (stopping) when the supervisor reads them
    return 0


def _log_stream(reactor: Any) -> IO[str]:
    """stdout for the log: non-blocking when it is a pipe (the supervisor), else as it is."""
    if stat.S_ISFIFO(os.fstat(1).st_mode):
        sys.stdout.flush()
        return cast(IO[str], PipeStream(reactor))  # the two methods the log observers call
    return sys.stdout
