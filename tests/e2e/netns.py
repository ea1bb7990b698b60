"""Three "hosts" on one LAN for end-to-end tests: network namespaces joined by a bridge.

``Lan`` makes a namespace holding a bridge and, per host, a namespace whose ``eth0`` is one end
of a veth pair, the other end on the bridge. Addresses are private (``SUBNET``) and exist inside
these namespaces only, so no packet of a test can leave through the machine's interfaces. Every
name carries ``i22`` and the test run's pid; ``close`` kills what still runs in the namespaces
(processes the tests started there) and deletes them, which deletes their links too.
"""

from __future__ import annotations

import os
import signal
import subprocess

SUBNET = "10.222.22"


def run(*command: str) -> str:
    """Run ``command``; its output, or ``RuntimeError`` with its error output."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable() -> str | None:
    """None when this process can make network namespaces, else why not (the tests skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"i22-probe-{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
    except (OSError, RuntimeError) as err:
        return f"cannot make a network namespace: {err}"
    run("ip", "netns", "del", probe)
    return None


class Lan:
    """``hosts`` namespaces on one bridge; host ``n`` (from 1) has address ``SUBNET.n``/24."""

    def __init__(self, hosts: int) -> None:
        tag = f"i22-{os.getpid()}"
        self.bridge_ns = f"{tag}-lan"
        self.names = [f"{tag}-h{n}" for n in range(1, hosts + 1)]
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self._add(self.bridge_ns)
        lan = ("ip", "netns", "exec", self.bridge_ns)
        run(*lan, "ip", "link", "add", "i22br", "type", "bridge", "mcast_snooping", "0")
        run(*lan, "ip", "link", "set", "i22br", "up")
        for n, name in enumerate(self.names, 1):
            self._add(name)
            run(*lan, "ip", "link", "add", self.port(n), "type", "veth", "peer", "name", "eth0", "netns", name)
            run(*lan, "ip", "link", "set", self.port(n), "master", "i22br", "up")
            run(*self.exec(n), "ip", "link", "set", "lo", "up")
            run(*self.exec(n), "ip", "addr", "add", f"{self.address(n)}/24", "dev", "eth0")
            run(*self.exec(n), "ip", "link", "set", "eth0", "up")

    def _add(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._made.append(name)

    @staticmethod
    def address(n: int) -> str:
        return f"{SUBNET}.{n}"

    @staticmethod
    def port(n: int) -> str:
        """The bridge-side end of host ``n``'s cable (in the bridge's namespace)."""
        return f"i22v{n}"

    def exec(self, n: int) -> tuple[str, ...]:
        """The command prefix that runs a command on host ``n``."""
        return ("ip", "netns", "exec", self.names[n - 1])

    def cable(self, n: int, up: bool) -> None:
        """Plug host ``n``'s cable in or pull it out (its bridge port up or down)."""
        run("ip", "netns", "exec", self.bridge_ns, "ip", "link", "set", self.port(n), "up" if up else "down")

    def crash(self, n: int) -> list[int]:
        """``kill -9`` of every process on host ``n`` (a machine losing power); their pids."""
        pids = [int(p) for p in run("ip", "netns", "pids", self.names[n - 1]).split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def close(self) -> None:
        for name in reversed(self._made):
            try:
                for pid in run("ip", "netns", "pids", name).split():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, RuntimeError):
                pass
            try:
                run("ip", "netns", "del", name)
            except (OSError, RuntimeError):
                pass
        self._made.clear()
