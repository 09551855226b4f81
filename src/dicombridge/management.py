"""Apply ``topology.Definitions`` through RabbitMQ's management HTTP API, idempotently.

Endpoints: https://www.rabbitmq.com/docs/http-api-reference. Exchanges and queues are
compared before they are declared: RabbitMQ cannot change a queue's arguments in place
(a declaration with different arguments fails with "inequivalent arg"), so a difference
is reported with the fix instead. Bindings are created only when missing, users and
permissions are (re)set. Provisioning only adds and updates; it never deletes.

Note: a vhost created through this API grants the creating user full permissions in it.

Request bodies carry passwords: they are never logged nor put into error messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from dicombridge.errors import ProvisionError
from dicombridge.topology import (
    Binding,
    Definitions,
    Exchange,
    Permission,
    Queue,
    TopicPermission,
    User,
)

logger = logging.getLogger(__name__)


def _q(name: str) -> str:
    """Percent-encode one path segment ("/" too: the default vhost is ``%2F``)."""
    return quote(name, safe="")


def _describe(value: object) -> str:
    return "absent" if value is None else repr(value)


class ManagementClient:
    """A synchronous client for the management API of one RabbitMQ node or cluster."""

    def __init__(
        self,
        base_url: str,
        *,
        user: str,
        password: SecretStr | str,
        timeout_s: float = 10.0,
    ) -> None:
        secret = password if isinstance(password, SecretStr) else SecretStr(password)
        self.base_url = base_url.rstrip("/")
        self.user = user
        self._client = httpx.Client(
            base_url=f"{self.base_url}/api",
            auth=(user, secret.get_secret_value()),
            timeout=timeout_s,
            headers={"content-type": "application/json"},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool; the client cannot be used afterwards."""
        self._client.close()

    # -- HTTP, with third-party errors translated in one place -------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        missing_ok: bool = False,
    ) -> httpx.Response | None:
        where = f"{method} {self.base_url}/api{path}"
        try:
            response = self._client.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise ProvisionError(
                f"{where}: cannot reach the management API ({type(exc).__name__}). "
                "Check that the node runs with the management plugin enabled and that "
                "the URL and port are right (broker/start-node prints them)."
            ) from exc
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code == 401:
            raise ProvisionError(
                f"{where}: the management API refused the credentials of user "
                f"{self.user!r}. Check the administrator user and password."
            )
        if response.status_code == 403:
            raise ProvisionError(
                f"{where}: user {self.user!r} may not do this. Provision with a user "
                "tagged 'administrator'."
            )
        if response.is_error:
            raise ProvisionError(
                f"{where}: the management API answered {response.status_code}: "
                f"{_reason(response)}. Fix what it names and provision again."
            )
        return response

    def _get(self, path: str) -> Any:
        response = self._request("GET", path, missing_ok=True)
        return None if response is None else response.json()

    def _put(self, path: str, body: Mapping[str, Any]) -> None:
        self._request("PUT", path, json=dict(body))

    # -- Reading -------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """``GET /api/overview``: versions, listeners, totals."""
        result: dict[str, Any] = self._get("/overview")
        return result

    def get_queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """The queue as the API describes it, or None if it does not exist."""
        result: dict[str, Any] | None = self._get(f"/queues/{_q(vhost)}/{_q(name)}")
        return result

    def get_exchange(self, vhost: str, name: str) -> dict[str, Any] | None:
        """The exchange as the API describes it, or None if it does not exist."""
        result: dict[str, Any] | None = self._get(f"/exchanges/{_q(vhost)}/{_q(name)}")
        return result

    def list_queues(self, vhost: str) -> list[dict[str, Any]]:
        """Every queue in ``vhost`` (message counts lag by the statistics interval)."""
        result: list[dict[str, Any]] | None = self._get(f"/queues/{_q(vhost)}")
        if result is None:
            raise ProvisionError(f"vhost {vhost!r} does not exist. Provision it first.")
        return result

    def list_bindings(self, vhost: str, *, source: str, queue: str) -> list[dict[str, Any]]:
        """The bindings from exchange ``source`` to ``queue``."""
        path = f"/bindings/{_q(vhost)}/e/{_q(source)}/q/{_q(queue)}"
        result: list[dict[str, Any]] | None = self._get(path)
        return result or []

    def vhost_exists(self, vhost: str) -> bool:
        """Whether ``vhost`` exists."""
        return self._get(f"/vhosts/{_q(vhost)}") is not None

    def export_definitions(self) -> dict[str, Any]:
        """``GET /api/definitions``: the whole broker state (users carry password hashes)."""
        result: dict[str, Any] = self._get("/definitions")
        return result

    # -- Writing ---------------------------------------------------------------------------

    def apply(self, definitions: Definitions) -> None:
        """Make the broker hold ``definitions``; safe to run again.

        Topic permissions are set before permissions: a user holding write permission on
        an exchange without topic permissions there could publish any routing key.
        """
        own = [user.name for user in definitions.users if user.name == self.user]
        if own:
            raise ProvisionError(
                f"site broker user {own[0]!r} is the administrator provisioning the "
                "broker; give the site its own broker user."
            )
        self.ensure_vhost(definitions.vhost)
        for user in definitions.users:
            self.put_user(user)
        for topic_permission in definitions.topic_permissions:
            self.set_topic_permission(topic_permission)
        for permission in definitions.permissions:
            self.set_permission(permission)
        for exchange in definitions.exchanges:
            self.ensure_exchange(exchange)
        for queue in definitions.queues:
            self.ensure_queue(queue)
        for binding in definitions.bindings:
            self.ensure_binding(binding)
        logger.info(
            "provisioned vhost %s: %d users, %d exchanges, %d queues, %d bindings",
            definitions.vhost,
            len(definitions.users),
            len(definitions.exchanges),
            len(definitions.queues),
            len(definitions.bindings),
        )

    def ensure_vhost(self, vhost: str) -> None:
        """Create ``vhost`` if missing."""
        if not self.vhost_exists(vhost):
            self._put(f"/vhosts/{_q(vhost)}", {"description": "dicombridge federation"})
            logger.info("created vhost %s", vhost)

    def put_user(self, user: User) -> None:
        """Create or update ``user`` with its password and tags."""
        body = {"password": user.password.get_secret_value(), "tags": ",".join(user.tags)}
        self._put(f"/users/{_q(user.name)}", body)
        logger.debug("set user %s", user.name)

    def set_permission(self, permission: Permission) -> None:
        """Set one user's configure/write/read regexes in one vhost."""
        body = permission.model_dump(include={"configure", "write", "read"})
        self._put(f"/permissions/{_q(permission.vhost)}/{_q(permission.user)}", body)
        logger.debug("set permissions of %s in %s", permission.user, permission.vhost)

    def set_topic_permission(self, permission: TopicPermission) -> None:
        """Set one user's routing-key regexes on one topic exchange."""
        body = permission.model_dump(include={"exchange", "write", "read"})
        self._put(f"/topic-permissions/{_q(permission.vhost)}/{_q(permission.user)}", body)
        logger.debug(
            "set topic permissions of %s on %s in %s",
            permission.user,
            permission.exchange,
            permission.vhost,
        )

    def ensure_exchange(self, exchange: Exchange) -> None:
        """Declare ``exchange``, or check that the existing one is the same."""
        current = self.get_exchange(exchange.vhost, exchange.name)
        wanted: dict[str, Any] = {
            "type": exchange.type,
            "durable": exchange.durable,
            "auto_delete": exchange.auto_delete,
            "internal": exchange.internal,
            "arguments": dict(exchange.arguments),
        }
        if current is None:
            self._put(f"/exchanges/{_q(exchange.vhost)}/{_q(exchange.name)}", wanted)
            logger.info("declared exchange %s in %s", exchange.name, exchange.vhost)
            return
        difference = _first_difference(wanted, current)
        if difference is not None:
            key, want, have = difference
            raise ProvisionError(
                f"exchange {exchange.name!r} in vhost {exchange.vhost!r} exists with "
                f"{key} {_describe(have)}, wanted {_describe(want)}. RabbitMQ cannot change "
                "it in place: delete the exchange (rabbitmqctl delete_exchange or DELETE "
                "/api/exchanges/...) and provision again."
            )

    def ensure_queue(self, queue: Queue) -> None:
        """Declare ``queue``, or check that the existing one has the same arguments."""
        current = self.get_queue(queue.vhost, queue.name)
        wanted: dict[str, Any] = {
            "durable": queue.durable,
            "auto_delete": queue.auto_delete,
            "arguments": dict(queue.arguments),
        }
        if current is None:
            self._put(f"/queues/{_q(queue.vhost)}/{_q(queue.name)}", wanted)
            logger.info("declared queue %s in %s", queue.name, queue.vhost)
            return
        difference = _first_difference(wanted, current)
        if difference is not None:
            key, want, have = difference
            raise ProvisionError(
                f"queue {queue.name!r} in vhost {queue.vhost!r} exists with {key} "
                f"{_describe(have)}, wanted {_describe(want)}. RabbitMQ cannot change a "
                "queue's arguments in place: drain the queue, delete it (rabbitmqctl "
                "delete_queue or DELETE /api/queues/...) and provision again, or go back "
                "to the limits it was provisioned with."
            )

    def ensure_binding(self, binding: Binding) -> None:
        """Bind unless an identical binding exists (a POST would add a duplicate)."""
        if binding.destination_type != "queue":
            raise ProvisionError(
                f"binding {binding.source!r} -> {binding.destination!r}: only queue "
                "bindings are provisioned."
            )
        existing = self.list_bindings(
            binding.vhost, source=binding.source, queue=binding.destination
        )
        arguments = dict(binding.arguments)
        for current in existing:
            if (
                current.get("routing_key") == binding.routing_key
                and (current.get("arguments") or {}) == arguments
            ):
                return
        path = f"/bindings/{_q(binding.vhost)}/e/{_q(binding.source)}/q/{_q(binding.destination)}"
        self._request(
            "POST", path, json={"routing_key": binding.routing_key, "arguments": arguments}
        )
        logger.info(
            "bound %s to %s with %s in %s",
            binding.destination,
            binding.source,
            binding.routing_key,
            binding.vhost,
        )

    def delete_vhost(self, vhost: str, *, missing_ok: bool = True) -> None:
        """Delete ``vhost`` with everything in it (closes its connections)."""
        response = self._request("DELETE", f"/vhosts/{_q(vhost)}", missing_ok=missing_ok)
        if response is not None:
            logger.info("deleted vhost %s", vhost)

    def delete_user(self, user: str, *, missing_ok: bool = True) -> None:
        """Delete ``user`` (closes its connections)."""
        response = self._request("DELETE", f"/users/{_q(user)}", missing_ok=missing_ok)
        if response is not None:
            logger.info("deleted user %s", user)


def _first_difference(
    wanted: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[str, object, object] | None:
    """The first (key, wanted, current) that differs; ``arguments`` compared per argument."""
    for key, want in wanted.items():
        have = current.get(key)
        if key == "arguments":
            have_arguments: Mapping[str, Any] = have or {}
            for name in sorted(set(want) | set(have_arguments)):
                if want.get(name) != have_arguments.get(name):
                    return f"argument {name}", want.get(name), have_arguments.get(name)
        elif have != want:
            return key, want, have
    return None


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "no reason given"
    if isinstance(body, dict):
        return str(body.get("reason") or body.get("error") or body)
    return str(body)
