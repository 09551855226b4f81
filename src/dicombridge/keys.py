"""Key pairs of a site: HPKE (ML-KEM-768 + X25519) for receiving, Ed25519 for signing.

The hybrid HPKE key types of ``cryptography`` do not serialise, so a KEM private key
is stored as its two halves: the 64-byte ML-KEM-768 seed (FIPS 203 ``d || z``) and the
32-byte X25519 private key. A key id is the first 16 bytes of SHA-256 over a domain
label and the key's public encoding, written as 32 hex digits: stable, short enough to
travel in clear, and saying nothing about the site that owns it.

Private key files are JSON of mode 0600 in a directory of mode 0700; nothing here logs
key material.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from dicombridge.durable import write_durably
from dicombridge.errors import KeyMaterialError

KEM_KIND: Final = "mlkem768-x25519"
SIGNING_KIND: Final = "ed25519"
MLKEM768_PUBLIC_BYTES: Final = 1184
MLKEM768_SEED_BYTES: Final = 64
X25519_BYTES: Final = 32
ED25519_PUBLIC_BYTES: Final = 32
ED25519_SIGNATURE_BYTES: Final = 64
KEY_ID_BYTES: Final = 16

# RFC 9180 suite used for every sealed message: hybrid post-quantum KEM, SHA-256, AES-256-GCM.
HPKE_SUITE: Final = hpke.Suite(
    hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
)


def b64encode(data: bytes) -> str:
    """Standard base64 text, as every key and signature is written in JSON."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, what: str, length: int | None = None) -> bytes:
    """Decode base64 strictly; a wrong length or alphabet is a KeyMaterialError naming ``what``."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise KeyMaterialError(f"{what}: not valid base64") from exc
    if length is not None and len(data) != length:
        raise KeyMaterialError(f"{what}: {len(data)} bytes, expected {length}")
    return data


def key_id_for(kind: str, public_encoding: bytes) -> str:
    """The key id: SHA-256 over ``dicombridge-key-v1/<kind>/`` and the public encoding."""
    digest = hashlib.sha256(b"dicombridge-key-v1/" + kind.encode() + b"/" + public_encoding)
    return digest.digest()[:KEY_ID_BYTES].hex()


def utc_now() -> datetime:
    """The current time in UTC, to the second (timestamps are compared, never formatted twice)."""
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Validity:
    """When a key may be used: from ``not_before``, until ``not_after`` (open if None)."""

    not_before: datetime
    not_after: datetime | None = None
    revoked: bool = False

    def valid_at(self, when: datetime) -> bool:
        if self.revoked or when < self.not_before:
            return False
        return self.not_after is None or when < self.not_after


@dataclass(frozen=True)
class KemPublicKey:
    """A site's public key for receiving sealed messages."""

    mlkem768: bytes
    x25519: bytes
    validity: Validity = field(default_factory=lambda: Validity(not_before=utc_now()))

    def __post_init__(self) -> None:
        if len(self.mlkem768) != MLKEM768_PUBLIC_BYTES or len(self.x25519) != X25519_BYTES:
            raise KeyMaterialError("KEM public key: wrong length")

    @property
    def encoding(self) -> bytes:
        return self.mlkem768 + self.x25519

    @property
    def key_id(self) -> str:
        return key_id_for(KEM_KIND, self.encoding)

    def to_hpke(self) -> hpke.MLKEM768X25519PublicKey:
        try:
            return _hpke_public_key(self.mlkem768, self.x25519)
        except ValueError as exc:
            raise KeyMaterialError(f"KEM public key {self.key_id}: not a valid key") from exc


@functools.lru_cache(maxsize=64)
def _hpke_public_key(mlkem768: bytes, x25519_raw: bytes) -> hpke.MLKEM768X25519PublicKey:
    """The HPKE key object of a KEM public key; decoded once per key (ML-KEM's public key
    decoding costs as much as a seal), not once per message."""
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(mlkem768),
        x25519.X25519PublicKey.from_public_bytes(x25519_raw),
    )


