"""The sender's outbox: caps, what is due for a re-send, what a receipt does, a full disk."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicombridge.control import Receipt
from dicombridge.errors import OutboxDiskFullError, OutboxFullError
from dicombridge.fragments import SealedTransfer
from dicombridge.outbox import Outbox
from tests.cryptokit import Federation, make_federation

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


def test_a_crash_while_an_entry_is_deleted_leaves_it_whole_or_gone(
    fed: Federation, tmp_path: Path
) -> None:
    """Deleting renames the entry away first; what a crash left (a renamed entry, or an
    entry an older version half deleted) is cleared at the next start, and never counted
    or listed as an entry meanwhile."""
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=10)
    kept = admit(outbox, fed, tmp_path, 100)
    renamed, half = admit(outbox, fed, tmp_path, 100), admit(outbox, fed, tmp_path, 100)
    renamed.path.rename(renamed.path.with_name(f".{renamed.path.name}.removing"))
    (half.path / "transfer.json").unlink()  # as if rmtree was killed midway
    restarted = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=10)
    assert [e.transfer.transfer_id_hex for e in restarted.entries()] == [kept.transfer_id_hex]
    restarted.recover()
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == [kept.path.name]
    restarted.record_receipt(Receipt(kept.transfer_id, "stored", 0), from_site="hosp-b")
    assert list((tmp_path / "outbox").iterdir()) == []


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
    the half-written .sealing directory, logs the directory and the bytes free; after room
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
    assert outbox_files(small_outbox_disk) == [sealed.transfer_id_hex]
    assert outbox.count == 1
    entry = outbox.get(sealed.transfer_id_hex)
    assert entry is not None
    assert entry.state["attempts"] == 0
    assert not entry.published


def test_disk_full_after_the_fragments_fit_leaves_no_entry(
    fed: Federation, tmp_path: Path, small_outbox_disk: Path
) -> None:
    """When the fragments fit but the manifest or the small files after them do not, the
    transfer is still taken back whole: no entry, no .sealing leftover."""
    source = tmp_path / "instance.bin"
    source.write_bytes(os.urandom(200_000))
    trial = fed.seal(source, tmp_path / "trial", fragment_size=65536)
    fragments_bytes = (trial.path / "fragments.bin").stat().st_size
    outbox = Outbox(small_outbox_disk, max_bytes=10**9, max_count=100)
    # Room for fragments.bin, rounded up to whole pages, and not a page more.
    fill_disk(small_outbox_disk, leave_bytes=-(-fragments_bytes // PAGE) * PAGE)
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
    assert cause is not None
    failed_in = [frame.name for frame in traceback.extract_tb(cause.__traceback__)]
    assert "write_new_durably" in failed_in  # the manifest (or a file after it), not fragments.bin
    assert outbox_files(small_outbox_disk) == ["filler"]
    assert outbox.count == 0


def test_state_is_updated_in_place_even_on_a_full_disk(
    fed: Federation, tmp_path: Path, small_outbox_disk: Path
) -> None:
    """The state file is created padded and rewritten in place: marking an entry
    published needs no new file and no new block, so it works on a full disk too, and
    leaves no temporary file."""
    outbox = Outbox(small_outbox_disk, max_bytes=10**9, max_count=100)
    sealed = admit(outbox, fed, tmp_path, 10_000)
    inode = (sealed.path / "state.json").stat().st_ino
    fill_disk(small_outbox_disk)
    outbox.mark_published(sealed.transfer_id_hex)
    entry = outbox.get(sealed.transfer_id_hex)
    assert entry is not None
    assert entry.published
    assert (sealed.path / "state.json").stat().st_ino == inode
    assert sorted(p.name for p in sealed.path.iterdir()) == [
        "fragments.bin",
        "manifest.msg",
        "state.json",
        "transfer.json",
    ]


def test_state_not_saved_on_a_full_disk_keeps_the_entry(
    fed: Federation, tmp_path: Path, small_outbox_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state that does not fit in place (here: an unpadded state file) is replaced by a
    new file; on a full disk that fails, is logged, and the entry stays whole with its
    old state (published again at the next start), no temp file."""
    outbox = Outbox(small_outbox_disk, max_bytes=10**9, max_count=100)
    sealed = admit(outbox, fed, tmp_path, 10_000)
    (sealed.path / "state.json").write_text(json.dumps({"attempts": 0}))
    fill_disk(small_outbox_disk)
    with caplog.at_level(logging.ERROR, logger="dicombridge.outbox"):
        outbox.mark_published(sealed.transfer_id_hex)
    assert any("state not saved" in r.getMessage() for r in caplog.records)
    entry = outbox.get(sealed.transfer_id_hex)
    assert entry is not None
    assert not entry.published
    assert sorted(p.name for p in sealed.path.iterdir()) == [
        "fragments.bin",
        "manifest.msg",
        "state.json",
        "transfer.json",
    ]
    assert json.loads((sealed.path / "state.json").read_text())["attempts"] == 0
