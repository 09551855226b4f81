"""The sender's outbox: caps, what is due for a re-send, what a receipt does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicombridge.control import Receipt
from dicombridge.errors import OutboxFullError
from dicombridge.fragments import SealedTransfer
from dicombridge.outbox import Outbox
from tests.cryptokit import Federation, make_federation


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
