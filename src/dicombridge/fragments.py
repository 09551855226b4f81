"""Cut an instance into sealed fragments on disk, and reassemble fragments into plaintext.

Sealing streams: one fragment in memory at a time, whatever the instance's size. The
receiving side (the spool, reassembly) is ``spool.py``.

Sender side, a *sealed transfer* is one file holding only ciphertext and clear
bookkeeping (encrypt once: a republish after a crash sends the same bytes)::

    offset 0            "DCBRSEAL" (8 bytes)
    offset 8            transfer info, JSON padded with spaces to INFO_BYTES - 8: ids,
                        sizes, recipient site, where the manifest is (no PHI)
    offset INFO_BYTES   the owner's state block (the outbox's), STATE_BYTES, padded JSON,
                        rewritten in place
    offset PREAMBLE_BYTES  fragment messages back to back; record i starts at
                        PREAMBLE_BYTES + i * (32 + fragment_size + 16)
    then                the sealed manifest message

One file, not a directory of several: on ext4 without a journal (seen here) creating a
file costs more than writing half a megabyte, and the outbox creates one per instance.
The file is written under a hidden temporary name, fsynced and linked into place: a sealed
transfer that exists is whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicombridge.durable import fsync_dir, pad
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

SEALED_MAGIC: Final = b"DCBRSEAL"
INFO_BYTES: Final = 2048
STATE_BYTES: Final = 2048
PREAMBLE_BYTES: Final = INFO_BYTES + STATE_BYTES
# What a temporary file being sealed is called, beside where it will appear.
SEALING_SUFFIX: Final = ".sealing"
# What a sealed transfer's file is called: ``<transfer id hex>.sealed``.
SEALED_SUFFIX: Final = ".sealed"


def sealed_path(parent: Path, transfer_id_hex: str) -> Path:
    """Where the sealed transfer ``transfer_id_hex`` lives under ``parent``."""
    return parent / f"{transfer_id_hex}{SEALED_SUFFIX}"


@dataclass(frozen=True)
class Recipient:
    """Whom a transfer is sealed for: a site and one of its KEM public keys."""

    site_id: str
    kem_key: KemPublicKey


@dataclass(frozen=True)
class SealedTransfer:
    """A transfer sealed on disk (one file), ready to publish as ``1 + fragment_count``
    messages."""

    path: Path
    transfer_id: bytes
    recipient_site: str
    fragment_size: int
    fragment_count: int
    total_length: int
    manifest_length: int
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
    def fragments_bytes(self) -> int:
        """Bytes of the fragment messages, back to back."""
        if self.fragment_count == 0:
            return 0
        last = sealed_fragment_bytes(self.fragment_length(self.fragment_count - 1))
        return (self.fragment_count - 1) * self.record_bytes + last

    @property
    def sealed_bytes(self) -> int:
        """Bytes that cross the broker for this transfer (manifest and fragments)."""
        return self.manifest_length + self.fragments_bytes

    @property
    def file_bytes(self) -> int:
        """The size of the sealed file."""
        return PREAMBLE_BYTES + self.sealed_bytes

    def manifest_body(self) -> bytes:
        return self._read_at(PREAMBLE_BYTES + self.fragments_bytes, self.manifest_length)

    def fragment_length(self, index: int) -> int:
        if index < self.fragment_count - 1:
            return self.fragment_size
        return self.total_length - self.fragment_size * (self.fragment_count - 1)

    def fragment_body(self, index: int) -> bytes:
        """The sealed message of fragment ``index``, read from disk."""
        if not 0 <= index < self.fragment_count:
            raise IndexError(index)
        length = sealed_fragment_bytes(self.fragment_length(index))
        return self._read_at(PREAMBLE_BYTES + index * self.record_bytes, length)

    def fragment_bodies(self) -> Iterator[tuple[int, bytes]]:
        """Every fragment message in order, read sequentially (one in memory at a time)."""
        with open(self.path, "rb") as handle:
            handle.seek(PREAMBLE_BYTES)
            for index in range(self.fragment_count):
                length = sealed_fragment_bytes(self.fragment_length(index))
                body = handle.read(length)
                if len(body) != length:
                    raise EnvelopeError(f"sealed transfer {self.transfer_id_hex} is truncated")
                yield index, body

    def read_state(self) -> bytes:
        """The owner's state block, as last written (padded)."""
        return self._read_at(INFO_BYTES, STATE_BYTES)

    def write_state(self, data: bytes) -> None:
        """Overwrite the state block in place, in one ``pwrite``, not fsynced: a process
        crash leaves the old or the new block; a power loss may tear it, so only for state
        whose loss is harmless and whose reader treats an unreadable block as none."""
        if len(data) > STATE_BYTES:
            raise ValueError(f"state of {len(data)} bytes does not fit in {STATE_BYTES}")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, pad(data, STATE_BYTES), INFO_BYTES)
        finally:
            os.close(fd)

    def _read_at(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            body = handle.read(length)
        if len(body) != length:
            raise EnvelopeError(f"sealed transfer {self.transfer_id_hex} is truncated on disk")
        return body

    @classmethod
    def load(cls, path: Path) -> SealedTransfer:
        """Read a sealed transfer's bookkeeping; ``EnvelopeError`` if ``path`` is not one
        (``FileNotFoundError`` if it is gone)."""
        with open(path, "rb") as handle:
            head = handle.read(INFO_BYTES)
        if not head.startswith(SEALED_MAGIC):
            raise EnvelopeError(f"{path} is not a sealed transfer")
        try:
            info = json.loads(head[len(SEALED_MAGIC) :])
            return cls(
                path=path,
                transfer_id=bytes.fromhex(info["transfer_id"]),
                recipient_site=info["recipient_site"],
                fragment_size=int(info["fragment_size"]),
                fragment_count=int(info["fragment_count"]),
                total_length=int(info["total_length"]),
                manifest_length=int(info["manifest_length"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EnvelopeError(f"{path}: unreadable transfer info ({exc})") from exc

    @staticmethod
    def info(path: Path) -> dict[str, Any]:
        """The clear bookkeeping of the sealed transfer at ``path`` (for operators)."""
        with open(path, "rb") as handle:
            head = handle.read(INFO_BYTES)
        if not head.startswith(SEALED_MAGIC):
            raise EnvelopeError(f"{path} is not a sealed transfer")
        info = json.loads(head[len(SEALED_MAGIC) :])
        if not isinstance(info, dict):
            raise EnvelopeError(f"{path}: unreadable transfer info")
        return info


def seal_file(
    source: Path | bytes,
    parent: Path,
    *,
    sender: Sender,
    recipient: Recipient,
    fragment_size: int = DEFAULT_FRAGMENT_SIZE,
    meta: dict[str, Any] | None = None,
    transfer_id: bytes | None = None,
    state: bytes = b"{}",
) -> SealedTransfer:
    """Seal ``source`` (a file, or its bytes) for ``recipient`` into a new file
    ``<transfer id>.sealed`` under ``parent``.

    One pass over the source: each chunk is hashed, encrypted under a fresh content key
    and written at its record's place; the manifest, which needs the hash, is sealed last
    and written after the fragments; the preamble (info and ``state``, the owner's state
    block) last of all. The file is fsynced, linked into place and its directory fsynced
    before this returns.

    The file is written under a hidden ``.<id>.sealing`` name: if anything fails (a full
    disk: ENOSPC), nothing of it is left under ``parent`` and the error goes on.
    """
    if not 1 <= fragment_size <= MAX_FRAGMENT_SIZE:
        raise ValueError(f"fragment_size must be 1..{MAX_FRAGMENT_SIZE} bytes")
    if len(state) > STATE_BYTES:
        raise ValueError(f"state of {len(state)} bytes does not fit in {STATE_BYTES}")
    transfer_id = transfer_id or new_id()
    total_length = len(source) if isinstance(source, bytes) else source.stat().st_size
    what = "the instance" if isinstance(source, bytes) else str(source)
    count = fragment_count_for(total_length, fragment_size)
    content_key = AESGCM.generate_key(bit_length=CONTENT_KEY_BYTES * 8)
    aead = AESGCM(content_key)
    parent.mkdir(parents=True, exist_ok=True)
    target = sealed_path(parent, transfer_id.hex())
    work = parent / f".{transfer_id.hex()}{SEALING_SUFFIX}"
    digest = hashlib.sha256()
    renamed = False
    try:
        with (
            io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as src,
            open(work, "xb") as out,
        ):
            out.seek(PREAMBLE_BYTES)
            for index in range(count):
                chunk = src.read(fragment_size)
                if len(chunk) != min(fragment_size, total_length - index * fragment_size):
                    raise EnvelopeError(f"{what} changed size while it was being sealed")
                digest.update(chunk)
                out.write(seal_fragment(aead, transfer_id, index, count, chunk))
            if src.read(1):
                raise EnvelopeError(f"{what} grew while it was being sealed")
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
            out.write(body)
            info = {
                "transfer_id": transfer_id.hex(),
                "recipient_site": recipient.site_id,
                "recipient_kem_key_id": recipient.kem_key.key_id,
                "created_at": manifest.created_at.isoformat(),
                "fragment_size": fragment_size,
                "fragment_count": count,
                "total_length": total_length,
                "manifest_length": len(body),
            }
            head = SEALED_MAGIC + json.dumps(info, indent=1).encode()
            if len(head) > INFO_BYTES:
                raise ValueError(f"transfer info of {len(head)} bytes exceeds {INFO_BYTES}")
            out.seek(0)
            out.write(pad(head, INFO_BYTES) + pad(state, STATE_BYTES))
            out.flush()
            os.fsync(out.fileno())
        # link, not rename: a transfer id that is already there is refused
        # (FileExistsError), never overwritten.
        os.link(work, target)
        renamed = True
        os.unlink(work)
        fsync_dir(parent)
    except BaseException:
        # After the link the caller still sees a failure: take the transfer back out,
        # or it would be published although its sender was told it failed.
        for leftover in (target, work) if renamed else (work,):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise
    return dataclasses.replace(SealedTransfer.load(target), plaintext_sha256=digest.digest())


def migrate_directory(path: Path, *, state: bytes) -> SealedTransfer:
    """Rewrite a sealed transfer of the older layout (a directory ``<id>/`` holding
    ``transfer.json``, ``manifest.msg`` and ``fragments.bin``) as the file ``<id>.sealed``
    beside it, with ``state`` as its state block: the same ciphertext, byte for byte.
    The directory is removed once the file is durably there.

    A crash leaves the directory, or both (the caller removes a directory whose file
    exists), never neither.
    """
    info = json.loads((path / "transfer.json").read_text(encoding="utf-8"))
    manifest = (path / "manifest.msg").read_bytes()
    info["manifest_length"] = len(manifest)
    target = sealed_path(path.parent, path.name)
    work = path.with_name(f".{path.name}{SEALING_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        work.unlink()
    head = SEALED_MAGIC + json.dumps(info, indent=1).encode()
    with open(work, "xb") as out, open(path / "fragments.bin", "rb") as fragments:
        out.write(pad(head, INFO_BYTES) + pad(state, STATE_BYTES))
        while chunk := fragments.read(1024 * 1024):
            out.write(chunk)
        out.write(manifest)
        out.flush()
        os.fsync(out.fileno())
    os.replace(work, target)
    fsync_dir(path.parent)
    shutil.rmtree(path)
    return SealedTransfer.load(target)
