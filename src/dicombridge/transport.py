"""Everything aio-pika: connect, publish with confirms, consume with manual acks.

Design rules from RabbitMQ's reliability guide (https://www.rabbitmq.com/docs/reliability)
and design.md:

* Topology is provisioned by the operator; a gateway only declares passively.
* Publishes are persistent, ``mandatory`` with ``on_return_raises`` (an unroutable
  message fails loudly), carry a unique ``message_id`` and the sender's ``user_id``
  (which the broker validates against the connection's user), and wait for publisher
  confirms. Several are in flight at once, capped in bytes and in messages.
* Control and bulk use separate AMQP connections: the broker's flow control throttles a
  whole connection, and control must never wait behind bulk.
* Consumers ack only after the handler has stored the message durably; a handler's
  permanent error rejects the delivery to the dead-letter queue, a transient one
  requeues it.
* A delivery whose ``user_id`` is missing, or is not the broker user of the site named
  in its routing key, is refused before any handler sees it.

aio-pika and aiormq exceptions are translated into ``TransportError`` here and only here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Self

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from yarl import URL

from dicombridge.directory import Directory
from dicombridge.envelope import sealed_fragment_bytes
from dicombridge.errors import (
    BridgeError,
    BrokerUnreachableError,
    PermissionDeniedError,
    PublishRefusedError,
    SenderMismatchError,
    TransportError,
)
from dicombridge.fragments import SealedTransfer
from dicombridge.topology import exchange_name, queue_name, routing_key

log = logging.getLogger(__name__)

Plane = Literal["bulk", "control"]
CONTENT_TYPE: Final = "application/vnd.dicombridge"

# The errors that mean "the connection or channel went away": worth retrying.
TRANSIENT_ERRORS: Final = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    asyncio.TimeoutError,
)


def _translate(exc: BaseException, what: str) -> TransportError:
    """One place that turns aio-pika/aiormq errors into our tree."""
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return PermissionDeniedError(f"{what}: the broker refused access ({exc})")
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return PermissionDeniedError(f"{what}: the broker refused a precondition ({exc})")
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        return PermissionDeniedError(
            f"{what}: not found on the broker; "
            "ask the operator to run `dicombridge broker provision`"
        )
    if isinstance(exc, aio_pika.exceptions.PublishError):
        return PublishRefusedError(f"{what}: unroutable, returned by the broker")
    if isinstance(exc, aio_pika.exceptions.DeliveryError):
        return PublishRefusedError(f"{what}: nacked by the broker (queue full or unavailable)")
    if isinstance(exc, TRANSIENT_ERRORS):
        return BrokerUnreachableError(f"{what}: connection lost ({type(exc).__name__})")
    return TransportError(f"{what}: {type(exc).__name__}: {exc}")


class ByteBudget:
    """Caps what is in flight, in bytes and in messages; one oversized item may pass alone."""

    def __init__(self, *, max_bytes: int, max_messages: int) -> None:
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.bytes = 0
        self.messages = 0
        self.waiting = 0  # publishes blocked for room (a figure for back-pressure)
        self._changed = asyncio.Condition()

    def _fits(self, size: int) -> bool:
        if self.messages == 0:
            return True
        return self.messages < self.max_messages and self.bytes + size <= self.max_bytes

    async def acquire(self, size: int) -> None:
        async with self._changed:
            self.waiting += 1
            try:
                await self._changed.wait_for(lambda: self._fits(size))
            finally:
                self.waiting -= 1
            self.bytes += size
            self.messages += 1

    async def release(self, size: int) -> None:
        async with self._changed:
            self.bytes -= size
            self.messages -= 1
            self._changed.notify_all()


@dataclass(frozen=True)
class Delivery:
    """A message from our own queue whose sender the broker and the directory vouched for."""

    body: bytes
    sender_site: str
    plane: Plane
    message_id: str | None
    redelivered: bool


Handler = Callable[[Delivery], Awaitable[None]]


def check_sender(
    *, user_id: str | None, routing_key_: str, plane: Plane, directory: Directory
) -> str:
    """Return the sender site of a delivery, or raise ``SenderMismatchError``.

    The broker guarantees ``user_id`` equals the publishing connection's user (validated
    user id) and, by topic permissions, that the routing key ends in that user's site;
    the receiver checks the two agree with the directory.
    """
    if not user_id:
        raise SenderMismatchError("message without user_id")
    expected_prefix = f"{plane}."
    if not routing_key_.startswith(expected_prefix):
        raise SenderMismatchError(f"routing key {routing_key_!r} is not on the {plane} plane")
    site_id = routing_key_[len(expected_prefix) :]
    entry = directory.site(site_id)
    if entry is None:
        raise SenderMismatchError(f"routing key names {site_id!r}, not in the directory")
    if entry.broker_user != user_id:
        raise SenderMismatchError(
            f"user_id {user_id!r} is not the broker user of {site_id!r} ({entry.broker_user!r})"
        )
    return site_id


# --- several broker URLs: the nodes of a cluster ---------------------------------------


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over several broker URLs (the nodes of one cluster).

    aio-pika reconnects to one URL only. aio-pika calls ``_on_connection_close`` both when
    an established connection is lost and when a connection attempt fails; here it moves
    ``url`` on to the next node first, so every reconnection attempt tries another node,
    round robin. Channels and consumers are restored by aio-pika as for one URL.
    """

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self._failover_urls = tuple(URL(url) for url in urls)
        self._failover_index = 0
        super().__init__(self._failover_urls[0], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self.close_called:
            self._failover_index = (self._failover_index + 1) % len(self._failover_urls)
            self.url = self._failover_urls[self._failover_index]
        await super()._on_connection_close(closing)


async def _connect_any(
    urls: Sequence[str], *, timeout_s: float, client_properties: dict[str, Any]
) -> AbstractRobustConnection:
    """Connect to the first URL that answers, trying each in turn; raise the last error."""
    if len(urls) == 1:
        return await aio_pika.connect_robust(
            urls[0], timeout=timeout_s, client_properties=client_properties
        )
    error: Exception | None = None
    for start in range(len(urls)):
        connection = FailoverConnection(
            [*urls[start:], *urls[:start]], client_properties=client_properties
        )
        try:
            await connection.connect(timeout=timeout_s)
        except Exception as exc:
            error = exc
            await connection.close()
            continue
        return connection
    assert error is not None
    raise error


# --- the transport ----------------------------------------------------------------------


class Transport:
    """A site's connections to the broker: one for bulk, one for control.

    ``amqp_url`` may list several URLs, one per node of a cluster: each connection goes to
    the first that answers and, when its node fails, on to the next.

    Use as an async context manager; it connects on entry and closes on exit.
    """

    def __init__(
        self,
        *,
        amqp_url: str | Sequence[str],
        site_id: str,
        broker_user: str,
        directory: Directory,
        max_in_flight_bytes: int = 64 * 1024 * 1024,
        max_in_flight_messages: int = 64,
        prefetch_count: dict[Plane, int] | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._urls = [amqp_url] if isinstance(amqp_url, str) else list(amqp_url)
        if not self._urls:
            raise TransportError("no broker URL given; check [broker] url")
        self.site_id = site_id
        self.broker_user = broker_user
        self.directory = directory
        self._connect_timeout_s = connect_timeout_s
        self._prefetch = prefetch_count or {"bulk": 8, "control": 32}
        self._budget = ByteBudget(
            max_bytes=max_in_flight_bytes, max_messages=max_in_flight_messages
        )
        self._connections: dict[Plane, AbstractRobustConnection] = {}
        self._publish_channels: dict[Plane, AbstractChannel] = {}
        self._exchanges: dict[tuple[Plane, str], AbstractExchange] = {}
        self._consumer_tasks: list[asyncio.Task[None]] = []

    def set_directory(self, directory: Directory) -> None:
        """Use a newer directory (after the operator distributed one)."""
        self.directory = directory

    async def __aenter__(self) -> Self:
        for plane in ("bulk", "control"):
            try:
                connection = await _connect_any(
                    self._urls,
                    timeout_s=self._connect_timeout_s,
                    client_properties={"connection_name": f"dicombridge {self.site_id} {plane}"},
                )
            except Exception as exc:
                await self._close()
                raise BrokerUnreachableError(
                    f"cannot connect to the broker for the {plane} plane "
                    f"({type(exc).__name__}); check [broker] url, password and network"
                ) from exc
            self._connections[plane] = connection
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        for task in self._consumer_tasks:
            task.cancel()
        for connection in self._connections.values():
            await connection.close()
        self._connections.clear()
        self._publish_channels.clear()
        self._exchanges.clear()

    def _connection(self, plane: Plane) -> AbstractRobustConnection:
        try:
            return self._connections[plane]
        except KeyError:
            raise TransportError("transport is not connected (use `async with`)") from None

    async def _exchange(self, plane: Plane, site_id: str) -> AbstractExchange:
        key = (plane, site_id)
        if key not in self._exchanges:
            channel = self._publish_channels.get(plane)
            if channel is None or channel.is_closed:
                channel = await self._connection(plane).channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._publish_channels[plane] = channel
                self._exchanges = {k: v for k, v in self._exchanges.items() if k[0] != plane}
            name = exchange_name(site_id)
            try:
                self._exchanges[key] = await channel.get_exchange(name, ensure=True)
            except Exception as exc:
                raise _translate(exc, f"exchange {name}") from exc
        return self._exchanges[key]

    async def publish(
        self, plane: Plane, destination_site: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish one message and wait for its confirm (within the in-flight budget)."""
        await self._budget.acquire(len(body))
        await self._publish_reserved(plane, destination_site, body, message_id=message_id)

    async def _publish_reserved(
        self, plane: Plane, destination_site: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish a message whose room in the budget is already taken; release it after."""
        try:
            exchange = await self._exchange(plane, destination_site)
            message = aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                user_id=self.broker_user,
                content_type=CONTENT_TYPE,
                app_id="dicombridge",
            )
            try:
                await exchange.publish(message, routing_key(plane, self.site_id), mandatory=True)
            except Exception as exc:
                self._forget_channel_if_closed(plane)
                raise _translate(exc, f"publish {message_id}") from exc
        finally:
            await self._budget.release(len(body))

    def _forget_channel_if_closed(self, plane: Plane) -> None:
        channel = self._publish_channels.get(plane)
        if channel is not None and channel.is_closed:
            del self._publish_channels[plane]
            self._exchanges = {k: v for k, v in self._exchanges.items() if k[0] != plane}

    async def publish_transfer(self, transfer: SealedTransfer) -> int:
        """Publish a sealed transfer's manifest and fragments; return the bytes published.

        Fragments are read from disk one at a time and published concurrently within the
        in-flight budget; this returns when the broker confirmed every one, and raises
        the first failure otherwise (the caller retries the whole transfer; the receiver
        drops what it already has).
        """
        tid = transfer.transfer_id_hex
        destination = transfer.recipient_site
        manifest = await asyncio.to_thread(transfer.manifest_body)
        published = len(manifest)
        async with asyncio.TaskGroup() as group:
            group.create_task(self.publish("bulk", destination, manifest, message_id=f"{tid}.m"))
            for index in range(transfer.fragment_count):
                # Take room in the budget before reading, so memory stays bounded.
                await self._budget.acquire(sealed_fragment_bytes(transfer.fragment_length(index)))
                body = await asyncio.to_thread(transfer.fragment_body, index)
                group.create_task(
                    self._publish_reserved("bulk", destination, body, message_id=f"{tid}.{index}")
                )
                published += len(body)
        log.info(
            "transfer published",
            extra={"transfer_id": tid, "to_site": destination, "bytes": published},
        )
        return published

    async def consume(self, plane: Plane, handler: Handler) -> None:
        """Consume this site's queue of ``plane`` until cancelled.

        ``handler`` must return only once the message is stored durably; then it is
        acked. ``BridgeError`` that is permanent rejects the message (dead-letter queue);
        any other exception requeues it.
        """
        name = queue_name(self.site_id, plane)
        try:
            channel = await self._connection(plane).channel()
            await channel.set_qos(prefetch_count=self._prefetch[plane])
            queue = await channel.get_queue(name, ensure=True)
        except Exception as exc:
            raise _translate(exc, f"queue {name}") from exc
        async with queue.iterator() as messages:
            async for message in messages:
                await self._dispatch(plane, message, handler)

    async def _dispatch(
        self, plane: Plane, message: AbstractIncomingMessage, handler: Handler
    ) -> None:
        try:
            sender = check_sender(
                user_id=message.user_id,
                routing_key_=message.routing_key or "",
                plane=plane,
                directory=self.directory,
            )
        except SenderMismatchError as exc:
            log.warning(
                "delivery refused: sender check failed",
                extra={"message_id": message.message_id, "reason": str(exc)},
            )
            await message.reject(requeue=False)
            return
        delivery = Delivery(
            body=message.body,
            sender_site=sender,
            plane=plane,
            message_id=message.message_id,
            redelivered=bool(message.redelivered),
        )
        try:
            await handler(delivery)
        except BridgeError as exc:
            if exc.transient:
                log.warning(
                    "delivery requeued",
                    extra={"message_id": message.message_id, "error": type(exc).__name__},
                )
                await message.nack(requeue=True)
            else:
                log.warning(
                    "delivery rejected to the dead-letter queue",
                    extra={"message_id": message.message_id, "error": type(exc).__name__},
                )
                await message.reject(requeue=False)
            return
        except Exception:
            log.exception(
                "handler failed; delivery requeued", extra={"message_id": message.message_id}
            )
            await message.nack(requeue=True)
            return
        await message.ack()
