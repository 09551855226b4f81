"""Retention: how old and how big each storage area is, alarms, and the purge.

Outbox, spool, incoming and quarantine hold PHI (sealed or plaintext); done markers hold
transfer ids and receipts only. Each area has an age limit (``[retention]`` in
``gateway.toml``); an item's age comes from the time its own files record::

    outbox/<tid>.sealed            its state's created_at      alarm only, unless purge_outbox
    spool/<sender>/<tid>/          newest file's mtime          purged (the sender re-sends)
    incoming/<sender>.<tid>.dcm    the file's mtime             alarm only (delivery quarantines)
    quarantine/<sender>/<tid>/     reason.json at               purged
    done/<sender>/<tid>            the marker's mtime           purged

An area *warns* when its oldest item reaches ``warn_at_fraction`` of its age limit, or
its size (or, for the outbox, its count) that fraction of its cap; it is *over* when an
item is past its age or the cap is reached. ``survey`` only reads; ``purge`` removes the
items past their age in the areas that may be purged. A directory is first renamed into
``<root>/.trash/`` (durably), then deleted, so a half-deleted entry never looks whole; a
crash leaves it in the trash, which the next purge empties. The gateway runs all of it
periodically (``run_retention``) while its other tasks add and remove entries: an entry
that vanishes while it is looked at is skipped, never an error.

Logs carry ids, sites, sizes and ages: no PHI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from dicombridge.config import RetentionSection
from dicombridge.durable import fsync_dir
from dicombridge.errors import EnvelopeError
from dicombridge.fragments import SEALED_SUFFIX, SealedTransfer
from dicombridge.keys import utc_now

log = logging.getLogger(__name__)

Level = Literal["ok", "warning", "over"]
AreaName = Literal["outbox", "spool", "incoming", "quarantine", "done"]

AREAS: Final[tuple[AreaName, ...]] = ("outbox", "spool", "incoming", "quarantine", "done")
TRASH_DIR: Final = ".trash"
_DAY_S: Final = 86400.0
_LEVELS: Final[tuple[Level, ...]] = ("ok", "warning", "over")


@dataclass(frozen=True)
class RetentionItem:
    """One entry of an area: a transfer's directory or file(s), its size and age."""

    area: AreaName
    transfer_id: str
    # The other site: the recipient for the outbox, the sender everywhere else.
    site: str | None
    path: Path
    size_bytes: int
    age_s: float

    def summary(self) -> dict[str, Any]:
        """Ids, sizes and age: what is printed and logged (no PHI, no path)."""
        return {
            "area": self.area,
            "id": self.transfer_id,
            "site": self.site,
            "size_bytes": self.size_bytes,
            "age_s": round(self.age_s),
        }


@dataclass(frozen=True)
class AreaReport:
    """What one area holds against its limits."""

    area: AreaName
    count: int
    size_bytes: int
    oldest_age_s: float | None
    max_age_s: float
    max_bytes: int | None
    max_count: int | None
    past_limit: int
    purged: bool  # whether items past their age are purged (else: alarm only)
    level: Level

    def summary(self) -> dict[str, Any]:
        return {
            "area": self.area,
            "count": self.count,
            "size_bytes": self.size_bytes,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s),
            "max_age_s": round(self.max_age_s),
            "max_bytes": self.max_bytes,
            "max_count": self.max_count,
            "past_limit": self.past_limit,
            "past_limit_action": "purge" if self.purged else "alarm",
            "level": self.level,
        }


@dataclass(frozen=True)
class RetentionReport:
    """Every area at one moment."""

    at: datetime
    areas: tuple[AreaReport, ...]

    @property
    def level(self) -> Level:
        return max((a.level for a in self.areas), key=_LEVELS.index, default="ok")

    def area(self, name: AreaName) -> AreaReport:
        return next(a for a in self.areas if a.area == name)

    def summary(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "level": self.level,
            "areas": [a.summary() for a in self.areas],
        }


@dataclass(frozen=True)
class _Limits:
    max_age_s: float
    max_bytes: int | None
    max_count: int | None
    purged: bool


