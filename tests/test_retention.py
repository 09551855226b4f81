"""Retention: ages, alarms and the purge over storage filled through the real code paths."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dicombridge import retention
from dicombridge.config import RetentionSection, load
from dicombridge.errors import ConfigError
from dicombridge.fragments import SealedTransfer
from dicombridge.identity import init_site
from dicombridge.outbox import Outbox
from dicombridge.quarantine import Quarantine
from dicombridge.retention import AreaName, RetentionItem
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity
from dicombridge.transport import Delivery
from tests.cryptokit import make_federation, messages

DAY = timedelta(days=1)
DEFAULTS = RetentionSection()


class Killed(BaseException):
    """The process dies here (as with SIGKILL: nothing after it runs)."""


@dataclass(frozen=True)
class Storage:
    """A storage root with one entry in each area (two done markers), and when it was made."""

    root: Path
    now: datetime
    outbox: str
    spool: str
    incoming: str
    quarantine: str

    def path(self, area: AreaName) -> Path:
        r = self.root
        return {
            "outbox": r / "outbox" / f"{self.outbox}.sealed",
            "spool": r / "spool" / "hosp-a" / self.spool,
            "incoming": r / "incoming" / f"hosp-a.{self.incoming}.dcm",
            "quarantine": r / "quarantine" / "hosp-a" / self.quarantine,
            "done": r / "done" / "hosp-a" / self.incoming,
        }[area]


@pytest.fixture
async def storage(tmp_path: Path) -> Storage:
    """Outbox entry, incomplete spool transfer, transfer in incoming/, quarantined one."""
    fed = make_federation()
    root = tmp_path / "var"

    def source(size: int) -> Path:
        path = tmp_path / f"src-{os.urandom(4).hex()}.bin"
        path.write_bytes(os.urandom(size))
        return path

    outbox = Outbox(root / "outbox", max_bytes=10**9, max_count=100)
    waiting = outbox.admit(
        source(3000),
        sender=fed.sender("hosp-a"),
        directory=fed.directory,
        site="hosp-c",
        fragment_size=4096,
        meta={},
    )

    async def keep_in_incoming(incoming: IncomingTransfer) -> None:
        """The PACS is down: the transfer stays in incoming/."""

    receiver = Receiver(
        root, ReceiverIdentity("hosp-b", fed.keys["hosp-b"], fed.directory), keep_in_incoming
    )
    sent = tmp_path / "sent"

    async def receive(bodies: list[bytes]) -> None:
        for body in bodies:
            await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))

    received = fed.seal(source(5000), sent, fragment_size=2000)
    await receive(messages(received))
    incomplete = fed.seal(source(5000), sent, fragment_size=2000)
    await receive(messages(incomplete)[:-1])
    tampered = fed.seal(source(5000), sent, fragment_size=2000)
    bodies = messages(tampered)
    bodies[-1] = bodies[-1][:-1] + bytes([bodies[-1][-1] ^ 1])
    await receive(bodies)
    assert receiver.quarantined == 1
    return Storage(
        root,
        datetime.now(UTC),
        waiting.transfer_id_hex,
        incomplete.transfer_id_hex,
        received.transfer_id_hex,
        tampered.transfer_id_hex,
    )


def set_json(path: Path, key: str, value: datetime) -> None:
    document = json.loads(path.read_text())
    document[key] = value.isoformat()
    path.write_text(json.dumps(document))


def set_admitted_at(sealed: Path, value: datetime) -> None:
    """Set when an outbox entry was admitted, in its sealed file's state block."""
    transfer = SealedTransfer.load(sealed)
    state = json.loads(transfer.read_state())
    state["created_at"] = value.isoformat()
    transfer.write_state(json.dumps(state).encode())


def set_mtime(path: Path, value: datetime) -> None:
    for target in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(target, (value.timestamp(), value.timestamp()))


def age(storage: Storage, area: AreaName, days: float) -> None:
    """Make an area's entry ``days`` old at ``storage.now`` where the code records it."""
    at = storage.now - days * DAY
    path = storage.path(area)
    if area == "outbox":
        set_admitted_at(path, at)
    elif area == "quarantine":
        set_json(path / "reason.json", "at", at)
    else:
        set_mtime(path, at)


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def ids(items: list[RetentionItem]) -> set[tuple[str, str]]:
    return {(item.area, item.transfer_id) for item in items}


