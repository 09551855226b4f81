"""The receiver under redeliveries and restarts: every transfer handed on once, no leftovers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dicombridge import spool as spool_module
from dicombridge.config import DeliverySection
from dicombridge.delivery import Deliverer
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity, SpoolState
from dicombridge.transport import Delivery
from tests.cryptokit import Federation, make_federation, messages


def _receiver(root: Path, fed: Federation, delivered: list[IncomingTransfer]) -> Receiver:
    async def on_transfer(incoming: IncomingTransfer) -> None:
        delivered.append(incoming)

    return Receiver(
        root, ReceiverIdentity("hosp-b", fed.keys["hosp-b"], fed.directory), on_transfer
    )


def _spooled(root: Path) -> list[Path]:
    return [path for path in (root / "spool").glob("*/*") if not path.name.startswith(".")]


async def test_redeliveries_racing_the_last_fragment_leave_nothing_in_the_spool(
    tmp_path: Path,
) -> None:
    """A re-sent or redelivered message handled while its transfer is being assembled
    (after a restart both arrive at once) is dropped, not spooled again for ever."""
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    receiver = _receiver(tmp_path / "b", fed, delivered)
    rounds = 40
    for seed in range(rounds):
        source = tmp_path / f"src{seed}.bin"
        source.write_bytes(os.urandom(9000))
        transfer = fed.seal(source, tmp_path / "outbox", fragment_size=1000)
        bodies = messages(transfer)
        # Every message twice, all at once: the original and a re-send.
        await asyncio.gather(
            *(
                receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
                for body in bodies + bodies
            )
        )
    assert len(delivered) == rounds
    assert len({incoming.transfer_id for incoming in delivered}) == rounds
    assert receiver.duplicates_dropped > 0
    assert _spooled(tmp_path / "b") == []
    assert receiver._locks == {}


async def test_restart_discards_spooled_messages_of_done_transfers(tmp_path: Path) -> None:
    """A crash between the done marker and the spool's discard leaves a folder that
    `recover` removes; a transfer still incomplete stays spooled."""
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    root = tmp_path / "b"
    receiver = _receiver(root, fed, delivered)
    transfers = []
    for seed in range(2):
        source = tmp_path / f"src{seed}.bin"
        source.write_bytes(os.urandom(3000))
        transfers.append(fed.seal(source, tmp_path / "outbox", fragment_size=1000))
    done, unfinished = (messages(transfer) for transfer in transfers)
    for body in done:
        await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    await receiver.handle(Delivery(unfinished[0], "hosp-a", "bulk", None, False))
    assert len(delivered) == 1
    # As if killed before the discard: the done transfer's messages are back in the spool.
    for body in done[:2]:
        receiver.spool.put("hosp-a", body)
    assert len(_spooled(root)) == 2

    restarted = _receiver(root, fed, delivered)
    assert restarted.recover() == 1
    assert [path.name for path in _spooled(root)] == [transfers[1].transfer_id.hex()]
    for body in unfinished[1:]:
        await restarted.handle(Delivery(body, "hosp-a", "bulk", None, False))
    assert len(delivered) == 2
    assert _spooled(root) == []


async def test_transfer_left_in_incoming_unmarked_is_not_handed_on_twice(tmp_path: Path) -> None:
    """Stopped after assembling into incoming/ but before the done marker: the redelivered
    messages find the transfer there, mark it done, empty the spool, and hand nothing on;
    once delivery records its receipt, later copies are dropped and leave nothing."""
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    root = tmp_path / "b"
    receiver = _receiver(root, fed, delivered)
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3000))
    bodies = messages(fed.seal(source, tmp_path / "outbox", fragment_size=1000))
    for body in bodies:
        await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    (incoming,) = delivered
    # As if stopped before the marker: no marker, the messages still spooled.
    receiver._done_marker("hosp-a", incoming.transfer_id).unlink()
    for body in bodies[:-1]:
        receiver.spool.put("hosp-a", body)

    restarted = _receiver(root, fed, delivered)
    assert restarted.recover() == 0
    assert restarted.pending() == [incoming]
    await restarted.handle(Delivery(bodies[-1], "hosp-a", "bulk", None, True))
    assert delivered == [incoming]  # handed on once only
    assert _spooled(root) == []
    # Delivery records its receipt; a copy arriving after that leaves nothing either.
    restarted.record_receipt("hosp-a", incoming.transfer_id, {"outcome": "stored"})
    receiver.spool.put("hosp-a", bodies[0])
    await restarted.handle(Delivery(bodies[1], "hosp-a", "bulk", None, True))
    assert _spooled(root) == []
    assert delivered == [incoming]


async def test_restart_clears_half_removed_and_half_assembled_files(tmp_path: Path) -> None:
    """A file in incoming/ without its sidecar (stopped while assembling or removing) is
    cleared at restart; a sidecar whose file is gone is taken as delivered, not as a
    failure (nothing sent, nothing quarantined)."""
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    root = tmp_path / "b"
    receiver = _receiver(root, fed, delivered)
    for seed in range(2):
        source = tmp_path / f"src{seed}.bin"
        source.write_bytes(os.urandom(3000))
        for body in messages(fed.seal(source, tmp_path / "outbox", fragment_size=1000)):
            await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    kept, half_removed = delivered
    half_removed.path.unlink()  # the sidecar is left
    orphan = root / "incoming" / "hosp-a.00ff.dcm"
    orphan.write_bytes(b"no sidecar")
    (root / "incoming" / ".hosp-a.0aff.dcm.assembling").write_bytes(b"partial")

    restarted = _receiver(root, fed, delivered)
    restarted.recover()
    assert sorted(p.name for p in (root / "incoming").iterdir()) == sorted(
        [kept.path.name, kept.sidecar.name, half_removed.sidecar.name]
    )
    receipts: list[object] = []

    async def send_receipt(site: str, receipt: object) -> None:
        receipts.append(receipt)

    deliverer = Deliverer(
        local_nodes={},
        clients=lambda node: pytest.fail("nothing is sent for a delivered transfer"),
        send_receipt=send_receipt,
        quarantine=root / "quarantine",
        settings=DeliverySection(),
    )
    await deliverer._deliver(half_removed)
    assert not half_removed.sidecar.exists()
    assert receipts == []
    assert not (root / "quarantine").exists() or not any((root / "quarantine").iterdir())


def _one_fragment_transfer(fed: Federation, tmp_path: Path, name: str) -> tuple[bytes, list[bytes]]:
    source = tmp_path / name
    data = os.urandom(900)
    source.write_bytes(data)
    return data, messages(fed.seal(source, tmp_path / "outbox", fragment_size=1000))


async def test_one_fragment_transfer_arriving_together_is_assembled_without_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifest and fragment handled at once (fragment first, too): the transfer is
    assembled from memory, byte for byte, and nothing is ever written to the spool."""
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    receiver = _receiver(tmp_path / "b", fed, delivered)
    spooled: list[bytes] = []
    put = receiver.spool.put

    def recording_put(sender_site: str, body: bytes) -> SpoolState:
        spooled.append(body)
        return put(sender_site, body)

    monkeypatch.setattr(receiver.spool, "put", recording_put)
    sources = []
    for number in range(2):
        data, bodies = _one_fragment_transfer(fed, tmp_path, f"src{number}.bin")
        sources.append(data)
        if number == 1:
            bodies.reverse()  # the fragment first
        await asyncio.gather(
            *(receiver.handle(Delivery(body, "hosp-a", "bulk", None, False)) for body in bodies)
        )
    assert [incoming.path.read_bytes() for incoming in delivered] == sources
    assert receiver.assembled_in_memory == 2
    assert spooled == []
    assert not (tmp_path / "b" / "spool" / "hosp-a").exists()
    assert receiver._gathering == {}


