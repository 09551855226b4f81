"""What the provisioned broker lets a site's user do, and what it refuses (real RabbitMQ)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq.exceptions
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from pydantic import SecretStr

from dicombridge.errors import ProvisionError
from dicombridge.management import ManagementClient
from dicombridge.rabbitmq import BrokerNode
from dicombridge.topology import (
    DEAD_LETTER_EXCHANGE,
    Limits,
    Plane,
    PlaneLimits,
    SiteAccount,
    build_definitions,
    dead_queue_name,
    exchange_name,
    queue_name,
    routing_key,
)
from tests.brokerkit import Provisioner, wait_until

pytestmark = pytest.mark.integration


def _message(body: bytes, *, user_id: str | None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        user_id=user_id,
        message_id=uuid.uuid4().hex,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    await message.ack()


async def _connect(url: str) -> AbstractConnection:
    # Not robust: a channel the broker closes must stay closed for the assertions.
    return await aio_pika.connect(url)


async def _confirming_channel(connection: AbstractConnection) -> AbstractChannel:
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def _publish(
    channel: AbstractChannel,
    *,
    exchange: str,
    key: str,
    body: bytes = b"x",
    user_id: str | None,
) -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(_message(body, user_id=user_id), routing_key=key, mandatory=True)


async def _refusal(
    connection: AbstractConnection,
    operation: Callable[[AbstractChannel], Awaitable[Any]],
    expected: type[aiormq.exceptions.ChannelClosed] = aiormq.exceptions.ChannelAccessRefused,
) -> str:
    """Run ``operation`` on a fresh channel; return the reply text the broker closed it with.

    aiormq raises one class per AMQP reply code: ChannelAccessRefused is 403
    ACCESS_REFUSED, ChannelPreconditionFailed is 406 PRECONDITION_FAILED.
    """
    channel = await _confirming_channel(connection)
    with pytest.raises(expected) as caught:
        await operation(channel)
    return " ".join(str(arg) for arg in caught.value.args)


def _state(management: ManagementClient, vhost: str) -> dict[str, Any]:
    """The broker state of ``vhost`` (without password hashes, which are salted)."""
    exported = management.export_definitions()
    in_vhost = {
        kind: sorted(
            (item for item in exported[kind] if item.get("vhost") == vhost),
            key=lambda item: repr(sorted(item.items())),
        )
        for kind in ("queues", "exchanges", "bindings", "permissions", "topic_permissions")
    }
    users = {p["user"] for p in in_vhost["permissions"]}
    in_vhost["users"] = sorted(
        ({"name": u["name"], "tags": u["tags"]} for u in exported["users"] if u["name"] in users),
        key=lambda user: str(user["name"]),
    )
    return in_vhost


def test_provisioning_twice_is_idempotent(
    provision_sites: Provisioner, management: ManagementClient, vhost: str
) -> None:
    """A second provisioning of the same sites succeeds and leaves the same broker state."""
    provision_sites(("hosp-a", "hosp-b"))
    first = _state(management, vhost)
    provision_sites(("hosp-a", "hosp-b"))
    assert _state(management, vhost) == first
    assert len(first["queues"]) == 6
    assert len(first["bindings"]) == 6
    assert len(first["topic_permissions"]) == 4


def test_rendered_definitions_match_the_broker_export(
    provision_sites: Provisioner, management: ManagementClient, vhost: str
) -> None:
    """Every entry of the rendered definitions appears verbatim in RabbitMQ's own export."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    rendered = federation.definitions.to_export_dict()
    exported = management.export_definitions()
    for kind in ("queues", "exchanges", "bindings", "permissions", "topic_permissions", "vhosts"):
        for entry in rendered[kind]:
            matches = [e for e in exported[kind] if {k: e.get(k) for k in entry} == entry]
            assert matches, f"{kind}: {entry} not in the export"
    for user in rendered["users"]:
        assert any(u["name"] == user["name"] and u["tags"] == [] for u in exported["users"])


def test_site_user_cannot_be_the_administrator(
    rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str
) -> None:
    """Provisioning refuses a site whose broker user is the provisioning administrator."""
    account = SiteAccount(
        site_id="hosp-a", broker_user=rabbitmq_node.admin_user, password=SecretStr("x" * 20)
    )
    with pytest.raises(ProvisionError, match="administrator"):
        management.apply(build_definitions(vhost=vhost, accounts=[account]))
    assert not management.vhost_exists(vhost)


