"""What a gateway counts and measures: its Prometheus metrics, and the figures ``/status``
shows (the last transfers, each remote site's last contact, the storage areas).

Every ``Gateway`` has its own ``CollectorRegistry`` (never the process-wide one: tests
run several gateways in one process). Two kinds of metric live in it:

* events counted where they happen, with labels (instances and bytes per route and
  direction, fragments and bytes published, receipts and failures by DIMSE status, the
  latency from admission to the stored receipt): ``GatewayMetrics.admitted``,
  ``published``, ``receipt``, ``delivered``, called by the gateway;
* figures the gateway's parts already count (``Gateway.resends``,
  ``Deliverer.retries``...), gauges of the state (broker connected, directory version,
  local nodes answering) and the sizes of the storage areas, all read at scrape time by
  a collector (``Figures``). The areas are measured in a thread, at most once per
  ``STORAGE_MAX_AGE_S`` (``StorageFigures``): a scrape never walks the disk on the loop.

Labels carry site ids, AE titles, node names and DIMSE statuses: never PHI.

The latency histogram measures from the instance's admission to the outbox (the
C-STORE was received and sealed) to its stored receipt. The admission time is kept in
memory to the millisecond; after a restart it comes from the outbox entry's
``created_at`` (to the second), so a restart loses no observation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from dicombridge.control import Receipt
from dicombridge.errors import EnvelopeError
from dicombridge.fragments import SEALED_SUFFIX, SealedTransfer
from dicombridge.keys import utc_now
from dicombridge.spool import IncomingTransfer

log = logging.getLogger(__name__)

# The text exposition format that ``generate_latest`` writes.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# From a local C-STORE to the remote PACS's stored receipt: 50 ms on a quiet LAN to an
# hour behind a broker that was down.
LATENCY_BUCKETS_S: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
STORAGE_AREAS: Final = ("outbox", "spool", "incoming", "quarantine")
# Storage figures older than this are measured again when asked for.
STORAGE_MAX_AGE_S: Final = 5.0
RECENT_TRANSFERS: Final = 20

Direction = Literal["sent", "received"]


def status_text(status: int) -> str:
    """A DIMSE status as a label value and in JSON: ``0xa700``."""
    return f"{status:#06x}"


# --- the storage areas ------------------------------------------------------------------


@dataclass(frozen=True)
class AreaFigures:
    """What one storage area holds now."""

    area: str
    count: int
    size_bytes: int
    oldest_age_s: float | None

    def summary(self) -> dict[str, Any]:
        return {
            "area": self.area,
            "count": self.count,
            "size_bytes": self.size_bytes,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 1),
        }


def measure_storage(storage_root: Path, now: datetime | None = None) -> tuple[AreaFigures, ...]:
    """Count, bytes and oldest age of the outbox, spool, incoming and quarantine (blocking:
    call it in a thread). Ages are taken as ``dicombridge retention`` takes them; the done
    markers (there may be millions, no PHI) are left out."""
    at = now or datetime.now(UTC)
    return tuple(_measure(area, storage_root / area, at) for area in STORAGE_AREAS)


def _measure(area: str, folder: Path, now: datetime) -> AreaFigures:
    items: list[tuple[int, datetime]] = []
    for path in _entries(area, folder):
        with contextlib.suppress(FileNotFoundError, EnvelopeError):
            items.append(_READERS[area](path))  # vanished meanwhile: not counted
    oldest = min((at for _, at in items), default=None)
    return AreaFigures(
        area=area,
        count=len(items),
        size_bytes=sum(size for size, _ in items),
        oldest_age_s=None if oldest is None else max(0.0, (now - oldest).total_seconds()),
    )


def _children(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entries(area: str, folder: Path) -> list[Path]:
    if area == "outbox":
        return [p for p in _children(folder) if p.suffix == SEALED_SUFFIX]
    if area == "incoming":
        return [p for p in _children(folder) if p.suffix == ".dcm"]
    # spool/<sender>/<transfer id>/ and quarantine/<sender>/<transfer id>/
    return [entry for sender in _children(folder) for entry in _children(sender)]


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def _iso(value: object) -> datetime | None:
    try:
        at = datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def _tree(folder: Path) -> tuple[int, datetime]:
    """Bytes under a folder and its newest file's time (an entry still growing is new)."""
    size, newest = 0, folder.stat().st_mtime
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                stat = os.lstat(os.path.join(dirpath, name))
                size += stat.st_size
                newest = max(newest, stat.st_mtime)
    return size, datetime.fromtimestamp(newest, tz=UTC)