async def test_a_message_whose_partner_does_not_come_goes_to_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest alone waits GATHER_S, then is spooled (and its delivery acked); the
    fragment coming later joins it there and the transfer is handed on once."""
    monkeypatch.setattr(spool_module, "GATHER_S", 0.2)
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    root = tmp_path / "b"
    receiver = _receiver(root, fed, delivered)
    data, (manifest, fragment) = _one_fragment_transfer(fed, tmp_path, "src.bin")
    await receiver.handle(Delivery(manifest, "hosp-a", "bulk", None, False))
    assert len(_spooled(root)) == 1
    assert delivered == []
    await receiver.handle(Delivery(fragment, "hosp-a", "bulk", None, False))
    assert [incoming.path.read_bytes() for incoming in delivered] == [data]
    assert receiver.assembled_in_memory == 0
    assert _spooled(root) == []


async def test_a_tampered_fragment_met_in_memory_is_quarantined_with_both_messages(
    tmp_path: Path,
) -> None:
    """A fragment that fails its check when assembled from memory: the transfer is
    quarantined with both messages, as from the spool, and never handed on."""
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    root = tmp_path / "b"
    receiver = _receiver(root, fed, delivered)
    _, (manifest, fragment) = _one_fragment_transfer(fed, tmp_path, "src.bin")
    tampered = fragment[:-1] + bytes([fragment[-1] ^ 1])
    await asyncio.gather(
        *(
            receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
            for body in (manifest, tampered)
        )
    )
    assert delivered == []
    assert receiver.quarantined == 1
    (folder,) = (root / "quarantine" / "hosp-a").iterdir()
    assert sorted(path.suffix for path in folder.iterdir()) == [".frag", ".json", ".msg"]


async def test_receipt_is_recorded_in_the_done_marker_and_answers_a_resend(
    tmp_path: Path,
) -> None:
    """The done marker is created padded and the receipt written over it in place (same
    inode: no file per receipt); a re-sent manifest of the done transfer gets that receipt
    back and is not handed on again. A marker of an older version (a bare timestamp, too
    small) is replaced whole by the receipt."""
    fed = make_federation()
    delivered: list[IncomingTransfer] = []
    resent: list[tuple[str, bytes, dict[str, object]]] = []

    async def on_transfer(incoming: IncomingTransfer) -> None:
        delivered.append(incoming)

    async def on_duplicate(site: str, transfer_id: bytes, receipt: dict[str, object]) -> None:
        resent.append((site, transfer_id, receipt))

    root = tmp_path / "b"
    receiver = Receiver(
        root,
        ReceiverIdentity("hosp-b", fed.keys["hosp-b"], fed.directory),
        on_transfer,
        on_duplicate=on_duplicate,
    )
    transfers = []
    for name in ("one", "two"):
        source = tmp_path / f"{name}.bin"
        source.write_bytes(os.urandom(3000))
        transfers.append(fed.seal(source, tmp_path / "outbox", fragment_size=1000))
        for body in messages(transfers[-1]):
            await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    assert len(delivered) == 2
    one, two = (root / "done" / "hosp-a" / t.transfer_id_hex for t in transfers)
    assert one.stat().st_size == spool_module.MARKER_BYTES
    inode = one.stat().st_ino
    receipt = {"transfer_id": transfers[0].transfer_id_hex, "outcome": "stored", "status": 0}
    receiver.record_receipt("hosp-a", transfers[0].transfer_id, receipt)
    assert one.stat().st_ino == inode
    assert one.stat().st_size == spool_module.MARKER_BYTES
    two.write_text("2026-01-01T00:00:00+00:00")  # as an older version left it
    receiver.record_receipt("hosp-a", transfers[1].transfer_id, {**receipt, "status": 0xB000})

    for transfer in transfers:
        await receiver.handle(Delivery(transfer.manifest_body(), "hosp-a", "bulk", None, False))
    assert resent == [
        ("hosp-a", transfers[0].transfer_id, receipt),
        ("hosp-a", transfers[1].transfer_id, {**receipt, "status": 0xB000}),
    ]
    assert len(delivered) == 2
