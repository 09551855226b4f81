"""The gateway's metrics, its HTTP endpoints and the [monitoring] configuration, without a
broker: the counters and collector through Prometheus's own text parser, the server
through real sockets, readiness and status of a gateway that is built but not running."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from pynetdicom import AE, VerificationPresentationContexts

from dicombridge import config as site_config
from dicombridge import retention, routing_table
from dicombridge.config import MonitoringSection, RetentionSection
from dicombridge.control import Receipt
from dicombridge.errors import ConfigError
from dicombridge.gateway import Gateway
from dicombridge.health import MAX_REQUEST_BYTES, HttpServer, Response, echo_node
from dicombridge.identity import LocalSite, init_site
from dicombridge.metrics import (
    RECENT_TRANSFERS,
    Figures,
    GatewayMetrics,
    RecentTransfers,
    TransferRecord,
    measure_storage,
)
from dicombridge.orthanc import free_port
from dicombridge.outbox import Outbox
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity
from dicombridge.transport import Delivery
from tests.brokerkit import wait_until
from tests.cryptokit import Federation, make_federation, messages

# --- helpers ------------------------------------------------------------------------------


def samples(exposition: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(exposition: bytes, name: str, **labels: str) -> float | None:
    return samples(exposition).get((name, frozenset(labels.items())))


def sealed_transfer(
    fed: Federation, tmp_path: Path, *, size: int = 5000, to_site: str = "hosp-b"
) -> tuple[Outbox, str]:
    """A transfer admitted to a real outbox; the outbox and its transfer id."""
    source = tmp_path / f"src-{os.urandom(4).hex()}"
    source.write_bytes(os.urandom(size))
    outbox = Outbox(tmp_path / "outbox", max_bytes=10**9, max_count=100)
    sealed = outbox.admit(
        source,
        sender=fed.sender("hosp-a"),
        directory=fed.directory,
        site=to_site,
        fragment_size=2048,
        meta={},
    )
    return outbox, sealed.transfer_id_hex


def incoming(sender: str, size: int, node: str = "PACS") -> IncomingTransfer:
    return IncomingTransfer(sender, os.urandom(16), Path("unused.dcm"), size, {"node": node})


@pytest.fixture(scope="module")
def fed() -> Federation:
    return make_federation()


# --- event counters -----------------------------------------------------------------------


def test_sent_and_received_instances_and_bytes_are_counted_per_route_and_direction(
    tmp_path: Path, fed: Federation
) -> None:
    """Admissions count per (route, destination site), deliveries per (sender site,
    local node), each with the instance's bytes; publishes count fragments and bytes."""
    metrics = GatewayMetrics(tmp_path)
    outbox, tid = sealed_transfer(fed, tmp_path, size=5000)
    entry = outbox.get(tid)
    assert entry is not None
    metrics.admitted(entry.transfer, route="SITE_B")
    metrics.admitted(entry.transfer, route="SITE_B")
    metrics.published(entry.transfer, 6000)
    stored = Receipt(transfer_id=os.urandom(16), outcome="stored", status=0)
    metrics.delivered(incoming("hosp-c", 700, node="PACS"), stored)
    refused = Receipt(transfer_id=os.urandom(16), outcome="failed", status=0xA900)
    metrics.delivered(incoming("hosp-c", 800, node="PACS"), refused)
    text = metrics.exposition()
    sent = {"route": "SITE_B", "to_site": "hosp-b"}
    assert value(text, "dicombridge_sent_instances_total", **sent) == 2
    assert value(text, "dicombridge_sent_bytes_total", **sent) == 10000
    assert value(text, "dicombridge_fragments_published_total", to_site="hosp-b") == 3
    assert value(text, "dicombridge_published_bytes_total", to_site="hosp-b") == 6000
    received = {"from_site": "hosp-c", "node": "PACS"}
    assert value(text, "dicombridge_received_instances_total", **received) == 1
    assert value(text, "dicombridge_received_bytes_total", **received) == 700
    failures = {"from_site": "hosp-c", "status": "0xa900"}
    assert value(text, "dicombridge_delivery_failures_total", **failures) == 1


