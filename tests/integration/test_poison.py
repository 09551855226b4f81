"""Poison messages on the real broker: dead-lettered, counted, logged without PHI, and the
consumer goes on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from dicombridge.envelope import Header, Kind, new_id
from dicombridge.errors import BridgeError
from dicombridge.identity import LocalSite
from dicombridge.management import ManagementClient
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import Federation, create_federation
from dicombridge.spool import Receiver, ReceiverIdentity
from dicombridge.topology import MIB, Limits, PlaneLimits, dead_queue_name, exchange_name
from dicombridge.transport import ConsumerCounters, Delivery, Transport
from tests.brokerkit import Inbox, seal_for, wait_until

pytestmark = pytest.mark.integration

SITES = ["hosp-a", "hosp-b"]
MAX_REDELIVERIES = 3
QUEUE_DELIVERY_LIMIT = 5
# Stands for PHI in a message: it must never reach a log line.
MARKER = "MARKER^POISONPATIENT"
BUSY = "always-busy"
CRASHES = "always-crashes"


class SpoolBusyError(BridgeError):
    """A transient failure that the test handler raises for one message, every time."""

    transient = True


@pytest.fixture
def federation(
    rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str, tmp_path: Path
) -> Iterator[Federation]:
    """hosp-a and hosp-b, hosp-b's bulk queue with a delivery limit of 5."""
    limits = Limits(
        bulk=PlaneLimits(max_length_bytes=256 * MIB, delivery_limit=QUEUE_DELIVERY_LIMIT)
    )
    fed = create_federation(
        tmp_path / "fed", broker=rabbitmq_node, site_ids=SITES, vhost=vhost, limits=limits
    )
    yield fed
    for site_id in SITES:
        management.delete_user(site_id)


def transport(site: LocalSite, *, max_redeliveries: int = MAX_REDELIVERIES) -> Transport:
    return Transport(
        amqp_url=site.config.amqp_url(),
        site_id=site.site_id,
        broker_user=site.config.broker.user,
        directory=site.directory,
        max_in_flight_bytes=4 * 1024 * 1024,
        max_in_flight_messages=8,
        max_redeliveries=max_redeliveries,
        requeue_delay_s=0.01,
    )


@dataclass
class Receiving:
    link: Transport
    inbox: Inbox

    def counters(self) -> ConsumerCounters:
        return self.link.counters("bulk")


@asynccontextmanager
async def receiving(
    federation: Federation, *, max_redeliveries: int = MAX_REDELIVERIES
) -> AsyncIterator[Receiving]:
    """hosp-b consuming its bulk queue into its spool; messages with the ids BUSY and
    CRASHES fail in the handler every time (a transient error, a crash)."""
    site = federation.site("hosp-b")
    inbox = Inbox()
    receiver = Receiver(
        site.config.storage.root,
        ReceiverIdentity(site.site_id, site.keys, site.directory),
        inbox.on_transfer,
    )

    async def handle(delivery: Delivery) -> None:
        if delivery.message_id == BUSY:
            raise SpoolBusyError(f"spool busy with {MARKER}")
        if delivery.message_id == CRASHES:
            raise RuntimeError(f"handler bug on {MARKER}")
        await receiver.handle(delivery)

    async with transport(site, max_redeliveries=max_redeliveries) as link:
        consumer = asyncio.create_task(link.consume("bulk", handle))

        async def consuming() -> bool:
            return link.counters("bulk").consuming

        await wait_until(consuming, what="the consumer")
        try:
            yield Receiving(link, inbox)
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer


async def send_good_transfer(federation: Federation, tmp_path: Path) -> tuple[Path, int]:
    """hosp-a sends hosp-b a valid transfer; return its source and its message count."""
    site_a = federation.site("hosp-a")
    source = tmp_path / "good.bin"
    source.write_bytes(os.urandom(100_000))
    sealed = seal_for(site_a, "hosp-b", source, 32 * 1024)
    async with transport(site_a) as link:
        await link.publish_transfer(sealed)
    return source, 1 + sealed.fragment_count


async def dead_letters(
    rabbitmq_node: BrokerNode, vhost: str, count: int
) -> dict[str | None, tuple[str, bytes]]:
    """Wait for ``count`` messages in hosp-b's dead-letter queue and take them out (as the
    operator): message id -> (x-death reason, body)."""
    connection = await aio_pika.connect(rabbitmq_node.admin_amqp_url(vhost))
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_queue(dead_queue_name("hosp-b"))

        async def all_there() -> bool:
            return (await dead.declare()).message_count == count

        await wait_until(all_there, timeout_s=30, what=f"{count} dead letters")
        found: dict[str | None, tuple[str, bytes]] = {}
        while (message := await dead.get(no_ack=True, fail=False)) is not None:
            deaths = message.headers["x-death"]
            assert isinstance(deaths, list)
            first = deaths[0]
            assert isinstance(first, dict)
            reason = first["reason"]
            reason = reason.decode() if isinstance(reason, bytes) else str(reason)
            found[message.message_id] = (reason, message.body)
        return found


