"""Test helpers for the relay end to end: two sites on the session broker, their gateways
in this process or as separate processes, generated instances, hashing large files."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicombridge import config as site_config
from dicombridge.config import LocalNode
from dicombridge.gateway import Gateway
from dicombridge.identity import LocalSite
from dicombridge.management import ManagementClient
from dicombridge.orthanc import free_port
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import Federation, create_federation
from dicombridge.topology import Limits
from tests.dicomkit import PHI_MARKER, shipped_file

CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_GRAYSCALE_WORD_SC: Final = "1.2.840.10008.5.1.4.1.1.7.3"
GATEWAY_B_AE_TITLE: Final = "GATEWAY_B"
CHUNK_BYTES: Final = 8 * 1024 * 1024


@dataclass(frozen=True)
class Route:
    """A called AE title at site A that reaches ``node`` at site B."""

    ae_title: str
    node: str


@dataclass(frozen=True)
class TwoSites:
    """Sites A and B provisioned in one vhost, A routing to B's local nodes."""

    federation: Federation
    site_a: str
    site_b: str
    port_a: int
    port_b: int

    @property
    def config_a(self) -> Path:
        return self.federation.site_configs[self.site_a]

    @property
    def config_b(self) -> Path:
        return self.federation.site_configs[self.site_b]

    def storage_root(self, site: str) -> Path:
        return site_config.load(self.federation.site_configs[site]).storage.root


def _configure(
    config_path: Path,
    *,
    ae_title: str,
    port: int,
    routes: Sequence[tuple[str, str, str]],
    nodes: Sequence[LocalNode],
) -> None:
    """Like ``sandbox._configure_site``, with any routes and local nodes."""
    text = config_path.read_text(encoding="utf-8")
    text = text.replace('ae_title = "DICOMBRIDGE"', f'ae_title = "{ae_title}"', 1)
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {port}", 1)
    blocks = [
        f'\n[[routes]]\nae_title = "{route_ae}"\nsite = "{site}"\nnode = "{node}"\n'
        for route_ae, site, node in routes
    ]
    blocks += [
        f'\n[[local_nodes]]\nname = "{n.name}"\nae_title = "{n.ae_title}"\n'
        f'host = "{n.host}"\nport = {n.port}\nc_get = {str(n.c_get).lower()}\n'
        for n in nodes
    ]
    blocks.append(f"\n[monitoring]\nport = {free_port()}\n")
    config_path.write_text(text + "".join(blocks), encoding="utf-8")
    site_config.load(config_path)


def make_two_sites(
    root: Path,
    *,
    broker: BrokerNode,
    vhost: str,
    routes: Sequence[Route],
    nodes_b: Sequence[LocalNode],
    limits: Limits | None = None,
    port_b: int | None = None,
    nodes_a: Sequence[LocalNode] = (),
    extra_a: str = "",
    extra_b: str = "",
) -> TwoSites:
    """Provision sites A and B (unique ids: broker users are global), with queue
    ``limits``, and configure them as the sandbox does: A's route AE titles lead to B's
    local nodes. ``extra_a``/``extra_b`` are TOML appended to each site's config, with
    ``{site_a}`` and ``{site_b}`` replaced by the sites' ids."""
    suffix = secrets.token_hex(3)
    site_a, site_b = f"a-{suffix}", f"b-{suffix}"
    federation = create_federation(
        root, broker=broker, site_ids=[site_a, site_b], vhost=vhost, limits=limits
    )
    port_a, port_b = free_port(), port_b or free_port()
    _configure(
        federation.site_configs[site_a],
        ae_title="GATEWAY_A",
        port=port_a,
        routes=[(r.ae_title, site_b, r.node) for r in routes],
        nodes=nodes_a,
    )
    _configure(
        federation.site_configs[site_b],
        ae_title=GATEWAY_B_AE_TITLE,
        port=port_b,
        routes=[],
        nodes=nodes_b,
    )
    for site, extra in ((site_a, extra_a), (site_b, extra_b)):
        if extra:
            path = federation.site_configs[site]
            text = extra.replace("{site_a}", site_a).replace("{site_b}", site_b)
            path.write_text(path.read_text(encoding="utf-8") + "\n" + text, encoding="utf-8")
            site_config.load(path)
    return TwoSites(federation, site_a, site_b, port_a, port_b)


