"""broker over WebSocket and TLS, each against a raw server on the same library in the same run.

- echo: 1,000 WebSocket clients (autobahn, ``python -m bench.workloads.broker_websocket client``)
  echo 100-byte text messages through a ``ws://`` listener whose Lua receive function returns each
  one, against a raw autobahn echo server (``raw-echo``, no Lua, no broker);
- memory per idle WebSocket connection: the stage process's RSS growth over 1,000 connections
  that finished their handshake and say nothing (``hold``);
- TLS handshakes/s on a ``tls://`` listener against a raw Twisted TLS server (``raw-tls``) with
  the same certificate: 16 client loops each connect, finish the handshake and disconnect.

The certificate is made here (``cryptography``), in a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, reactor, ssl
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from bench import budget
from bench.baselines.peers import ClientRun, emit, listen, stop
from bench.procs import spawn_python
from bench.rows import row
from bench.workloads.server import bench_line, server

ME = "bench.workloads.broker_websocket"
ECHO = "broker echo via Lua over WebSocket, 1,000 connections"
RAW_ECHO = "raw autobahn WebSocket echo, 1,000 connections"
IDLE = "broker memory per idle WebSocket connection"
TLS = "broker tls:// handshakes/s"
RAW_TLS = "raw Twisted TLS handshakes/s"
CONNS = 1000
TLS_LOOPS = 16

SCRIPT = """
broker.ready("ws://127.0.0.1:%(ws)d/?text=64k,64k", function(socket, addr)
    return function(s, data) return data end
end)
broker.ready("tls://127.0.0.1:%(tls)d?packet", function(socket, addr)
    return function(s, data) return data end
end)
log4cxx.info("BENCH ready", process.id)
"""


class RawEcho(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class EchoClient(WebSocketClientProtocol):
    """One request in flight: sends, waits for the echo, sends again (``ClientRun`` counts)."""

    run: ClientRun

    def onOpen(self) -> None:
        self.sent = 0.0
        self.run.connected(self)  # type: ignore[arg-type]

    def start(self) -> None:
        self.send()

    def send(self) -> None:
        if self.run.claim():
            self.sent = time.perf_counter()
            self.sendMessage(self.run.payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.run.replied(time.perf_counter() - self.sent)
        self.send()


class Idle(WebSocketClientProtocol):
    held: dict[str, int]

    def onOpen(self) -> None:
        self.held["connected"] += 1
        if self.held["connected"] == self.held["conns"]:
            emit(connected=self.held["connected"])


@implementer(IHandshakeListener)
class Handshaker(protocol.Protocol):
    """Counts a finished TLS handshake, disconnects, and makes its loop connect again."""

    def __init__(self, loop: TlsLoop) -> None:
        self.loop = loop

    def handshakeCompleted(self) -> None:
        self.loop.done += 1
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.loop.again()


class TlsLoop:
    def __init__(self, port: int, context: Any, deadline: float, totals: dict[str, Any]) -> None:
        self.port, self.context, self.deadline, self.totals = port, context, deadline, totals
        self.done = 0
        self.factory = protocol.ClientFactory.forProtocol(lambda: Handshaker(self))
        self.factory.clientConnectionFailed = lambda connector, reason: self.again()  # type: ignore[method-assign]

    def again(self) -> None:
        if time.perf_counter() < self.deadline:
            reactor.connectSSL("127.0.0.1", self.port, self.factory, self.context)
            return
        self.totals["loops"] -= 1
        self.totals["handshakes"] += self.done
        if self.totals["loops"] == 0:
            emit(handshakes=self.totals["handshakes"], seconds=time.perf_counter() - self.totals["start"])
            stop()


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in ``folder``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _rate(result: dict[str, Any], key: str = "replies") -> float | None:
    done, seconds = result.get(key, 0), result.get("seconds", 0.0)
    return done / seconds if seconds > 0 and done > 1 else None


def _raw_runs(
    cert: Path, key: Path, count: int, conns: int, limit: float, tls_seconds: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw autobahn echo and the raw Twisted TLS server, each with the same client as the broker."""
    with spawn_python(ME, "raw-echo", "--limit", limit + 90) as raw:
        raw_port = raw.read_json(30)["port"]
        with spawn_python(ME, "client", "--port", raw_port, "--count", count, "--conns", conns) as client:
            echo = client.read_json(limit + 60)
    with spawn_python(ME, "raw-tls", "--cert", cert, "--key", key, "--limit", tls_seconds + 60) as raw:
        raw_port = raw.read_json(30)["port"]
        with spawn_python(ME, "tls-client", "--port", raw_port, "--seconds", tls_seconds) as client:
            tls = client.read_json(tls_seconds + 60)
    return echo, tls


