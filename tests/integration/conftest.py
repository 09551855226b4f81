"""Per-test broker fixtures: a management client, a fresh vhost, provisioned sites."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from dicombridge.management import ManagementClient
from dicombridge.rabbitmq import BrokerNode
from tests.brokerkit import Provisioner


@pytest.fixture(scope="session")
def management(rabbitmq_node: BrokerNode) -> Iterator[ManagementClient]:
    """The node's management API as its administrator."""
    with rabbitmq_node.management() as client:
        yield client


@pytest.fixture
def vhost(request: pytest.FixtureRequest, management: ManagementClient) -> Iterator[str]:
    """A unique vhost name for this test; provisioning creates it, teardown deletes it."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    name = f"t-{slug}-{uuid.uuid4().hex[:8]}"
    yield name
    management.delete_vhost(name)


@pytest.fixture
def provision_sites(
    rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str
) -> Iterator[Provisioner]:
    """Call it to provision sites into ``vhost``: ``provision_sites(("hosp-a", "hosp-b"),
    limits=...)`` returns a ``Federation`` with each site's AMQP URL and the admin's.
    Users are global in RabbitMQ, so they are deleted at teardown."""
    provisioner = Provisioner(node=rabbitmq_node, management=management, vhost=vhost)
    yield provisioner
    provisioner.cleanup()
