"""C-FIND and deep C-ECHO across sites: DCMTK findscu and echoscu at site A, gateway A, the
real RabbitMQ node, gateway B, and Orthanc as B's PACS; answers compared with the same
queries sent to B's Orthanc directly."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydicom
import pytest

from dicombridge.config import LocalNode
from dicombridge.management import ManagementClient
from dicombridge.orthanc import DicomModality, OrthancServer, OrthancSettings, free_port
from dicombridge.rabbitmq import BrokerNode
from tests.pacskit import dcmtk_storescu, wait_for
from tests.qrkit import (
    RETRIEVE_AE_TITLE,
    WORKSTATION_AE,
    FindResult,
    Patient,
    answers,
    echoscu,
    findscu,
    make_study,
    query_file,
    store,
)
from tests.relaykit import (
    GATEWAY_B_AE_TITLE,
    Route,
    TwoSites,
    big_multiframe,
    delete_users,
    make_two_sites,
    running_gateways,
)

pytestmark = pytest.mark.integration

PACS_AE: Final = "PACS"
ROUTE: Final = "SITE_B"
ROUTE_DOWN: Final = "SITE_B_DOWN"  # leads to a node at B where nothing listens
BIG_STUDY_SIZE: Final = 300
BIG_FRAMES: Final = 256  # 128 MiB of Pixel Data in one instance
MUELLER = Patient("Müller^Jürgen", "P-100", "ISO_IR 100")
YAMADA = Patient("Yamada^Tarou=山田^太郎=やまだ^たろう", "P-200", "ISO_IR 192")
SMITH = Patient("Smith^John", "P-300", "ISO_IR 100")
MANY = Patient("Many^Images", "P-900", "ISO_IR 100")
ALLOW_A: Final = '[[remote_access]]\nsite = "{site_a}"\n'


@dataclass(frozen=True)
class Archive:
    """Orthanc B, holding the test patients' studies; ``studies`` by patient id."""

    pacs: OrthancServer
    studies: dict[str, list[str]]
    series: dict[str, list[str]]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("qr")
    settings = OrthancSettings(
        ae_title=PACS_AE,
        # Answers in UTF-8: with Latin1, Orthanc drops the ideographic name parts itself.
        default_encoding="Utf8",
        # Orthanc answers C-FIND only to the nodes it knows (by AE title): gateway B, and
        # the workstation that queries it directly for comparison.
        modalities={
            "gateway-b": DicomModality(GATEWAY_B_AE_TITLE, "127.0.0.1", free_port()),
            "workstation": DicomModality(WORKSTATION_AE, "127.0.0.1", free_port()),
        },
    )
    pacs = OrthancServer.start(root / "orthanc", settings)
    studies: dict[str, list[str]] = {}
    series: dict[str, list[str]] = {}
    try:
        plans = [
            (MUELLER, "20240315", "CT", 2, 3),
            (YAMADA, "20240610", "MR", 1, 2),
            (SMITH, "20230101", "CT", 1, 2),
            (SMITH, "20241201", "US", 1, 1),
            (MANY, "20220202", "CT", 1, BIG_STUDY_SIZE),
        ]
        for number, (patient, date, modality, series_count, instances) in enumerate(plans):
            paths = make_study(
                root / f"study{number}",
                patient,
                study_date=date,
                modality=modality,
                series=series_count,
                instances=instances,
            )
            store(paths, port=pacs.dicom_port, called_ae=PACS_AE)
            first = pydicom.dcmread(paths[0], stop_before_pixels=True)
            studies.setdefault(patient.patient_id, []).append(str(first.StudyInstanceUID))
            uids = {
                str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in paths
            }
            series.setdefault(patient.patient_id, []).extend(sorted(uids))
        yield Archive(pacs, studies, series)
    finally:
        pacs.stop()


@pytest.fixture
def sites(
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    vhost: str,
    management: ManagementClient,
    archive: Archive,
) -> Iterator[Callable[..., TwoSites]]:
    made: list[TwoSites] = []

    def make(*, extra_b: str = ALLOW_A, query_timeout_s: int | None = None) -> TwoSites:
        nodes = [
            LocalNode(
                name="PACS", ae_title=PACS_AE, host="127.0.0.1", port=archive.pacs.dicom_port
            ),
            LocalNode(name="DOWN", ae_title="NOBODY", host="127.0.0.1", port=free_port()),
        ]
        two = make_two_sites(
            tmp_path,
            broker=rabbitmq_node,
            vhost=vhost,
            routes=[Route(ROUTE, "PACS"), Route(ROUTE_DOWN, "DOWN")],
            nodes_b=nodes,
            extra_b=extra_b,
        )
        if query_timeout_s is not None:
            text = two.config_a.read_text(encoding="utf-8")
            text = re.sub(r"^timeout_s = 30$", f"timeout_s = {query_timeout_s}", text, flags=re.M)
            two.config_a.write_text(text, encoding="utf-8")
        made.append(two)
        return two

    yield make
    for two in made:
        delete_users(management, two)


