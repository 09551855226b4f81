"""Names on the broker and the broker state a federation needs; pure, no I/O.

One topic exchange per destination site (``dicombridge.to.<site>``), routing key
``<plane>.<sender-site>``, and per site durable quorum queues for the ``bulk`` and
``control`` planes plus a dead-letter queue. Each site has one broker user that can
configure nothing, write only to the federation's exchanges with routing keys naming
itself as the sender, and read only its own queues.

RabbitMQ behaviour this relies on:

- Permission regexes are matched unanchored against resource names of every kind
  (https://www.rabbitmq.com/docs/access-control#authorisation), so every pattern here
  is anchored, built from escaped names, and site ids that would make a queue name look
  like an exchange name are reserved.
- With the internal authorisation backend, a user with *no* topic permission for an
  exchange may publish with any routing key (``rabbit_auth_backend_internal:
  check_topic_access/4`` returns true when no record exists;
  https://www.rabbitmq.com/docs/access-control#topic-authorisation). So the write
  permission lists exactly the exchanges that carry topic permissions, never a
  wildcard: an exchange added later stays closed until its topic permissions exist.
- ``x-dead-letter-strategy: at-least-once`` only takes effect with
  ``x-overflow: reject-publish``; with ``drop-head`` a quorum queue falls back to
  at-most-once (https://www.rabbitmq.com/docs/quorum-queues#dead-lettering).
- RabbitMQ 4 applies a default delivery limit of 20 to quorum queues; every queue here
  declares its own (https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling).

``Definitions`` renders in the format of ``rabbitmqctl export_definitions``
(https://www.rabbitmq.com/docs/definitions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

EXCHANGE_PREFIX = "dicombridge.to."
QUEUE_PREFIX = "dicombridge."
DEAD_LETTER_EXCHANGE = "dicombridge.dead"
DEAD_QUEUE_SUFFIX = "dead"

SITE_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
# "to" would make dicombridge.to.<plane> both a queue of site "to" and the exchange of
# a site named like a plane, and permission regexes do not tell the two kinds apart.
RESERVED_SITE_IDS = frozenset({"to", DEAD_QUEUE_SUFFIX})

GIB = 1024**3
MIB = 1024**2

ArgumentValue = str | int | bool


class Plane(StrEnum):
    """A message plane: each has its own queue per site."""

    BULK = "bulk"
    CONTROL = "control"


def check_site_id(site: str) -> str:
    """Return ``site`` if it is a valid site id (a lowercase slug), else raise ValueError."""
    if not SITE_ID_PATTERN.fullmatch(site) or site in RESERVED_SITE_IDS:
        raise ValueError(
            f"invalid site id {site!r}: use a lowercase slug of 1-32 letters, digits and "
            f"inner hyphens (like 'hosp-a'), not one of {sorted(RESERVED_SITE_IDS)}"
        )
    return site


def exchange_name(site: str) -> str:
    """The topic exchange that carries messages *to* ``site``."""
    return f"{EXCHANGE_PREFIX}{check_site_id(site)}"


def queue_name(site: str, plane: Plane | str) -> str:
    """The queue of ``site`` for ``plane`` (``bulk`` or ``control``)."""
    return f"{QUEUE_PREFIX}{check_site_id(site)}.{Plane(plane).value}"


def dead_queue_name(site: str) -> str:
    """The queue that holds ``site``'s dead letters."""
    return f"{QUEUE_PREFIX}{check_site_id(site)}.{DEAD_QUEUE_SUFFIX}"


def routing_key(plane: Plane | str, sender_site: str) -> str:
    """The routing key of a message on ``plane`` sent by ``sender_site``."""
    return f"{Plane(plane).value}.{check_site_id(sender_site)}"


def binding_key(plane: Plane | str) -> str:
    """The key binding a site's ``plane`` queue to its exchange: any sender."""
    return f"{Plane(plane).value}.*"


def _escaped_alternation(names: Sequence[str]) -> str:
    return "|".join(re.escape(name) for name in names)


def exchange_write_pattern(sites: Sequence[str]) -> str:
    """Anchored regex matching exactly the exchanges of ``sites``."""
    return rf"^{re.escape(EXCHANGE_PREFIX)}(?:{_escaped_alternation(sites)})$"


