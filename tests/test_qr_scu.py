"""QuerySCU against a real Orthanc holding generated studies, with DCMTK's storescp and
a pynetdicom Storage SCP as C-MOVE destinations, and a pynetdicom Query/Retrieve SCP
where a test needs to control the node's timing or see the wire bytes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from dicombridge.config import LocalNode
from dicombridge.orthanc import DicomModality, OrthancServer, OrthancSettings, free_port
from dicombridge.qr_scu import (
    STATUS_BAD_IDENTIFIER,
    STATUS_CANCEL,
    STATUS_NO_ASSOCIATION,
    STATUS_REJECTED,
    Counts,
    Model,
    QueryOutcome,
    QuerySCU,
)
from dicombridge.scu import StoreSCU
from tests.dicomkit import encode_explicit_le
from tests.pacskit import StoreSCPNode, set_default_encoding, wait_for

pytestmark = pytest.mark.integration

GATEWAY_AE = "QR_GATEWAY"  # calls the PACS, and is the C-MOVE destination (storescp)
OBSERVER_AE = "QR_OBSERVER"  # a pynetdicom Storage SCP that records the C-STOREs
PACS_AE = "QR_PACS"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
VERIFICATION = "1.2.840.10008.1.1"
LATIN1_NAME = "Müller^Jürgen"
UTF8_NAME = "Иванов^Пётр"
LARGE_SERIES = 240


# --- generated studies ---------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    patient_id: str
    patient_name: str
    charset: str
    study_uid: str
    study_date: str
    series: dict[str, list[str]]  # series UID -> SOP instance UIDs

    @property
    def instances(self) -> list[str]:
        return [uid for uids in self.series.values() for uid in uids]


def write_study(
    directory: Path,
    *,
    patient_id: str,
    patient_name: str,
    charset: str,
    study_date: str,
    series_sizes: tuple[int, ...],
) -> tuple[Study, list[Path]]:
    """Secondary Capture instances (4x4 pixels) of one new study, Part 10 files."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    series: dict[str, list[str]] = {}
    paths = []
    for series_number, size in enumerate(series_sizes, start=1):
        series_uid = generate_uid()
        series[series_uid] = []
        for number in range(1, size + 1):
            ds = Dataset()
            ds.SpecificCharacterSet = charset
            ds.SOPClassUID = SECONDARY_CAPTURE
            ds.SOPInstanceUID = sop_uid = generate_uid()
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = "19700101"
            ds.PatientSex = "O"
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = study_date
            ds.StudyTime = "101010"
            ds.StudyID = "1"
            ds.AccessionNumber = f"ACC{patient_id}"
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = series_number
            ds.Modality = "OT"
            ds.ConversionType = "WSD"
            ds.InstanceNumber = number
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = 4
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            ds.PixelData = bytes(range(16))
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = directory / f"{sop_uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
            series[series_uid].append(sop_uid)
    study = Study(patient_id, patient_name, charset, study_uid, study_date, series)
    return study, paths


@dataclass
class Holdings:
    """What the PACS holds, by name."""

    latin1: Study  # 2 series x 2 instances, 2020-03-15
    utf8_a: Study  # 1 series x 3 instances, 2021-06-10
    utf8_b: Study  # same patient as utf8_a, 1 instance, 2019-01-01
    large: Study  # one series of LARGE_SERIES instances, 2022-01-01

    @property
    def studies(self) -> list[Study]:
        return [self.latin1, self.utf8_a, self.utf8_b, self.large]


# --- a pynetdicom Storage SCP that records what it receives ---------------------------


