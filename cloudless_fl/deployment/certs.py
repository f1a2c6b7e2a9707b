"""Throwaway TLS certificates and SuperNode keys for a local federation (`cloudless-fl launch`).

A self-signed CA and a server certificate for 127.0.0.1/localhost, signed by it:
what Flower's `--ssl-*` (SuperLink) and `--root-certificates` (SuperNode, flwr)
expect. One key pair per region in OpenSSH format on a NIST curve: what
`flwr supernode register` and `flower-supernode --auth-supernode-private-key`
expect. For real deployments use your own CA and keys (docs/deployment.md).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_certificates(folder: Path, days: int = 2) -> None:
    """Write `ca.crt`, `server.pem` and `server.key` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("cloudless-fl launch CA")).issuer_name(_name("cloudless-fl launch CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    _write_private(folder / "server.key",
                   key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """Write the key pair `<name>` (private, 0600) and `<name>.pub` into `folder`, unless they exist;
    returns (private, public). The public key is what the SuperLink registers for the node."""
    private, public = folder / name, folder / f"{name}.pub"
    if not private.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
    return private, public


def _write_private(path: Path, secret: bytes) -> None:
    path.touch(mode=0o600)  # readable by its owner only, before it holds the key
    path.chmod(0o600)
    path.write_bytes(secret)
