"""broker over TLS (``tls://``, ``wss://``) with a test CA made here: real handshakes on loopback
(and what tcp and tls sockets share: a closing socket whose peer does not read)."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import socket
import ssl as stdlib_ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl, threads
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from stagetx.broker import sockets
from stagetx.broker import tls as tls_module
from stagetx.config import ConfigError, load_config
from tests.e2e.test_broker_websocket import WsClient
from tests.support import (
    InProcessServer,
    LogCapture,
    PacketClient,
    connect,
    free_port,
    iter_lines,
    packet,
    wait_for,
    write_app,
)

WAIT = 5.0


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class ScratchCA:
    """A certificate authority for one test: ``issue`` signs a server certificate for 127.0.0.1."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str = "localhost") -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``localhost`` and 127.0.0.1, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def write_tls_files(root: Path) -> tuple[ScratchCA, ScratchCA]:
    """tls/server.pem, tls/server.key (signed by the first CA), tls/ca.pem and tls/wrong-ca.pem."""
    good, wrong = ScratchCA("stagetx test CA"), ScratchCA("another CA")
    cert, key = good.issue()
    folder = root / "tls"
    folder.mkdir(exist_ok=True)
    (folder / "server.pem").write_bytes(cert)
    (folder / "server.key").write_bytes(key)
    (folder / "ca.pem").write_bytes(good.pem)
    (folder / "wrong-ca.pem").write_bytes(wrong.pem)
    return good, wrong


class TlsStage:
    """One Lua stage ``a`` running ``script`` with a ``#tls`` section (paths relative to the config)."""

    def __init__(self, root: Path, script: str, tls: dict[str, str]) -> None:
        config: dict[str, Any] = {
            "#tls": tls,
            "#startup": [["=lua+a"]],
            "=lua": {"%package": ["[0]lua"], "=lua+a": "a"},
        }
        self.server = InProcessServer(write_app(root, config, {"a": script}))
        self.log = LogCapture()

    def said(self, prefix: str) -> list[list[str]]:
        return [fields[1:] for fields in iter_lines(self.log, "stage.a") if fields[0] == prefix]

    async def __aenter__(self) -> TlsStage:
        self.log.__enter__()
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        self.log.__exit__()


def trusting(ca: ScratchCA) -> Any:
    """Client options trusting ``ca`` and offering ALPN as browsers do (h2, http/1.1)."""
    trust = ssl.Certificate.loadPEM(ca.pem)
    return ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust, acceptableProtocols=[b"h2", b"http/1.1"])


@pytest_twisted.ensureDeferred
async def test_tls_and_wss_serve_clients_that_trust_the_ca_and_joins_check_it(tmp_path: Path) -> None:
    good, wrong = write_tls_files(tmp_path)
    tport, wport = free_port(), free_port()
    script = f"""
        broker.ready("tls://127.0.0.1:{tport}?packet", function(socket)
            return function(s, data) return "tls:" .. data end
        end)
        broker.ready("wss://127.0.0.1:{wport}/play?json", function(socket)
            return function(s, doc) return {{echo = doc.say}} end
        end)
        broker.join("wss://127.0.0.1:{wport}/play?json", function(socket)
            socket.commit({{say = "over wss"}})
            return function(s, doc) log4cxx.info("joined", doc.echo); s.close() end
        end)
        broker.join("tls://127.0.0.1:{tport}?packet", function(socket)
            socket.commit("ping")
            return function(s, data) log4cxx.info("tls joined", data); s.close() end
        end)
    """
    tls = {"cert": "tls/server.pem", "key": "tls/server.key", "ca": "tls/ca.pem"}
    async with TlsStage(tmp_path, script, tls) as run:
        await wait_for(lambda: run.said("joined") == [["over wss"]], WAIT, "the wss join's echo")
        await wait_for(lambda: run.said("tls joined") == [["tls:ping"]], WAIT, "the tls join's echo")

        client = PacketClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", tport, trusting(good)), client)
        client.transport.write(packet(b"hello"))
        await wait_for(lambda: client.frames() == [b"tls:hello"], WAIT, "a TLS echo")

        browser = WsClient("/play")
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", wport, trusting(good)), browser)
        await wait_for(lambda: browser.opened, WAIT, "the wss handshake")
        browser.send(json.dumps({"say": "hi"}))
        await wait_for(lambda: browser.messages == ['{"echo":"hi"}'], WAIT, "a wss echo")

        doubter = PacketClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", tport, trusting(wrong)), doubter)
        doubter.transport.write(packet(b"hello"))
        await wait_for(lambda: doubter.closed, WAIT, "a client trusting another CA to give up")
        assert doubter.data == b""


