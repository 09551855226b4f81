"""Seal and open messages: signed-then-sealed documents and AEAD fragments.

The byte layout is written down in ``docs/wire.md``; this module is its only
implementation. Every message body starts with a 24-byte clear header::

    magic "DCBR" | version u8 | kind u8 | flags u16 (0) | transfer/message id (16 random bytes)

and then, by kind:

* ``MANIFEST`` and ``CONTROL``: the recipient's KEM key id (16 bytes), then one HPKE
  (RFC 9180, base mode, ML-KEM-768+X25519 / HKDF-SHA256 / AES-256-GCM) ciphertext of
  ``u32 length | canonical JSON document | Ed25519 signature (64)``. The HPKE ``info``
  binds the clear header and key id, so neither can be swapped.
* ``FRAGMENT``: ``index u32 | count u32``, then AES-256-GCM of the fragment under the
  transfer's content key, nonce = index (96-bit big-endian), associated data = the 32
  clear bytes (magic to count): an index cannot be relabelled nor a fragment moved to
  another transfer.

Everything that fails a check raises an ``EnvelopeError`` and returns no plaintext.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicombridge.directory import Directory, canonical_json
from dicombridge.errors import (
    EnvelopeError,
    IntegrityError,
    NotForUsError,
    UnsupportedVersionError,
)
from dicombridge.keys import (
    ED25519_SIGNATURE_BYTES,
    HPKE_SUITE,
    KEY_ID_BYTES,
    KemPublicKey,
    SiteKeys,
)

MAGIC: Final = b"DCBR"
PROTOCOL_VERSION: Final = 1
# A gateway reads the current version and the one before it (design: N and N-1).
READABLE_VERSIONS: Final = frozenset({PROTOCOL_VERSION})
ID_BYTES: Final = 16
CONTENT_KEY_BYTES: Final = 32
GCM_TAG_BYTES: Final = 16
NONCE_BYTES: Final = 12
DEFAULT_FRAGMENT_SIZE: Final = 1024 * 1024
MAX_FRAGMENT_SIZE: Final = 16 * 1024 * 1024
MAX_FRAGMENT_COUNT: Final = 2**32 - 1
# A sealed document (manifest, query, receipt) is small; refuse anything larger unread.
MAX_DOCUMENT_BYTES: Final = 1024 * 1024

_HEADER = struct.Struct(">4sBBH16s")
_FRAGMENT_TAIL = struct.Struct(">II")
HEADER_BYTES: Final = _HEADER.size
FRAGMENT_HEADER_BYTES: Final = HEADER_BYTES + _FRAGMENT_TAIL.size
SEALED_HEADER_BYTES: Final = HEADER_BYTES + KEY_ID_BYTES
_MANIFEST_INFO: Final = b"dicombridge/v1/sealed\0"
_SIGNATURE_CONTEXT: Final = b"dicombridge/v1/signed\0"


class Kind(enum.IntEnum):
    """Message kinds; the numbers are on the wire."""

    MANIFEST = 1
    FRAGMENT = 2
    CONTROL = 3


@dataclass(frozen=True)
class Header:
    """The clear part every message starts with."""

    version: int
    kind: Kind
    message_id: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, int(self.kind), 0, self.message_id)

    @property
    def id_hex(self) -> str:
        return self.message_id.hex()


def parse_header(body: bytes | memoryview) -> Header:
    """Read the clear header; refuse what is not ours or not a version we read."""
    if len(body) < HEADER_BYTES:
        raise EnvelopeError(f"message of {len(body)} bytes is shorter than a header")
    magic, version, kind, flags, message_id = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise EnvelopeError("not a dicombridge message (bad magic)")
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"protocol version {version} is not readable here (reads {sorted(READABLE_VERSIONS)})"
        )
    if flags != 0:
        raise EnvelopeError(f"unknown flags {flags:#06x}")
    try:
        return Header(version, Kind(kind), bytes(message_id))
    except ValueError as exc:
        raise EnvelopeError(f"unknown message kind {kind}") from exc


def new_id() -> bytes:
    """A fresh random transfer or message id: opaque, 128 bits."""
    return os.urandom(ID_BYTES)


# --- signed-then-sealed documents (manifests and control messages) -------------------


@dataclass(frozen=True)
class Sender:
    """Who seals: this site's id and private keys."""

    site_id: str
    keys: SiteKeys


