"""The store relay end to end: DCMTK storescu at site A, gateway A, the real RabbitMQ node,
gateway B, and B's node (DCMTK storescp +B or Orthanc). Byte identity is seen three ways
(design.md, "Tests use the real thing"); bad input and receipts at a running gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicombridge.config import LocalNode
from dicombridge.gateway import Gateway
from dicombridge.management import ManagementClient
from dicombridge.orthanc import OrthancServer, OrthancSettings
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import wait_gateway
from dicombridge.scp import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, SUCCESS
from dicombridge.scu import STATUS_NOT_ACCEPTED
from tests import dicomkit
from tests.brokerkit import wait_until
from tests.pacskit import (
    DCMTK_BIN,
    STORESCU_PROPOSE,
    StoreSCPNode,
    dataset_bytes,
    dcmtk_env,
    fresh_copy,
    restricted_storescp_args,
    sop_instance_uid,
    transfer_syntax,
    wait_for,
)
from tests.relaykit import (
    GATEWAY_B_AE_TITLE,
    GatewayProcess,
    Route,
    TwoSites,
    big_multiframe,
    ct_series,
    dataset_sha256,
    delete_users,
    file_chunks,
    make_two_sites,
    orthanc_file_dataset_sha256,
    outbox_empty,
    running_gateways,
    sha256_file,
    shipped_copy,
)

pytestmark = pytest.mark.integration

PACS_AE: Final = "PACS"
TO_STORESCP: Final = "SITE_B"  # A's route to B's storescp +B (node "PACS")
TO_ORTHANC: Final = "SITE_B_ORTHANC"  # A's route to B's Orthanc (node "ORTHANC")
SERIES_SIZE: Final = 200
BIG_FRAMES: Final = 2048  # 2048 frames of 512 x 512 x 16 bit: 1 GiB of Pixel Data
PEAK_RSS_LIMIT_BYTES: Final = 300 * 1000 * 1000

# pydicom's shipped files (local, never downloaded): ten SOP classes, fourteen transfer
# syntaxes. Several share a SOP Instance UID: each is sent as a copy with a fresh one.
SHIPPED: Final = (
    "CT_small.dcm",  # CT, Explicit VR Little Endian
    "MR_small_implicit.dcm",  # MR, Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # MR, Explicit VR Big Endian
    "image_dfl.dcm",  # SC, Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm",  # SC, JPEG Baseline
    "JPGExtended.dcm",  # SC, JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",  # SC, JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # MR, JPEG-LS Lossless
    "JPEGLSNearLossless_08.dcm",  # SC, JPEG-LS Near-Lossless
    "MR_small_jp2klossless.dcm",  # MR, JPEG 2000 Lossless
    "JPEG2000.dcm",  # SC, JPEG 2000
    "SC_rgb_rle.dcm",  # SC, RLE Lossless
    "rtplan.dcm",  # RT Plan, no pixel data
    "rtdose.dcm",  # RT Dose, multi-frame
    "waveform_ecg.dcm",  # 12-lead ECG
    "test-SR.dcm",  # Comprehensive SR
    "reportsi.dcm",  # Basic Text SR
    "examples_palette.dcm",  # US, palette colour
    "liver_1frame.dcm",  # Segmentation
)
STORESCU_PROPOSE_MORE: Final = {
    **STORESCU_PROPOSE,
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
}


# --- fixtures --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pacs:
    """Orthanc B (behind gateway B) and a reference Orthanc configured identically."""

    b: OrthancServer
    reference: OrthancServer


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    """Two Orthancs with the same settings; only their ports and directories differ."""
    root = tmp_path_factory.mktemp("orthanc")
    settings = OrthancSettings(ae_title=PACS_AE)
    servers: list[OrthancServer] = []
    try:
        for name in ("b", "reference"):
            servers.append(OrthancServer.start(root / name, settings))
        yield Pacs(*servers)
    finally:
        with ThreadPoolExecutor() as pool:
            list(pool.map(lambda server: server.stop(), servers))


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCPNode]:
    """DCMTK's storescp +B (bit preserving), every transfer syntax it knows."""
    node = StoreSCPNode.start(tmp_path / "storescp", ae_title=PACS_AE)
    yield node
    node.stop()


