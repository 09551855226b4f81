"""Broker unreachable, or the recipient's queue full (``reject-publish``): the gateway
keeps accepting into its outbox, then answers 0xA700, and drains by itself once the
broker is reachable or the queue has room again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pydicom
import pytest

from dicombridge.gateway import Gateway
from dicombridge.identity import LocalSite
from dicombridge.management import ManagementClient
from dicombridge.orthanc import free_port, is_listening
from dicombridge.rabbitmq import BrokerNode
from dicombridge.topology import Limits, PlaneLimits
from tests.brokerkit import wait_until
from tests.pacskit import StoreSCPNode
from tests.relaykit import ct_series, delete_users, route_to_pacs, running_gateways

pytestmark = pytest.mark.integration
ROUTE = "SITE_B"


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCPNode]:
    """DCMTK's storescp as site B's PACS."""
    node = StoreSCPNode.start(tmp_path / "storescp", ae_title="PACS_B")
    yield node
    node.stop()


@contextlib.asynccontextmanager
async def tcp_forwarder(listen_port: int, target_port: int) -> AsyncIterator[None]:
    """Forward 127.0.0.1:listen_port to 127.0.0.1:target_port: the broker 'comes back'."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        yield


def store_statuses(port: int, files: list[Path]) -> list[str]:
    """Send ``files`` with DCMTK's storescu, one association each; the statuses it reports."""
    statuses = []
    for path in files:
        result = subprocess.run(
            [
                "/usr/bin/storescu",
                "-d",
                "-aet",
                "MODALITY",
                "-aec",
                ROUTE,
                "127.0.0.1",
                str(port),
                str(path),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        output = result.stdout + result.stderr
        # -v prints "(Success)"; -d prints the response, with the Error Comment, too.
        succeeded = "(Success)" in output or "0x0000: Success" in output
        statuses.append("success" if succeeded else output)
    return statuses


async def test_outbox_absorbs_then_refuses_then_drains_when_the_broker_returns(
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    storescp: StoreSCPNode,
    tmp_path: Path,
) -> None:
    """With the broker unreachable, 2 instances are accepted into the outbox, the third gets
    0xA700 with a comment; once the broker is reachable both arrive at B and the outbox
    empties, with no hand involved."""
    sites = route_to_pacs(
        tmp_path / "fed", broker=rabbitmq_node, vhost=vhost, pacs_port=storescp.port
    )
    dead_port = free_port()
    config_a = sites.config_a
    text = config_a.read_text()
    text = text.replace(f"127.0.0.1:{rabbitmq_node.amqp_port}/", f"127.0.0.1:{dead_port}/")
    config_a.write_text(text.replace("max_count = 100000", "max_count = 2"))
    files = ct_series(tmp_path / "series", 3, rows=64, columns=64)
    gateway_a = Gateway(LocalSite.load(config_a))
    task = asyncio.create_task(gateway_a.run())
    try:

        async def serving() -> bool:
            return gateway_a.scp_port is not None and is_listening(gateway_a.scp_port)

        await wait_until(serving, timeout_s=30, what="gateway A's SCP")
        statuses = await asyncio.to_thread(store_statuses, sites.port_a, files)
        assert statuses[:2] == ["success", "success"]
        assert "0xa700" in statuses[2].lower()
        assert "outbox full" in statuses[2]
        assert gateway_a.outbox.count == 2
        assert not gateway_a.ready.is_set()

        async with (
            tcp_forwarder(dead_port, rabbitmq_node.amqp_port),
            running_gateways(sites.config_b),
        ):

            async def drained() -> bool:
                return gateway_a.outbox.count == 0

            await wait_until(drained, timeout_s=90, interval_s=0.5, what="A's outbox to drain")
        for path in files[:2]:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert storescp.stored(uid) is not None
        third = str(pydicom.dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)
        assert storescp.stored(third) is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        delete_users(management, sites)


async def test_full_recipient_queue_keeps_instances_in_the_outbox_until_it_has_room(  # noqa: PLR0917 - fixtures
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    storescp: StoreSCPNode,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """B is offline and its bulk queue (capped at 1 MiB, reject-publish) fills: the broker
    nacks A's publishes, A keeps the instances in its outbox and accepts up to its cap,
    then answers 0xA700; once B consumes again every accepted instance arrives."""
    sites = route_to_pacs(
        tmp_path / "fed",
        broker=rabbitmq_node,
        vhost=vhost,
        pacs_port=storescp.port,
        limits=Limits(bulk=PlaneLimits(max_length_bytes=1024 * 1024)),
    )
    config_a = sites.config_a
    config_a.write_text(config_a.read_text().replace("max_count = 100000", "max_count = 4"))
    files = ct_series(tmp_path / "series", 5, rows=512, columns=512)  # ~0.5 MB each
    try:
        async with running_gateways(config_a) as (gateway_a,):
            statuses = await asyncio.to_thread(store_statuses, sites.port_a, files)
            assert statuses[:4] == ["success"] * 4
            assert "0xa700" in statuses[4].lower()
            assert "outbox full" in statuses[4]

            async def refused_by_the_full_queue() -> bool:
                return any(
                    record.getMessage() == "publish failed; retrying"
                    and getattr(record, "error", None) == "PublishRefusedError"
                    for record in caplog.records
                )

            await wait_until(refused_by_the_full_queue, timeout_s=30, what="a refused publish")
            assert any(not e.published for e in gateway_a.outbox.entries()), (
                "refused instances wait in the outbox"
            )
            async with running_gateways(sites.config_b):

                async def drained() -> bool:
                    return gateway_a.outbox.count == 0

                await wait_until(drained, timeout_s=120, interval_s=0.5, what="A's outbox")
        for path in files[:4]:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert storescp.stored(uid) is not None
    finally:
        delete_users(management, sites)
