"""The signed federation directory: every site's id, broker user and public keys.

The federation operator edits a draft, signs it with the operator's Ed25519 key and
distributes ``directory.json``. A gateway pins the operator's public key in its config
and refuses a directory whose signature does not verify, or whose version is older
than (or, at the same version, different from) the last one it accepted. The version
only grows: ``sign`` always writes one more than any version signed before.

The signature covers the canonical JSON (sorted keys, no white space, UTF-8) of the
``directory`` member exactly as stored, so verification does not depend on how any
library re-serialises it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicombridge.durable import write_durably
from dicombridge.errors import (
    DirectoryError,
    DirectoryRollbackError,
    DirectorySignatureError,
    KeyMaterialError,
)
from dicombridge.keys import (
    ED25519_PUBLIC_BYTES,
    ED25519_SIGNATURE_BYTES,
    KEM_KIND,
    MLKEM768_PUBLIC_BYTES,
    SIGNING_KIND,
    X25519_BYTES,
    KemPublicKey,
    SigningPrivateKey,
    SigningPublicKey,
    Validity,
    b64decode,
    b64encode,
    key_id_for,
    utc_now,
)
from dicombridge.topology import check_site_id

DIRECTORY_FORMAT: Final = "dicombridge-directory/1"
# A site id is a lowercase slug; the rule lives with the broker names it becomes part of.
SiteId = Annotated[str, AfterValidator(check_site_id)]


def canonical_json(value: Any) -> bytes:
    """The bytes that get signed: sorted keys, no white space, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PublicKeyEntry(_Model):
    """One public key of a site, with its validity."""

    kind: Literal["mlkem768-x25519", "ed25519"]
    key_id: str
    public: str
    # Aware times only: a naive one could not be compared with a message's created_at.
    not_before: AwareDatetime
    not_after: AwareDatetime | None = None
    revoked: bool = False

    @model_validator(mode="after")
    def _key_id_matches(self) -> PublicKeyEntry:
        length = (
            MLKEM768_PUBLIC_BYTES + X25519_BYTES if self.kind == KEM_KIND else ED25519_PUBLIC_BYTES
        )
        try:
            raw = b64decode(self.public, what="public", length=length)
        except KeyMaterialError as exc:
            raise ValueError(str(exc)) from exc
        if key_id_for(self.kind, raw) != self.key_id:
            raise ValueError("key_id does not match the public key")
        return self

    @property
    def validity(self) -> Validity:
        return Validity(self.not_before, self.not_after, self.revoked)

    def kem_public_key(self) -> KemPublicKey:
        raw = b64decode(self.public, what="public")
        return KemPublicKey(raw[:MLKEM768_PUBLIC_BYTES], raw[MLKEM768_PUBLIC_BYTES:], self.validity)

    def signing_public_key(self) -> SigningPublicKey:
        return SigningPublicKey(b64decode(self.public, what="public"), self.validity)


class SiteEntry(_Model):
    """A site as the directory knows it; also what ``dicombridge keys export`` prints."""

    id: SiteId
    broker_user: str = Field(min_length=1, max_length=64)
    kem_keys: list[PublicKeyEntry] = Field(min_length=1)
    signing_keys: list[PublicKeyEntry] = Field(min_length=1)

    @field_validator("kem_keys")
    @classmethod
    def _kem_kind(cls, keys: list[PublicKeyEntry]) -> list[PublicKeyEntry]:
        if any(k.kind != KEM_KIND for k in keys):
            raise ValueError(f"every kem key must be of kind {KEM_KIND!r}")
        return keys

    @field_validator("signing_keys")
    @classmethod
    def _signing_kind(cls, keys: list[PublicKeyEntry]) -> list[PublicKeyEntry]:
        if any(k.kind != SIGNING_KIND for k in keys):
            raise ValueError(f"every signing key must be of kind {SIGNING_KIND!r}")
        return keys

    def kem_public_keys(self) -> list[KemPublicKey]:
        return [k.kem_public_key() for k in self.kem_keys]

    def signing_public_key(self, key_id: str) -> SigningPublicKey | None:
        entry = next((k for k in self.signing_keys if k.key_id == key_id), None)
        return entry.signing_public_key() if entry else None

    def kem_public_key(self, key_id: str) -> KemPublicKey | None:
        entry = next((k for k in self.kem_keys if k.key_id == key_id), None)
        return entry.kem_public_key() if entry else None


