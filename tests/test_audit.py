"""The audit trail: JSON lines, their fields, rotation by size, writing off the event loop;
the ``[audit]`` section; the UIDs the gateway reads for it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicombridge.audit import FIELDS, AuditTrail, outcome_of
from dicombridge.config import load
from dicombridge.gateway import _read_study_uids
from dicombridge.identity import init_site
from tests import dicomkit

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[AuditTrail]:
    """An open trail at tmp_path/audit/audit.jsonl, closed after the test."""
    opened = AuditTrail(
        tmp_path / "audit" / "audit.jsonl", site="hosp-a", max_bytes=1 << 20, keep=3
    )
    opened.open()
    yield opened
    opened.close()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_record_is_one_json_line_with_its_fields(trail: AuditTrail) -> None:
    """A record carries time (UTC ms), event, site, outcome, hex status and the fields
    given; fields without a value are left out."""
    trail.record(
        "instance-sent",
        status=0x0000,
        to_site="hosp-b",
        calling_ae_title="CT1",
        called_ae_title="HOSP_B",
        node="PACS",
        transfer_id="ab" * 16,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.5",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        query_id=None,
        level="",
    )
    assert trail.flush()
    [record] = lines(trail.path)
    assert TIME.match(record.pop("time"))
    assert record == {
        "event": "instance-sent",
        "site": "hosp-a",
        "outcome": "success",
        "status": "0x0000",
        "to_site": "hosp-b",
        "calling_ae_title": "CT1",
        "called_ae_title": "HOSP_B",
        "node": "PACS",
        "transfer_id": "ab" * 16,
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "sop_instance_uid": "1.2.3.4.5",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    }


def test_records_are_appended_in_order_across_reopening(tmp_path: Path) -> None:
    """A trail opened again appends to the file it left, in the order recorded."""
    path = tmp_path / "audit.jsonl"
    for first in (0, 3):
        trail = AuditTrail(path, site="s", max_bytes=1 << 20, keep=1)
        trail.open()
        for number in range(first, first + 3):
            trail.record("query", status=0, query_id=str(number))
        trail.close()
    assert [r["query_id"] for r in lines(path)] == [str(n) for n in range(6)]


def test_a_field_outside_the_schema_is_refused(trail: AuditTrail) -> None:
    """Only the named audit fields are accepted: a patient name has no field to go in."""
    with pytest.raises(TypeError, match="patient_name"):
        trail.record("instance-sent", patient_name="X")
    assert "patient_name" not in FIELDS


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, "success"),
        (0xB000, "success"),
        (0xB007, "success"),
        (0x0001, "success"),
        (0xA700, "failure"),
        (0xC000, "failure"),
        (0x0124, "failure"),
        (0xA801, "failure"),
    ],
)
def test_outcome_follows_the_dimse_status(status: int, outcome: str) -> None:
    """Success and warnings (PS3.7 C) are success; refusals and errors are failure."""
    assert outcome_of(status) == outcome


def test_an_explicit_outcome_overrides_the_status(trail: AuditTrail) -> None:
    """A record may say failure without a status (a query that could not be published)."""
    trail.record("query", outcome="failure", query_id="q1")
    assert trail.flush()
    [record] = lines(trail.path)
    assert record["outcome"] == "failure"
    assert "status" not in record


def test_rotation_by_size_keeps_n_files(tmp_path: Path) -> None:
    """Past max_bytes the file moves to .1 (older ones shift), at most keep rotated files
    stay, no file passes max_bytes, and the newest records are all kept in order."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, site="hosp-a", max_bytes=2000, keep=2)
    trail.open()
    for number in range(200):
        trail.record("instance-stored", status=0, sop_instance_uid=f"1.2.{number}")
    trail.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 2000
    kept = [
        r["sop_instance_uid"]
        for name in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl")
        for r in lines(tmp_path / name)
    ]
    assert kept == [f"1.2.{n}" for n in range(200 - len(kept), 200)]
    assert 0 < len(kept) < 200


