"""Names, permissions and rendered definitions of the broker topology (no broker)."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import SecretStr, ValidationError

from dicombridge.topology import (
    DEAD_LETTER_EXCHANGE,
    Definitions,
    Limits,
    Plane,
    PlaneLimits,
    SiteAccount,
    binding_key,
    build_definitions,
    check_site_id,
    dead_queue_name,
    exchange_name,
    exchange_write_pattern,
    own_queues_pattern,
    queue_name,
    routing_key,
    sender_routing_key_pattern,
)

SITES = ("hosp-a", "hosp-b", "hosp-c")


def _account(site: str) -> SiteAccount:
    return SiteAccount(
        site_id=site, broker_user=f"user-{site}", password=SecretStr(f"secret-of-{site}")
    )


def _definitions(sites: tuple[str, ...] = SITES, limits: Limits | None = None) -> Definitions:
    return build_definitions(
        vhost="fed", accounts=[_account(site) for site in sites], limits=limits
    )


def _matches(pattern: str, name: str) -> bool:
    # RabbitMQ runs re:run/3 (PCRE) unanchored; Python's re.search behaves the same for
    # these patterns.
    return re.search(pattern, name) is not None


def test_names() -> None:
    """Exchanges, queues, routing and binding keys follow the wire format of design.md."""
    assert exchange_name("hosp-a") == "dicombridge.to.hosp-a"
    assert queue_name("hosp-a", Plane.BULK) == "dicombridge.hosp-a.bulk"
    assert queue_name("hosp-a", "control") == "dicombridge.hosp-a.control"
    assert dead_queue_name("hosp-a") == "dicombridge.hosp-a.dead"
    assert routing_key(Plane.CONTROL, "hosp-b") == "control.hosp-b"
    assert routing_key("bulk", "hosp-b") == "bulk.hosp-b"
    assert binding_key(Plane.BULK) == "bulk.*"


@pytest.mark.parametrize(
    "site", ["", "Hosp-A", "hosp_a", "hosp.a", "-a", "a-", "a*", "hosp a", "to", "dead", "x" * 64]
)
def test_invalid_site_ids_are_refused(site: str) -> None:
    """Anything but a lowercase slug (and the reserved 'to' and 'dead') is refused."""
    with pytest.raises(ValueError, match="invalid site id"):
        check_site_id(site)
    with pytest.raises(ValidationError):
        _account(site)


def test_unknown_plane_is_refused() -> None:
    """Only the bulk and control planes exist."""
    with pytest.raises(ValueError, match="video"):
        queue_name("hosp-a", "video")


def test_write_pattern_covers_exactly_the_provisioned_exchanges() -> None:
    """The write regex matches the sites' exchanges and nothing else, '.' and '-' escaped."""
    pattern = exchange_write_pattern(["hosp-a", "hosp-b"])
    assert r"hosp\-a" in pattern
    for name in ("dicombridge.to.hosp-a", "dicombridge.to.hosp-b"):
        assert _matches(pattern, name)
    for name in (
        "dicombridge.to.hosp-c",
        "dicombridge.to.hosp-ab",
        "xdicombridge.to.hosp-a",
        "dicombridgeXtoXhosp-a",
        "dicombridge.to.hosp-a.x",
        "dicombridge.dead",
        "dicombridge.hosp-a.bulk",
        "amq.topic",
        "amq.default",
    ):
        assert not _matches(pattern, name), name


def test_read_pattern_covers_exactly_the_sites_own_queues() -> None:
    """The read regex matches the site's three queues only."""
    pattern = own_queues_pattern("hosp-a")
    for name in (
        "dicombridge.hosp-a.bulk",
        "dicombridge.hosp-a.control",
        "dicombridge.hosp-a.dead",
    ):
        assert _matches(pattern, name)
    for name in (
        "dicombridge.hosp-b.bulk",
        "dicombridge.hosp-ab.bulk",
        "dicombridgeXhosp-aXbulk",
        "dicombridge.hosp-a.bulkx",
        "dicombridge.to.hosp-a",
        "dicombridge.dead",
    ):
        assert not _matches(pattern, name), name


def test_topic_write_pattern_admits_only_the_sender_itself() -> None:
    """A site may publish '<plane>.<itself>' and no other routing key."""
    pattern = sender_routing_key_pattern("hosp-b")
    assert _matches(pattern, "bulk.hosp-b")
    assert _matches(pattern, "control.hosp-b")
    for key in ("bulk.hosp-a", "bulk.hosp-bb", "bulk.hosp-b.x", "bulkXhosp-b", "dead.hosp-b", ""):
        assert not _matches(pattern, key), key


