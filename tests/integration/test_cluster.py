"""A 3-node RabbitMQ cluster: sites on different nodes, quorum replicas, nodes killed.

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
from dicombridge.transport import Delivery, Transport
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


@pytest.mark.parametrize("leader_node", [True, False], ids=["leader-node", "follower-node"])
async def test_consumer_and_publisher_of_a_killed_node_lose_nothing(
    cluster: BrokerCluster, federation: Federation, leader_node: bool
) -> None:
    """hosp-a publishing and hosp-b consuming, both given all three URLs and both connected
    to one node (the one that leads hosp-b's bulk queue, or another): kill -9 that node
    while messages flow. The consumer is restored on another node and every message
    confirmed to hosp-a reaches hosp-b (duplicates allowed: at-least-once)."""
    site_a, site_b = federation.site("hosp-a"), federation.site("hosp-b")
    with cluster.management() as client:
        queue = client.get_queue(federation.vhost, queue_name("hosp-b", "bulk"))
    assert queue is not None
    leader = next(i for i, node in enumerate(cluster.nodes) if node.node == queue["leader"])
    doomed = leader if leader_node else (leader + 1) % 3
    order = [doomed, (doomed + 1) % 3, (doomed + 2) % 3]
    killed_node = cluster.nodes[doomed].node
    survivors = {node.node for node in cluster.nodes} - {killed_node}
    total, body = 400, os.urandom(2048)
    consumed: list[str] = []
    confirmed: list[str] = []
    lost_confirms = 0

    async def record(delivery: Delivery) -> None:
        assert delivery.message_id is not None
        consumed.append(delivery.message_id)

    async def publish_all(message_ids: Iterator[str]) -> None:
        nonlocal lost_confirms
        for message_id in message_ids:
            for attempt in range(200):
                try:
                    await link_a.publish("bulk", "hosp-b", body, message_id=message_id)
                except (BrokerUnreachableError, PublishRefusedError):
                    lost_confirms += 1
                    # The publisher's own backoff before it publishes again, as the gateway's.
                    await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))
                else:
                    confirmed.append(message_id)
                    break

    async def consumed_enough() -> bool:
        return len(consumed) >= total // 4

    async def consuming_again() -> bool:
        counters = link_b.counters("bulk")
        return counters.sessions >= 2 and counters.consuming

    async def all_confirmed_consumed() -> bool:
        return set(confirmed) <= set(consumed)

    async with (
        transport(site_b, site_urls(cluster, site_b, federation.vhost, *order)) as link_b,
        transport(site_a, site_urls(cluster, site_a, federation.vhost, *order)) as link_a,
    ):
        consumer = asyncio.create_task(link_b.consume("bulk", record))
        await wait_connected_to(cluster, "dicombridge hosp-b bulk", {killed_node})
        await wait_connected_to(cluster, "dicombridge hosp-a bulk", {killed_node})
        message_ids = iter([f"m{i:04d}" for i in range(total)])
        publishers = [asyncio.create_task(publish_all(message_ids)) for _ in range(4)]
        await wait_until(consumed_enough, timeout_s=60, what="messages flowing")
        await asyncio.to_thread(cluster.kill_node, doomed)
        killed = time.monotonic()
        await wait_until(consuming_again, timeout_s=90, what="the consumer restored")
        restored_s = time.monotonic() - killed
        await asyncio.wait_for(asyncio.gather(*publishers), timeout=120)
        await wait_until(all_confirmed_consumed, timeout_s=120, what="every confirmed message")
        await wait_connected_to(cluster, "dicombridge hosp-b bulk", survivors)
        counters = link_b.counters("bulk")
        consumer.cancel()
    logger.info(
        "killed %s (%s): consumer restored in %.1fs; %d confirms lost and republished; "
        "%d deliveries for %d messages; %s",
        killed_node,
        "queue leader" if leader_node else "a follower",
        restored_s,
        lost_confirms,
        len(consumed),
        total,
        counters,
    )
    assert sorted(confirmed) == [f"m{i:04d}" for i in range(total)]
    assert set(confirmed) <= set(consumed)
    assert counters.dead_lettered_total == 0
