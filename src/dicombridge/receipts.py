"""Receipts the receiving gateway owes: kept until the broker confirmed them.

A receipt is recorded with the transfer's done marker (``spool.Receiver.record_receipt``)
and then published on the control plane. If the gateway dies between the two, the sender
would learn of the delivery only when its re-send timer fires (``outbox.resend_after_s``,
minutes). So a receipt also waits here from before it is published until the broker
confirmed it; a restarting gateway publishes what is left.

They are kept in memory and in one append-only journal, a JSON line per event::

    receipts/journal   {"owe": [recipient site, transfer id, receipt document]}
                       {"sent": [recipient site, transfer id]}          (ids, status; no PHI)

One line appended per event, never a file per receipt: on ext4 without a journal,
creating and removing a file per transfer costs more than the rest of its bookkeeping.
The journal is replayed and rewritten with only what is still owed when the gateway
starts, and emptied in place whenever nothing is owed and it has grown past
``COMPACT_BYTES``. It is written without fsync: it must survive the gateway's death, not
the machine's. After a power loss the sender's re-send recovers the receipt all the
same; a line torn by it is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from dicombridge.durable import write_atomically
from dicombridge.topology import check_site_id

log = logging.getLogger(__name__)

JOURNAL_FILE: Final = "journal"
# Empty the journal in place once it holds this much and nothing is owed.
COMPACT_BYTES: Final = 1024 * 1024

_Key = tuple[str, bytes]


def _replay(path: Path) -> dict[_Key, dict[str, Any]]:
    """What the journal at ``path`` says is still owed, in the order it was owed."""
    owed: dict[_Key, dict[str, Any]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return owed
    for line in data.splitlines():
        try:
            event = json.loads(line)
            if "owe" in event:
                site, tid, document = event["owe"]
                if isinstance(document, dict):
                    owed[(check_site_id(site), bytes.fromhex(tid))] = document
            elif "sent" in event:
                site, tid = event["sent"]
                owed.pop((site, bytes.fromhex(tid)), None)
        except (ValueError, TypeError, KeyError):
            continue  # a line torn by a power loss (or not ours): skipped
    return owed


def owed_receipts(root: Path) -> int:
    """How many receipts the journal under ``root`` still owes (for operators and tests;
    read without the gateway)."""
    return len(_replay(root / JOURNAL_FILE))


class UnsentReceipts:
    """The receipts under ``root`` not yet confirmed by the broker; thread-safe, and
    cheap enough (one small append) to call from the event loop."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._path = root / JOURNAL_FILE
        self._lock = threading.Lock()
        self._owed = _replay(self._path)
        legacy = sorted(root.glob("*.json"))  # an older version's file per receipt
        for path in legacy:
            site, _, tid = path.stem.rpartition(".")
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(document, dict):
                    self._owed[(check_site_id(site), bytes.fromhex(tid))] = document
            except (OSError, ValueError):
                continue
        # Rewritten with only what is owed: the journal starts small after every start.
        write_atomically(self._path, b"".join(_owe_line(*k, d) for k, d in self._owed.items()))
        for path in legacy:
            path.unlink(missing_ok=True)
        self._fd = -1
        self._written = self._path.stat().st_size

    def close(self) -> None:
        """Close the journal (it is opened again by the next event)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def add(self, to_site: str, transfer_id: bytes, document: dict[str, Any]) -> None:
        key = (check_site_id(to_site), transfer_id)
        with self._lock:
            self._append(_owe_line(*key, document))
            self._owed[key] = document

    def get(self, to_site: str, transfer_id: bytes) -> dict[str, Any] | None:
        with self._lock:
            return self._owed.get((to_site, transfer_id))

    def confirmed(self, to_site: str, transfer_id: bytes) -> None:
        key = (to_site, transfer_id)
        with self._lock:
            if self._owed.pop(key, None) is None:
                return
            if not self._owed and self._written >= COMPACT_BYTES:
                os.truncate(self._path, 0)  # nothing owed: every line is moot
                self._written = 0
                return
            self._append(json.dumps({"sent": [to_site, transfer_id.hex()]}).encode() + b"\n")

    def _append(self, line: bytes) -> None:
        """One ``write`` with O_APPEND (lock held): a line is whole unless the machine
        lost power while writing it."""
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._written += os.write(self._fd, line)

    def __iter__(self) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
        """(recipient site, transfer id, receipt document) of each receipt owed."""
        with self._lock:
            owed = list(self._owed.items())
        for (site, tid), document in owed:
            yield site, tid, document

    def __len__(self) -> int:
        with self._lock:
            return len(self._owed)


def _owe_line(to_site: str, transfer_id: bytes, document: dict[str, Any]) -> bytes:
    return json.dumps({"owe": [to_site, transfer_id.hex(), document]}).encode() + b"\n"