def test_definitions_content() -> None:
    """Each site gets a topic exchange, three quorum queues, bindings, a user and permissions."""
    definitions = _definitions()
    exchanges = {e.name: e for e in definitions.exchanges}
    assert exchanges[DEAD_LETTER_EXCHANGE].type == "direct"
    queues = {q.name: q for q in definitions.queues}
    bindings = {(b.source, b.destination, b.routing_key) for b in definitions.bindings}
    for site in SITES:
        assert exchanges[exchange_name(site)].type == "topic"
        assert exchanges[exchange_name(site)].durable
        for plane in Plane:
            queue = queues[queue_name(site, plane)]
            assert queue.durable
            assert dict(queue.arguments) == {
                "x-queue-type": "quorum",
                "x-max-length-bytes": Limits().for_plane(plane).max_length_bytes,
                "x-overflow": "reject-publish",
                "x-delivery-limit": 20,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": site,
                "x-dead-letter-strategy": "at-least-once",
            }
            assert (exchange_name(site), queue_name(site, plane), f"{plane}.*") in bindings
        dead = queues[dead_queue_name(site)]
        assert dead.arguments["x-queue-type"] == "quorum"
        assert dead.arguments["x-overflow"] == "reject-publish"
        assert "x-dead-letter-exchange" not in dead.arguments
        assert (DEAD_LETTER_EXCHANGE, dead_queue_name(site), site) in bindings
    assert len(definitions.queues) == 3 * len(SITES)
    assert len(definitions.bindings) == 3 * len(SITES)
    assert all(user.tags == () for user in definitions.users)


def test_permissions_content() -> None:
    """Users configure nothing, write to site exchanges, read their queues, and carry topic
    permissions on every site's exchange, their own included."""
    definitions = _definitions()
    for permission in definitions.permissions:
        site = permission.user.removeprefix("user-")
        assert permission.configure == "^$"
        assert permission.write == exchange_write_pattern(list(SITES))
        assert permission.read == own_queues_pattern(site)
    topic = {(t.user, t.exchange): t for t in definitions.topic_permissions}
    assert len(topic) == len(SITES) ** 2
    for sender in SITES:
        for destination in SITES:
            entry = topic[(f"user-{sender}", exchange_name(destination))]
            assert entry.write == sender_routing_key_pattern(sender)
            assert entry.read == "^$"


def test_limits_are_explicit_and_strict() -> None:
    """Limits default to 2 GiB bulk, 64 MiB control, delivery limit 20; unknown keys fail."""
    limits = Limits()
    assert limits.bulk.max_length_bytes == 2 * 1024**3
    assert limits.control.max_length_bytes == 64 * 1024**2
    assert limits.bulk.delivery_limit == limits.control.delivery_limit == 20
    with pytest.raises(ValidationError):
        PlaneLimits(max_length_bytes=0)
    with pytest.raises(ValidationError):
        Limits.model_validate({"bulk": {"max_length_bytes": 1, "max_length": 5}})
    with pytest.raises(ValidationError):
        limits.bulk.max_length_bytes = 5  # type: ignore[misc]
    small = _definitions(limits=Limits(control=PlaneLimits(max_length_bytes=10, delivery_limit=3)))
    control = next(q for q in small.queues if q.name == queue_name("hosp-a", Plane.CONTROL))
    assert control.arguments["x-max-length-bytes"] == 10
    assert control.arguments["x-delivery-limit"] == 3


def test_duplicates_are_refused() -> None:
    """Two accounts for one site, or one broker user for two sites, are refused."""
    with pytest.raises(ValueError, match="duplicate site id: hosp-a"):
        build_definitions(vhost="fed", accounts=[_account("hosp-a"), _account("hosp-a")])
    shared = SiteAccount(site_id="hosp-b", broker_user="user-hosp-a", password=SecretStr("x"))
    with pytest.raises(ValueError, match="duplicate broker user: user-hosp-a"):
        build_definitions(vhost="fed", accounts=[_account("hosp-a"), shared])


def test_dry_run_rendering_has_no_passwords() -> None:
    """The default rendering omits every password; only an explicit request includes them."""
    definitions = _definitions()
    rendered = definitions.render()
    for site in SITES:
        assert f"secret-of-{site}" not in rendered
    document = json.loads(rendered)
    assert all("password" not in user for user in document["users"])
    assert "secret-of-hosp-a" not in repr(definitions)
    revealed = json.loads(definitions.render(include_passwords=True))
    assert {user["password"] for user in revealed["users"]} == {f"secret-of-{s}" for s in SITES}


def test_rendering_has_the_export_definitions_shape() -> None:
    """The rendering has the top-level keys and entry fields of rabbitmqctl export_definitions."""
    document = _definitions().to_export_dict()
    assert set(document) == {
        "users",
        "vhosts",
        "permissions",
        "topic_permissions",
        "parameters",
        "global_parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    }
    assert document["vhosts"] == [{"name": "fed"}]
    assert set(document["queues"][0]) == {"name", "vhost", "durable", "auto_delete", "arguments"}
    assert set(document["exchanges"][0]) == {
        "name",
        "vhost",
        "type",
        "durable",
        "auto_delete",
        "internal",
        "arguments",
    }
    assert set(document["bindings"][0]) == {
        "source",
        "vhost",
        "destination",
        "destination_type",
        "routing_key",
        "arguments",
    }
