"""Test helpers for the DICOM edge: test files with fresh UIDs, DCMTK and pynetdicom peers."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from dicombridge.scp import VERIFICATION_SOP_CLASS, dataset_offset

# A patient name no log line may ever contain.
PHI_MARKER: Final = "Phimarker^Secret"

# pydicom's shipped test files present in the wheel (no download), by transfer syntax.
SHIPPED_FILES: Final = (
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "JPEG2000.dcm",  # JPEG 2000
    "SC_rgb_rle.dcm",  # RLE Lossless
    "rtplan.dcm",  # RT Plan, Implicit VR Little Endian, no pixel data
)

DCMTK_BIN: Final = Path("/usr/bin")


def shipped_file(name: str) -> Path:
    """A pydicom test file that must be present locally (never downloaded)."""
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    return Path(str(found))


def fresh_copy(name: str, directory: Path) -> Path:
    """A copy of a shipped file with fresh SOP Instance UID and the PHI marker as name."""
    dataset = pydicom.dcmread(shipped_file(name))
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.PatientName = PHI_MARKER
    path = directory / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information."""
    return path.read_bytes()[dataset_offset(path) :]


def read_source(source: Path | bytes) -> bytes:
    """A received instance's Part 10 file, whether it stayed in memory or went to disk."""
    return source if isinstance(source, bytes) else source.read_bytes()


def crafted_file(
    directory: Path,
    *,
    dataset: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> Path:
    """A Part 10 file whose meta claims the given UIDs, followed by ``dataset`` verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = generate_uid()
    encoded_meta = DicomBytesIO()
    write_file_meta_info(encoded_meta, meta)
    path = directory / f"crafted-{generate_uid()}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + encoded_meta.getvalue() + dataset)
    return path


def encode_explicit_le(dataset: Dataset) -> bytes:
    """A data set encoded Explicit VR Little Endian, without file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def run_dcmtk(tool: str, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool from /usr/bin (never pynetdicom's namesakes) with TCP_NODELAY=1."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [str(DCMTK_BIN / tool), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )


def pynetdicom_store(
    port: int, called_ae_title: str, path: Path, *, calling_ae_title: str = "TESTSCU"
) -> Any:
    """C-STORE the file's bytes after its meta verbatim (chunked send); return the status.

    The command's Affected SOP Class/Instance UIDs come from the file meta, so a file from
    ``crafted_file`` lets a test send a command that disagrees with its data set.
    """
    meta = read_file_meta_info(path)
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae_title)
        if not assoc.is_established:
            raise ConnectionError("association not established")
        try:
            return assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def associate_rq_bytes(called_ae_title: str, *, maximum_length: int = 16384) -> bytes:
    """An encoded A-ASSOCIATE-RQ PDU proposing Verification (for raw-socket tests)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAWSCU"
    primitive.called_ae_title = called_ae_title
    length = MaximumLengthNotification()
    length.maximum_length_received = maximum_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = generate_uid()
    primitive.user_information = [length, implementation]
    context = build_context(VERIFICATION_SOP_CLASS)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def recv_until_closed(sock: socket.socket, *, timeout_s: float) -> bytes:
    """Read until the peer closes (or resets) the connection; raise TimeoutError if not."""
    sock.settimeout(timeout_s)
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


def recv_exactly(sock: socket.socket, count: int, *, timeout_s: float) -> bytes:
    """Read exactly ``count`` bytes or raise."""
    sock.settimeout(timeout_s)
    received = bytearray()
    while len(received) < count:
        chunk = sock.recv(count - len(received))
        if not chunk:
            raise ConnectionError(f"closed after {len(received)} of {count} bytes")
        received += chunk
    return bytes(received)