async def find(
    two: TwoSites,
    tmp_path: Path,
    name: str,
    root: str,
    level: str,
    *,
    charset: str | None = None,
    via_relay: bool = True,
    archive: Archive | None = None,
    extra: tuple[str, ...] = (),
    **keys: Any,
) -> FindResult:
    query = query_file(tmp_path / "queries" / f"{name}.dcm", level, charset, **keys)
    if via_relay:
        port, called = two.port_a, ROUTE
    else:
        assert archive is not None
        port, called = archive.pacs.dicom_port, PACS_AE
    where = "relay" if via_relay else "direct"
    return await asyncio.to_thread(
        findscu,
        port=port,
        called_ae=called,
        root=root,
        query=query,
        outdir=tmp_path / "responses" / where / name,
        extra=extra,
    )


async def test_queries_through_the_relay_match_direct_queries_at_every_level(
    sites: Callable[..., TwoSites], archive: Archive, tmp_path: Path
) -> None:
    """Both roots, every level, wildcards, date ranges, non-ASCII names in ISO_IR 100 and
    ISO_IR 192: the relayed matches equal Orthanc's own, with Retrieve AE Title = route."""
    two = sites()
    mueller_study = archive.studies[MUELLER.patient_id][0]
    mueller_series = archive.series[MUELLER.patient_id][0]
    yamada_study = archive.studies[YAMADA.patient_id][0]
    queries: list[tuple[str, str, str, str | None, dict[str, Any]]] = [
        (
            "pat-latin1",
            "patient",
            "PATIENT",
            "ISO_IR 100",
            {"PatientName": "Müller*", "PatientID": "", "PatientBirthDate": ""},
        ),
        (
            "pat-utf8",
            "patient",
            "PATIENT",
            "ISO_IR 192",
            {"PatientName": "Yamada*", "PatientID": "", "PatientSex": ""},
        ),
        (
            "pat-studies",
            "patient",
            "STUDY",
            None,
            {"PatientID": "P-300", "StudyInstanceUID": "", "StudyDate": "", "StudyDescription": ""},
        ),
        (
            "pat-series",
            "patient",
            "SERIES",
            None,
            {
                "PatientID": "P-200",
                "StudyInstanceUID": yamada_study,
                "SeriesInstanceUID": "",
                "Modality": "",
            },
        ),
        (
            "pat-images",
            "patient",
            "IMAGE",
            None,
            {
                "PatientID": "P-100",
                "StudyInstanceUID": mueller_study,
                "SeriesInstanceUID": mueller_series,
                "SOPInstanceUID": "",
                "InstanceNumber": "",
            },
        ),
        (
            "study-range",
            "study",
            "STUDY",
            None,
            {
                "StudyDate": "20240101-20241231",
                "PatientName": "",
                "PatientID": "",
                "StudyInstanceUID": "",
                "AccessionNumber": "",
            },
        ),
        (
            "study-open-range",
            "study",
            "STUDY",
            None,
            {"StudyDate": "-20231231", "PatientID": "", "StudyInstanceUID": ""},
        ),
        (
            "study-name",
            "study",
            "STUDY",
            "ISO_IR 100",
            {"PatientName": "Müller^Jürgen", "StudyInstanceUID": "", "StudyDate": ""},
        ),
        (
            "study-wildcard-id",
            "study",
            "STUDY",
            None,
            {"PatientID": "P-?00", "StudyInstanceUID": "", "ModalitiesInStudy": ""},
        ),
        (
            "study-series",
            "study",
            "SERIES",
            None,
            {
                "StudyInstanceUID": mueller_study,
                "SeriesInstanceUID": "",
                "Modality": "",
                "SeriesNumber": "",
            },
        ),
        (
            "study-images",
            "study",
            "IMAGE",
            None,
            {
                "StudyInstanceUID": mueller_study,
                "SeriesInstanceUID": mueller_series,
                "SOPInstanceUID": "",
                "InstanceNumber": "",
            },
        ),
    ]
    async with running_gateways(two.config_a, two.config_b):
        for name, root, level, charset, keys in queries:
            relayed = await find(two, tmp_path, name, root, level, charset=charset, **keys)
            direct = await find(
                two,
                tmp_path,
                name,
                root,
                level,
                charset=charset,
                via_relay=False,
                archive=archive,
                **keys,
            )
            assert direct.responses, f"{name}: Orthanc found nothing; the test data is wrong"
            assert relayed.returncode == 0, f"{name}: {relayed.output}"
            assert answers(relayed) == answers(direct), name
            assert {str(r[RETRIEVE_AE_TITLE].value) for r in relayed.responses} == {ROUTE}, name
            if name in ("pat-latin1", "pat-utf8"):
                # Non-ASCII names arrive whole (not only equal to a mangled direct answer).
                expected = MUELLER if name == "pat-latin1" else YAMADA
                assert [str(r.PatientName) for r in relayed.responses] == [expected.name]