def test_stored_receipt_observes_latency_from_admission(tmp_path: Path, fed: Federation) -> None:
    """A stored receipt observes the time since admission in the site's histogram and
    counts as a stored receipt; a failed one counts by status and observes nothing."""
    metrics = GatewayMetrics(tmp_path)
    outbox, tid = sealed_transfer(fed, tmp_path)
    entry = outbox.get(tid)
    assert entry is not None
    metrics.admitted(entry.transfer, route="SITE_B")
    failed = Receipt(transfer_id=bytes.fromhex(tid), outcome="failed", status=0xA700)
    metrics.receipt("hosp-b", failed, created_at=None, known=True)
    stored = Receipt(transfer_id=bytes.fromhex(tid), outcome="stored", status=0)
    metrics.receipt("hosp-b", stored, created_at=None, known=True)
    text = metrics.exposition()
    assert value(text, "dicombridge_receipts_total", from_site="hosp-b", outcome="stored") == 1
    assert value(text, "dicombridge_receipts_total", from_site="hosp-b", outcome="failed") == 1
    status = {"from_site": "hosp-b", "status": "0xa700"}
    assert value(text, "dicombridge_receipt_failures_total", **status) == 1
    assert value(text, "dicombridge_store_latency_seconds_count", to_site="hosp-b") == 1
    latency = value(text, "dicombridge_store_latency_seconds_sum", to_site="hosp-b")
    assert latency is not None
    assert 0 <= latency < 5
    bucket = {"to_site": "hosp-b", "le": "5.0"}
    assert value(text, "dicombridge_store_latency_seconds_bucket", **bucket) == 1


def test_latency_after_a_restart_comes_from_the_outbox_entry(tmp_path: Path) -> None:
    """Without the admission in memory (a restart), the entry's created_at is used; a
    receipt for no outbox entry counts as unmatched and observes nothing."""
    metrics = GatewayMetrics(tmp_path)
    tid = os.urandom(16)
    created_at = (datetime.now(UTC) - timedelta(seconds=90)).isoformat()
    stored = Receipt(transfer_id=tid, outcome="stored", status=0)
    metrics.receipt("hosp-b", stored, created_at=created_at, known=True)
    metrics.receipt("hosp-b", stored, created_at=None, known=False)
    text = metrics.exposition()
    assert value(text, "dicombridge_store_latency_seconds_count", to_site="hosp-b") == 1
    latency = value(text, "dicombridge_store_latency_seconds_sum", to_site="hosp-b")
    assert latency is not None
    assert 90 <= latency < 100
    below = {"to_site": "hosp-b", "le": "60.0"}
    assert value(text, "dicombridge_store_latency_seconds_bucket", **below) == 0
    assert value(text, "dicombridge_receipts_unmatched_total", from_site="hosp-b") == 1
    assert value(text, "dicombridge_receipts_total", from_site="hosp-b", outcome="stored") == 1


def test_each_gateway_has_its_own_registry(tmp_path: Path, fed: Federation) -> None:
    """Two GatewayMetrics in one process count apart (no global registry, no clash)."""
    first, second = GatewayMetrics(tmp_path), GatewayMetrics(tmp_path)
    outbox, tid = sealed_transfer(fed, tmp_path)
    entry = outbox.get(tid)
    assert entry is not None
    first.admitted(entry.transfer, route="SITE_B")
    labels = {"route": "SITE_B", "to_site": "hosp-b"}
    assert value(first.exposition(), "dicombridge_sent_instances_total", **labels) == 1
    assert value(second.exposition(), "dicombridge_sent_instances_total", **labels) is None


# --- the collector ------------------------------------------------------------------------


def test_collector_reads_the_figures_at_scrape_time(tmp_path: Path) -> None:
    """Counters and gauges come from the figures function each time it is scraped."""
    figures = Figures(
        resends=3,
        delivery_retries=4,
        fragments_received=9,
        table_reloads=2,
        table_reloads_refused=1,
        broker_connected=True,
        directory_version=7,
        quarantined_at_spool=5,
        quarantined_at_delivery=6,
        dead_lettered={("bulk", "permanent_error"): 2},
        local_nodes_up={"PACS": True, "ARCHIVE": False},
    )
    current = [figures]
    metrics = GatewayMetrics(tmp_path, figures=lambda: current[0])
    text = metrics.exposition()
    assert value(text, "dicombridge_resends_total") == 3
    assert value(text, "dicombridge_delivery_retries_total") == 4
    assert value(text, "dicombridge_fragments_received_total") == 9
    assert value(text, "dicombridge_table_reloads_total") == 2
    assert value(text, "dicombridge_table_reloads_refused_total") == 1
    assert value(text, "dicombridge_broker_connected") == 1
    assert value(text, "dicombridge_directory_version") == 7
    assert value(text, "dicombridge_quarantined_total", stage="spool") == 5
    assert value(text, "dicombridge_quarantined_total", stage="delivery") == 6
    dead = {"plane": "bulk", "reason": "permanent_error"}
    assert value(text, "dicombridge_broker_dead_lettered_total", **dead) == 2
    assert value(text, "dicombridge_local_node_up", node="PACS") == 1
    assert value(text, "dicombridge_local_node_up", node="ARCHIVE") == 0
    current[0] = Figures(resends=4, broker_connected=False)
    text = metrics.exposition()
    assert value(text, "dicombridge_resends_total") == 4
    assert value(text, "dicombridge_broker_connected") == 0