@dataclass(frozen=True)
class SigningPublicKey:
    """A site's (or the operator's) Ed25519 public key."""

    ed25519: bytes
    validity: Validity = field(default_factory=lambda: Validity(not_before=utc_now()))

    def __post_init__(self) -> None:
        if len(self.ed25519) != ED25519_PUBLIC_BYTES:
            raise KeyMaterialError("signing public key: wrong length")

    @property
    def key_id(self) -> str:
        return key_id_for(SIGNING_KIND, self.ed25519)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature over ``data``."""
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.ed25519).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


class KemPrivateKey:
    """An HPKE private key: the ML-KEM-768 seed and the X25519 private key."""

    __slots__ = ("_hpke", "_mlkem_seed", "_x25519", "created_at", "public")

    def __init__(self, mlkem_seed: bytes, x25519_private: bytes, *, created_at: datetime) -> None:
        if len(mlkem_seed) != MLKEM768_SEED_BYTES or len(x25519_private) != X25519_BYTES:
            raise KeyMaterialError("KEM private key: wrong length")
        mlkem_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed)
        x25519_key = x25519.X25519PrivateKey.from_private_bytes(x25519_private)
        self._mlkem_seed = mlkem_seed
        self._x25519 = x25519_private
        self._hpke = hpke.MLKEM768X25519PrivateKey(mlkem_key, x25519_key)
        self.created_at = created_at
        self.public = KemPublicKey(
            mlkem768=mlkem_key.public_key().public_bytes_raw(),
            x25519=x25519_key.public_key().public_bytes_raw(),
            validity=Validity(not_before=created_at),
        )

    @classmethod
    def generate(cls) -> KemPrivateKey:
        seed = mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
        x_raw = x25519.X25519PrivateKey.generate().private_bytes_raw()
        return cls(seed, x_raw, created_at=utc_now())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def to_hpke(self) -> hpke.MLKEM768X25519PrivateKey:
        return self._hpke

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KEM_KIND,
            "key_id": self.key_id,
            "created_at": self.created_at.isoformat(),
            "mlkem768_seed": b64encode(self._mlkem_seed),
            "x25519": b64encode(self._x25519),
        }

    def __repr__(self) -> str:  # never show key material
        return f"KemPrivateKey(key_id={self.key_id!r})"


class SigningPrivateKey:
    """An Ed25519 signing key."""

    __slots__ = ("_key", "_raw", "created_at", "public")

    def __init__(self, raw: bytes, *, created_at: datetime) -> None:
        if len(raw) != ED25519_PUBLIC_BYTES:
            raise KeyMaterialError("signing private key: wrong length")
        self._raw = raw
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
        self.created_at = created_at
        self.public = SigningPublicKey(
            self._key.public_key().public_bytes_raw(), Validity(not_before=created_at)
        )

    @classmethod
    def generate(cls) -> SigningPrivateKey:
        return cls(ed25519.Ed25519PrivateKey.generate().private_bytes_raw(), created_at=utc_now())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": SIGNING_KIND,
            "key_id": self.key_id,
            "created_at": self.created_at.isoformat(),
            "ed25519": b64encode(self._raw),
        }

    def __repr__(self) -> str:  # never show key material
        return f"SigningPrivateKey(key_id={self.key_id!r})"


def write_private(path: Path, document: dict[str, Any]) -> None:
    """Write a private key file with mode 0600 from the first byte (never world-readable)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_durably(path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o600)


