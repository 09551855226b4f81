"""Rules and fan-out end to end (issue 7): one study sent once reaches two sites, each
complete in its PACS; rules on Modality and the calling AE title pick the sites; an
instance no route selects is refused; a caller no route admits is rejected at
association. Real RabbitMQ, DCMTK's storescu as the modality, Orthanc at B and at C."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicombridge import config as site_config
from dicombridge.gateway import Gateway
from dicombridge.management import ManagementClient
from dicombridge.orthanc import OrthancServer, OrthancSettings, free_port
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import Federation, create_federation
from tests.brokerkit import wait_until
from tests.dicomkit import fresh_copy
from tests.pacskit import DCMTK_BIN, dcmtk_env, sop_instance_uid
from tests.relaykit import ct_series, running_gateways

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class ThreeSites:
    federation: Federation
    ids: tuple[str, str, str]
    port_a: int

    def config(self, index: int) -> Path:
        return self.federation.site_configs[self.ids[index]]


def _gateway_section(path: Path, *, ae_title: str, port: int, extra: str) -> None:
    text = path.read_text(encoding="utf-8")
    text = text.replace('ae_title = "DICOMBRIDGE"', f'ae_title = "{ae_title}"', 1)
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {port}", 1)
    extra += f"\n[monitoring]\nport = {free_port()}\n"
    path.write_text(text + extra, encoding="utf-8")
    site_config.load(path)


@pytest.fixture
def orthancs(
    tmp_path: Path, orthanc_b: OrthancServer
) -> Iterator[tuple[OrthancServer, OrthancServer]]:
    """The PACS of sites B and C."""
    with OrthancServer.start(tmp_path / "orthanc-c", OrthancSettings(ae_title="PACS_C")) as c:
        yield orthanc_b, c


@pytest.fixture
def sites(
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    orthancs: tuple[OrthancServer, OrthancServer],
) -> Iterator[ThreeSites]:
    """Sites A, B and C; A's routing table:

    1. RESEARCH -> B and C, when Modality is CT
    2. RESEARCH -> C, when Modality is MR and the caller matches MOD*
    3. RESTRICTED -> B, only for callers matching CT0?
    4. LAN_ONLY -> B, only for callers in 10.99.0.0/16
    5. LOOPBACK -> B, only for callers on loopback
    """
    suffix = secrets.token_hex(3)
    ids = (f"a-{suffix}", f"b-{suffix}", f"c-{suffix}")
    federation = create_federation(
        tmp_path / "fed", broker=rabbitmq_node, site_ids=list(ids), vhost=vhost
    )
    port_a = free_port()
    a, b, c = ids
    _gateway_section(
        federation.site_configs[a],
        ae_title="GATEWAY_A",
        port=port_a,
        extra=(
            f'\n[[routes]]\nae_title = "RESEARCH"\nsites = ["{b}", "{c}"]\n'
            'match = {Modality = "CT"}\n'
            f'\n[[routes]]\nae_title = "RESEARCH"\nsite = "{c}"\n'
            'calling_ae_titles = ["MOD*"]\nmatch = {Modality = "MR"}\n'
            f'\n[[routes]]\nae_title = "RESTRICTED"\nsite = "{b}"\ncalling_ae_titles = ["CT0?"]\n'
            f'\n[[routes]]\nae_title = "LAN_ONLY"\nsite = "{b}"\n'
            'source_networks = ["10.99.0.0/16"]\n'
            f'\n[[routes]]\nae_title = "LOOPBACK"\nsite = "{b}"\n'
            'source_networks = ["127.0.0.0/8", "::1/128"]\n'
        ),
    )
    for site, (title, pacs) in zip(
        (b, c), (("GATEWAY_B", orthancs[0]), ("GATEWAY_C", orthancs[1])), strict=True
    ):
        _gateway_section(
            federation.site_configs[site],
            ae_title=title,
            port=free_port(),
            extra=(
                f'\n[[local_nodes]]\nname = "PACS"\nae_title = "{pacs.ae_title}"\n'
                f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n'
            ),
        )
    yield ThreeSites(federation, ids, port_a)
    for site in ids:
        management.delete_user(federation.site(site).config.broker.user)


async def storescu(
    port: int, called: str, paths: list[Path], *, calling: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu of ``paths`` on one association (not asserted), in a thread: the
    gateways run on this test's event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [str(DCMTK_BIN / "storescu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=300,
        env=dcmtk_env(),
        check=False,
    )


def _with_modality(path: Path, modality: str) -> Path:
    dataset = pydicom.dcmread(path)
    dataset.Modality = modality
    dataset.save_as(path, enforce_file_format=True)
    return path


async def test_one_study_fans_out_to_two_sites_and_rules_pick_the_sites(
    tmp_path: Path,
    sites: ThreeSites,
    orthancs: tuple[OrthancServer, OrthancServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 20-instance CT series sent once to RESEARCH is stored complete in B's and in
    C's PACS (and A's outbox empties: each site's stored receipt came back); an MR
    instance goes to C only; an ultrasound instance no route selects is answered 0x0110
    and relayed nowhere; a caller RESTRICTED does not admit, or one outside LAN_ONLY's
    network, is rejected at association with "Calling AE Title Not Recognized" (and
    audited with its address), while LOOPBACK admits a caller on loopback (a deep echo
    through B succeeds)."""
    orthanc_b, orthanc_c = orthancs
    series = ct_series(tmp_path / "ct", 20, rows=128, columns=128)
    mr = fresh_copy("MR_small.dcm", tmp_path)
    us = _with_modality(fresh_copy("CT_small.dcm", tmp_path), "US")
    configs = [sites.config(i) for i in range(3)]
    async with running_gateways(*configs) as (gateway_a, gateway_b, gateway_c):
        sent = await storescu(sites.port_a, "RESEARCH", series)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sent = await storescu(sites.port_a, "RESEARCH", [mr], calling="MODALITY_MR")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        refused = await storescu(sites.port_a, "RESEARCH", [us])
        assert refused.returncode == 1  # storescu: a C-STORE answered with a failure
        answers = [r.getMessage() for r in caplog.records if r.name == "dicombridge.scp"]
        assert any(
            sop_instance_uid(us) in answer and "status 0x0110" in answer for answer in answers
        ), answers
        rejected = await storescu(sites.port_a, "RESTRICTED", [mr], calling="WORKSTATION")
        assert rejected.returncode != 0
        assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
        elsewhere = await storescu(sites.port_a, "LAN_ONLY", [mr])
        assert elsewhere.returncode != 0
        assert "Calling AE Title Not Recognized" in elsewhere.stdout + elsewhere.stderr
        echoed = await asyncio.to_thread(
            subprocess.run,
            [str(DCMTK_BIN / "echoscu"), "-aec", "LOOPBACK", "127.0.0.1", str(sites.port_a)],
            capture_output=True,
            text=True,
            timeout=60,
            env=dcmtk_env(),
            check=False,
        )
        assert echoed.returncode == 0, echoed.stdout + echoed.stderr  # deep echo through B

        ct_uids = {sop_instance_uid(p) for p in series}

        async def delivered() -> bool:
            return (
                gateway_b.deliverer.stored >= len(ct_uids)
                and gateway_c.deliverer.stored >= len(ct_uids) + 1
                and _outbox_empty(gateway_a)
            )

        await wait_until(delivered, timeout_s=120, interval_s=0.2, what="the study at B and C")

        async def rejections_audited() -> list[dict[str, str]]:
            path = gateway_a.audit.path
            lines = path.read_text().splitlines() if path.exists() else []
            records = [json.loads(line) for line in lines]
            return [r for r in records if r["event"] == "association-rejected"]

        await wait_until(
            lambda: _at_least(rejections_audited, 2), timeout_s=30, what="rejections audited"
        )
        audited = {
            (r["called_ae_title"], r["calling_ae_title"], r["source_address"], r["outcome"])
            for r in await rejections_audited()
        }
        assert audited == {
            ("RESTRICTED", "WORKSTATION", "127.0.0.1", "failure"),
            ("LAN_ONLY", "MODALITY", "127.0.0.1", "failure"),
        }
        assert gateway_b.deliverer.stored == len(ct_uids)
        assert gateway_c.deliverer.stored == len(ct_uids) + 1
    with orthanc_b.client() as client:
        assert set(client.iter_sop_instance_uids()) == ct_uids
    with orthanc_c.client() as client:
        assert set(client.iter_sop_instance_uids()) == {*ct_uids, sop_instance_uid(mr)}


