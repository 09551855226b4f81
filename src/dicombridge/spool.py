"""The receiving side: arriving bulk messages into the spool, whole transfers out of it.

A delivery is acked only once its bytes are durably in the spool (never held until the
PACS stored the instance: RabbitMQ's consumer ack timeout is 30 minutes). When the
manifest and every fragment of a transfer are there, the transfer is verified and
decrypted into ``incoming/`` and handed on. A transfer that fails a check is moved to
``quarantine/`` with the reason, and never reaches a PACS. Transfer ids already done are
remembered (``done/``) so that redeliveries and re-sends are dropped.

The spool keeps each arriving message as its own file, written to a temporary name,
fsynced and renamed, so a file that exists is whole: ``spool/<sender>/<transfer id>/``
holds ``manifest.msg`` and ``<index>-of-<count>.frag`` (the count in the name: no file
more per transfer to say it). Fragments may arrive in any order and more than once. The
plaintext is written to a temporary file and renamed into place only once its SHA-256
matches the signed manifest.

A transfer of one fragment (an image up to the fragment size, most of them) skips the
spool when its two messages come close together: the first waits, unacked, at most
``GATHER_S`` for the other (they are published together), then the transfer is assembled
from memory and both are acked. No file is written for them, which is most of what the
receiving side costs per instance on a file system where creating files is dear (ext4
without a journal). A crash before the acks redelivers both, as for any delivery. If the
other message does not come in time, or a part of the transfer is already spooled, each
message goes to the spool as above.

A full disk (ENOSPC, EDQUOT) in the spool, ``incoming/`` or ``done/`` removes what the
failed write had begun, logs the directory and the bytes free, and holds the delivery,
unacked, trying again with backoff until there is room. Requeueing at once instead would
spin, and every requeue spends one of the queue's delivery attempts (``x-delivery-limit``,
then the dead-letter queue). A delivery held for ``disk_full_hold_s`` (kept below
RabbitMQ's consumer ack timeout, 30 minutes by default) fails with the ``OSError``, which
the transport requeues: one attempt spent per hold, nothing acked that is not on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicombridge.directory import Directory
from dicombridge.durable import (
    free_bytes,
    fsync_dir,
    is_disk_full,
    pad,
    rewrite_in_place,
    write_durably,
)
from dicombridge.envelope import (
    Header,
    Kind,
    Manifest,
    manifest_from_document,
    open_document,
    open_fragment,
    parse_fragment,
    parse_header,
)
from dicombridge.errors import EnvelopeError, IncompleteTransferError, IntegrityError
from dicombridge.keys import SiteKeys, utc_now
from dicombridge.topology import check_site_id
from dicombridge.transport import Delivery

log = logging.getLogger(__name__)

# How long a delivery waits, unacked, for room on a full disk before it is requeued.
DISK_FULL_HOLD_S: Final = 600.0
_DISK_FULL_RETRY_FIRST_S: Final = 0.25
_DISK_FULL_RETRY_MAX_S: Final = 5.0

# A spooled transfer's manifest message.
MANIFEST_FILE: Final = "manifest.msg"
# The fragment count of a transfer of zero bytes (it has no fragment to carry it).
ZERO_COUNT_FILE: Final = "count"
# A sidecar's size, and its last byte: whether a C-STORE may be out (both are JSON
# whitespace, so the sidecar reads as JSON either way).
SIDECAR_BYTES: Final = 4096
_STORING: Final = b"\n"
_NOT_STORING: Final = b" "
# A done marker's size: its receipt is written over it in place (one file system block).
MARKER_BYTES: Final = 4096
# How long the first message of a one-fragment transfer waits, unacked, for the other.
GATHER_S: Final = 2.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class IncomingTransfer:
    """A verified, decrypted transfer waiting in ``incoming/`` for delivery.

    Saved beside the file as JSON (no key material) so that a restart finds it again.
    The sidecar is padded to ``SIDECAR_BYTES`` and its last byte says whether a C-STORE
    of the file may be out unanswered (``STORING``; the delivery's in-doubt mark): one
    byte rewritten in place, where a mark file would cost a file per instance.
    """

    sender_site: str
    transfer_id: bytes
    path: Path
    total_length: int
    meta: dict[str, Any]

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def _legacy_mark(self) -> Path:
        # Older versions marked an instance in doubt with a file beside it.
        return self.path.with_suffix(".storing")

    def save(self) -> None:
        document = {
            "sender_site": self.sender_site,
            "transfer_id": self.transfer_id.hex(),
            "file": self.path.name,
            "total_length": self.total_length,
            "meta": self.meta,
        }
        data = pad(json.dumps(document, indent=1).encode() + _NOT_STORING, SIDECAR_BYTES)
        write_durably(self.sidecar, data[:-1] + _NOT_STORING)

    @classmethod
    def load(cls, sidecar: Path) -> IncomingTransfer:
        document = json.loads(sidecar.read_text(encoding="utf-8"))
        return cls(
            sender_site=document["sender_site"],
            transfer_id=bytes.fromhex(document["transfer_id"]),
            path=sidecar.with_name(document["file"]),
            total_length=int(document["total_length"]),
            meta=document["meta"],
        )

    def is_storing(self) -> bool:
        """Whether a C-STORE of this file may have reached the node unanswered."""
        if self._legacy_mark.exists():
            return True
        with open(self.sidecar, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0 or size % SIDECAR_BYTES:
                return False  # an older version's sidecar: its mark is the file above
            handle.seek(size - 1)
            return handle.read(1) == _STORING

    def mark_storing(self, storing: bool = True) -> None:
        """Set (or clear) the in-doubt mark, not fsynced: it must survive the gateway's
        death, not the machine's (after a power loss the instance is stored again, at
        least once). One byte, so a crash leaves it old or new, never torn."""
        if self.sidecar.stat().st_size % SIDECAR_BYTES:
            self.save()  # an older version's sidecar, not padded: no byte to spare
        fd = os.open(self.sidecar, os.O_WRONLY)
        try:
            os.pwrite(fd, _STORING if storing else _NOT_STORING, os.fstat(fd).st_size - 1)
        finally:
            os.close(fd)
        if not storing:
            self._legacy_mark.unlink(missing_ok=True)

    def remove(self) -> None:
        # The sidecar first: a file without its sidecar is never delivered (and a restart
        # clears it), whereas a sidecar without its file would be.
        for path in (self.sidecar, self.path, self._legacy_mark):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


TransferHandler = Callable[[IncomingTransfer], Awaitable[None]]
# Called when a transfer that is already done arrives again, with the receipt sent for it.
DuplicateHandler = Callable[[str, bytes, dict[str, Any]], Awaitable[None]]


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


def open_manifest_body(
    body: bytes, sender_site: str, *, site_id: str, keys: SiteKeys, directory: Directory
) -> Manifest:
    """Open and verify a manifest message; the signed sender must be the broker's."""
    opened = open_document(body, site_id=site_id, keys=keys, directory=directory)
    manifest = manifest_from_document(opened)
    if manifest.sender_site != sender_site:
        raise IntegrityError(
            f"manifest signed by {manifest.sender_site!r} arrived from {sender_site!r}"
        )
    return manifest