@dataclass(frozen=True)
class OpenedDocument:
    """A document whose signature and seal verified."""

    header: Header
    document: dict[str, Any]
    sender_site: str
    sender_key_id: str


def seal_document(
    kind: Kind,
    message_id: bytes,
    document: dict[str, Any],
    *,
    sender: Sender,
    recipient_site: str,
    recipient_key: KemPublicKey,
) -> bytes:
    """Sign ``document`` with the sender's newest key, then seal it for ``recipient_key``.

    The sender, recipient and key ids are added to the document before signing, so the
    recipient can check who claims to have sent it and for whom.
    """
    if kind not in (Kind.MANIFEST, Kind.CONTROL):
        raise ValueError(f"{kind!r} is not a sealed document kind")
    signing_key = sender.keys.current_signing_key
    signed = {
        **document,
        "v": PROTOCOL_VERSION,
        "id": message_id.hex(),
        "kind": kind.name.lower(),
        "sender": {"site": sender.site_id, "signing_key_id": signing_key.key_id},
        "recipient": {"site": recipient_site, "kem_key_id": recipient_key.key_id},
    }
    payload = canonical_json(signed)
    signature = signing_key.sign(_SIGNATURE_CONTEXT + payload)
    plaintext = struct.pack(">I", len(payload)) + payload + signature
    clear = Header(PROTOCOL_VERSION, kind, message_id).pack() + bytes.fromhex(recipient_key.key_id)
    return clear + HPKE_SUITE.encrypt(
        plaintext, recipient_key.to_hpke(), info=_MANIFEST_INFO + clear
    )


def open_document(
    body: bytes,
    *,
    site_id: str,
    keys: SiteKeys,
    directory: Directory,
) -> OpenedDocument:
    """Open a sealed document addressed to ``site_id`` and verify the sender's signature.

    The signing key must be listed for the claimed sender in the directory, not revoked,
    and valid when the document says it was created.
    """
    header = parse_header(body)
    if header.kind not in (Kind.MANIFEST, Kind.CONTROL):
        raise EnvelopeError(f"expected a sealed document, got {header.kind.name}")
    if len(body) < SEALED_HEADER_BYTES:
        raise EnvelopeError("sealed document truncated before the key id")
    if len(body) > MAX_DOCUMENT_BYTES:
        raise EnvelopeError(f"sealed document of {len(body)} bytes exceeds {MAX_DOCUMENT_BYTES}")
    key_id = body[HEADER_BYTES:SEALED_HEADER_BYTES].hex()
    private_key = keys.kem_key(key_id)
    if private_key is None:
        raise NotForUsError(f"sealed for KEM key {key_id}, which this site does not hold")
    clear = body[:SEALED_HEADER_BYTES]
    try:
        plaintext = HPKE_SUITE.decrypt(
            body[SEALED_HEADER_BYTES:], private_key.to_hpke(), info=_MANIFEST_INFO + clear
        )
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError(f"sealed document {header.id_hex} does not open") from exc
    if len(plaintext) < 4 + ED25519_SIGNATURE_BYTES:
        raise IntegrityError("sealed document too short")
    (length,) = struct.unpack_from(">I", plaintext)
    if 4 + length + ED25519_SIGNATURE_BYTES != len(plaintext):
        raise IntegrityError("sealed document length does not add up")
    payload = plaintext[4 : 4 + length]
    signature = plaintext[4 + length :]
    # Parsed before the signature is checked (the signer is named inside): anyone holding
    # our public KEM key can seal any payload, so JSON nested too deep for the parser
    # (RecursionError) is refused like any other non-JSON, not leaked to the caller.
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError("sealed document is not JSON") from exc
    if not isinstance(document, dict):
        raise IntegrityError("sealed document is not a JSON object")
    sender_site, sender_key_id = _check_envelope_fields(document, header, site_id, key_id)
    entry = directory.site(sender_site)
    if entry is None:
        raise IntegrityError(f"sender site {sender_site!r} is not in the directory")
    public = entry.signing_public_key(sender_key_id)
    if public is None:
        raise IntegrityError(f"signing key {sender_key_id} is not listed for {sender_site!r}")
    if not public.verify(signature, _SIGNATURE_CONTEXT + payload):
        raise IntegrityError(f"signature of {header.id_hex} does not verify for {sender_site!r}")
    if public.validity.revoked:
        raise IntegrityError(f"signing key {sender_key_id} is revoked")
    created_at = _created_at(document)
    if not public.validity.valid_at(created_at):
        raise IntegrityError(f"signing key {sender_key_id} was not valid at {created_at}")
    return OpenedDocument(header, document, sender_site, sender_key_id)


