"""The rule of tests/unit holds: the real reactor, talking sockets and child processes are refused
(and recorded, for code that swallows the error), and all is back as it was afterwards."""

from __future__ import annotations

import socket
import subprocess

import pytest
from twisted.internet import reactor

from tests.unit.conftest import RealIOInUnitTest, refused_real_io


def test_the_reactor_sockets_and_processes_are_refused_and_recorded() -> None:
    with refused_real_io() as tried:
        with pytest.raises(RealIOInUnitTest, match="reactor.callLater"):
            reactor.callLater(0, lambda: None)
        with pytest.raises(RealIOInUnitTest, match="reactor.listenTCP"):
            reactor.listenTCP(0, None)  # type: ignore[arg-type]
        with socket.socket() as probe:
            with pytest.raises(RealIOInUnitTest, match="socket.connect"):
                probe.connect(("127.0.0.1", 9))
        with pytest.raises(RealIOInUnitTest, match="subprocess.Popen"):
            subprocess.run(["true"], check=False)
    assert tried == ["reactor.callLater", "reactor.listenTCP", "socket.connect", "subprocess.Popen"]


def test_afterwards_everything_is_as_it_was() -> None:
    before = (reactor.callLater, socket.socket.connect, subprocess.Popen._execute_child)  # type: ignore[attr-defined]
    with refused_real_io():
        assert reactor.callLater is not before[0]
    assert (reactor.callLater, socket.socket.connect, subprocess.Popen._execute_child) == before  # type: ignore[attr-defined]
