"""DICOM TLS (issue 8): the gateway's SCP serving TLS only, and delivery over TLS to a local
node. DCMTK's storescu/echoscu ``+tls`` play the modality, storescp ``+tls`` the node, and
the real RabbitMQ and Orthanc B sit in between; certificates come from a throwaway CA."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
from pynetdicom import AE

from dicombridge import config as site_config
from dicombridge import dicom_tls
from dicombridge.acceptance import AcceptancePolicy
from dicombridge.config import LocalNode
from dicombridge.errors import ConfigError
from dicombridge.management import ManagementClient
from dicombridge.orthanc import OrthancServer
from dicombridge.rabbitmq import BrokerNode
from dicombridge.scp import ReceivedInstance, ScpSettings, StorageSCP, StoreOutcome
from dicombridge.scu import StoreSCU
from tests.brokerkit import wait_until
from tests.dicom_tlskit import (
    Pki,
    dcmtk_tls_args,
    enable_node_tls,
    enable_scp_tls,
    make_pki,
)
from tests.pacskit import (
    DCMTK_BIN,
    StoreSCPNode,
    dataset_bytes,
    dcmtk_env,
    fresh_copy,
    sop_instance_uid,
)
from tests.relaykit import Route, TwoSites, delete_users, make_two_sites, running_gateways

TO_ORTHANC: Final = "SITE_B"
VERIFICATION: Final = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh CA, server and client certificates for this test."""
    return make_pki(tmp_path / "pki")


SitesFactory = Callable[[int], TwoSites]


@pytest.fixture
def make_sites(
    tmp_path: Path, rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str
) -> Iterator[SitesFactory]:
    """Sites A and B, A's route ``SITE_B`` leading to B's node PACS (AE title PACS_B) on
    the port given; their broker users are deleted afterwards."""
    made: list[TwoSites] = []

    def make(node_port: int) -> TwoSites:
        node = LocalNode(name="PACS", ae_title="PACS_B", host="127.0.0.1", port=node_port)
        sites = make_two_sites(
            tmp_path / f"fed{len(made)}",
            broker=rabbitmq_node,
            vhost=vhost,
            routes=[Route(TO_ORTHANC, "PACS")],
            nodes_b=[node],
        )
        made.append(sites)
        return sites

    yield make
    for sites in made:
        delete_users(management, sites)


def _dcmtk(tool: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK_BIN / tool), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dcmtk_env(),
        check=False,
    )


def _storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return _dcmtk(
        "storescu", *tls, "-aet", "MODALITY", "-aec", TO_ORTHANC, "127.0.0.1", str(port), str(path)
    )


async def _in_orthanc(orthanc: OrthancServer, uid: str) -> bool:
    def look() -> bool:
        with orthanc.client() as client:
            return client.find_instance(uid) is not None

    return await asyncio.to_thread(look)


# --- configuration ------------------------------------------------------------------------


def _template(tmp_path: Path) -> Path:
    path = tmp_path / "site" / site_config.CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        site_config.render_template(
            site_id="hosp-a", broker_url="amqps://hosp-a@broker.example/fed", operator_key=""
        ),
        encoding="utf-8",
    )
    return path


def test_template_tls_keys_parse_with_paths_taken_against_the_file(tmp_path: Path) -> None:
    """The commented [gateway] and [[local_nodes]] TLS keys of the template parse once
    uncommented, their relative paths resolved against the file's directory."""
    path = _template(tmp_path)
    text = path.read_text(encoding="utf-8")
    node_at = text.index("# [[local_nodes]]")
    node_end = text.index("\n\n", node_at)
    gateway = re.sub(r"^# (tls_\w+ = .*)$", r"\1", text[:node_at], flags=re.MULTILINE)
    example = re.sub(
        r"^# (\[\[local_nodes\]\]|\w+ = .*)$", r"\1", text[node_at:node_end], flags=re.MULTILINE
    )
    text = gateway + example + text[node_end:]
    config = site_config.parse(text, path)
    base = path.parent.resolve()
    assert config.gateway.tls
    assert config.gateway.tls_cert_file == base / "secrets" / "dicom-tls.crt"
    assert config.gateway.tls_ca_file == base / "secrets" / "hospital-ca.pem"
    assert config.gateway.tls_profile == "bcp195-non-downgrading"
    node = config.local_nodes[0]
    assert node.tls
    assert node.tls_ca_file == base / "secrets" / "pacs-ca.pem"
    assert node.tls_key_file == base / "secrets" / "gateway-client.key"
    assert node.tls_server_name == "pacs.hospital.example"


