"""C-MOVE and C-GET across sites: DCMTK movescu/getscu at site A asks gateway A, under the
route's AE title, to retrieve a study, a series or an instance held by B's Orthanc, to a
DCMTK storescp at A (C-MOVE) or onto getscu's own association (C-GET). Gateway B
C-MOVEs from its Orthanc to itself (C-GET: C-GETs, proposing what getscu accepted) and
relays each instance back; gateway A stores or sends it. The bytes are compared with the
files B's Orthanc got."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicombridge.config import LocalNode
from dicombridge.management import ManagementClient
from dicombridge.orthanc import DicomModality, OrthancServer, OrthancSettings, free_port
from dicombridge.rabbitmq import BrokerNode
from tests.pacskit import (
    DCMTK_BIN,
    StoreSCPNode,
    dataset_bytes,
    dcmtk_env,
    dcmtk_storescu,
    fresh_copy,
    restricted_storescp_args,
    shipped_file,
    wait_for,
)
from tests.qrkit import MR_IMAGE_STORAGE, WORKSTATION_AE, Patient, make_study, store
from tests.relaykit import (
    GATEWAY_B_AE_TITLE,
    Route,
    TwoSites,
    delete_users,
    make_two_sites,
    running_gateways,
)

pytestmark = pytest.mark.integration

PACS_AE: Final = "PACS"
ROUTE: Final = "SITE_B"
DESTINATION_AE: Final = "STORE_A"
RESTRICTED_AE: Final = "CT_ONLY"
PATIENT = Patient("Retrieve^Test", "P-RT", "ISO_IR 100")
ALLOW_A: Final = '[[remote_access]]\nsite = "{site_a}"\n'


@dataclass(frozen=True)
class Archive:
    pacs: OrthancServer
    gateway_b_port: int
    files: dict[str, Path]  # SOP Instance UID -> the file B's Orthanc was given
    study: str
    series: dict[str, list[str]]  # Series Instance UID -> its SOP Instance UIDs
    mixed_study: str  # a CT series and an MR series
    mixed_mr: list[str]  # the MR instances' SOP Instance UIDs
    jpeg_study: str  # one JPEG Baseline instance
    jpeg_uid: str
    j2k_study: str  # one JPEG 2000 Lossless instance (Orthanc 1.10 cannot transcode it)
    j2k_uid: str


def store_shipped(name: str, root: Path, pacs: OrthancServer) -> tuple[str, str]:
    """A pydicom test file, in a study and series of its own, stored in ``pacs`` in its
    own transfer syntax: its (Study, SOP Instance) UIDs."""
    path = fresh_copy(name, root)
    dataset = pydicom.dcmread(path)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.save_as(path, enforce_file_format=True)
    sent = dcmtk_storescu(pacs.dicom_port, PACS_AE, path)
    assert sent.returncode == 0, sent.stderr
    return str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("retrieve")
    gateway_b_port = free_port()
    settings = OrthancSettings(
        ae_title=PACS_AE,
        # Gateway B queries Orthanc and is its C-MOVE destination ("C-MOVE to itself").
        modalities={"gateway-b": DicomModality(GATEWAY_B_AE_TITLE, "127.0.0.1", gateway_b_port)},
    )
    pacs = OrthancServer.start(root / "orthanc", settings)
    try:
        paths = make_study(root / "study", PATIENT, study_date="20240505", series=2, instances=5)
        ct = make_study(root / "mixed", PATIENT, study_date="20240606", series=1, instances=3)
        mixed_study = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
        mr = make_study(
            root / "mixed",
            PATIENT,
            study_date="20240606",
            modality="MR",
            series=1,
            instances=2,
            sop_class_uid=MR_IMAGE_STORAGE,
            study_uid=mixed_study,
        )
        store(paths + ct + mr, port=pacs.dicom_port, called_ae=PACS_AE)
        mixed_mr = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr]
        jpeg_study, jpeg_uid = store_shipped("SC_rgb_jpeg_dcmtk.dcm", root, pacs)
        j2k_study, j2k_uid = store_shipped("MR_small_jp2klossless.dcm", root, pacs)
        files: dict[str, Path] = {}
        series: dict[str, list[str]] = {}
        study = ""
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            files[str(ds.SOPInstanceUID)] = path
            series.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
            study = str(ds.StudyInstanceUID)
        yield Archive(
            pacs,
            gateway_b_port,
            files,
            study,
            series,
            mixed_study,
            mixed_mr,
            jpeg_study,
            jpeg_uid,
            j2k_study,
            j2k_uid,
        )
    finally:
        pacs.stop()


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[StoreSCPNode]:
    # -d: storescp logs each C-STORE request's command set, Move Originator included.
    node = StoreSCPNode.start(
        tmp_path / "store-a", ae_title=DESTINATION_AE, extra_args=("+xa", "-d")
    )
    yield node
    node.stop()


@pytest.fixture
def restricted(tmp_path: Path) -> Iterator[StoreSCPNode]:
    """A destination that refuses every SOP class but CT and SC."""
    node = StoreSCPNode.start(
        tmp_path / "store-r",
        ae_title=RESTRICTED_AE,
        extra_args=tuple(restricted_storescp_args(tmp_path)),
    )
    yield node
    node.stop()


@pytest.fixture(params=[True], ids=["c-get"])
def two(  # noqa: PLR0917 - fixtures
    request: pytest.FixtureRequest,
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    vhost: str,
    management: ManagementClient,
    archive: Archive,
    destination: StoreSCPNode,
    restricted: StoreSCPNode,
) -> Iterator[TwoSites]:
    """Sites A and B; B's PACS node has ``c_get`` as the test's parameter (default true:
    B sends its PACS a C-GET for a C-GET; false: a C-MOVE to B's gateway)."""
    sites = make_two_sites(
        tmp_path,
        broker=rabbitmq_node,
        vhost=vhost,
        routes=[Route(ROUTE, "PACS")],
        nodes_b=[
            LocalNode(
                name="PACS",
                ae_title=PACS_AE,
                host="127.0.0.1",
                port=archive.pacs.dicom_port,
                c_get=request.param,
            )
        ],
        nodes_a=[
            LocalNode(
                name="WORKSTATION", ae_title=DESTINATION_AE, host="127.0.0.1", port=destination.port
            ),
            LocalNode(
                name="CT_ONLY", ae_title=RESTRICTED_AE, host="127.0.0.1", port=restricted.port
            ),
        ],
        port_b=archive.gateway_b_port,
        extra_b=ALLOW_A,
    )
    yield sites
    delete_users(management, sites)


@dataclass(frozen=True)
class MoveResult:
    output: str

    @property
    def statuses(self) -> list[int]:
        return [
            int(code, 16)
            for code in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", self.output)
        ]

    @property
    def final_status(self) -> int | None:
        return self.statuses[-1] if self.statuses else None

    def failed_uids(self) -> list[str]:
        """(0008,0058) of the final response, as movescu prints its data set."""
        found = re.findall(r"\(0008,0058\) UI \[([0-9.\\]+)\]", self.output)
        return found[-1].split("\\") if found else []

    def count(self, what: str) -> int | None:
        found = re.findall(rf"{what} Suboperations\s*:\s*(\d+)", self.output)
        return int(found[-1]) if found else None


def retrieve(tool: str, port: int, level: str, options: tuple[str, ...], **keys: str) -> MoveResult:
    """DCMTK ``movescu`` or ``getscu`` to the route's AE title at gateway A, Study Root."""
    arguments = [f"{DCMTK_BIN}/{tool}", "-d", "-aet", WORKSTATION_AE, "-aec", ROUTE, "-S"]
    arguments += [*options, "-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        arguments += ["-k", f"{keyword}={value}"]
    result = subprocess.run(
        [*arguments, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        errors="replace",
        env=dcmtk_env(),
        timeout=300,
        check=False,
    )
    return MoveResult(result.stdout + result.stderr)


def movescu(
    port: int,
    level: str,
    *,
    move_destination: str = DESTINATION_AE,
    extra: tuple[str, ...] = (),
    **keys: str,
) -> MoveResult:
    return retrieve("movescu", port, level, ("-aem", move_destination, *extra), **keys)


def assert_delivered(destination: StoreSCPNode, archive: Archive, uids: list[str]) -> None:
    for uid in uids:
        stored = destination.stored(uid)
        assert stored is not None, f"{uid} not at the destination"
        assert dataset_bytes(stored) == dataset_bytes(archive.files[uid]), uid


async def test_move_study_series_and_instance_delivers_every_instance_bit_identical(
    two: TwoSites, archive: Archive, destination: StoreSCPNode
) -> None:
    all_uids = list(archive.files)
    first_series, second_series = list(archive.series)
    single = archive.series[second_series][0]
    async with running_gateways(two.config_a, two.config_b) as (gateway_a, gateway_b):
        study = await asyncio.to_thread(
            movescu, two.port_a, "STUDY", StudyInstanceUID=archive.study
        )
        assert study.final_status == 0x0000, study.output
        assert study.count("Completed") == len(all_uids)
        assert study.count("Failed") == 0
        assert 0xFF00 in study.statuses  # pending responses with progress came
        assert_delivered(destination, archive, all_uids)
        series = await asyncio.to_thread(
            movescu,
            two.port_a,
            "SERIES",
            StudyInstanceUID=archive.study,
            SeriesInstanceUID=first_series,
        )
        assert series.final_status == 0x0000, series.output
        assert series.count("Completed") == len(archive.series[first_series])
        instance = await asyncio.to_thread(
            movescu,
            two.port_a,
            "IMAGE",
            StudyInstanceUID=archive.study,
            SeriesInstanceUID=second_series,
            SOPInstanceUID=single,
        )
        assert instance.final_status == 0x0000, instance.output
        assert instance.count("Completed") == 1
        # B's outbox empties as A's stored receipts come back.
        await asyncio.to_thread(
            wait_for,
            lambda: not gateway_b.outbox.entries(),
            timeout_s=30,
            what="B's outbox to empty",
        )
        assert gateway_a.requester.open_sessions == 0
    originators = re.findall(r"Move Originator AE Title\s*:\s*(\S+)", destination.log())
    assert originators == [WORKSTATION_AE] * (len(all_uids) + len(archive.series[first_series]) + 1)


async def test_unknown_move_destination_is_refused_with_a801(
    two: TwoSites, archive: Archive, destination: StoreSCPNode
) -> None:
    async with running_gateways(two.config_a, two.config_b) as (_, gateway_b):
        result = await asyncio.to_thread(
            movescu, two.port_a, "STUDY", move_destination="NOWHERE", StudyInstanceUID=archive.study
        )
        assert gateway_b.responder.responses_sent == 0  # refused at A, B never asked
    assert result.final_status == 0xA801, result.output
    assert destination.associations() == 0


async def test_partial_failure_is_reported_with_the_failed_instances(
    two: TwoSites, archive: Archive, restricted: StoreSCPNode
) -> None:
    """The destination refuses MR: the CT instances are stored, the MR ones fail; the final
    status is 0xB000 with the MR instances in the Failed SOP Instance UID List."""
    async with running_gateways(two.config_a, two.config_b) as (gateway_a, gateway_b):
        result = await asyncio.to_thread(
            movescu,
            two.port_a,
            "STUDY",
            move_destination=RESTRICTED_AE,
            StudyInstanceUID=archive.mixed_study,
        )
        # Failed sub-operations end B's outbox entries too: the retrieve is over.
        await asyncio.to_thread(
            wait_for, lambda: not gateway_b.outbox.entries(), timeout_s=30, what="B's outbox"
        )
        # A sets the refused instances aside, visible and retryable.
        assert gateway_a.deliverer.failed == len(archive.mixed_mr)
    assert result.final_status == 0xB000, result.output
    assert result.count("Completed") == 3
    assert result.count("Failed") == len(archive.mixed_mr)
    assert sorted(result.failed_uids()) == sorted(archive.mixed_mr)


async def test_c_cancel_stops_the_remote_retrieve(
    two: TwoSites, archive: Archive, destination: StoreSCPNode
) -> None:
    async with running_gateways(two.config_a, two.config_b) as (gateway_a, gateway_b):
        result = await asyncio.to_thread(
            movescu, two.port_a, "STUDY", extra=("--cancel", "2"), StudyInstanceUID=archive.study
        )
        await asyncio.to_thread(
            wait_for, lambda: gateway_b.responder.running == 0, timeout_s=30, what="B to stop"
        )
        assert gateway_a.requester.open_sessions == 0
    assert result.final_status == 0xFE00, result.output
    assert (result.count("Completed") or 0) < len(archive.files)


async def test_remote_gateway_down_fails_the_retrieve_within_its_timeout(
    two: TwoSites, archive: Archive, destination: StoreSCPNode
) -> None:
    text = two.config_a.read_text(encoding="utf-8")
    two.config_a.write_text(
        re.sub(r"^retrieve_timeout_s = 600$", "retrieve_timeout_s = 3", text, flags=re.M),
        encoding="utf-8",
    )
    async with running_gateways(two.config_a) as (gateway_a,):
        result = await asyncio.to_thread(
            movescu, two.port_a, "STUDY", StudyInstanceUID=archive.study
        )
        assert gateway_a.requester.open_sessions == 0
    assert result.final_status == 0xA702, result.output
    assert f"{two.site_b} did not answer within 3 s" in result.output
    assert destination.associations() == 0


def getscu(
    port: int, outdir: Path, level: str, *, extra: tuple[str, ...] = (), **keys: str
) -> MoveResult:
    """DCMTK getscu: the instances come back on its own association into ``outdir``."""
    outdir.mkdir(parents=True, exist_ok=True)
    return retrieve("getscu", port, level, ("-od", str(outdir), *extra), **keys)


async def test_get_returns_every_instance_on_the_requesters_association(
    two: TwoSites, archive: Archive, tmp_path: Path
) -> None:
    """C-GET of a study and of one series: every instance comes back on getscu's own
    association with the bytes B's Orthanc was given; counts right; B's outbox empties."""
    first_series = next(iter(archive.series))
    async with running_gateways(two.config_a, two.config_b) as (gateway_a, gateway_b):
        study = await asyncio.to_thread(
            getscu, two.port_a, tmp_path / "study", "STUDY", StudyInstanceUID=archive.study
        )
        series = await asyncio.to_thread(
            getscu,
            two.port_a,
            tmp_path / "series",
            "SERIES",
            StudyInstanceUID=archive.study,
            SeriesInstanceUID=first_series,
        )
        single_uid = archive.series[first_series][0]
        single = await asyncio.to_thread(
            getscu,
            two.port_a,
            tmp_path / "single",
            "IMAGE",
            StudyInstanceUID=archive.study,
            SeriesInstanceUID=first_series,
            SOPInstanceUID=single_uid,
        )
        await asyncio.to_thread(
            wait_for, lambda: not gateway_b.outbox.entries(), timeout_s=30, what="B's outbox"
        )
        assert gateway_a.requester.open_sessions == 0
        assert gateway_a.deliverer.stored == 0  # nothing went to a local node
        # B C-GETs from its PACS; the files its C-STOREs were received into are gone.
        assert gateway_b.responder.gets_sent == 3
        receive_dir = gateway_b.scp_settings().receive_dir
        assert receive_dir is not None
        assert not list(receive_dir.iterdir())
    assert study.final_status == 0x0000, study.output
    assert "Release Failed" not in study.output, study.output
    assert study.count("Completed") == len(archive.files)
    received = {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path
        for path in (tmp_path / "study").iterdir()
    }
    assert set(received) == set(archive.files)
    for uid, path in received.items():
        assert dataset_bytes(path) == dataset_bytes(archive.files[uid]), uid
    assert series.final_status == 0x0000, series.output
    assert series.count("Completed") == len(archive.series[first_series])
    assert single.final_status == 0x0000, single.output
    assert single.count("Completed") == 1
    (got,) = (tmp_path / "single").iterdir()
    assert dataset_bytes(got) == dataset_bytes(archive.files[single_uid])


async def get_jpeg_study(
    two: TwoSites, archive: Archive, outdir: Path
) -> tuple[MoveResult, tuple[int, int]]:
    """getscu (uncompressed syntaxes only) of the JPEG Baseline study, until B's outbox is
    empty; and how many C-GETs and C-MOVEs B sent its PACS for it."""
    async with running_gateways(two.config_a, two.config_b) as (_, gateway_b):
        result = await asyncio.to_thread(
            getscu, two.port_a, outdir, "STUDY", StudyInstanceUID=archive.jpeg_study
        )
        await asyncio.to_thread(
            wait_for, lambda: not gateway_b.outbox.entries(), timeout_s=30, what="B's outbox"
        )
        return result, (gateway_b.responder.gets_sent, gateway_b.responder.moves_sent)


async def test_get_has_b_pacs_transcode_to_a_syntax_the_requester_accepted(
    two: TwoSites, archive: Archive, tmp_path: Path
) -> None:
    """getscu accepts uncompressed transfer syntaxes only; the instance is JPEG Baseline in
    B's Orthanc. B's gateway C-GETs from Orthanc proposing exactly what getscu accepted,
    Orthanc transcodes, and the instance arrives uncompressed: success, not a failure."""
    result, sent = await get_jpeg_study(two, archive, tmp_path / "jpeg")
    assert sent == (1, 0)
    assert result.final_status == 0x0000, result.output
    assert result.count("Completed") == 1
    (got,) = (tmp_path / "jpeg").iterdir()
    dataset = pydicom.dcmread(got)
    assert str(dataset.SOPInstanceUID) == archive.jpeg_uid
    arrived = re.findall(r'TransferSyntax="([^"]+)"', result.output)
    assert arrived, result.output
    assert all("Little Endian" in syntax for syntax in arrived), arrived
    # Native pixel data now, the image's size unchanged.
    original = pydicom.dcmread(shipped_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert (dataset.Rows, dataset.Columns) == (original.Rows, original.Columns)
    frame_bytes = dataset.Rows * dataset.Columns * dataset.SamplesPerPixel
    assert len(dataset.PixelData) == frame_bytes * dataset.BitsAllocated // 8


async def test_get_counts_an_instance_b_pacs_cannot_transcode_as_failed(
    two: TwoSites, archive: Archive, tmp_path: Path
) -> None:
    """The instance is JPEG 2000 in B's Orthanc, which cannot transcode it to the
    uncompressed syntaxes getscu accepts: Orthanc counts it failed, and so does the
    final response getscu gets (a failure status, not success); nothing is written."""
    async with running_gateways(two.config_a, two.config_b) as (_, gateway_b):
        result = await asyncio.to_thread(
            getscu, two.port_a, tmp_path / "j2k", "STUDY", StudyInstanceUID=archive.j2k_study
        )
        assert gateway_b.outbox.entries() == []
    assert result.final_status is not None, result.output
    assert result.final_status not in (0x0000, 0xFE00, 0xFF00), result.output
    assert result.count("Failed") == 1
    assert result.count("Completed") == 0
    assert not list((tmp_path / "j2k").iterdir())


@pytest.mark.parametrize("two", [False], ids=["c-move"], indirect=True)
async def test_get_from_a_pacs_without_c_get_counts_what_no_accepted_context_carries_as_failed(
    two: TwoSites, archive: Archive, tmp_path: Path
) -> None:
    """B's PACS node says ``c_get = false``: B C-MOVEs the JPEG Baseline instance to itself
    and relays it as it is. getscu accepts uncompressed syntaxes only, and A does not
    decompress: the instance is counted failed (0xA702, its UID in the Failed SOP
    Instance UID List), not dropped silently, and B gets its receipt."""
    result, sent = await get_jpeg_study(two, archive, tmp_path / "jpeg")
    assert sent == (0, 1)
    assert result.final_status == 0xA702, result.output
    assert result.count("Failed") == 1
    # getscu does not print the final response's data set; that it has one (the Failed
    # SOP Instance UID List) shows here, its content in the C-MOVE test.
    assert re.search(r"Data Set\s*:\s*present\s*\n\D*DIMSE Status\s*:\s*0xa702", result.output)
    assert not list((tmp_path / "jpeg").iterdir())


@pytest.mark.parametrize("two", [True, False], ids=["c-get", "c-move"], indirect=True)
async def test_get_converts_an_uncompressed_instance_to_the_syntax_the_requester_accepted(
    two: TwoSites, archive: Archive, tmp_path: Path
) -> None:
    """getscu accepts Implicit VR Little Endian only; the instances are Explicit VR Little
    Endian: they are converted (same values), not refused, by B's PACS (C-GET from B) or
    by gateway A (a PACS node with ``c_get = false``)."""
    first_series = next(iter(archive.series))
    expected = archive.series[first_series]
    async with running_gateways(two.config_a, two.config_b):
        result = await asyncio.to_thread(
            getscu,
            two.port_a,
            tmp_path / "implicit",
            "SERIES",
            extra=("+xi",),
            StudyInstanceUID=archive.study,
            SeriesInstanceUID=first_series,
        )
    assert result.final_status == 0x0000, result.output
    assert result.count("Completed") == len(expected)
    # getscu logs the transfer syntax each data set arrived in (it may write files in
    # another one).
    arrived = re.findall(r'TransferSyntax="([^"]+)"', result.output)
    assert arrived.count("Little Endian Implicit") >= len(expected), arrived
    for path in (tmp_path / "implicit").iterdir():
        got = pydicom.dcmread(path)
        original = pydicom.dcmread(archive.files[str(got.SOPInstanceUID)])
        assert got.PixelData == original.PixelData
        assert str(got.PatientName) == str(original.PatientName)
