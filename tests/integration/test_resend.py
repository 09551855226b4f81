"""Re-sends from the outbox: a transfer the recipient gave up on for a reason a retry may
fix (its PACS unreachable for ``give_up_after_s``: a failed 0xA700 receipt) is sent again,
and the recipient retries it then, without anyone's hand."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dicombridge.management import ManagementClient
from dicombridge.orthanc import free_port
from dicombridge.quarantine import Quarantine
from dicombridge.rabbitmq import BrokerNode
from tests.brokerkit import wait_until
from tests.pacskit import StoreSCPNode, dcmtk_storescu, sop_instance_uid
from tests.relaykit import ct_series, delete_users, route_to_pacs, running_gateways

pytestmark = pytest.mark.integration
ROUTE = "SITE_B"


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text, f"{old!r} not in {config}"
    config.write_text(text.replace(old, new, 1))


async def test_given_up_transfer_is_sent_again_and_stored_once_the_pacs_is_back(
    rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str, tmp_path: Path
) -> None:
    pacs_port = free_port()  # nothing listens there yet: B's PACS is down
    sites = route_to_pacs(tmp_path / "fed", broker=rabbitmq_node, vhost=vhost, pacs_port=pacs_port)
    # B gives up after about 1 s; A's re-send, which takes the transfer out of B's
    # quarantine to try again, must come well after that for the check below to see it.
    edit(sites.config_a, "resend_after_s = 900", "resend_after_s = 5")
    edit(sites.config_b, "retry_initial_s = 1\n", "retry_initial_s = 0.2\n")
    edit(sites.config_b, "give_up_after_s = 86400", "give_up_after_s = 1")
    (path,) = ct_series(tmp_path / "series", 1, rows=64, columns=64)
    uid = sop_instance_uid(path)
    quarantine_b = Quarantine(sites.storage_root(sites.site_b))
    storescp: StoreSCPNode | None = None
    try:
        async with running_gateways(sites.config_a, sites.config_b) as (gateway_a, _):
            result = await asyncio.to_thread(
                dcmtk_storescu, sites.port_a, ROUTE, path, calling_ae_title="MODALITY"
            )
            assert result.returncode == 0, result.stderr

            async def given_up() -> bool:
                entries = gateway_a.outbox.entries()
                return bool(entries) and entries[0].state.get("receipt", {}).get("status") == 0xA700

            await wait_until(given_up, timeout_s=60, what="B to give up and say so")
            assert [e.summary()["status"] for e in quarantine_b.entries()] == ["0xa700"]

            storescp = StoreSCPNode.start(tmp_path / "pacs", ae_title="PACS_B", port=pacs_port)

            async def stored() -> bool:
                return not gateway_a.outbox.entries()

            await wait_until(stored, timeout_s=60, what="the re-send to be stored")
            assert storescp.stored(uid) is not None
            assert quarantine_b.entries() == [], "retried from quarantine, not left there"
    finally:
        if storescp is not None:
            storescp.stop()
        delete_users(management, sites)
