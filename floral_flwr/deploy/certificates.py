"""Certificates: the paths of a CA, the SuperLink's certificate and key and SuperNode key pairs
(``Certs``), throw-away ones for trying TLS and SuperNode authentication (``make_certs``), and the
client-side TLS context for the SuperLink's health endpoint."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from floral_flwr.deploy.settings import DeployError


@dataclass
class Certs:
    """Paths of a CA, the SuperLink's certificate and key, and SuperNode key pairs."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, i: int) -> Path:
        return self.root / f"supernode-{i}"

    def node_pub(self, i: int) -> Path:
        return self.root / f"supernode-{i}.pub"

    def check(self) -> None:
        for p in (self.ca, self.server_cert, self.server_key):
            if not p.is_file():
                raise DeployError(f"--certs '{self.root}': missing {p.name} (create them with `deploy certs`)")


def make_certs(out: str | Path, num_nodes: int = 2, hosts: Iterable[str] = (), days: int = 30) -> Certs:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost (+ ``hosts``) signed by it,
    and ``num_nodes`` ECDSA P-384 SuperNode key pairs (OpenSSH format). For trying TLS and
    SuperNode authentication; use your organisation's PKI in production."""
    certs = Certs(Path(out))
    certs.root.mkdir(parents=True, exist_ok=True)
    openssl, keygen = shutil.which("openssl"), shutil.which("ssh-keygen")
    if not openssl or not keygen:
        raise DeployError("`deploy certs` needs openssl and ssh-keygen on PATH")
    r = certs.root
    san_dns, san_ip = {"localhost"}, {"127.0.0.1"}
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            san_ip.add(h)
        except ValueError:
            san_dns.add(h)
    san = ",".join([f"DNS:{d}" for d in sorted(san_dns)] + [f"IP:{i}" for i in sorted(san_ip)])

    def sh(*cmd: str) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise DeployError(f"{cmd[0]} failed: {p.stderr.strip()[-400:]}")

    sh(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
       "-keyout", str(r / "ca.key"), "-out", str(certs.ca), "-subj", "/CN=floral-flwr throw-away CA")
    sh(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs.server_key),
       "-out", str(r / "server.csr"), "-subj", "/CN=floral-superlink")
    (r / "server.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    sh(openssl, "x509", "-req", "-in", str(r / "server.csr"), "-CA", str(certs.ca), "-CAkey", str(r / "ca.key"),
       "-CAcreateserial", "-out", str(certs.server_cert), "-days", str(days), "-sha256",
       "-extfile", str(r / "server.ext"))
    for i in range(num_nodes):
        key = certs.node_key(i)
        for p in (key, certs.node_pub(i)):
            p.unlink(missing_ok=True)
        sh(keygen, "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", f"supernode-{i}", "-f", str(key))
    for p in r.iterdir():
        if p.name.endswith(".key") or (p.name.startswith("supernode-") and not p.name.endswith(".pub")):
            p.chmod(0o600)
    return certs


def _ssl_context(ca: Path | None) -> ssl.SSLContext | None:
    if ca is None:
        return None
    return ssl.create_default_context(cafile=str(ca))
