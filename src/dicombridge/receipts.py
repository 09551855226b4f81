"""Receipts the receiving gateway owes: kept until the broker confirmed them.

A receipt is recorded with the transfer's done marker (``spool.Receiver.record_receipt``)
and then published on the control plane. If the gateway dies between the two, the sender
would learn of the delivery only when its re-send timer fires (``outbox.resend_after_s``,
minutes). So a receipt also waits here, one small file per transfer, from before it is
published until the broker confirmed it; a restarting gateway publishes what is left.

::

    receipts/<recipient-site>.<transfer-id>.json   the receipt document (ids, status; no PHI)

The file is written without fsync: it must survive the gateway's death, not the
machine's. After a power loss the sender's re-send recovers the receipt all the same.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dicombridge.topology import check_site_id


class UnsentReceipts:
    """The receipts under ``root`` not yet confirmed by the broker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, to_site: str, transfer_id: bytes) -> Path:
        return self.root / f"{check_site_id(to_site)}.{transfer_id.hex()}.json"

    def add(self, to_site: str, transfer_id: bytes, document: dict[str, Any]) -> None:
        path = self._path(to_site, transfer_id)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(json.dumps(document).encode())
        os.replace(tmp, path)  # a file that exists is whole

    def get(self, to_site: str, transfer_id: bytes) -> dict[str, Any] | None:
        try:
            document = json.loads(self._path(to_site, transfer_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def confirmed(self, to_site: str, transfer_id: bytes) -> None:
        self._path(to_site, transfer_id).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
        """(recipient site, transfer id, receipt document) of each receipt left."""
        for path in sorted(self.root.glob("*.json")):
            site, _, tid = path.stem.rpartition(".")
            with contextlib.suppress(OSError, ValueError):
                document = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(document, dict):
                    yield site, bytes.fromhex(tid), document

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.json"))
