"""Test helpers for DICOM TLS: a throwaway PKI made with ``cryptography`` (a CA, a server
certificate for 127.0.0.1/localhost, client certificates), DCMTK's TLS options, and the
TOML that turns TLS on for a gateway's SCP or a local node."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# RSA: the BCP 195 TLS 1.2 suites (and DCMTK's profiles) are ECDHE_RSA / DHE_RSA.
_KEY_BITS = 2048


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its unencrypted PEM private key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate,
    all issued by ``ca``; ``rogue`` is a client certificate from another CA."""

    ca: Path
    server: KeyPair
    client: KeyPair
    rogue: KeyPair


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _ca(directory: Path, name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _issue(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
    *,
    server: bool,
) -> KeyPair:
    ca_cert, ca_key = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA with a server and a client certificate, and a rogue client
    certificate from a CA nobody trusts, under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path = _ca(directory, "hospital-ca")
    rogue_cert, rogue_key, _ = _ca(directory, "rogue-ca")
    return Pki(
        ca=ca_path,
        server=_issue(directory, "dicom-server", (ca_cert, ca_key), server=True),
        client=_issue(directory, "dicom-client", (ca_cert, ca_key), server=False),
        rogue=_issue(directory, "rogue-client", (rogue_cert, rogue_key), server=False),
    )


def dcmtk_tls_args(pair: KeyPair, ca: Path, *profile: str) -> list[str]:
    """DCMTK's options for TLS with ``pair`` as our certificate and ``ca`` trusted (the
    peer's certificate is required by default, ``-rc``); ``profile`` e.g. ``+px``."""
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(ca), *profile]


def scp_tls_toml(pki: Pki, *, profile: str = "bcp195-non-downgrading") -> str:
    """Keys for ``[gateway]``: TLS only, client certificates required from ``pki.ca``."""
    return (
        f'tls_cert_file = "{pki.server.cert}"\n'
        f'tls_key_file = "{pki.server.key}"\n'
        f'tls_ca_file = "{pki.ca}"\n'
        f'tls_profile = "{profile}"\n'
    )


def node_tls_toml(pki: Pki) -> str:
    """Keys for a ``[[local_nodes]]`` entry: TLS, the node verified against ``pki.ca``,
    the gateway presenting ``pki.client``."""
    return (
        "tls = true\n"
        f'tls_ca_file = "{pki.ca}"\n'
        f'tls_cert_file = "{pki.client.cert}"\n'
        f'tls_key_file = "{pki.client.key}"\n'
    )


def enable_scp_tls(config_path: Path, pki: Pki) -> None:
    """Turn on TLS for the gateway's SCP in ``config_path`` (keys added to ``[gateway]``)."""
    text = config_path.read_text(encoding="utf-8")
    anchor = "\nreload_check_s = "
    if text.count(anchor) != 1:
        raise AssertionError(f"{config_path}: no single [gateway] reload_check_s line")
    at = text.index("\n", text.index(anchor) + 1) + 1
    config_path.write_text(text[:at] + scp_tls_toml(pki) + text[at:], encoding="utf-8")


def enable_node_tls(config_path: Path, node_name: str, pki: Pki) -> None:
    """Turn on TLS toward the local node ``node_name`` in ``config_path``."""
    text = config_path.read_text(encoding="utf-8")
    anchor = f'\n[[local_nodes]]\nname = "{node_name}"\n'
    if text.count(anchor) != 1:
        raise AssertionError(f"{config_path}: no single local node {node_name!r}")
    at = text.index(anchor) + len(anchor)
    config_path.write_text(text[:at] + node_tls_toml(pki) + text[at:], encoding="utf-8")