def public_entry(kind: str, raw: bytes, validity: Validity) -> PublicKeyEntry:
    """The directory entry for one public key."""
    return PublicKeyEntry(
        kind=kind,  # type: ignore[arg-type]  # one of the two literal kinds
        key_id=key_id_for(kind, raw),
        public=b64encode(raw),
        not_before=validity.not_before,
        not_after=validity.not_after,
        revoked=validity.revoked,
    )


class DirectoryBody(_Model):
    """What the operator signs."""

    format: Literal["dicombridge-directory/1"] = DIRECTORY_FORMAT
    federation: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=0)
    issued_at: AwareDatetime
    sites: list[SiteEntry] = Field(default_factory=list)

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[SiteEntry]) -> list[SiteEntry]:
        # A field validator, so that the error names ``sites`` rather than the whole body.
        for what, values in (
            ("site id", [s.id for s in sites]),
            ("broker_user", [s.broker_user for s in sites]),
        ):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{what} {twice[0]!r} appears twice")
        return sites

    def site(self, site_id: str) -> SiteEntry | None:
        return next((s for s in self.sites if s.id == site_id), None)

    def site_for_broker_user(self, broker_user: str) -> SiteEntry | None:
        return next((s for s in self.sites if s.broker_user == broker_user), None)

    def with_site(self, entry: SiteEntry) -> DirectoryBody:
        """A copy with ``entry`` added, or replacing the site of the same id."""
        others = [s for s in self.sites if s.id != entry.id]
        return self.model_copy(update={"sites": sorted([*others, entry], key=lambda s: s.id)})

    def without_site(self, site_id: str) -> DirectoryBody:
        return self.model_copy(update={"sites": [s for s in self.sites if s.id != site_id]})


class Directory:
    """A directory whose signature has been verified (or that was just signed)."""

    def __init__(self, body: DirectoryBody, *, digest: str) -> None:
        self.body = body
        self.digest = digest

    @property
    def version(self) -> int:
        return self.body.version

    def site(self, site_id: str) -> SiteEntry | None:
        return self.body.site(site_id)

    def site_for_broker_user(self, broker_user: str) -> SiteEntry | None:
        return self.body.site_for_broker_user(broker_user)

    @property
    def sites(self) -> Sequence[SiteEntry]:
        return self.body.sites


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(document)"


def parse_body(raw: object, *, path: Path, prefix: str = "") -> DirectoryBody:
    """Validate a directory body; errors name the file and the first bad field."""
    try:
        return DirectoryBody.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DirectoryError(
            path,
            prefix + _field_path(first["loc"]),
            first["msg"],
            "regenerate the directory with `dicombridge directory sign` (do not edit it by hand)",
        ) from exc


def sign(body: DirectoryBody, operator_key: SigningPrivateKey) -> dict[str, Any]:
    """The signed document for ``body``: what gets written to ``directory.json``."""
    raw = body.model_dump(mode="json")
    signature = operator_key.sign(b"dicombridge-directory-v1\0" + canonical_json(raw))
    return {
        "directory": raw,
        "signature": {"key_id": operator_key.key_id, "ed25519": b64encode(signature)},
    }