def test_management_errors_name_the_path_and_never_the_password(
    rabbitmq_node: BrokerNode,
) -> None:
    """Bad credentials and an unreachable API raise ProvisionError with the path and a fix."""
    wrong = "not-the-password-" + uuid.uuid4().hex
    with (
        ManagementClient(rabbitmq_node.management_url, user="dcb-admin", password=wrong) as client,
        pytest.raises(ProvisionError) as refused,
    ):
        client.overview()
    assert "/api/overview" in str(refused.value)
    assert "credentials" in str(refused.value)
    assert wrong not in str(refused.value)
    with (
        ManagementClient("http://127.0.0.1:1", user="dcb-admin", password=wrong) as client,
        pytest.raises(ProvisionError) as unreachable,
    ):
        client.ensure_vhost("v")
    assert "cannot reach" in str(unreachable.value)
    assert "/api/vhosts/v" in str(unreachable.value)
    assert isinstance(unreachable.value.__cause__, httpx.HTTPError)
    assert wrong not in str(unreachable.value)


def test_changed_queue_limits_are_reported_not_applied(
    provision_sites: Provisioner, management: ManagementClient, vhost: str
) -> None:
    """Re-provisioning with other queue limits names the queue, the argument and the fix."""
    provision_sites(("hosp-a",))
    changed = Limits(bulk=PlaneLimits(max_length_bytes=1000))
    with pytest.raises(ProvisionError) as caught:
        provision_sites(("hosp-a",), limits=changed)
    message = str(caught.value)
    assert queue_name("hosp-a", Plane.BULK) in message
    assert "x-max-length-bytes" in message
    assert "delete" in message
    queue = management.get_queue(vhost, queue_name("hosp-a", Plane.BULK))
    assert queue is not None
    assert queue["arguments"]["x-max-length-bytes"] == Limits().bulk.max_length_bytes


async def test_site_cannot_consume_another_sites_queue(provision_sites: Provisioner) -> None:
    """hosp-b's user may not consume from or get from hosp-a's queues (ACCESS_REFUSED)."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    async with await _connect(federation.url("hosp-b")) as connection:
        for name in (queue_name("hosp-a", Plane.BULK), dead_queue_name("hosp-a")):

            async def consume(channel: AbstractChannel, name: str = name) -> None:
                queue = await channel.get_queue(name, ensure=False)
                await queue.consume(_ack)

            async def get(channel: AbstractChannel, name: str = name) -> None:
                queue = await channel.get_queue(name, ensure=False)
                await queue.get(no_ack=False, fail=False)

            for operation in (consume, get):
                text = await _refusal(connection, operation)
                assert text.startswith("ACCESS_REFUSED")
                assert f"queue '{name}'" in text


async def test_site_cannot_declare_or_bind(provision_sites: Provisioner) -> None:
    """A site's user cannot declare exchanges or queues, nor bind queues or exchanges."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    async with await _connect(federation.url("hosp-b")) as connection:

        async def declare_exchange(channel: AbstractChannel) -> None:
            await channel.declare_exchange(
                "dicombridge.to.hosp-x", aio_pika.ExchangeType.TOPIC, durable=True
            )

        async def declare_queue(channel: AbstractChannel) -> None:
            await channel.declare_queue(
                "dicombridge.hosp-b.extra", durable=True, arguments={"x-queue-type": "quorum"}
            )

        async def redeclare_own_queue(channel: AbstractChannel) -> None:
            await channel.declare_queue(queue_name("hosp-b", Plane.BULK), durable=True)

        async def bind_own_queue_to_other_exchange(channel: AbstractChannel) -> None:
            # Would copy hosp-a's bulk traffic into hosp-b's queue.
            queue = await channel.get_queue(queue_name("hosp-b", Plane.BULK), ensure=False)
            await queue.bind(exchange_name("hosp-a"), routing_key="bulk.*")

        async def bind_exchange(channel: AbstractChannel) -> None:
            destination = await channel.get_exchange(exchange_name("hosp-b"), ensure=False)
            await destination.bind(exchange_name("hosp-a"), routing_key="#")

        refused_resource = {
            declare_exchange: "exchange 'dicombridge.to.hosp-x'",
            declare_queue: "queue 'dicombridge.hosp-b.extra'",
            redeclare_own_queue: f"queue '{queue_name('hosp-b', Plane.BULK)}'",
            # queue.bind needs write on the queue, exchange.bind read on the source.
            bind_own_queue_to_other_exchange: f"queue '{queue_name('hosp-b', Plane.BULK)}'",
            bind_exchange: f"exchange '{exchange_name('hosp-a')}'",
        }
        for operation, resource in refused_resource.items():
            text = await _refusal(connection, operation)
            assert text.startswith("ACCESS_REFUSED"), operation.__name__
            assert resource in text, operation.__name__


