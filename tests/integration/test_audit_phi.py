"""Issue 8's log test: a study whose Patient Name and Patient ID are marker strings is
relayed by two gateway processes to Orthanc; neither gateway's log nor audit file holds a
marker, and both audit files account for every instance by its UIDs."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pydicom
import pytest

from dicombridge import config as site_config
from dicombridge.management import ManagementClient
from dicombridge.orthanc import DicomModality, OrthancServer, OrthancSettings, free_port
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import wait_gateway
from tests.brokerkit import wait_until
from tests.dicomkit import PHI_MARKER
from tests.pacskit import DCMTK_BIN, dcmtk_env, wait_for
from tests.qrkit import WORKSTATION_AE, findscu, query_file
from tests.relaykit import (
    GATEWAY_B_AE_TITLE,
    GatewayProcess,
    TwoSites,
    ct_series,
    delete_users,
    route_to_pacs,
    running_gateways,
)

pytestmark = pytest.mark.integration

ROUTE: Final = "SITE_B"
SERIES_SIZE: Final = 4


@pytest.fixture
def sites(
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    orthanc_b: OrthancServer,
) -> Iterator[TwoSites]:
    """Sites A and B in this test's vhost, A's route SITE_B leading to Orthanc B."""
    made = route_to_pacs(
        tmp_path / "fed",
        broker=rabbitmq_node,
        vhost=vhost,
        pacs_port=orthanc_b.dicom_port,
        route=ROUTE,
    )
    yield made
    delete_users(management, made)


def _marked_series(directory: Path, patient_id: str) -> list[Path]:
    """A generated CT series, Patient Name the PHI marker and Patient ID ``patient_id``."""
    paths = ct_series(directory, SERIES_SIZE, rows=64, columns=64)
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.PatientID = patient_id
        dataset.save_as(path, enforce_file_format=True)
    return paths


def _audit_records(site_dir: Path) -> list[dict[str, Any]]:
    """Every record of a site's audit files (rotated ones first), each line one object."""
    files = [*sorted(_audit_path(site_dir).parent.glob("audit.jsonl.*"), reverse=True)]
    files.append(_audit_path(site_dir))
    return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]


def _audit_path(site_dir: Path) -> Path:
    config = site_config.load(site_dir / site_config.CONFIG_FILE)
    return config.audit.resolved_path(config_dir=site_dir, storage_root=config.storage.root)


def _events(records: list[dict[str, Any]], event: str) -> dict[str, dict[str, Any]]:
    """Records of ``event`` by SOP Instance UID."""
    return {r["sop_instance_uid"]: r for r in records if r["event"] == event}