def route_to_pacs(
    root: Path,
    *,
    broker: BrokerNode,
    vhost: str,
    pacs_port: int,
    route: str = "SITE_B",
    limits: Limits | None = None,
) -> TwoSites:
    """Sites A and B, A's route AE title ``route`` leading to B's PACS (``PACS_B``) on
    ``pacs_port``."""
    node = LocalNode(name="PACS", ae_title="PACS_B", host="127.0.0.1", port=pacs_port)
    return make_two_sites(
        root,
        broker=broker,
        vhost=vhost,
        routes=[Route(route, "PACS")],
        nodes_b=[node],
        limits=limits,
    )


def delete_users(management: ManagementClient, sites: TwoSites) -> None:
    """Broker users outlive the vhost: delete the two sites' users."""
    for site in (sites.site_a, sites.site_b):
        management.delete_user(sites.federation.site(site).config.broker.user)


@contextlib.asynccontextmanager
async def running_gateways(*configs: Path, timeout_s: float = 60.0) -> AsyncIterator[list[Gateway]]:
    """Run a ``Gateway`` per config as tasks on this loop; cancel them on exit."""
    gateways = [Gateway(LocalSite.load(path)) for path in configs]
    tasks = [asyncio.create_task(gateway.run()) for gateway in gateways]
    try:
        for gateway, task in zip(gateways, tasks, strict=True):
            ready = asyncio.create_task(gateway.ready.wait())
            done, _ = await asyncio.wait(
                {ready, task}, timeout=timeout_s, return_when="FIRST_COMPLETED"
            )
            if ready not in done:
                ready.cancel()
                if task in done:
                    task.result()  # raises what stopped it
                raise AssertionError(f"gateway {gateway.site.site_id} not ready in {timeout_s}s")
        yield gateways
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def outbox_empty(gateway: Gateway) -> bool:
    return not gateway.outbox.entries()


# --- separate gateway processes -------------------------------------------------------


@dataclass
class GatewayProcess:
    """``python -m dicombridge gateway run`` as a child process with its own log."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, config_path: Path) -> GatewayProcess:
        log_path = config_path.parent / "gateway.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicombridge",
                    "gateway",
                    "run",
                    "--config",
                    str(config_path),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_bytes(self) -> int:
        """VmHWM: the peak resident set of the process so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmHWM for pid {self.pid}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, *, timeout_s: float = 30.0) -> int:
        """SIGTERM (the gateway drains and exits), SIGKILL after ``timeout_s``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


# --- generated instances --------------------------------------------------------------


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.9.7433.1")
    return meta


def _encode(meta: FileMetaDataset, dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    write_dataset(buffer, dataset)
    return bytes(buffer.getvalue())


def _patient_and_study(dataset: Dataset, study: str, series: str) -> None:
    dataset.PatientName = PHI_MARKER
    dataset.PatientID = "RELAY-0001"
    dataset.PatientBirthDate = "19700101"
    dataset.PatientSex = "O"
    dataset.StudyInstanceUID = study
    dataset.SeriesInstanceUID = series
    dataset.StudyDate = "20240101"
    dataset.StudyTime = "120000"
    dataset.StudyID = "1"
    dataset.AccessionNumber = "A1"
    dataset.ReferringPhysicianName = ""
    dataset.SeriesNumber = 1


def ct_series(directory: Path, count: int, *, rows: int = 512, columns: int = 512) -> list[Path]:
    """``count`` CT instances of one new series, 16-bit ``rows`` x ``columns``, Explicit VR
    Little Endian. One pixel buffer is shared; each instance has its own UIDs, number and
    position. Written in the form DCMTK's storescu sends unchanged (no trailing padding,
    no undefined lengths), so that what storescu puts on the wire is the file's data set."""
    directory.mkdir(parents=True, exist_ok=True)
    # 12 bits stored: mask random words so the values fit BitsStored.
    raw = os.urandom(rows * columns * 2)
    pixels = bytes(b & 0x0F if i % 2 else b for i, b in enumerate(raw))
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        uid = generate_uid()
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = uid
        ds.Modality = "CT"
        _patient_and_study(ds, study, series)
        ds.InstanceNumber = number
        ds.FrameOfReferenceUID = series
        ds.ImagePositionPatient = [0, 0, number]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
        ds.PixelData = pixels
        path = directory / f"ct{number:04d}.dcm"
        path.write_bytes(_encode(_file_meta(CT_IMAGE_STORAGE, uid), ds))
        paths.append(path)
    return paths