@pytest.mark.parametrize(
    ("gateway_keys", "problem"),
    [
        ('tls_cert_file = "/x.crt"\n', "both tls_cert_file and tls_key_file"),
        (
            'tls_cert_file = "/x.crt"\ntls_key_file = "/x.key"\n',
            "tls_require_client_cert needs tls_ca_file",
        ),
        ('tls_profile = "tls1.0"\n', "bcp195"),
    ],
)
def test_incomplete_gateway_tls_is_refused_naming_the_field(
    tmp_path: Path, gateway_keys: str, problem: str
) -> None:
    """A [gateway] TLS setting that cannot work is a ConfigError naming gateway.*."""
    path = _template(tmp_path)
    text = path.read_text(encoding="utf-8").replace(
        "\nreload_check_s = 2\n", f"\nreload_check_s = 2\n{gateway_keys}", 1
    )
    with pytest.raises(ConfigError) as caught:
        site_config.parse(text, path)
    assert caught.value.field.startswith("gateway")
    assert problem in caught.value.problem


def test_node_tls_keys_without_tls_are_refused() -> None:
    """A local node with tls_* keys but not ``tls = true`` is refused (a forgotten switch
    would silently send in clear)."""
    with pytest.raises(ValueError, match="tls is not true"):
        LocalNode(name="PACS", ae_title="PACS", host="pacs", port=2762, tls_ca_file=Path("/ca"))


def test_unusable_certificate_file_is_a_config_error(tmp_path: Path, pki: Pki) -> None:
    """A certificate file that is not one stops the SCP context with a ConfigError that
    names the file and the field."""
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        dicom_tls.server_context(
            cert_file=bogus,
            key_file=pki.server.key,
            ca_file=pki.ca,
            require_client_cert=True,
            profile="bcp195",
        )
    assert caught.value.field == "gateway.tls_cert_file"
    assert caught.value.path == str(bogus)


def test_profiles_offer_only_bcp195_suites_in_tls12(pki: Pki) -> None:
    """Both profiles negotiate TLS 1.2+ only; non-downgrading offers the four BCP 195
    AES-GCM suites in TLS 1.2, bcp195 adds AES128-SHA and nothing else."""
    for profile in ("bcp195", "bcp195-non-downgrading"):
        context = dicom_tls.client_context(
            ca_file=pki.ca, cert_file=None, key_file=None, profile=profile
        )
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"}
        assert tls12 == set(dicom_tls.PROFILE_CIPHERS[profile])
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname


# --- the SCP in this process --------------------------------------------------------------


async def _accept(instance: ReceivedInstance) -> StoreOutcome:
    return StoreOutcome(0x0000)


async def test_tls_scp_accepts_pynetdicom_tls_with_tcp_nodelay(pki: Pki) -> None:
    """The SCP with a TLS context accepts a TLS association (client certificate checked)
    while another connection sits silent before its handshake, and the accepted socket,
    an SSLSocket, still has TCP_NODELAY."""
    context = dicom_tls.server_context(
        cert_file=pki.server.cert,
        key_file=pki.server.key,
        ca_file=pki.ca,
        require_client_cert=True,
        profile="bcp195-non-downgrading",
    )
    settings = ScpSettings(host="127.0.0.1", port=0, ssl_context=context)
    client = dicom_tls.client_context(
        ca_file=pki.ca,
        cert_file=pki.client.cert,
        key_file=pki.client.key,
        profile="bcp195-non-downgrading",
    )
    async with StorageSCP(
        policy=AcceptancePolicy.of(["TLS_SCP"]), on_store=_accept, settings=settings
    ) as scp:

        def echo() -> tuple[int, bool, str | None]:
            # Connected, no ClientHello: must not hold up the next connection.
            silent = socket.create_connection(("127.0.0.1", scp.port))
            ae = AE(ae_title="ECHOSCU")
            ae.connection_timeout = 5
            ae.acse_timeout = 5
            ae.add_requested_context(VERIFICATION)
            assoc = ae.associate(
                "127.0.0.1", scp.port, ae_title="TLS_SCP", tls_args=(client, "localhost")
            )
            assert assoc.is_established
            try:
                status = assoc.send_c_echo()
                # The acceptor's side of this association (pynetdicom's server thread).
                served = [a for a in scp._ae.active_associations if a.is_established]
                sock = served[0].dul.socket.socket
                nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
                return int(status.Status), nodelay, version
            finally:
                assoc.release()
                silent.close()

        status, nodelay, version = await asyncio.to_thread(echo)
    assert status == 0x0000
    assert nodelay
    assert version in ("TLSv1.2", "TLSv1.3")


