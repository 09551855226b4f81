"""Cut an instance into sealed fragments on disk, and reassemble fragments into plaintext.

Both directions stream: one fragment in memory at a time, whatever the instance's size.

Sender side, a *sealed transfer* is a directory holding only ciphertext (encrypt once:
a republish after a crash sends the same bytes)::

    <transfer-id>/transfer.json   clear bookkeeping: ids, sizes, recipient site (no PHI)
    <transfer-id>/manifest.msg    the sealed manifest message
    <transfer-id>/fragments.bin   fragment messages back to back; record i starts at
                                  i * (32 + fragment_size + 16)

Receiver side, a *spool* keeps each arriving message as its own file, written to a
temporary name, fsynced and renamed, so a file that exists is whole. Fragments may
arrive in any order and more than once. A transfer is opened only when its manifest
and every fragment are there; the plaintext is written to a temporary file, and
renamed into place only once its SHA-256 matches the signed manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicombridge.directory import Directory
from dicombridge.envelope import (
    CONTENT_KEY_BYTES,
    DEFAULT_FRAGMENT_SIZE,
    MAX_FRAGMENT_SIZE,
    Kind,
    Manifest,
    Sender,
    fragment_count_for,
    manifest_from_document,
    new_id,
    open_document,
    open_fragment,
    parse_fragment,
    parse_header,
    seal_document,
    seal_fragment,
    sealed_fragment_bytes,
)
from dicombridge.errors import EnvelopeError, IncompleteTransferError, IntegrityError
from dicombridge.keys import KemPublicKey, SiteKeys, utc_now

TRANSFER_FILE: Final = "transfer.json"
MANIFEST_FILE: Final = "manifest.msg"
FRAGMENTS_FILE: Final = "fragments.bin"
_READ_CHUNK: Final = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable (POSIX needs the directory synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
    source: Path,
    parent: Path,
    *,
    sender: Sender,
    recipient: Recipient,
    fragment_size: int = DEFAULT_FRAGMENT_SIZE,
    meta: dict[str, Any] | None = None,
    transfer_id: bytes | None = None,
) -> SealedTransfer:
    """Seal ``source`` for ``recipient`` into a new directory under ``parent``.

    One pass over the file: each chunk is hashed and encrypted under a fresh content key
    and appended to ``fragments.bin``; the manifest, which needs the hash, is sealed last.
    Everything is fsynced before this returns. ``meta`` travels sealed and signed.
    """
    if not 1 <= fragment_size <= MAX_FRAGMENT_SIZE:
        raise ValueError(f"fragment_size must be 1..{MAX_FRAGMENT_SIZE} bytes")
    transfer_id = transfer_id or new_id()
    total_length = source.stat().st_size
    count = fragment_count_for(total_length, fragment_size)
    content_key = AESGCM.generate_key(bit_length=CONTENT_KEY_BYTES * 8)
    aead = AESGCM(content_key)
    target = parent / transfer_id.hex()
    work = parent / f".{transfer_id.hex()}.sealing"
    work.mkdir(parents=True)
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(work / FRAGMENTS_FILE, "wb") as out:
            for index in range(count):
                chunk = src.read(fragment_size)
                if len(chunk) != min(fragment_size, total_length - index * fragment_size):
                    raise EnvelopeError(f"{source} changed size while it was being sealed")
                digest.update(chunk)
                out.write(seal_fragment(aead, transfer_id, index, count, chunk))
            if src.read(1):
                raise EnvelopeError(f"{source} grew while it was being sealed")
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
        write_durably(work / MANIFEST_FILE, body)
        info = {
            "transfer_id": transfer_id.hex(),
            "recipient_site": recipient.site_id,
            "recipient_kem_key_id": recipient.kem_key.key_id,
            "created_at": manifest.created_at.isoformat(),
            "fragment_size": fragment_size,
            "fragment_count": count,
            "total_length": total_length,
        }
        write_durably(work / TRANSFER_FILE, json.dumps(info, indent=1).encode())
        os.replace(work, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return SealedTransfer.load(target)


# --- receiving -----------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolState:
    """What the spool holds of one transfer."""

    sender_site: str
    transfer_id: bytes
    has_manifest: bool
    fragment_count: int | None
    fragments_present: int

    @property
    def complete(self) -> bool:
        return (
            self.has_manifest
            and self.fragment_count is not None
            and self.fragments_present == self.fragment_count
        )


class Spool:
    """Arriving messages, kept per (sender site, transfer id) until the transfer is whole.

    The sender site is the one the broker vouched for (``user_id``), checked by the
    transport before a message gets here; namespacing by it means no other site can
    add fragments to, or spoil, a transfer it did not send.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def transfer_dir(self, sender_site: str, transfer_id: bytes) -> Path:
        return self.root / sender_site / transfer_id.hex()

    def put(self, sender_site: str, body: bytes) -> SpoolState:
        """Store one manifest or fragment message durably; a repeat is harmless."""
        header = parse_header(body)
        directory = self.transfer_dir(sender_site, header.message_id)
        directory.mkdir(parents=True, exist_ok=True)
        if header.kind is Kind.MANIFEST:
            target = directory / MANIFEST_FILE
        elif header.kind is Kind.FRAGMENT:
            fragment = parse_fragment(body)
            count_file = directory / "count"
            if count_file.exists():
                if int(count_file.read_text()) != fragment.count:
                    raise IntegrityError("fragments of one transfer disagree on their count")
            else:
                write_durably(count_file, str(fragment.count).encode())
            target = directory / f"{fragment.index:08d}.frag"
        else:
            raise EnvelopeError(f"{header.kind.name} messages do not go to the spool")
        if not target.exists():
            write_durably(target, body)
        return self.state(sender_site, header.message_id)

    def state(self, sender_site: str, transfer_id: bytes) -> SpoolState:
        directory = self.transfer_dir(sender_site, transfer_id)
        count_file = directory / "count"
        count = int(count_file.read_text()) if count_file.exists() else None
        present = sum(1 for _ in directory.glob("*.frag")) if directory.exists() else 0
        # The count comes from the first fragment or from the opened manifest (a transfer
        # of zero bytes has no fragment to carry it).
        has_manifest = (directory / MANIFEST_FILE).exists()
        return SpoolState(sender_site, transfer_id, has_manifest, count, present)

    def open_manifest(
        self,
        sender_site: str,
        transfer_id: bytes,
        *,
        site_id: str,
        keys: SiteKeys,
        directory: Directory,
    ) -> Manifest:
        """Open and verify the stored manifest; the signed sender must be the broker's."""
        path = self.transfer_dir(sender_site, transfer_id) / MANIFEST_FILE
        opened = open_document(path.read_bytes(), site_id=site_id, keys=keys, directory=directory)
        manifest = manifest_from_document(opened)
        if manifest.sender_site != sender_site:
            raise IntegrityError(
                f"manifest signed by {manifest.sender_site!r} arrived from {sender_site!r}"
            )
        count_file = self.transfer_dir(sender_site, transfer_id) / "count"
        if not count_file.exists():
            write_durably(count_file, str(manifest.fragment_count).encode())
        elif int(count_file.read_text()) != manifest.fragment_count:
            raise IntegrityError("fragments disagree with the manifest on their count")
        return manifest

    def assemble(
        self,
        sender_site: str,
        transfer_id: bytes,
        out_path: Path,
        *,
        site_id: str,
        keys: SiteKeys,
        directory: Directory,
    ) -> Manifest:
        """Verify and decrypt a whole transfer into ``out_path``.

        Streams fragment by fragment; ``out_path`` appears only once the plaintext's
        SHA-256 equals the signed one. Any failure leaves no plaintext behind.
        """
        manifest = self.open_manifest(
            sender_site, transfer_id, site_id=site_id, keys=keys, directory=directory
        )
        folder = self.transfer_dir(sender_site, transfer_id)
        aead = AESGCM(manifest.content_key)
        digest = hashlib.sha256()
        written = 0
        tmp = out_path.with_name(f".{out_path.name}.assembling")
        try:
            with open(tmp, "wb") as out:
                for index in range(manifest.fragment_count):
                    path = folder / f"{index:08d}.frag"
                    try:
                        body = path.read_bytes()
                    except FileNotFoundError as exc:
                        raise IncompleteTransferError(
                            f"transfer {transfer_id.hex()} lacks fragment {index} "
                            f"of {manifest.fragment_count}"
                        ) from exc
                    got, data = open_fragment(aead, manifest, body)
                    if got != index:
                        raise IntegrityError(f"fragment file {index} holds fragment {got}")
                    digest.update(data)
                    written += out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if written != manifest.total_length or digest.digest() != manifest.sha256:
                raise IntegrityError(
                    f"transfer {transfer_id.hex()}: assembled bytes do not match the signed hash"
                )
            os.replace(tmp, out_path)
            fsync_dir(out_path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return manifest

    def discard(self, sender_site: str, transfer_id: bytes) -> None:
        """Forget a transfer's messages (after delivery or quarantine)."""
        shutil.rmtree(self.transfer_dir(sender_site, transfer_id), ignore_errors=True)
