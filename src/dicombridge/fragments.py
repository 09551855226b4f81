"""Cut an instance into sealed fragments on disk, and reassemble fragments into plaintext.

Sealing streams: one fragment in memory at a time, whatever the instance's size. The
receiving side (the spool, reassembly) is ``spool.py``.

Sender side, a *sealed transfer* is a directory holding only ciphertext (encrypt once:
a republish after a crash sends the same bytes)::

    <transfer-id>/transfer.json   clear bookkeeping: ids, sizes, recipient site (no PHI)
    <transfer-id>/manifest.msg    the sealed manifest message
    <transfer-id>/fragments.bin   fragment messages back to back; record i starts at
                                  i * (32 + fragment_size + 16)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicombridge.durable import fsync_dir, write_new_durably
from dicombridge.envelope import (
    CONTENT_KEY_BYTES,
    DEFAULT_FRAGMENT_SIZE,
    MAX_FRAGMENT_SIZE,
    Kind,
    Manifest,
    Sender,
    fragment_count_for,
    new_id,
    seal_document,
    seal_fragment,
    sealed_fragment_bytes,
)
from dicombridge.errors import EnvelopeError
from dicombridge.keys import KemPublicKey, utc_now

TRANSFER_FILE: Final = "transfer.json"
MANIFEST_FILE: Final = "manifest.msg"
FRAGMENTS_FILE: Final = "fragments.bin"
_READ_CHUNK: Final = 1024 * 1024


@dataclass(frozen=True)
class Recipient:
    """Whom a transfer is sealed for: a site and one of its KEM public keys."""

    site_id: str
    kem_key: KemPublicKey


@dataclass(frozen=True)
class SealedTransfer:
    """A transfer sealed on disk, ready to publish as ``1 + fragment_count`` messages."""

    path: Path
    transfer_id: bytes
    recipient_site: str
    fragment_size: int
    fragment_count: int
    total_length: int
    # SHA-256 of the plaintext, known only to the process that sealed it (never on disk
    # in clear, never on the wire in clear): for the gateway's byte-identity figures.
    plaintext_sha256: bytes | None = dataclasses.field(default=None, compare=False)

    @property
    def transfer_id_hex(self) -> str:
        return self.transfer_id.hex()

    @property
    def record_bytes(self) -> int:
        return sealed_fragment_bytes(self.fragment_size)

    @property
    def sealed_bytes(self) -> int:
        """Bytes that cross the broker for this transfer (manifest and fragments)."""
        manifest = (self.path / MANIFEST_FILE).stat().st_size
        return manifest + (self.path / FRAGMENTS_FILE).stat().st_size

    def manifest_body(self) -> bytes:
        return (self.path / MANIFEST_FILE).read_bytes()

    def fragment_length(self, index: int) -> int:
        if index < self.fragment_count - 1:
            return self.fragment_size
        return self.total_length - self.fragment_size * (self.fragment_count - 1)

    def fragment_body(self, index: int) -> bytes:
        """The sealed message of fragment ``index``, read from disk."""
        if not 0 <= index < self.fragment_count:
            raise IndexError(index)
        length = sealed_fragment_bytes(self.fragment_length(index))
        with open(self.path / FRAGMENTS_FILE, "rb") as handle:
            handle.seek(index * self.record_bytes)
            body = handle.read(length)
        if len(body) != length:
            raise EnvelopeError(f"sealed transfer {self.transfer_id_hex} is truncated on disk")
        return body

    def fragment_bodies(self) -> Iterator[tuple[int, bytes]]:
        """Every fragment message in order, read sequentially (one in memory at a time)."""
        with open(self.path / FRAGMENTS_FILE, "rb") as handle:
            for index in range(self.fragment_count):
                length = sealed_fragment_bytes(self.fragment_length(index))
                body = handle.read(length)
                if len(body) != length:
                    raise EnvelopeError(f"sealed transfer {self.transfer_id_hex} is truncated")
                yield index, body

    @classmethod
    def load(cls, path: Path) -> SealedTransfer:
        info = json.loads((path / TRANSFER_FILE).read_text(encoding="utf-8"))
        return cls(
            path=path,
            transfer_id=bytes.fromhex(info["transfer_id"]),
            recipient_site=info["recipient_site"],
            fragment_size=int(info["fragment_size"]),
            fragment_count=int(info["fragment_count"]),
            total_length=int(info["total_length"]),
        )


def seal_file(
    source: Path | bytes,
    parent: Path,
    *,
    sender: Sender,
    recipient: Recipient,
    fragment_size: int = DEFAULT_FRAGMENT_SIZE,
    meta: dict[str, Any] | None = None,
    transfer_id: bytes | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> SealedTransfer:
    """Seal ``source`` (a file, or its bytes) for ``recipient`` into a new directory
    under ``parent``.

    One pass over the file: each chunk is hashed and encrypted under a fresh content key
    and appended to ``fragments.bin``; the manifest, which needs the hash, is sealed last.
    ``extra_files`` (name -> bytes, e.g. the outbox's state) are written with them.
    Everything is fsynced before this returns. ``meta`` travels sealed and signed.

    The transfer is built in a hidden ``.<id>.sealing`` directory and renamed into place
    whole: if anything fails (a full disk: ENOSPC), nothing of it is left under
    ``parent`` and the error goes on.
    """
    if not 1 <= fragment_size <= MAX_FRAGMENT_SIZE:
        raise ValueError(f"fragment_size must be 1..{MAX_FRAGMENT_SIZE} bytes")
    transfer_id = transfer_id or new_id()
    total_length = len(source) if isinstance(source, bytes) else source.stat().st_size
    what = "the instance" if isinstance(source, bytes) else str(source)
    count = fragment_count_for(total_length, fragment_size)
    content_key = AESGCM.generate_key(bit_length=CONTENT_KEY_BYTES * 8)
    aead = AESGCM(content_key)
    target = parent / transfer_id.hex()
    work = parent / f".{transfer_id.hex()}.sealing"
    work.mkdir(parents=True)
    digest = hashlib.sha256()
    renamed = False
    try:
        with (
            io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as src,
            open(work / FRAGMENTS_FILE, "wb") as out,
        ):
            for index in range(count):
                chunk = src.read(fragment_size)
                if len(chunk) != min(fragment_size, total_length - index * fragment_size):
                    raise EnvelopeError(f"{what} changed size while it was being sealed")
                digest.update(chunk)
                out.write(seal_fragment(aead, transfer_id, index, count, chunk))
            if src.read(1):
                raise EnvelopeError(f"{what} grew while it was being sealed")
            out.flush()
            os.fsync(out.fileno())
        manifest = Manifest(
            transfer_id=transfer_id,
            sender_site=sender.site_id,
            sender_key_id=sender.keys.current_signing_key.key_id,
            recipient_site=recipient.site_id,
            created_at=utc_now(),
            fragment_size=fragment_size,
            fragment_count=count,
            total_length=total_length,
            sha256=digest.digest(),
            content_key=content_key,
            meta=meta or {},
        )
        body = seal_document(
            Kind.MANIFEST,
            transfer_id,
            manifest.to_document(),
            sender=sender,
            recipient_site=recipient.site_id,
            recipient_key=recipient.kem_key,
        )
        write_new_durably(work / MANIFEST_FILE, body)
        info = {
            "transfer_id": transfer_id.hex(),
            "recipient_site": recipient.site_id,
            "recipient_kem_key_id": recipient.kem_key.key_id,
            "created_at": manifest.created_at.isoformat(),
            "fragment_size": fragment_size,
            "fragment_count": count,
            "total_length": total_length,
        }
        for name, data in (extra_files or {}).items():
            write_new_durably(work / name, data)
        write_new_durably(work / TRANSFER_FILE, json.dumps(info, indent=1).encode())
        # Each file is fsynced; their names in the directory once, before it appears.
        fsync_dir(work)
        os.replace(work, target)
        renamed = True
        fsync_dir(parent)
    except BaseException:
        # After the rename the caller still sees a failure: take the transfer back out,
        # or it would be published although its sender was told it failed.
        shutil.rmtree(target if renamed else work, ignore_errors=True)
        raise
    return dataclasses.replace(SealedTransfer.load(target), plaintext_sha256=digest.digest())
