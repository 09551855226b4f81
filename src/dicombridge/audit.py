"""The audit trail: one JSON object per line for each event a site must be able to account
for (who sent which instance where, when, and what came of it).

Records follow the spirit of IHE ATNA and the DICOM audit messages of PS3.15 A.5 (the
field names are theirs where one fits: ``calling_ae_title``, ``study_instance_uid``,
``outcome``). Events:

============================  =========================================================
``instance-sent``             an instance admitted to the outbox for one site (A)
``instance-received``         a verified transfer arrived from a site (B)
``instance-stored``           stored in the local node (B), or its stored receipt back (A)
``instance-failed``           the local node refused it (B), or a failed receipt (A)
``query``                     a C-FIND (or deep echo) asked of a site, or answered for one
``retrieve``                  a C-MOVE or C-GET asked of a site, or answered for one
``policy-refusal``            a query or retrieve refused by ``[[remote_access]]``
``association-rejected``      a caller refused at association (unknown called AE title,
                              calling AE title or source address not admitted)
============================  =========================================================

Each record has ``time`` (UTC, ISO 8601, milliseconds), ``event``, ``site`` (this
gateway's), ``outcome`` (``success`` or ``failure``) and, where known, ``status`` (the
DIMSE status, ``0x0000``), the sites, AE titles, ``node``, ``transfer_id``, UIDs,
``query_id``, ``operation`` and ``level``. Fields without a value are left out.

The file holds UIDs and no Patient Name, Patient ID or other attribute value: it is
PHI-adjacent (a UID can be joined with a PACS) and lives under ``[storage] root`` with the
outbox and spool, under the same access control and retention. Ordinary logs carry no
UIDs of studies or series either.

Writing never blocks the event loop: ``record`` puts the record on a bounded queue (from
any thread) and one writer thread appends it and flushes. The writer fsyncs once each time
the queue runs empty (group commit): a burst of a thousand instances costs a few fsyncs,
not a thousand, and a record is on disk within one batch of being made. Per-record fsync
would buy little: the audit trail is not what the delivery promise rests on (the outbox
and spool are, fsynced themselves), and a crash loses at most the batch being written.
If the disk stalls long enough for the queue to fill, records are dropped and counted
(``dropped``) and a warning is logged, rather than stalling DICOM traffic.

Rotation by size: before a record would take the file past ``max_bytes`` it is renamed
``audit.jsonl.1`` (older ones shift to ``.2`` ...), keeping ``keep`` rotated files.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

log = logging.getLogger(__name__)

Event = Literal[
    "instance-sent",
    "instance-received",
    "instance-stored",
    "instance-failed",
    "query",
    "retrieve",
    "policy-refusal",
    "association-rejected",
]
Outcome = Literal["success", "failure"]

# Fields a record may carry besides time, event, site, outcome and status, in file order.
FIELDS: Final = (
    "from_site",
    "to_site",
    "calling_ae_title",
    "called_ae_title",
    "node",
    "transfer_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "query_id",
    "operation",
    "level",
    "source_address",
    "reason",
)
QUEUE_RECORDS: Final = 100_000
# Instances sent whose UIDs are remembered until their receipt comes back (in memory: a
# receipt after a restart is audited by transfer_id, which joins the instance-sent record).
REMEMBERED_TRANSFERS: Final = 100_000
_STOP: Final = object()


def utc_time() -> str:
    """Now as ``2026-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def outcome_of(status: int) -> Outcome:
    """Success for 0x0000 and the warnings (0x0001, 0xBxxx, PS3.7 C); failure otherwise."""
    return "success" if status in {0x0000, 0x0001} or status >> 12 == 0xB else "failure"


class AuditTrail:
    """Appends audit records to ``path`` from a writer thread; ``open`` then ``close``.

    A disabled trail (``enabled=False``) accepts records and writes nothing.
    """

    def __init__(
        self,
        path: Path,
        *,
        site: str,
        max_bytes: int,
        keep: int,
        enabled: bool = True,
        queue_records: int = QUEUE_RECORDS,
    ) -> None:
        self.path = path
        self.site = site
        self.max_bytes = max_bytes
        self.keep = keep
        self.enabled = enabled
        self.written = 0
        self.dropped = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_records)
        self._thread: threading.Thread | None = None
        self._sent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._sent_lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Start the writer (idempotent)."""
        if not self.enabled or self._thread is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._thread.start()

    def close(self, *, timeout_s: float = 10.0) -> None:
        """Write what is queued, fsync and stop the writer (blocks: call it in a thread)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout_s)

    def flush(self, *, timeout_s: float = 10.0) -> bool:
        """Wait until everything recorded so far is written and fsynced (tests, shutdown)."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    # --- records ------------------------------------------------------------------------

    def record(
        self,
        event: Event,
        *,
        status: int | None = None,
        outcome: Outcome | None = None,
        **fields: Any,
    ) -> None:
        """Queue one record (never blocks; safe from any thread). ``outcome`` defaults to
        what ``status`` says (success without a status)."""
        if not self.enabled:
            return
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise TypeError(f"not audit fields: {sorted(unknown)}")
        if outcome is None:
            outcome = "success" if status is None else outcome_of(status)
        record: dict[str, Any] = {
            "time": utc_time(),
            "event": event,
            "site": self.site,
            "outcome": outcome,
        }
        if status is not None:
            record["status"] = f"0x{status:04X}"
        for name in FIELDS:
            value = fields.get(name)
            if value is not None and value != "":
                record[name] = str(value)
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit queue full; records dropped", extra={"dropped": self.dropped})

    def remember(self, transfer_id: str, fields: Mapping[str, Any]) -> None:
        """Keep an instance-sent record's fields until its receipt is audited."""
        if not self.enabled:
            return
        with self._sent_lock:
            self._sent[transfer_id] = dict(fields)
            while len(self._sent) > REMEMBERED_TRANSFERS:
                self._sent.popitem(last=False)

    def recall(self, transfer_id: str, *, forget: bool) -> dict[str, Any]:
        """The fields remembered for ``transfer_id`` (empty if none); ``forget`` drops them."""
        with self._sent_lock:
            if forget:
                return self._sent.pop(transfer_id, {})
            return dict(self._sent.get(transfer_id, {}))

    # --- the writer ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        file = self.path.open("ab")
        size = file.tell()
        try:
            while True:
                item = self._queue.get()
                dirty = False
                while True:
                    if item is _STOP:
                        if dirty:
                            file.flush()
                            os.fsync(file.fileno())
                        return
                    if isinstance(item, threading.Event):
                        if dirty:
                            file.flush()
                            os.fsync(file.fileno())
                            dirty = False
                        item.set()
                    elif isinstance(item, dict):
                        line = (json.dumps(item, separators=(",", ":")) + "\n").encode()
                        if size and size + len(line) > self.max_bytes:
                            file.flush()
                            os.fsync(file.fileno())
                            file.close()
                            self._rotate()
                            file = self.path.open("ab")
                            size = 0
                        file.write(line)
                        file.flush()  # appended per record: a reader sees whole lines
                        size += len(line)
                        self.written += 1
                        dirty = True
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if dirty:
                    file.flush()
                    os.fsync(file.fileno())
        except OSError as exc:
            log.error(
                "audit trail not written",
                extra={"path": str(self.path), "error": exc.strerror or type(exc).__name__},
            )
        finally:
            file.close()

    def _rotate(self) -> None:
        """``audit.jsonl`` -> ``.1`` -> ``.2`` ...; the one past ``keep`` is deleted."""
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.keep > 0:
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        _fsync_directory(self.path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