@pytest.mark.parametrize("key", ["bulk.hosp-c", "bulk.hosp-a", "control.hosp-a", "bulk.hosp-b.x"])
async def test_site_cannot_publish_in_another_senders_name(
    provision_sites: Provisioner, key: str
) -> None:
    """Topic permissions refuse a routing key that names another sender (ACCESS_REFUSED)."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    async with await _connect(federation.url("hosp-b")) as connection:

        async def publish(channel: AbstractChannel) -> None:
            await _publish(
                channel,
                exchange=exchange_name("hosp-a"),
                key=key,
                user_id=federation.user("hosp-b"),
            )

        text = await _refusal(connection, publish)
    assert text.startswith("ACCESS_REFUSED")
    assert f"topic '{key}' in exchange '{exchange_name('hosp-a')}'" in text


async def test_site_cannot_publish_to_other_exchanges(provision_sites: Provisioner) -> None:
    """Only the federation's site exchanges take a site's publishes, not amq.* or the DLX."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    async with await _connect(federation.url("hosp-b")) as connection:
        for exchange in ("amq.topic", DEAD_LETTER_EXCHANGE):

            async def publish(channel: AbstractChannel, exchange: str = exchange) -> None:
                await _publish(
                    channel, exchange=exchange, key="hosp-a", user_id=federation.user("hosp-b")
                )

            text = await _refusal(connection, publish)
            assert text.startswith("ACCESS_REFUSED")
            assert f"exchange '{exchange}'" in text


async def test_exchange_added_outside_provisioning_takes_no_site_publishes(
    provision_sites: Provisioner,
) -> None:
    """A site exchange created without provisioning is closed to sites, whatever the key.

    Without topic permissions on an exchange RabbitMQ allows every routing key, so the
    write permission must not cover exchanges that provisioning did not set up.
    """
    federation = provision_sites(("hosp-a", "hosp-b"))
    async with await _connect(federation.admin_url) as admin:
        channel = await admin.channel()
        await channel.declare_exchange(
            exchange_name("hosp-c"), aio_pika.ExchangeType.TOPIC, durable=True
        )
    async with await _connect(federation.url("hosp-b")) as connection:

        async def publish(channel: AbstractChannel) -> None:
            await _publish(
                channel,
                exchange=exchange_name("hosp-c"),
                key=routing_key(Plane.BULK, "hosp-b"),
                user_id=federation.user("hosp-b"),
            )

        text = await _refusal(connection, publish)
    assert text.startswith("ACCESS_REFUSED")
    assert f"exchange '{exchange_name('hosp-c')}'" in text


async def test_site_publishes_to_another_site_with_its_own_name(
    provision_sites: Provisioner,
) -> None:
    """hosp-b publishes bulk.hosp-b to hosp-a with confirms; it lands in hosp-a's bulk queue."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    body = uuid.uuid4().bytes
    async with await _connect(federation.url("hosp-b")) as sender:
        channel = await _confirming_channel(sender)
        await _publish(
            channel,
            exchange=exchange_name("hosp-a"),
            key=routing_key(Plane.BULK, "hosp-b"),
            body=body,
            user_id=federation.user("hosp-b"),
        )
    async with await _connect(federation.url("hosp-a")) as receiver:
        channel = await receiver.channel()
        queue = await channel.get_queue(queue_name("hosp-a", Plane.BULK), ensure=True)
        message = await queue.get(no_ack=False, fail=False, timeout=5)
        assert message is not None
        assert message.body == body
        assert message.user_id == federation.user("hosp-b")
        assert message.routing_key == "bulk.hosp-b"
        await message.ack()


async def test_forged_user_id_is_refused(provision_sites: Provisioner) -> None:
    """A publish whose user_id names another site's user is refused (PRECONDITION_FAILED)."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    async with await _connect(federation.url("hosp-b")) as connection:

        async def publish(channel: AbstractChannel) -> None:
            await _publish(
                channel,
                exchange=exchange_name("hosp-a"),
                key=routing_key(Plane.BULK, "hosp-b"),
                user_id=federation.user("hosp-a"),
            )

        text = await _refusal(
            connection, publish, expected=aiormq.exceptions.ChannelPreconditionFailed
        )
    assert text.startswith("PRECONDITION_FAILED")
    assert "user_id property set to" in text


