"""Real ``redis-server`` / ``redis-sentinel`` processes on free loopback ports, for the tests of the
index stage's Redis backend. Each has its own temporary directory and never saves to disk
unless asked; ``stop`` (or ``kill``) ends it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_SENTINEL = shutil.which("redis-sentinel")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (.ci/run installs it)")
needs_sentinel = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_SENTINEL is None, reason="redis-server/redis-sentinel not installed (.ci/run)"
)
START_TIMEOUT = 20.0


def command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """Send one inline command to the server on ``port``; its raw reply (first read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall((" ".join(args) + "\r\n").encode())
        return conn.recv(65536)


class RedisServer:
    """``redis-server`` (or ``redis-sentinel`` with ``sentinel=True``) on a free loopback port."""

    def __init__(
        self,
        directory: Path,
        *extra: str,
        sentinel: bool = False,
        port: int | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.port = free_port() if port is None else port  # a given port: the same server restarted
        self.directory = directory / f"redis-{self.port}"
        self.directory.mkdir(parents=True, exist_ok=True)
        program = REDIS_SENTINEL if sentinel else REDIS_SERVER
        assert program is not None
        conf = self.directory / "redis.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.directory}", "save ''", "appendonly no"]
        if sentinel:
            lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.directory}"]
        self.tls = tls
        if tls is not None:  # (certificate, key, certificate authority): TLS only, on self.port
            cert, key, ca = tls
            lines[0] = "port 0"
            lines += [f"tls-port {self.port}", f"tls-cert-file {cert}", f"tls-key-file {key}"]
            lines += [f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        lines += extra
        conf.write_text("\n".join(lines) + "\n")
        self.log = open(self.directory / "out.log", "wb")
        self.process = subprocess.Popen([program, str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis exited: {(self.directory / 'out.log').read_text()[-2000:]}")
            try:
                if self._ping().startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis on port {self.port} not ready in {START_TIMEOUT} s")
            time.sleep(0.05)

    def _ping(self) -> bytes:
        if self.tls is None:
            return command(self.port, "PING", timeout=1.0)
        context = ssl.create_default_context(cafile=str(self.tls[2]))
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL: the crash of a primary."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
