"""What the receiving gateway set aside: transfers that failed a check or a PACS refused.

Nothing in quarantine reaches a PACS by itself. Two stages put things here::

    quarantine/<sender>/<transfer-id>/reason.json   why, when, the PACS status if any
      stage "spool":    the sealed messages as received (a check failed: integrity,
                        signature, not for us); the plaintext never existed
      stage "delivery": instance.dcm and transfer.json (verified and decrypted, but the
                        local node refused it or stayed unreachable)

``retry`` puts a delivery-stage entry back into ``incoming/`` (the running gateway picks
it up); for a spool-stage entry it forgets the transfer id, so that the sender's re-send
is accepted, and drops the quarantined copy. ``purge`` deletes an entry: it holds PHI.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicombridge.durable import fsync_dir
from dicombridge.errors import ConfigError


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined transfer."""

    path: Path
    sender_site: str
    transfer_id: str
    reason: dict[str, Any]

    @property
    def id(self) -> str:
        return self.transfer_id

    @property
    def stage(self) -> str:
        return str(self.reason.get("stage", "spool"))

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def summary(self) -> dict[str, Any]:
        """What ``list --json`` prints: ids, stage, status, sizes; no PHI."""
        status = self.reason.get("status")
        return {
            "id": self.transfer_id,
            "from_site": self.sender_site,
            "stage": self.stage,
            "error": self.reason.get("error"),
            "status": f"{status:#06x}" if isinstance(status, int) else None,
            "error_comment": self.reason.get("error_comment") or self.reason.get("detail"),
            "at": self.reason.get("at"),
            "size_bytes": self.size_bytes,
        }


class Quarantine:
    """The quarantine of one site's storage root."""

    def __init__(self, storage_root: Path) -> None:
        self.root = storage_root / "quarantine"
        self.incoming = storage_root / "incoming"
        self.done = storage_root / "done"

    def entries(self) -> list[QuarantineEntry]:
        found: list[QuarantineEntry] = []
        if not self.root.exists():
            return found
        for sender in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for folder in sorted(p for p in sender.iterdir() if p.is_dir()):
                found.append(self._entry(folder))
        return sorted(found, key=lambda e: str(e.reason.get("at", "")))

    @staticmethod
    def _entry(folder: Path) -> QuarantineEntry:
        try:
            reason = json.loads((folder / "reason.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            reason = {"error": "unknown (reason.json missing or unreadable)"}
        return QuarantineEntry(folder, folder.parent.name, folder.name, reason)

    def get(self, entry_id: str) -> QuarantineEntry:
        """The entry whose transfer id is or starts with ``entry_id`` (unambiguous)."""
        matches = [e for e in self.entries() if e.transfer_id.startswith(entry_id.lower())]
        if len(matches) != 1:
            problem = "no quarantined transfer" if not matches else "several transfers"
            raise ConfigError(
                self.root,
                "ID",
                f"{problem} match {entry_id!r}",
                "use an id from `dicombridge quarantine list` (a prefix is enough if unique)",
            )
        return matches[0]

    def find(self, sender_site: str, transfer_id_hex: str) -> QuarantineEntry | None:
        """The entry of exactly this transfer, if it is quarantined."""
        folder = self.root / sender_site / transfer_id_hex
        return self._entry(folder) if folder.is_dir() else None

    def retry(self, entry: QuarantineEntry) -> str:
        """Give an entry another chance; return what will happen next."""
        if entry.stage == "delivery":
            self.incoming.mkdir(parents=True, exist_ok=True)
            sidecar = json.loads((entry.path / "transfer.json").read_text(encoding="utf-8"))
            target = self.incoming / sidecar["file"]
            os.replace(entry.path / "instance.dcm", target)
            # The sidecar last: the gateway picks up only complete pairs.
            os.replace(entry.path / "transfer.json", target.with_suffix(".json"))
            fsync_dir(self.incoming)
            shutil.rmtree(entry.path)
            return "back in incoming/: the gateway delivers it again within seconds"
        marker = self.done / entry.sender_site / entry.transfer_id
        marker.unlink(missing_ok=True)
        shutil.rmtree(entry.path)
        return (
            f"forgotten: the next re-send of this transfer by {entry.sender_site} is accepted "
            "(the sender keeps it in its outbox until a stored receipt)"
        )

    def purge(self, entry: QuarantineEntry) -> None:
        """Delete an entry (it holds PHI, sealed or not)."""
        shutil.rmtree(entry.path)
