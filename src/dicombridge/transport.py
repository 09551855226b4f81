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
* Consumers ack only after the handler has stored the message durably. Bulk deliveries
  are handled concurrently, as many as the channel's prefetch lets in (each is acked
  when its own handler returns; the receiver takes one transfer's deliveries one at a
  time), so that one delivery's fsyncs do not hold up the next; control deliveries are
  handled one at a time, in the order they came.
* A delivery whose ``user_id`` is missing, or is not the broker user of the site named
  in its routing key, is refused before any handler sees it.

Connections and failover. Each plane has one plain (not robust) aio-pika connection,
held by a ``_Link`` that knows every broker URL (the nodes of a cluster). Nothing is
restored behind our back: whoever needs the connection after it was lost reconnects,
trying the URLs round robin from the one after the node that failed.

* A publish whose connection or channel goes away, confirm pending, raises
  ``BrokerUnreachableError``; the next publish reconnects. The caller republishes the
  whole transfer and the receiver drops the fragments it already has. A channel that
  got a nack is closed and replaced: after a quorum queue's leader moved, RabbitMQ 3.10
  was seen to nack every later publish on the old channel, never on a new one.
* ``consume`` owns its consumer: a loop that opens a channel, sets QoS, gets the queue
  passively and consumes, and when the channel or connection closes or the broker
  cancels the consumer (``basic.cancel``: the queue was deleted, or a quorum queue's
  member went away) waits for a connection, with backoff and jitter, and starts again,
  until it is cancelled. Unacked deliveries of a lost channel go back to the queue.

Why not aio-pika's ``RobustConnection``: it restores channels, queues and queue iterators
in a background task of its own, and with a cluster node killed under it the consumer was
not reliably restored (the client-failover test failed in 2 of 3 runs when it was
dropped, 1 of 6 when rerun for this change): a ``RobustChannel`` tried to reopen before
its connection was back ("No active transport in channel") and no consumer came back
within two minutes, with nothing that said so. A loop we own is short, every step of it
is logged and counted (``ConsumerCounters.sessions``, ``consuming``), and it needs no
hook into aio-pika's reconnection internals.

Poison messages (https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling).
Nothing a handler cannot take is dropped or retried forever; it is rejected to the
site's dead-letter queue, counted by reason in ``ConsumerCounters.dead_lettered``, and
logged with its message id, size and error class only (never an exception's text: it
may quote what a message held):

* ``sender_check``: ``user_id`` missing or not the sender site's broker user;
* ``permanent_error``: the handler raised a permanent ``BridgeError`` (a garbage body,
  an unreadable protocol version, a failed check);
* ``delivery_limit``: the handler raised a transient ``BridgeError`` on a delivery the
  queue already redelivered ``max_redeliveries`` times (``x-delivery-count``);
* ``handler_crash``: the same, with any other exception (a bug, or the disk).

Below ``max_redeliveries`` a failed delivery is requeued after a pause that doubles with
its ``x-delivery-count`` (``requeue_delay_s``, at most ``MAX_REQUEUE_DELAY_S``), without
holding up the deliveries behind it. Keep ``max_redeliveries`` below the queue's
``x-delivery-limit`` (topology ``PlaneLimits.delivery_limit``, 20 by default): past that
the broker dead-letters by itself, uncounted here, e.g. a message that kills the process.

