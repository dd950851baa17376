"""Certificate authorities and certificates made on the fly, in QEMU's tls-creds-x509 directory layout.

Each test makes its own CA with the ``cryptography`` package (ECDSA P-256 keys: fast to make, and what
GnuTLS in QEMU and libnbd accepts), so nothing is shared between tests and nothing expires in the tree.
A server directory holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``; a client directory
holds ``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem`` (QEMU's ``endpoint=client`` and libnbd's
``tls-certificates=`` read the same names). Certificates carry the key usages and extended key usages
that QEMU checks when it loads them.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - scripts/setup installs python3-cryptography
    x509 = None  # type: ignore[assignment]

_ATTR = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
         "C": NameOID.COUNTRY_NAME, "L": NameOID.LOCALITY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME} \
    if x509 is not None else {}


def need_cryptography() -> None:
    from tests.peers import missing

    if x509 is None:
        missing("python3-cryptography")


def name(dn: str) -> x509.Name:
    """``"CN=client,O=Example,C=GB"`` (RFC 4514 order, most specific first) as an x509 Name."""
    parts = [p.split("=", 1) for p in dn.split(",")]
    # RFC 4514 strings list the last RDN of the certificate first
    return x509.Name([x509.NameAttribute(_ATTR[k.strip()], v.strip()) for k, v in reversed(parts)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, dn: str = "CN=nbdsrv test CA,O=nbdsrv tests") -> CA:
        need_cryptography()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name(dn)).issuer_name(name(dn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, dn: str, *, server: bool, expired: bool = False,
              hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[ec.EllipticCurvePrivateKey,
                                                                              x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = ((now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired
                      else (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)))
        b = (x509.CertificateBuilder().subject_name(name(dn)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                          key_encipherment=True, data_encipherment=False, key_agreement=False,
                                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                                          decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, b.sign(self.key, hashes.SHA256())

    def server_dir(self, path: Path, *, dn: str = "CN=localhost,O=nbdsrv tests",
                   expired: bool = False) -> Path:
        """QEMU's server layout: ca-cert.pem, server-cert.pem, server-key.pem."""
        path.mkdir(parents=True, exist_ok=True)
        key, cert = self.issue(dn, server=True, expired=expired)
        _write_cert(path / "ca-cert.pem", self.cert)
        _write_cert(path / "server-cert.pem", cert)
        _write_key(path / "server-key.pem", key)
        return path

    def client_dir(self, path: Path, dn: str | None = "CN=client.example.com,O=Example,C=GB", *,
                   expired: bool = False, trust: CA | None = None) -> Path:
        """QEMU's (and libnbd's) client layout; ``dn`` None makes a directory with the CA alone (no client
        certificate); ``trust`` puts another CA in ca-cert.pem (a client that trusts the wrong CA)."""
        path.mkdir(parents=True, exist_ok=True)
        _write_cert(path / "ca-cert.pem", (trust or self).cert)
        if dn is not None:
            key, cert = self.issue(dn, server=False, expired=expired)
            _write_cert(path / "client-cert.pem", cert)
            _write_key(path / "client-key.pem", key)
        return path


@pytest.fixture
def ca() -> CA:
    return CA.make()
