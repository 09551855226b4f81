"""Test helpers for DICOM TLS: a throwaway PKI made with ``cryptography`` (a CA, a server
certificate for 127.0.0.1/localhost, client certificates), DCMTK's TLS options, and the
TOML that turns TLS on for a gateway's SCP or a local node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.tlskit import Issued, TestCa


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


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA with a server and a client certificate, and a rogue client
    certificate from a CA nobody trusts, under ``directory`` (RSA keys: the BCP 195 TLS
    1.2 suites, and DCMTK's profiles, are ECDHE_RSA / DHE_RSA)."""
    ca = TestCa.create(directory, "hospital-ca", key_type="rsa")
    rogue = TestCa.create(directory, "rogue-ca", key_type="rsa")
    return Pki(
        ca=ca.ca_file,
        server=_pair(ca.server("dicom-server")),
        client=_pair(ca.client("dicom-client", "dicom-client")),
        rogue=_pair(rogue.client("rogue-client", "rogue-client")),
    )


def _pair(issued: Issued) -> KeyPair:
    return KeyPair(issued.cert_file, issued.key_file)


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
