"""Test PKI made with ``cryptography``: a CA, a server certificate for loopback and client
certificates, written as PEM files (keys unencrypted, mode 0600)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _new_key(like: str) -> PrivateKey:
    """EC P-256, or RSA 2048 where a TLS 1.2 profile needs RSA (BCP 195's ECDHE_RSA)."""
    if like == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Issued:
    """A certificate and its key as PEM files."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class TestCa:
    """A self-signed CA in ``root`` that issues server and client certificates."""

    root: Path
    name: str
    key: PrivateKey
    cert: x509.Certificate

    __test__ = False  # not a pytest class despite the name

    @property
    def ca_file(self) -> Path:
        return self.root / f"{self.name}.pem"

    @classmethod
    def create(cls, root: Path, name: str = "test-ca", *, key_type: str = "ec") -> TestCa:
        """A fresh CA (``key_type`` "ec": P-256, or "rsa": 2048 bits; what it issues gets
        the same kind of key), its certificate written to ``root/<name>.pem``."""
        root.mkdir(parents=True, exist_ok=True)
        key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dicombridge {name}")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(root=root, name=name, key=key, cert=cert)
        ca.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def server(self, name: str = "server") -> Issued:
        """A server certificate for ``localhost`` and 127.0.0.1 (and ::1)."""
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        return self._issue(name, "localhost", names, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, common_name: str, name: str | None = None) -> Issued:
        """A client certificate whose CN is ``common_name`` (RabbitMQ's x509 user name)."""
        return self._issue(
            name or f"client-{common_name}".replace("@", "-"),
            common_name,
            [],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )

    def _issue(
        self,
        name: str,
        common_name: str,
        names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> Issued:
        key = _new_key("rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ec")
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.root / f"{name}.pem", self.root / f"{name}.key")
        issued.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(issued.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return issued