def decrypt_into(manifest: Manifest, bodies: Iterable[bytes], out_path: Path) -> None:
    """Verify and decrypt a transfer's fragment messages, in index order, into
    ``out_path``, fsynced.

    Streams fragment by fragment; ``out_path`` appears only once the plaintext's
    SHA-256 equals the signed one. Any failure leaves no plaintext behind.
    """
    aead = AESGCM(manifest.content_key)
    digest = hashlib.sha256()
    written = 0
    tmp = out_path.with_name(f".{out_path.name}.assembling")
    try:
        with open(tmp, "wb") as out:
            for index, body in enumerate(bodies):
                got, data = open_fragment(aead, manifest, body)
                if got != index:
                    raise IntegrityError(f"fragment file {index} holds fragment {got}")
                digest.update(data)
                written += out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if written != manifest.total_length or digest.digest() != manifest.sha256:
            raise IntegrityError(
                f"transfer {manifest.transfer_id.hex()}: assembled bytes do not match the "
                "signed hash"
            )
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def fragment_file_name(index: int, count: int) -> str:
    """A spooled fragment's file: its index and its transfer's fragment count."""
    return f"{index:08d}-of-{count:08d}.frag"


def _fragment_names(directory: Path) -> list[str]:
    try:
        return [name for name in os.listdir(directory) if name.endswith(".frag")]
    except FileNotFoundError:
        return []


