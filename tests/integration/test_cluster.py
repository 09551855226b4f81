"""A 3-node RabbitMQ cluster: sites on different nodes, quorum replicas, a node killed.

The cluster starts once for this module (it dominates the module's time); every test
provisions its own vhost, and starts from three running nodes (a node killed by an
earlier test is restarted first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from dicombridge.errors import BrokerUnreachableError, PublishRefusedError, SandboxError
from dicombridge.identity import LocalSite
from dicombridge.rabbitmq import BrokerCluster
from dicombridge.sandbox import Federation, create_federation
from dicombridge.spool import Receiver, ReceiverIdentity
from dicombridge.topology import queue_name
from dicombridge.transport import Transport
from tests.brokerkit import Inbox, seal_for, wait_until

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

SITES = ["hosp-a", "hosp-b"]


def _processes_under(workdir: Path) -> list[str]:
    """Command lines of live processes that mention ``workdir`` (the nodes' HOME is there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmdline:
            found.append(f"{entry.name} {cmdline[:200]}")
    return found


@pytest.fixture(scope="module")
def started_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerCluster]:
    """Three clustered nodes (broker/start-cluster), stopped at the end with nothing left."""
    workdir = tmp_path_factory.mktemp("cluster")
    started = time.monotonic()
    try:
        cluster = BrokerCluster.start(workdir, nodes=3, memory_mib=512, timeout_s=90)
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)
    logger.info("cluster of 3 up in %.1fs", time.monotonic() - started)
    yield cluster
    stopping = time.monotonic()
    BrokerCluster.from_workdir(workdir).stop()
    logger.info("cluster stopped in %.1fs", time.monotonic() - stopping)
    assert _processes_under(workdir) == []


@pytest.fixture
def cluster(started_cluster: BrokerCluster) -> BrokerCluster:
    """The module's cluster with all three nodes running (restarting any a test killed)."""
    current = BrokerCluster.from_workdir(started_cluster.workdir)
    for index, node in enumerate(current.nodes):
        if node not in current.running_nodes():
            current = current.restart_node(index)
    running = current.cluster_status()["running_nodes"]
    assert sorted(running) == sorted(node.node for node in current.nodes)
    return current


@pytest.fixture
def federation(cluster: BrokerCluster, tmp_path: Path) -> Iterator[Federation]:
    """hosp-a and hosp-b provisioned on the cluster (through node 1) in a fresh vhost."""
    vhost = f"cluster-{uuid.uuid4().hex[:8]}"
    fed = create_federation(tmp_path / "fed", broker=cluster.nodes[0], site_ids=SITES, vhost=vhost)
    yield fed
    with cluster.management() as client:
        for site_id in SITES:
            client.delete_user(site_id)


def site_urls(cluster: BrokerCluster, site: LocalSite, vhost: str, *nodes: int) -> list[str]:
    """The site's AMQP URLs for the given node indexes, in that order."""
    urls = cluster.amqp_urls(
        user=site.config.broker.user, password=site.config.broker_password(), vhost=vhost
    )
    return [urls[i] for i in nodes]


def transport(site: LocalSite, urls: list[str]) -> Transport:
    return Transport(
        amqp_url=urls,
        site_id=site.site_id,
        broker_user=site.config.broker.user,
        directory=site.directory,
        max_in_flight_bytes=4 * 1024 * 1024,
        max_in_flight_messages=8,
        connect_timeout_s=5.0,
    )


@asynccontextmanager
async def receiving(site: LocalSite, urls: list[str]) -> AsyncIterator[Inbox]:
    """``site`` consuming its bulk queue through ``urls`` into its spool."""
    inbox = Inbox()
    receiver = Receiver(
        site.config.storage.root,
        ReceiverIdentity(site.site_id, site.keys, site.directory),
        inbox.on_transfer,
    )
    async with transport(site, urls) as link:
        task = asyncio.create_task(link.consume("bulk", receiver.handle))
        try:
            yield inbox
        finally:
            task.cancel()


def random_file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


async def publish_until_confirmed(link: Transport, sender: LocalSite, source: Path) -> None:
    """Publish a sealed transfer, re-sending the whole of it while the cluster fails over."""
    sealed = await asyncio.to_thread(seal_for, sender, "hosp-b", source, 64 * 1024)

    async def confirmed() -> bool:
        try:
            await link.publish_transfer(sealed)
        except (BrokerUnreachableError, PublishRefusedError):
            return False
        return True

    await wait_until(confirmed, timeout_s=120, interval_s=0.5, what="a confirmed publish")


