"""DICOM TLS: the ``ssl.SSLContext`` of the gateway's SCP and of its SCUs toward local nodes.

Two Secure Transport Connection Profiles of PS3.15 Annex B, both built on IETF BCP 195
(RFC 7525, now RFC 9325 and RFC 8996: no SSL, no TLS 1.0/1.1):

- ``bcp195-non-downgrading`` (PS3.15 B.10, the default): TLS 1.2 or 1.3 only; in TLS 1.2
  only the four AEAD suites BCP 195 recommends, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
  TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_DHE_RSA_WITH_AES_128_GCM_SHA256 and
  TLS_DHE_RSA_WITH_AES_256_GCM_SHA384 (forward secrecy, no CBC). DCMTK's ``+py``.
- ``bcp195`` (PS3.15 B.9): the same, plus TLS_RSA_WITH_AES_128_CBC_SHA as a fallback for
  peers that only know the older AES profile (B.3). DCMTK's ``+px``. (The optional
  3DES suite of that profile is left out: OpenSSL 3 disables it.)

TLS 1.3 suites are OpenSSL's (all AEAD); certificates are RSA for the suites above. The
port convention for DICOM over TLS is 2762 (PS3.15 B.1, IANA "dicom-tls"), 104 or 11112
being plain DICOM: a TLS port serves TLS only, so a plain association to it fails.

The SCP's context defers the handshake to the association's own thread (pynetdicom 3.0.4
wraps accepted sockets in its accept loop, where a client that never finishes the
handshake would hold up every other connection).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, Final

from dicombridge.config import DicomTlsProfile, GatewaySection, LocalNode
from dicombridge.errors import ConfigError

__all__ = [
    "DICOM_TLS_PORT",
    "PROFILE_CIPHERS",
    "TlsProfile",
    "client_context",
    "gateway_context",
    "node_tls_args",
    "server_context",
]

DICOM_TLS_PORT: Final = 2762
TlsProfile = DicomTlsProfile

# TLS 1.2 cipher suites by profile, in OpenSSL's names (RFC names in the docstring).
_BCP195_RECOMMENDED: Final = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
)
PROFILE_CIPHERS: Final[dict[str, tuple[str, ...]]] = {
    "bcp195-non-downgrading": _BCP195_RECOMMENDED,
    "bcp195": (*_BCP195_RECOMMENDED, "AES128-SHA"),
}


class _DeferredHandshakeContext(ssl.SSLContext):
    """An ``SSLContext`` whose server sockets do the handshake on their first read.

    pynetdicom's ``AssociationServer.get_request`` calls ``wrap_socket`` in the thread
    that accepts connections; with the default ``do_handshake_on_connect`` the handshake
    would run there too. OpenSSL performs a pending handshake inside the first
    ``SSL_read``, which happens in the association's thread; a plain (non-TLS) peer then
    fails there with an ``SSLError`` (an ``OSError``), which ends that connection only.
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if kwargs.get("server_side"):
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _apply_profile(context: ssl.SSLContext, profile: TlsProfile) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(":".join(PROFILE_CIPHERS[profile]))
    context.options |= ssl.OP_NO_COMPRESSION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path, field: str) -> None:
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            cert_file,
            field,
            f"certificate or key unusable: {exc.strerror or exc}",
            "give a PEM certificate (chain) and its unencrypted PEM private key",
        ) from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path, field: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            ca_file,
            field,
            f"CA certificates unusable: {exc.strerror or exc}",
            "give a PEM file of the CA certificate(s) to trust",
        ) from exc


def server_context(
    *,
    cert_file: Path,
    key_file: Path,
    ca_file: Path | None,
    require_client_cert: bool,
    profile: TlsProfile,
) -> ssl.SSLContext:
    """The SCP's context: our certificate; client certificates verified against
    ``ca_file`` (required, or checked when offered), none asked for without it."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_profile(context, profile)
    _load_chain(context, cert_file, key_file, "gateway.tls_cert_file")
    if ca_file is not None:
        _load_ca(context, ca_file, "gateway.tls_ca_file")
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ConfigError(
            "gateway.toml",
            "gateway.tls_ca_file",
            "client certificates are required but no CA is given to verify them",
            "name the CA file, or set tls_require_client_cert = false",
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    profile: TlsProfile,
) -> ssl.SSLContext:
    """An SCU's context: the peer's certificate and host name always verified, against
    ``ca_file`` or the system's trust store; our client certificate if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    _apply_profile(context, profile)
    if ca_file is not None:
        _load_ca(context, ca_file, "local_nodes.tls_ca_file")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        _load_chain(context, cert_file, key_file, "local_nodes.tls_cert_file")
    return context


def gateway_context(gateway: GatewaySection) -> ssl.SSLContext | None:
    """The SCP's context from ``[gateway]``, or None when its TLS is off."""
    if gateway.tls_cert_file is None or gateway.tls_key_file is None:
        return None
    return server_context(
        cert_file=gateway.tls_cert_file,
        key_file=gateway.tls_key_file,
        ca_file=gateway.tls_ca_file,
        require_client_cert=gateway.tls_require_client_cert,
        profile=gateway.tls_profile,
    )


def node_tls_args(node: LocalNode) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate`` toward ``node`` (context, name to verify), or
    None when the node is reached without TLS."""
    if not node.tls:
        return None
    context = client_context(
        ca_file=node.tls_ca_file,
        cert_file=node.tls_cert_file,
        key_file=node.tls_key_file,
        profile=node.tls_profile,
    )
    return context, node.tls_server_name or node.host
