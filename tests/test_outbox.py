"""The sender's outbox: caps, what is due for a re-send, what a receipt does, a full disk."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicombridge.control import Receipt
from dicombridge.errors import OutboxDiskFullError, OutboxFullError
from dicombridge.fragments import INFO_BYTES, PREAMBLE_BYTES, SealedTransfer
from dicombridge.outbox import Outbox
from tests.cryptokit import Federation, as_legacy_directory, make_federation

PAGE = 4096


@contextlib.contextmanager
def mounted_tmpfs(path: Path, *, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``path``, unmounted after: a disk that fills.

    Needs root; a tmpfs that cannot be mounted fails the test (never a skip).
    """
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs at {path} (these tests need root): {mounted.stderr.strip()}",
            pytrace=False,
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill_disk(directory: Path, *, leave_bytes: int = 0) -> Path:
    """Write a filler file in ``directory`` until about ``leave_bytes`` stay free."""
    filler = directory / "filler"
    chunk = b"\0" * (64 * 1024)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while (room := shutil.disk_usage(directory).free - leave_bytes) > 0:
            try:
                os.write(fd, chunk[: min(len(chunk), room)])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def fed() -> Federation:
    """Sites hosp-a, hosp-b, hosp-c with keys and a signed directory."""
    return make_federation()


def admit(outbox: Outbox, fed: Federation, tmp_path: Path, size: int) -> SealedTransfer:
    source = tmp_path / f"src-{size}-{os.urandom(4).hex()}.bin"
    source.write_bytes(os.urandom(size))
    return outbox.admit(
        source,
        sender=fed.sender("hosp-a"),
        directory=fed.directory,
        site="hosp-b",
        fragment_size=4096,
        meta={"node": "PACS"},
    )


def test_count_cap_refuses_the_next_instance(fed: Federation, tmp_path: Path) -> None:
    """With max_count entries waiting, admitting one more raises OutboxFullError."""
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=2)
    admit(outbox, fed, tmp_path, 100)
    admit(outbox, fed, tmp_path, 100)
    with pytest.raises(OutboxFullError, match="max_count 2"):
        admit(outbox, fed, tmp_path, 100)
    assert outbox.count == 2


def test_byte_cap_refuses_what_would_not_fit(fed: Federation, tmp_path: Path) -> None:
    """An instance that would take the outbox past max_bytes is refused; smaller ones fit."""
    outbox = Outbox(tmp_path / "outbox", max_bytes=2 * 1024 * 1024, max_count=100)
    admit(outbox, fed, tmp_path, 1024 * 1024)
    with pytest.raises(OutboxFullError, match="max_bytes"):
        admit(outbox, fed, tmp_path, 1024 * 1024)
    admit(outbox, fed, tmp_path, 10_000)
    assert outbox.count == 2


def test_caps_count_what_is_on_disk_after_a_restart(fed: Federation, tmp_path: Path) -> None:
    """A new Outbox over the same directory counts the entries already there."""
    first = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=1)
    admit(first, fed, tmp_path, 100)
    second = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=1)
    with pytest.raises(OutboxFullError):
        admit(second, fed, tmp_path, 100)


def test_resend_is_due_only_for_published_entries_without_a_final_receipt(
    fed: Federation, tmp_path: Path
) -> None:
    """Due: published, old enough, no receipt or a transient failure; not: permanent failure."""
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=10)
    waiting, transient, permanent, unpublished = (
        admit(outbox, fed, tmp_path, 100) for _ in range(4)
    )
    for sealed in (waiting, transient, permanent):
        outbox.mark_published(sealed.transfer_id_hex)
    outbox.record_receipt(Receipt(transient.transfer_id, "failed", 0xA702), from_site="hosp-b")
    outbox.record_receipt(Receipt(permanent.transfer_id, "failed", 0xA900), from_site="hosp-b")
    due = {e.transfer.transfer_id_hex for e in outbox.due_for_resend(older_than_s=0)}
    assert due == {waiting.transfer_id_hex, transient.transfer_id_hex}
    assert outbox.due_for_resend(older_than_s=3600) == []
    assert unpublished.transfer_id_hex not in due


