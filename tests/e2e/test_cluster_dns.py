"""DNS discovery (``dns://NAME:PORT``): real ``twistd`` servers find each other through a real DNS
server (twisted.names, ``tests/e2e/dns_server.py``) whose records change while they run.

The servers listen on 127.0.0.2-4 (all loopback), one port for all, as servers of one name do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster_scripts import ASKER, WHERE
from tests.support import ServerProcess, free_port, write_app

NAME = "game.i22.test"


class Zone:
    """The DNS server and its records."""

    def __init__(self, root: Path) -> None:
        self.path = root / "zone.json"
        self.set([])
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("dns_server.py")), str(self.path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline().split()  # the server prints it once it listens
        assert ready[:1] == ["ready"], ready
        self.port = int(ready[1])

    def set(self, addresses: list[str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({NAME: addresses}))
        tmp.replace(self.path)  # the server never reads a half-written file

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def zone(tmp_path: Path) -> Iterator[Zone]:
    dns = Zone(tmp_path)
    try:
        yield dns
    finally:
        dns.stop()


def server(root: Path, zone: Zone, host: str, port: int, name: str, script: str) -> ServerProcess:
    stage = "w" if script == WHERE else "s"
    config: dict[str, Any] = {
        "name": name,
        "#secret": "dns-cluster-secret",
        "#router": [1500, 900],
        "#cluster": [{"listen": f"{host}:{port}"}, f"dns://{NAME}:{port}?server=127.0.0.1:{zone.port}&every=0.3"],
        "#startup": [[f"=lua+{stage}"]],
        "=lua": {"%package": ["[0]lua"], f"=lua+{stage}": stage},
    }
    return ServerProcess(write_app(root / name, config, {stage: script}))


def test_servers_named_by_dns_are_linked_and_unlinked_as_the_records_change(tmp_path: Path, zone: Zone) -> None:
    port = free_port()
    names: list[str] = []

    def at(client: ServerProcess) -> list[str]:
        names[:] = [r[0] for r in client.logged("s", "at")]
        return names

    zone.set(["127.0.0.2"])
    with (
        server(tmp_path, zone, "127.0.0.2", port, "A", WHERE) as a,
        server(tmp_path, zone, "127.0.0.3", port, "B", ASKER) as b,
    ):
        b.wait_for(lambda: at(b).count("A") >= 3, 30, "replies from the server DNS names")
        with server(tmp_path, zone, "127.0.0.4", port, "C", WHERE) as c:
            c.wait_for(lambda: any("ready" in line for line in c.lines), 30, "the second server")
            zone.set(["127.0.0.2", "127.0.0.4"])  # a record added while the servers run
            added_at = len(at(b))
            b.wait_for(lambda: "C" in at(b)[added_at:], 30, "replies from the server just added to DNS")
            zone.set(["127.0.0.4"])  # a record removed: that server is not dialed any more
            b.wait_for(lambda: any("no longer in DNS" in line for line in b.lines), 30, "the removal seen")
            removed_at = len(at(b))
            b.wait_for(lambda: len(at(b)) > removed_at + 10 and names[-8:] == ["C"] * 8, 30, "only C routed to")
        # A's own address in DNS is never dialed as a peer
        assert not any("is this server itself" in line for line in a.lines)
        assert any(f"cluster address 127.0.0.4:{port} found in DNS" in line for line in b.lines)
