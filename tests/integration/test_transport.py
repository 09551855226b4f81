"""Sealed transfers across the real broker: round trip, sender checks, nothing readable."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicombridge.fragments import SealedTransfer
from dicombridge.identity import LocalSite
from dicombridge.management import ManagementClient
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import Federation, create_federation
from dicombridge.spool import Receiver, ReceiverIdentity
from dicombridge.topology import dead_queue_name, exchange_name
from dicombridge.transport import Transport
from tests.brokerkit import Inbox, seal_for, wait_until

pytestmark = pytest.mark.integration

SITES = ["hosp-a", "hosp-b", "hosp-c"]


@pytest.fixture
def federation(
    rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str, tmp_path: Path
) -> Iterator[Federation]:
    """Three sites provisioned in this test's vhost the way an operator does it."""
    fed = create_federation(tmp_path / "fed", broker=rabbitmq_node, site_ids=SITES, vhost=vhost)
    yield fed
    for site_id in SITES:
        management.delete_user(site_id)


def transport(site: LocalSite) -> Transport:
    return Transport(
        amqp_url=site.config.amqp_url(),
        site_id=site.site_id,
        broker_user=site.config.broker.user,
        directory=site.directory,
        max_in_flight_bytes=4 * 1024 * 1024,
        max_in_flight_messages=8,
    )


@dataclass
class Receiving:
    site: LocalSite
    receiver: Receiver
    inbox: Inbox


@pytest.fixture
async def hosp_b(federation: Federation) -> AsyncIterator[Receiving]:
    """hosp-b consuming its bulk queue into its spool."""
    site = federation.site("hosp-b")
    inbox = Inbox()
    receiver = Receiver(
        site.config.storage.root,
        ReceiverIdentity(site.site_id, site.keys, site.directory),
        inbox.on_transfer,
    )
    async with transport(site) as link:
        task = asyncio.create_task(link.consume("bulk", receiver.handle))
        yield Receiving(site, receiver, inbox)
        task.cancel()


def fresh_dicom(tmp_path: Path, name: str) -> tuple[Path, dict[str, bytes]]:
    """One of pydicom's files with fresh UIDs and marker PHI; return it and the markers."""
    ds = pydicom.dcmread(str(get_testdata_file(name)))
    ds.PatientName = "MARKER^PATIENTNAME"
    ds.PatientID = "MARKERPID0042"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    markers = {
        "PatientName": b"MARKER^PATIENTNAME",
        "PatientID": b"MARKERPID0042",
        "StudyInstanceUID": str(ds.StudyInstanceUID).encode(),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID).encode(),
        "SOPInstanceUID": str(ds.SOPInstanceUID).encode(),
        "sha256-hex": hashlib.sha256(data).hexdigest().encode(),
        "sha256-raw": hashlib.sha256(data).digest(),
    }
    return path, markers


async def test_transfers_cross_the_broker_byte_identical(
    federation: Federation, hosp_b: Receiving, tmp_path: Path
) -> None:
    """A DICOM file and a 5 MB file sealed at hosp-a open at hosp-b with identical bytes."""
    dicom, _ = fresh_dicom(tmp_path, "CT_small.dcm")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 * 1024 * 1024 + 17))
    site_a = federation.site("hosp-a")
    async with transport(site_a) as link:
        for source in (dicom, big):
            await link.publish_transfer(seal_for(site_a, "hosp-b", source, 256 * 1024))
    await hosp_b.inbox.wait_for(2)
    by_size = {m.total_length: p for m, p in hosp_b.inbox.received}
    for source in (dicom, big):
        assert by_size[source.stat().st_size].read_bytes() == source.read_bytes()
    assert all(m.sender_site == "hosp-a" for m, _ in hosp_b.inbox.received)


