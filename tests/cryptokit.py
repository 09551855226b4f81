"""Shared helpers for the crypto unit tests: site keys, a signed directory, crafted messages.

A *federation* here is three sites (hosp-a, hosp-b, hosp-c) with fresh keys and a
directory signed by a fresh operator key. The wire constants below are copied from
``docs/wire.md`` on purpose, not imported from ``envelope.py``: a message this module
crafts from the document must open with the implementation, so the two cannot drift
apart unnoticed.

Nothing here imports pytest or pydicom at module level: ``tests/test_memory.py`` runs
this module in a child process whose memory it measures.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from dicombridge import directory as fed
from dicombridge.envelope import Sender
from dicombridge.errors import EnvelopeError
from dicombridge.fragments import Recipient, SealedTransfer, seal_file
from dicombridge.keys import (
    HPKE_SUITE,
    KEM_KIND,
    SIGNING_KIND,
    KemPublicKey,
    SigningPrivateKey,
    SiteKeys,
    Validity,
    b64encode,
    newest_valid,
    utc_now,
)
from dicombridge.spool import Spool

SITES: Final = ("hosp-a", "hosp-b", "hosp-c")
FEDERATION: Final = "test-federation"

# From docs/wire.md (protocol version 1).
MAGIC: Final = b"DCBR"
VERSION: Final = 1
KIND_MANIFEST: Final = 1
KIND_FRAGMENT: Final = 2
KIND_CONTROL: Final = 3
MAGIC_AT: Final = 0
VERSION_AT: Final = 4
KIND_AT: Final = 5
FLAGS_AT: Final = 6
ID_AT: Final = 8
KEY_ID_AT: Final = 24  # sealed documents
INDEX_AT: Final = 24  # fragments
COUNT_AT: Final = 28  # fragments
HEADER_BYTES: Final = 24
SEALED_HEADER_BYTES: Final = 40
FRAGMENT_HEADER_BYTES: Final = 32
HPKE_ENC_BYTES: Final = 1120
TAG_BYTES: Final = 16
SIGNED_CONTEXT: Final = b"dicombridge/v1/signed\0"
SEALED_INFO: Final = b"dicombridge/v1/sealed\0"
# From directory.py's sign(): what the operator's signature covers.
DIRECTORY_CONTEXT: Final = b"dicombridge-directory-v1\0"

LONG_AGO: Final = datetime(2000, 1, 1, tzinfo=UTC)


# --- keys and the directory ------------------------------------------------------------


def site_entry(
    site_id: str,
    keys: SiteKeys,
    *,
    broker_user: str | None = None,
    signing_validity: Validity | None = None,
    kem_validity: Validity | None = None,
) -> fed.SiteEntry:
    """The directory entry of ``site_id``; validities default to the keys' own."""
    return fed.SiteEntry(
        id=site_id,
        broker_user=broker_user or f"user-{site_id}",
        kem_keys=[
            fed.public_entry(KEM_KIND, k.public.encoding, kem_validity or k.public.validity)
            for k in keys.kem_keys
        ],
        signing_keys=[
            fed.public_entry(SIGNING_KIND, k.public.ed25519, signing_validity or k.public.validity)
            for k in keys.signing_keys
        ],
    )


def directory_body(
    keys: Mapping[str, SiteKeys],
    *,
    version: int = 1,
    signing_validity: Mapping[str, Validity] | None = None,
) -> fed.DirectoryBody:
    """An unsigned directory listing every site in ``keys``."""
    body = fed.new_body(FEDERATION).model_copy(update={"version": version})
    for site_id, site_keys in keys.items():
        validity = (signing_validity or {}).get(site_id)
        body = body.with_site(site_entry(site_id, site_keys, signing_validity=validity))
    return body


def verified(body: fed.DirectoryBody, operator: SigningPrivateKey) -> fed.Directory:
    """Sign ``body`` and verify it, as a gateway would after reading the file."""
    return fed.verify_document(fed.sign(body, operator), operator.public, path=Path("dir.json"))