def dicombridge_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("dicombridge")]


async def test_poison_messages_are_dead_lettered_counted_and_the_consumer_goes_on(
    federation: Federation,
    rabbitmq_node: BrokerNode,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Garbage, an unknown protocol version, a message that always fails transiently, one
    that always crashes the handler, and one without user_id each end in the dead-letter
    queue, counted by reason and logged without their content; a good transfer after them
    arrives."""
    caplog.set_level(logging.INFO)
    site_a = federation.site("hosp-a")
    unknown_version = Header(99, Kind.FRAGMENT, new_id()).pack() + MARKER.encode()
    poison = {
        "garbage": b"not a dicombridge message " + MARKER.encode(),
        "unknown-version": unknown_version,
        BUSY: b"fine bytes, busy handler " + MARKER.encode(),
        CRASHES: b"fine bytes, buggy handler " + MARKER.encode(),
    }
    async with receiving(federation) as hosp_b:
        async with transport(site_a) as link:
            for message_id, body in poison.items():
                await link.publish("bulk", "hosp-b", body, message_id=message_id)
        connection = await aio_pika.connect(rabbitmq_node.admin_amqp_url(federation.vhost))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(exchange_name("hosp-b"))
            no_user_id = aio_pika.Message(MARKER.encode(), message_id="no-user-id")
            await exchange.publish(no_user_id, routing_key="bulk.hosp-a")
        source, good_messages = await send_good_transfer(federation, tmp_path)
        await hosp_b.inbox.wait_for(1)
        assert hosp_b.inbox.received[0][1].read_bytes() == source.read_bytes()

        async def all_counted() -> bool:
            return hosp_b.counters().dead_lettered_total == 5

        await wait_until(all_counted, timeout_s=30, what="5 dead letters counted")
        counters = hosp_b.counters()
    assert dict(counters.dead_lettered) == {
        "sender_check": 1,
        "permanent_error": 2,
        "delivery_limit": 1,
        "handler_crash": 1,
    }
    assert counters.requeued == 2 * MAX_REDELIVERIES
    assert counters.redelivered == 2 * MAX_REDELIVERIES
    assert counters.acked == good_messages
    assert counters.delivered == counters.acked + counters.requeued + 5
    assert counters.sessions == 1

    dead = await dead_letters(rabbitmq_node, federation.vhost, 5)
    # Every one rejected by the consumer itself, none left to the broker's delivery limit.
    assert dead == {
        **{message_id: ("rejected", body) for message_id, body in poison.items()},
        "no-user-id": ("rejected", MARKER.encode()),
    }

    records = dicombridge_records(caplog)
    dead_lettered = {
        getattr(r, "message_id", None): r
        for r in records
        if r.getMessage() == "delivery dead-lettered"
    }
    assert set(dead_lettered) == {*poison, "no-user-id"}
    errors = {message_id: getattr(r, "error", None) for message_id, r in dead_lettered.items()}
    assert errors == {
        "garbage": "EnvelopeError",
        "unknown-version": "UnsupportedVersionError",
        BUSY: "SpoolBusyError",
        CRASHES: "RuntimeError",
        "no-user-id": "SenderMismatchError",
    }
    assert getattr(dead_lettered["unknown-version"], "bytes", None) == len(unknown_version)
    for record in records:
        everything = repr(record.__dict__)
        assert MARKER not in everything, f"message content in the log: {record.getMessage()}"


async def test_message_past_the_queue_delivery_limit_is_dead_lettered_by_the_broker(
    federation: Federation, rabbitmq_node: BrokerNode, tmp_path: Path
) -> None:
    """With max_redeliveries above the queue's x-delivery-limit, the broker dead-letters a
    message that keeps failing (nothing is lost, it is not counted as ours); the consumer
    goes on."""
    site_a = federation.site("hosp-a")
    async with receiving(federation, max_redeliveries=100) as hosp_b:
        async with transport(site_a) as link:
            await link.publish("bulk", "hosp-b", b"always busy", message_id=BUSY)
        dead = await dead_letters(rabbitmq_node, federation.vhost, 1)
        source, _ = await send_good_transfer(federation, tmp_path)
        await hosp_b.inbox.wait_for(1)
        counters = hosp_b.counters()
    assert dead == {BUSY: ("delivery_limit", b"always busy")}
    assert hosp_b.inbox.received[0][1].read_bytes() == source.read_bytes()
    assert counters.dead_lettered_total == 0
    assert counters.requeued == QUEUE_DELIVERY_LIMIT + 1