def _check_envelope_fields(
    document: dict[str, Any], header: Header, site_id: str, key_id: str
) -> tuple[str, str]:
    if document.get("v") != header.version:
        raise IntegrityError("document version differs from the header's")
    if document.get("id") != header.id_hex:
        raise IntegrityError("document id differs from the header's")
    if document.get("kind") != header.kind.name.lower():
        raise IntegrityError("document kind differs from the header's")
    recipient = document.get("recipient")
    sender = document.get("sender")
    if not isinstance(recipient, dict) or not isinstance(sender, dict):
        raise IntegrityError("document lacks sender or recipient")
    if recipient.get("site") != site_id:
        raise NotForUsError(f"document is addressed to {recipient.get('site')!r}, not {site_id!r}")
    if recipient.get("kem_key_id") != key_id:
        raise IntegrityError("document names another KEM key than its header")
    sender_site = sender.get("site")
    sender_key_id = sender.get("signing_key_id")
    if not isinstance(sender_site, str) or not isinstance(sender_key_id, str):
        raise IntegrityError("document sender is malformed")
    return sender_site, sender_key_id


def _created_at(document: dict[str, Any]) -> datetime:
    try:
        created = datetime.fromisoformat(str(document["created_at"]))
    except (KeyError, ValueError) as exc:
        raise IntegrityError("document lacks a valid created_at") from exc
    if created.tzinfo is None:
        raise IntegrityError("document created_at has no time zone")
    return created


# --- transfer manifests --------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """The signed description of one transfer, as the recipient reads it."""

    transfer_id: bytes
    sender_site: str
    sender_key_id: str
    recipient_site: str
    created_at: datetime
    fragment_size: int
    fragment_count: int
    total_length: int
    sha256: bytes
    content_key: bytes
    meta: dict[str, Any]

    def to_document(self) -> dict[str, Any]:
        """The fields the sender signs (envelope fields are added by ``seal_document``)."""
        return {
            "created_at": self.created_at.isoformat(),
            "fragment_size": self.fragment_size,
            "fragment_count": self.fragment_count,
            "total_length": self.total_length,
            "sha256": self.sha256.hex(),
            "content_key": self.content_key.hex(),
            "meta": self.meta,
        }

    def fragment_length(self, index: int) -> int:
        """Plaintext length of fragment ``index``."""
        if index < self.fragment_count - 1:
            return self.fragment_size
        return self.total_length - self.fragment_size * (self.fragment_count - 1)