def sign_raw(raw: Any, operator: SigningPrivateKey) -> dict[str, Any]:
    """A correctly signed document around any ``directory`` value, even an invalid one."""
    signature = operator.sign(DIRECTORY_CONTEXT + fed.canonical_json(raw))
    return {
        "directory": raw,
        "signature": {"key_id": operator.key_id, "ed25519": b64encode(signature)},
    }


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


@dataclass
class Federation:
    """Three sites' private keys and the directory that lists them, verified."""

    operator: SigningPrivateKey
    keys: dict[str, SiteKeys]
    directory: fed.Directory

    def sender(self, site_id: str) -> Sender:
        return Sender(site_id, self.keys[site_id])

    def kem_key(self, site_id: str) -> KemPublicKey:
        """The key a sender seals to for ``site_id``: the newest valid one in the directory."""
        entry = self.directory.site(site_id)
        assert entry is not None
        key = newest_valid(entry.kem_public_keys(), utc_now())
        assert key is not None
        return key

    def recipient(self, site_id: str) -> Recipient:
        return Recipient(site_id, self.kem_key(site_id))

    def seal(
        self,
        source: Path,
        outbox: Path,
        *,
        sender: str = "hosp-a",
        recipient: str = "hosp-b",
        fragment_size: int = 1024,
        meta: dict[str, Any] | None = None,
        state: bytes = b"{}",
    ) -> SealedTransfer:
        return seal_file(
            source,
            outbox,
            sender=self.sender(sender),
            recipient=self.recipient(recipient),
            fragment_size=fragment_size,
            meta=meta,
            state=state,
        )

    def with_directory(self, body: fed.DirectoryBody) -> Federation:
        """The same keys under another directory (say, one that revokes a key)."""
        return Federation(self.operator, self.keys, verified(body, self.operator))


def make_federation(*, signing_validity: Mapping[str, Validity] | None = None) -> Federation:
    """hosp-a, hosp-b and hosp-c with fresh keys, in a directory signed by a fresh operator."""
    operator = SigningPrivateKey.generate()
    keys = {site_id: SiteKeys.generate() for site_id in SITES}
    body = directory_body(keys, signing_validity=signing_validity)
    return Federation(operator, keys, verified(body, operator))


# --- crafting and damaging messages -----------------------------------------------------


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    """``data`` with the bits of ``mask`` flipped in byte ``offset``."""
    damaged = bytearray(data)
    damaged[offset] ^= mask
    return bytes(damaged)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    """``data`` with ``new`` written over it at ``offset``."""
    return data[:offset] + new + data[offset + len(new) :]


def rewrite_fragment(
    body: bytes,
    *,
    transfer_id: bytes | None = None,
    index: int | None = None,
    count: int | None = None,
) -> bytes:
    """A fragment message with its clear transfer id, index or count rewritten."""
    if transfer_id is not None:
        body = patch(body, ID_AT, transfer_id)
    if index is not None:
        body = patch(body, INDEX_AT, struct.pack(">I", index))
    if count is not None:
        body = patch(body, COUNT_AT, struct.pack(">I", count))
    return body


def open_sealed(body: bytes, keys: SiteKeys) -> tuple[dict[str, Any], bytes]:
    """Decrypt a sealed document by the wire format alone: its JSON and its signature."""
    clear = body[:SEALED_HEADER_BYTES]
    private = keys.kem_key(clear[KEY_ID_AT:].hex())
    assert private is not None, "not sealed to these keys"
    plaintext = HPKE_SUITE.decrypt(
        body[SEALED_HEADER_BYTES:], private.to_hpke(), info=SEALED_INFO + clear
    )
    (length,) = struct.unpack_from(">I", plaintext)
    document = json.loads(plaintext[4 : 4 + length])
    assert isinstance(document, dict)
    return document, plaintext[4 + length :]


