"""Metrics, readiness and `dicombridge status` of gateways relaying through the real
RabbitMQ node to Orthanc (issue 7): the counters equal what was relayed, and /readyz
follows the broker connection, cut and restored through a TCP proxy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicombridge import config as site_config
from dicombridge.gateway import Gateway
from dicombridge.management import ManagementClient
from dicombridge.orthanc import OrthancServer
from dicombridge.rabbitmq import BrokerNode
from tests.brokerkit import wait_until
from tests.faults.proxy import TcpProxy
from tests.pacskit import DCMTK_BIN, dcmtk_env
from tests.relaykit import (
    TwoSites,
    ct_series,
    delete_users,
    outbox_empty,
    route_to_pacs,
    running_gateways,
)

pytestmark = pytest.mark.integration

ROUTE = "SITE_B"
INSTANCES = 6


def monitor_on_free_port(config: Path) -> None:
    """Check local nodes every second ([monitoring] is on a port of its own already:
    relaykit gives every site one)."""
    text = config.read_text()
    assert "\n[monitoring]\n" in text
    config.write_text(text.replace("\n[monitoring]\n", "\n[monitoring]\nnode_check_s = 1\n", 1))
    assert site_config.load(config).monitoring.node_check_s == 1


@pytest.fixture
def sites(
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    orthanc_b: OrthancServer,
) -> Iterator[TwoSites]:
    """Sites A and B; A's route SITE_B leads to Orthanc B; both monitored."""
    made = route_to_pacs(
        tmp_path / "fed", broker=rabbitmq_node, vhost=vhost, pacs_port=orthanc_b.dicom_port
    )
    monitor_on_free_port(made.config_a)
    monitor_on_free_port(made.config_b)
    yield made
    delete_users(management, made)