def own_queues_pattern(site: str) -> str:
    """Anchored regex matching exactly the three queues of ``site``."""
    suffixes = _escaped_alternation([Plane.BULK, Plane.CONTROL, DEAD_QUEUE_SUFFIX])
    return rf"^{re.escape(QUEUE_PREFIX + check_site_id(site))}\.(?:{suffixes})$"


def sender_routing_key_pattern(site: str) -> str:
    """Anchored regex matching the routing keys ``site`` may publish with."""
    planes = _escaped_alternation([Plane.BULK, Plane.CONTROL])
    return rf"^(?:{planes})\.{re.escape(check_site_id(site))}$"


NOTHING = "^$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlaneLimits(_Frozen):
    """Bounds of one site queue."""

    max_length_bytes: int = Field(gt=0)
    delivery_limit: int = Field(default=20, gt=0)


class DeadQueueLimits(_Frozen):
    """Bounds of a site's dead-letter queue.

    Its delivery limit is high but explicit: RabbitMQ 4 would otherwise apply 20 and,
    with no dead-letter exchange behind this queue, drop what passes it.
    """

    max_length_bytes: int = Field(default=2 * GIB, gt=0)
    delivery_limit: int = Field(default=1000, gt=0)


class Limits(_Frozen):
    """Queue bounds for every site of a federation."""

    bulk: PlaneLimits = PlaneLimits(max_length_bytes=2 * GIB)
    control: PlaneLimits = PlaneLimits(max_length_bytes=64 * MIB)
    dead: DeadQueueLimits = DeadQueueLimits()

    def for_plane(self, plane: Plane | str) -> PlaneLimits:
        """The limits of ``plane``'s queues."""
        return self.bulk if Plane(plane) is Plane.BULK else self.control


class SiteAccount(_Frozen):
    """A site and its broker credentials."""

    site_id: str
    broker_user: str = Field(min_length=1, max_length=255)
    password: SecretStr

    @model_validator(mode="after")
    def _check(self) -> SiteAccount:
        check_site_id(self.site_id)
        if not self.password.get_secret_value():
            raise ValueError(f"site {self.site_id}: empty broker password")
        return self


class User(_Frozen):
    """A broker user; no tags, so no management access and no impersonation."""

    name: str
    password: SecretStr
    tags: tuple[str, ...] = ()


class Permission(_Frozen):
    """Configure/write/read regexes of one user in one vhost."""

    user: str
    vhost: str
    configure: str
    write: str
    read: str


class TopicPermission(_Frozen):
    """Routing-key regexes of one user on one topic exchange."""

    user: str
    vhost: str
    exchange: str
    write: str
    read: str


class Exchange(_Frozen):
    """A durable exchange."""

    name: str
    vhost: str
    type: Literal["topic", "direct", "fanout", "headers"]
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: Mapping[str, ArgumentValue] = Field(default_factory=dict)


class Queue(_Frozen):
    """A durable queue with its declaration arguments."""

    name: str
    vhost: str
    durable: bool = True
    auto_delete: bool = False
    arguments: Mapping[str, ArgumentValue] = Field(default_factory=dict)


class Binding(_Frozen):
    """A binding from an exchange to a queue."""

    source: str
    vhost: str
    destination: str
    destination_type: Literal["queue", "exchange"] = "queue"
    routing_key: str
    arguments: Mapping[str, ArgumentValue] = Field(default_factory=dict)


class Definitions(_Frozen):
    """The broker state of one federation in one vhost."""

    vhost: str
    users: tuple[User, ...]
    permissions: tuple[Permission, ...]
    topic_permissions: tuple[TopicPermission, ...]
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]

    def to_export_dict(self, *, include_passwords: bool = False) -> dict[str, Any]:
        """This state as a definitions document (``rabbitmqctl export_definitions``).

        Without ``include_passwords`` users carry no password at all, so the output is
        safe to print; importing it then fails for lack of credentials rather than
        setting a known one.
        """
        users: list[dict[str, Any]] = []
        for user in self.users:
            entry: dict[str, Any] = {"name": user.name, "tags": list(user.tags), "limits": {}}
            if include_passwords:
                entry["password"] = user.password.get_secret_value()
            users.append(entry)
        return {
            "users": users,
            "vhosts": [{"name": self.vhost}],
            "permissions": [p.model_dump() for p in self.permissions],
            "topic_permissions": [p.model_dump() for p in self.topic_permissions],
            "parameters": [],
            "global_parameters": [],
            "policies": [],
            "queues": [{**q.model_dump(), "arguments": dict(q.arguments)} for q in self.queues],
            "exchanges": [
                {**e.model_dump(), "arguments": dict(e.arguments)} for e in self.exchanges
            ],
            "bindings": [{**b.model_dump(), "arguments": dict(b.arguments)} for b in self.bindings],
        }

    def render(self, *, include_passwords: bool = False) -> str:
        """``to_export_dict`` as indented JSON (for ``--dry-run`` and files)."""
        return json.dumps(self.to_export_dict(include_passwords=include_passwords), indent=2)


