"""Instances in doubt: a C-STORE whose response never came is not stored twice.

Against a real Orthanc that logs every C-STORE it receives (repeats included) and lets
the gateway query it, and DCMTK's storescp, which has no C-FIND.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicombridge.config import DeliverySection, LocalNode
from dicombridge.control import Receipt
from dicombridge.delivery import Deliverer
from dicombridge.orthanc import DicomModality, OrthancServer, OrthancSettings
from dicombridge.scu import StoreSCU
from dicombridge.spool import IncomingTransfer
from tests.pacskit import StoreSCPNode, sop_instance_uid
from tests.relaykit import ct_series

pytestmark = pytest.mark.integration
GATEWAY_AE = "GATEWAY_B"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc knowing the gateway as a modality (so it answers its C-FIND)."""
    server = OrthancServer.start(
        tmp_path_factory.mktemp("pacs"),
        OrthancSettings(
            ae_title="PACS_B",
            modalities={"gateway": DicomModality(GATEWAY_AE, "127.0.0.1", 4242)},
            count_received=True,
        ),
    )
    yield server
    server.stop()


def node_of(server: OrthancServer) -> LocalNode:
    return LocalNode(
        name="PACS", ae_title=server.ae_title, host="127.0.0.1", port=server.dicom_port
    )


def test_holds_says_what_the_pacs_has(pacs: OrthancServer, tmp_path: Path) -> None:
    stored, other = ct_series(tmp_path / "series", 2, rows=16, columns=16)
    with StoreSCU(node_of(pacs), calling_ae_title=GATEWAY_AE) as scu:
        assert scu.store(stored).is_stored
        assert scu.holds(stored) is True
        assert scu.holds(other) is False


def test_holds_cannot_say_without_c_find(tmp_path: Path) -> None:
    storescp = StoreSCPNode.start(tmp_path / "storescp", ae_title="PACS_B")
    try:
        node = LocalNode(name="PACS", ae_title="PACS_B", host="127.0.0.1", port=storescp.port)
        (path,) = ct_series(tmp_path / "series", 1, rows=16, columns=16)
        with StoreSCU(node, calling_ae_title=GATEWAY_AE) as scu:
            assert scu.holds(path) is None
    finally:
        storescp.stop()


def incoming_for(path: Path, tid: str) -> IncomingTransfer:
    incoming = IncomingTransfer(
        "site-a", bytes.fromhex(tid), path, path.stat().st_size, {"node": "PACS"}
    )
    incoming.save()
    return incoming


def test_in_doubt_mark_is_one_byte_of_the_sidecar(tmp_path: Path) -> None:
    """mark_storing sets and clears the sidecar's last byte in place (same inode, same
    size, still JSON that loads); an older version's unpadded sidecar with a .storing
    file reads as in doubt, and clearing it pads the sidecar and removes that file."""
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 100)
    incoming = incoming_for(path, "ab" * 16)
    inode, size = incoming.sidecar.stat().st_ino, incoming.sidecar.stat().st_size
    assert size % 4096 == 0
    assert not incoming.is_storing()
    incoming.mark_storing()
    assert incoming.is_storing()
    assert (incoming.sidecar.stat().st_ino, incoming.sidecar.stat().st_size) == (inode, size)
    assert IncomingTransfer.load(incoming.sidecar) == incoming
    incoming.mark_storing(False)
    assert not incoming.is_storing()

    incoming.sidecar.write_text(json.dumps(json.loads(incoming.sidecar.read_bytes())))
    legacy_mark = path.with_suffix(".storing")
    legacy_mark.touch()
    assert incoming.is_storing()
    incoming.mark_storing(False)
    assert not incoming.is_storing()
    assert not legacy_mark.exists()
    assert incoming.sidecar.stat().st_size % 4096 == 0
    assert IncomingTransfer.load(incoming.sidecar) == incoming
    incoming.remove()
    assert list(tmp_path.iterdir()) == []


