"""Sealed transfers across the real broker: round trip, sender checks, nothing readable,
consumers restored after the broker drops them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aio_pika
import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicombridge.errors import PublishRefusedError
from dicombridge.fragments import SealedTransfer
from dicombridge.identity import LocalSite
from dicombridge.management import ManagementClient
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import Federation, create_federation
from dicombridge.spool import Receiver, ReceiverIdentity
from dicombridge.topology import (
    Limits,
    PlaneLimits,
    build_definitions,
    dead_queue_name,
    exchange_name,
    queue_name,
)
from dicombridge.transport import Delivery, Transport
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
    link: Transport


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
        yield Receiving(site, receiver, inbox, link)
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
    on_disk = sealed.path.read_bytes()
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
    stolen = tmp_path / "stolen.sealed"
    shutil.copyfile(sealed.path, stolen)
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


# --- the consumer is restored, the publisher reports what it lost ------------------------


def admin_api(node: BrokerNode) -> httpx.Client:
    """The node's management API as its administrator, for what ManagementClient lacks."""
    return httpx.Client(
        base_url=f"{node.management_url}/api",
        auth=(node.admin_user, node.admin_password.get_secret_value()),
        timeout=10,
    )


def close_connections(node: BrokerNode, vhost: str, connection_name: str) -> int:
    """Close, from the broker's side, the client connections named ``connection_name``."""
    with admin_api(node) as api:
        response = api.get(f"/vhosts/{quote(vhost, safe='')}/connections")
        response.raise_for_status()
        names = [
            c["name"]
            for c in response.json()
            if c.get("client_properties", {}).get("connection_name") == connection_name
        ]
        for name in names:
            api.delete(
                f"/connections/{quote(name, safe='')}", headers={"X-Reason": "test"}
            ).raise_for_status()
        return len(names)


async def send(federation: Federation, tmp_path: Path, name: str) -> Path:
    """hosp-a sends hosp-b one small transfer; return its source file."""
    source = tmp_path / name
    source.write_bytes(os.urandom(70_000))
    site_a = federation.site("hosp-a")
    async with transport(site_a) as link:
        await link.publish_transfer(seal_for(site_a, "hosp-b", source, 32 * 1024))
    return source


async def wait_sessions(receiving: Receiving, sessions: int, *, consuming: bool) -> None:
    """Wait until hosp-b's bulk consumer has started ``sessions`` times and is (or is not)
    consuming now."""

    async def there() -> bool:
        counters = receiving.link.counters("bulk")
        return counters.sessions == sessions and counters.consuming is consuming

    await wait_until(
        there, timeout_s=30, what=f"consumer session {sessions} (consuming={consuming})"
    )


async def test_consumer_comes_back_after_the_broker_closes_its_connection(
    federation: Federation, rabbitmq_node: BrokerNode, hosp_b: Receiving, tmp_path: Path
) -> None:
    """The broker closing the consumer's connection (as on a node's shutdown) ends one
    consumer session; the transport reconnects, consumes again, and later transfers arrive."""
    first = await send(federation, tmp_path, "first.bin")
    await hosp_b.inbox.wait_for(1)

    async def closed() -> bool:
        found = await asyncio.to_thread(
            close_connections, rabbitmq_node, federation.vhost, "dicombridge hosp-b bulk"
        )
        return found > 0

    await wait_until(closed, timeout_s=30, what="hosp-b's bulk connection to close")
    await wait_sessions(hosp_b, 2, consuming=True)
    second = await send(federation, tmp_path, "second.bin")
    await hosp_b.inbox.wait_for(2)
    assert [path.read_bytes() for _, path in hosp_b.inbox.received] == [
        first.read_bytes(),
        second.read_bytes(),
    ]


async def test_consumer_cancelled_by_the_broker_consumes_again(
    federation: Federation,
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    hosp_b: Receiving,
    tmp_path: Path,
) -> None:
    """A basic.cancel from the broker (its queue deleted) ends the consumer; it retries
    until the queue is provisioned again, then consumes from it."""
    await wait_sessions(hosp_b, 1, consuming=True)
    queue = f"/queues/{quote(federation.vhost, safe='')}/{queue_name('hosp-b', 'bulk')}"
    with admin_api(rabbitmq_node) as api:
        api.delete(queue).raise_for_status()
    await wait_sessions(hosp_b, 1, consuming=False)
    management.apply(
        build_definitions(vhost=federation.vhost, accounts=federation.operator.site_accounts())
    )
    await wait_sessions(hosp_b, 2, consuming=True)
    source = await send(federation, tmp_path, "after.bin")
    await hosp_b.inbox.wait_for(1)
    assert hosp_b.inbox.received[0][1].read_bytes() == source.read_bytes()


async def test_refused_fragments_raise_one_transport_error(
    rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str, tmp_path: Path
) -> None:
    """A transfer whose fragments a full queue refuses raises PublishRefusedError (not an
    ExceptionGroup of them), so a caller catching TransportError retries it."""
    limits = Limits(bulk=PlaneLimits(max_length_bytes=100_000))
    fed = create_federation(
        tmp_path / "fed", broker=rabbitmq_node, site_ids=SITES, vhost=vhost, limits=limits
    )
    try:
        site_a = fed.site("hosp-a")
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(1_000_000))
        async with transport(site_a) as link:
            with pytest.raises(PublishRefusedError):
                await link.publish_transfer(seal_for(site_a, "hosp-b", source, 64 * 1024))
    finally:
        for site_id in SITES:
            management.delete_user(site_id)


async def test_bulk_deliveries_are_handled_concurrently_control_ones_in_order(
    federation: Federation,
) -> None:
    """Two bulk messages: the handler of the first waits until the second is being
    handled, which only works if bulk deliveries run concurrently; both are acked. Two
    control messages: the second is handled only after the first handler returned."""
    site_a, site_b = federation.site("hosp-a"), federation.site("hosp-b")
    second_started = asyncio.Event()
    bulk_done: list[str] = []

    async def on_bulk(delivery: Delivery) -> None:
        if delivery.message_id == "bulk-1":
            await asyncio.wait_for(second_started.wait(), timeout=10)
        else:
            second_started.set()
        bulk_done.append(str(delivery.message_id))

    control_log: list[str] = []

    async def on_control(delivery: Delivery) -> None:
        control_log.append(f"start {delivery.message_id}")
        await asyncio.sleep(0.2)  # a slow handler: the next must wait for it
        control_log.append(f"end {delivery.message_id}")

    async with transport(site_a) as sender, transport(site_b) as receiver:
        for number in (1, 2):
            await sender.publish("bulk", "hosp-b", b"bulk", message_id=f"bulk-{number}")
            await sender.publish("control", "hosp-b", b"ctl", message_id=f"control-{number}")
        consumers = [
            asyncio.create_task(receiver.consume("bulk", on_bulk)),
            asyncio.create_task(receiver.consume("control", on_control)),
        ]
        try:

            async def handled() -> bool:
                counters = receiver.counters("bulk"), receiver.counters("control")
                return all(c.acked == 2 for c in counters)

            await wait_until(handled, timeout_s=30, what="both planes to ack both messages")
        finally:
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
    assert bulk_done == ["bulk-2", "bulk-1"]
    # Not by way of a timeout and a requeue: each was delivered once.
    assert receiver.counters("bulk").delivered == 2
    assert receiver.counters("bulk").redelivered == 0
    assert control_log == ["start control-1", "end control-1", "start control-2", "end control-2"]