async def test_passive_declarations_work(provision_sites: Provisioner) -> None:
    """A site passively declares its own queues and every site's exchange."""
    federation = provision_sites(("hosp-a", "hosp-b"))
    async with await _connect(federation.url("hosp-b")) as connection:
        channel = await connection.channel()
        for plane in Plane:
            await channel.get_queue(queue_name("hosp-b", plane), ensure=True)
        await channel.get_queue(dead_queue_name("hosp-b"), ensure=True)
        for site in ("hosp-a", "hosp-b"):
            await channel.get_exchange(exchange_name(site), ensure=True)
        assert not channel.is_closed


async def test_full_queue_rejects_publishes(provision_sites: Provisioner) -> None:
    """A queue at its byte limit nacks further publishes (DeliveryError) and drops nothing."""
    limits = Limits(bulk=PlaneLimits(max_length_bytes=4000))
    federation = provision_sites(("hosp-a", "hosp-b"), limits=limits)
    body = b"\0" * 1000
    accepted = 0
    async with await _connect(federation.url("hosp-b")) as sender:
        channel = await _confirming_channel(sender)
        refused = False
        while not refused and accepted < 50:
            try:
                await _publish(
                    channel,
                    exchange=exchange_name("hosp-a"),
                    key=routing_key(Plane.BULK, "hosp-b"),
                    body=body,
                    user_id=federation.user("hosp-b"),
                )
            except aio_pika.exceptions.DeliveryError:
                refused = True
            else:
                accepted += 1
        assert refused, "the full queue took every publish"
        assert not channel.is_closed
    # The queue refuses once over its limit: it may take one message past it.
    assert limits.bulk.max_length_bytes <= accepted * len(body)
    assert accepted * len(body) <= limits.bulk.max_length_bytes + len(body)
    async with await _connect(federation.url("hosp-a")) as receiver:
        channel = await receiver.channel()
        queue = await channel.get_queue(queue_name("hosp-a", Plane.BULK), ensure=True)
        assert queue.declaration_result.message_count == accepted


async def test_message_past_delivery_limit_goes_to_dead_queue(
    provision_sites: Provisioner,
) -> None:
    """A message requeued past the delivery limit is dead-lettered into the site's dead queue."""
    limits = Limits(bulk=PlaneLimits(max_length_bytes=1_000_000, delivery_limit=2))
    federation = provision_sites(("hosp-a", "hosp-b"), limits=limits)
    body = uuid.uuid4().bytes
    async with await _connect(federation.url("hosp-b")) as sender:
        await _publish(
            await _confirming_channel(sender),
            exchange=exchange_name("hosp-a"),
            key=routing_key(Plane.BULK, "hosp-b"),
            body=body,
            user_id=federation.user("hosp-b"),
        )
    deliveries = 0
    async with await _connect(federation.url("hosp-a")) as receiver:
        channel = await receiver.channel()
        bulk = await channel.get_queue(queue_name("hosp-a", Plane.BULK), ensure=True)
        dead = await channel.get_queue(dead_queue_name("hosp-a"), ensure=True)
        dead_letters: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def dead_lettered() -> bool:
            nonlocal deliveries
            message = await bulk.get(no_ack=False, fail=False)
            if message is not None:
                deliveries += 1
                await message.nack(requeue=True)
            found = await dead.get(no_ack=False, fail=False)
            if found is not None:
                dead_letters.append(found)
            return bool(dead_letters)

        await wait_until(dead_lettered, timeout_s=15, what="the message in the dead queue")
        letter = dead_letters[0]
        assert letter.body == body
        assert letter.headers.get("x-first-death-reason") == "delivery_limit"
        assert letter.user_id == federation.user("hosp-b")
        await letter.ack()
    assert deliveries == limits.bulk.delivery_limit + 1