def big_multiframe(path: Path, *, frames: int, rows: int = 512, columns: int = 512) -> str:
    """Write a Multi-frame Grayscale Word SC instance of ``frames`` 16-bit frames, streaming
    its Pixel Data to disk in 8 MiB blocks (each block distinct); return its SOP Instance UID.
    """
    uid = generate_uid()
    ds = Dataset()
    ds.SOPClassUID = MULTIFRAME_GRAYSCALE_WORD_SC
    ds.SOPInstanceUID = uid
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    _patient_and_study(ds, generate_uid(), generate_uid())
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 40
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    length = frames * rows * columns * 2
    assert length < 2**32 - 1
    pattern = os.urandom(CHUNK_BYTES)
    with path.open("wb") as out:
        out.write(_encode(_file_meta(MULTIFRAME_GRAYSCALE_WORD_SC, uid), ds))
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
        out.write(b"\xe0\x7f\x10\x00OW\0\0" + length.to_bytes(4, "little"))
        for offset in range(0, length, CHUNK_BYTES):
            block = (offset // CHUNK_BYTES).to_bytes(8, "big") + pattern[8:]
            out.write(block[: length - offset])
    return uid


def shipped_copy(name: str, directory: Path) -> Path:
    """A copy of a pydicom shipped file in its own transfer syntax with a fresh SOP
    Instance UID (several share one), the PHI marker as patient name, and the patient,
    study and series identifiers a PACS needs (Orthanc refuses an instance without them,
    answering 0xA700)."""
    dataset = pydicom.dcmread(shipped_file(name))
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.PatientName = PHI_MARKER
    dataset.PatientID = "RELAY-0002"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in dataset:
            setattr(dataset, keyword, generate_uid())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


# --- hashing without holding files in memory -------------------------------------------


def dataset_offset_of(head: bytes) -> int:
    """Where the data set begins in a Part 10 file, from its first 144 bytes."""
    if head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part 10 file starting with its group length")
    return 144 + int.from_bytes(head[140:144], "little")


def dataset_sha256(chunks: Iterator[bytes]) -> tuple[str, int]:
    """SHA-256 and length of the data set (the bytes after the File Meta Information) of
    a Part 10 file given as a stream of chunks."""
    digest = hashlib.sha256()
    head = b""
    started = False
    length = 0
    for chunk in chunks:
        if not started:
            head += chunk
            if len(head) < 144 or len(head) < dataset_offset_of(head):
                continue
            data, head, started = head[dataset_offset_of(head) :], b"", True
        else:
            data = chunk
        digest.update(data)
        length += len(data)
    return digest.hexdigest(), length


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def orthanc_file_dataset_sha256(rest_url: str, orthanc_id: str) -> tuple[str, int]:
    """Stream ``/instances/{id}/file`` from Orthanc; hash its data set (never held whole)."""
    with (
        httpx.Client(base_url=rest_url, timeout=300) as client,
        client.stream("GET", f"/instances/{orthanc_id}/file") as response,
    ):
        response.raise_for_status()
        return dataset_sha256(response.iter_bytes(CHUNK_BYTES))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