async def deliver_all(
    pacs: OrthancServer, root: Path, incomings: list[IncomingTransfer]
) -> tuple[Deliverer, list[Receipt]]:
    receipts: list[Receipt] = []

    async def send_receipt(site: str, receipt: Receipt) -> None:
        receipts.append(receipt)

    scu = StoreSCU(node_of(pacs), calling_ae_title=GATEWAY_AE)
    deliverer = Deliverer(
        local_nodes={"PACS": node_of(pacs)},
        clients=lambda node: scu,
        send_receipt=send_receipt,
        quarantine=root / "quarantine",
        settings=DeliverySection(),
    )
    worker = asyncio.create_task(deliverer.run())
    try:
        for incoming in incomings:
            deliverer.submit(incoming)
        async with asyncio.timeout(60):
            await deliverer.join()
    finally:
        worker.cancel()
        await asyncio.to_thread(scu.close)
    return deliverer, receipts


async def test_instance_in_doubt_already_stored_is_not_stored_again(
    pacs: OrthancServer, tmp_path: Path
) -> None:
    """The PACS got the C-STORE but its response was lost (the mark is there): after a
    restart the gateway asks, finds it, and sends the stored receipt without a C-STORE.
    One in doubt that the PACS lacks, and one never tried, are stored once each."""
    root = tmp_path / "var"
    (root / "incoming").mkdir(parents=True)
    files = ct_series(root / "incoming", 3, rows=16, columns=16)
    reached, lacking, fresh = (sop_instance_uid(path) for path in files)
    with StoreSCU(node_of(pacs), calling_ae_title=GATEWAY_AE) as scu:
        assert scu.store(files[0]).is_stored  # the store whose answer was lost
    incomings = [incoming_for(path, f"{i:02x}" * 16) for i, path in enumerate(files)]
    incomings[0].mark_storing()
    # The other as an older version left it: an unpadded sidecar and a .storing file.
    legacy = json.loads(incomings[1].sidecar.read_bytes())
    incomings[1].sidecar.write_text(json.dumps(legacy))
    incomings[1].path.with_suffix(".storing").touch()
    assert [i.is_storing() for i in incomings] == [True, True, False]

    deliverer, receipts = await deliver_all(pacs, root, incomings)

    received = pacs.received()
    assert received.count(reached) == 1
    assert received.count(lacking) == 1
    assert received.count(fresh) == 1
    assert [r.outcome for r in receipts] == ["stored"] * 3
    assert deliverer.in_doubt_found == 1
    assert not list((root / "incoming").iterdir()), "delivered files, sidecars and marks go"


class _Killed(BaseException):
    """Stands for the gateway dying at a given point (nothing after it runs)."""


async def test_death_after_the_pacs_answered_success_does_not_store_twice(
    pacs: OrthancServer, tmp_path: Path
) -> None:
    """The PACS answered success, then the gateway died before the file left incoming/
    (while hashing it or recording the receipt): the restarted gateway finds the mark,
    asks the PACS, and sends the receipt without a second C-STORE."""
    root = tmp_path / "var"
    (root / "incoming").mkdir(parents=True)
    (path,) = ct_series(root / "incoming", 1, rows=16, columns=16)
    uid = sop_instance_uid(path)
    incoming = incoming_for(path, "ab" * 16)

    async def die(site: str, receipt: Receipt) -> None:
        raise _Killed

    scu = StoreSCU(node_of(pacs), calling_ae_title=GATEWAY_AE)
    dying = Deliverer(
        local_nodes={"PACS": node_of(pacs)},
        clients=lambda node: scu,
        send_receipt=die,
        quarantine=root / "quarantine",
        settings=DeliverySection(),
    )
    try:
        with pytest.raises(_Killed):
            await dying._deliver(incoming)
    finally:
        await asyncio.to_thread(scu.close)
    assert pacs.received().count(uid) == 1
    assert incoming.is_storing(), "the success did not clear the doubt before removal"

    deliverer, receipts = await deliver_all(pacs, root, [incoming])

    assert pacs.received().count(uid) == 1
    assert deliverer.in_doubt_found == 1
    assert [r.outcome for r in receipts] == ["stored"]
    assert not list((root / "incoming").iterdir())