def _limits(
    settings: RetentionSection, *, outbox_max_bytes: int | None, outbox_max_count: int | None
) -> dict[AreaName, _Limits]:
    return {
        "outbox": _Limits(
            settings.outbox_max_age_days * _DAY_S,
            outbox_max_bytes,
            outbox_max_count,
            settings.purge_outbox,
        ),
        "spool": _Limits(
            settings.spool_max_age_days * _DAY_S, settings.spool_max_bytes, None, True
        ),
        "incoming": _Limits(
            settings.incoming_max_age_days * _DAY_S, settings.incoming_max_bytes, None, False
        ),
        "quarantine": _Limits(
            settings.quarantine_max_age_days * _DAY_S, settings.quarantine_max_bytes, None, True
        ),
        "done": _Limits(settings.done_max_age_days * _DAY_S, None, None, True),
    }


# --- reading the areas ------------------------------------------------------------------
#
# Each area lists candidate paths, and reads one item from a path (None if it vanished or
# is not an entry). Reading one path again just before a purge re-checks its age.


def _children(folder: Path) -> list[Path]:
    """Entries of ``folder``, hidden names (temporary files, trash) left out."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _grandchildren(folder: Path) -> Iterator[Path]:
    for sender in _children(folder):
        yield from _children(sender)


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``; files vanishing meanwhile count as 0."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for path in _children(folder):
        with contextlib.suppress(FileNotFoundError):
            newest = max(newest, path.stat().st_mtime)
    return newest


def _recorded_at(path: Path, key: str) -> datetime | None:
    """The ISO timestamp under ``key`` in a JSON file, if it is there and readable."""
    try:
        return _timestamp(path.read_bytes(), key)
    except OSError:
        return None


def _timestamp(data: bytes | dict[str, Any], key: str) -> datetime | None:
    """The ISO timestamp under ``key`` in a JSON document (its bytes, or already
    parsed), if it is there and readable."""
    try:
        document = json.loads(data) if isinstance(data, bytes) else data
        value = document[key] if isinstance(document, dict) else None
        at = datetime.fromisoformat(str(value)) if value else None
    except (ValueError, KeyError):
        return None
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at


def _from_mtime(mtime: float) -> datetime:
    return datetime.fromtimestamp(mtime, tz=UTC)


def _age_s(now: datetime, at: datetime) -> float:
    # A timestamp ahead of our clock (skew) counts as new, not as negative.
    return max(0.0, (now - at).total_seconds())


def _outbox_item(path: Path, now: datetime) -> RetentionItem | None:
    if path.suffix != SEALED_SUFFIX:
        return None  # not a sealed transfer (an older version's entry, migrated at start)
    try:
        transfer = SealedTransfer.load(path)
        info = SealedTransfer.info(path)
        state = transfer.read_state()
        stat = path.stat()
    except (FileNotFoundError, EnvelopeError):
        return None  # not (or no longer) a whole entry: purged or received
    # When it was admitted (its state), else sealed (its info), else its mtime.
    at = (
        _timestamp(state, "created_at")
        or _timestamp(info, "created_at")
        or _from_mtime(stat.st_mtime)
    )
    size = stat.st_size
    site = transfer.recipient_site
    return RetentionItem("outbox", transfer.transfer_id_hex, site, path, size, _age_s(now, at))


def _spool_item(path: Path, now: datetime) -> RetentionItem | None:
    try:
        if not path.is_dir():
            return None
        # Since the last message of the transfer arrived: one still arriving is not old.
        at = _from_mtime(_newest_mtime(path))
        size = _tree_bytes(path)
    except FileNotFoundError:
        return None
    return RetentionItem("spool", path.name, path.parent.name, path, size, _age_s(now, at))


def _incoming_item(path: Path, now: datetime) -> RetentionItem | None:
    sender, _, tid = path.stem.rpartition(".")
    try:
        at = _from_mtime(path.stat().st_mtime)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    for extra in (path.with_suffix(".json"), path.with_suffix(".storing")):
        with contextlib.suppress(FileNotFoundError):
            size += extra.stat().st_size
    return RetentionItem("incoming", tid, sender or None, path, size, _age_s(now, at))


def _quarantine_item(path: Path, now: datetime) -> RetentionItem | None:
    try:
        if not path.is_dir():
            return None
        at = _recorded_at(path / "reason.json", "at") or _from_mtime(path.stat().st_mtime)
        size = _tree_bytes(path)
    except FileNotFoundError:
        return None
    return RetentionItem("quarantine", path.name, path.parent.name, path, size, _age_s(now, at))


def _done_item(path: Path, now: datetime) -> RetentionItem | None:
    # The marker is written when the transfer is done and again with its receipt; its
    # mtime is that moment. Not parsed: there may be millions, some hold no timestamp.
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    age = _age_s(now, _from_mtime(stat.st_mtime))
    return RetentionItem("done", path.name, path.parent.name, path, stat.st_size, age)


def _candidates(root: Path, area: AreaName) -> Iterator[Path]:
    if area == "outbox":
        yield from _children(root / "outbox")
    elif area == "incoming":
        yield from (p for p in _children(root / "incoming") if p.suffix == ".dcm")
    else:
        yield from _grandchildren(root / area)


_READERS: Final[dict[AreaName, Callable[[Path, datetime], RetentionItem | None]]] = {
    "outbox": _outbox_item,
    "spool": _spool_item,
    "incoming": _incoming_item,
    "quarantine": _quarantine_item,
    "done": _done_item,
}


def _items(root: Path, area: AreaName, now: datetime) -> list[RetentionItem]:
    read = _READERS[area]
    return [item for path in _candidates(root, area) if (item := read(path, now)) is not None]


def _level(
    items: list[RetentionItem], limits: _Limits, fraction: float, oldest: float | None
) -> Level:
    size = sum(i.size_bytes for i in items)
    checks = [(oldest or 0.0, limits.max_age_s), (float(size), limits.max_bytes)]
    checks.append((float(len(items)), limits.max_count))
    reached = [(value, float(cap)) for value, cap in checks if cap]
    if any(value >= cap for value, cap in reached):
        return "over"
    if any(value >= fraction * cap for value, cap in reached):
        return "warning"
    return "ok"


def _survey(
    root: Path,
    settings: RetentionSection,
    now: datetime,
    *,
    outbox_max_bytes: int | None,
    outbox_max_count: int | None,
) -> tuple[RetentionReport, list[RetentionItem]]:
    """The report, and the items past their age in the areas that are purged."""
    limits = _limits(settings, outbox_max_bytes=outbox_max_bytes, outbox_max_count=outbox_max_count)
    areas: list[AreaReport] = []
    expired: list[RetentionItem] = []
    for area in AREAS:
        items = _items(root, area, now)
        limit = limits[area]
        oldest = max((i.age_s for i in items), default=None)
        past = [i for i in items if i.age_s >= limit.max_age_s]
        if limit.purged:
            expired.extend(past)
        areas.append(
            AreaReport(
                area=area,
                count=len(items),
                size_bytes=sum(i.size_bytes for i in items),
                oldest_age_s=oldest,
                max_age_s=limit.max_age_s,
                max_bytes=limit.max_bytes,
                max_count=limit.max_count,
                past_limit=len(past),
                purged=limit.purged,
                level=_level(items, limit, settings.warn_at_fraction, oldest),
            )
        )
    return RetentionReport(now, tuple(areas)), expired


def survey(
    storage_root: Path,
    settings: RetentionSection,
    now: datetime,
    *,
    outbox_max_bytes: int | None = None,
    outbox_max_count: int | None = None,
) -> RetentionReport:
    """Count, size and oldest age of every area against its limits; reads only.

    ``outbox_max_bytes`` and ``outbox_max_count`` are the outbox's caps (``[outbox]``):
    reaching them makes the SCP answer 0xA700, so the alarm warns before.
    """
    report, _ = _survey(
        storage_root,
        settings,
        now,
        outbox_max_bytes=outbox_max_bytes,
        outbox_max_count=outbox_max_count,
    )
    return report


# --- removing ---------------------------------------------------------------------------


def _empty_trash(root: Path) -> None:
    """Finish deleting what an earlier purge moved to the trash before a crash."""
    for leftover in _children_all(root / TRASH_DIR):
        _delete(leftover)


def _children_all(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _delete(path: Path) -> None:
    # Another process (the CLI beside the gateway) may be emptying the same trash.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.exists():
        log.warning("retention: could not delete all of a trash entry", extra={"trash": path.name})


def _remove(root: Path, item: RetentionItem) -> bool:
    """Remove one item; False if it vanished first (another task removed it)."""
    if item.area == "done":
        try:
            item.path.unlink()
        except FileNotFoundError:
            return False
        return True
    trash = root / TRASH_DIR
    trash.mkdir(exist_ok=True)
    target = trash / f"{item.area}.{item.site}.{item.transfer_id}.{secrets.token_hex(4)}"
    try:
        os.rename(item.path, target)
    except FileNotFoundError:
        return False
    # Durable before a file of it is deleted: after a crash the entry is whole or gone.
    fsync_dir(item.path.parent)
    fsync_dir(trash)
    _delete(target)
    return True


def purge(
    storage_root: Path,
    settings: RetentionSection,
    now: datetime,
    *,
    dry_run: bool,
) -> list[RetentionItem]:
    """Remove what is past its age in spool, quarantine, done (and outbox if enabled).

    Returns what was removed (with ``dry_run``: what would be, removing nothing). Each
    item's age is read again just before it goes, so an entry renewed meanwhile stays.
    """
    _, expired = _survey(storage_root, settings, now, outbox_max_bytes=None, outbox_max_count=None)
    return _purge(storage_root, settings, now, expired, dry_run=dry_run)


def _purge(
    root: Path,
    settings: RetentionSection,
    now: datetime,
    expired: list[RetentionItem],
    *,
    dry_run: bool,
) -> list[RetentionItem]:
    if dry_run:
        return expired
    _empty_trash(root)
    limits = _limits(settings, outbox_max_bytes=None, outbox_max_count=None)
    removed: list[RetentionItem] = []
    for item in expired:
        again = _READERS[item.area](item.path, now)
        if again is None or again.age_s < limits[item.area].max_age_s:
            continue
        if not _remove(root, again):
            continue
        removed.append(again)
        fields = {
            "area": again.area,
            "transfer_id": again.transfer_id,
            "site": again.site,
            "bytes": again.size_bytes,
            "age_s": round(again.age_s),
        }
        if item.area == "outbox":
            # Never confirmed stored by the recipient: this instance is lost for it.
            log.warning("retention: unsent outbox entry purged (purge_outbox is on)", extra=fields)
        else:
            log.info("retention: purged", extra=fields)
    return removed


# --- in the gateway ---------------------------------------------------------------------


def check(
    storage_root: Path,
    settings: RetentionSection,
    now: datetime,
    *,
    outbox_max_bytes: int | None = None,
    outbox_max_count: int | None = None,
) -> tuple[RetentionReport, list[RetentionItem]]:
    """One round as the gateway runs it: survey, log alarms, purge; report and removed."""
    report, expired = _survey(
        storage_root,
        settings,
        now,
        outbox_max_bytes=outbox_max_bytes,
        outbox_max_count=outbox_max_count,
    )
    for area in report.areas:
        if area.level == "ok":
            continue
        log.warning(
            "retention: %s %s",
            area.area,
            "past its limit" if area.level == "over" else "nearing its limit",
            extra={
                "area": area.area,
                "level": area.level,
                "count": area.count,
                "bytes": area.size_bytes,
                "oldest_age_s": None if area.oldest_age_s is None else round(area.oldest_age_s),
                "limit_s": round(area.max_age_s),
                "max_bytes": area.max_bytes,
                "past_limit": area.past_limit,
                "action": "purge" if area.purged else "alarm only",
            },
        )
    return report, _purge(storage_root, settings, now, expired, dry_run=False)


async def run_retention(
    storage_root: Path,
    settings: RetentionSection,
    *,
    interval_s: float | None = None,
    outbox_max_bytes: int | None = None,
    outbox_max_count: int | None = None,
    on_purged: Callable[[RetentionItem], None] | None = None,
) -> None:
    """Run ``check`` now and every ``interval_s`` (default ``check_interval_s``) until
    cancelled. The file system work runs in a thread, off the event loop.

    ``on_purged`` is called on the loop for every item removed (the gateway's outbox
    forgets a purged entry's size). An ``OSError`` (a permission, a full disk) is logged
    and the next round tries again: retention never stops the gateway.
    """
    period_s = settings.check_interval_s if interval_s is None else interval_s
    while True:
        try:
            _, removed = await asyncio.to_thread(
                check,
                storage_root,
                settings,
                utc_now(),
                outbox_max_bytes=outbox_max_bytes,
                outbox_max_count=outbox_max_count,
            )
        except OSError as exc:
            log.error(
                "retention: check failed; trying again next round",
                extra={"error": type(exc).__name__, "errno": exc.errno},
            )
        else:
            if on_purged is not None:
                for item in removed:
                    on_purged(item)
        await asyncio.sleep(period_s)