async def test_first_match_arrives_before_the_last_is_found(
    sites: Callable[..., TwoSites], archive: Archive, tmp_path: Path
) -> None:
    """Matches are streamed: B publishes each as Orthanc returns it, and A passes it on at
    once, so A's requester session receives responses while B's query is still running."""
    two = sites()
    study = archive.studies[MANY.patient_id][0]
    async with running_gateways(two.config_a, two.config_b) as (_gateway_a, gateway_b):
        task = asyncio.create_task(
            find(
                two,
                tmp_path,
                "many",
                "study",
                "IMAGE",
                StudyInstanceUID=study,
                SOPInstanceUID="",
            )
        )
        # While the query runs at B, A has passed responses on already.
        await asyncio.to_thread(
            wait_for,
            lambda: gateway_b.responder.running == 1 and gateway_b.responder.responses_sent > 1,
            timeout_s=60,
            what="B to be streaming matches",
        )
        result = await task
    assert len(result.responses) == BIG_STUDY_SIZE
    assert gateway_b.responder.responses_sent == BIG_STUDY_SIZE + 1


async def test_find_is_answered_while_a_large_instance_is_still_arriving_on_the_route(
    sites: Callable[..., TwoSites], archive: Archive, tmp_path: Path
) -> None:
    """Control apart from bulk: a 128 MiB instance is sent to B while B is down, so all its
    fragments wait on B's queue; B starts and a C-FIND is sent at once. The C-FIND is
    answered, with the matches a direct query gets, while B is still taking those
    fragments in: queries travel on their own queue and connection, not behind bulk."""
    two = sites()
    big = tmp_path / "big.dcm"
    big_multiframe(big, frames=BIG_FRAMES)
    async with running_gateways(two.config_a) as (gateway_a,):
        # To B's node that is down: the instance is never delivered during the test.
        sent = await asyncio.to_thread(dcmtk_storescu, two.port_a, ROUTE_DOWN, big)
        assert sent.returncode == 0, sent.stderr
        await asyncio.to_thread(
            wait_for,
            lambda: [entry.published for entry in gateway_a.outbox.entries()] == [True],
            timeout_s=300,
            what="the large instance to be published",
        )
        (entry,) = gateway_a.outbox.entries()
        transfer_id, fragment_count = entry.transfer.transfer_id, entry.transfer.fragment_count
        big.unlink()
        async with running_gateways(two.config_b) as (gateway_b,):
            relay = await find(
                two,
                tmp_path,
                "busy",
                "study",
                "STUDY",
                PatientID=SMITH.patient_id,
                StudyInstanceUID="",
                StudyDate="",
            )
            # What B had of the large instance when the find's final answer came.
            spooled = gateway_b.receiver.spool.state(two.site_a, transfer_id).fragments_present
            done = (gateway_b.receiver.done / two.site_a / transfer_id.hex()).exists()
    direct = await find(
        two,
        tmp_path,
        "busy",
        "study",
        "STUDY",
        via_relay=False,
        archive=archive,
        PatientID=SMITH.patient_id,
        StudyInstanceUID="",
        StudyDate="",
    )
    assert relay.final_status == 0x0000, relay.output
    assert answers(relay) == answers(direct)
    assert sum(answers(relay).values()) == len(archive.studies[SMITH.patient_id])
    assert not done
    assert spooled < fragment_count, (spooled, fragment_count)


async def test_c_cancel_stops_the_remote_query(
    sites: Callable[..., TwoSites], archive: Archive, tmp_path: Path
) -> None:
    """findscu --cancel after 5 responses: the final status is Cancel (0xFE00), and B stops
    querying its PACS: it sends far fewer responses than there are matches."""
    two = sites()
    study = archive.studies[MANY.patient_id][0]
    async with running_gateways(two.config_a, two.config_b) as (gateway_a, gateway_b):
        result = await find(
            two,
            tmp_path,
            "cancel",
            "study",
            "IMAGE",
            extra=("--cancel", "5"),
            StudyInstanceUID=study,
            SOPInstanceUID="",
        )
        assert result.final_status == 0xFE00, result.output
        await asyncio.to_thread(
            wait_for,
            lambda: gateway_b.responder.running == 0,
            timeout_s=30,
            what="B's query to stop",
        )
        assert gateway_b.responder.responses_sent < BIG_STUDY_SIZE
        assert gateway_a.requester.open_sessions == 0
    assert 5 <= len(result.responses) < BIG_STUDY_SIZE