def site_queue_arguments(site: str, limits: PlaneLimits) -> dict[str, ArgumentValue]:
    """Declaration arguments of a site's bulk or control queue."""
    return {
        "x-queue-type": "quorum",
        "x-max-length-bytes": limits.max_length_bytes,
        "x-overflow": "reject-publish",
        "x-delivery-limit": limits.delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": check_site_id(site),
        "x-dead-letter-strategy": "at-least-once",
    }


def dead_queue_arguments(limits: DeadQueueLimits) -> dict[str, ArgumentValue]:
    """Declaration arguments of a site's dead-letter queue (no further dead-lettering)."""
    return {
        "x-queue-type": "quorum",
        "x-max-length-bytes": limits.max_length_bytes,
        "x-overflow": "reject-publish",
        "x-delivery-limit": limits.delivery_limit,
    }


def build_definitions(
    *, vhost: str, accounts: Sequence[SiteAccount], limits: Limits | None = None
) -> Definitions:
    """The broker state for ``accounts`` in ``vhost``; ``limits`` default to ``Limits()``."""
    limits = limits or Limits()
    if not vhost:
        raise ValueError("empty vhost name")
    if not accounts:
        raise ValueError("no sites to provision")
    sites = [account.site_id for account in accounts]
    for kind, values in (("site id", sites), ("broker user", [a.broker_user for a in accounts])):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"duplicate {kind}: {', '.join(duplicates)}")

    exchanges: list[Exchange] = [Exchange(name=DEAD_LETTER_EXCHANGE, vhost=vhost, type="direct")]
    queues: list[Queue] = []
    bindings: list[Binding] = []
    for site in sites:
        exchanges.append(Exchange(name=exchange_name(site), vhost=vhost, type="topic"))
        for plane in Plane:
            queues.append(
                Queue(
                    name=queue_name(site, plane),
                    vhost=vhost,
                    arguments=site_queue_arguments(site, limits.for_plane(plane)),
                )
            )
            bindings.append(
                Binding(
                    source=exchange_name(site),
                    vhost=vhost,
                    destination=queue_name(site, plane),
                    routing_key=binding_key(plane),
                )
            )
        queues.append(
            Queue(
                name=dead_queue_name(site), vhost=vhost, arguments=dead_queue_arguments(limits.dead)
            )
        )
        bindings.append(
            Binding(
                source=DEAD_LETTER_EXCHANGE,
                vhost=vhost,
                destination=dead_queue_name(site),
                routing_key=site,
            )
        )

    users: list[User] = []
    permissions: list[Permission] = []
    topic_permissions: list[TopicPermission] = []
    write_exchanges = exchange_write_pattern(sites)
    for account in accounts:
        users.append(User(name=account.broker_user, password=account.password))
        permissions.append(
            Permission(
                user=account.broker_user,
                vhost=vhost,
                configure=NOTHING,
                write=write_exchanges,
                read=own_queues_pattern(account.site_id),
            )
        )
        topic_permissions.extend(
            TopicPermission(
                user=account.broker_user,
                vhost=vhost,
                exchange=exchange_name(destination),
                write=sender_routing_key_pattern(account.site_id),
                read=NOTHING,
            )
            for destination in sites
        )
    return Definitions(
        vhost=vhost,
        users=tuple(users),
        permissions=tuple(permissions),
        topic_permissions=tuple(topic_permissions),
        exchanges=tuple(exchanges),
        queues=tuple(queues),
        bindings=tuple(bindings),
    )