def test_stored_receipt_removes_the_entry_only_from_its_recipient(
    fed: Federation, tmp_path: Path
) -> None:
    """A stored receipt from the recipient deletes the entry; one from another site does not."""
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=10)
    sealed = admit(outbox, fed, tmp_path, 100)
    assert (
        outbox.record_receipt(Receipt(sealed.transfer_id, "stored", 0), from_site="hosp-c") is None
    )
    assert outbox.get(sealed.transfer_id_hex) is not None
    outbox.record_receipt(Receipt(sealed.transfer_id, "stored", 0), from_site="hosp-b")
    assert outbox.get(sealed.transfer_id_hex) is None
    assert not sealed.path.exists()
    assert outbox.count == 0


def test_receipt_before_the_publisher_marks_the_entry_published(
    fed: Federation, tmp_path: Path
) -> None:
    """The recipient can answer before the publisher records its confirm: marking the
    ended entry published neither fails nor brings it back; a failed receipt for a
    retrieve's entry ends it too. Marking and ending race from threads without error."""
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=1000)
    sealed = admit(outbox, fed, tmp_path, 100)
    outbox.record_receipt(Receipt(sealed.transfer_id, "stored", 0), from_site="hosp-b")
    outbox.mark_published(sealed.transfer_id_hex)
    assert not sealed.path.exists()
    source = tmp_path / "retrieved.bin"
    source.write_bytes(os.urandom(100))
    retrieved = outbox.admit(
        source,
        sender=fed.sender("hosp-a"),
        directory=fed.directory,
        site="hosp-b",
        fragment_size=4096,
        meta={},
        retrieve="ab" * 16,
    )
    outbox.record_receipt(Receipt(retrieved.transfer_id, "failed", 0xA900), from_site="hosp-b")
    assert outbox.get(retrieved.transfer_id_hex) is None
    entries = [admit(outbox, fed, tmp_path, 100) for _ in range(100)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        ended = pool.map(
            lambda e: outbox.record_receipt(
                Receipt(e.transfer_id, "stored", 0), from_site="hosp-b"
            ),
            entries,
        )
        marked = pool.map(lambda e: outbox.mark_published(e.transfer_id_hex), entries)
        assert all(entry is not None for entry in ended)
        assert list(marked) == [None] * len(entries)
    assert list((tmp_path / "outbox").iterdir()) == []
    assert outbox.count == 0


def test_leftovers_of_a_crash_are_cleared_at_start_and_never_listed(
    fed: Federation, tmp_path: Path
) -> None:
    """What a crash left (a half-sealed .sealing file, a .sealing file beside the sealed
    file it was linked to, an older version's renamed-away or half-deleted entry
    directory) is cleared by recover() and never counted or listed as an entry."""
    root = tmp_path / "outbox"
    outbox = Outbox(root, max_bytes=10**9, max_count=10)
    kept = admit(outbox, fed, tmp_path, 100)
    (root / ".0a0a.sealing").write_bytes(b"half")
    os.link(kept.path, root / f".{kept.transfer_id_hex}.sealing")
    (root / ".0b0b.removing").mkdir()
    (root / ".0b0b.removing" / "fragments.bin").write_bytes(b"x")
    (root / "0c0c").mkdir()  # an older version's entry whose transfer.json rmtree took
    (root / "0c0c" / "fragments.bin").write_bytes(b"x")
    restarted = Outbox(root, max_bytes=10**9, max_count=10)
    assert [e.transfer.transfer_id_hex for e in restarted.entries()] == [kept.transfer_id_hex]
    assert restarted.count == 1
    restarted.recover()
    assert [p.name for p in root.iterdir()] == [kept.path.name]
    assert restarted.count == 1
    restarted.record_receipt(Receipt(kept.transfer_id, "stored", 0), from_site="hosp-b")
    assert list(root.iterdir()) == []
    assert restarted.count == 0


def test_an_older_outbox_is_migrated_at_start_with_its_state(
    fed: Federation, tmp_path: Path
) -> None:
    """Entries of the directory layout become sealed files at recover(): same messages,
    same state (published, attempts, receipt), counted; a directory whose file already
    exists (a crash mid-migration) is removed, not migrated twice."""
    root = tmp_path / "outbox"
    outbox = Outbox(root, max_bytes=10**9, max_count=10)
    published, fresh = admit(outbox, fed, tmp_path, 10_000), admit(outbox, fed, tmp_path, 100)
    twice = admit(outbox, fed, tmp_path, 100)
    messages = {
        t.transfer_id_hex: [t.manifest_body(), *dict(t.fragment_bodies()).values()]
        for t in (published, fresh)
    }
    state = {
        "created_at": "2026-01-01T00:00:00+00:00",
        "attempts": 3,
        "published_at": "2026-01-01T00:00:01+00:00",
    }
    as_legacy_directory(published, state)
    as_legacy_directory(fresh, {"created_at": "2026-01-02T00:00:00+00:00", "attempts": 0})
    (root / twice.transfer_id_hex).mkdir()
    (root / twice.transfer_id_hex / "transfer.json").write_text("{}")

    restarted = Outbox(root, max_bytes=10**9, max_count=10)
    restarted.recover()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        f"{t.transfer_id_hex}.sealed" for t in (published, fresh, twice)
    )
    assert restarted.count == 3
    entries = {e.transfer.transfer_id_hex: e for e in restarted.entries()}
    assert entries[published.transfer_id_hex].state == state
    assert entries[published.transfer_id_hex].published
    assert not entries[fresh.transfer_id_hex].published
    for tid, bodies in messages.items():
        transfer = entries[tid].transfer
        assert [transfer.manifest_body(), *dict(transfer.fragment_bodies()).values()] == bodies
    due = {e.transfer.transfer_id_hex for e in restarted.due_for_resend(older_than_s=0)}
    assert due == {published.transfer_id_hex}