async def test_policy_refuses_what_the_responding_site_does_not_allow(
    sites: Callable[..., TwoSites], archive: Archive, tmp_path: Path
) -> None:
    """B allows A C-FIND at PATIENT and STUDY level, with a name or id at PATIENT level:
    PatientName=* at PATIENT level and an IMAGE-level query are refused with 0x0124."""
    two = sites(extra_b=ALLOW_A + 'operations = ["find"]\nlevels = ["PATIENT", "STUDY"]\n')
    async with running_gateways(two.config_a, two.config_b):
        everyone = await find(
            two, tmp_path, "everyone", "patient", "PATIENT", PatientName="*", PatientID=""
        )
        images = await find(
            two,
            tmp_path,
            "images",
            "study",
            "IMAGE",
            StudyInstanceUID=archive.studies[MUELLER.patient_id][0],
            SOPInstanceUID="",
        )
        allowed = await find(
            two, tmp_path, "allowed", "patient", "PATIENT", PatientID="P-300", PatientName=""
        )
        echo = await asyncio.to_thread(echoscu, port=two.port_a, called_ae=ROUTE)
    assert everyone.final_status == 0x0124, everyone.output
    assert not everyone.responses
    assert "PatientName or PatientID required" in everyone.output
    assert images.final_status == 0x0124, images.output
    assert not images.responses
    assert "level IMAGE not allowed" in images.output
    assert allowed.final_status == 0x0000, allowed.output
    assert len(allowed.responses) == 1
    # Deep echo is not among the allowed operations: B refuses, A answers 0x0110.
    assert "Unknown Status: 0x110" in echo.stdout + echo.stderr


async def test_a_site_without_an_entry_is_refused(
    sites: Callable[..., TwoSites], tmp_path: Path
) -> None:
    two = sites(extra_b="")
    async with running_gateways(two.config_a, two.config_b):
        result = await find(
            two,
            tmp_path,
            "nobody",
            "study",
            "STUDY",
            StudyDate="20240101-20241231",
            StudyInstanceUID="",
        )
    assert result.final_status == 0x0124, result.output
    assert not result.responses
    assert "may not query this site" in result.output


async def test_deep_echo_reaches_the_remote_pacs_and_reports_clock_skew(
    sites: Callable[..., TwoSites], tmp_path: Path
) -> None:
    two = sites()
    async with running_gateways(two.config_a, two.config_b) as (gateway_a, _):
        ok = await asyncio.to_thread(echoscu, port=two.port_a, called_ae=ROUTE)
        down = await asyncio.to_thread(echoscu, port=two.port_a, called_ae=ROUTE_DOWN)
    assert "Received Echo Response (Success)" in ok.stdout + ok.stderr
    echo = gateway_a.requester.last_echo[two.site_b]
    assert abs(echo.skew_s) < 2.0
    assert echo.round_trip_s > 0
    assert "Unknown Status: 0x110" in down.stdout + down.stderr


async def test_remote_gateway_down_fails_cleanly_within_the_timeout(
    sites: Callable[..., TwoSites], tmp_path: Path
) -> None:
    """Gateway B not running: C-FIND and deep C-ECHO fail with an Error Comment naming the
    site within [query] timeout_s, and A keeps serving."""
    two = sites(query_timeout_s=3)
    async with running_gateways(two.config_a) as (gateway_a,):
        started = time.monotonic()
        result = await find(
            two,
            tmp_path,
            "silent",
            "study",
            "STUDY",
            StudyDate="20240101-20241231",
            StudyInstanceUID="",
        )
        find_s = time.monotonic() - started
        started = time.monotonic()
        echo = await asyncio.to_thread(echoscu, port=two.port_a, called_ae=ROUTE)
        echo_s = time.monotonic() - started
        assert gateway_a.requester.open_sessions == 0
        local = await asyncio.to_thread(echoscu, port=two.port_a, called_ae="GATEWAY_A")
    assert result.final_status == 0xC000, result.output
    assert f"{two.site_b} did not answer within 3 s" in result.output
    assert "Unknown Status: 0x110" in echo.stdout + echo.stderr
    assert "Received Echo Response (Success)" in local.stdout + local.stderr
    assert find_s < 3 + 10
    assert echo_s < 3 + 10
