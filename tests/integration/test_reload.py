"""The routing table edited while a gateway runs: applied within seconds, without a
restart, without failing an association, without losing an instance; an edit that does
not load is refused and the table in force stays (issue 7)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicombridge import config as site_config
from dicombridge import routing_table
from dicombridge.config import LocalNode
from dicombridge.gateway import Gateway
from dicombridge.management import ManagementClient
from dicombridge.orthanc import OrthancServer
from dicombridge.rabbitmq import BrokerNode
from tests.brokerkit import wait_until
from tests.pacskit import DCMTK_BIN, dcmtk_env, sop_instance_uid
from tests.relaykit import (
    Route,
    TwoSites,
    ct_series,
    delete_users,
    make_two_sites,
    running_gateways,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def sites(
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    orthanc_b: OrthancServer,
) -> Iterator[TwoSites]:
    """Sites A and B; A's route OLD_B leads to B's PACS, Orthanc B."""
    made = make_two_sites(
        tmp_path / "fed",
        broker=rabbitmq_node,
        vhost=vhost,
        routes=[Route("OLD_B", "PACS")],
        nodes_b=[
            LocalNode(name="PACS", ae_title="PACS_B", host="127.0.0.1", port=orthanc_b.dicom_port)
        ],
    )
    yield made
    delete_users(management, made)


async def storescu(port: int, called: str, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu of ``paths`` on one association to ``called`` (not asserted)."""
    return await asyncio.to_thread(
        subprocess.run,
        [str(DCMTK_BIN / "storescu"), "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=300,
        env=dcmtk_env(),
        check=False,
    )


def _served(gateway: Gateway) -> list[str]:
    return [route.ae_title for route in gateway.site.config.routes]


async def test_route_edits_while_a_study_flows(
    tmp_path: Path, sites: TwoSites, orthanc_b: OrthancServer
) -> None:
    """A route added while a series flows on another route is served within seconds
    (its association accepted, its instances stored at B), and the flowing association
    finishes with success; an edit that breaks the file is refused (counted, logged) and
    both routes stay served; a route removed is rejected at association ("called AE
    title not recognized"). Every instance sent with success is in Orthanc B."""
    flowing = ct_series(tmp_path / "flowing", 150, rows=256, columns=256)
    added = ct_series(tmp_path / "added", 10, rows=64, columns=64)
    after_refusal = ct_series(tmp_path / "after", 5, rows=64, columns=64)
    config_a = sites.config_a
    config_a.write_text(config_a.read_text().replace("reload_check_s = 2", "reload_check_s = 0.2"))
    assert site_config.load(config_a).gateway.reload_check_s == 0.2
    async with running_gateways(sites.config_a, sites.config_b) as (gateway_a, gateway_b):
        sending = asyncio.create_task(storescu(sites.port_a, "OLD_B", flowing))
        await asyncio.to_thread(
            routing_table.add_route, config_a, ae_title="NEW_B", sites=[sites.site_b]
        )

        async def reloaded(count: int) -> bool:
            return gateway_a.table_reloads >= count

        await wait_until(lambda: reloaded(1), timeout_s=30, what="the added route served")
        assert not sending.done(), "the series ended before the edit applied: make it longer"
        assert _served(gateway_a) == ["OLD_B", "NEW_B"]
        result = await storescu(sites.port_a, "NEW_B", added)
        assert result.returncode == 0, result.stdout + result.stderr
        result = await sending
        assert result.returncode == 0, result.stdout + result.stderr

        valid = config_a.read_text()
        config_a.write_text(valid + '\n[[routes]]\nae_title = "NEW_B"\nsite = "elsewhere"\n')

        async def refused() -> bool:
            return gateway_a.table_reloads_refused >= 1

        await wait_until(refused, timeout_s=30, what="the broken edit refused")
        assert _served(gateway_a) == ["OLD_B", "NEW_B"]
        result = await storescu(sites.port_a, "NEW_B", after_refusal)
        assert result.returncode == 0, result.stdout + result.stderr

        config_a.write_text(valid)
        await asyncio.to_thread(routing_table.remove_route, config_a, "OLD_B")
        await wait_until(lambda: _gone(gateway_a), timeout_s=30, what="the removed route")
        rejected = await storescu(sites.port_a, "OLD_B", after_refusal[:1])
        assert rejected.returncode != 0
        assert "Called AE Title Not Recognized" in rejected.stdout + rejected.stderr
        assert gateway_a.table_reloads_refused == 1

        sent = {sop_instance_uid(p) for p in [*flowing, *added, *after_refusal]}

        async def all_stored() -> bool:
            return gateway_b.deliverer.stored >= len(sent)

        await wait_until(all_stored, timeout_s=120, interval_s=0.2, what="every instance at B")
    with orthanc_b.client() as client:
        assert set(client.iter_sop_instance_uids()) == sent


async def _gone(gateway: Gateway) -> bool:
    return _served(gateway) == ["NEW_B"]