async def test_republished_transfer_is_dropped_as_duplicate(
    federation: Federation, hosp_b: Receiving, tmp_path: Path
) -> None:
    """Publishing the same sealed transfer twice delivers it once; the repeat is dropped."""
    source = tmp_path / "one.bin"
    source.write_bytes(os.urandom(300_000))
    site_a = federation.site("hosp-a")
    sealed = seal_for(site_a, "hosp-b", source, 100_000)
    async with transport(site_a) as link:
        await link.publish_transfer(sealed)
        await hosp_b.inbox.wait_for(1)
        await link.publish_transfer(sealed)
        # The marker transfer after the repeat proves the repeat was consumed first.
        marker = tmp_path / "marker.bin"
        marker.write_bytes(b"after")
        await link.publish_transfer(seal_for(site_a, "hosp-b", marker, 100_000))
    await hosp_b.inbox.wait_for(2)
    assert [m.total_length for m, _ in hosp_b.inbox.received] == [300_000, 5]
    assert hosp_b.receiver.duplicates_dropped == 1 + sealed.fragment_count


async def test_nothing_identifying_is_readable_on_the_broker(
    federation: Federation, rabbitmq_node: BrokerNode, hosp_b: Receiving, tmp_path: Path
) -> None:
    """The operator, reading every message that crossed, finds no name, id, UID or hash."""
    dicom, markers = fresh_dicom(tmp_path, "MR_small.dcm")
    assert all(m in dicom.read_bytes() for k, m in markers.items() if not k.startswith("sha"))
    connection = await aio_pika.connect(rabbitmq_node.admin_amqp_url(federation.vhost))
    async with connection:
        channel = await connection.channel()
        tap = await channel.declare_queue("operator-tap", auto_delete=False)
        await tap.bind(exchange_name("hosp-b"), routing_key="#")
        site_a = federation.site("hosp-a")
        async with transport(site_a) as link:
            sealed = await asyncio.to_thread(seal_for, site_a, "hosp-b", dicom, 4096)
            await link.publish_transfer(sealed)
        await hosp_b.inbox.wait_for(1)
        seen: list[bytes] = []
        while (message := await tap.get(no_ack=True, fail=False)) is not None:
            seen.append(message.body)
            seen.append(repr(message.properties).encode())
            seen.append(repr(message.headers).encode())
    assert len(seen) == 3 * (1 + sealed.fragment_count)
    for name, marker in markers.items():
        assert not any(marker in blob for blob in seen), f"{name} visible on the broker"
    on_disk = b"".join(p.read_bytes() for p in sealed.path.iterdir())
    for name, marker in markers.items():
        assert marker not in on_disk, f"{name} readable in the sender's sealed outbox"


async def test_message_without_user_id_is_refused_by_the_receiver(
    federation: Federation, rabbitmq_node: BrokerNode, hosp_b: Receiving, tmp_path: Path
) -> None:
    """A message lacking user_id goes to the dead-letter queue; later traffic still flows."""
    source = tmp_path / "x.bin"
    source.write_bytes(os.urandom(50_000))
    site_a = federation.site("hosp-a")
    sealed = seal_for(site_a, "hosp-b", source, 64 * 1024)
    connection = await aio_pika.connect(rabbitmq_node.admin_amqp_url(federation.vhost))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name("hosp-b"))
        for body in [sealed.manifest_body(), *(b for _, b in sealed.fragment_bodies())]:
            await exchange.publish(aio_pika.Message(body), routing_key="bulk.hosp-a")
        dead = await channel.get_queue(dead_queue_name("hosp-b"))

        async def all_dead_lettered() -> bool:
            count = (await dead.declare()).message_count or 0
            return count == 1 + sealed.fragment_count

        await wait_until(all_dead_lettered, timeout_s=30, what="dead-lettered messages")
    assert hosp_b.inbox.received == []
    async with transport(site_a) as link:
        await link.publish_transfer(seal_for(site_a, "hosp-b", source, 64 * 1024))
    await hosp_b.inbox.wait_for(1)
    assert hosp_b.inbox.received[0][1].read_bytes() == source.read_bytes()