TLS (amqps URLs). The broker's certificate must chain to ``BrokerTls.ca_file`` (default:
the system CA store) and name the URL's host; TLS 1.2 at least; a client certificate if
configured, and RabbitMQ's x509 login (EXTERNAL mechanism, ``auth=external`` in the URL
as aiormq reads it) if asked. A TLS failure while connecting (certificate not verified,
handshake refused) is ``BrokerTlsError``: permanent, logged at ERROR with the node, the
CA and OpenSSL's reason, and raised at once instead of being retried
(https://www.rabbitmq.com/docs/ssl).

aio-pika and aiormq exceptions are translated into ``TransportError`` here and only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import traceback
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from yarl import URL

from dicombridge.directory import Directory
from dicombridge.envelope import sealed_fragment_bytes
from dicombridge.errors import (
    BridgeError,
    BrokerTlsError,
    BrokerUnreachableError,
    PermissionDeniedError,
    PublishRefusedError,
    SenderMismatchError,
    TransportError,
)
from dicombridge.fragments import SealedTransfer
from dicombridge.topology import exchange_name, queue_name, routing_key

if TYPE_CHECKING:
    from dicombridge.config import BrokerSection

log = logging.getLogger(__name__)

Plane = Literal["bulk", "control"]
PLANES: Final[tuple[Plane, ...]] = ("bulk", "control")
CONTENT_TYPE: Final = "application/vnd.dicombridge"

DeadLetterReason = Literal["sender_check", "permanent_error", "handler_crash", "delivery_limit"]
DEAD_LETTER_REASONS: Final[tuple[DeadLetterReason, ...]] = (
    "sender_check",
    "permanent_error",
    "handler_crash",
    "delivery_limit",
)

# Pauses of the consumer loop between attempts to reach the broker again (with jitter).
RECONNECT_FIRST_DELAY_S: Final = 0.5
RECONNECT_MAX_DELAY_S: Final = 30.0
# The longest pause before a failed delivery is requeued (the pause doubles per attempt).
MAX_REQUEUE_DELAY_S: Final = 5.0
# Closing a connection or channel whose peer may be gone must not hang a shutdown.
CLOSE_TIMEOUT_S: Final = 5.0

# The errors that mean "the connection or channel went away": worth retrying.
TRANSIENT_ERRORS: Final = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    asyncio.TimeoutError,
)


def _translate(exc: BaseException, what: str) -> TransportError:
    """One place that turns aio-pika/aiormq errors into our tree."""
    if isinstance(exc, TransportError):
        return exc
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


def _where(exc: BaseException) -> str:
    """Where an exception was raised (file:line in function), to log instead of its text."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


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


@dataclass(frozen=True)
class ConsumerCounters:
    """What one plane's consumer did since the transport was made (a snapshot).

    Every delivery is counted in ``delivered`` and ends acked, requeued or dead-lettered,
    or unsettled when its channel closed first (the broker then delivers it again).
    ``redelivered`` counts deliveries the broker marked as delivered before.
    ``sessions`` counts consumers started (the first, then one per restore) and
    ``consuming`` says whether one is registered with the broker now.
    """

    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    requeued: int = 0
    dead_lettered: Mapping[DeadLetterReason, int] = field(
        default_factory=lambda: MappingProxyType(dict.fromkeys(DEAD_LETTER_REASONS, 0))
    )
    sessions: int = 0
    consuming: bool = False

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())


@dataclass
class _Tally:
    """The mutable counts behind ``ConsumerCounters``."""

    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    requeued: int = 0
    dead_lettered: dict[DeadLetterReason, int] = field(
        default_factory=lambda: dict.fromkeys(DEAD_LETTER_REASONS, 0)
    )
    sessions: int = 0
    consuming: bool = False

    def snapshot(self) -> ConsumerCounters:
        return ConsumerCounters(
            delivered=self.delivered,
            redelivered=self.redelivered,
            acked=self.acked,
            requeued=self.requeued,
            dead_lettered=MappingProxyType(dict(self.dead_lettered)),
            sessions=self.sessions,
            consuming=self.consuming,
        )


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How often the queue delivered ``message`` before (quorum queues' ``x-delivery-count``)."""
    value = (message.headers or {}).get("x-delivery-count")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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


# --- TLS to the broker (amqps) ---------------------------------------------------------

_E = TypeVar("_E", bound=BaseException)


@dataclass(frozen=True)
class BrokerTls:
    """How to speak TLS to the broker on ``amqps`` URLs (``[broker]`` ca/cert/key files)."""

    ca_file: Path | None = None  # PEM; None: the system's CA store
    cert_file: Path | None = None  # client certificate (PEM), may hold the key too
    key_file: Path | None = None
    external_auth: bool = False  # log in with the client certificate (EXTERNAL)

    @classmethod
    def of(cls, broker: BrokerSection) -> BrokerTls:
        """The TLS settings of a site's ``[broker]`` section."""
        return cls(
            ca_file=broker.ca_file,
            cert_file=broker.cert_file,
            key_file=broker.key_file,
            external_auth=broker.auth == "external",
        )

    @property
    def ca_name(self) -> str:
        """The CA the broker's certificate must chain to, for messages."""
        return f"the CA in {self.ca_file}" if self.ca_file else "a CA of the system store"

    def context(self) -> ssl.SSLContext:
        """A client context: TLS >= 1.2, the peer verified, its name checked.

        Raises ``BrokerTlsError`` naming the file when a CA or certificate cannot be loaded.
        """
        try:
            # With a cafile, only that CA is trusted (the system store is not loaded).
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(self.ca_file) if self.ca_file else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise BrokerTlsError(
                f"cannot load the broker CA from {self.ca_file}: {type(exc).__name__}; "
                "check [broker] ca_file (a PEM file of the CA that signed the broker's "
                "certificate)"
            ) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        if self.cert_file is not None:
            try:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise BrokerTlsError(
                    f"cannot load the client certificate {self.cert_file} "
                    f"(key {self.key_file or 'in the same file'}): {type(exc).__name__}; "
                    "check [broker] cert_file and key_file (PEM, the key unencrypted)"
                ) from exc
        return context