async def test_recording_never_waits_for_the_disk(
    trail: AuditTrail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the writer is stuck in fsync, records made on the event loop return at once
    (queued); once the disk answers, every one of them is written."""
    stuck = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        stuck.set()
        release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)  # the writer calls os.fsync
    trail.record("instance-sent", sop_instance_uid="1.0")
    assert await asyncio.to_thread(stuck.wait, 10)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for number in range(1, 1001):
        trail.record("instance-sent", sop_instance_uid=f"1.{number}")
    assert loop.time() - began < 1.0
    assert trail.written == 1
    release.set()
    assert await asyncio.to_thread(trail.flush)
    assert len(lines(trail.path)) == 1001


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    """With the queue full, a record is dropped and counted; what was queued is written."""
    trail = AuditTrail(
        tmp_path / "audit.jsonl", site="s", max_bytes=1 << 20, keep=1, queue_records=3
    )
    for number in range(5):
        trail.record("instance-sent", sop_instance_uid=f"1.{number}")
    assert trail.dropped == 2
    trail.open()
    trail.close()
    assert [r["sop_instance_uid"] for r in lines(trail.path)] == ["1.0", "1.1", "1.2"]


def test_a_disabled_trail_writes_nothing(tmp_path: Path) -> None:
    """[audit] enabled = false: records are accepted and no file appears."""
    trail = AuditTrail(tmp_path / "audit.jsonl", site="s", max_bytes=1 << 20, keep=1, enabled=False)
    trail.open()
    trail.record("instance-sent", sop_instance_uid="1.2")
    trail.remember("t", {"node": "PACS"})
    trail.close()
    assert not (tmp_path / "audit.jsonl").exists()
    assert trail.recall("t", forget=True) == {}


def test_remembered_fields_are_recalled_once(trail: AuditTrail) -> None:
    """What instance-sent remembers comes back for its receipt, then is forgotten."""
    trail.remember("t1", {"sop_instance_uid": "1.2"})
    assert trail.recall("t1", forget=False) == {"sop_instance_uid": "1.2"}
    assert trail.recall("t1", forget=True) == {"sop_instance_uid": "1.2"}
    assert trail.recall("t1", forget=True) == {}


# --- [audit] in gateway.toml ----------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A freshly initialised site's gateway.toml."""
    return init_site(tmp_path / "s", site_id="hosp-a", broker_url="amqps://hosp-a@n1:5671/fed")


def test_the_default_audit_file_lives_under_the_storage_root(config: Path) -> None:
    """Without [audit], the trail is on, at <storage.root>/audit/audit.jsonl."""
    loaded = load(config)
    assert loaded.audit.enabled
    path = loaded.audit.resolved_path(config_dir=config.parent, storage_root=loaded.storage.root)
    assert path == config.parent / "var" / "audit" / "audit.jsonl"


def test_a_relative_audit_path_is_taken_against_the_config_directory(config: Path) -> None:
    """[audit] path, max_bytes and keep are read; a relative path is the file's sibling."""
    config.write_text(
        config.read_text() + '\n[audit]\npath = "logs/audit.jsonl"\nmax_bytes = 65536\nkeep = 4\n'
    )
    loaded = load(config)
    path = loaded.audit.resolved_path(config_dir=config.parent, storage_root=loaded.storage.root)
    assert path == config.parent / "logs" / "audit.jsonl"
    assert (loaded.audit.max_bytes, loaded.audit.keep) == (65536, 4)


def test_the_template_documents_audit_commented_out(config: Path) -> None:
    """`dicombridge init` writes an [audit] block, commented, with every key; uncommented,
    it loads as written."""
    text = config.read_text()
    start = text.index("# [audit]")
    block = text[start : text.index("\n\n", start)]
    for key in ("enabled", "path", "max_bytes", "keep"):
        assert f"\n# {key} = " in block
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    config.write_text(text.replace(block, uncommented))
    loaded = load(config).audit
    assert loaded.enabled
    assert loaded.path == Path("var/audit/audit.jsonl")
    assert (loaded.max_bytes, loaded.keep) == (104857600, 10)


# --- the UIDs the gateway reads for the trail ------------------------------------------


def test_study_and_series_uids_are_read_from_the_header(tmp_path: Path) -> None:
    """The admission reads Study and Series Instance UIDs from the file's header."""
    path = dicomkit.fresh_copy("CT_small.dcm", tmp_path)
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    assert _read_study_uids(path) == {
        "study_instance_uid": dataset.StudyInstanceUID,
        "series_instance_uid": dataset.SeriesInstanceUID,
    }


def test_an_unreadable_header_gives_no_uids(tmp_path: Path) -> None:
    """A data set pydicom cannot read is still relayed: the audit just lacks its UIDs."""
    assert _read_study_uids(b"\0" * 132 + b"not dicom") == {}