def scrape(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics of a running gateway, parsed by prometheus_client's parser."""
    assert gateway.monitor.port is not None
    response = httpx.get(
        f"http://127.0.0.1:{gateway.monitor.port}/metrics", timeout=10, trust_env=False
    )
    response.raise_for_status()
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def metric(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def readyz(gateway: Gateway) -> tuple[int, dict[str, object]]:
    assert gateway.monitor.port is not None
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{gateway.monitor.port}/readyz")
    return response.status_code, response.json()


async def storescu(port: int, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(DCMTK_BIN / "storescu"), "-aet", "MODALITY", "-aec", ROUTE, "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=300,
        env=dcmtk_env(),
        check=False,
    )


async def status_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`dicombridge status` as a subprocess (the gateway runs on this test's loop)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dicombridge", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
        check=False,
    )


async def test_counters_equal_what_was_relayed(
    tmp_path: Path, sites: TwoSites, orthanc_b: OrthancServer
) -> None:
    """After INSTANCES are relayed A -> B -> Orthanc and their stored receipts are back,
    A counts them sent on route SITE_B with their bytes, stored receipts and latency
    observations; B counts them received into its PACS with the same bytes; fragments
    published by A are those received by B; both show them in `dicombridge status`."""
    paths = ct_series(tmp_path / "series", INSTANCES, rows=64, columns=64)
    async with running_gateways(sites.config_a, sites.config_b) as (gateway_a, gateway_b):
        result = await storescu(sites.port_a, paths)
        assert result.returncode == 0, result.stdout + result.stderr

        stored = {"from_site": sites.site_b, "outcome": "stored"}

        async def relayed() -> bool:
            # The outbox entry goes (in a thread) before the receipt is counted: wait on both.
            if gateway_b.deliverer.stored < INSTANCES or not outbox_empty(gateway_a):
                return False
            scraped = await asyncio.to_thread(scrape, gateway_a)
            return metric(scraped, "dicombridge_receipts_total", **stored) >= INSTANCES

        await wait_until(relayed, timeout_s=120, interval_s=0.1, what="stored receipts at A")
        a, b = (
            await asyncio.to_thread(scrape, gateway_a),
            await asyncio.to_thread(scrape, gateway_b),
        )
        text = await status_cli(sites.config_a)
        as_json = await status_cli(sites.config_a, "--json")

    sent = {"route": ROUTE, "to_site": sites.site_b}
    received = {"from_site": sites.site_a, "node": "PACS"}
    assert metric(a, "dicombridge_sent_instances_total", **sent) == INSTANCES
    assert metric(b, "dicombridge_received_instances_total", **received) == INSTANCES
    sent_bytes = metric(a, "dicombridge_sent_bytes_total", **sent)
    assert sent_bytes > INSTANCES * 64 * 64 * 2
    assert metric(b, "dicombridge_received_bytes_total", **received) == sent_bytes
    assert metric(a, "dicombridge_receipts_total", **stored) == INSTANCES
    latency = {"to_site": sites.site_b}
    assert metric(a, "dicombridge_store_latency_seconds_count", **latency) == INSTANCES
    slowest = {**latency, "le": "+Inf"}
    assert metric(a, "dicombridge_store_latency_seconds_bucket", **slowest) == INSTANCES
    assert metric(a, "dicombridge_store_latency_seconds_sum", **latency) > 0
    published = metric(a, "dicombridge_fragments_published_total", to_site=sites.site_b)
    assert published >= INSTANCES
    assert metric(b, "dicombridge_fragments_received_total") == published
    assert metric(b, "dicombridge_delivery_retries_total") == 0
    assert metric(a, "dicombridge_resends_total") == 0
    assert metric(a, "dicombridge_broker_connected") == 1
    assert metric(b, "dicombridge_local_node_up", node="PACS") == 1
    assert metric(a, "dicombridge_storage_items", area="outbox") == 0
    contact = metric(a, "dicombridge_remote_site_last_contact_timestamp_seconds", site=sites.site_b)
    assert contact > 0
    # B heard from A only through transfers (A sent no control message): contact all the same.
    heard = metric(b, "dicombridge_remote_site_last_contact_timestamp_seconds", site=sites.site_a)
    assert heard > 0

    assert text.returncode == 0, text.stderr
    assert f"site {sites.site_a}: ready" in text.stdout
    assert "broker: connected" in text.stdout
    assert sites.site_b in text.stdout
    for area in ("outbox", "spool", "incoming", "quarantine"):
        assert area in text.stdout
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["site"] == sites.site_a
    assert document["broker"]["connected"] is True
    transfers = document["recent_transfers"]
    assert len(transfers) == INSTANCES
    assert {(t["direction"], t["site"], t["route"], t["outcome"]) for t in transfers} == {
        ("sent", sites.site_b, ROUTE, "stored")
    }
    contacts = {s["site"]: s["last_contact"] for s in document["remote_sites"]}
    assert contacts[sites.site_b] is not None
    with orthanc_b.client() as client:
        assert len(list(client.iter_sop_instance_uids())) == INSTANCES


async def test_readyz_follows_the_broker_connection(
    sites: TwoSites, rabbitmq_node: BrokerNode
) -> None:
    """With A's broker connection through a TCP proxy: /readyz is 200 while connected;
    the proxy cut makes it 503 with the broker check failing (the others still pass);
    once restored it is 200 again."""
    with TcpProxy(rabbitmq_node.amqp_port) as proxy:
        config = sites.config_a
        url = site_config.load(config).broker.url
        proxied = url.replace(f":{rabbitmq_node.amqp_port}/", f":{proxy.port}/", 1)
        config.write_text(config.read_text().replace(url, proxied, 1))
        assert site_config.load(config).broker.url == proxied != url
        async with running_gateways(config) as (gateway_a,):

            async def ready() -> bool:
                return gateway_a.monitor.port is not None and (await readyz(gateway_a))[0] == 200

            async def not_ready() -> bool:
                return (await readyz(gateway_a))[0] == 503

            await wait_until(ready, timeout_s=30, interval_s=0.2, what="/readyz 200")
            assert proxy.cut() >= 2  # the bulk and control connections
            await wait_until(not_ready, timeout_s=30, interval_s=0.2, what="/readyz 503")
            _, body = await readyz(gateway_a)
            checks = body["checks"]
            assert isinstance(checks, dict)
            assert checks["broker"]["ok"] is False
            assert checks["broker"]["state"] == "disconnected"
            assert checks["directory"]["ok"] is True
            assert checks["local_nodes"]["ok"] is True
            proxy.restore()
            await wait_until(ready, timeout_s=90, interval_s=0.2, what="/readyz 200 again")
            assert proxy.connections_made >= 4
