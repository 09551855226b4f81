"""The sender's outbox: instances sealed on entry, kept until the recipient stored them.

The SCP answers a modality's C-STORE with success only after ``admit`` returned, that is
after the instance is sealed and fsynced here (store-and-forward). The publisher drains
entries with publisher confirms; an entry stays until the recipient's signed *stored*
receipt arrives, so a lost spool or a quarantined transfer can be sent again from the
same sealed bytes. The outbox is capped in bytes and entries: beyond a cap ``admit``
raises ``OutboxFullError`` and the SCP answers 0xA700 (out of resources). When its disk
fills before a cap is reached (ENOSPC, EDQUOT), ``admit`` removes what it had written,
logs the directory and the bytes free, and raises ``OutboxDiskFullError`` (an
``OutboxFullError``): nothing is answered success that is not whole on disk.

::

    outbox/<transfer-id>.sealed   a sealed transfer (one file, see fragments.py); its
                                  state block says published?, attempts, last receipt
                                  (no PHI), rewritten in place

Per instance the outbox creates one file and removes it when the stored receipt comes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from dicombridge.control import Receipt
from dicombridge.directory import Directory
from dicombridge.durable import free_bytes, is_disk_full
from dicombridge.envelope import Sender, sealed_fragment_bytes
from dicombridge.errors import (
    EnvelopeError,
    KeyMaterialError,
    OutboxDiskFullError,
    OutboxFullError,
)
from dicombridge.fragments import (
    SEALED_SUFFIX,
    SEALING_SUFFIX,
    STATE_BYTES,
    Recipient,
    SealedTransfer,
    migrate_directory,
    seal_file,
    sealed_path,
)
from dicombridge.keys import newest_valid, utc_now

log = logging.getLogger(__name__)

# A receipt's Error Comment is kept to this many characters in the state block.
_COMMENT_CHARS: Final = 256


@dataclass(frozen=True)
class OutboxEntry:
    """One transfer waiting in the outbox and what is known of it."""

    transfer: SealedTransfer
    state: dict[str, Any]

    @property
    def published(self) -> bool:
        return bool(self.state.get("published_at"))

    @property
    def site(self) -> str:
        return self.transfer.recipient_site


class Outbox:
    """Durable, capped store of sealed transfers; safe to call from several threads."""

    def __init__(self, root: Path, *, max_bytes: int, max_count: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_count = max_count
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Held while an entry's state is rewritten or the entry removed: a receipt may
        # end an entry while the publisher still records that it published it.
        self._entry_lock = threading.Lock()
        self._reserved_bytes = 0
        self._reserved_count = 0
        self._sizes: dict[str, int] = {}
        for entry in self.entries():
            self._sizes[entry.transfer.transfer_id_hex] = entry.transfer.sealed_bytes

    def recover(self) -> None:
        """At gateway start: drop half-sealed leftovers of a crash, and rewrite entries
        of the older layout (a directory per entry) as sealed files.

        The modality was never answered success for a half-sealed one, so it sends it
        again. Only the gateway calls this (never a CLI reading the outbox while it runs).
        """
        for leftover in self.root.glob(f".*{SEALING_SUFFIX}"):
            _remove_path(leftover)
        for leftover in self.root.glob(".*.removing"):
            shutil.rmtree(leftover, ignore_errors=True)
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            if sealed_path(self.root, path.name).exists() or not (path / "transfer.json").exists():
                # Migrated already (a crash before the directory went), or half deleted
                # by an older version: finish the job.
                shutil.rmtree(path, ignore_errors=True)
                continue
            state = _read_legacy_state(path)
            transfer = migrate_directory(path, state=_encode_state(state))
            with self._lock:
                self._sizes[transfer.transfer_id_hex] = transfer.sealed_bytes
            log.info("outbox entry rewritten as one file", extra={"transfer_id": path.name})

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values()) + self._reserved_bytes

    @property
    def count(self) -> int:
        return len(self._sizes) + self._reserved_count

    def admit(
        self,
        source: Path | bytes,
        *,
        sender: Sender,
        directory: Directory,
        site: str,
        fragment_size: int,
        meta: dict[str, Any],
        retrieve: str | None = None,
    ) -> SealedTransfer:
        """Seal ``source`` (a file, or its bytes) for ``site`` into the outbox, durably;
        raise if a cap is reached.

        ``retrieve`` marks an instance sent back for another site's retrieve (its query id,
        opaque): any final receipt ends such an entry, since the instance is still in the
        PACS here and the retrieve is over.
        """
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        estimate = size + sealed_fragment_bytes(0) * (size // fragment_size + 1) + 4096
        with self._lock:
            if self.count + 1 > self.max_count:
                raise OutboxFullError(
                    f"outbox holds {self.count} transfers (max_count {self.max_count})"
                )
            if self.used_bytes + estimate > self.max_bytes:
                raise OutboxFullError(
                    f"outbox holds {self.used_bytes} bytes; {estimate} more would pass "
                    f"max_bytes {self.max_bytes}"
                )
            self._reserved_bytes += estimate
            self._reserved_count += 1
        try:
            recipient = self._recipient(directory, site)
            state: dict[str, Any] = {"created_at": utc_now().isoformat(), "attempts": 0}
            if retrieve is not None:
                state["retrieve"] = retrieve
            sealed = seal_file(
                source,
                self.root,
                sender=sender,
                recipient=recipient,
                fragment_size=fragment_size,
                meta=meta,
                # In the sealed file before it appears: an entry is never seen
                # without its state, and a failed write leaves no entry at all.
                state=_encode_state(state),
            )
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            free = free_bytes(self.root)
            log.error(
                "outbox disk full: instance refused",
                extra={"directory": str(self.root), "free_bytes": free, "needed_bytes": estimate},
            )
            raise OutboxDiskFullError(
                f"no room for about {estimate} bytes in the outbox {self.root} ({free} bytes free)"
            ) from exc
        finally:
            with self._lock:
                self._reserved_bytes -= estimate
                self._reserved_count -= 1
        with self._lock:
            self._sizes[sealed.transfer_id_hex] = sealed.sealed_bytes
        return sealed

    @staticmethod
    def _recipient(directory: Directory, site: str) -> Recipient:
        entry = directory.site(site)
        if entry is None:
            raise KeyMaterialError(f"site {site!r} is not in the federation directory")
        key = newest_valid(entry.kem_public_keys(), utc_now())
        if key is None:
            raise KeyMaterialError(f"site {site!r} has no valid KEM key in the directory")
        return Recipient(site, key)

    def entries(self) -> list[OutboxEntry]:
        """Every complete entry, oldest first."""
        found = []
        for path in self.root.glob(f"*{SEALED_SUFFIX}"):
            entry = self._load(path)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: str(e.state.get("created_at", "")))

    def get(self, transfer_id_hex: str) -> OutboxEntry | None:
        return self._load(sealed_path(self.root, transfer_id_hex))

    def _load(self, path: Path) -> OutboxEntry | None:
        try:
            transfer = SealedTransfer.load(path)
            return OutboxEntry(transfer, _decode_state(transfer.read_state()))
        except FileNotFoundError:
            return None  # ended meanwhile (a receipt, a purge)
        except EnvelopeError as exc:
            log.error(
                "outbox file is not a sealed transfer; left alone",
                extra={"file": path.name, "detail": str(exc)},
            )
            return None

    def due_for_resend(self, *, older_than_s: float) -> list[OutboxEntry]:
        """Published entries whose stored receipt has not come within ``older_than_s``.

        A failed receipt with a transient status (0xA7xx: the recipient was out of
        resources) also makes an entry due; other failures wait for an operator.
        """
        now = utc_now()
        due = []
        for entry in self.entries():
            published_at = entry.state.get("published_at")
            if not published_at:
                continue
            age_s = (now - datetime.fromisoformat(str(published_at))).total_seconds()
            receipt = entry.state.get("receipt")
            if receipt is not None and not 0xA700 <= int(receipt.get("status", 0)) <= 0xA7FF:
                continue
            if age_s >= older_than_s:
                due.append(entry)
        return due

    def mark_published(self, transfer_id_hex: str) -> None:
        with self._entry_lock:  # its receipt may come (and end it) before this runs
            entry = self.get(transfer_id_hex)
            if entry is None:
                return
            state = dict(entry.state)
            state["published_at"] = utc_now().isoformat()
            state["attempts"] = int(state.get("attempts", 0)) + 1
            self._keep_state(entry.transfer, state)

    def remove(self, transfer_id_hex: str) -> None:
        """Drop an entry: an admission whose modality was answered a failure after all,
        or one retention purged (its directory already gone)."""
        with self._entry_lock:
            self._delete(sealed_path(self.root, transfer_id_hex))
        with self._lock:
            self._sizes.pop(transfer_id_hex, None)

    def record_receipt(self, receipt: Receipt, *, from_site: str) -> OutboxEntry | None:
        """Apply a receipt: a stored one removes the entry, a failed one is kept with it
        (unless the entry was sent back for a retrieve: then it goes too).

        A receipt from a site other than the transfer's recipient is ignored.
        """
        transfer_id_hex = receipt.transfer_id.hex()
        with self._entry_lock:
            entry = self.get(transfer_id_hex)
            if entry is None or entry.site != from_site:
                return None
            if receipt.outcome == "stored" or "retrieve" in entry.state:
                self._delete(entry.transfer.path)
                with self._lock:
                    self._sizes.pop(transfer_id_hex, None)
                return entry
            state = dict(entry.state)
            state["receipt"] = {
                "outcome": receipt.outcome,
                "status": receipt.status,
                "error_comment": (receipt.error_comment or "")[:_COMMENT_CHARS] or None,
                "at": utc_now().isoformat(),
            }
            self._keep_state(entry.transfer, state)
            return OutboxEntry(entry.transfer, state)

    def _delete(self, path: Path) -> None:
        """Delete an entry (one unlink: a crash leaves it whole or gone).

        Not fsynced: a power loss may bring the entry back whole, and a whole entry is
        published again after ``resend_after_s``; its recipient answers the re-send with
        the receipt it recorded, and the entry ends again."""
        _remove_path(path)

    def _keep_state(self, transfer: SealedTransfer, state: dict[str, Any]) -> None:
        """Save an entry's new state; on a full disk, log it and keep the old one.

        The entry itself is whole, and its state only says what was done with it: with
        the old state a published entry is published again at the next start, or a
        failed receipt is asked for again by a re-send (both dropped as duplicates by the
        recipient), so this never stops the publisher or the receipt consumer. For the
        same reason the state is not fsynced: a power loss that brings the old state back
        (or leaves it unreadable: read as no state) costs a re-send, not an instance. It
        is rewritten in place in the sealed file's state block: no new file per update,
        which on ext4 without a journal costs more than the write.
        """
        try:
            transfer.write_state(_encode_state(state))
        except FileNotFoundError:
            return  # ended meanwhile
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            log.error(
                "outbox disk full: entry state not saved",
                extra={
                    "directory": str(self.root),
                    "free_bytes": free_bytes(self.root),
                    "transfer_id": transfer.transfer_id_hex,
                },
            )


def _encode_state(state: dict[str, Any]) -> bytes:
    """Compact JSON; it must fit the sealed file's state block (``STATE_BYTES``)."""
    data = json.dumps(state, separators=(",", ":")).encode()
    if len(data) > STATE_BYTES:
        raise ValueError(f"outbox state of {len(data)} bytes exceeds {STATE_BYTES}")
    return data


def _decode_state(block: bytes) -> dict[str, Any]:
    """The state a block holds; an unreadable block (a torn write) reads as none."""
    try:
        state = json.loads(block)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def _read_legacy_state(path: Path) -> dict[str, Any]:
    try:
        return _decode_state((path / "state.json").read_bytes())
    except OSError:
        return {}


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