def run(quick: bool) -> list[dict[str, Any]]:
    # quick: each echo run (raw, broker) is about 20 requests per connection, and each TLS run a
    # second, so the whole entry stays under 20 s on a busy machine
    limit = budget.seconds(20, 6)
    count = budget.count(200_000, 20_000)
    conns = min(CONNS, max(2, count // 4))
    tls_seconds = budget.seconds(5, 1)
    with tempfile.TemporaryDirectory(prefix="stagetx-bench-tls-") as tmp:
        cert, key = make_certificate(Path(tmp))
        raw_echo, raw_tls = _raw_runs(cert, key, count, conns, limit, tls_seconds)
        ws_port, tls_port = _free_port(), _free_port()
        config = {
            "#tls": {"cert": str(cert), "key": str(key)},
            "#startup": [["=lua+echo"]],
            "=lua+echo": {"%package": ["[0]"], "=lua+echo": "echo"},
        }
        with server(config, {"echo": SCRIPT % {"ws": ws_port, "tls": tls_port}}) as srv:
            (pid,) = bench_line(srv, "ready", 30)
            before = _rss(int(pid))
            with spawn_python(ME, "hold", "--port", ws_port, "--conns", conns, "--limit", limit + 30) as holder:
                holder.read_json(limit + 30)
                time.sleep(0.5)  # let the server finish building the sockets
                per_conn = (_rss(int(pid)) - before) / conns
            with spawn_python(ME, "client", "--port", ws_port, "--count", count, "--conns", conns) as client:
                echo = client.read_json(limit + 60)
            with spawn_python(ME, "tls-client", "--port", tls_port, "--seconds", tls_seconds) as client:
                tls = client.read_json(tls_seconds + 60)
        # the raw servers again after the broker's turn: the better of each pair is the baseline, so
        # load from other work on a shared machine during one turn does not flatter the ratio (a
        # quick run measures them once: it is for a quick look, not for the table)
        if not budget.quick():
            again_echo, again_tls = _raw_runs(cert, key, count, conns, limit, tls_seconds)
            raw_echo = max(raw_echo, again_echo, key=lambda r: _rate(r) or 0.0)
            raw_tls = max(raw_tls, again_tls, key=lambda r: _rate(r, "handshakes") or 0.0)
    note = "" if conns == CONNS else f"{conns} connections (scaled run)"
    target = "≥ 0.5 × baseline" if conns == CONNS else ""
    raw_rate, raw_tls_rate = _rate(raw_echo), _rate(raw_tls, "handshakes")
    return [
        row(RAW_ECHO, raw_rate, "req/s", status="info", note=note),
        row(ECHO, _rate(echo), "req/s", baseline_name=RAW_ECHO, baseline=raw_rate, target=target, note=note),
        row(f"{ECHO} p50", echo.get("p50_us"), "µs"),
        row(f"{ECHO} p99", echo.get("p99_us"), "µs"),
        row(IDLE, max(per_conn, 0.0), "B", target="≤ 16384", note=note),
        row(RAW_TLS, raw_tls_rate, "/s", status="info", note=f"{TLS_LOOPS} client loops"),
        row(TLS, _rate(tls, "handshakes"), "/s", baseline_name=RAW_TLS, baseline=raw_tls_rate),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=ME)
    p.add_argument("role", choices=["raw-echo", "client", "hold", "raw-tls", "tls-client"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--conns", type=int, default=CONNS)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--limit", type=float, default=60.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--cert", default="")
    p.add_argument("--key", default="")
    a = p.parse_args(argv)
    url = f"ws://127.0.0.1:{a.port}/"
    if a.role == "raw-echo":
        echo_factory = WebSocketServerFactory()
        echo_factory.protocol = RawEcho
        listen(echo_factory)
        reactor.callLater(a.limit, stop)
    elif a.role == "raw-tls":
        pem = Path(a.cert).read_bytes() + b"\n" + Path(a.key).read_bytes()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(protocol.Protocol), options, interface="127.0.0.1")
        emit(port=port.getHost().port)
        reactor.callLater(a.limit, stop)
    elif a.role == "tls-client":
        context = ssl.CertificateOptions(verify=False)  # handshake cost, not trust, is measured
        totals: dict[str, Any] = {"loops": TLS_LOOPS, "handshakes": 0, "start": time.perf_counter()}
        deadline = time.perf_counter() + a.seconds
        for _ in range(TLS_LOOPS):
            TlsLoop(a.port, context, deadline, totals).again()
        reactor.callLater(a.seconds + 30, stop)
    else:
        factory = WebSocketClientFactory(url)
        if a.role == "client":
            client_run = ClientRun(a.count, a.conns, a.size)
            EchoClient.run = client_run
            factory.protocol = EchoClient
            reactor.callLater(a.limit, client_run.report)
        else:
            Idle.held = {"connected": 0, "conns": a.conns}
            factory.protocol = Idle
            reactor.callLater(a.limit, stop)
        for _ in range(a.conns):
            reactor.connectTCP("127.0.0.1", a.port, factory)
    reactor.run()


if __name__ == "__main__":
    main()