def test_markers_reach_no_log_and_the_audit_files_account_for_the_study(
    tmp_path: Path, sites: TwoSites, orthanc_b: OrthancServer
) -> None:
    """Relayed A -> B -> Orthanc B by gateway processes: the Patient Name and ID markers
    are in no log or audit file; A's audit has instance-sent and the stored receipt, B's
    instance-received and instance-stored, per instance, with the files' study, series
    and instance UIDs, the sites and the AE titles."""
    patient_id = f"Pidmarker-{secrets.token_hex(4)}"
    paths = _marked_series(tmp_path / "series", patient_id)
    headers = {
        str(d.SOPInstanceUID): d
        for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    }
    gateways: list[GatewayProcess] = []
    try:
        for config, port, ae in (
            (sites.config_a, sites.port_a, "GATEWAY_A"),
            (sites.config_b, sites.port_b, GATEWAY_B_AE_TITLE),
        ):
            gateways.append(GatewayProcess.start(config))
            wait_gateway(
                gateways[-1].process,
                port=port,
                ae_title=ae,
                log_path=gateways[-1].log_path,
                timeout_s=60,
            )
        result = subprocess.run(
            [
                str(DCMTK_BIN / "storescu"),
                "-aet",
                "MODALITY",
                "-aec",
                ROUTE,
                "127.0.0.1",
                str(sites.port_a),
                *map(str, paths),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=dcmtk_env(),
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        with orthanc_b.client() as client:
            wait_for(
                lambda: all(client.find_instance(uid) for uid in headers),
                timeout_s=120,
                interval_s=0.2,
                what="the series in Orthanc B",
            )
        site_a_dir = sites.config_a.parent
        wait_for(
            lambda: len(_events(_audit_records(site_a_dir), "instance-stored")) == SERIES_SIZE,
            timeout_s=60,
            interval_s=0.2,
            what="the stored receipts audited at A",
        )
    finally:
        codes = [g.stop() for g in gateways]
    assert codes == [0, 0], [g.log()[-3000:] for g in gateways]

    site_b_dir = sites.config_b.parent
    audit_files = [
        f
        for site_dir in (sites.config_a.parent, site_b_dir)
        for f in _audit_path(site_dir).parent.iterdir()
    ]
    log_files = [g.log_path for g in gateways]
    assert len(set(log_files)) == 2
    for path in log_files + audit_files:
        text = path.read_text(errors="replace")
        assert text, path
        for marker in (PHI_MARKER, PHI_MARKER.split("^")[0], patient_id):
            assert marker not in text, (marker, path)

    at_a = _audit_records(sites.config_a.parent)
    at_b = _audit_records(site_b_dir)
    expected = {
        uid: {
            "study_instance_uid": str(d.StudyInstanceUID),
            "series_instance_uid": str(d.SeriesInstanceUID),
            "sop_instance_uid": uid,
            "sop_class_uid": str(d.SOPClassUID),
            "calling_ae_title": "MODALITY",
            "called_ae_title": ROUTE,
            "node": "PACS",
        }
        for uid, d in headers.items()
    }
    sites_of = {
        ("A", "instance-sent"): {"site": sites.site_a, "to_site": sites.site_b},
        ("A", "instance-stored"): {"site": sites.site_a, "to_site": sites.site_b},
        ("B", "instance-received"): {"site": sites.site_b, "from_site": sites.site_a},
        ("B", "instance-stored"): {"site": sites.site_b, "from_site": sites.site_a},
    }
    transfer_ids: dict[tuple[str, str], dict[str, str]] = {}
    for (where, event), site_fields in sites_of.items():
        records = _events(at_a if where == "A" else at_b, event)
        assert set(records) == set(expected), (where, event)
        for uid, record in records.items():
            assert record["outcome"] == "success", record
            assert record["status"] == "0x0000", record
            assert {**expected[uid], **site_fields}.items() <= record.items(), record
        transfer_ids[where, event] = {u: r["transfer_id"] for u, r in records.items()}
    first = transfer_ids["A", "instance-sent"]
    assert len(set(first.values())) == SERIES_SIZE
    assert all(ids == first for ids in transfer_ids.values())


async def test_queries_and_policy_refusals_are_audited_at_both_sites(
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
) -> None:
    """A C-FIND B's policy refuses is a policy-refusal at B and a failed query (0x0124)
    at A; an allowed one is a query at both, with the status findscu saw; each names the
    sites, AE titles, node, query id and level, and no key value."""
    # Orthanc answers C-FIND only to the AE titles it knows: gateway B's.
    settings = OrthancSettings(
        ae_title="PACS_B",
        modalities={"gateway-b": DicomModality(GATEWAY_B_AE_TITLE, "127.0.0.1", free_port())},
    )
    pacs = OrthancServer.start(tmp_path / "orthanc-b", settings)
    two = route_to_pacs(
        tmp_path / "fed", broker=rabbitmq_node, vhost=vhost, pacs_port=pacs.dicom_port, route=ROUTE
    )
    allow_a = f'\n[[remote_access]]\nsite = "{two.site_a}"\nlevels = ["STUDY"]\n'
    two.config_b.write_text(two.config_b.read_text(encoding="utf-8") + allow_a, "utf-8")
    try:
        async with running_gateways(two.config_a, two.config_b) as (gateway_a, gateway_b):
            results = {}
            for name, root, level, keys in (
                ("refused", "patient", "PATIENT", {"PatientName": "Querymarker*"}),
                ("allowed", "study", "STUDY", {"StudyDate": "20240101", "StudyInstanceUID": ""}),
            ):
                query = query_file(tmp_path / "q" / f"{name}.dcm", level, **keys)
                results[name] = await asyncio.to_thread(
                    findscu,
                    port=two.port_a,
                    called_ae=ROUTE,
                    root=root,
                    query=query,
                    outdir=tmp_path / "responses" / name,
                )

            async def both_audited() -> bool:
                ends = [
                    r
                    for site_dir in (two.config_a.parent, two.config_b.parent)
                    for r in _audit_records(site_dir)
                    if r["event"] in ("query", "policy-refusal")
                ]
                return len(ends) == 4

            await wait_until(both_audited, timeout_s=30, what="four query records")
            assert gateway_a.audit.dropped == gateway_b.audit.dropped == 0
    finally:
        delete_users(management, two)
        pacs.stop()
    refused, allowed = results["refused"], results["allowed"]
    assert refused.final_status == 0x0124, refused.output
    assert allowed.final_status == 0x0000, allowed.output
    at_a = [r for r in _audit_records(two.config_a.parent) if "query_id" in r]
    at_b = [r for r in _audit_records(two.config_b.parent) if "query_id" in r]
    assert [r["event"] for r in at_a] == ["query", "query"]
    assert [r["event"] for r in at_b] == ["policy-refusal", "query"]
    for records, sites_fields in (
        (at_a, {"site": two.site_a, "to_site": two.site_b}),
        (at_b, {"site": two.site_b, "from_site": two.site_a}),
    ):
        for record, result, level in zip(
            records, (refused, allowed), ("PATIENT", "STUDY"), strict=True
        ):
            assert {
                **sites_fields,
                "operation": "find",
                "level": level,
                "node": "PACS",
                "calling_ae_title": WORKSTATION_AE,
                "called_ae_title": ROUTE,
                "status": f"0x{result.final_status:04X}",
            }.items() <= record.items(), record
    assert [r["query_id"] for r in at_a] == [r["query_id"] for r in at_b]
    assert [r["outcome"] for r in at_a + at_b] == ["failure", "success"] * 2
    for site_dir in (two.config_a.parent, two.config_b.parent):
        assert "Querymarker" not in _audit_path(site_dir).read_text()