def test_a_stray_file_in_the_outbox_is_logged_and_left_alone(
    fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A *.sealed file that is not a sealed transfer is named in an error log, not listed,
    not deleted; the entries beside it are served."""
    root = tmp_path / "outbox"
    outbox = Outbox(root, max_bytes=10**9, max_count=10)
    kept = admit(outbox, fed, tmp_path, 100)
    stray = root / "ffff.sealed"
    stray.write_bytes(b"copied here by hand")
    with caplog.at_level(logging.ERROR, logger="dicombridge.outbox"):
        listed = [e.transfer.transfer_id_hex for e in outbox.entries()]
    assert listed == [kept.transfer_id_hex]
    assert outbox.get("ffff") is None
    assert stray.exists()
    assert any(r.__dict__.get("file") == "ffff.sealed" for r in caplog.records)


# --- a full disk ------------------------------------------------------------------------


@pytest.fixture
def small_outbox_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for the outbox."""
    with mounted_tmpfs(tmp_path / "outbox", size_bytes=1024 * 1024) as path:
        yield path


def outbox_files(outbox: Path) -> list[str]:
    return sorted(p.name for p in outbox.iterdir())


def test_admit_on_a_full_disk_leaves_nothing_and_works_once_there_is_room(
    fed: Federation, tmp_path: Path, small_outbox_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC while sealing raises OutboxDiskFullError (an OutboxFullError: 0xA700), removes
    the half-written .sealing file, logs the directory and the bytes free; after room
    is freed the same instance is admitted."""
    outbox = Outbox(small_outbox_disk, max_bytes=10**9, max_count=100)
    source = tmp_path / "instance.bin"
    source.write_bytes(os.urandom(300_000))
    filler = fill_disk(small_outbox_disk, leave_bytes=100_000)
    with (
        caplog.at_level(logging.ERROR, logger="dicombridge.outbox"),
        pytest.raises(OutboxDiskFullError, match="bytes free") as info,
    ):
        outbox.admit(
            source,
            sender=fed.sender("hosp-a"),
            directory=fed.directory,
            site="hosp-b",
            fragment_size=65536,
            meta={"node": "PACS"},
        )
    assert isinstance(info.value, OutboxFullError)
    assert info.value.transient
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert outbox_files(small_outbox_disk) == ["filler"]
    assert (outbox.count, outbox.used_bytes, outbox.entries()) == (0, 0, [])
    [record] = [r for r in caplog.records if r.name == "dicombridge.outbox"]
    assert record.levelno == logging.ERROR
    assert "disk full" in record.getMessage()
    assert record.__dict__["directory"] == str(small_outbox_disk)
    assert 0 <= record.__dict__["free_bytes"] < 300_000

    filler.unlink()
    sealed = outbox.admit(
        source,
        sender=fed.sender("hosp-a"),
        directory=fed.directory,
        site="hosp-b",
        fragment_size=65536,
        meta={"node": "PACS"},
    )
    assert outbox_files(small_outbox_disk) == [sealed.path.name]
    assert outbox.count == 1
    entry = outbox.get(sealed.transfer_id_hex)
    assert entry is not None
    assert entry.state["attempts"] == 0
    assert not entry.published


def test_disk_full_after_the_fragments_fit_leaves_no_entry(
    fed: Federation, tmp_path: Path, small_outbox_disk: Path
) -> None:
    """When the fragments fit but the manifest and the preamble written after them do not,
    the transfer is still taken back whole: no entry, no .sealing leftover."""
    source = tmp_path / "instance.bin"
    source.write_bytes(os.urandom(200_000))
    trial = fed.seal(source, tmp_path / "trial", fragment_size=65536)
    outbox = Outbox(small_outbox_disk, max_bytes=10**9, max_count=100)
    # Room for the pages the fragments fill (the preamble before them is a hole until it
    # is written last), and not a page more.
    fragment_pages = -(-(PREAMBLE_BYTES + trial.fragments_bytes) // PAGE) - PREAMBLE_BYTES // PAGE
    fill_disk(small_outbox_disk, leave_bytes=fragment_pages * PAGE)
    with pytest.raises(OutboxDiskFullError) as info:
        outbox.admit(
            source,
            sender=fed.sender("hosp-a"),
            directory=fed.directory,
            site="hosp-b",
            fragment_size=65536,
            meta={"node": "PACS"},
        )
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.ENOSPC
    assert outbox_files(small_outbox_disk) == ["filler"]
    assert outbox.count == 0


def test_state_is_updated_in_place_even_on_a_full_disk(
    fed: Federation, tmp_path: Path, small_outbox_disk: Path
) -> None:
    """The state lives in the sealed file's state block, rewritten in place: marking an
    entry published and recording a receipt need no new file and no new block, so they
    work on a full disk too, and leave no temporary file."""
    outbox = Outbox(small_outbox_disk, max_bytes=10**9, max_count=100)
    sealed = admit(outbox, fed, tmp_path, 10_000)
    inode = sealed.path.stat().st_ino
    fill_disk(small_outbox_disk)
    outbox.mark_published(sealed.transfer_id_hex)
    outbox.record_receipt(
        Receipt(sealed.transfer_id, "failed", 0xA702, "x" * 10_000), from_site="hosp-b"
    )
    entry = outbox.get(sealed.transfer_id_hex)
    assert entry is not None
    assert entry.published
    assert entry.state["receipt"]["status"] == 0xA702
    assert entry.state["receipt"]["error_comment"] == "x" * 256  # kept short, fits the block
    assert sealed.path.stat().st_ino == inode
    assert outbox_files(small_outbox_disk) == sorted(["filler", sealed.path.name])


def test_an_unreadable_state_block_reads_as_not_yet_published(
    fed: Federation, tmp_path: Path
) -> None:
    """A state block a power loss tore reads as no state: the entry is still listed and is
    published again (a re-send costs nothing; its recipient answers with the receipt it
    recorded), its messages intact."""
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=100)
    sealed = admit(outbox, fed, tmp_path, 10_000)
    outbox.mark_published(sealed.transfer_id_hex)
    with open(sealed.path, "r+b") as handle:
        handle.seek(INFO_BYTES + 10)
        handle.write(b"\0" * 16)  # a sector of the block half written
    entry = outbox.get(sealed.transfer_id_hex)
    assert entry is not None
    assert entry.state == {}
    assert not entry.published
    assert entry.transfer.manifest_body() == sealed.manifest_body()
    outbox.mark_published(sealed.transfer_id_hex)
    again = outbox.get(sealed.transfer_id_hex)
    assert again is not None
    assert again.published
