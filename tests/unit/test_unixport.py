"""A UNIX listening socket listened again when its file or directory is removed."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from stagetx.unixport import KeptUNIXPort


class FileMakingReactor(MemoryReactor):
    """``listenUNIX`` that makes the socket's file, as a real listen does."""

    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0) -> Any:
        Path(address).touch(mode)
        return super().listenUNIX(address, factory, backlog, mode, wantPID)


def test_a_removed_directory_is_made_again_and_listened_in_at_the_next_check(tmp_path: Path) -> None:
    reactor, clock = FileMakingReactor(), Clock()
    path = tmp_path / "run" / "g0.sock"
    port = KeptUNIXPort(reactor, clock, str(path), Factory(), interval=1.0)
    port.start()
    clock.advance(1.0)
    assert len(reactor.unixServers) == 1
    shutil.rmtree(path.parent)
    clock.advance(1.0)
    assert [server[0] for server in reactor.unixServers] == [str(path), str(path)]
    assert path.exists() and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    clock.advance(1.0)
    assert len(reactor.unixServers) == 2  # its own file again: nothing to do
    port.stop()
    assert clock.getDelayedCalls() == []
