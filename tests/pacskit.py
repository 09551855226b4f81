"""Test helpers for the PACS side: shipped test files with fresh UIDs, DCMTK's storescp
(bit preserving) as a destination node, DCMTK's storescu as a direct sender."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom.dsutils import split_dataset

from dicombridge.orthanc import OrthancServer, free_port, is_listening

DCMTK_BIN: Final = Path("/usr/bin")

# pydicom's shipped test files (in the wheel, never downloaded), one per transfer syntax.
SHIPPED_BY_TRANSFER_SYNTAX: Final = {
    "1.2.840.10008.1.2.1": "CT_small.dcm",  # Explicit VR Little Endian
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",  # JPEG 2000
    "1.2.840.10008.1.2.5": "SC_rgb_rle.dcm",  # RLE Lossless
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
}


def shipped_file(name: str) -> Path:
    """A pydicom test file that is installed locally (never downloaded)."""
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    return Path(str(found))


def fresh_copy(
    name: str,
    directory: Path,
    *,
    patient_id: str | None = None,
    strip_trailing_padding: bool = False,
) -> Path:
    """A copy of a shipped file with a fresh SOP Instance UID (several share one), saved
    by pydicom in the file's own transfer syntax; ``patient_id`` optionally replaced.

    ``strip_trailing_padding`` drops (FFFC,FFFC) Data Set Trailing Padding, which DCMTK's
    storescu silently removes when it re-encodes a file for the network: a file sent
    through it then differs from the same file sent verbatim.
    """
    dataset = pydicom.dcmread(shipped_file(name))
    if strip_trailing_padding and 0xFFFCFFFC in dataset:
        del dataset[0xFFFCFFFC]
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if patient_id is not None:
        dataset.PatientID = patient_id
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def sop_class_uid(path: Path) -> str:
    """The SOP Class UID in a file's meta."""
    meta, _ = split_dataset(path)
    return str(meta.MediaStorageSOPClassUID)


def sop_instance_uid(path: Path) -> str:
    """The SOP Instance UID in a file's meta."""
    meta, _ = split_dataset(path)
    return str(meta.MediaStorageSOPInstanceUID)


def dataset_bytes(data: bytes | Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information."""
    raw = data.read_bytes() if isinstance(data, Path) else data
    if raw[128:132] != b"DICM":
        raise ValueError("not a Part 10 file")
    # (0002,0000) File Meta Information Group Length, explicit VR little endian UL.
    if raw[132:136] != b"\x02\x00\x00\x00" or raw[136:138] != b"UL":
        raise ValueError("file meta does not start with its group length")
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# storescu's option that proposes a transfer syntax (with the uncompressed ones, each in
# its own presentation context, so the file's own syntax is matched exactly).
STORESCU_PROPOSE: Final = {
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
}


def transfer_syntax(path: Path) -> str:
    """The transfer syntax UID in a file's meta."""
    meta, _ = split_dataset(path)
    return str(meta.TransferSyntaxUID)


def dcmtk_storescu(
    port: int,
    called_ae_title: str,
    path: Path,
    *,
    calling_ae_title: str = "STORESCU",
    timeout_s: float = 30,
) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu (not pynetdicom's namesake) sending one file in its own transfer
    syntax (``-R``: only the file's SOP class; the option for its transfer syntax).
    storescu decodes the file and encodes it again for the network."""
    return subprocess.run(
        [
            str(DCMTK_BIN / "storescu"),
            "-aet",
            calling_ae_title,
            "-aec",
            called_ae_title,
            "-R",
            STORESCU_PROPOSE[transfer_syntax(path)],
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dcmtk_env(),
        check=False,
    )


@dataclass
class StoreSCPNode:
    """DCMTK's ``storescp`` as a destination node, one subprocess with its own output
    directory and log; ``+B`` writes the data set exactly as it arrived."""

    process: subprocess.Popen[bytes]
    port: int
    ae_title: str
    output: Path
    log_path: Path

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        ae_title: str = "STORESCP",
        extra_args: Sequence[str] = ("+xa",),
        timeout_s: float = 10.0,
        port: int | None = None,
    ) -> StoreSCPNode:
        """Start ``storescp -v +B`` on ``port`` (a free one if None); return once it listens."""
        output = workdir / "received"
        output.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "storescp.log"
        port = port or free_port()
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    str(DCMTK_BIN / "storescp"),
                    "-v",
                    "+B",
                    "-aet",
                    ae_title,
                    "-od",
                    str(output),
                    *extra_args,
                    str(port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
        node = cls(process, port, ae_title, output, log_path)
        try:
            wait_for(
                lambda: process.poll() is not None or is_listening(port),
                timeout_s=timeout_s,
                what="storescp to listen",
            )
        except AssertionError:
            node.stop()
            raise
        if process.poll() is not None:
            raise AssertionError(f"storescp exited {process.returncode}: {node.log()}")
        return node

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def associations(self) -> int:
        """How many associations storescp received (its verbose log says so per one)."""
        return len(re.findall(r"^I: Association Received", self.log(), flags=re.MULTILINE))

    def stored(self, sop_instance_uid: str) -> Path | None:
        """The file storescp wrote for this instance (named ``<modality>.<uid>``)."""
        matches = [p for p in self.output.iterdir() if p.name.endswith(f".{sop_instance_uid}")]
        return matches[0] if matches else None

    def wait_stored(self, sop_instance_uid: str, *, timeout_s: float = 10.0) -> Path:
        """Wait until the file for this instance is completely written (storescp writes
        it before it answers the C-STORE, so it is whole once the response is seen)."""
        wait_for(
            lambda: self.stored(sop_instance_uid) is not None,
            timeout_s=timeout_s,
            what=f"storescp to store {sop_instance_uid}",
        )
        found = self.stored(sop_instance_uid)
        assert found is not None
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


RESTRICTED_PROFILE: Final = """\
# Accepts CT Image Storage and Secondary Capture in uncompressed transfer syntaxes only.
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[CTAndSC]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
PresentationContext3 = SecondaryCaptureImageStorage\\Uncompressed

[[Profiles]]
[Restricted]
PresentationContexts = CTAndSC
"""


def restricted_storescp_args(workdir: Path) -> list[str]:
    """storescp arguments for a node that refuses all but CT and SC, uncompressed."""
    config = workdir / "restricted.cfg"
    config.write_text(RESTRICTED_PROFILE, encoding="utf-8")
    return ["-xf", str(config), "Restricted"]


def set_default_encoding(server: OrthancServer, encoding: str) -> None:
    """Change Orthanc's ``DefaultEncoding`` while it runs (``PUT /tools/default-encoding``,
    e.g. "Latin1", "Utf8"). Orthanc 1.10 answers a C-FIND in this character set whatever
    the query's Specific Character Set; values it cannot represent are lost."""
    auth = (server.username, server.password) if server.username and server.password else None
    with httpx.Client(base_url=server.rest_url, auth=auth, timeout=30) as http:
        http.put("/tools/default-encoding", content=encoding.encode("ascii")).raise_for_status()