def test_fresh_storage_is_all_ok(storage: Storage) -> None:
    """Fresh entries are counted and sized per area, none past a limit, every level ok."""
    report = retention.survey(storage.root, DEFAULTS, storage.now)
    counts = {a.area: (a.count, a.past_limit, a.level) for a in report.areas}
    assert counts == {
        "outbox": (1, 0, "ok"),
        "spool": (1, 0, "ok"),
        "incoming": (1, 0, "ok"),
        "quarantine": (1, 0, "ok"),
        "done": (2, 0, "ok"),  # the transfer received and the one quarantined
    }
    assert all(a.size_bytes > 0 for a in report.areas)
    assert report.area("incoming").size_bytes > 5000  # the plaintext and its sidecar
    assert report.level == "ok"
    assert retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False) == []


def test_ages_come_from_the_recorded_timestamps(storage: Storage) -> None:
    """Outbox and quarantine ages come from created_at and reason.json, not file times."""
    age(storage, "outbox", 10)
    age(storage, "quarantine", 3)
    age(storage, "spool", 2)
    set_mtime(storage.path("outbox"), storage.now)  # a later touch does not make it younger
    report = retention.survey(storage.root, DEFAULTS, storage.now)
    assert report.area("outbox").oldest_age_s == pytest.approx(10 * 86400)
    assert report.area("quarantine").oldest_age_s == pytest.approx(3 * 86400)
    assert report.area("spool").oldest_age_s == pytest.approx(2 * 86400)
    assert report.area("incoming").oldest_age_s == pytest.approx(0, abs=5)


def test_spool_age_counts_from_the_last_message_that_arrived(storage: Storage) -> None:
    """An incomplete transfer still receiving fragments is young, however old its first one."""
    path = storage.path("spool")
    set_mtime(path, storage.now - 20 * DAY)
    newest = sorted(path.glob("*.frag"))[-1]
    set_mtime(newest, storage.now - 1 * DAY)
    report = retention.survey(storage.root, DEFAULTS, storage.now)
    assert report.area("spool").oldest_age_s == pytest.approx(86400)


@pytest.mark.parametrize(
    ("area", "limit_days"),
    [("outbox", 14), ("spool", 7), ("incoming", 2), ("quarantine", 30), ("done", 90)],
)
@pytest.mark.parametrize(
    ("fraction", "level"), [(0.79, "ok"), (0.81, "warning"), (0.99, "warning"), (1.01, "over")]
)
def test_age_alarm_levels(
    storage: Storage, area: AreaName, limit_days: float, fraction: float, level: str
) -> None:
    """An area warns at 80% of its age limit and is over at the limit."""
    age(storage, area, limit_days * fraction)
    report = retention.survey(storage.root, DEFAULTS, storage.now)
    assert report.area(area).level == level
    assert report.area(area).past_limit == (1 if level == "over" else 0)
    assert report.area(area).max_age_s == limit_days * 86400


def test_size_and_count_alarms(storage: Storage) -> None:
    """Outbox size and count against [outbox] caps, other areas against their byte limits."""
    before = retention.survey(storage.root, DEFAULTS, storage.now)
    outbox_bytes = before.area("outbox").size_bytes
    quarantine_bytes = before.area("quarantine").size_bytes

    def levels(settings: RetentionSection, **caps: int) -> dict[str, str]:
        report = retention.survey(storage.root, settings, storage.now, **caps)
        return {a.area: a.level for a in report.areas}

    assert levels(DEFAULTS, outbox_max_bytes=outbox_bytes * 2)["outbox"] == "ok"
    assert levels(DEFAULTS, outbox_max_bytes=int(outbox_bytes / 0.8))["outbox"] == "warning"
    assert levels(DEFAULTS, outbox_max_bytes=outbox_bytes)["outbox"] == "over"
    assert levels(DEFAULTS, outbox_max_count=1)["outbox"] == "over"
    assert levels(DEFAULTS, outbox_max_count=2)["outbox"] == "ok"
    limited = RetentionSection(quarantine_max_bytes=int(quarantine_bytes / 0.9))
    assert levels(limited)["quarantine"] == "warning"
    # Nothing is purged for its size.
    assert retention.purge(storage.root, limited, storage.now, dry_run=False) == []