def verify_document(document: object, operator_key: SigningPublicKey, *, path: Path) -> Directory:
    """Check a signed document against the operator's key and return the directory."""
    fix_corrupt = "fetch the directory again from the federation operator"
    if not isinstance(document, dict):
        raise DirectoryError(path, "(document)", "not a JSON object", fix_corrupt)
    unknown = set(document) - {"directory", "signature"}
    if unknown:
        raise DirectoryError(path, sorted(unknown)[0], "unknown member", fix_corrupt)
    raw = document.get("directory")
    signature = document.get("signature")
    if not isinstance(raw, dict):
        raise DirectoryError(path, "directory", "missing or not an object", fix_corrupt)
    if not isinstance(signature, dict):
        raise DirectoryError(path, "signature", "missing or not an object", fix_corrupt)
    if signature.get("key_id") != operator_key.key_id:
        raise DirectorySignatureError(
            path,
            "signature.key_id",
            f"signed by key {signature.get('key_id')!r}, not by the pinned operator key "
            f"{operator_key.key_id!r}",
            "check [directory] operator_key in the gateway config, or ask the operator "
            "for a directory signed with the current key",
        )
    try:
        sig = b64decode(
            str(signature.get("ed25519", "")),
            what="signature",
            length=ED25519_SIGNATURE_BYTES,
        )
    except KeyMaterialError as exc:
        # A signature that cannot even be decoded does not verify either.
        raise DirectorySignatureError(path, "signature.ed25519", str(exc), fix_corrupt) from exc
    canonical = canonical_json(raw)
    if not operator_key.verify(sig, b"dicombridge-directory-v1\0" + canonical):
        raise DirectorySignatureError(
            path,
            "signature.ed25519",
            "the signature does not verify: the file was altered or not signed by the operator",
            fix_corrupt,
        )
    body = parse_body(raw, path=path, prefix="directory.")
    return Directory(body, digest=hashlib.sha256(canonical).hexdigest())


def read_json(path: Path) -> object:
    """Read a JSON file; a missing or malformed file names itself and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DirectoryError(path, "(file)", "does not exist", "check the path") from exc
    except OSError as exc:
        raise DirectoryError(
            path, "(file)", f"cannot be read ({exc.strerror})", "check its permissions"
        ) from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DirectoryError(
            path, f"line {getattr(exc, 'lineno', '?')}", "not valid JSON", "fetch the file again"
        ) from exc


class AcceptedVersion(_Model):
    """The newest directory a gateway accepted: kept to refuse rollbacks."""

    version: int
    digest: str


def load(path: Path, operator_key: SigningPublicKey, *, state_path: Path | None) -> Directory:
    """Load and verify ``path``; refuse it if older than the version recorded in ``state_path``.

    On success the state file is updated to this version (atomically), so that a later
    attempt to load an older directory fails even across restarts.
    """
    directory = verify_document(read_json(path), operator_key, path=path)
    if state_path is None:
        return directory
    accepted = _read_accepted(state_path)
    if accepted is not None:
        if directory.version < accepted.version:
            raise DirectoryRollbackError(
                path,
                "directory.version",
                f"version {directory.version} is older than version {accepted.version} "
                "already accepted",
                "install the newest directory from the federation operator",
            )
        if directory.version == accepted.version and directory.digest != accepted.digest:
            raise DirectoryRollbackError(
                path,
                "directory.version",
                f"version {directory.version} differs from the version {accepted.version} "
                "already accepted",
                "the operator must sign changes with a new version (`dicombridge directory sign`)",
            )
    if accepted is None or directory.version > accepted.version:
        _write_accepted(
            state_path, AcceptedVersion(version=directory.version, digest=directory.digest)
        )
    return directory


def _read_accepted(state_path: Path) -> AcceptedVersion | None:
    try:
        return AcceptedVersion.model_validate_json(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        raise DirectoryError(
            state_path,
            "(file)",
            "the record of the accepted directory version is unreadable",
            "restore it from backup; deleting it disables rollback protection until the "
            "next directory is loaded",
        ) from exc


def _write_accepted(state_path: Path, accepted: AcceptedVersion) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(state_path, accepted.model_dump_json().encode())


def new_body(federation: str) -> DirectoryBody:
    """An empty, unsigned directory (version 0) for ``dicombridge operator init``."""
    return DirectoryBody(federation=federation, version=0, issued_at=utc_now())


def next_version(draft: DirectoryBody, last_signed: Directory | None) -> DirectoryBody:
    """The draft with a version greater than any signed before, issued now."""
    floor = max(draft.version, last_signed.version if last_signed else 0)
    return draft.model_copy(update={"version": floor + 1, "issued_at": utc_now()})