async def test_site_replaying_another_sites_transfer_is_quarantined(
    federation: Federation, hosp_b: Receiving, tmp_path: Path
) -> None:
    """hosp-c republishing hosp-a's sealed transfer as its own never reaches hosp-b's PACS."""
    source = tmp_path / "a.bin"
    source.write_bytes(os.urandom(80_000))
    sealed = seal_for(federation.site("hosp-a"), "hosp-b", source, 32 * 1024)
    stolen = tmp_path / "stolen"
    shutil.copytree(sealed.path, stolen)
    site_c = federation.site("hosp-c")
    async with transport(site_c) as link:
        await link.publish_transfer(SealedTransfer.load(stolen))

    async def quarantined() -> bool:
        return hosp_b.receiver.quarantined == 1

    await wait_until(quarantined, timeout_s=30, what="quarantine")
    assert hosp_b.inbox.received == []
    reason = next((hosp_b.receiver.quarantine / "hosp-c").iterdir()) / "reason.json"
    assert "IntegrityError" in reason.read_text()


async def test_garbage_body_is_dead_lettered_and_consumer_goes_on(
    federation: Federation, rabbitmq_node: BrokerNode, hosp_b: Receiving, tmp_path: Path
) -> None:
    """A body that is not a dicombridge message is rejected; the next transfer arrives."""
    site_a = federation.site("hosp-a")
    source = tmp_path / "ok.bin"
    source.write_bytes(os.urandom(10_000))
    async with transport(site_a) as link:
        await link.publish("bulk", "hosp-b", b"not a dicombridge message", message_id="junk")
        await link.publish_transfer(seal_for(site_a, "hosp-b", source, 64 * 1024))
    await hosp_b.inbox.wait_for(1)
    assert hosp_b.inbox.received[0][1].read_bytes() == source.read_bytes()
    connection = await aio_pika.connect(rabbitmq_node.admin_amqp_url(federation.vhost))
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_queue(dead_queue_name("hosp-b"))
        message = await dead.get(no_ack=True, fail=False)
        assert message is not None
        assert message.body == b"not a dicombridge message"


async def test_resent_transfer_gets_its_receipt_again(
    federation: Federation, tmp_path: Path
) -> None:
    """A transfer re-sent after it was done is dropped, and its recorded receipt handed back."""
    site_b = federation.site("hosp-b")
    inbox = Inbox()
    again: list[tuple[str, bytes, dict[str, object]]] = []
    arrived_again = asyncio.Event()

    async def on_duplicate(sender: str, transfer_id: bytes, receipt: dict[str, object]) -> None:
        again.append((sender, transfer_id, receipt))
        arrived_again.set()

    receiver = Receiver(
        site_b.config.storage.root,
        ReceiverIdentity(site_b.site_id, site_b.keys, site_b.directory),
        inbox.on_transfer,
        on_duplicate=on_duplicate,
    )
    source = tmp_path / "r.bin"
    source.write_bytes(os.urandom(150_000))
    site_a = federation.site("hosp-a")
    sealed = seal_for(site_a, "hosp-b", source, 64 * 1024)
    async with transport(site_b) as link_b, transport(site_a) as link_a:
        consumer = asyncio.create_task(link_b.consume("bulk", receiver.handle))
        await link_a.publish_transfer(sealed)
        await inbox.wait_for(1)
        receipt = {"outcome": "stored", "status": 0, "transfer_id": sealed.transfer_id_hex}
        receiver.record_receipt("hosp-a", sealed.transfer_id, receipt)
        await link_a.publish_transfer(sealed)
        await asyncio.wait_for(arrived_again.wait(), timeout=30)
        consumer.cancel()
    assert again == [("hosp-a", sealed.transfer_id, receipt)]
    assert len(inbox.received) == 1