def _outbox_empty(gateway: Gateway) -> bool:
    return not gateway.outbox.entries()


async def test_a_fan_out_the_outbox_cannot_take_whole_is_withdrawn(
    tmp_path: Path, sites: ThreeSites, caplog: pytest.LogCaptureFixture
) -> None:
    """With room for one transfer only, a CT instance for two sites is refused with
    0xA700 and the copy already sealed for the first site is withdrawn: the outbox is
    empty, so the modality's retry cannot give that site the instance twice."""
    config_a = sites.config(0)
    config_a.write_text(config_a.read_text().replace("max_count = 100000", "max_count = 1"))
    assert site_config.load(config_a).outbox.max_count == 1
    (instance,) = ct_series(tmp_path / "ct", 1, rows=64, columns=64)
    async with running_gateways(config_a) as (gateway_a,):
        refused = await storescu(sites.port_a, "RESEARCH", [instance])
        assert refused.returncode != 0
        answers = [r.getMessage() for r in caplog.records if r.name == "dicombridge.scp"]
        assert any("status 0xA700" in answer for answer in answers), answers
        assert _outbox_empty(gateway_a)
        assert gateway_a.outbox.count == 0


async def _at_least(records: Callable[[], Awaitable[list[dict[str, str]]]], count: int) -> bool:
    return len(await records()) >= count
