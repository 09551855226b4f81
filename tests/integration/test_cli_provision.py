"""`dicombridge broker provision` against the real node, as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from dicombridge.config import load as load_config
from dicombridge.identity import export_json, export_public, init_site
from dicombridge.keys import SiteKeys
from dicombridge.management import ManagementClient
from dicombridge.operator import OperatorWorkspace
from dicombridge.rabbitmq import BrokerNode

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-c", "from dicombridge.cli import main; main()"]
SITES = ("hosp-a", "hosp-b")


@pytest.fixture
def operator(tmp_path: Path, management: ManagementClient) -> Iterator[OperatorWorkspace]:
    """An operator workspace with two signed sites; their broker users deleted afterwards."""
    workspace = OperatorWorkspace.init(tmp_path / "op", federation="f")
    for site in SITES:
        config = init_site(tmp_path / site, site_id=site, broker_url=f"amqp://{site}@127.0.0.1/f")
        cfg = load_config(config)
        export = tmp_path / f"{site}.json"
        export.write_text(export_json(export_public(cfg, SiteKeys.load(cfg.keys.dir))))
        workspace.add_site(export)
    workspace.sign()
    yield workspace
    for site in SITES:
        management.delete_user(site)


def provision(node: BrokerNode, workspace: OperatorWorkspace, vhost: str) -> str:
    env = {
        **os.environ,
        "DICOMBRIDGE_BROKER_ADMIN_PASSWORD": node.admin_password.get_secret_value(),
    }
    result = subprocess.run(
        [
            *CLI,
            "broker",
            "provision",
            "--dir",
            str(workspace.root),
            "--vhost",
            vhost,
            "--management-url",
            node.management_url,
            "--admin-user",
            node.admin_user,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_provision_twice_and_sites_connect_with_their_passwords(
    rabbitmq_node: BrokerNode, management: ManagementClient, operator: OperatorWorkspace, vhost: str
) -> None:
    """Provisioning is idempotent and each site's user logs in with the password it was given."""
    first = provision(rabbitmq_node, operator, vhost)
    assert "6 queues" in first
    assert provision(rabbitmq_node, operator, vhost) == first
    names = {q["name"] for q in management.list_queues(vhost)}
    assert names == {f"dicombridge.{s}.{p}" for s in SITES for p in ("bulk", "control", "dead")}
    for site in SITES:
        url = rabbitmq_node.amqp_url(
            user=site, password=operator.broker_password(site), vhost=vhost
        )
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(f"dicombridge.{site}.bulk", ensure=True)
            assert queue.name == f"dicombridge.{site}.bulk"


def test_provision_without_admin_password_says_how_to_give_it(
    rabbitmq_node: BrokerNode, operator: OperatorWorkspace
) -> None:
    """Without an admin password the command names the option and the variable to set."""
    env = {k: v for k, v in os.environ.items() if k != "DICOMBRIDGE_BROKER_ADMIN_PASSWORD"}
    result = subprocess.run(
        [
            *CLI,
            "broker",
            "provision",
            "--dir",
            str(operator.root),
            "--management-url",
            rabbitmq_node.management_url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--admin-password-file" in result.stderr
    assert "DICOMBRIDGE_BROKER_ADMIN_PASSWORD" in result.stderr