def _outbox_item(path: Path) -> tuple[int, datetime]:
    # Admitted at its state's created_at (the state block is rewritten in place, so the
    # file's time says when it was last published, not when it came).
    state = SealedTransfer.load(path).read_state()
    try:
        document = json.loads(state)
    except ValueError:
        document = {}
    created = _iso(document.get("created_at")) if isinstance(document, dict) else None
    return path.stat().st_size, created or _mtime(path)


def _incoming_item(path: Path) -> tuple[int, datetime]:
    size = path.stat().st_size
    with contextlib.suppress(FileNotFoundError):
        size += path.with_suffix(".json").stat().st_size
    return size, _mtime(path)


def _spool_item(path: Path) -> tuple[int, datetime]:
    if not path.is_dir():
        raise FileNotFoundError(path)
    return _tree(path)


def _quarantine_item(path: Path) -> tuple[int, datetime]:
    if not path.is_dir():
        raise FileNotFoundError(path)
    size, _ = _tree(path)
    try:
        reason = json.loads((path / "reason.json").read_bytes())
    except (OSError, ValueError):
        reason = {}
    at = _iso(reason.get("at")) if isinstance(reason, dict) else None
    return size, at or _mtime(path)


_READERS: Final[dict[str, Callable[[Path], tuple[int, datetime]]]] = {
    "outbox": _outbox_item,
    "spool": _spool_item,
    "incoming": _incoming_item,
    "quarantine": _quarantine_item,
}


class StorageFigures:
    """The storage areas, measured in a thread when the last measurement is older than
    ``max_age_s``; concurrent callers share one measurement."""

    def __init__(self, storage_root: Path, *, max_age_s: float = STORAGE_MAX_AGE_S) -> None:
        self.storage_root = storage_root
        self.max_age_s = max_age_s
        self.latest: tuple[AreaFigures, ...] = ()
        self._measured_at: float | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> tuple[AreaFigures, ...]:
        """The areas, measured again if the last measurement is too old."""
        async with self._lock:
            fresh = (
                self._measured_at is not None
                and time.monotonic() - self._measured_at < self.max_age_s
            )
            if not fresh:
                try:
                    self.latest = await asyncio.to_thread(measure_storage, self.storage_root)
                    self._measured_at = time.monotonic()
                except OSError as exc:
                    log.error(
                        "storage areas not measured",
                        extra={"error": type(exc).__name__, "errno": exc.errno},
                    )
        return self.latest


# --- the last transfers -----------------------------------------------------------------


@dataclass(frozen=True)
class TransferRecord:
    """One transfer as ``/status`` lists it: ids, sizes, outcome; no PHI."""

    transfer_id: str
    direction: Direction
    site: str  # the recipient of a sent transfer, the sender of a received one
    size_bytes: int | None
    outcome: str  # sent: admitted, published, stored, failed; received: stored, failed
    at: datetime  # of the outcome
    route: str | None = None  # sent: the called AE title
    node: str | None = None  # received: the local node it went to
    status: int | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "direction": self.direction,
            "site": self.site,
            "route": self.route,
            "node": self.node,
            "size_bytes": self.size_bytes,
            "outcome": self.outcome,
            "status": None if self.status is None else status_text(self.status),
            "at": self.at.isoformat(),
        }


class RecentTransfers:
    """The last ``size`` transfers in either direction, newest last; a transfer's later
    outcome updates its record."""

    def __init__(self, size: int = RECENT_TRANSFERS) -> None:
        self._records: deque[TransferRecord] = deque(maxlen=size)

    def add(self, record: TransferRecord) -> None:
        self._records.append(record)

    def update(
        self,
        transfer_id: str,
        direction: Direction,
        *,
        outcome: str,
        status: int | None = None,
        otherwise: TransferRecord | None = None,
    ) -> None:
        """Set the outcome of a listed transfer; add ``otherwise`` if it is not listed."""
        for index in range(len(self._records) - 1, -1, -1):
            record = self._records[index]
            if record.transfer_id == transfer_id and record.direction == direction:
                self._records[index] = replace(record, outcome=outcome, status=status, at=utc_now())
                return
        if otherwise is not None:
            self.add(otherwise)

    def summary(self) -> list[dict[str, Any]]:
        """Newest first."""
        return [record.summary() for record in reversed(self._records)]


