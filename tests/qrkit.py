"""Query/Retrieve test helpers: small generated studies with chosen patients and character
sets, DCMTK's findscu and echoscu as the workstation, and responses compared as values."""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.pacskit import DCMTK_BIN, dcmtk_env

CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.4"
RETRIEVE_AE_TITLE: Final = 0x00080054
WORKSTATION_AE: Final = "WORKSTATION"


@dataclass(frozen=True)
class Patient:
    name: str
    patient_id: str
    charset: str  # Specific Character Set, e.g. "ISO_IR 100"
    birth_date: str = "19700101"


def make_study(
    directory: Path,
    patient: Patient,
    *,
    study_date: str,
    modality: str = "CT",
    series: int = 2,
    instances: int = 3,
    rows: int = 8,
    sop_class_uid: str = CT_IMAGE_STORAGE,
    study_uid: str | None = None,
) -> list[Path]:
    """A study of ``series`` x ``instances`` tiny images for ``patient`` (CT unless
    ``sop_class_uid`` says otherwise; more series of an existing study with ``study_uid``)."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    paths = []
    for series_number in range(1, series + 1):
        series_uid = generate_uid()
        for number in range(1, instances + 1):
            ds = Dataset()
            ds.SpecificCharacterSet = patient.charset
            ds.SOPClassUID = sop_class_uid
            ds.SOPInstanceUID = generate_uid()
            ds.PatientName = patient.name
            ds.PatientID = patient.patient_id
            ds.PatientBirthDate = patient.birth_date
            ds.PatientSex = "O"
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = study_date
            ds.StudyTime = "101500"
            ds.StudyID = "1"
            ds.AccessionNumber = f"ACC{study_date}"
            ds.StudyDescription = f"{modality} study"
            ds.ReferringPhysicianName = ""
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = series_number
            ds.Modality = modality
            ds.InstanceNumber = number
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = rows
            ds.Columns = rows
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            ds.PixelData = bytes(rows * rows * 2)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            path = directory / f"{modality}{series_number}i{number:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def store(paths: list[Path], *, port: int, called_ae: str) -> None:
    """Store ``paths`` with DCMTK's storescu; fail unless every one was stored."""
    result = subprocess.run(
        [f"{DCMTK_BIN}/storescu", "-aec", called_ae, "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def query_file(path: Path, level: str, charset: str | None = None, **keys: str) -> Path:
    """A findscu query file: Query/Retrieve Level and the keys (empty: return key)."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    return path


@dataclass(frozen=True)
class FindResult:
    returncode: int
    output: str
    responses: list[Dataset]

    @property
    def final_status(self) -> int | None:
        """The final response's status as findscu printed it (DIMSE Status)."""
        for line in reversed(self.output.splitlines()):
            if "DIMSE Status" in line and "0x" in line:
                return int(line.split("0x")[1][:4], 16)
        return None


def findscu(
    *,
    port: int,
    called_ae: str,
    root: str,
    query: Path,
    outdir: Path,
    extra: tuple[str, ...] = (),
    timeout_s: float = 120,
) -> FindResult:
    """DCMTK findscu with ``root`` "patient" (-P) or "study" (-S); responses extracted."""
    outdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            f"{DCMTK_BIN}/findscu",
            "-d",  # debug: prints each response's DIMSE status and Error Comment
            "-aet",
            WORKSTATION_AE,
            "-aec",
            called_ae,
            "-P" if root == "patient" else "-S",
            "-X",
            "-od",
            str(outdir),
            *extra,
            "127.0.0.1",
            str(port),
            str(query),
        ],
        capture_output=True,
        text=True,
        errors="replace",
        env=dcmtk_env(),
        timeout=timeout_s,
        check=False,
    )
    responses: list[Dataset] = [pydicom.dcmread(p) for p in sorted(outdir.glob("rsp*.dcm"))]
    return FindResult(result.returncode, result.stdout + result.stderr, responses)


def values(
    response: Dataset, *, without: tuple[int, ...] = (RETRIEVE_AE_TITLE,)
) -> tuple[str, ...]:
    """A response's elements as (tag, value) strings, for comparing answers."""
    return tuple(
        sorted(f"{elem.tag}={elem.value}" for elem in response if int(elem.tag) not in without)
    )


def answers(result: FindResult) -> Counter[tuple[str, ...]]:
    return Counter(values(response) for response in result.responses)


def echoscu(
    *, port: int, called_ae: str, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            f"{DCMTK_BIN}/echoscu",
            "-v",
            "-aet",
            WORKSTATION_AE,
            "-aec",
            called_ae,
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=timeout_s,
        check=False,
    )