def test_last_contact_is_a_timestamp_per_site(tmp_path: Path) -> None:
    """A control message from a site sets its last-contact gauge to now (Unix time)."""
    metrics = GatewayMetrics(tmp_path)
    before = time.time()
    metrics.contact("hosp-b")
    seen = value(
        metrics.exposition(),
        "dicombridge_remote_site_last_contact_timestamp_seconds",
        site="hosp-b",
    )
    assert seen is not None
    assert before - 1 <= seen <= time.time()


# --- the storage areas --------------------------------------------------------------------


@pytest.fixture
async def storage_root(tmp_path: Path, fed: Federation) -> Path:
    """One outbox entry, one incomplete spooled transfer, one transfer in incoming/ and
    one quarantined, made through the real code paths."""
    root = tmp_path / "var"

    def source(size: int) -> Path:
        path = tmp_path / f"src-{os.urandom(4).hex()}"
        path.write_bytes(os.urandom(size))
        return path

    Outbox(root / "outbox", max_bytes=10**9, max_count=100).admit(
        source(3000),
        sender=fed.sender("hosp-a"),
        directory=fed.directory,
        site="hosp-c",
        fragment_size=4096,
        meta={},
    )

    async def keep(incoming: IncomingTransfer) -> None:
        """The PACS is down: the transfer stays in incoming/."""

    receiver = Receiver(root, ReceiverIdentity("hosp-b", fed.keys["hosp-b"], fed.directory), keep)
    sent = tmp_path / "sent"
    received = messages(fed.seal(source(5000), sent, fragment_size=2000))
    incomplete = messages(fed.seal(source(5000), sent, fragment_size=2000))[:-1]
    tampered = messages(fed.seal(source(5000), sent, fragment_size=2000))
    tampered[-1] = tampered[-1][:-1] + bytes([tampered[-1][-1] ^ 1])
    for body in [*received, *incomplete, *tampered]:
        await receiver.handle(Delivery(body, "hosp-a", "bulk", None, False))
    assert receiver.quarantined == 1
    assert receiver.fragments_received == 3 + 2 + 3
    return root


def test_storage_figures_agree_with_retention(storage_root: Path) -> None:
    """Count, bytes and oldest age of each area are what `retention show` reports."""
    now = datetime.now(UTC)
    measured = {a.area: a for a in measure_storage(storage_root, now)}
    report = retention.survey(storage_root, RetentionSection(), now)
    assert set(measured) == {"outbox", "spool", "incoming", "quarantine"}
    for name, figures in measured.items():
        area = report.area(name)  # type: ignore[arg-type]
        assert figures.count == area.count == 1, name
        assert figures.size_bytes == area.size_bytes, name
        assert figures.oldest_age_s is not None
        assert area.oldest_age_s is not None
        assert abs(figures.oldest_age_s - area.oldest_age_s) < 2, name


async def test_storage_gauges_are_measured_in_a_thread_and_cached(storage_root: Path) -> None:
    """The first scrape after a measurement shows the areas; a new entry appears only
    once the cached measurement is older than max_age_s."""
    metrics = GatewayMetrics(storage_root)
    metrics.storage.max_age_s = 3600
    await metrics.storage.current()
    text = metrics.exposition()
    assert value(text, "dicombridge_storage_items", area="quarantine") == 1
    size = value(text, "dicombridge_storage_bytes", area="outbox")
    assert size is not None
    assert size > 3000
    extra = storage_root / "quarantine" / "hosp-a" / ("ab" * 16)
    extra.mkdir()
    (extra / "instance.dcm").write_bytes(b"x" * 10)
    await metrics.storage.current()
    assert value(metrics.exposition(), "dicombridge_storage_items", area="quarantine") == 1
    metrics.storage.max_age_s = 0
    await metrics.storage.current()
    assert value(metrics.exposition(), "dicombridge_storage_items", area="quarantine") == 2