# --- figures read at scrape time ----------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """What the gateway's parts count and know, read when scraped."""

    resends: int = 0
    delivery_retries: int = 0
    delivery_in_doubt_found: int = 0
    duplicates_dropped: int = 0
    quarantined_at_spool: int = 0
    quarantined_at_delivery: int = 0
    disk_full_holds: int = 0
    fragments_received: int = 0
    table_reloads: int = 0
    table_reloads_refused: int = 0
    control_refused: int = 0
    broker_connected: bool = False
    directory_version: int = 0
    outbox_max_bytes: int = 0
    outbox_max_count: int = 0
    # (plane, reason) -> deliveries rejected to the dead-letter queue.
    dead_lettered: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # plane -> deliveries the broker marked as redelivered.
    redelivered: Mapping[str, int] = field(default_factory=dict)
    # local node -> whether it answered the last C-ECHO (absent: not checked yet).
    local_nodes_up: Mapping[str, bool] = field(default_factory=dict)


class _ScrapeCollector:
    """Yields the figures and storage gauges when the registry is collected."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        figures = self._metrics.figures()
        yield from _counters(figures)
        yield from _gauges(figures)
        yield from _storage_gauges(self._metrics.storage.latest)
        contact = GaugeMetricFamily(
            "dicombridge_remote_site_last_contact_timestamp_seconds",
            "When each remote site last sent a control message or receipt (Unix time).",
            labels=["site"],
        )
        for site, at in sorted(self._metrics.last_contact.items()):
            contact.add_metric([site], at.timestamp())
        yield contact


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _counters(figures: Figures) -> Iterable[Metric]:
    yield _counter(
        "dicombridge_resends",
        "Outbox entries published again for want of a stored receipt.",
        figures.resends,
    )
    yield _counter(
        "dicombridge_delivery_retries",
        "C-STOREs to a local node tried again after a transient failure.",
        figures.delivery_retries,
    )
    yield _counter(
        "dicombridge_delivery_in_doubt_found",
        "Instances in doubt after a crash found already stored by the node (not sent again).",
        figures.delivery_in_doubt_found,
    )
    yield _counter(
        "dicombridge_duplicates_dropped",
        "Transfers received again after they were done (replays, re-sends), dropped.",
        figures.duplicates_dropped,
    )
    quarantined = CounterMetricFamily(
        "dicombridge_quarantined",
        "Transfers set aside: a check failed (spool) or the local node refused (delivery).",
        labels=["stage"],
    )
    quarantined.add_metric(["spool"], figures.quarantined_at_spool)
    quarantined.add_metric(["delivery"], figures.quarantined_at_delivery)
    yield quarantined
    yield _counter(
        "dicombridge_disk_full_holds",
        "Broker deliveries held because the spool's disk was full.",
        figures.disk_full_holds,
    )
    yield _counter(
        "dicombridge_fragments_received",
        "Fragment messages received on the bulk queue (redeliveries included).",
        figures.fragments_received,
    )
    yield _counter(
        "dicombridge_table_reloads",
        "Edits of the routing table applied without a restart.",
        figures.table_reloads,
    )
    yield _counter(
        "dicombridge_table_reloads_refused",
        "Edits of the routing table refused (the table in force stayed).",
        figures.table_reloads_refused,
    )
    yield _counter(
        "dicombridge_control_refused",
        "Control messages not acted on: too old, from the future, or seen before.",
        figures.control_refused,
    )
    dead = CounterMetricFamily(
        "dicombridge_broker_dead_lettered",
        "Deliveries rejected to the site's dead-letter queue, by plane and reason.",
        labels=["plane", "reason"],
    )
    for (plane, reason), count in sorted(figures.dead_lettered.items()):
        dead.add_metric([plane, reason], count)
    yield dead
    again = CounterMetricFamily(
        "dicombridge_broker_redelivered",
        "Deliveries the broker marked as delivered before, by plane.",
        labels=["plane"],
    )
    for plane, count in sorted(figures.redelivered.items()):
        again.add_metric([plane], count)
    yield again


def _gauges(figures: Figures) -> Iterable[Metric]:
    yield GaugeMetricFamily(
        "dicombridge_broker_connected",
        "1 while both broker connections (bulk and control) are open, else 0.",
        value=1 if figures.broker_connected else 0,
    )
    yield GaugeMetricFamily(
        "dicombridge_directory_version",
        "Version of the signed federation directory in use.",
        value=figures.directory_version,
    )
    yield GaugeMetricFamily(
        "dicombridge_outbox_limit_bytes",
        "[outbox] max_bytes: beyond it C-STORE is answered 0xA700.",
        value=figures.outbox_max_bytes,
    )
    yield GaugeMetricFamily(
        "dicombridge_outbox_limit_items",
        "[outbox] max_count: beyond it C-STORE is answered 0xA700.",
        value=figures.outbox_max_count,
    )
    nodes = GaugeMetricFamily(
        "dicombridge_local_node_up",
        "1 if the local node answered the last C-ECHO with success, else 0.",
        labels=["node"],
    )
    for node, up in sorted(figures.local_nodes_up.items()):
        nodes.add_metric([node], 1 if up else 0)
    yield nodes


def _storage_gauges(areas: tuple[AreaFigures, ...]) -> Iterable[Metric]:
    items = GaugeMetricFamily(
        "dicombridge_storage_items", "Entries in a storage area.", labels=["area"]
    )
    size = GaugeMetricFamily(
        "dicombridge_storage_bytes", "Bytes in a storage area.", labels=["area"]
    )
    oldest = GaugeMetricFamily(
        "dicombridge_storage_oldest_age_seconds",
        "Age of the oldest entry in a storage area (0 when empty).",
        labels=["area"],
    )
    for area in areas:
        items.add_metric([area.area], area.count)
        size.add_metric([area.area], area.size_bytes)
        oldest.add_metric([area.area], area.oldest_age_s or 0.0)
    yield from (items, size, oldest)


# --- the metrics --------------------------------------------------------------------------


class GatewayMetrics:
    """One gateway's registry, its event counters, and what ``/status`` lists."""

    def __init__(
        self,
        storage_root: Path,
        *,
        figures: Callable[[], Figures] = Figures,
        max_admissions: int = 100_000,
    ) -> None:
        self.registry = CollectorRegistry()
        self.figures = figures
        self.storage = StorageFigures(storage_root)
        self.recent = RecentTransfers()
        # remote site -> when it last sent a control message (a receipt, a query...).
        self.last_contact: dict[str, datetime] = {}
        # transfer id -> admission time (Unix, ms), until its stored receipt; at most
        # ``max_admissions`` (the oldest go first; their receipt falls back on the outbox).
        self._admitted_at: dict[str, float] = {}
        self._max_admissions = max_admissions
        registry = self.registry
        self.sent_instances = Counter(
            "dicombridge_sent_instances",
            "Instances admitted to the outbox, by route (called AE title) and destination site.",
            ["route", "to_site"],
            registry=registry,
        )
        self.sent_bytes = Counter(
            "dicombridge_sent_bytes",
            "Bytes of the instances admitted to the outbox (as received), by route and site.",
            ["route", "to_site"],
            registry=registry,
        )
        self.received_instances = Counter(
            "dicombridge_received_instances",
            "Instances received and stored in a local node, by sender site and local node.",
            ["from_site", "node"],
            registry=registry,
        )
        self.received_bytes = Counter(
            "dicombridge_received_bytes",
            "Bytes of the instances stored in a local node, by sender site and local node.",
            ["from_site", "node"],
            registry=registry,
        )
        self.delivery_failures = Counter(
            "dicombridge_delivery_failures",
            "Received instances a local node refused (or stayed unreachable), by DIMSE status.",
            ["from_site", "status"],
            registry=registry,
        )
        self.fragments_published = Counter(
            "dicombridge_fragments_published",
            "Fragment messages published and confirmed (re-sends included), by site.",
            ["to_site"],
            registry=registry,
        )
        self.published_bytes = Counter(
            "dicombridge_published_bytes",
            "Sealed bytes published and confirmed (manifests, fragments, re-sends), by site.",
            ["to_site"],
            registry=registry,
        )
        self.receipts = Counter(
            "dicombridge_receipts",
            "Receipts for outbox entries, by the recipient site and outcome (stored, failed).",
            ["from_site", "outcome"],
            registry=registry,
        )
        self.receipt_failures = Counter(
            "dicombridge_receipt_failures",
            "Failed receipts: the recipient's PACS refused an instance, by DIMSE status.",
            ["from_site", "status"],
            registry=registry,
        )
        self.receipts_unmatched = Counter(
            "dicombridge_receipts_unmatched",
            "Receipts for no entry in the outbox (a repeat after a re-send), by site.",
            ["from_site"],
            registry=registry,
        )
        self.latency = Histogram(
            "dicombridge_store_latency_seconds",
            "From admission to the outbox (C-STORE received) to the stored receipt, by site.",
            ["to_site"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        registry.register(_ScrapeCollector(self))

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format (storage as last measured)."""
        return generate_latest(self.registry)

    # --- events ---------------------------------------------------------------------

    def admitted(self, sealed: SealedTransfer, *, route: str) -> None:
        """An instance was sealed into the outbox for ``sealed.recipient_site``."""
        site, tid = sealed.recipient_site, sealed.transfer_id_hex
        self.sent_instances.labels(route, site).inc()
        self.sent_bytes.labels(route, site).inc(sealed.total_length)
        if len(self._admitted_at) >= self._max_admissions:
            self._admitted_at.pop(next(iter(self._admitted_at)))
        self._admitted_at[tid] = time.time()
        self.recent.add(
            TransferRecord(
                tid, "sent", site, sealed.total_length, "admitted", utc_now(), route=route
            )
        )

    def published(self, sealed: SealedTransfer, published_bytes: int) -> None:
        """The broker confirmed every message of a transfer."""
        site = sealed.recipient_site
        self.fragments_published.labels(site).inc(sealed.fragment_count)
        self.published_bytes.labels(site).inc(published_bytes)
        self.recent.update(sealed.transfer_id_hex, "sent", outcome="published")

    def contact(self, site: str) -> None:
        """A message verified as ``site``'s came from it: a control message (a receipt, a
        query, a response) or a whole transfer."""
        self.last_contact[site] = utc_now()

    def receipt(
        self, from_site: str, receipt: Receipt, *, created_at: str | None, known: bool
    ) -> None:
        """A receipt came back for an outbox entry (``known``: the entry was there;
        ``created_at``: its admission time as its state recorded it)."""
        tid = receipt.transfer_id.hex()
        if not known:
            self.receipts_unmatched.labels(from_site).inc()
            return
        self.receipts.labels(from_site, receipt.outcome).inc()
        if receipt.outcome == "stored":
            admitted = self._admitted_at.pop(tid, None)
            if admitted is None and (at := _iso(created_at)) is not None:
                admitted = at.timestamp()
            if admitted is not None:
                self.latency.labels(from_site).observe(max(0.0, time.time() - admitted))
        else:
            self.receipt_failures.labels(from_site, status_text(receipt.status)).inc()
        record = TransferRecord(tid, "sent", from_site, None, receipt.outcome, utc_now())
        self.recent.update(
            tid,
            "sent",
            outcome=receipt.outcome,
            status=receipt.status,
            otherwise=replace(record, status=receipt.status),
        )

    def delivered(self, incoming: IncomingTransfer, receipt: Receipt) -> None:
        """A received instance went to a local node: stored, or given up (quarantined)."""
        from_site, size_bytes = incoming.sender_site, incoming.total_length
        node = str(incoming.meta.get("node", ""))
        if receipt.outcome == "stored":
            self.received_instances.labels(from_site, node).inc()
            self.received_bytes.labels(from_site, node).inc(size_bytes)
        else:
            self.delivery_failures.labels(from_site, status_text(receipt.status)).inc()
        self.recent.add(
            TransferRecord(
                incoming.transfer_id.hex(),
                "received",
                from_site,
                size_bytes,
                receipt.outcome,
                utc_now(),
                node=node,
                status=receipt.status,
            )
        )
