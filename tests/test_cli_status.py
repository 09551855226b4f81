"""`dicombridge status` as a subprocess: against a running gateway (its broker out of
reach: the status says so), and against none (one line naming the URL, the storage read
from disk, exit 1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dicombridge import config as site_config
from dicombridge.cli.status import status_url
from dicombridge.gateway import Gateway
from dicombridge.identity import LocalSite, init_site
from dicombridge.orthanc import free_port
from tests.brokerkit import wait_until
from tests.cryptokit import Federation, make_federation

CLI = [sys.executable, "-m", "dicombridge", "status"]


def status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Piped, the tables are 160 columns wide unless COLUMNS says otherwise.
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
    )


@pytest.fixture(scope="module")
def fed() -> Federation:
    return make_federation()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """hosp-a's gateway.toml: DICOM and [monitoring] on free ports, the broker on a port
    where nothing listens, one transfer in quarantine (2000 bytes)."""
    path = init_site(
        tmp_path / "a", site_id="hosp-a", broker_url=f"amqp://hosp-a@127.0.0.1:{free_port()}/v"
    )
    text = path.read_text().replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {free_port()}", 1)
    path.write_text(text + f"\n[monitoring]\nport = {free_port()}\n")
    (path.parent / "secrets" / "broker-password").write_text("unused\n")
    held = path.parent / "var" / "quarantine" / "hosp-b" / ("0b" * 16)
    held.mkdir(parents=True)
    (held / "instance.dcm").write_bytes(b"\0" * 2000)
    return path


@contextlib.asynccontextmanager
async def running(config: Path, fed: Federation) -> AsyncIterator[Gateway]:
    """hosp-a's gateway running on this loop until the block ends."""
    gateway = Gateway(LocalSite(site_config.load(config), fed.keys["hosp-a"], fed.directory))
    task = asyncio.create_task(gateway.run())
    try:

        async def serving() -> bool:
            assert not task.done(), task
            return gateway.monitor.port is not None

        await wait_until(serving, timeout_s=30, what="monitoring served")
        yield gateway
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_status_of_a_running_gateway(config: Path, fed: Federation) -> None:
    """Against a running gateway it exits 0 and shows the site, the broker disconnected,
    the other sites never heard from, and the storage areas; --json prints the document."""
    async with running(config, fed):
        text = await asyncio.to_thread(status, config)
        as_json = await asyncio.to_thread(status, config, "--json")
    assert text.returncode == 0, text.stderr
    assert "site hosp-a: NOT READY" in text.stdout
    assert "broker: DISCONNECTED" in text.stdout
    for shown in ("hosp-b", "hosp-c", "never", "outbox", "spool", "incoming", "quarantine"):
        assert shown in text.stdout
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["site"] == "hosp-a"
    assert document["ready"] is False
    assert document["broker"]["connected"] is False
    assert {s["site"] for s in document["remote_sites"]} == {"hosp-b", "hosp-c"}
    areas = {a["area"]: a for a in document["storage"]}
    assert (areas["quarantine"]["count"], areas["quarantine"]["size_bytes"]) == (1, 2000)
    assert document["recent_transfers"] == []


def test_status_without_a_gateway_names_the_url_and_reads_the_disk(config: Path) -> None:
    """With no gateway it exits 1 with one line naming the URL and what to check, and
    still shows the storage areas from disk (as text, or with --json as a document)."""
    url = f"http://127.0.0.1:{site_config.load(config).monitoring.port}/status"
    text = status(config)
    assert text.returncode == 1
    lines = text.stderr.strip().splitlines()
    assert len(lines) == 1
    assert url in lines[0]
    assert "is it running" in lines[0]
    assert "[monitoring] enabled" in lines[0]
    assert "quarantine" in text.stdout
    assert "2.0 KiB" in text.stdout
    as_json = status(config, "--json")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["gateway"]["url"] == url
    assert document["gateway"]["answered"] is False
    areas = {a["area"]: a for a in document["storage"]}
    assert areas["quarantine"]["count"] == 1
    assert areas["outbox"]["count"] == 0


def test_status_with_monitoring_off_says_so(config: Path) -> None:
    """With [monitoring] enabled = false nothing is asked; the line says it is off."""
    config.write_text(
        config.read_text().replace("\n[monitoring]\n", "\n[monitoring]\nenabled = false\n")
    )
    assert not site_config.load(config).monitoring.enabled
    result = status(config)
    assert result.returncode == 1
    assert "[monitoring] enabled = false" in result.stderr
    assert "quarantine" in result.stdout


def test_status_url_reaches_a_wildcard_host_on_loopback(config: Path) -> None:
    """A [monitoring] host listening everywhere is asked on loopback; others as written."""
    cfg = site_config.load(config)
    port = cfg.monitoring.port
    wildcards = (("0.0.0.0", "127.0.0.1"), ("::", "[::1]"))  # noqa: S104 - not bound
    for host, url_host in (*wildcards, ("10.1.2.3", "10.1.2.3")):
        moved = cfg.model_copy(
            update={"monitoring": cfg.monitoring.model_copy(update={"host": host})}
        )
        assert status_url(moved) == f"http://{url_host}:{port}/status"