def test_empty_storage_measures_zero(tmp_path: Path) -> None:
    """Missing area directories count as empty, with no oldest age."""
    for area in measure_storage(tmp_path / "nothing"):
        assert (area.count, area.size_bytes, area.oldest_age_s) == (0, 0, None)


# --- the last transfers -------------------------------------------------------------------


def test_recent_transfers_keep_the_last_twenty_newest_first() -> None:
    """Only the last RECENT_TRANSFERS are kept; an update changes a listed record, and a
    transfer not listed is added as given."""
    recent = RecentTransfers()
    now = datetime.now(UTC)
    for number in range(RECENT_TRANSFERS + 5):
        recent.add(TransferRecord(f"{number:032x}", "sent", "hosp-b", 10, "admitted", now))
    listed = recent.summary()
    assert len(listed) == RECENT_TRANSFERS
    assert listed[0]["transfer_id"] == f"{RECENT_TRANSFERS + 4:032x}"
    assert listed[-1]["transfer_id"] == f"{5:032x}"
    recent.update(f"{10:032x}", "sent", outcome="stored", status=0xB000)
    changed = next(r for r in recent.summary() if r["transfer_id"] == f"{10:032x}")
    assert (changed["outcome"], changed["status"]) == ("stored", "0xb000")
    late = TransferRecord("ff" * 16, "sent", "hosp-b", None, "stored", now)
    recent.update("ff" * 16, "sent", outcome="stored", otherwise=late)
    assert recent.summary()[0]["transfer_id"] == "ff" * 16
    assert len(recent.summary()) == RECENT_TRANSFERS


# --- the HTTP server ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(server: HttpServer) -> AsyncIterator[str]:
    await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def raw_request(port: int, data: bytes) -> bytes:
    """Send ``data`` as is and end our side; return all the server answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def echo_path(path: str) -> Response:
    if path == "/boom":
        raise RuntimeError("a bug")
    if path != "/here":
        return Response.json(404, {"error": "Not Found"})
    return Response(200, path.encode(), content_type="text/plain")


async def test_server_routes_get_and_answers_errors_as_http() -> None:
    """GET of a known path is answered (query string dropped), an unknown path 404, another
    method 405 naming GET, a handler's exception 500; every answer closes the connection."""
    server = HttpServer(echo_path)
    async with serving(server) as url, httpx.AsyncClient(base_url=url, trust_env=False) as client:
        found = await client.get("/here?x=1")
        assert (found.status_code, found.text) == (200, "/here")
        assert found.headers["connection"] == "close"
        assert (await client.get("/elsewhere")).status_code == 404
        posted = await client.post("/here", content=b"{}")
        assert posted.status_code == 405
        assert posted.headers["allow"] == "GET"
        assert (await client.get("/boom")).status_code == 500