def test_purge_removes_only_what_is_past_its_limit(storage: Storage) -> None:
    """Spool, quarantine and done markers past their age go; outbox and incoming stay."""
    age(storage, "spool", 7.5)
    age(storage, "quarantine", 31)
    age(storage, "done", 91)
    age(storage, "outbox", 20)
    age(storage, "incoming", 5)
    removed = retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False)
    assert ids(removed) == {
        ("spool", storage.spool),
        ("quarantine", storage.quarantine),
        ("done", storage.incoming),
    }
    assert all(item.size_bytes > 0 for item in removed)
    for area in ("spool", "quarantine", "done"):
        assert not storage.path(area).exists()
    assert Quarantine(storage.root).entries() == []
    # The quarantined transfer's marker is younger: kept, so its replays are still dropped.
    assert (storage.root / "done" / "hosp-a" / storage.quarantine).exists()
    assert list((storage.root / retention.TRASH_DIR).iterdir()) == []
    report = retention.survey(storage.root, DEFAULTS, storage.now)
    outbox = report.area("outbox")
    assert (outbox.count, outbox.past_limit, outbox.level, outbox.purged) == (1, 1, "over", False)
    assert report.area("incoming").level == "over"
    outbox_entries = Outbox(storage.root / "outbox", max_bytes=10**9, max_count=9).entries()
    assert [e.transfer.transfer_id_hex for e in outbox_entries] == [storage.outbox]


def test_outbox_is_purged_only_when_enabled(storage: Storage) -> None:
    """An outbox entry past its age is kept by default and purged with purge_outbox on."""
    age(storage, "outbox", 15)
    assert retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False) == []
    assert storage.path("outbox").exists()
    enabled = RetentionSection(purge_outbox=True)
    removed = retention.purge(storage.root, enabled, storage.now, dry_run=False)
    assert [(i.area, i.transfer_id, i.site) for i in removed] == [
        ("outbox", storage.outbox, "hosp-c")
    ]
    assert Outbox(storage.root / "outbox", max_bytes=10**9, max_count=9).entries() == []


def test_dry_run_removes_nothing(storage: Storage) -> None:
    """A dry run lists exactly what a purge then removes, and leaves every file in place."""
    for area in retention.AREAS:
        age(storage, area, 100)
    before = snapshot(storage.root)
    listed = retention.purge(storage.root, DEFAULTS, storage.now, dry_run=True)
    assert snapshot(storage.root) == before
    assert {i.area for i in listed} == {"spool", "quarantine", "done"}
    removed = retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False)
    assert ids(removed) == ids(listed)