# --- end to end with DCMTK ----------------------------------------------------------------


@pytest.mark.integration
async def test_storescu_tls_relays_and_plain_dicom_is_refused(
    tmp_path: Path,
    make_sites: SitesFactory,
    orthanc_b: OrthancServer,
    pki: Pki,
) -> None:
    """With TLS on A's SCP: plain storescu and a client certificate from an unknown CA are
    refused, echoscu +tls succeeds, and storescu +tls (BCP 195 profile) is relayed to
    Orthanc B; nothing of the refused attempts reaches B."""
    two_sites = make_sites(orthanc_b.dicom_port)
    enable_scp_tls(two_sites.config_a, pki)
    refused = fresh_copy("CT_small.dcm", tmp_path / "files")
    relayed = fresh_copy("CT_small.dcm", tmp_path / "files")
    async with running_gateways(two_sites.config_a, two_sites.config_b):
        port = two_sites.port_a
        plain = await asyncio.to_thread(_storescu, port, refused)
        assert plain.returncode != 0, plain.stdout + plain.stderr
        rogue = await asyncio.to_thread(
            _storescu, port, refused, *dcmtk_tls_args(pki.rogue, pki.ca)
        )
        assert rogue.returncode != 0, rogue.stdout + rogue.stderr
        echo = await asyncio.to_thread(
            _dcmtk,
            "echoscu",
            *dcmtk_tls_args(pki.client, pki.ca),
            "-aec",
            TO_ORTHANC,
            "127.0.0.1",
            str(port),
        )
        assert echo.returncode == 0, echo.stdout + echo.stderr
        sent = await asyncio.to_thread(
            _storescu, port, relayed, *dcmtk_tls_args(pki.client, pki.ca, "+px")
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        uid = sop_instance_uid(relayed)
        await wait_until(
            lambda: _in_orthanc(orthanc_b, uid), timeout_s=60, what="instance in Orthanc B"
        )
    assert not await _in_orthanc(orthanc_b, sop_instance_uid(refused))


@pytest.mark.integration
async def test_delivery_to_a_tls_local_node(
    tmp_path: Path, make_sites: SitesFactory, pki: Pki
) -> None:
    """B delivers to a node that speaks only TLS (storescp +tls, client certificate
    required): the relayed data set arrives there byte for byte."""
    node = StoreSCPNode.start(
        tmp_path / "storescp",
        ae_title="PACS_B",
        extra_args=("+xa", *dcmtk_tls_args(pki.server, pki.ca)),
    )
    try:
        two_sites = make_sites(node.port)
        enable_node_tls(two_sites.config_b, "PACS", pki)
        assert site_config.load(two_sites.config_b).local_nodes[0].tls
        path = fresh_copy("CT_small.dcm", tmp_path / "files", strip_trailing_padding=True)
        async with running_gateways(two_sites.config_a, two_sites.config_b):
            sent = await asyncio.to_thread(_storescu, two_sites.port_a, path)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            stored = await asyncio.to_thread(node.wait_stored, sop_instance_uid(path), timeout_s=60)
        assert dataset_bytes(stored) == dataset_bytes(path)
    finally:
        node.stop()


@pytest.mark.integration
async def test_store_scu_to_a_tls_node_fails_on_an_untrusted_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    """A node whose certificate the gateway's CA file does not vouch for gets no
    association: a transient outcome, nothing stored."""
    other = make_pki(tmp_path / "other-pki")
    node_process = StoreSCPNode.start(
        tmp_path / "storescp",
        ae_title="PACS_B",
        extra_args=("+xa", *dcmtk_tls_args(pki.server, pki.ca)),
    )
    try:
        node = LocalNode(
            name="PACS",
            ae_title="PACS_B",
            host="127.0.0.1",
            port=node_process.port,
            tls=True,
            tls_ca_file=other.ca,
            tls_cert_file=pki.client.cert,
            tls_key_file=pki.client.key,
        )
        path = fresh_copy("CT_small.dcm", tmp_path / "files")
        scu = StoreSCU(node, calling_ae_title="GATEWAY_B", connection_timeout_s=5)
        try:
            outcome = await asyncio.to_thread(scu.store, path)
        finally:
            scu.close()
        assert outcome.is_transient
        assert not outcome.from_peer
        assert node_process.stored(sop_instance_uid(path)) is None
    finally:
        node_process.stop()