def _node(name: str, port: int) -> LocalNode:
    return LocalNode(name=name, ae_title=PACS_AE, host="127.0.0.1", port=port)


SitesFactory = Callable[[list[Route], list[LocalNode]], TwoSites]


@pytest.fixture
def make_sites(
    tmp_path: Path, rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str
) -> Iterator[SitesFactory]:
    """Provision sites A and B in this test's vhost, A's routes leading to B's nodes;
    their broker users are deleted afterwards (users are global in RabbitMQ)."""
    made: list[TwoSites] = []

    def make(routes: list[Route], nodes: list[LocalNode]) -> TwoSites:
        sites = make_two_sites(
            tmp_path / f"fed{len(made)}",
            broker=rabbitmq_node,
            vhost=vhost,
            routes=routes,
            nodes_b=nodes,
        )
        made.append(sites)
        return sites

    yield make
    for sites in made:
        delete_users(management, sites)


def _no_phi(caplog: pytest.LogCaptureFixture) -> None:
    leaked = [
        r.getMessage()
        for r in caplog.records
        if dicomkit.PHI_MARKER in r.getMessage() or dicomkit.PHI_MARKER in repr(r.__dict__)
    ]
    assert not leaked, leaked


# --- senders ---------------------------------------------------------------------------


async def storescu(
    port: int,
    called: str,
    paths: list[Path],
    *,
    option: str = "-xe",
    calling: str = "MODALITY",
    timeout_s: float = 300,
) -> None:
    """DCMTK storescu of ``paths`` on one association, proposing only ``option``'s syntax."""
    result = await asyncio.to_thread(
        subprocess.run,
        [
            str(DCMTK_BIN / "storescu"),
            "-aet",
            calling,
            "-aec",
            called,
            "-R",
            option,
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dcmtk_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stored_files(node: StoreSCPNode) -> list[Path]:
    return [p for p in node.output.iterdir() if not p.name.startswith(".")]


async def _relayed(gateway_a: Gateway, gateway_b: Gateway, count: int, timeout_s: float) -> None:
    """Wait until ``count`` transfers are stored at B and every receipt emptied A's outbox."""

    async def done() -> bool:
        return len(gateway_b.deliverer.stored_sha256) >= count and outbox_empty(gateway_a)

    await wait_until(done, timeout_s=timeout_s, interval_s=0.1, what=f"{count} relayed")


def _orthanc_files_equal(pacs: Pacs, uids: list[str]) -> None:
    """Orthanc B holds, for each UID, the very file the reference Orthanc holds."""
    with pacs.b.client() as relayed, pacs.reference.client() as direct:
        for uid in uids:
            got, expected = relayed.file_by_uid(uid), direct.file_by_uid(uid)
            assert got is not None, uid
            assert expected is not None, uid
            assert got == expected, uid


# --- 1. bit identity, three observers ----------------------------------------------------


async def test_ct_series_is_bit_identical_for_three_observers(
    tmp_path: Path,
    make_sites: SitesFactory,
    storescp: StoreSCPNode,
    pacs: Pacs,
) -> None:
    """A 200-instance CT series through the relay: A's and B's SHA-256 agree, storescp +B
    holds the sent data sets, Orthanc B the files a directly fed Orthanc holds; one store
    per instance."""
    sites = make_sites(
        [Route(TO_STORESCP, "PACS"), Route(TO_ORTHANC, "ORTHANC")],
        [_node("PACS", storescp.port), _node("ORTHANC", pacs.b.dicom_port)],
    )
    series = ct_series(tmp_path / "series", SERIES_SIZE)
    uids = [sop_instance_uid(p) for p in series]
    with pacs.b.client() as client:
        before_b = client.count_instances()
    async with running_gateways(sites.config_a, sites.config_b) as (gateway_a, gateway_b):
        began = time.monotonic()
        await storescu(sites.port_a, TO_STORESCP, series)
        answered = time.monotonic() - began
        await _relayed(gateway_a, gateway_b, SERIES_SIZE, timeout_s=120)
        relayed_s = time.monotonic() - began
        began = time.monotonic()
        await asyncio.gather(
            storescu(sites.port_a, TO_ORTHANC, series),
            storescu(pacs.reference.dicom_port, PACS_AE, series, calling=GATEWAY_B_AE_TITLE),
        )
        await _relayed(gateway_a, gateway_b, 2 * SERIES_SIZE, timeout_s=120)
        orthanc_s = time.monotonic() - began
        # (a) what A received is what B sent to its PACS, for every transfer.
        assert len(gateway_a.received_sha256) == 2 * SERIES_SIZE
        assert gateway_b.deliverer.stored_sha256 == gateway_a.received_sha256
        assert gateway_b.deliverer.stored == 2 * SERIES_SIZE
        assert gateway_b.deliverer.failed == 0
        assert gateway_b.deliverer.retries == 0
    print(
        f"\nseries of {SERIES_SIZE}: storescu answered in {answered:.1f}s, all in storescp "
        f"in {relayed_s:.1f}s; into Orthanc B (and the reference) in {orthanc_s:.1f}s"
    )
    # (b) storescp +B stored each sent data set, byte for byte, exactly once.
    assert len(_stored_files(storescp)) == SERIES_SIZE
    for path, uid in zip(series, uids, strict=True):
        stored = storescp.wait_stored(uid)
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
    # (c) Orthanc B holds what the identically configured reference holds.
    with pacs.b.client() as client:
        assert client.count_instances() - before_b == SERIES_SIZE
    _orthanc_files_equal(pacs, uids)


async def test_shipped_files_are_bit_identical_for_three_observers(
    tmp_path: Path,
    make_sites: SitesFactory,
    storescp: StoreSCPNode,
    pacs: Pacs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pydicom's files of ten SOP classes and fourteen transfer syntaxes: A's and B's
    SHA-256 agree, storescp +B holds the data sets sent verbatim, Orthanc B the files an
    Orthanc fed by the same storescu command holds; one store per instance."""
    caplog.set_level(logging.INFO)
    sites = make_sites(
        [Route(TO_STORESCP, "PACS"), Route(TO_ORTHANC, "ORTHANC")],
        [_node("PACS", storescp.port), _node("ORTHANC", pacs.b.dicom_port)],
    )
    files = [shipped_copy(name, tmp_path / "in") for name in SHIPPED]
    names = {sop_instance_uid(p): n for p, n in zip(files, SHIPPED, strict=True)}
    assert len(names) == len(files)
    async with running_gateways(sites.config_a, sites.config_b) as (gateway_a, gateway_b):
        for path in files:
            # A pynetdicom SCU sends the data set verbatim from the file: exact identity.
            status = await asyncio.to_thread(
                dicomkit.pynetdicom_store, sites.port_a, TO_STORESCP, path
            )
            assert status.Status == SUCCESS, names[sop_instance_uid(path)]
            # DCMTK's storescu re-encodes what it parsed; both Orthancs get its encoding.
            option = STORESCU_PROPOSE_MORE[transfer_syntax(path)]
            await asyncio.gather(
                storescu(sites.port_a, TO_ORTHANC, [path], option=option),
                storescu(
                    pacs.reference.dicom_port,
                    PACS_AE,
                    [path],
                    option=option,
                    calling=GATEWAY_B_AE_TITLE,
                ),
            )
        await _relayed(gateway_a, gateway_b, 2 * len(files), timeout_s=60)
        assert len(gateway_a.received_sha256) == 2 * len(files)
        assert gateway_b.deliverer.stored_sha256 == gateway_a.received_sha256
        assert gateway_b.deliverer.stored == 2 * len(files)
        assert gateway_b.deliverer.failed == 0
    assert len(_stored_files(storescp)) == len(files)
    for path in files:
        stored = storescp.wait_stored(sop_instance_uid(path))
        assert transfer_syntax(stored) == transfer_syntax(path)
        assert dataset_bytes(stored) == dataset_bytes(path), names[sop_instance_uid(path)]
    _orthanc_files_equal(pacs, list(names))
    _no_phi(caplog)


# --- 2. a 1 GiB instance between two gateway processes -----------------------------------


def test_one_gib_instance_relayed_in_bounded_memory(
    tmp_path: Path,
    make_sites: SitesFactory,
    pacs: Pacs,
) -> None:
    """A 1 GiB multi-frame instance reaches Orthanc B intact through two gateway
    processes, each peaking below 300 MB resident."""
    sites = make_sites(
        [Route(TO_ORTHANC, "ORTHANC")],
        [_node("ORTHANC", pacs.b.dicom_port)],
    )
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
        big = tmp_path / "big.dcm"
        began = time.monotonic()
        uid = big_multiframe(big, frames=BIG_FRAMES)
        generated_s = time.monotonic() - began
        sent_sha, sent_length = dataset_sha256(file_chunks(big))
        began = time.monotonic()
        result = subprocess.run(
            [
                str(DCMTK_BIN / "storescu"),
                "-aet",
                "MODALITY",
                "-aec",
                TO_ORTHANC,
                "-R",
                "-xe",
                "127.0.0.1",
                str(sites.port_a),
                str(big),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=dcmtk_env(),
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        answered_s = time.monotonic() - began
        outbox_a = sites.storage_root(sites.site_a) / "outbox"
        with pacs.b.client() as client:
            wait_for(
                lambda: client.find_instance(uid) is not None,
                timeout_s=240,
                interval_s=0.5,
                what="the 1 GiB instance in Orthanc B",
            )
            stored_s = time.monotonic() - began
            wait_for(
                lambda: not [p for p in outbox_a.iterdir() if not p.name.startswith(".")],
                timeout_s=60,
                interval_s=0.2,
                what="the stored receipt to empty A's outbox",
            )
            orthanc_id = client.find_instance(uid)
            assert orthanc_id is not None
        peaks = [g.peak_rss_bytes() for g in gateways]
    finally:
        codes = [g.stop() for g in gateways]
    assert codes == [0, 0], [g.log()[-3000:] for g in gateways]
    got_sha, got_length = orthanc_file_dataset_sha256(pacs.b.rest_url, orthanc_id)
    print(
        f"\n1 GiB instance: generated in {generated_s:.1f}s; storescu answered in "
        f"{answered_s:.1f}s; in Orthanc B {stored_s:.1f}s after the send began; "
        f"peak RSS gateway A {peaks[0] / 1e6:.0f} MB, gateway B {peaks[1] / 1e6:.0f} MB"
    )
    assert got_length == sent_length
    assert got_sha == sent_sha
    assert max(peaks) < PEAK_RSS_LIMIT_BYTES, peaks


# --- 3. bad input through a running gateway ----------------------------------------------


def _raw_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return dicomkit.recv_until_closed(sock, timeout_s=5)


def _oversized_p_data(port: int, called: str) -> tuple[bytes, bytes]:
    """Associate over a raw socket, then announce a 2 GiB P-DATA-TF; return AC and reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(dicomkit.associate_rq_bytes(called))
        header = dicomkit.recv_exactly(sock, 6, timeout_s=5)
        (length,) = struct.unpack(">L", header[2:])
        accept = header + dicomkit.recv_exactly(sock, length, timeout_s=5)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 2**31) + b"\x00" * 1024)
        return accept, dicomkit.recv_until_closed(sock, timeout_s=5)


def _dataset_with(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    dataset = Dataset()
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = sop_instance_uid
    dataset.PatientName = dicomkit.PHI_MARKER
    return dicomkit.encode_explicit_le(dataset)


async def test_bad_input_is_refused_and_nothing_is_queued(
    tmp_path: Path,
    make_sites: SitesFactory,
    storescp: StoreSCPNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unknown called AE, non-DICOM bytes, an oversized PDU, an unreadable data set and a
    UID mismatch each get their refusal and a log line without PHI, queue nothing, and a
    good instance sent next arrives at B."""
    caplog.set_level(logging.DEBUG)
    sites = make_sites(
        [Route(TO_STORESCP, "PACS")],
        [_node("PACS", storescp.port)],
    )
    ct = "1.2.840.10008.5.1.4.1.1.2"
    async with running_gateways(sites.config_a, sites.config_b) as (gateway_a, gateway_b):
        port = sites.port_a
        relayed = 0

        async def then_a_good_instance_arrives(expected_log: str) -> None:
            nonlocal relayed
            assert any(expected_log in r.getMessage() for r in caplog.records), expected_log
            assert outbox_empty(gateway_a)
            assert len(gateway_a.received_sha256) == relayed  # nothing admitted, or sent
            good = dicomkit.fresh_copy("CT_small.dcm", tmp_path)
            await storescu(port, TO_STORESCP, [good])
            relayed += 1
            await _relayed(gateway_a, gateway_b, relayed, timeout_s=30)
            storescp.wait_stored(sop_instance_uid(good))
            assert len(gateway_a.received_sha256) == relayed
            assert gateway_b.deliverer.stored_sha256 == gateway_a.received_sha256
            assert len(_stored_files(storescp)) == relayed

        # Unknown called AE title: rejected, "called AE title not recognised".
        phi_file = dicomkit.fresh_copy("CT_small.dcm", tmp_path)
        result = await asyncio.to_thread(
            dicomkit.run_dcmtk, "storescu", "-aec", "NOWHERE", "127.0.0.1", str(port), str(phi_file)
        )
        assert result.returncode != 0
        assert "Called AE Title Not Recognized" in result.stdout + result.stderr
        await then_a_good_instance_arrives("association rejected: called AE title not recognized")

        # Bytes that are not DICOM: an A-ABORT (or a reset that swallowed it), then closed.
        junk = f"GET /{dicomkit.PHI_MARKER} HTTP/1.1\r\n\r\n".encode()
        reply = await asyncio.to_thread(_raw_exchange, port, junk)
        assert reply == b"" or (reply[:1] == b"\x07" and len(reply) == 10), reply
        await then_a_good_instance_arrives("unknown PDU type 0x47 received")

        # A P-DATA-TF announcing 2 GiB, beyond the advertised maximum: aborted unread.
        accept, reply = await asyncio.to_thread(_oversized_p_data, port, TO_STORESCP)
        assert accept[:1] == b"\x02"
        assert reply[:1] == b"\x07", reply
        await then_a_good_instance_arrives("announces 2147483648 bytes")

        # A data set that does not parse: 0xC000 with an Error Comment.
        garbage = b"\x08\x00\x16\x00UI\x40\x00" + b"\xff" * 7
        crafted = dicomkit.crafted_file(
            tmp_path, dataset=garbage, sop_class_uid=ct, sop_instance_uid=generate_uid()
        )
        status = await asyncio.to_thread(dicomkit.pynetdicom_store, port, TO_STORESCP, crafted)
        assert status.Status == CANNOT_UNDERSTAND
        assert status.ErrorComment
        await then_a_good_instance_arrives("status 0xC000 (data set cannot be parsed")

        # Its SOP Instance UID differs from the command's: 0xA900 with an Error Comment.
        crafted = dicomkit.crafted_file(
            tmp_path,
            dataset=_dataset_with(ct, generate_uid()),
            sop_class_uid=ct,
            sop_instance_uid=generate_uid(),
        )
        status = await asyncio.to_thread(dicomkit.pynetdicom_store, port, TO_STORESCP, crafted)
        assert status.Status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        assert "SOP Instance UID" in status.ErrorComment
        await then_a_good_instance_arrives("status 0xA900 (SOP Instance UID differs")

        assert gateway_b.deliverer.stored == relayed == 5
        assert gateway_b.deliverer.failed == 0
    _no_phi(caplog)


# --- 4. receipts ---------------------------------------------------------------------------


async def test_refused_instance_gets_failed_receipt_quarantine_and_kept_outbox_entry(
    tmp_path: Path,
    make_sites: SitesFactory,
) -> None:
    """B's PACS refuses an instance: A's entry is kept with a failed receipt naming the
    status, the instance sits in B's quarantine with the reason; a stored receipt removes
    A's entry."""
    workdir = tmp_path / "restricted"
    workdir.mkdir()
    restricted = StoreSCPNode.start(
        workdir, ae_title=PACS_AE, extra_args=restricted_storescp_args(workdir)
    )
    try:
        sites = make_sites(
            [Route(TO_STORESCP, "PACS")],
            [_node("PACS", restricted.port)],
        )
        async with running_gateways(sites.config_a, sites.config_b) as (gateway_a, gateway_b):
            port = sites.port_a
            # Accepted by the PACS: the stored receipt removes A's outbox entry.
            ct = fresh_copy("CT_small.dcm", tmp_path / "in")
            status = await asyncio.to_thread(dicomkit.pynetdicom_store, port, TO_STORESCP, ct)
            assert status.Status == SUCCESS
            await _relayed(gateway_a, gateway_b, 1, timeout_s=30)
            (ct_tid,) = gateway_a.received_sha256
            assert gateway_a.outbox.get(ct_tid) is None
            restricted.wait_stored(sop_instance_uid(ct))

            # Refused: MR (SOP class) and JPEG Baseline (transfer syntax) are not accepted.
            seen = {ct_tid}
            for name in ("MR_small_implicit.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
                path = fresh_copy(name, tmp_path / "in")
                status = await asyncio.to_thread(dicomkit.pynetdicom_store, port, TO_STORESCP, path)
                assert status.Status == SUCCESS  # A stored it in its outbox
                (tid,) = set(gateway_a.received_sha256) - seen
                seen.add(tid)

                async def failed_receipt(tid: str = tid) -> bool:
                    entry = gateway_a.outbox.get(tid)
                    return entry is not None and "receipt" in entry.state

                await wait_until(failed_receipt, timeout_s=30, what=f"failed receipt for {name}")
                entry = gateway_a.outbox.get(tid)
                assert entry is not None  # kept for a retry
                assert entry.published
                receipt = entry.state["receipt"]
                assert receipt["outcome"] == "failed"
                assert receipt["status"] == STATUS_NOT_ACCEPTED
                assert receipt["error_comment"]
                quarantined = sites.storage_root(sites.site_b) / "quarantine" / sites.site_a / tid
                reason = json.loads((quarantined / "reason.json").read_text())
                assert reason["stage"] == "delivery"
                assert reason["status"] == STATUS_NOT_ACCEPTED
                assert reason["error_comment"] == receipt["error_comment"]
                instance = quarantined / "instance.dcm"
                assert sha256_file(instance) == gateway_a.received_sha256[tid]
                assert dataset_bytes(instance) == dataset_bytes(path)
                assert restricted.stored(sop_instance_uid(path)) is None
            assert gateway_b.deliverer.stored == 1
            assert gateway_b.deliverer.failed == 2
            assert len(gateway_a.outbox.entries()) == 2
    finally:
        restricted.stop()
    assert len(_stored_files(restricted)) == 1
