"""TLS on the links between servers (``#cluster`` ``"tls"``): real ``twistd`` servers on loopback
with certificates of a cluster CA that the test makes; a certificate of another CA, or no TLS
at all, is refused."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.cluster_scripts import ASKER, WHERE
from tests.support import ServerProcess, free_port, write_app


class Authority:
    """A CA of the test; ``issue`` writes a server's certificate and key signed by it."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = root / f"{name}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject if hasattr(self, "cert") else subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, name: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = self._builder(subject, key.public_key()).sign(self.key, hashes.SHA256())
        cert_path, key_path = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path


def server(root: Path, name: str, script: str, port: int, ca: Authority | None, *peers: str) -> ServerProcess:
    stage = "w" if script == WHERE else "s"
    listen: dict[str, Any] = {"listen": f"127.0.0.1:{port}"}
    if ca is not None:
        cert, key = ca.issue(name)
        listen["tls"] = {"ca": str(ca.path), "cert": str(cert), "key": str(key)}
    config = {
        "name": name,
        "#secret": "tls-cluster-secret",
        "#cluster": [listen, *peers],
        "#startup": [[f"=lua+{stage}"]],
        "=lua": {"%package": ["[0]lua"], f"=lua+{stage}": stage},
    }
    return ServerProcess(write_app(root / name, config, {stage: script}))


def refused_on(client: ServerProcess) -> None:
    """``client`` is linked to nobody: its sends keep being refused, none answered."""
    client.wait_for(lambda: len(client.logged("s", "refused")) >= 10, 30, "refused sends")
    assert client.logged("s", "at") == []


def test_servers_of_one_cluster_ca_talk_over_tls_and_others_are_refused(tmp_path: Path) -> None:
    cluster, other = Authority(tmp_path, "cluster-ca"), Authority(tmp_path, "other-ca")
    port_w, port_s, port_x, port_p = free_port(), free_port(), free_port(), free_port()
    target = f"127.0.0.1:{port_w}"
    with (
        server(tmp_path, "W", WHERE, port_w, cluster) as w,
        server(tmp_path, "S", ASKER, port_s, cluster, target) as s,
        server(tmp_path, "X", ASKER, port_x, other, target) as stranger,
        server(tmp_path, "P", ASKER, port_p, None, target) as plain,
    ):
        s.wait_for(lambda: len(s.logged("s", "at")) >= 3, 30, "replies over TLS")
        for server_ in (stranger, plain):
            refused_on(server_)
        w.wait_for(lambda: any("unknown ca" in line for line in w.lines), 30, "the stranger's refusal in a log")
        w.wait_for(lambda: any("wrong version number" in line for line in w.lines), 30, "plain TCP refused")
        # the cluster port speaks TLS and asks for a certificate: a client without one gets none of the link
        context = ssl.create_default_context(cafile=str(cluster.path))
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", port_w), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                assert tls.version() is not None
                try:
                    received = tls.recv(100)  # the server refuses a peer without a certificate
                except (ssl.SSLError, ConnectionError):
                    received = b""
        assert b"STGX" not in received