def _in_chain(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` among ``exc`` and its causes (aiormq wraps what failed)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _tls_reason(error: ssl.SSLError) -> str:
    """OpenSSL's reason, e.g. ``certificate verify failed: unable to get local issuer``."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    # OpenSSL's reason code, e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED, as words.
    return str(error.reason).lower().replace("_", " ") if error.reason else type(error).__name__


# --- connections: one per plane, over every node of the broker -------------------------


def _node(url: URL) -> str:
    """A URL's ``host:port``, for logs (never the credentials)."""
    return f"{url.host}:{url.port}"


class _Link:
    """One plane's AMQP connection, over every URL of the broker (the nodes of a cluster).

    It connects when asked and never by itself: a lost connection stays lost until the
    next ``connection()``, which tries each URL once, starting after the node whose
    connection was lost, and raises ``BrokerUnreachableError`` if none answers.
    """

    def __init__(
        self,
        urls: Sequence[URL],
        *,
        name: str,
        timeout_s: float,
        tls: BrokerTls | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.urls = tuple(urls)
        self.name = name
        self.node = ""  # host:port of the current connection, for logs
        self._timeout_s = timeout_s
        self._tls = tls or BrokerTls()
        self._ssl_context = ssl_context
        self._next = 0
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def current(self) -> AbstractConnection | None:
        """The connection if it is open, else None."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return None
        return connection

    async def connection(self) -> AbstractConnection:
        """The open connection, connecting first if there is none."""
        if (connection := self.current) is not None and not self._closed:
            return connection
        async with self._lock:
            if self._closed:
                raise TransportError(f"{self.name}: the transport is closed")
            if (connection := self.current) is not None:
                return connection
            await self._drop()
            self._connection = await self._connect_round()
            return self._connection

    async def _connect_round(self) -> AbstractConnection:
        error: BaseException | None = None
        reset_on_tls = False
        for _ in self.urls:
            index = self._next
            self._next = (index + 1) % len(self.urls)
            url = self.urls[index]
            connection = aio_pika.Connection(
                url,
                ssl_context=self._ssl_context if url.scheme == "amqps" else None,
                client_properties={"connection_name": self.name},
            )
            try:
                await connection.connect(timeout=self._timeout_s)
            except Exception as exc:
                error = exc
                await _close_quietly(connection)
                if url.scheme == "amqps":
                    if (failure := _in_chain(exc, ssl.SSLError)) is not None:
                        raise self._tls_error(url, failure) from exc
                    reset_on_tls |= _in_chain(exc, ConnectionResetError) is not None
                log.info(
                    "broker node not reachable",
                    extra={
                        "connection": self.name,
                        "node": _node(url),
                        "error": type(exc).__name__,
                    },
                )
                continue
            except BaseException:
                await _close_quietly(connection)
                raise
            if self._closed:
                await _close_quietly(connection)
                raise TransportError(f"{self.name}: the transport is closed")
            self.node = _node(url)
            connection.close_callbacks.add(self._on_lost)
            log.info("broker connected", extra={"connection": self.name, "node": self.node})
            return connection
        # TLS 1.3: a broker refusing the client certificate (or its absence) sends its
        # alert after the client's handshake is done; the client may see only a reset.
        hint = (
            "; over amqps a reset can also mean the broker refused the client certificate "
            "or wants one: check [broker] cert_file and key_file"
            if reset_on_tls
            else ""
        )
        raise BrokerUnreachableError(
            f"{self.name}: no broker node answered ({type(error).__name__}); "
            f"check [broker] url, password and network{hint}"
        ) from error

    def _tls_error(self, url: URL, failure: ssl.SSLError) -> BrokerTlsError:
        """Log and build the permanent error for a TLS failure with ``url``'s node."""
        reason = _tls_reason(failure)
        log.error(
            "TLS to the broker failed; not retrying",
            extra={
                "connection": self.name,
                "node": _node(url),
                "ca": str(self._tls.ca_file or "system store"),
                "error": type(failure).__name__,
                "detail": reason,
            },
        )
        return BrokerTlsError(
            f"{self.name}: TLS to the broker {_node(url)} failed ({reason}): its certificate "
            f"must be signed by {self._tls.ca_name} and name the host {url.host}, and it "
            "must accept the client certificate if it asks for one; check [broker] url, "
            "ca_file, cert_file and key_file"
        )

    def _on_lost(self, _connection: object, exc: BaseException | None = None) -> None:
        log.warning(
            "broker connection lost",
            extra={"connection": self.name, "node": self.node, "error": type(exc).__name__},
        )

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close_callbacks.discard(self._on_lost)
            await _close_quietly(connection)

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            await self._drop()


async def _close_quietly(closable: AbstractConnection | AbstractChannel) -> None:
    """Close a connection or channel that may already be gone, within ``CLOSE_TIMEOUT_S``."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closable.close(), CLOSE_TIMEOUT_S)


def _with_heartbeat(url: str, heartbeat_s: int | None) -> URL:
    parsed = URL(url)
    if heartbeat_s is None or "heartbeat" in parsed.query:
        return parsed
    return parsed.update_query(heartbeat=str(heartbeat_s))


def _with_auth(url: URL, tls: BrokerTls) -> URL:
    """Ask aiormq for the EXTERNAL mechanism (x509 login) if configured."""
    if not tls.external_auth or url.scheme != "amqps":
        return url
    return url.update_query(auth="external")


def _first_transport_error(group: BaseExceptionGroup[BaseException]) -> TransportError | None:
    """The error to raise for a failed batch of publishes: a permanent one if any."""
    errors = [e for e in _leaves(group) if isinstance(e, TransportError)]
    permanent = [e for e in errors if not e.transient]
    return next(iter(permanent or errors), None)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


# --- the transport ----------------------------------------------------------------------


class Transport:
    """A site's connections to the broker: one for bulk, one for control.

    ``amqp_url`` may list several URLs, one per node of a cluster: each connection goes to
    the first that answers and, when its node fails, on to the next.
    ``max_redeliveries`` and ``requeue_delay_s`` say how failed deliveries are retried
    (module docstring); ``counters(plane)`` reports what each consumer did.

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
        heartbeat_s: int | None = None,
        max_redeliveries: int = 16,
        requeue_delay_s: float = 0.1,
        tls: BrokerTls | None = None,
    ) -> None:
        urls = [amqp_url] if isinstance(amqp_url, str) else list(amqp_url)
        if not urls:
            raise TransportError("no broker URL given; check [broker] url")
        if max_redeliveries < 0 or requeue_delay_s < 0:
            raise ValueError("max_redeliveries and requeue_delay_s must not be negative")
        self.site_id = site_id
        self.broker_user = broker_user
        self.directory = directory
        self._prefetch = prefetch_count or {"bulk": 8, "control": 32}
        self._max_redeliveries = max_redeliveries
        self._requeue_delay_s = requeue_delay_s
        self._budget = ByteBudget(
            max_bytes=max_in_flight_bytes, max_messages=max_in_flight_messages
        )
        tls = tls or BrokerTls()
        parsed = [_with_auth(_with_heartbeat(url, heartbeat_s), tls) for url in urls]
        # One context for every connection; built here so a bad CA file fails at once.
        context = tls.context() if any(u.scheme == "amqps" for u in parsed) else None
        self._links = {
            plane: _Link(
                parsed,
                name=f"dicombridge {site_id} {plane}",
                timeout_s=connect_timeout_s,
                tls=tls,
                ssl_context=context,
            )
            for plane in PLANES
        }
        self._tallies = {plane: _Tally() for plane in PLANES}
        self._publish_channels: dict[Plane, tuple[AbstractConnection, AbstractChannel]] = {}
        # Channels closed here because the broker nacked a publish on them: the other
        # publishes they carried fail with the nack's error, not as a lost connection.
        self._nacked: weakref.WeakSet[AbstractChannel] = weakref.WeakSet()
        self._channel_locks = {plane: asyncio.Lock() for plane in PLANES}
        self._exchanges: dict[tuple[Plane, str], AbstractExchange] = {}
        self._closing = False

    def set_directory(self, directory: Directory) -> None:
        """Use a newer directory (after the operator distributed one)."""
        self.directory = directory

    def counters(self, plane: Plane) -> ConsumerCounters:
        """What the consumer of ``plane`` did so far (a snapshot)."""
        return self._tallies[plane].snapshot()

    def broker_node(self, plane: Plane) -> str | None:
        """``host:port`` of the node ``plane``'s connection is open to, if it is open."""
        link = self._links[plane]
        return link.node if link.current is not None else None

    async def __aenter__(self) -> Self:
        for plane in PLANES:
            try:
                await self._links[plane].connection()
            except TransportError as exc:
                await self._close()
                if not exc.transient:
                    raise  # e.g. BrokerTlsError: waiting will not fix it
                raise BrokerUnreachableError(
                    f"cannot connect to the broker for the {plane} plane: {exc}"
                ) from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        self._closing = True
        for link in self._links.values():
            await link.close()
        self._publish_channels.clear()
        self._exchanges.clear()

    # --- publishing ---------------------------------------------------------------------

    async def _exchange(
        self, plane: Plane, site_id: str
    ) -> tuple[AbstractChannel, AbstractExchange]:
        """``plane``'s publish channel and on it the exchange of ``site_id``, opened as needed."""
        link = self._links[plane]
        async with self._channel_locks[plane]:
            held = self._publish_channels.get(plane)
            if held is None or held[0] is not link.current or held[1].is_closed:
                self._forget_channel(plane)
                try:
                    connection = await link.connection()
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                except Exception as exc:
                    raise _translate(exc, f"{plane} publish channel") from exc
                self._publish_channels[plane] = (connection, channel)
            else:
                channel = held[1]
            key = (plane, site_id)
            if key not in self._exchanges:
                name = exchange_name(site_id)
                try:
                    self._exchanges[key] = await channel.get_exchange(name, ensure=True)
                except Exception as exc:
                    raise _translate(exc, f"exchange {name}") from exc
            return channel, self._exchanges[key]

    def _forget_channel(self, plane: Plane) -> None:
        self._publish_channels.pop(plane, None)
        self._exchanges = {k: v for k, v in self._exchanges.items() if k[0] != plane}

    async def _retire_channel(self, plane: Plane, channel: AbstractChannel) -> None:
        """Publish no more on ``channel`` (lost, or it nacked) and close it."""
        held = self._publish_channels.get(plane)
        if held is not None and held[1] is channel:
            self._forget_channel(plane)
        if not channel.is_closed:
            await _close_quietly(channel)

    async def publish(
        self, plane: Plane, destination_site: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish one message and wait for its confirm (within the in-flight budget)."""
        await self._budget.acquire(len(body))
        await self._publish_reserved(plane, destination_site, body, message_id=message_id)

    async def _publish_reserved(
        self, plane: Plane, destination_site: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish a message whose room in the budget is already taken; release it after.

        A confirm lost with the channel or connection raises ``BrokerUnreachableError``:
        the broker may or may not have the message, so the caller publishes it again.
        """
        try:
            channel, exchange = await self._exchange(plane, destination_site)
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
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are cancelled, not the publish
                if channel in self._nacked:
                    raise PublishRefusedError(
                        f"publish {message_id}: refused (the broker nacked its channel)"
                    ) from None
                await self._retire_channel(plane, channel)
                raise BrokerUnreachableError(
                    f"publish {message_id}: confirm lost with the channel"
                ) from None
            except aio_pika.exceptions.PublishError as exc:  # returned: unroutable
                raise _translate(exc, f"publish {message_id}") from exc
            except aio_pika.exceptions.DeliveryError as exc:
                # A nack. After a quorum queue's leader moved, RabbitMQ 3.10 was seen to
                # nack every later publish on the same channel while a new channel
                # published fine: so a channel that nacked is not used again.
                self._nacked.add(channel)
                await self._retire_channel(plane, channel)
                raise _translate(exc, f"publish {message_id}") from exc
            except Exception as exc:
                if channel in self._nacked:
                    raise PublishRefusedError(
                        f"publish {message_id}: refused (the broker nacked its channel)"
                    ) from exc
                if channel.is_closed or self._links[plane].current is None:
                    await self._retire_channel(plane, channel)
                    raise BrokerUnreachableError(
                        f"publish {message_id}: confirm lost with the channel "
                        f"({type(exc).__name__})"
                    ) from exc
                raise _translate(exc, f"publish {message_id}") from exc
        finally:
            await self._budget.release(len(body))

    async def publish_transfer(self, transfer: SealedTransfer) -> int:
        """Publish a sealed transfer's manifest and fragments; return the bytes published.

        Fragments are read from disk one at a time and published concurrently within the
        in-flight budget; this returns when the broker confirmed every one, and raises
        a ``TransportError`` otherwise (the caller retries the whole transfer; the
        receiver drops what it already has).
        """
        tid = transfer.transfer_id_hex
        destination = transfer.recipient_site
        manifest = await asyncio.to_thread(transfer.manifest_body)
        published = len(manifest)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    self.publish("bulk", destination, manifest, message_id=f"{tid}.m")
                )
                for index in range(transfer.fragment_count):
                    # Take room in the budget before reading, so memory stays bounded.
                    await self._budget.acquire(
                        sealed_fragment_bytes(transfer.fragment_length(index))
                    )
                    body = await asyncio.to_thread(transfer.fragment_body, index)
                    group.create_task(
                        self._publish_reserved(
                            "bulk", destination, body, message_id=f"{tid}.{index}"
                        )
                    )
                    published += len(body)
        except BaseExceptionGroup as failed:
            first = _first_transport_error(failed)
            if first is None:
                raise
            raise first from None
        log.info(
            "transfer published",
            extra={"transfer_id": tid, "to_site": destination, "bytes": published},
        )
        return published

    # --- consuming ----------------------------------------------------------------------

    async def consume(self, plane: Plane, handler: Handler) -> None:
        """Consume this site's queue of ``plane`` until cancelled or the transport closes.

        ``handler`` must return only once the message is stored durably; then it is
        acked. Failures are dead-lettered or requeued as the module docstring says. When
        the channel or connection is lost, or the broker cancels the consumer, it starts
        again (reconnecting, with backoff) and carries on. A queue that is missing or
        forbidden at the first attempt raises ``PermissionDeniedError``; later it is
        retried, because a cluster in the middle of a failover may answer so.
        """
        name = queue_name(self.site_id, plane)
        tally = self._tallies[plane]
        delay_s = RECONNECT_FIRST_DELAY_S
        while not self._closing:
            try:
                reason = await self._consume_once(plane, name, handler, tally)
            except TransportError as exc:
                if self._closing:
                    break
                if isinstance(exc, PermissionDeniedError) and tally.sessions == 0:
                    raise
                log.log(
                    logging.WARNING if exc.transient else logging.ERROR,
                    "consumer waiting for the broker",
                    extra={
                        "queue": name,
                        "error": type(exc).__name__,
                        "detail": str(exc),
                        "retry_in_s": round(delay_s, 2),
                    },
                )
            else:
                if self._closing:
                    break
                delay_s = RECONNECT_FIRST_DELAY_S
                log.warning(
                    "consumer stopped; starting it again", extra={"queue": name, "reason": reason}
                )
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay_s = min(delay_s * 2, RECONNECT_MAX_DELAY_S)
        log.info("consumer stopped: transport closed", extra={"queue": name})

    async def _consume_once(self, plane: Plane, name: str, handler: Handler, tally: _Tally) -> str:
        """One consumer on one channel; return why it ended (channel closed, cancelled)."""
        link = self._links[plane]
        connection = await link.connection()
        try:
            channel = await connection.channel()
        except Exception as exc:
            raise _translate(exc, f"channel for {name}") from exc
        events: asyncio.Queue[AbstractIncomingMessage | str] = asyncio.Queue()

        def on_close(_channel: object, exc: BaseException | None = None) -> None:
            events.put_nowait(f"channel closed ({type(exc).__name__})" if exc else "channel closed")

        def on_cancel(_frame: object) -> None:
            events.put_nowait("consumer cancelled by the broker")

        channel.close_callbacks.add(on_close)
        requeues: set[asyncio.Task[None]] = set()
        handling: set[asyncio.Task[None]] = set()
        try:
            try:
                await channel.set_qos(prefetch_count=self._prefetch[plane])
                queue = await channel.get_queue(name, ensure=True)
                underlay = await channel.get_underlay_channel()
                underlay.on_consumer_cancel_callbacks.add(on_cancel)
                await queue.consume(events.put, no_ack=False)
            except Exception as exc:
                raise _translate(exc, f"queue {name}") from exc
            tally.sessions += 1
            tally.consuming = True
            log.info(
                "consuming", extra={"queue": name, "node": link.node, "session": tally.sessions}
            )
            while True:
                item = await events.get()
                if isinstance(item, str):
                    return item
                if channel.is_closed:
                    return "channel closed"
                if plane == "bulk":
                    # At most prefetch_count of these: the broker sends no more unacked.
                    task = asyncio.create_task(
                        self._dispatch(plane, item, handler, tally, requeues)
                    )
                    handling.add(task)
                    task.add_done_callback(handling.discard)
                else:
                    await self._dispatch(plane, item, handler, tally, requeues)
        finally:
            tally.consuming = False
            for task in (*requeues, *handling):
                task.cancel()
            if handling:
                # As after a crash: what a cancelled handler left is redelivered.
                await asyncio.gather(*handling, return_exceptions=True)
            channel.close_callbacks.discard(on_close)
            if not channel.is_closed:
                await _close_quietly(channel)  # unacked deliveries go back to the queue

    async def _dispatch(
        self,
        plane: Plane,
        message: AbstractIncomingMessage,
        handler: Handler,
        tally: _Tally,
        requeues: set[asyncio.Task[None]],
    ) -> None:
        tally.delivered += 1
        if message.redelivered:
            tally.redelivered += 1
        count = delivery_count(message)
        facts: dict[str, Any] = {
            "plane": plane,
            "message_id": message.message_id,
            "bytes": len(message.body),
            "delivery_count": count,
        }
        try:
            sender = check_sender(
                user_id=message.user_id,
                routing_key_=message.routing_key or "",
                plane=plane,
                directory=self.directory,
            )
        except SenderMismatchError as exc:
            facts.update(
                error=type(exc).__name__, routing_key=message.routing_key, user_id=message.user_id
            )
            await self._dead_letter(message, tally, "sender_check", facts)
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
            facts["error"] = type(exc).__name__
            if exc.transient:
                await self._retry(message, tally, "delivery_limit", facts, requeues)
            else:
                await self._dead_letter(message, tally, "permanent_error", facts)
            return
        except Exception as exc:
            facts.update(error=type(exc).__name__, where=_where(exc))
            await self._retry(message, tally, "handler_crash", facts, requeues)
            return
        if await _settle(message.ack(), facts):
            tally.acked += 1

    async def _retry(
        self,
        message: AbstractIncomingMessage,
        tally: _Tally,
        reason: DeadLetterReason,
        facts: dict[str, Any],
        requeues: set[asyncio.Task[None]],
    ) -> None:
        """Requeue a failed delivery after a pause, or dead-letter it past the limit."""
        count: int = facts["delivery_count"]
        if count >= self._max_redeliveries:
            await self._dead_letter(message, tally, reason, facts)
            return
        delay_s = min(self._requeue_delay_s * 2**count, MAX_REQUEUE_DELAY_S)
        log.warning("delivery failed; requeued", extra={**facts, "retry_in_s": delay_s})
        if delay_s == 0:
            await self._requeue(message, tally, facts)
            return
        task = asyncio.create_task(self._requeue(message, tally, facts, after_s=delay_s))
        requeues.add(task)
        task.add_done_callback(requeues.discard)

    @staticmethod
    async def _requeue(
        message: AbstractIncomingMessage,
        tally: _Tally,
        facts: dict[str, Any],
        *,
        after_s: float = 0.0,
    ) -> None:
        if after_s:
            await asyncio.sleep(after_s)
        if await _settle(message.nack(requeue=True), facts):
            tally.requeued += 1

    @staticmethod
    async def _dead_letter(
        message: AbstractIncomingMessage,
        tally: _Tally,
        reason: DeadLetterReason,
        facts: dict[str, Any],
    ) -> None:
        if await _settle(message.reject(requeue=False), facts):
            tally.dead_lettered[reason] += 1
            log.warning("delivery dead-lettered", extra={**facts, "reason": reason})


async def _settle(settling: Awaitable[None], facts: dict[str, Any]) -> bool:
    """Ack, nack or reject; False if the channel is gone (the broker delivers it again)."""
    try:
        await settling
    except Exception as exc:
        log.info(
            "delivery not settled: its channel is gone; the broker delivers it again",
            extra={**facts, "settle_error": type(exc).__name__},
        )
        return False
    return True