def _count_in(name: str) -> int:
    return int(name.removesuffix(".frag").rsplit("-of-", 1)[1])


def _fragment_counts(directory: Path) -> set[int]:
    """The fragment counts the spooled fragments of a transfer carry (one, or none)."""
    return {_count_in(name) for name in _fragment_names(directory)}


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
        return self.root / check_site_id(sender_site) / transfer_id.hex()

    def put(self, sender_site: str, body: bytes) -> SpoolState:
        """Store one manifest or fragment message durably; a repeat is harmless."""
        header = parse_header(body)
        directory = self.transfer_dir(sender_site, header.message_id)
        directory.mkdir(parents=True, exist_ok=True)
        if header.kind is Kind.MANIFEST:
            target = directory / MANIFEST_FILE
        elif header.kind is Kind.FRAGMENT:
            fragment = parse_fragment(body)
            if _fragment_counts(directory) - {fragment.count}:
                raise IntegrityError("fragments of one transfer disagree on their count")
            target = directory / fragment_file_name(fragment.index, fragment.count)
        else:
            raise EnvelopeError(f"{header.kind.name} messages do not go to the spool")
        if not target.exists():
            write_durably(target, body)
        return self.state(sender_site, header.message_id)

    def state(self, sender_site: str, transfer_id: bytes) -> SpoolState:
        directory = self.transfer_dir(sender_site, transfer_id)
        names = _fragment_names(directory)
        # The count is in every fragment's file name; a transfer of zero bytes has no
        # fragment to carry it, and its opened manifest writes it to ``count``.
        counts = {_count_in(name) for name in names}
        count = min(counts) if counts else None
        count_file = directory / ZERO_COUNT_FILE
        if count is None and count_file.exists():
            count = int(count_file.read_text())
        has_manifest = (directory / MANIFEST_FILE).exists()
        return SpoolState(sender_site, transfer_id, has_manifest, count, len(names))

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
        try:
            body = path.read_bytes()
        except FileNotFoundError as exc:
            raise IncompleteTransferError(
                f"transfer {transfer_id.hex()} has no manifest in the spool"
            ) from exc
        manifest = open_manifest_body(
            body, sender_site, site_id=site_id, keys=keys, directory=directory
        )
        folder = self.transfer_dir(sender_site, transfer_id)
        if _fragment_counts(folder) - {manifest.fragment_count}:
            raise IntegrityError("fragments disagree with the manifest on their count")
        if manifest.fragment_count == 0 and not (folder / ZERO_COUNT_FILE).exists():
            write_durably(folder / ZERO_COUNT_FILE, b"0")
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

        def bodies() -> Iterator[bytes]:
            for index in range(manifest.fragment_count):
                path = folder / fragment_file_name(index, manifest.fragment_count)
                try:
                    yield path.read_bytes()
                except FileNotFoundError as exc:
                    raise IncompleteTransferError(
                        f"transfer {transfer_id.hex()} lacks fragment {index} "
                        f"of {manifest.fragment_count}"
                    ) from exc

        decrypt_into(manifest, bodies(), out_path)
        return manifest

    def discard(self, sender_site: str, transfer_id: bytes) -> None:
        """Forget a transfer's messages (after delivery or quarantine)."""
        shutil.rmtree(self.transfer_dir(sender_site, transfer_id), ignore_errors=True)


@dataclass(frozen=True)
class ReceiverIdentity:
    """Who receives: this site's id, private keys and the verified directory."""

    site_id: str
    keys: SiteKeys
    directory: Directory


@dataclass
class _Gathering:
    """The messages of a one-fragment transfer held in memory, unacked, until both came.

    ``outcome`` is set once the transfer was assembled (or quarantined) from them, or
    assembling failed (each message then goes its ordinary way); ``settled`` wakes the
    deliveries waiting on it."""

    bodies: dict[Kind, bytes]
    manifest: Manifest | None
    outcome: str | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)