@pytest_twisted.ensureDeferred
async def test_a_join_refuses_a_server_signed_by_another_ca(tmp_path: Path) -> None:
    write_tls_files(tmp_path)
    port, tport = free_port(), free_port()
    script = f"""
        broker.ready("wss://127.0.0.1:{port}/?json", function(socket) return function() end end)
        local j = broker.join("wss://127.0.0.1:{port}/?json", function() log4cxx.info("opened") end)
        j.close = function(s, reason) log4cxx.info("refused", s == j, reason) end
        broker.ready("tls://127.0.0.1:{tport}?packet", function(socket) log4cxx.info("reached") end)
        local t = broker.join("tls://127.0.0.1:{tport}?packet", function() log4cxx.info("opened") end)
        t.close = function(s, reason) log4cxx.info("refused", s == t, reason) end
    """
    tls = {"cert": "tls/server.pem", "key": "tls/server.key", "ca": "tls/wrong-ca.pem"}
    async with TlsStage(tmp_path, script, tls) as run:
        await wait_for(lambda: len(run.said("refused")) == 2, WAIT, "both joins to fail")
        # close(socket, errno) as the original: the join's own table, ECONNABORTED; the reason is logged
        assert run.said("refused") == [["true", str(errno.ECONNABORTED)]] * 2 and run.said("opened") == []
        assert "certificate verify failed" in run.log.text()
        assert run.said("reached") == []  # the tls listener never saw the failed handshake either


def test_a_missing_or_bad_certificate_is_a_configuration_error_naming_the_key(tmp_path: Path) -> None:
    write_tls_files(tmp_path)
    base = {"#startup": [["=lua+a"]], "=lua": {"%package": ["[0]lua"], "=lua+a": "a"}}
    cases = [
        ({"cert": "tls/missing.pem", "key": "tls/server.key"}, "#tls.cert: cannot read"),
        ({"cert": "tls/server.pem", "key": "tls/ca.pem"}, "#tls.key: "),
        ({"cert": "tls/server.pem"}, "#tls: cert and key go together"),
        ({"cert": "tls/server.pem", "key": "tls/server.key", "client": "x"}, "#tls.client: unknown key"),
    ]
    for tls, message in cases:
        path = write_app(tmp_path, {**base, "#tls": tls}, {"a": "x = 1"})
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_config(str(path))


