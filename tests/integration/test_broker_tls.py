"""amqps to a TLS-only RabbitMQ node: the right CA connects and relays, another CA or no
client certificate is refused with a permanent error, x509 (EXTERNAL) login works.

The node is this module's own (the session broker stays plain for the other tests); it
requires a client certificate signed by the test CA and also offers EXTERNAL login.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dicombridge.errors import BrokerTlsError, BrokerUnreachableError, SandboxError
from dicombridge.gateway import Gateway
from dicombridge.identity import LocalSite
from dicombridge.rabbitmq import BrokerNode, NodeTls
from dicombridge.sandbox import Federation, create_federation
from dicombridge.spool import Receiver, ReceiverIdentity
from dicombridge.transport import BrokerTls, Transport
from tests.brokerkit import Inbox, seal_for
from tests.relaykit import delete_users, make_two_sites, running_gateways
from tests.test_cli import CLI
from tests.tlskit import Issued, TestCa

pytestmark = pytest.mark.integration

SITES = ["hosp-a", "hosp-b"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestCa, TestCa]:
    """The broker's CA and an unrelated CA (same shape, other key)."""
    root = tmp_path_factory.mktemp("pki")
    return TestCa.create(root, "broker-ca"), TestCa.create(root, "other-ca")


@pytest.fixture(scope="module")
def tls_node(
    tmp_path_factory: pytest.TempPathFactory, pki: tuple[TestCa, TestCa]
) -> Iterator[BrokerNode]:
    """A RabbitMQ node whose AMQP port speaks amqps only, client certificates required."""
    ca, _ = pki
    server = ca.server("broker")
    tls = NodeTls(
        ca_file=ca.ca_file,
        cert_file=server.cert_file,
        key_file=server.key_file,
        verify_peer=True,
        external=True,
    )
    try:
        node = BrokerNode.start(
            tmp_path_factory.mktemp("rabbitmq-tls"), memory_mib=512, timeout_s=60, tls=tls
        )
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def federation(
    tls_node: BrokerNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    """hosp-a and hosp-b provisioned on the TLS node (broker users named as the sites)."""
    fed = create_federation(
        tmp_path_factory.mktemp("fed"), broker=tls_node, site_ids=SITES, vhost="tls"
    )
    yield fed
    with tls_node.management() as client:
        for site_id in SITES:
            client.delete_user(site_id)


def amqps_url(site: LocalSite) -> str:
    """The site's URL with its password, as amqps (the sandbox writes amqp://)."""
    url = site.config.amqp_url()
    assert url.startswith("amqp://")
    return "amqps://" + url.removeprefix("amqp://")


def transport(site: LocalSite, tls: BrokerTls, *, url: str | None = None) -> Transport:
    return Transport(
        amqp_url=url or amqps_url(site),
        site_id=site.site_id,
        broker_user=site.config.broker.user,
        directory=site.directory,
        connect_timeout_s=10,
        tls=tls,
    )


def client_tls(ca: TestCa, common_name: str, *, external: bool = False) -> BrokerTls:
    issued: Issued = ca.client(common_name)
    return BrokerTls(
        ca_file=ca.ca_file,
        cert_file=issued.cert_file,
        key_file=issued.key_file,
        external_auth=external,
    )


async def relay_once(
    federation: Federation, tls_a: BrokerTls, tls_b: BrokerTls, tmp_path: Path, *, url_a: str
) -> None:
    """Seal a file at hosp-a, publish it over amqps, and receive it at hosp-b intact."""
    site_a, site_b = federation.site("hosp-a"), federation.site("hosp-b")
    inbox = Inbox()
    receiver = Receiver(
        site_b.config.storage.root,
        ReceiverIdentity(site_b.site_id, site_b.keys, site_b.directory),
        inbox.on_transfer,
    )
    source = tmp_path / "payload.bin"
    source.write_bytes(os.urandom(200_000))
    async with transport(site_b, tls_b) as link_b:
        consumer = asyncio.create_task(link_b.consume("bulk", receiver.handle))
        try:
            async with transport(site_a, tls_a, url=url_a) as link_a:
                assert link_a.broker_node("bulk") == f"127.0.0.1:{federation_port(site_a)}"
                await link_a.publish_transfer(seal_for(site_a, "hosp-b", source, 64 * 1024))
            await inbox.wait_for(1)
        finally:
            consumer.cancel()
    incoming, path = inbox.received[0]
    assert incoming.sender_site == "hosp-a"
    assert path.read_bytes() == source.read_bytes()


def federation_port(site: LocalSite) -> int | None:
    return urlsplit(site.config.broker.url).port


async def test_the_right_ca_connects_and_relays_a_transfer(
    federation: Federation, pki: tuple[TestCa, TestCa], tmp_path: Path
) -> None:
    """With the broker's CA (and a client certificate) both sites connect over amqps and
    a sealed transfer crosses byte-identical."""
    ca, _ = pki
    site_a = federation.site("hosp-a")
    await relay_once(
        federation,
        client_tls(ca, "hosp-a"),
        client_tls(ca, "hosp-b"),
        tmp_path,
        url_a=amqps_url(site_a),
    )


async def test_a_broker_certificate_from_an_unknown_ca_is_refused(
    federation: Federation, pki: tuple[TestCa, TestCa], caplog: pytest.LogCaptureFixture
) -> None:
    """Trusting another CA, the transport refuses the broker at once with a permanent
    BrokerTlsError naming the node and the CA file, logged at ERROR."""
    ca, other = pki
    site_a = federation.site("hosp-a")
    # A valid client certificate: only the broker's certificate is in question.
    issued = ca.client("hosp-a", name="client-a-for-other")
    tls = BrokerTls(ca_file=other.ca_file, cert_file=issued.cert_file, key_file=issued.key_file)
    started = time.monotonic()
    with (
        caplog.at_level(logging.ERROR, logger="dicombridge.transport"),
        pytest.raises(BrokerTlsError) as caught,
    ):
        async with transport(site_a, tls):
            pytest.fail("connected to a broker whose CA is not trusted")
    assert time.monotonic() - started < 10, "a certificate failure must not be retried"
    assert caught.value.transient is False
    message = str(caught.value)
    assert "certificate verify failed" in message
    assert str(other.ca_file) in message
    assert f"127.0.0.1:{federation_port(site_a)}" in message
    assert any(r.getMessage().startswith("TLS to the broker failed") for r in caplog.records)


async def test_without_a_client_certificate_the_broker_refuses(
    federation: Federation, pki: tuple[TestCa, TestCa]
) -> None:
    """A broker that requires client certificates refuses a client without one, and the
    error points at the client certificate: TLS 1.3 delivers the broker's alert after the
    client's handshake, so the client sees either the alert (permanent BrokerTlsError)
    or a reset (BrokerUnreachableError with the hint)."""
    ca, _ = pki
    with pytest.raises((BrokerTlsError, BrokerUnreachableError)) as caught:
        async with transport(federation.site("hosp-a"), BrokerTls(ca_file=ca.ca_file)):
            pytest.fail("connected without the client certificate the broker requires")
    if isinstance(caught.value, BrokerTlsError):
        assert caught.value.transient is False
        assert "certificate required" in str(caught.value)
    else:
        assert "cert_file" in str(caught.value)


async def test_x509_login_needs_no_password(
    federation: Federation, pki: tuple[TestCa, TestCa], tmp_path: Path
) -> None:
    """With EXTERNAL login the client certificate's CN is the broker user: a URL without
    password connects, and the broker accepts its user_id on a relayed transfer."""
    ca, _ = pki
    site_a = federation.site("hosp-a")
    no_password = f"amqps://hosp-a@127.0.0.1:{federation_port(site_a)}/tls"
    await relay_once(
        federation,
        client_tls(ca, "hosp-a", external=True),
        client_tls(ca, "hosp-b"),
        tmp_path,
        url_a=no_password,
    )


async def test_plain_amqp_to_the_tls_port_does_not_connect(
    federation: Federation, pki: tuple[TestCa, TestCa]
) -> None:
    """The node has no plain listener: amqp:// to its port never gets a connection."""
    site_a = federation.site("hosp-a")
    plain = Transport(
        amqp_url=site_a.config.amqp_url(),
        site_id=site_a.site_id,
        broker_user=site_a.config.broker.user,
        directory=site_a.directory,
        connect_timeout_s=5,
        tls=client_tls(pki[0], "hosp-a"),
    )
    with pytest.raises(BrokerUnreachableError):
        async with plain:
            pytest.fail("a plain AMQP connection was accepted on the TLS-only port")


async def test_a_gateway_refuses_a_broker_certificate_from_an_unknown_ca(
    tls_node: BrokerNode, pki: tuple[TestCa, TestCa], tmp_path: Path
) -> None:
    """A gateway whose [broker] ca_file is another CA stops with BrokerTlsError instead
    of connecting (or retrying as if the broker were merely unreachable); `dicombridge
    gateway run` says so in one line naming the CA file and exits 2."""
    ca, other = pki
    sites = make_two_sites(tmp_path / "fed", broker=tls_node, vhost="gw-tls", routes=[], nodes_b=[])
    client = ca.client(sites.site_a)
    path = sites.config_a
    text = path.read_text(encoding="utf-8").replace('url = "amqp://', 'url = "amqps://', 1)
    tls_lines = (
        f'ca_file = "{other.ca_file}"\n'
        f'cert_file = "{client.cert_file}"\nkey_file = "{client.key_file}"\n'
    )
    path.write_text(text.replace("[broker]\n", "[broker]\n" + tls_lines, 1), encoding="utf-8")
    gateway = Gateway(LocalSite.load(path))
    try:
        with pytest.raises(ExceptionGroup) as caught:
            async with asyncio.timeout(60):
                await gateway.run()
        failures = caught.value.subgroup(BrokerTlsError)
        assert failures is not None, f"the gateway stopped for another reason: {caught.value!r}"
        assert "certificate verify failed" in str(failures.exceptions[0])
        assert str(other.ca_file) in str(failures.exceptions[0])
        # The operator's view: `gateway run` exits 2 with one line naming the CA file.
        run = await asyncio.to_thread(
            subprocess.run,
            [*CLI, "gateway", "run", "--config", str(path), "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 2, run.stderr
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("error: "), run.stderr
        assert str(other.ca_file) in last, run.stderr
        assert "Traceback" not in run.stderr
    finally:
        with tls_node.management() as management:
            delete_users(management, sites)


async def test_a_gateway_with_the_broker_ca_connects_over_amqps(
    tls_node: BrokerNode, pki: tuple[TestCa, TestCa], tmp_path: Path
) -> None:
    """Two gateways whose [broker] names the broker's CA and a client certificate
    connect over amqps and become ready."""
    ca, _ = pki
    sites = make_two_sites(tmp_path / "fed", broker=tls_node, vhost="gw-ok", routes=[], nodes_b=[])
    try:
        for site, path in ((sites.site_a, sites.config_a), (sites.site_b, sites.config_b)):
            client = ca.client(site)
            text = path.read_text(encoding="utf-8").replace('url = "amqp://', 'url = "amqps://', 1)
            tls_lines = (
                f'ca_file = "{ca.ca_file}"\n'
                f'cert_file = "{client.cert_file}"\nkey_file = "{client.key_file}"\n'
            )
            path.write_text(
                text.replace("[broker]\n", "[broker]\n" + tls_lines, 1), encoding="utf-8"
            )
        async with running_gateways(sites.config_a, sites.config_b) as gateways:
            assert all(gateway.ready.is_set() for gateway in gateways)
    finally:
        with tls_node.management() as management:
            delete_users(management, sites)
