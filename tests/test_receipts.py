"""The receipts a receiving gateway owes: the journal survives a restart, stays small, and
reads what an older version left."""

from __future__ import annotations

import json
from pathlib import Path

from dicombridge.receipts import COMPACT_BYTES, JOURNAL_FILE, UnsentReceipts, owed_receipts

A, B, C = (bytes([n]) * 16 for n in (1, 2, 3))


def stored(n: int) -> dict[str, object]:
    return {"transfer_id": f"{n:032x}", "outcome": "stored", "status": 0}


def test_what_is_owed_survives_a_restart_in_order(tmp_path: Path) -> None:
    """Receipts added and not confirmed are owed again after a restart, in the order they
    were owed; confirmed ones are not; the journal is rewritten with only what is owed."""
    root = tmp_path / "receipts"
    receipts = UnsentReceipts(root)
    receipts.add("hosp-a", A, stored(1))
    receipts.add("hosp-c", B, stored(2))
    receipts.add("hosp-a", C, stored(3))
    receipts.confirmed("hosp-c", B)
    receipts.confirmed("hosp-c", A)  # not owed to hosp-c: nothing happens
    assert receipts.get("hosp-a", A) == stored(1)
    assert receipts.get("hosp-c", B) is None
    receipts.close()  # the gateway stops (or dies: the lines are written already)

    assert owed_receipts(root) == 2
    again = UnsentReceipts(root)
    assert list(again) == [("hosp-a", A, stored(1)), ("hosp-a", C, stored(3))]
    assert len(again) == 2
    lines = (root / JOURNAL_FILE).read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"owe": ["hosp-a", A.hex(), stored(1)]},
        {"owe": ["hosp-a", C.hex(), stored(3)]},
    ]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    """A line a power loss cut short is skipped at replay; the whole lines still count."""
    root = tmp_path / "receipts"
    receipts = UnsentReceipts(root)
    receipts.add("hosp-a", A, stored(1))
    receipts.add("hosp-a", B, stored(2))
    receipts.close()
    journal = root / JOURNAL_FILE
    journal.write_bytes(journal.read_bytes()[:-7])
    assert [tid for _, tid, _ in UnsentReceipts(root)] == [A]


def test_journal_is_emptied_in_place_once_nothing_is_owed(tmp_path: Path) -> None:
    """Past COMPACT_BYTES, the confirmation that leaves nothing owed empties the journal
    (same file); below it, the journal just grows by a line."""
    root = tmp_path / "receipts"
    receipts = UnsentReceipts(root)
    journal = root / JOURNAL_FILE
    receipts.add("hosp-a", A, stored(1))
    receipts.confirmed("hosp-a", A)
    assert 0 < journal.stat().st_size < COMPACT_BYTES
    inode = journal.stat().st_ino
    big = {**stored(2), "error_comment": "x" * 2000}
    n = 0
    while journal.stat().st_size < COMPACT_BYTES:
        receipts.add("hosp-a", n.to_bytes(16, "big"), big)
        n += 1
    for i in range(n - 1):
        receipts.confirmed("hosp-a", i.to_bytes(16, "big"))
    assert journal.stat().st_size >= COMPACT_BYTES  # one still owed: nothing is dropped
    receipts.confirmed("hosp-a", (n - 1).to_bytes(16, "big"))
    assert journal.stat().st_size == 0
    assert journal.stat().st_ino == inode
    receipts.add("hosp-a", B, stored(2))
    receipts.close()
    assert list(UnsentReceipts(root)) == [("hosp-a", B, stored(2))]


def test_an_older_versions_file_per_receipt_is_taken_over(tmp_path: Path) -> None:
    """`<site>.<transfer id>.json` files an older version left are owed like journal lines,
    and removed once the journal holds them; an unreadable one is dropped, not fatal (the
    sender's re-send recovers its receipt)."""
    root = tmp_path / "receipts"
    root.mkdir()
    (root / f"hosp-a.{A.hex()}.json").write_text(json.dumps(stored(1)))
    (root / f"hosp-c.{B.hex()}.json").write_text("{not json")
    receipts = UnsentReceipts(root)
    assert list(receipts) == [("hosp-a", A, stored(1))]
    assert sorted(p.name for p in root.iterdir()) == [JOURNAL_FILE]
    receipts.close()
    assert owed_receipts(root) == 1