@pytest_twisted.ensureDeferred
async def test_client_ca_requires_a_client_certificate_signed_by_it(tmp_path: Path) -> None:
    good, wrong = write_tls_files(tmp_path)
    port = free_port()
    script = f"""
        broker.ready("tls://127.0.0.1:{port}?packet", function(socket)
            log4cxx.info("accepted")
            return function(s, data) return "ok:" .. data end
        end)
        broker.join("tls://127.0.0.1:{port}?packet", function(socket)   -- presents #tls.cert
            socket.commit("me")
            return function(s, data) log4cxx.info("joined", data); s.close() end
        end)
    """
    tls = {"cert": "tls/server.pem", "key": "tls/server.key", "ca": "tls/ca.pem", "client_ca": "tls/ca.pem"}
    async with TlsStage(tmp_path, script, tls) as run:
        await wait_for(lambda: run.said("joined") == [["ok:me"]], WAIT, "the join with its own certificate")

        def with_certificate(ca: ScratchCA) -> Any:
            cert, key = ca.issue("player")
            mine = ssl.PrivateCertificate.loadPEM(cert + key)
            return ssl.optionsForClientTLS(
                "127.0.0.1", trustRoot=ssl.Certificate.loadPEM(good.pem), clientCertificate=mine
            )

        player = PacketClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, with_certificate(good)), player)
        player.transport.write(packet(b"hi"))
        await wait_for(lambda: player.frames() == [b"ok:hi"], WAIT, "a client with a certificate of the client CA")

        for options in (trusting(good), with_certificate(wrong)):  # no certificate; one of another CA
            stranger = PacketClient()
            await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), stranger)
            stranger.transport.write(packet(b"hi"))
            await wait_for(
                lambda s=stranger: s.closed, WAIT, "a client without an acceptable certificate to be refused"
            )
            assert stranger.data == b""
        assert len(run.said("accepted")) == 2  # the join and the player: refused handshakes never reach Lua
        player.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_client_that_stalls_in_its_tls_handshake_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_module, "HANDSHAKE_TIMEOUT", 0.3)
    good, _ = write_tls_files(tmp_path)
    port = free_port()
    script = f"""
        local l = broker.ready("tls://127.0.0.1:{port}?packet", function(socket)
            return function(s, data) return "tls:" .. data end
        end)
        l.expire = 60000  -- idle expiry covers handshaken sockets only
    """
    async with TlsStage(tmp_path, script, {"cert": "tls/server.pem", "key": "tls/server.key"}) as run:
        player = PacketClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, trusting(good)), player)
        silent, trickling = await connect(port), await connect(port)
        trickling.transport.write(b"\x16\x03\x01")  # the first bytes of a ClientHello, and no more
        await wait_for(lambda: silent.closed and trickling.closed, WAIT, "stalled handshakes to be dropped")
        assert "did not finish its TLS handshake within 0.3 s" in run.log.text()
        player.transport.write(packet(b"still here"))  # past the deadline: a done handshake is kept
        await wait_for(lambda: player.frames() == [b"tls:still here"], WAIT, "the handshaken client served")
        assert not player.closed
        player.transport.loseConnection()


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_a_closed_socket_whose_peer_does_not_read_is_dropped_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    monkeypatch.setattr(sockets, "CLOSE_LINGER", 0.5)
    good, _ = write_tls_files(tmp_path)
    port = free_port()
    script = f"""
        local l = broker.ready("{scheme}://127.0.0.1:{port}?packet=1k,1m", function()
            return function(s, data)   -- a goodbye too big for the kernel's buffers, then close
                local chunk = string.rep("x", 1000000)
                for i = 1, 12 do s.commit(chunk) end
                s.close()
            end
        end)
        l.close = function(s, errno) log4cxx.info("closed", errno) end
    """

    def stalled() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        if scheme == "tls":
            context = stdlib_ssl.create_default_context(cadata=good.pem.decode())
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        sock.sendall(packet(b"go"))
        return sock

    async with TlsStage(tmp_path, script, {"cert": "tls/server.pem", "key": "tls/server.key"}) as run:
        reader = PacketClient()
        if scheme == "tls":
            await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, trusting(good)), reader)
        else:
            reader = await connect(port)
        reader.send(b"go")
        await wait_for(
            lambda: reader.closed and run.said("closed"), 20, "a reading client to get its goodbye and the close"
        )
        assert len(reader.frames()) == 12 and run.said("closed") == [["0"]]

        sock = await threads.deferToThread(stalled)  # it never reads
        try:
            await wait_for(lambda: len(run.said("closed")) == 2, WAIT, "the client that does not read to be dropped")
        finally:
            sock.close()
        assert run.said("closed")[1] == [str(errno.ECONNABORTED)]
        assert "the peer took nothing of its last" in run.log.text()


class _Mute(Protocol):
    """A server that accepts TCP and never says a word (no TLS handshake)."""


@pytest_twisted.ensureDeferred
async def test_a_join_to_a_server_that_never_finishes_the_tls_handshake_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_module, "HANDSHAKE_TIMEOUT", 0.3)
    write_tls_files(tmp_path)
    mute = reactor.listenTCP(0, Factory.forProtocol(_Mute), interface="127.0.0.1")
    try:
        script = f"""
            local j = broker.join("tls://127.0.0.1:{mute.getHost().port}?packet", function() log4cxx.info("opened") end)
            j.close = function(s, errno) log4cxx.info("failed", s == j, errno) end
        """
        tls = {"cert": "tls/server.pem", "key": "tls/server.key", "ca": "tls/ca.pem"}
        async with TlsStage(tmp_path, script, tls) as run:
            await wait_for(lambda: run.said("failed"), WAIT, "the join to fail")
            assert run.said("failed") == [["true", str(errno.ECONNABORTED)]] and run.said("opened") == []
    finally:
        await mute.stopListening()