@dataclass
class Observer:
    """Records each C-STORE: (SOP Instance UID, Move Originator AE title, Message ID)."""

    port: int
    stored: list[tuple[str, str | None, int | None]] = field(default_factory=list)
    server: ThreadedAssociationServer | None = None

    def handle_store(self, event: Any) -> int:
        request = event.request
        originator = request.MoveOriginatorApplicationEntityTitle
        self.stored.append(
            (
                str(request.AffectedSOPInstanceUID),
                None if originator is None else str(originator).strip(),
                request.MoveOriginatorMessageID,
            )
        )
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title=OBSERVER_AE)
        ae.add_supported_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        ae.add_supported_context(VERIFICATION)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handle_store)],
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCPNode]:
    """DCMTK's storescp answering as the gateway: the C-MOVE destination."""
    node = StoreSCPNode.start(tmp_path_factory.mktemp("storescp"), ae_title=GATEWAY_AE)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def observer() -> Iterator[Observer]:
    node = Observer(port=free_port())
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, storescp: StoreSCPNode, observer: Observer
) -> Iterator[OrthancServer]:
    """Orthanc knowing the gateway (it may C-FIND and C-MOVE, and receives the C-MOVE's
    sub-operations) and the observer."""
    with pytest.MonkeyPatch.context() as patch:
        # DCMTK inside Orthanc reads TCP_NODELAY: without it each C-STORE and C-FIND
        # response waits ~40 ms for a delayed ACK (Nagle).
        patch.setenv("TCP_NODELAY", "1")
        server = OrthancServer.start(
            tmp_path_factory.mktemp("pacs"),
            OrthancSettings(
                ae_title=PACS_AE,
                modalities={
                    "gateway": DicomModality(GATEWAY_AE, "127.0.0.1", storescp.port),
                    "observer": DicomModality(OBSERVER_AE, "127.0.0.1", observer.port),
                },
            ),
        )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def holdings(pacs: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Holdings:
    """The generated studies, stored in the PACS."""
    root = tmp_path_factory.mktemp("studies")
    with StoreSCU(node_of(pacs.dicom_port), calling_ae_title=GATEWAY_AE) as scu:

        def stored(name: str, **kwargs: Any) -> Study:
            study, paths = write_study(root / name, **kwargs)
            for path in paths:
                assert scu.store(path).is_stored
            return study

        return Holdings(
            latin1=stored(
                "latin1",
                patient_id="QR1",
                patient_name=LATIN1_NAME,
                charset="ISO_IR 100",
                study_date="20200315",
                series_sizes=(2, 2),
            ),
            utf8_a=stored(
                "utf8a",
                patient_id="QR2",
                patient_name=UTF8_NAME,
                charset="ISO_IR 192",
                study_date="20210610",
                series_sizes=(3,),
            ),
            utf8_b=stored(
                "utf8b",
                patient_id="QR2",
                patient_name=UTF8_NAME,
                charset="ISO_IR 192",
                study_date="20190101",
                series_sizes=(1,),
            ),
            large=stored(
                "large",
                patient_id="QR3",
                patient_name="Large^Series",
                charset="ISO_IR 100",
                study_date="20220101",
                series_sizes=(LARGE_SERIES,),
            ),
        )


def node_of(port: int, ae_title: str = PACS_AE) -> LocalNode:
    return LocalNode(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


def query(level: str, charset: str | None = None, **keys: str) -> bytes:
    """A C-FIND/C-MOVE Identifier, Explicit VR Little Endian."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return encode_explicit_le(ds)


def decoded(identifier: bytes) -> Dataset:
    dataset: Dataset = read_dataset(
        BytesIO(identifier), is_implicit_VR=False, is_little_endian=True
    )
    return dataset


def find_all(
    scu: QuerySCU, model: Model, identifier: bytes, **kwargs: Any
) -> tuple[QueryOutcome, list[bytes]]:
    matches: list[bytes] = []
    outcome = scu.find(model, identifier, on_match=matches.append, **kwargs)
    return outcome, matches


def no_match(match: bytes) -> None:
    raise AssertionError("no match expected")


def values(matches: list[bytes], keyword: str) -> set[str]:
    return {str(decoded(match).get(keyword)) for match in matches}


@pytest.fixture
def scu(pacs: OrthancServer, holdings: Holdings) -> QuerySCU:
    return QuerySCU(node_of(pacs.dicom_port), calling_ae_title=GATEWAY_AE, dimse_timeout_s=30)


# --- echo, and a PACS that is not there ----------------------------------------------


def test_echo_answers(scu: QuerySCU) -> None:
    """C-ECHO to Orthanc: its Success status, from the peer."""
    assert scu.echo() == QueryOutcome(status=0x0000, error_comment=None, from_peer=True)


def test_pacs_down_is_a_stand_in_status_at_once() -> None:
    """Nothing listens: echo, find and move return 0xA700 from_peer False, no raise."""
    scu = QuerySCU(node_of(free_port()), calling_ae_title=GATEWAY_AE, connect_timeout_s=5)
    started = time.monotonic()
    outcomes = [
        scu.echo(),
        scu.find(Model.STUDY, query("STUDY", StudyInstanceUID=""), on_match=no_match),
        scu.move(Model.STUDY, query("STUDY", StudyInstanceUID="1.2"), destination_ae=GATEWAY_AE),
    ]
    assert time.monotonic() - started < 5
    for outcome in outcomes:
        assert outcome.status == STATUS_NO_ASSOCIATION
        assert not outcome.from_peer
        assert outcome.error_comment is not None
        assert len(outcome.error_comment) <= 64


def test_silent_pacs_times_out_within_connect_timeout() -> None:
    """A port that accepts TCP but never answers the A-ASSOCIATE-RQ: 0xA700 after
    connect_timeout_s, not after the DIMSE timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        scu = QuerySCU(
            node_of(port), calling_ae_title=GATEWAY_AE, connect_timeout_s=1, dimse_timeout_s=60
        )
        started = time.monotonic()
        outcome = scu.find(Model.STUDY, query("STUDY", StudyInstanceUID=""), on_match=no_match)
        elapsed = time.monotonic() - started
    assert outcome.status == STATUS_NO_ASSOCIATION
    assert not outcome.from_peer
    assert 0.9 <= elapsed < 5


def test_wrong_called_ae_title_is_a_permanent_rejection(pacs: OrthancServer) -> None:
    """Orthanc checks the called AE title: 0x0124, from_peer False."""
    scu = QuerySCU(node_of(pacs.dicom_port, "NOT_THE_PACS"), calling_ae_title=GATEWAY_AE)
    outcome = scu.echo()
    assert outcome.status == STATUS_REJECTED
    assert not outcome.from_peer


def test_malformed_identifier_is_refused_before_any_association() -> None:
    """Bytes that are not an Explicit VR Little Endian data set: 0xA900, from_peer False."""
    scu = QuerySCU(node_of(free_port()), calling_ae_title=GATEWAY_AE)
    truncated = query("STUDY", StudyInstanceUID="1.2.3")[:-2]
    outcome = scu.find(Model.STUDY, truncated, on_match=no_match)
    assert outcome.status == STATUS_BAD_IDENTIFIER
    assert not outcome.from_peer


# --- C-FIND against Orthanc --------------------------------------------------------------


LevelCase = Callable[[Holdings], tuple[Model, bytes, str, set[str]]]
LEVEL_CASES: dict[str, LevelCase] = {
    "patient root, PATIENT, wildcard": lambda h: (
        Model.PATIENT,
        query("PATIENT", PatientID="QR*", PatientName=""),
        "PatientID",
        {"QR1", "QR2", "QR3"},
    ),
    "patient root, STUDY": lambda h: (
        Model.PATIENT,
        query("STUDY", PatientID="QR2", StudyInstanceUID=""),
        "StudyInstanceUID",
        {h.utf8_a.study_uid, h.utf8_b.study_uid},
    ),
    "patient root, SERIES": lambda h: (
        Model.PATIENT,
        query("SERIES", PatientID="QR1", StudyInstanceUID=h.latin1.study_uid, SeriesInstanceUID=""),
        "SeriesInstanceUID",
        set(h.latin1.series),
    ),
    "patient root, IMAGE": lambda h: (
        Model.PATIENT,
        query(
            "IMAGE",
            PatientID="QR2",
            StudyInstanceUID=h.utf8_a.study_uid,
            SeriesInstanceUID=next(iter(h.utf8_a.series)),
            SOPInstanceUID="",
        ),
        "SOPInstanceUID",
        set(h.utf8_a.instances),
    ),
    "study root, STUDY, date range": lambda h: (
        Model.STUDY,
        query("STUDY", StudyDate="20200101-20211231", StudyInstanceUID=""),
        "StudyInstanceUID",
        {h.latin1.study_uid, h.utf8_a.study_uid},
    ),
    "study root, STUDY, open date range": lambda h: (
        Model.STUDY,
        query("STUDY", StudyDate="-20191231", StudyInstanceUID=""),
        "StudyInstanceUID",
        {h.utf8_b.study_uid},
    ),
    "study root, STUDY, wildcard name": lambda h: (
        Model.STUDY,
        query("STUDY", PatientName="L?rge*", StudyInstanceUID=""),
        "StudyInstanceUID",
        {h.large.study_uid},
    ),
    "study root, SERIES": lambda h: (
        Model.STUDY,
        query("SERIES", StudyInstanceUID=h.latin1.study_uid, SeriesInstanceUID=""),
        "SeriesInstanceUID",
        set(h.latin1.series),
    ),
    "study root, IMAGE": lambda h: (
        Model.STUDY,
        query(
            "IMAGE",
            StudyInstanceUID=h.latin1.study_uid,
            SeriesInstanceUID=list(h.latin1.series)[1],
            SOPInstanceUID="",
        ),
        "SOPInstanceUID",
        set(list(h.latin1.series.values())[1]),
    ),
    "study root, IMAGE, large series": lambda h: (
        Model.STUDY,
        query("IMAGE", StudyInstanceUID=h.large.study_uid, SOPInstanceUID=""),
        "SOPInstanceUID",
        set(h.large.instances),
    ),
}


@pytest.mark.parametrize("case", LEVEL_CASES.values(), ids=LEVEL_CASES.keys())
def test_find_matches_what_the_pacs_holds(
    scu: QuerySCU, holdings: Holdings, case: LevelCase
) -> None:
    """Each level in both roots: the matches are exactly the stored entities, once each."""
    model, identifier, keyword, expected = case(holdings)
    outcome, matches = find_all(scu, model, identifier)
    assert outcome == QueryOutcome(status=0x0000, error_comment=None, from_peer=True)
    assert values(matches, keyword) == expected
    assert len(matches) == len(expected)


@dataclass(frozen=True)
class CharsetCase:
    default_encoding: str  # Orthanc's, the character set of its answers
    charset: str
    name: str
    codec: str
    pattern: str
    patient_id: str
    studies: int


CHARSET_CASES = [
    CharsetCase("Latin1", "ISO_IR 100", LATIN1_NAME, "latin-1", "Müller*", "QR1", 1),
    CharsetCase("Utf8", "ISO_IR 192", UTF8_NAME, "utf-8", "Иванов*", "QR2", 2),
]


@pytest.mark.parametrize("case", CHARSET_CASES, ids=[case.charset for case in CHARSET_CASES])
def test_non_ascii_names_round_trip(scu: QuerySCU, pacs: OrthancServer, case: CharsetCase) -> None:
    """A name matched in its character set comes back with its Specific Character Set
    and the very bytes of that encoding, and decodes to the stored name."""
    set_default_encoding(pacs, case.default_encoding)
    try:
        outcome, matches = find_all(
            scu,
            Model.STUDY,
            query(
                "STUDY", case.charset, PatientName=case.pattern, PatientID="", StudyInstanceUID=""
            ),
        )
    finally:
        set_default_encoding(pacs, "Latin1")
    assert outcome.status == 0x0000
    assert len(matches) == case.studies
    for match in matches:
        dataset = decoded(match)
        assert dataset.get_item("PatientName").value.rstrip(b" ") == case.name.encode(case.codec)
        assert dataset.SpecificCharacterSet == case.charset
        assert dataset.PatientName == case.name
        assert dataset.PatientID == case.patient_id


def test_unknown_caller_gets_no_answer(pacs: OrthancServer, holdings: Holdings) -> None:
    """Orthanc answers a C-FIND or C-MOVE only from an AE title in DicomModalities (no
    DicomAlwaysAllowFind/Move): from any other it aborts, a stand-in status here."""
    stranger = QuerySCU(node_of(pacs.dicom_port), calling_ae_title="STRANGER")
    assert stranger.echo().status == 0x0000  # DicomAlwaysAllowEcho
    outcome, matches = find_all(stranger, Model.STUDY, query("STUDY", StudyInstanceUID=""))
    assert (outcome.status, outcome.from_peer, matches) == (STATUS_NO_ASSOCIATION, False, [])
    outcome = stranger.move(
        Model.STUDY,
        query("STUDY", StudyInstanceUID=holdings.latin1.study_uid),
        destination_ae=GATEWAY_AE,
    )
    assert (outcome.status, outcome.from_peer) == (STATUS_NO_ASSOCIATION, False)


# --- cancel and max_matches against Orthanc ----------------------------------------------


def large_image_query(holdings: Holdings) -> bytes:
    return query("IMAGE", StudyInstanceUID=holdings.large.study_uid, SOPInstanceUID="")


def test_cancel_stops_a_large_find(scu: QuerySCU, holdings: Holdings) -> None:
    """Cancelled from on_match after the 5th of 240 matches: no match after that, and
    Cancel. (Orthanc has sent all 240 before the C-CANCEL reaches it, so the status is
    our stand-in: never Success for an incomplete result.)"""
    cancelled = threading.Event()
    matches: list[bytes] = []

    def on_match(match: bytes) -> None:
        matches.append(match)
        if len(matches) == 5:
            cancelled.set()

    outcome = scu.find(
        Model.STUDY, large_image_query(holdings), on_match=on_match, cancelled=cancelled
    )
    assert outcome.status == STATUS_CANCEL
    assert len(matches) == 5


def test_max_matches_caps_a_large_find(scu: QuerySCU, holdings: Holdings) -> None:
    """max_matches=10 of 240: exactly 10 delivered, Cancel, "more than 10 matches"."""
    outcome, matches = find_all(scu, Model.STUDY, large_image_query(holdings), max_matches=10)
    assert outcome.status == STATUS_CANCEL
    assert outcome.error_comment == "more than 10 matches"
    assert len(matches) == 10
    assert len(values(matches, "SOPInstanceUID")) == 10


def test_max_matches_not_reached_is_success(scu: QuerySCU, holdings: Holdings) -> None:
    """As many matches as the cap: the result is complete, Orthanc's Success."""
    outcome, matches = find_all(
        scu,
        Model.STUDY,
        query("SERIES", StudyInstanceUID=holdings.latin1.study_uid, SeriesInstanceUID=""),
        max_matches=2,
    )
    assert outcome == QueryOutcome(status=0x0000, error_comment=None, from_peer=True)
    assert len(matches) == 2


# --- C-MOVE against Orthanc ----------------------------------------------------------------


def test_move_study_to_the_gateway(
    scu: QuerySCU, holdings: Holdings, storescp: StoreSCPNode
) -> None:
    """C-MOVE to the caller's own AE title (DCMTK storescp here): every instance arrives,
    the final counts say so, and the pending responses' counts were reported."""
    progress: list[Counts] = []
    outcome = scu.move(
        Model.STUDY,
        query("STUDY", StudyInstanceUID=holdings.latin1.study_uid),
        destination_ae=GATEWAY_AE,
        on_progress=progress.append,
    )
    assert outcome.status == 0x0000
    assert outcome.from_peer
    assert outcome.counts is not None
    assert (outcome.counts.completed, outcome.counts.failed, outcome.counts.warning) == (4, 0, 0)
    assert outcome.failed_sop_instance_uids == ()
    for uid in holdings.latin1.instances:
        storescp.wait_stored(uid)
    assert [count.remaining for count in progress] == [3, 2, 1]
    assert [count.completed for count in progress] == [1, 2, 3]


def test_move_carries_the_message_id_to_the_sub_operations(
    scu: QuerySCU, holdings: Holdings, observer: Observer
) -> None:
    """Patient Root, PATIENT level: Orthanc's C-STOREs carry the caller's AE title and
    the C-MOVE's Message ID as Move Originator (PS3.7 9.1.1.1)."""
    outcome = scu.move(
        Model.PATIENT,
        query("PATIENT", PatientID="QR2"),
        destination_ae=OBSERVER_AE,
        message_id=4321,
    )
    assert outcome.status == 0x0000
    assert outcome.counts is not None
    assert outcome.counts.completed == 4
    expected = set(holdings.utf8_a.instances + holdings.utf8_b.instances)
    stored = {entry for entry in observer.stored if entry[0] in expected}
    assert stored == {(uid, GATEWAY_AE, 4321) for uid in expected}


def test_move_to_unknown_destination_passes_orthancs_status(
    scu: QuerySCU, holdings: Holdings
) -> None:
    """A Move Destination Orthanc does not know: its own failure status (0xC000 in
    Orthanc 1.10, not 0xA801), from the peer."""
    outcome = scu.move(
        Model.STUDY,
        query("STUDY", StudyInstanceUID=holdings.latin1.study_uid),
        destination_ae="NOWHERE",
    )
    assert outcome.status == 0xC000
    assert outcome.from_peer


def test_cancel_stops_a_move(scu: QuerySCU, holdings: Holdings, observer: Observer) -> None:
    """Cancelled after 5 sub-operations of 240: Orthanc's own Cancel, with counts."""
    cancelled = threading.Event()

    def on_progress(counts: Counts) -> None:
        if counts.completed >= 5:
            cancelled.set()

    outcome = scu.move(
        Model.STUDY,
        query(
            "SERIES",
            StudyInstanceUID=holdings.large.study_uid,
            SeriesInstanceUID=next(iter(holdings.large.series)),
        ),
        destination_ae=OBSERVER_AE,
        on_progress=on_progress,
        cancelled=cancelled,
    )
    assert outcome.status == STATUS_CANCEL
    assert outcome.from_peer
    assert outcome.counts is not None
    assert 5 <= outcome.counts.completed < LARGE_SERIES
    arrived = {entry[0] for entry in observer.stored} & set(holdings.large.instances)
    assert len(arrived) == outcome.counts.completed


# --- C-GET against Orthanc ------------------------------------------------------------


def test_get_receives_on_its_own_association_in_the_syntax_proposed(
    scu: QuerySCU, holdings: Holdings
) -> None:
    """C-GET of a series proposing Secondary Capture in Implicit VR Little Endian only,
    this side as its SCP: Orthanc (which holds them Explicit VR Little Endian) sends every
    instance on the C-GET's own association, in that syntax; the counts say so; the
    file each data set was received into is gone once the handler returned."""
    series_uid, expected = next(iter(holdings.latin1.series.items()))
    received: list[tuple[str, str, bool]] = []
    files: list[str] = []

    def on_c_store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        received.append(
            (
                str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
                event.assoc.is_requestor,
            )
        )
        dataset_file = getattr(request, "_dataset_file", None)
        if dataset_file is not None:
            files.append(dataset_file.name)
        return 0x0000

    progress: list[Counts] = []
    outcome = scu.get(
        Model.STUDY,
        query("SERIES", StudyInstanceUID=holdings.latin1.study_uid, SeriesInstanceUID=series_uid),
        storage=[(SECONDARY_CAPTURE, ImplicitVRLittleEndian)],
        evt_handlers=[(evt.EVT_C_STORE, on_c_store)],
        on_progress=progress.append,
        message_id=77,
    )
    assert outcome.status == 0x0000
    assert outcome.from_peer
    assert outcome.counts is not None
    assert (outcome.counts.completed, outcome.counts.failed) == (len(expected), 0)
    assert sorted(uid for uid, _, _ in received) == sorted(expected)
    assert {syntax for _, syntax, _ in received} == {ImplicitVRLittleEndian}
    assert all(is_requestor for _, _, is_requestor in received)
    completed = [count.completed for count in progress]  # pending responses, as they came
    assert completed, "no pending response reported"
    assert completed == sorted(completed)
    assert completed[-1] <= len(expected)
    assert not any(Path(name).exists() for name in files)


def test_get_counts_what_no_proposed_context_carries_as_failed(
    scu: QuerySCU, holdings: Holdings
) -> None:
    """Storage proposed for a SOP class the study does not hold: Orthanc has no context to
    send on, counts the instance failed and fails the C-GET (Orthanc 1.10 stops at the
    first such instance: 0xC000, one failed); the C-STORE handler is never called."""
    called: list[str] = []

    def on_c_store(event: evt.Event) -> int:
        called.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        return 0x0000

    outcome = scu.get(
        Model.STUDY,
        query("STUDY", StudyInstanceUID=holdings.utf8_a.study_uid),
        storage=[("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)],  # CT Image Storage
        evt_handlers=[(evt.EVT_C_STORE, on_c_store)],
    )
    assert outcome.from_peer
    assert outcome.status & 0xF000 in {0xA000, 0xC000}  # Failure (PS3.4 C.4.3.1.4)
    assert outcome.counts is not None
    assert outcome.counts.completed == 0
    assert outcome.counts.failed >= 1
    assert called == []


def test_bad_message_id_is_a_programming_error(scu: QuerySCU) -> None:
    """A Message ID outside 0..65535 raises before anything is sent."""
    with pytest.raises(ValueError, match="message_id"):
        scu.move(Model.STUDY, query("STUDY"), destination_ae=GATEWAY_AE, message_id=70000)


# --- a scripted Query/Retrieve SCP: wire bytes and timing ---------------------------------

Answer = Callable[[Any], Iterator[tuple[int, Dataset | None]]]


@dataclass
class ScriptedSCP:
    """A pynetdicom Study Root C-FIND SCP whose answers a test scripts (``answer``);
    records each request's Identifier bytes as they came off the wire."""

    transfer_syntaxes: list[str]
    port: int = field(default_factory=free_port)
    answer: Answer | None = None
    requests: list[bytes] = field(default_factory=list)
    cancel_seen: threading.Event = field(default_factory=threading.Event)
    server: ThreadedAssociationServer | None = None

    def handle_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        self.requests.append(event.request.Identifier.getvalue())
        assert self.answer is not None
        yield from self.answer(event)

    def wait_cancel(self, event: Any, *, timeout_s: float = 10) -> bool:
        """Whether the C-CANCEL for ``event``'s request arrives within ``timeout_s``."""
        try:
            wait_for(lambda: bool(event.is_cancelled), timeout_s=timeout_s, what="C-CANCEL")
        except AssertionError:
            return False
        self.cancel_seen.set()
        return True

    def start(self) -> None:
        ae = AE(ae_title="SCRIPTED")
        ae.add_supported_context(STUDY_ROOT_FIND, self.transfer_syntaxes)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, self.handle_find)],
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def scripted() -> Iterator[ScriptedSCP]:
    scp = ScriptedSCP(transfer_syntaxes=[ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    scp.start()
    yield scp
    scp.stop()


def scripted_scu(scp: ScriptedSCP) -> QuerySCU:
    return QuerySCU(node_of(scp.port, "SCRIPTED"), calling_ae_title=GATEWAY_AE, dimse_timeout_s=20)


def numbered_match(number: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SOPInstanceUID = f"1.2.3.{number}"
    return ds


def raw_match(charset: str, name: str, codec: str) -> bytes:
    """A match as a PACS would encode it, with a sequence and a private element."""
    item = Dataset()
    item.CodeValue = "X"
    item.CodingSchemeDesignator = "99TEST"
    item.CodeMeaning = name
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = "STUDY"
    ds.ProcedureCodeSequence = [item]
    ds.PatientName = name
    ds.add_new(0x00290010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00291001, "LO", name)
    ds.StudyInstanceUID = generate_uid()
    encoded = encode_explicit_le(ds)
    assert name.encode(codec) in encoded
    return encoded


def test_identifiers_pass_byte_for_byte(scripted: ScriptedSCP) -> None:
    """Explicit VR Little Endian accepted: the request reaches the node with the very
    bytes given, and each match reaches on_match with the very bytes the node sent
    (ISO_IR 100 and ISO_IR 192 values, a sequence, a private element)."""
    sent = [
        raw_match("ISO_IR 100", LATIN1_NAME, "latin-1"),
        raw_match("ISO_IR 192", UTF8_NAME, "utf-8"),
    ]

    def answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for match in sent:
            yield 0xFF00, decoded(match)
        yield 0x0000, None

    scripted.answer = answer
    identifier = query("STUDY", "ISO_IR 192", PatientName="Иванов*", StudyInstanceUID="")
    outcome, matches = find_all(scripted_scu(scripted), Model.STUDY, identifier)
    assert outcome.status == 0x0000
    assert scripted.requests == [identifier]
    assert matches == sent


def test_implicit_vr_node_keeps_the_values() -> None:
    """A node that accepts Implicit VR Little Endian only: pydicom converts both ways,
    and the values (Specific Character Set, non-ASCII names) survive; a private element
    comes back as UN."""
    scp = ScriptedSCP(transfer_syntaxes=["1.2.840.10008.1.2"])
    sent = raw_match("ISO_IR 192", UTF8_NAME, "utf-8")

    def answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, decoded(sent)
        yield 0x0000, None

    scp.answer = answer
    scp.start()
    try:
        identifier = query("STUDY", "ISO_IR 100", PatientName="Müller*", StudyInstanceUID="")
        outcome, matches = find_all(scripted_scu(scp), Model.STUDY, identifier)
    finally:
        scp.stop()
    assert outcome.status == 0x0000
    request = read_dataset(BytesIO(scp.requests[0]), is_implicit_VR=True, is_little_endian=True)
    assert request.SpecificCharacterSet == "ISO_IR 100"
    assert request.PatientName == "Müller*"
    (match,) = matches
    got, expected = decoded(match), decoded(sent)
    assert got.get_item("PatientName").value.rstrip(b" ") == UTF8_NAME.encode("utf-8")
    assert got.SpecificCharacterSet == "ISO_IR 192"
    assert got.PatientName == UTF8_NAME
    # A private element's VR is unknown to pydicom: UN, its value bytes unchanged.
    assert got[0x00291001].VR == "UN"
    assert got[0x00291001].value.rstrip(b" ") == UTF8_NAME.encode("utf-8")
    assert got.ProcedureCodeSequence[0].CodeMeaning == UTF8_NAME
    assert got.StudyInstanceUID == expected.StudyInstanceUID


def test_matches_stream_before_the_find_ends(scripted: ScriptedSCP) -> None:
    """The node sends its second match only once on_match has had the first: a find
    that collected matches and delivered them at the end could not complete."""
    first_delivered = threading.Event()

    def answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, numbered_match(1)
        if not first_delivered.wait(timeout=10):
            yield 0xC000, None
            return
        yield 0xFF00, numbered_match(2)
        yield 0x0000, None

    def on_match(match: bytes) -> None:
        first_delivered.set()
        matches.append(match)

    scripted.answer = answer
    matches: list[bytes] = []
    outcome = scripted_scu(scripted).find(
        Model.STUDY, query("IMAGE", SOPInstanceUID=""), on_match=on_match
    )
    assert outcome.status == 0x0000
    assert values(matches, "SOPInstanceUID") == {"1.2.3.1", "1.2.3.2"}


def test_cancel_reaches_a_node_that_is_preparing_its_next_response(
    scripted: ScriptedSCP,
) -> None:
    """The node waits for a C-CANCEL before its next response: the cancel is sent while
    the SCU waits (not at the next response), and the node's Cancel is passed through."""
    cancelled = threading.Event()

    def answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for number in range(1, 4):
            yield 0xFF00, numbered_match(number)
        if scripted.wait_cancel(event):
            yield 0xFE00, None
            return
        yield 0x0000, None

    def on_match(match: bytes) -> None:
        matches.append(match)
        if len(matches) == 3:
            cancelled.set()

    scripted.answer = answer
    matches: list[bytes] = []
    outcome = scripted_scu(scripted).find(
        Model.STUDY, query("IMAGE", SOPInstanceUID=""), on_match=on_match, cancelled=cancelled
    )
    assert scripted.cancel_seen.is_set()
    assert outcome == QueryOutcome(status=STATUS_CANCEL, error_comment=None, from_peer=True)
    assert len(matches) == 3


def test_max_matches_cancels_on_the_first_match_beyond(scripted: ScriptedSCP) -> None:
    """max_matches=3, the node honours the C-CANCEL: its Cancel with "more than 3
    matches", from the peer, and exactly 3 matches delivered."""

    def answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for number in range(1, 5):
            yield 0xFF00, numbered_match(number)
        if scripted.wait_cancel(event):
            yield 0xFE00, None
            return
        yield 0x0000, None

    scripted.answer = answer
    outcome, matches = find_all(
        scripted_scu(scripted), Model.STUDY, query("IMAGE", SOPInstanceUID=""), max_matches=3
    )
    assert outcome == QueryOutcome(
        status=STATUS_CANCEL, error_comment="more than 3 matches", from_peer=True
    )
    assert values(matches, "SOPInstanceUID") == {"1.2.3.1", "1.2.3.2", "1.2.3.3"}


def test_on_match_error_aborts_and_propagates(scripted: ScriptedSCP) -> None:
    """A failing on_match is the caller's error: it propagates, the association is
    aborted, and the next find works."""

    def answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, numbered_match(1)
        yield 0x0000, None

    def on_match(match: bytes) -> None:
        raise RuntimeError("caller failed")

    scripted.answer = answer
    scu = scripted_scu(scripted)
    with pytest.raises(RuntimeError, match="caller failed"):
        scu.find(Model.STUDY, query("IMAGE", SOPInstanceUID=""), on_match=on_match)
    outcome, matches = find_all(scu, Model.STUDY, query("IMAGE", SOPInstanceUID=""))
    assert outcome.status == 0x0000
    assert len(matches) == 1


def test_concurrent_calls_share_nothing(scu: QuerySCU, holdings: Holdings) -> None:
    """One QuerySCU used from several threads at once (as asyncio.to_thread does): each
    call has its own association and its own matches."""
    studies = holdings.studies

    def series_of(study: Study) -> set[str]:
        _, matches = find_all(
            scu,
            Model.STUDY,
            query("SERIES", StudyInstanceUID=study.study_uid, SeriesInstanceUID=""),
        )
        return values(matches, "SeriesInstanceUID")

    with ThreadPoolExecutor(max_workers=len(studies)) as pool:
        found = list(pool.map(series_of, studies * 3))
    assert found == [set(study.series) for study in studies * 3]