def reseal(
    document: Mapping[str, Any],
    *,
    message_id: bytes,
    signing_key: SigningPrivateKey,
    recipient_key: KemPublicKey,
    kind: int = KIND_MANIFEST,
    payload: bytes | None = None,
    plaintext: bytes | None = None,
) -> bytes:
    """Sign ``document`` with ``signing_key`` and seal it, following docs/wire.md only.

    ``payload`` replaces the canonical JSON when a test needs bytes that are not JSON;
    ``plaintext`` replaces the whole sealed plaintext (length, document, signature).
    """
    if payload is None:
        payload = json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    if plaintext is None:
        signature = signing_key.sign(SIGNED_CONTEXT + payload)
        plaintext = struct.pack(">I", len(payload)) + payload + signature
    clear = (
        MAGIC + bytes([VERSION, kind]) + b"\0\0" + message_id + bytes.fromhex(recipient_key.key_id)
    )
    return clear + HPKE_SUITE.encrypt(plaintext, recipient_key.to_hpke(), info=SEALED_INFO + clear)


def messages(transfer: SealedTransfer) -> list[bytes]:
    """Every message of a sealed transfer: the manifest, then fragments in order."""
    return [transfer.manifest_body(), *(body for _, body in transfer.fragment_bodies())]


def as_legacy_directory(sealed: SealedTransfer, state: dict[str, object] | None = None) -> Path:
    """Rewrite a sealed file as the older layout's entry directory (``transfer.json``,
    ``manifest.msg``, ``fragments.bin`` and, given a ``state``, ``state.json``), as a
    gateway of an earlier version left it in its outbox; the sealed file is removed."""
    legacy = sealed.path.with_name(sealed.transfer_id_hex)
    legacy.mkdir()
    info = SealedTransfer.info(sealed.path)
    del info["manifest_length"]
    (legacy / "transfer.json").write_text(json.dumps(info))
    (legacy / "manifest.msg").write_bytes(sealed.manifest_body())
    (legacy / "fragments.bin").write_bytes(b"".join(b for _, b in sealed.fragment_bodies()))
    if state is not None:
        (legacy / "state.json").write_text(json.dumps(state, indent=1).ljust(1024))
    sealed.path.unlink()
    return legacy


def deliver(spool: Spool, sender_site: str, bodies: Iterable[bytes]) -> list[EnvelopeError]:
    """Put every message in the spool as the transport would; return the refusals."""
    refused: list[EnvelopeError] = []
    for body in bodies:
        try:
            spool.put(sender_site, body)
        except EnvelopeError as exc:
            refused.append(exc)
    return refused


# --- files ------------------------------------------------------------------------------


def write_random(path: Path, size: int, *, seed: int = 0) -> bytes:
    """Write ``size`` reproducible pseudo-random bytes to ``path`` and return them."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class DicomIdentifiers:
    """What identifies a patient and an instance: none of it may cross the broker."""

    patient_name: str
    patient_id: str
    sop_instance_uid: str
    study_instance_uid: str

    def as_bytes(self) -> dict[str, bytes]:
        return {name: value.encode() for name, value in vars(self).items()}


def pydicom_test_files() -> list[Path]:
    """The DICOM files shipped inside the installed pydicom (nothing is downloaded)."""
    import pydicom.data

    root = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in root.rglob("*.dcm") if p.is_file())


def identifiers_of(path: Path) -> DicomIdentifiers:
    """Read a Part 10 file's patient and instance identifiers."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return DicomIdentifiers(
        patient_name=str(ds.PatientName),
        patient_id=str(ds.PatientID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
    )


def write_dicom(path: Path, *, pixel_bytes: int, seed: int = 0) -> DicomIdentifiers:
    """Write a Secondary Capture Part 10 file with fresh identifiers and random pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        UID,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    rng = random.Random(seed)
    ids = DicomIdentifiers(
        patient_name=f"Canary^Leak^{rng.randrange(10**9):09d}",
        patient_id=f"PID-{rng.randrange(10**12):012d}",
        sop_instance_uid=str(generate_uid()),
        study_instance_uid=str(generate_uid()),
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(ids.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ids.sop_instance_uid
    ds.StudyInstanceUID = ids.study_instance_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.Modality = "OT"
    columns = 256
    rows = max(1, pixel_bytes // columns)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rng.randbytes(rows * columns)
    ds.save_as(path, enforce_file_format=True)
    return ids
