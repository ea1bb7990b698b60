"""The rule of ``tests/unit``: fast tests on fake time and fake transports, never the real thing.

A test here is a plain function, called directly (not inside the reactor as ``pytest_twisted``
runs tests elsewhere); one that returns a Deferred or a coroutine fails. While it sets up and
runs, the global reactor refuses to schedule, listen, connect or spawn, sockets refuse to listen,
connect or send, and ``subprocess`` and ``os.fork`` refuse to start a process. A test that needs one of them belongs in
``tests/integration`` (the real reactor, real sockets, one process) or ``tests/e2e`` (servers,
child processes). Only calls made on the main thread count: a thread left over by an earlier test
is not this test's doing.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet.defer import Deferred

#: What a unit test may not call on the global reactor.
REACTOR_CALLS = (
    "callLater",
    "listenTCP",
    "listenUDP",
    "listenMulticast",
    "listenUNIX",
    "listenSSL",
    "connectTCP",
    "connectUNIX",
    "connectSSL",
    "adoptStreamPort",
    "spawnProcess",
    "addReader",
    "addWriter",
)

#: What a unit test may not do with a socket: talk to anything. (Creating one to ask the kernel, as
#: the configuration does to check that an address is this host's, is allowed.)
SOCKET_CALLS = ("listen", "connect", "connect_ex", "sendto", "sendmsg")

MOVE_IT = "use task.Clock / a fake transport, or move the test to tests/integration or tests/e2e"


class RealIOInUnitTest(AssertionError):
    """A unit test reached the real reactor, a socket or a child process."""


@contextmanager
def refused_real_io() -> Iterator[list[str]]:
    """Within the block, the real reactor, sockets and process spawning raise; yields what was tried
    (recorded too, since the code under test may swallow the error)."""
    from twisted.internet import reactor  # here, not at import: pytest_twisted installs it first

    tried: list[str] = []
    main = threading.main_thread()

    def refuse(what: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def guard(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not main:
                return original(*args, **kwargs)
            tried.append(what)
            raise RealIOInUnitTest(f"{what} in a unit test: {MOVE_IT}")

        return guard

    with pytest.MonkeyPatch.context() as patch:
        for name in REACTOR_CALLS:
            if hasattr(reactor, name):
                patch.setattr(reactor, name, refuse(f"reactor.{name}", getattr(reactor, name)))
        for name in SOCKET_CALLS:
            patch.setattr(socket.socket, name, refuse(f"socket.{name}", getattr(socket.socket, name)))
        patch.setattr(subprocess.Popen, "_execute_child", refuse("subprocess.Popen", subprocess.Popen._execute_child))
        for name in ("fork", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                patch.setattr(os, name, refuse(f"os.{name}", getattr(os, name)))
        yield tried


def _checked(item: pytest.Item, phase: str) -> Generator[None, None, None]:
    with refused_real_io() as tried:
        yield  # the test's own failure, if any, passes through unchanged
    if tried:
        raise RealIOInUnitTest(f"{item.nodeid} ({phase}) used {', '.join(sorted(set(tried)))}: {MOVE_IT}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _checked(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _checked(item, "call"))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool:
    """Call the test as it is, ahead of pytest_twisted (which would run it in the reactor)."""
    names = pyfuncitem._fixtureinfo.argnames
    result = pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names})
    if isinstance(result, Deferred) or inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise RealIOInUnitTest(f"{pyfuncitem.nodeid} waits on the reactor (returns {type(result).__name__}): {MOVE_IT}")
    return True