def test_entry_removed_by_the_gateway_meanwhile_is_skipped(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries that vanish between the survey and their removal are skipped, not errors."""
    for area in ("spool", "quarantine", "done"):
        age(storage, area, 100)
    survey = retention._survey

    def survey_then_vanish(*args: Any, **kwargs: Any) -> Any:
        report, expired = survey(*args, **kwargs)
        for item in expired:  # a re-send completed it, an operator retried it, ...
            if item.path.is_dir():
                shutil.rmtree(item.path)
            else:
                item.path.unlink()
        return report, expired

    monkeypatch.setattr(retention, "_survey", survey_then_vanish)
    assert retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False) == []


def test_entry_vanishing_while_it_is_read_is_skipped(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry deleted while its size is being read does not fail the survey."""
    tree_bytes = retention._tree_bytes
    vanish = storage.path("quarantine")

    def vanishing(folder: Path) -> int:
        if folder == vanish:
            shutil.rmtree(folder)
        return tree_bytes(folder)

    monkeypatch.setattr(retention, "_tree_bytes", vanishing)
    report = retention.survey(storage.root, DEFAULTS, storage.now)
    assert report.area("quarantine").size_bytes == 0
    assert report.area("outbox").count == 1


def test_entry_renewed_meanwhile_is_kept(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry found past its age but renewed before its removal (a re-send) stays."""
    age(storage, "spool", 10)
    survey = retention._survey

    def survey_then_renew(*args: Any, **kwargs: Any) -> Any:
        result = survey(*args, **kwargs)
        age(storage, "spool", 0)
        return result

    monkeypatch.setattr(retention, "_survey", survey_then_renew)
    assert retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False) == []
    assert storage.path("spool").exists()


def test_crash_during_a_purge_never_leaves_a_half_entry(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the rename, the entry is gone from quarantine whole; the next purge
    empties the trash."""
    age(storage, "quarantine", 40)
    delete = retention._delete

    def crash(path: Path) -> None:
        raise Killed

    monkeypatch.setattr(retention, "_delete", crash)
    with pytest.raises(Killed):
        retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False)
    assert Quarantine(storage.root).entries() == []
    trash = storage.root / retention.TRASH_DIR
    assert len(list(trash.iterdir())) == 1
    assert retention.survey(storage.root, DEFAULTS, storage.now).area("quarantine").count == 0
    monkeypatch.setattr(retention, "_delete", delete)
    assert retention.purge(storage.root, DEFAULTS, storage.now, dry_run=False) == []
    assert list(trash.iterdir()) == []


async def test_run_retention_alarms_and_purges(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway's loop logs an alarm per area near or past its limit and purges."""
    real_now = datetime.now(UTC)
    set_json(storage.path("quarantine") / "reason.json", "at", real_now - 40 * DAY)
    set_admitted_at(storage.path("outbox"), real_now - 12 * DAY)
    purged: list[RetentionItem] = []
    done = asyncio.Event()

    def on_purged(item: RetentionItem) -> None:
        purged.append(item)
        done.set()

    caplog.set_level(logging.INFO, logger="dicombridge.retention")
    task = asyncio.create_task(
        retention.run_retention(storage.root, DEFAULTS, interval_s=0.01, on_purged=on_purged)
    )
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ids(purged) == {("quarantine", storage.quarantine)}
    alarms = {
        vars(r)["area"]: vars(r)
        for r in caplog.records
        if r.levelno == logging.WARNING and "area" in vars(r)
    }
    assert set(alarms) == {"outbox", "quarantine"}
    assert alarms["outbox"]["level"] == "warning"
    assert alarms["outbox"]["limit_s"] == 14 * 86400
    assert alarms["outbox"]["oldest_age_s"] == pytest.approx(12 * 86400, abs=60)
    assert alarms["quarantine"]["level"] == "over"
    assert alarms["quarantine"]["count"] == 1
    assert alarms["quarantine"]["bytes"] > 0
    purge_logs = [vars(r) for r in caplog.records if r.getMessage() == "retention: purged"]
    assert purge_logs[0]["transfer_id"] == storage.quarantine
    assert purge_logs[0]["bytes"] == purged[0].size_bytes


async def test_run_retention_survives_an_unreadable_area(
    storage: Storage, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError in one round is logged and the loop goes on to the next round."""
    rounds: list[int] = []
    check = retention.check
    again = asyncio.Event()

    def flaky(*args: Any, **kwargs: Any) -> Any:
        rounds.append(1)
        if len(rounds) == 1:
            raise PermissionError(13, "Permission denied")
        again.set()
        return check(*args, **kwargs)

    monkeypatch.setattr(retention, "check", flaky)
    task = asyncio.create_task(retention.run_retention(storage.root, DEFAULTS, interval_s=0.01))
    try:
        await asyncio.wait_for(again.wait(), timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert any(r.getMessage().startswith("retention: check failed") for r in caplog.records)


def test_missing_storage_root_is_empty_and_ok(tmp_path: Path) -> None:
    """Before the gateway first ran, every area is empty and nothing fails."""
    report = retention.survey(tmp_path / "nothing", DEFAULTS, datetime.now(UTC))
    assert [(a.count, a.size_bytes, a.oldest_age_s, a.level) for a in report.areas] == [
        (0, 0, None, "ok")
    ] * len(retention.AREAS)
    assert retention.purge(tmp_path / "nothing", DEFAULTS, datetime.now(UTC), dry_run=False) == []


# --- [retention] in gateway.toml --------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A freshly initialised site's gateway.toml."""
    return init_site(tmp_path / "s", site_id="hosp-a", broker_url="amqps://hosp-a@n1/fed")


def test_defaults_are_written_by_init_and_keep_the_outbox(config: Path) -> None:
    """`init` writes [retention] with the documented defaults; the outbox is never purged."""
    settings = load(config).retention
    assert settings == DEFAULTS
    assert (settings.quarantine_max_age_days, settings.spool_max_age_days) == (30, 7)
    assert (settings.outbox_max_age_days, settings.done_max_age_days) == (14, 90)
    assert settings.purge_outbox is False
    assert settings.warn_at_fraction == 0.8


def test_done_markers_must_outlive_the_outbox(config: Path) -> None:
    """Done markers shorter-lived than outbox entries fail naming file, field and fix."""
    text = config.read_text()
    config.write_text(text.replace("outbox_max_age_days = 14", "outbox_max_age_days = 120"))
    with pytest.raises(ConfigError, match="done_max_age_days") as caught:
        load(config)
    assert caught.value.path == str(config)
    assert caught.value.field == "retention"
    assert "raise done_max_age_days" in caught.value.fix


def test_bad_retention_values_name_the_field(config: Path) -> None:
    """An alarm fraction of 1 or more, or an unknown key, is refused with its field."""
    text = config.read_text()
    config.write_text(text.replace("warn_at_fraction = 0.8", "warn_at_fraction = 1.5"))
    with pytest.raises(ConfigError) as caught:
        load(config)
    assert caught.value.field == "retention.warn_at_fraction"
    config.write_text(text.replace("purge_outbox = false", "purge_outbox = false\nkeep_days = 3"))
    with pytest.raises(ConfigError) as caught:
        load(config)
    assert caught.value.field == "retention.keep_days"