def _read_private(path: Path) -> dict[str, Any]:
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise KeyMaterialError(f"{path}: cannot read key file ({exc.strerror})") from exc
    if mode & 0o077:
        raise KeyMaterialError(
            f"{path}: private key readable by others (mode {mode:o}). Fix: chmod 600 {path}"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KeyMaterialError(f"{path}: not a readable key file") from exc
    if not isinstance(document, dict):
        raise KeyMaterialError(f"{path}: not a key file (expected a JSON object)")
    return document


def _created_at(document: dict[str, Any], path: Path) -> datetime:
    try:
        created_at = datetime.fromisoformat(str(document["created_at"]))
    except (KeyError, ValueError) as exc:
        raise KeyMaterialError(f"{path}: created_at missing or not an ISO 8601 time") from exc
    if created_at.tzinfo is None:
        # It becomes the key's not_before, compared with time-zoned message times.
        raise KeyMaterialError(f"{path}: created_at has no time zone")
    return created_at


@dataclass
class SiteKeys:
    """All private keys a site holds: several of each kind while keys rotate."""

    kem_keys: list[KemPrivateKey]
    signing_keys: list[SigningPrivateKey]

    @classmethod
    def generate(cls) -> SiteKeys:
        return cls([KemPrivateKey.generate()], [SigningPrivateKey.generate()])

    @property
    def current_signing_key(self) -> SigningPrivateKey:
        """The newest signing key: senders sign with it."""
        return max(self.signing_keys, key=lambda k: k.created_at)

    def kem_key(self, key_id: str) -> KemPrivateKey | None:
        return next((k for k in self.kem_keys if k.key_id == key_id), None)

    def save(self, keys_dir: Path) -> None:
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(keys_dir, 0o700)
        for kem_key in self.kem_keys:
            write_private(keys_dir / f"kem-{kem_key.key_id}.key", kem_key.to_json())
        for sig_key in self.signing_keys:
            write_private(keys_dir / f"sign-{sig_key.key_id}.key", sig_key.to_json())

    @classmethod
    def load(cls, keys_dir: Path) -> SiteKeys:
        if not keys_dir.is_dir():
            raise KeyMaterialError(
                f"{keys_dir}: no key directory. Fix: run `dicombridge init` for this site"
            )
        kem_keys = [load_kem_key(p) for p in sorted(keys_dir.glob("kem-*.key"))]
        signing_keys = [load_signing_key(p) for p in sorted(keys_dir.glob("sign-*.key"))]
        if not kem_keys or not signing_keys:
            raise KeyMaterialError(
                f"{keys_dir}: needs at least one kem-*.key and one sign-*.key. "
                "Fix: restore the keys from backup or run `dicombridge init`"
            )
        return cls(kem_keys, signing_keys)


def load_kem_key(path: Path) -> KemPrivateKey:
    document = _read_private(path)
    if document.get("kind") != KEM_KIND:
        raise KeyMaterialError(f"{path}: kind is not {KEM_KIND!r}")
    key = KemPrivateKey(
        b64decode(
            str(document.get("mlkem768_seed", "")),
            what=f"{path}: mlkem768_seed",
            length=MLKEM768_SEED_BYTES,
        ),
        b64decode(str(document.get("x25519", "")), what=f"{path}: x25519", length=X25519_BYTES),
        created_at=_created_at(document, path),
    )
    _check_key_id(path, document, key.key_id)
    return key


def load_signing_key(path: Path) -> SigningPrivateKey:
    document = _read_private(path)
    if document.get("kind") != SIGNING_KIND:
        raise KeyMaterialError(f"{path}: kind is not {SIGNING_KIND!r}")
    key = SigningPrivateKey(
        b64decode(
            str(document.get("ed25519", "")), what=f"{path}: ed25519", length=ED25519_PUBLIC_BYTES
        ),
        created_at=_created_at(document, path),
    )
    _check_key_id(path, document, key.key_id)
    return key


def _check_key_id(path: Path, document: dict[str, Any], actual: str) -> None:
    if document.get("key_id") != actual:
        raise KeyMaterialError(
            f"{path}: key_id does not match the key it holds. Fix: restore the file from backup"
        )


def newest_valid(keys: Iterable[KemPublicKey], when: datetime) -> KemPublicKey | None:
    """The KEM key a sender should seal to: the newest one valid at ``when``."""
    valid = [k for k in keys if k.validity.valid_at(when)]
    return max(valid, key=lambda k: k.validity.not_before, default=None)