async def test_server_refuses_oversized_and_malformed_requests() -> None:
    """A request head beyond MAX_REQUEST_BYTES is answered 431, a line that is not HTTP
    400, and a client that closes early gets nothing (and breaks nothing)."""
    server = HttpServer(echo_path)
    async with serving(server):
        huge = b"GET /here HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n"
        assert (await raw_request(server.port, huge)).startswith(b"HTTP/1.1 431 ")
        assert (await raw_request(server.port, b"HELLO\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert await raw_request(server.port, b"GET /here HT") == b""
        ok = await raw_request(server.port, b"GET /here HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")
        assert ok.endswith(b"\r\n\r\n/here")


async def test_server_answers_408_to_a_silent_client() -> None:
    """A client that sends no whole request head within the read timeout gets 408."""
    server = HttpServer(echo_path, read_timeout_s=0.2)
    async with serving(server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /here HTTP/1.1\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ")


# --- a gateway's endpoints, built but not running -----------------------------------------


@pytest.fixture
def echo_scp() -> Iterator[int]:
    """A Verification SCP (pynetdicom) on a free port."""
    ae = AE(ae_title="ECHO_SCP")
    ae.supported_contexts = VerificationPresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()


def gateway_for(tmp_path: Path, fed: Federation, *, nodes: dict[str, int]) -> Gateway:
    """hosp-a's gateway with ``nodes`` (name -> port on loopback), monitoring on a free port."""
    path = init_site(tmp_path / "a", site_id="hosp-a", broker_url="amqp://hosp-a@127.0.0.1:1/x")
    blocks = [
        f'\n[[local_nodes]]\nname = "{name}"\nae_title = "{name}"\nhost = "127.0.0.1"\n'
        f"port = {port}\n"
        for name, port in nodes.items()
    ]
    monitoring = f"\n[monitoring]\nport = {free_port()}\nnode_check_s = 0.2\n"
    path.write_text(path.read_text() + "".join(blocks) + monitoring)
    site = LocalSite(site_config.load(path), fed.keys["hosp-a"], fed.directory)
    return Gateway(site)


def test_node_check_tells_an_answering_node_from_a_closed_port(echo_scp: int) -> None:
    """C-ECHO to a Verification SCP is ok with status 0x0000; a closed port is not ok."""
    node = site_config.LocalNode(name="N", ae_title="ECHO_SCP", host="127.0.0.1", port=echo_scp)
    answered = echo_node(node, calling_ae_title="GATEWAY")
    assert (answered.ok, answered.status) == (True, 0)
    closed = node.model_copy(update={"port": free_port()})
    refused = echo_node(closed, calling_ae_title="GATEWAY")
    assert not refused.ok
    assert refused.error is not None


async def test_readyz_names_each_check_and_follows_the_node_checks(
    tmp_path: Path, fed: Federation, echo_scp: int
) -> None:
    """Without a broker /readyz is 503 with the broker check failing; the nodes check is
    false until a C-ECHO round, then true for an answering node, and false again when
    its last check is stale; the directory check fails once a newer version than the one
    in use was accepted on this site."""
    gateway = gateway_for(tmp_path, fed, nodes={"PACS": echo_scp})
    monitor = gateway.monitor
    ready, checks = await monitor.readiness()
    assert not ready
    assert (checks["broker"]["ok"], checks["broker"]["state"]) == (False, "disconnected")
    assert checks["local_nodes"]["nodes"] == [
        {"name": "PACS", "ok": False, "error": "not checked yet"}
    ]
    assert checks["directory"]["ok"]
    await monitor.check_nodes()
    _, checks = await monitor.readiness()
    assert checks["local_nodes"]["ok"]
    assert checks["local_nodes"]["nodes"][0]["status"] == "0x0000"
    answered = monitor.node_checks["PACS"]
    an_hour_ago = answered.checked_at - timedelta(hours=1)
    monitor.node_checks["PACS"] = dataclasses.replace(answered, checked_at=an_hour_ago)
    _, checks = await monitor.readiness()
    assert not checks["local_nodes"]["ok"]
    assert checks["local_nodes"]["nodes"][0]["error"].startswith("no check for over")
    monitor.node_checks["PACS"] = answered
    state = gateway.site.config.directory.state_path
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"version": fed.directory.version + 1, "digest": "x"}))
    _, checks = await monitor.readiness()
    assert not checks["directory"]["ok"]
    assert "restart the gateway" in checks["directory"]["error"]
    response = await monitor.respond("/readyz")
    assert response.status == 503
    assert set(json.loads(response.body)["checks"]) == {"broker", "local_nodes", "directory"}


async def test_only_the_ready_nodes_are_echoed_for_readyz(
    tmp_path: Path, fed: Federation, echo_scp: int
) -> None:
    """By default only the node named PACS (where inbound studies go) is C-ECHOed: a
    workstation that is only a C-MOVE destination, here a closed port, is never asked
    and does not make the gateway unready; [monitoring] ready_nodes names others, and a
    name that is no local node is refused when the file loads."""
    gateway = gateway_for(tmp_path, fed, nodes={"PACS": echo_scp, "WORKSTATION": free_port()})
    await gateway.monitor.check_nodes()
    assert set(gateway.monitor.node_checks) == {"PACS"}
    _, checks = await gateway.monitor.readiness()
    assert checks["local_nodes"]["ok"]
    config = gateway.site.config.source
    text = config.read_text()
    config.write_text(
        text.replace("\n[monitoring]\n", '\n[monitoring]\nready_nodes = ["WORKSTATION"]\n')
    )
    assert site_config.load(config).monitoring.ready_node_names([]) == ["WORKSTATION"]
    config.write_text(text.replace("\n[monitoring]\n", '\n[monitoring]\nready_nodes = ["CT"]\n'))
    with pytest.raises(ConfigError, match="ready_nodes names a node") as caught:
        site_config.load(config)
    assert caught.value.field == "monitoring.ready_nodes"