def received_bytes(inbox: Inbox) -> dict[int, bytes]:
    return {manifest.total_length: path.read_bytes() for manifest, path in inbox.received}


def connection_nodes(cluster: BrokerCluster, connection_name: str) -> set[str]:
    """The nodes that hold client connections named ``connection_name`` (management API)."""
    node = cluster.running_nodes()[0]
    response = httpx.get(
        f"{node.management_url}/api/connections",
        auth=(node.admin_user, node.admin_password.get_secret_value()),
        timeout=10,
    )
    response.raise_for_status()
    return {
        c["node"]
        for c in response.json()
        if c.get("client_properties", {}).get("connection_name") == connection_name
    }


async def wait_connected_to(
    cluster: BrokerCluster, connection_name: str, nodes: set[str], timeout_s: float = 90
) -> None:
    async def there() -> bool:
        found = await asyncio.to_thread(connection_nodes, cluster, connection_name)
        return bool(found) and found <= nodes

    await wait_until(
        there, timeout_s=timeout_s, interval_s=0.5, what=f"{connection_name} on {nodes}"
    )


def test_three_nodes_run_as_one_cluster(cluster: BrokerCluster) -> None:
    """cluster_status on any node lists the three distinctly named nodes as running."""
    status = cluster.cluster_status()
    names = {node.node for node in cluster.nodes}
    assert len(names) == 3
    assert set(status["running_nodes"]) == names
    assert set(status["disk_nodes"]) == names
    assert len({port for node in cluster.nodes for port in (node.amqp_port, node.mgmt_port)}) == 6


def test_provisioned_quorum_queues_have_a_replica_on_every_node(
    cluster: BrokerCluster, federation: Federation
) -> None:
    """Queues declared by provisioning get 3 quorum members, one per node (3.10 default)."""
    names = sorted(node.node for node in cluster.nodes)
    with cluster.management() as client:
        for site_id in SITES:
            for plane in ("bulk", "control"):
                queue = client.get_queue(federation.vhost, queue_name(site_id, plane))
                assert queue is not None
                assert queue["type"] == "quorum"
                assert sorted(queue["members"]) == names


async def test_transfer_crosses_nodes_byte_identical(
    cluster: BrokerCluster, federation: Federation, tmp_path: Path
) -> None:
    """Sealed at hosp-a connected to node 1, opened at hosp-b on node 2, bytes identical."""
    site_a, site_b = federation.site("hosp-a"), federation.site("hosp-b")
    source = random_file(tmp_path, "one.bin", 300_000)
    async with (
        receiving(site_b, site_urls(cluster, site_b, federation.vhost, 1)) as inbox,
        transport(site_a, site_urls(cluster, site_a, federation.vhost, 0)) as link,
    ):
        await link.publish_transfer(seal_for(site_a, "hosp-b", source, 64 * 1024))
        await inbox.wait_for(1)
        await wait_connected_to(cluster, "dicombridge hosp-a bulk", {cluster.nodes[0].node})
        await wait_connected_to(cluster, "dicombridge hosp-b bulk", {cluster.nodes[1].node})
    assert received_bytes(inbox) == {300_000: source.read_bytes()}


async def test_killed_third_node_loses_nothing(
    cluster: BrokerCluster, federation: Federation, tmp_path: Path
) -> None:
    """kill -9 of the node holding neither site: queued and later transfers all arrive."""
    site_a, site_b = federation.site("hosp-a"), federation.site("hosp-b")
    before = random_file(tmp_path, "before.bin", 200_000)
    after = random_file(tmp_path, "after.bin", 250_000)
    async with transport(site_a, site_urls(cluster, site_a, federation.vhost, 0)) as link:
        await link.publish_transfer(seal_for(site_a, "hosp-b", before, 64 * 1024))
        cluster.kill_node(2)
        await publish_until_confirmed(link, site_a, after)
    async with receiving(site_b, site_urls(cluster, site_b, federation.vhost, 1)) as inbox:
        await inbox.wait_for(2, timeout_s=120)
    assert received_bytes(inbox) == {
        200_000: before.read_bytes(),
        250_000: after.read_bytes(),
    }
