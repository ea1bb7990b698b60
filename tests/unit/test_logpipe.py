"""A child's log pipe: never blocks, holds at most its limit, keeps lines whole, counts drops."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from stagetx.child.logpipe import PipeStream


class FakeReactor(Clock):
    """Time, writers and ``callFromThread`` (at once), as ``PipeStream`` uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[Any] = set()

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    yield read, write
    for fd in (read, write):
        try:
            os.close(fd)
        except OSError:
            pass


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_full_pipe_neither_blocks_nor_grows_past_the_limit_and_lines_stay_whole(pipe: tuple[int, int]) -> None:
    read, write = pipe
    reactor = FakeReactor()
    stream = PipeStream(reactor, write, limit=100_000)
    warnings: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(warnings.append)
    try:
        for number in range(5000):  # 500 KB: the pipe (64 KiB) and the limit are both exceeded
            stream.write(f"line {number} {'x' * 90}\n")
        assert reactor.writers == {stream}
        received = read_all(read)
        while reactor.writers:  # each pass empties the pipe; bounded by limit / pipe size passes
            stream.doWrite()
            received += read_all(read)
    finally:
        globalLogPublisher.removeObserver(warnings.append)
    lines = received.decode().splitlines()
    assert 0 < len(lines) < 5000 and all(line.endswith("x" * 90) for line in lines)
    assert len(received) < 100_000 + 70_000
    dropped = [e["count"] for e in warnings if "log events dropped" in e.get("log_format", "")]
    assert dropped == [5000 - len(lines)]


def test_a_reader_gone_drops_the_log_without_raising(pipe: tuple[int, int]) -> None:
    read, write = pipe
    os.close(read)
    stream = PipeStream(FakeReactor(), write)
    assert stream.write("nobody reads this\n") == len("nobody reads this\n")
    stream.write("nor this\n")
    stream.drain(timeout=1.0)