async def test_gateway_serves_its_endpoints_while_running_its_monitor(
    tmp_path: Path, fed: Federation, echo_scp: int
) -> None:
    """The monitor listens on [monitoring] port: /healthz 200, /metrics parses and holds
    the gateway's figures, /status names the site, the other sites and the areas, and
    /readyz is 503 with no broker; the local node is echoed by itself within seconds."""
    gateway = gateway_for(tmp_path, fed, nodes={"PACS": echo_scp})
    gateway.resends = 2
    gateway.metrics.contact("hosp-b")
    running = asyncio.create_task(gateway.monitor.run())
    try:

        async def serving_and_checked() -> bool:
            assert not running.done(), running
            return gateway.monitor.port is not None and "PACS" in gateway.monitor.node_checks

        await wait_until(serving_and_checked, timeout_s=10, what="monitor serving and checking")
        url = f"http://127.0.0.1:{gateway.monitor.port}"
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            health = await client.get("/healthz")
            assert (health.status_code, health.text) == (200, "ok\n")
            scraped = await client.get("/metrics")
            assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
            text = scraped.content
            assert value(text, "dicombridge_resends_total") == 2
            assert value(text, "dicombridge_local_node_up", node="PACS") == 1
            assert value(text, "dicombridge_directory_version") == fed.directory.version
            assert value(text, "dicombridge_storage_items", area="outbox") == 0
            status = (await client.get("/status")).json()
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/nothing")).status_code == 404
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert status["site"] == "hosp-a"
    assert status["broker"]["connected"] is False
    contacts = {s["site"]: s["last_contact"] for s in status["remote_sites"]}
    assert set(contacts) == {"hosp-b", "hosp-c"}
    assert contacts["hosp-b"] is not None
    assert contacts["hosp-c"] is None
    assert [a["area"] for a in status["storage"]] == ["outbox", "spool", "incoming", "quarantine"]
    assert status["local_nodes"][0]["ok"] is True


async def test_a_busy_port_is_logged_and_does_not_stop_the_gateway(
    tmp_path: Path, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """If [monitoring] port cannot be bound, run() logs the error and returns at once."""
    gateway = gateway_for(tmp_path, fed, nodes={})
    blocker = await asyncio.start_server(
        lambda r, w: None, "127.0.0.1", gateway.site.config.monitoring.port
    )
    try:
        await asyncio.wait_for(gateway.monitor.run(), 10)
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert gateway.monitor.port is None
    assert "monitoring endpoints not served" in caplog.text


# --- [monitoring] in gateway.toml ---------------------------------------------------------


def test_monitoring_defaults_and_port_range() -> None:
    """[monitoring] is on, on 127.0.0.1:9110, checking nodes every 15 s; a port outside
    1..65535 is refused."""
    assert MonitoringSection() == MonitoringSection(
        enabled=True, host="127.0.0.1", port=9110, node_check_s=15
    )
    with pytest.raises(ValidationError):
        MonitoringSection(port=0)
    with pytest.raises(ValidationError):
        MonitoringSection(port=65536)


def test_template_documents_monitoring_and_a_restart_applies_it(tmp_path: Path) -> None:
    """The file `init` writes documents [monitoring] (commented); uncommented it loads;
    a running gateway does not take an edit of it without a restart."""
    path = init_site(tmp_path / "a", site_id="hosp-a", broker_url="amqps://hosp-a@h:5671/v")
    text = path.read_text()
    assert "# [monitoring]" in text
    assert "# port = 9110" in text
    running = site_config.load(path)
    assert running.monitoring == MonitoringSection()
    uncommented = text.replace("# [monitoring]", "[monitoring]").replace(
        "# port = 9110", "port = 9111"
    )
    path.write_text(uncommented)
    edited = site_config.load(path)
    assert edited.monitoring.port == 9111
    assert "monitoring" not in routing_table.HOT_SECTIONS
    merged, restart = routing_table.running_table(running, edited)
    assert restart == ["monitoring"]
    assert merged.monitoring.port == 9110
