"""Quarantine and outbox as the operator sees them through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicombridge.config import DeliverySection
from dicombridge.control import Receipt
from dicombridge.delivery import STATUS_UNKNOWN_NODE, Deliverer
from dicombridge.identity import init_site
from dicombridge.outbox import Outbox
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity
from dicombridge.transport import Delivery
from tests.cryptokit import make_federation, messages

CLI = [sys.executable, "-c", "from dicombridge.cli import main; main()"]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A site whose storage the tests fill through the real code paths."""
    return init_site(tmp_path / "site", site_id="hosp-b", broker_url="amqp://hosp-b@127.0.0.1/f")


def storage(config: Path) -> Path:
    return config.parent / "var"


async def test_refused_delivery_is_listed_retried_and_purged(config: Path, tmp_path: Path) -> None:
    """A transfer the local side refuses shows in `quarantine list`, goes back on retry, purges."""
    root = storage(config)
    receipts: list[tuple[str, Receipt]] = []
    receipt_sent = asyncio.Event()

    async def send_receipt(site: str, receipt: Receipt) -> None:
        receipts.append((site, receipt))
        receipt_sent.set()

    async def deliver(incoming: IncomingTransfer) -> None:
        receipt_sent.clear()
        deliverer.submit(incoming)
        await asyncio.wait_for(receipt_sent.wait(), timeout=10)

    deliverer = Deliverer(
        local_nodes={},
        clients=lambda node: pytest.fail("no node should be contacted"),
        send_receipt=send_receipt,
        quarantine=root / "quarantine",
        settings=DeliverySection(),
    )
    (root / "incoming").mkdir(parents=True)
    path = root / "incoming" / "hosp-a.00ff.dcm"
    path.write_bytes(b"instance bytes")
    incoming = IncomingTransfer("hosp-a", bytes.fromhex("00ff" * 8), path, 14, {"node": "NOPE"})
    incoming.save()
    worker = asyncio.create_task(deliverer.run())
    await deliver(incoming)
    assert receipts[0][1].outcome == "failed"
    assert receipts[0][1].status == STATUS_UNKNOWN_NODE

    listed = json.loads(cli(config, "quarantine", "list", "--json").stdout)
    assert [(e["id"], e["stage"], e["status"]) for e in listed] == [
        ("00ff" * 8, "delivery", "0xa801")
    ]
    assert "no local node 'NOPE'" in cli(config, "quarantine", "show", "00ff").stdout
    retried = cli(config, "quarantine", "retry", "00ff")
    assert "back in incoming" in retried.stdout, retried.stderr
    assert path.read_bytes() == b"instance bytes"
    assert IncomingTransfer.load(path.with_suffix(".json")).meta == {"node": "NOPE"}
    assert json.loads(cli(config, "quarantine", "list", "--json").stdout) == []

    await deliver(IncomingTransfer.load(path.with_suffix(".json")))
    worker.cancel()
    assert len(receipts) == 2
    assert cli(config, "quarantine", "purge", "00ff").returncode == 0
    assert not any((root / "quarantine").rglob("*.dcm"))


async def test_tampered_transfer_is_quarantined_and_accepted_again_after_retry(
    config: Path, tmp_path: Path
) -> None:
    """A fragment failing authentication quarantines the transfer; after retry a re-send lands."""
    fed = make_federation()
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(5000))
    transfer = fed.seal(source, tmp_path / "outbox", fragment_size=2000)
    delivered: list[IncomingTransfer] = []

    async def on_transfer(incoming: IncomingTransfer) -> None:
        delivered.append(incoming)

    receiver = Receiver(
        storage(config),
        ReceiverIdentity("hosp-b", fed.keys["hosp-b"], fed.directory),
        on_transfer,
    )
    bodies = messages(transfer)
    tampered = bytearray(bodies[-1])
    tampered[-1] ^= 1
    for body in [*bodies[:-1], bytes(tampered)]:
        await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    assert delivered == []
    listed = json.loads(cli(config, "quarantine", "list", "--json").stdout)
    assert [(e["id"], e["stage"], e["error"]) for e in listed] == [
        (transfer.transfer_id_hex, "spool", "IntegrityError")
    ]
    for body in bodies:  # a re-send before retry is dropped
        await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    assert delivered == []
    assert "forgotten" in cli(config, "quarantine", "retry", "--all").stdout
    for body in bodies:
        await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    assert [d.path.read_bytes() for d in delivered] == [source.read_bytes()]


def test_outbox_list_shows_waiting_transfers_and_failed_receipts(
    config: Path, tmp_path: Path
) -> None:
    """`outbox list` shows each sealed transfer, whether published, and a failed receipt."""
    fed = make_federation()
    outbox = Outbox(storage(config) / "outbox", max_bytes=10**9, max_count=10)
    source = tmp_path / "x.bin"
    source.write_bytes(os.urandom(3000))
    sealed = outbox.admit(
        source,
        sender=fed.sender("hosp-a"),
        directory=fed.directory,
        site="hosp-c",
        fragment_size=4096,
        meta={},
    )
    rows = json.loads(cli(config, "outbox", "list", "--json").stdout)
    assert [(r["id"], r["to_site"], r["published"]) for r in rows] == [
        (sealed.transfer_id_hex, "hosp-c", "no")
    ]
    outbox.mark_published(sealed.transfer_id_hex)
    outbox.record_receipt(
        Receipt(sealed.transfer_id, "failed", 0xA900, "does not match"), from_site="hosp-c"
    )
    table = cli(config, "outbox", "list").stdout
    assert "failed" in table
    assert "0xa900" in table
    assert "1 transfer(s)" in table
    outbox.record_receipt(Receipt(sealed.transfer_id, "stored", 0), from_site="hosp-c")
    assert json.loads(cli(config, "outbox", "list", "--json").stdout) == []