class Receiver:
    """Handles bulk deliveries: spool, assemble when whole, quarantine what fails."""

    def __init__(
        self,
        root: Path,
        identity: ReceiverIdentity,
        on_transfer: TransferHandler,
        *,
        on_duplicate: DuplicateHandler | None = None,
        disk_full_hold_s: float = DISK_FULL_HOLD_S,
    ) -> None:
        self.identity = identity
        self.disk_full_hold_s = disk_full_hold_s
        self.spool = Spool(root / "spool")
        self.incoming = root / "incoming"
        self.quarantine = root / "quarantine"
        self.done = root / "done"
        for path in (self.incoming, self.quarantine, self.done):
            path.mkdir(parents=True, exist_ok=True)
        self._on_transfer = on_transfer
        self._on_duplicate = on_duplicate
        self.duplicates_dropped = 0
        self.quarantined = 0
        # Deliveries that found a disk full (each held until there was room, or requeued).
        self.disk_full_holds = 0
        # One delivery of a transfer at a time: a redelivered fragment must not re-create
        # a spool folder that a concurrent delivery has just assembled and discarded.
        self._locks: dict[tuple[str, bytes], tuple[asyncio.Lock, int]] = {}  # lock, users
        self._gathering: dict[tuple[str, bytes], _Gathering] = {}
        # Transfers assembled from memory, their messages never spooled (a figure).
        self.assembled_in_memory = 0
        # Fragment messages handled, redeliveries included (a figure for the metrics).
        self.fragments_received = 0

    def _done_marker(self, sender_site: str, transfer_id: bytes) -> Path:
        return self.done / sender_site / transfer_id.hex()

    def record_receipt(self, sender_site: str, transfer_id: bytes, receipt: dict[str, Any]) -> None:
        """Keep the receipt sent for a done transfer, to send again if the sender re-sends.

        Written over the padded marker in place and fdatasynced (no new file); a marker
        that is missing, or too small for the receipt, is replaced whole. A power loss
        mid-write cannot tear it into something unreadable while the document fits one
        512-byte sector (a receipt does; beyond it, old and new are both spaces)."""
        marker = self._done_marker(sender_site, transfer_id)
        document = {"at": utc_now().isoformat(), "receipt": receipt}
        data = json.dumps(document).encode()
        with contextlib.suppress(FileNotFoundError):
            if rewrite_in_place(marker, pad(data, MARKER_BYTES), sync=True):
                return
        self._mark_done(marker, document)

    def _recorded_receipt(self, marker: Path) -> dict[str, Any] | None:
        try:
            document = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # done, but delivery not finished yet (or a pre-receipt marker)
        receipt = document.get("receipt") if isinstance(document, dict) else None
        return receipt if isinstance(receipt, dict) else None

    def recover(self) -> int:
        """After a restart: forget spooled messages of transfers already done, and files
        in incoming/ that have no sidecar.

        A crash between writing a done marker and discarding the spool folder leaves
        the folder behind; nothing would ever complete it. Returns how many were found.
        """
        found = 0
        for orphan in self.incoming.glob("*.dcm"):
            # Assembled but never given its sidecar, or half removed: not deliverable
            # (the spool still holds an unfinished transfer's messages).
            if not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)
        for partial in self.incoming.glob(".*.assembling"):
            partial.unlink(missing_ok=True)
        for folder in self.spool.root.glob("*/*"):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            if self._done_marker(folder.parent.name, bytes.fromhex(folder.name)).exists():
                shutil.rmtree(folder, ignore_errors=True)
                found += 1
        if found:
            log.info("spooled messages of done transfers discarded", extra={"count": found})
        return found

    async def handle(self, delivery: Delivery) -> None:
        """Store one delivery durably; if it completes a transfer, open and hand it on."""
        header = parse_header(delivery.body)
        sender = delivery.sender_site
        if header.kind not in (Kind.MANIFEST, Kind.FRAGMENT):
            raise EnvelopeError(f"{header.kind.name} message on the bulk plane")
        if header.kind == Kind.FRAGMENT:
            self.fragments_received += 1
        key = (sender, header.message_id)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                gathering = await self._handle_locked(delivery, header)
            if gathering is not None:
                await self._wait_for_the_other(delivery, header, gathering, lock)
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _handle_locked(self, delivery: Delivery, header: Header) -> _Gathering | None:
        """Handle a delivery (this transfer's lock held); a ``_Gathering`` to wait on, not
        yet acked, when it is held in memory for the other message of its transfer."""
        key = (delivery.sender_site, header.message_id)
        if key not in self._gathering and await asyncio.to_thread(self._on_disk, *key):
            # Done already (a duplicate), or part of it is spooled: the rest joins it there.
            await self._handle_spooled(delivery, header)
            return None
        handled, gathering = await self._gather(delivery, header)
        if not handled:
            await self._handle_spooled(delivery, header)
        return gathering

    def _on_disk(self, sender: str, transfer_id: bytes) -> bool:
        """Whether the transfer is done, or has messages in the spool (one thread hop)."""
        return (
            self._done_marker(sender, transfer_id).exists()
            or self.spool.transfer_dir(sender, transfer_id).exists()
        )

    async def _gather(self, delivery: Delivery, header: Header) -> tuple[bool, _Gathering | None]:
        """Hold a message of a one-fragment transfer in memory, or, if the other one is
        held already, assemble the transfer from both. Returns whether it was handled so,
        and the gathering to wait on if it is held."""
        sender, body = delivery.sender_site, delivery.body
        key = (sender, header.message_id)
        gathering = self._gathering.get(key)
        if gathering is None:  # neither done nor spooled (``_on_disk``)
            manifest = None
            try:
                if header.kind is Kind.FRAGMENT:
                    if parse_fragment(body).count != 1:
                        return False, None
                else:
                    manifest = await asyncio.to_thread(self._open_manifest_body, sender, body)
                    if manifest.fragment_count != 1:
                        return False, None
            except EnvelopeError:
                return False, None  # the spool path refuses it, quarantined with the reason
            gathering = _Gathering({header.kind: body}, manifest)
            self._gathering[key] = gathering
            return True, gathering
        if header.kind in gathering.bodies:
            return True, gathering  # a redelivery of the message held: wait with it
        gathering.bodies[header.kind] = body
        del self._gathering[key]
        try:
            await self._assemble_gathered(sender, header.message_id, gathering)
            gathering.outcome = "assembled"
        except BaseException:
            gathering.outcome = "failed"
            raise
        finally:
            gathering.settled.set()
        return True, None

    async def _wait_for_the_other(
        self, delivery: Delivery, header: Header, gathering: _Gathering, lock: asyncio.Lock
    ) -> None:
        """Wait (lock released) for the other message; if it does not come in time, or
        assembling failed, this one goes to the spool."""
        key = (delivery.sender_site, header.message_id)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gathering.settled.wait(), GATHER_S)
        except BaseException:
            if self._gathering.get(key) is gathering:
                del self._gathering[key]  # cancelled: forget what this delivery held
            raise
        async with lock:
            if gathering.outcome == "assembled":
                return
            if self._gathering.get(key) is gathering:
                del self._gathering[key]
            await self._handle_spooled(delivery, header)

    def _open_manifest_body(self, sender: str, body: bytes) -> Manifest:
        ident = self.identity
        return open_manifest_body(
            body, sender, site_id=ident.site_id, keys=ident.keys, directory=ident.directory
        )

    async def _assemble_gathered(
        self, sender: str, transfer_id: bytes, gathering: _Gathering
    ) -> None:
        """Assemble a one-fragment transfer from its two messages in memory; a transfer
        that fails a check is spooled and quarantined like any other."""
        try:
            manifest = gathering.manifest
            if manifest is None:
                manifest = await asyncio.to_thread(
                    self._open_manifest_body, sender, gathering.bodies[Kind.MANIFEST]
                )
            if manifest.fragment_count != 1:
                raise IntegrityError("fragments disagree with the manifest on their count")
            await self._assemble(
                sender, transfer_id, in_memory=(manifest, [gathering.bodies[Kind.FRAGMENT]])
            )
        except EnvelopeError as exc:
            for body in gathering.bodies.values():
                await self._while_disk_full(
                    self.spool.root, functools.partial(self.spool.put, sender, body)
                )
            await asyncio.to_thread(self._quarantine, sender, transfer_id, exc)
            return
        self.assembled_in_memory += 1

    async def _handle_spooled(self, delivery: Delivery, header: Header) -> None:
        sender = delivery.sender_site
        marker = self._done_marker(sender, header.message_id)
        if marker.exists():
            self.duplicates_dropped += 1
            log.info("duplicate dropped", extra={"transfer_id": header.id_hex})
            # Messages spooled before the transfer was marked done (a redelivery after a
            # stop that left the transfer in incoming/ unmarked) have nothing left to do.
            await asyncio.to_thread(self.spool.discard, sender, header.message_id)
            # A re-sent transfer means the sender lacks our receipt: send it again, once
            # per re-send (on its manifest), not once per fragment.
            if header.kind is Kind.MANIFEST and self._on_duplicate is not None:
                receipt = await asyncio.to_thread(self._recorded_receipt, marker)
                if receipt is not None:
                    await self._on_duplicate(sender, header.message_id, receipt)
            return
        state = await self._while_disk_full(
            self.spool.root, functools.partial(self.spool.put, sender, delivery.body)
        )
        if header.kind is Kind.MANIFEST and state.fragment_count is None:
            # Opening the manifest early fixes the count (a transfer of 0 bytes has no
            # fragment) and refuses a bad manifest before its fragments pile up.
            await self._guarded(sender, header.message_id, self._open_manifest)
            state = self.spool.state(sender, header.message_id)
        if state.complete:
            await self._guarded(sender, header.message_id, self._assemble)

    async def _open_manifest(self, sender: str, transfer_id: bytes) -> None:
        ident = self.identity
        await self._while_disk_full(
            self.spool.root,
            functools.partial(
                self.spool.open_manifest,
                sender,
                transfer_id,
                site_id=ident.site_id,
                keys=ident.keys,
                directory=ident.directory,
            ),
        )

    async def _assemble(
        self,
        sender: str,
        transfer_id: bytes,
        *,
        in_memory: tuple[Manifest, list[bytes]] | None = None,
    ) -> None:
        """Assemble from the spool, or from a manifest and fragment messages in memory.

        Order matters for crash safety: the sidecar makes the file deliverable after a
        restart, then the done marker makes redeliveries drop, then the spool goes. All
        three in one thread hop; a full disk retries from the step that failed."""
        marker = self._done_marker(sender, transfer_id)
        done: list[IncomingTransfer | None] = []  # what the first attempt found or made

        def step() -> IncomingTransfer | None:
            if not done:
                if self._incoming_path(sender, transfer_id).with_suffix(".json").exists():
                    # Assembled already, then stopped before the marker: that copy is
                    # being (or will be) delivered; assembling again could deliver it twice.
                    done.append(None)
                else:
                    done.append(self._assemble_into_incoming(sender, transfer_id, in_memory))
            self._mark_done(marker, {"at": utc_now().isoformat()})
            self.spool.discard(sender, transfer_id)
            return done[0]

        incoming = await self._while_disk_full(self.incoming, step)
        if incoming is None:
            self.duplicates_dropped += 1
            log.info("transfer already in incoming", extra={"transfer_id": transfer_id.hex()})
            return
        log.info(
            "transfer received",
            extra={
                "transfer_id": transfer_id.hex(),
                "from_site": sender,
                "bytes": incoming.total_length,
            },
        )
        await self._on_transfer(incoming)

    @staticmethod
    def _mark_done(marker: Path, document: dict[str, Any]) -> None:
        """Write a done marker durably, padded to ``MARKER_BYTES`` so that its receipt is
        later recorded in place (``record_receipt``): one file per transfer, ever."""
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_durably(marker, pad(json.dumps(document).encode(), MARKER_BYTES))

    def _incoming_path(self, sender: str, transfer_id: bytes) -> Path:
        return self.incoming / f"{sender}.{transfer_id.hex()}.dcm"

    def _assemble_into_incoming(
        self, sender: str, transfer_id: bytes, in_memory: tuple[Manifest, list[bytes]] | None
    ) -> IncomingTransfer:
        """Verify and decrypt into ``incoming/`` with its sidecar: both, or neither."""
        ident = self.identity
        out = self._incoming_path(sender, transfer_id)
        if in_memory is not None:
            manifest, bodies = in_memory
            decrypt_into(manifest, bodies, out)
        else:
            manifest = self.spool.assemble(
                sender,
                transfer_id,
                out,
                site_id=ident.site_id,
                keys=ident.keys,
                directory=ident.directory,
            )
        incoming = IncomingTransfer(sender, transfer_id, out, manifest.total_length, manifest.meta)
        try:
            incoming.save()
        except OSError:
            # Without its sidecar the file is never delivered: free its room (unless an
            # earlier attempt's sidecar already made it deliverable).
            if not incoming.sidecar.exists():
                with contextlib.suppress(FileNotFoundError):
                    out.unlink()
            raise
        return incoming

    async def _while_disk_full(self, directory: Path, step: Callable[[], _T]) -> _T:
        """Run ``step`` (blocking, writes under ``directory``) in a thread; while the disk
        is full, hold the delivery being handled and try again, for ``disk_full_hold_s``.

        Any other error, and a disk still full after the hold, go to the caller (the
        transport then requeues the delivery).
        """
        started = time.monotonic()
        delay = _DISK_FULL_RETRY_FIRST_S
        held = False
        while True:
            try:
                result = await asyncio.to_thread(step)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                waited_s = time.monotonic() - started
                if not held:
                    held = True
                    self.disk_full_holds += 1
                    log.error(
                        "disk full: delivery held, unacked, until there is room",
                        extra={
                            "directory": str(directory),
                            "free_bytes": free_bytes(directory),
                            "hold_s": self.disk_full_hold_s,
                        },
                    )
                if waited_s + delay > self.disk_full_hold_s:
                    log.error(
                        "disk still full: delivery requeued",
                        extra={
                            "directory": str(directory),
                            "free_bytes": free_bytes(directory),
                            "held_s": round(waited_s, 1),
                        },
                    )
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, _DISK_FULL_RETRY_MAX_S)
                continue
            if held:
                log.info(
                    "disk has room again: delivery goes on",
                    extra={
                        "directory": str(directory),
                        "held_s": round(time.monotonic() - started, 1),
                    },
                )
            return result

    def pending(self) -> list[IncomingTransfer]:
        """Transfers received but not yet delivered (after a restart), oldest first."""
        found: list[tuple[float, IncomingTransfer]] = []
        for sidecar in self.incoming.glob("*.json"):
            try:  # a transfer may be delivered and removed while we look
                found.append((sidecar.stat().st_mtime, IncomingTransfer.load(sidecar)))
            except FileNotFoundError:
                continue
        return [incoming for _, incoming in sorted(found, key=lambda pair: pair[0])]

    async def _guarded(
        self, sender: str, transfer_id: bytes, step: Callable[[str, bytes], Awaitable[None]]
    ) -> None:
        """Run a step; an envelope failure quarantines the transfer instead of failing the ack."""
        try:
            await step(sender, transfer_id)
        except EnvelopeError as exc:
            await asyncio.to_thread(self._quarantine, sender, transfer_id, exc)

    def _quarantine(self, sender: str, transfer_id: bytes, exc: EnvelopeError) -> None:
        source = self.spool.transfer_dir(sender, transfer_id)
        target = self.quarantine / sender / transfer_id.hex()
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(source, target)
        write_durably(
            target / "reason.json",
            json.dumps(
                {
                    "stage": "spool",
                    "error": type(exc).__name__,
                    "detail": str(exc),
                    "at": utc_now().isoformat(),
                }
            ).encode(),
        )
        fsync_dir(target.parent)
        # Later messages of this transfer are dropped, not spooled again.
        self._mark_done(self._done_marker(sender, transfer_id), {"quarantined": True})
        self.quarantined += 1
        log.warning(
            "transfer quarantined",
            extra={
                "transfer_id": transfer_id.hex(),
                "from_site": sender,
                "error": type(exc).__name__,
            },
        )
