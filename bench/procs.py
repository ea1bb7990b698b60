"""Child processes for benchmarks: started, read with a deadline, and always reaped.

Each peer writes one JSON object per line on stdout; :meth:`Peer.read_json` waits for the next
one with a timeout so that a stuck peer fails the benchmark instead of hanging the harness.
Stderr goes to a temporary file (a full pipe would stall a chatty child).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, …), from ``/proc``."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            children = [int(child) for child in file.read().split()]
    except OSError:
        return []
    return children + [grandchild for child in children for grandchild in descendants(child)]


class PeerError(RuntimeError):
    """A peer process failed, exited early or did not answer in time."""


def python_env() -> dict[str, str]:
    """The environment for Python peers: ours, with this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


class Peer:
    """One running child process with line-oriented stdout."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self._err: IO[bytes] = tempfile.TemporaryFile()
        self._buf = b""
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env if env is not None else python_env(),
            cwd=ROOT,
        )

    def read_line(self, timeout: float) -> bytes:
        """The next stdout line, or :class:`PeerError` after ``timeout`` seconds or at EOF."""
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise PeerError(f"no answer within {timeout:.0f} s from {self.argv[2:4]!r}")
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(5)
                    raise PeerError(f"{self.argv[2:4]!r} exited {self.proc.returncode}: {self.stderr_tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next stdout line that is a JSON object (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value

    def stderr_tail(self, limit: int = 800) -> str:
        """The last bytes the peer wrote on stderr (for error messages)."""
        self._err.seek(0, os.SEEK_END)
        size = self._err.tell()
        self._err.seek(max(0, size - limit))
        return self._err.read().decode("utf-8", "replace").strip()

    def reap(self, grace: float = 3.0) -> None:
        """Stop the process if it still runs and wait for it: no benchmark leaves a child behind."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


@contextmanager
def spawn(argv: Sequence[str], env: dict[str, str] | None = None) -> Iterator[Peer]:
    """Run ``argv`` as a :class:`Peer`; it is reaped when the block ends, however it ends."""
    peer = Peer(argv, env)
    try:
        yield peer
    finally:
        peer.reap()


def spawn_python(module: str, *args: object) -> Any:
    """:func:`spawn` for ``python -m module args…`` with this interpreter."""
    return spawn([sys.executable, "-m", module, *map(str, args)])