def fragment_count_for(total_length: int, fragment_size: int) -> int:
    """How many fragments a plaintext of ``total_length`` bytes becomes (0 for empty)."""
    return -(-total_length // fragment_size)


def _strict_int(value: object) -> int:
    """A JSON integer, nothing that merely converts to one (no bool, float or string)."""
    if type(value) is not int:
        raise TypeError("not an integer")
    return value


def manifest_from_document(opened: OpenedDocument) -> Manifest:
    """Check an opened manifest's fields for consistency and return them typed."""
    if opened.header.kind is not Kind.MANIFEST:
        raise EnvelopeError(f"expected a manifest, got {opened.header.kind.name}")
    doc = opened.document
    try:
        size = _strict_int(doc["fragment_size"])
        count = _strict_int(doc["fragment_count"])
        total = _strict_int(doc["total_length"])
        sha256 = bytes.fromhex(str(doc["sha256"]))
        content_key = bytes.fromhex(str(doc["content_key"]))
        meta = doc.get("meta", {})
    except (KeyError, ValueError, TypeError) as exc:
        raise IntegrityError("manifest field missing or malformed") from exc
    if not 1 <= size <= MAX_FRAGMENT_SIZE or total < 0:
        raise IntegrityError("manifest sizes out of range")
    if count != fragment_count_for(total, size) or count > MAX_FRAGMENT_COUNT:
        raise IntegrityError("manifest fragment count does not match its sizes")
    if len(sha256) != hashlib.sha256().digest_size or len(content_key) != CONTENT_KEY_BYTES:
        raise IntegrityError("manifest hash or key has the wrong length")
    if not isinstance(meta, dict):
        raise IntegrityError("manifest meta is not an object")
    return Manifest(
        transfer_id=opened.header.message_id,
        sender_site=opened.sender_site,
        sender_key_id=opened.sender_key_id,
        recipient_site=str(opened.document["recipient"]["site"]),
        created_at=_created_at(doc),
        fragment_size=size,
        fragment_count=count,
        total_length=total,
        sha256=sha256,
        content_key=content_key,
        meta=meta,
    )


# --- fragments -----------------------------------------------------------------------


def fragment_header(transfer_id: bytes, index: int, count: int) -> bytes:
    """The 32 clear bytes of a fragment, also its associated data."""
    header = Header(PROTOCOL_VERSION, Kind.FRAGMENT, transfer_id).pack()
    return header + _FRAGMENT_TAIL.pack(index, count)


def _nonce(index: int) -> bytes:
    return index.to_bytes(NONCE_BYTES, "big")


def seal_fragment(aead: AESGCM, transfer_id: bytes, index: int, count: int, data: bytes) -> bytes:
    """One fragment message: clear header, then AES-256-GCM of ``data``."""
    clear = fragment_header(transfer_id, index, count)
    return clear + aead.encrypt(_nonce(index), data, clear)


@dataclass(frozen=True)
class FragmentHeader:
    """What the clear part of a fragment says (before it is authenticated)."""

    transfer_id: bytes
    index: int
    count: int


def parse_fragment(body: bytes | memoryview) -> FragmentHeader:
    """Read a fragment's clear header; refuse impossible index/count pairs."""
    header = parse_header(body)
    if header.kind is not Kind.FRAGMENT:
        raise EnvelopeError(f"expected a fragment, got {header.kind.name}")
    if len(body) < FRAGMENT_HEADER_BYTES + GCM_TAG_BYTES:
        raise EnvelopeError("fragment truncated")
    index, count = _FRAGMENT_TAIL.unpack_from(body, HEADER_BYTES)
    if index >= count:
        raise EnvelopeError(f"fragment index {index} is not below its count {count}")
    return FragmentHeader(header.message_id, index, count)


def open_fragment(aead: AESGCM, manifest: Manifest, body: bytes) -> tuple[int, bytes]:
    """Authenticate and decrypt one fragment of ``manifest``'s transfer."""
    fragment = parse_fragment(body)
    if fragment.transfer_id != manifest.transfer_id:
        raise IntegrityError("fragment belongs to another transfer")
    if fragment.count != manifest.fragment_count:
        raise IntegrityError("fragment count differs from the manifest's")
    clear = bytes(body[:FRAGMENT_HEADER_BYTES])
    try:
        data = aead.decrypt(_nonce(fragment.index), body[FRAGMENT_HEADER_BYTES:], clear)
    except InvalidTag as exc:
        raise IntegrityError(f"fragment {fragment.index} fails authentication") from exc
    if len(data) != manifest.fragment_length(fragment.index):
        raise IntegrityError(f"fragment {fragment.index} has the wrong length")
    return fragment.index, data


def sealed_fragment_bytes(plaintext_length: int) -> int:
    """Size of the fragment message that carries ``plaintext_length`` bytes."""
    return FRAGMENT_HEADER_BYTES + plaintext_length + GCM_TAG_BYTES


def control_age(created_at: datetime, now: datetime | None = None) -> timedelta:
    """How old a control message is (clock skew can make it negative)."""
    return (now or datetime.now(UTC)) - created_at
