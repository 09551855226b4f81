"""The hospital-facing SCP against real peers: DCMTK tools, pynetdicom, raw sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicombridge.acceptance import AcceptancePolicy, RejectReason
from dicombridge.scp import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    RECEIVE_PREFIX,
    SUCCESS,
    ReceivedInstance,
    ScpSettings,
    StorageSCP,
    StoreOutcome,
    dataset_offset,
)
from tests.dicomkit import (
    PHI_MARKER,
    SHIPPED_FILES,
    associate_rq_bytes,
    crafted_file,
    dataset_bytes,
    encode_explicit_le,
    fresh_copy,
    pynetdicom_store,
    read_source,
    recv_exactly,
    recv_until_closed,
    run_dcmtk,
)
from tests.relaykit import ct_series

ROUTE_A = "SITE_B"
ROUTE_B = "SITE_C"
MAXIMUM_PDU_SIZE = 16 * 1024
A_ABORT_LENGTH = 10
A_ABORT_BY_USER = bytes.fromhex("07000000000400000000")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

pytestmark = pytest.mark.timeout(60)

# storescu options that propose exactly the file's own transfer syntax, so that DCMTK sends
# the file without converting it.
STORESCU_PROPOSE = {
    uid.ExplicitVRLittleEndian: "-xe",
    uid.ImplicitVRLittleEndian: "-xi",
    uid.ExplicitVRBigEndian: "-xb",
    uid.DeflatedExplicitVRLittleEndian: "-xd",
    uid.JPEGBaseline8Bit: "-xy",
    uid.JPEGLSLossless: "-xt",
    uid.JPEG2000Lossless: "-xv",
    uid.JPEG2000: "-xw",
    uid.RLELossless: "-xr",
}
# storescu re-encodes what it parsed: it drops Data Set Trailing Padding (FFFC,FFFC), gives
# sequences explicit lengths and encapsulated Pixel Data the VR OB. Files already in that
# form arrive byte-identical; for the others only the values can be compared.
EXPECTED_IDENTICAL_FROM_DCMTK = [
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle.dcm",
    "rtplan.dcm",
]
DATA_SET_TRAILING_PADDING = 0xFFFCFFFC


@dataclass(frozen=True)
class Received:
    """What the callback saw: the instance and the file's bytes at that moment."""

    instance: ReceivedInstance
    data: bytes


@dataclass
class Gateway:
    """A running SCP with a recording callback whose outcome a test can change."""

    scp: StorageSCP
    received: list[Received] = field(default_factory=list)
    behaviour: Callable[[ReceivedInstance], Awaitable[StoreOutcome]] | None = None

    @property
    def port(self) -> int:
        return self.scp.port


@pytest.fixture
async def gateway(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Gateway]:
    """An SCP on a free loopback port serving ROUTE_A and ROUTE_B; logs checked for PHI."""
    caplog.set_level(logging.DEBUG)
    holder: list[Gateway] = []

    async def on_store(instance: ReceivedInstance) -> StoreOutcome:
        gw = holder[0]
        gw.received.append(Received(instance, read_source(instance.source)))
        if gw.behaviour is not None:
            return await gw.behaviour(instance)
        return StoreOutcome(SUCCESS)

    settings = ScpSettings(
        host="127.0.0.1",
        port=0,
        maximum_pdu_size=MAXIMUM_PDU_SIZE,
        acse_timeout_s=10,
        dimse_timeout_s=10,
        network_timeout_s=10,
        callback_timeout_s=10,
    )
    policy = AcceptancePolicy.of([ROUTE_A, ROUTE_B])
    async with StorageSCP(policy=policy, on_store=on_store, settings=settings) as scp:
        holder.append(Gateway(scp))
        yield holder[0]
    leaked = [r.getMessage() for r in caplog.records if PHI_MARKER in r.getMessage()]
    assert not leaked, leaked


def _values(dataset: Dataset) -> dict[int, object]:
    """Top-level element values (VR aside), without Data Set Trailing Padding."""
    return {int(elem.tag): elem.value for elem in dataset if elem.tag != DATA_SET_TRAILING_PADDING}


async def storescu(port: int, called: str, *paths: Path, extra: tuple[str, ...] = ()) -> str:
    """Run DCMTK's storescu (required contexts only) off the loop; return its output."""
    result = await asyncio.to_thread(
        run_dcmtk,
        "storescu",
        "-v",
        "-R",
        "-aec",
        called,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, paths),
    )
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


async def echoscu(port: int, called: str, *, calling: str = "ECHOSCU") -> tuple[int, str]:
    """Run DCMTK's echoscu off the loop."""
    result = await asyncio.to_thread(
        run_dcmtk, "echoscu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)
    )
    return result.returncode, result.stdout + result.stderr


async def test_storescu_files_of_many_transfer_syntaxes_reach_two_routes(
    gateway: Gateway, tmp_path: Path
) -> None:
    """storescu to two route AE titles on one port: each data set arrives as sent."""
    files = [fresh_copy(name, tmp_path) for name in SHIPPED_FILES]
    names = dict(zip(files, SHIPPED_FILES, strict=True))
    for index, path in enumerate(files):
        transfer_syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        route = ROUTE_A if index % 2 else ROUTE_B
        option = STORESCU_PROPOSE[transfer_syntax]
        out = await storescu(gateway.port, route, path, extra=(option,))
        assert out.startswith("rc=0"), out

    assert len(gateway.received) == len(files)
    identical = []
    for index, (path, got) in enumerate(zip(files, gateway.received, strict=True)):
        sent = pydicom.dcmread(path)
        assert got.instance.called_ae_title == (ROUTE_A if index % 2 else ROUTE_B)
        assert got.instance.calling_ae_title == "STORESCU"
        assert got.instance.sop_instance_uid == sent.SOPInstanceUID
        assert got.instance.sop_class_uid == sent.SOPClassUID
        assert got.instance.transfer_syntax == sent.file_meta.TransferSyntaxUID
        assert got.instance.size_bytes == len(got.data)
        received = pydicom.dcmread(pydicom.filebase.DicomBytesIO(got.data))
        assert _values(received) == _values(sent), path.name
        if got.data[got.instance.dataset_offset :] == dataset_bytes(path):
            identical.append(names[path])
    assert identical == EXPECTED_IDENTICAL_FROM_DCMTK
    assert set(SHIPPED_FILES) - set(identical) == {
        "CT_small.dcm",  # trailing padding
        "MR_small_jpeg_ls_lossless.dcm",  # trailing padding, OW pixel data
        "MR_small_jp2klossless.dcm",  # trailing padding, OW pixel data
        "JPEG2000.dcm",  # undefined-length sequence items
    }


async def test_pynetdicom_sent_bytes_arrive_bit_for_bit(gateway: Gateway, tmp_path: Path) -> None:
    """A data set sent verbatim arrives byte-identical after the meta pynetdicom writes."""
    files = [fresh_copy(name, tmp_path) for name in SHIPPED_FILES]
    for index, path in enumerate(files):
        route = ROUTE_A if index % 2 else ROUTE_B
        status = await asyncio.to_thread(pynetdicom_store, gateway.port, route, path)
        assert status.Status == SUCCESS, path.name
    assert len(gateway.received) == len(files)
    for path, got in zip(files, gateway.received, strict=True):
        assert got.data[got.instance.dataset_offset :] == dataset_bytes(path), path.name
        sent_meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        got_meta = pydicom.dcmread(pydicom.filebase.DicomBytesIO(got.data)).file_meta
        for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
            assert got_meta[keyword].value == sent_meta[keyword].value
        assert got_meta.TransferSyntaxUID == sent_meta.TransferSyntaxUID


async def test_echoscu_to_a_route_succeeds(gateway: Gateway) -> None:
    """C-ECHO to a route AE title is answered locally with success."""
    returncode, output = await echoscu(gateway.port, ROUTE_A)
    assert returncode == 0, output
    assert "Received Echo Response (Success)" in output


async def test_unknown_called_ae_is_rejected(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """An unknown called AE title is rejected permanently: called AE title not recognised."""
    returncode, output = await echoscu(gateway.port, "NOWHERE")
    assert returncode != 0
    assert "Called AE Title Not Recognized" in output, output
    out = await storescu(gateway.port, "NOWHERE", fresh_copy("CT_small.dcm", tmp_path))
    assert not out.startswith("rc=0")
    assert "Called AE Title Not Recognized" in out, out
    rejections = [r for r in caplog.records if "association rejected" in r.getMessage()]
    assert len(rejections) == 2
    assert all(
        RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED.description in r.getMessage()
        for r in rejections
    )
    assert gateway.received == []
    returncode, output = await echoscu(gateway.port, ROUTE_B)
    assert returncode == 0, output


async def test_calling_ae_outside_allow_list_is_rejected(gateway: Gateway) -> None:
    """A route with an allow-list rejects other callers: calling AE title not recognised."""
    gateway.scp.replace_policy(
        AcceptancePolicy.of([ROUTE_A, ROUTE_B], calling_ae_titles={ROUTE_A: ["MODALITY1"]})
    )
    returncode, output = await echoscu(gateway.port, ROUTE_A, calling="INTRUDER")
    assert returncode != 0
    assert "Calling AE Title Not Recognized" in output, output
    returncode, output = await echoscu(gateway.port, ROUTE_A, calling="MODALITY1")
    assert returncode == 0, output


async def test_policy_replaced_at_runtime(gateway: Gateway) -> None:
    """Replacing the policy changes the served AE titles for the next association."""
    gateway.scp.replace_policy(AcceptancePolicy.of(["NEWROUTE"]))
    returncode, _ = await echoscu(gateway.port, ROUTE_A)
    assert returncode != 0
    returncode, output = await echoscu(gateway.port, "NEWROUTE")
    assert returncode == 0, output


def _raw_exchange(port: int, payload: bytes, *, timeout_s: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        return recv_until_closed(sock, timeout_s=timeout_s)


async def test_non_dicom_bytes_close_the_connection(gateway: Gateway) -> None:
    """Bytes that are not DICOM end the connection; the next association is served."""
    junk = b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n"
    reply = await asyncio.to_thread(_raw_exchange, gateway.port, junk, timeout_s=5)
    # One A-ABORT (PS3.8 9.3.8), then the end; a reset may swallow the A-ABORT, since
    # the rest of the junk is never read.
    assert reply == b"" or (reply[:1] == b"\x07" and len(reply) == A_ABORT_LENGTH), reply
    returncode, output = await echoscu(gateway.port, ROUTE_A)
    assert returncode == 0, output


def _oversized_p_data(port: int) -> tuple[bytes, bytes]:
    """Associate over a raw socket, then announce a 2 GiB P-DATA-TF; return AC and reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(associate_rq_bytes(ROUTE_A))
        header = recv_exactly(sock, 6, timeout_s=5)
        (length,) = struct.unpack(">L", header[2:])
        accept = header + recv_exactly(sock, length, timeout_s=5)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 2**31) + b"\x00" * 1024)
        return accept, recv_until_closed(sock, timeout_s=5)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_oversized_pdu_aborts_without_reading(gateway: Gateway) -> None:
    """A P-DATA-TF above the advertised maximum is aborted at once, its body never read."""
    before = _rss_bytes()
    accept, reply = await asyncio.to_thread(_oversized_p_data, gateway.port)
    assert accept[0] == 0x02  # A-ASSOCIATE-AC
    assert reply[:1] == b"\x07", reply  # an A-ABORT, then the connection closed
    assert len(reply) == A_ABORT_LENGTH, reply
    assert _rss_bytes() - before < 32 * 1024 * 1024
    returncode, output = await echoscu(gateway.port, ROUTE_A)
    assert returncode == 0, output


async def test_unreadable_data_set_cannot_be_understood(gateway: Gateway, tmp_path: Path) -> None:
    """A data set that does not parse is refused 0xC000 with an Error Comment, not handed on."""
    uid = generate_uid()
    garbage = b"\x08\x00\x16\x00UI\x40\x00" + b"\xff" * 7  # value shorter than announced
    path = crafted_file(
        tmp_path, dataset=garbage, sop_class_uid=CT_IMAGE_STORAGE, sop_instance_uid=uid
    )
    status = await asyncio.to_thread(pynetdicom_store, gateway.port, ROUTE_A, path)
    assert status.Status == CANNOT_UNDERSTAND
    assert status.ErrorComment
    assert gateway.received == []
    status = await asyncio.to_thread(
        pynetdicom_store, gateway.port, ROUTE_A, fresh_copy("CT_small.dcm", tmp_path)
    )
    assert status.Status == SUCCESS


def _dataset_with(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    dataset = Dataset()
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = sop_instance_uid
    dataset.PatientName = PHI_MARKER
    return encode_explicit_le(dataset)


async def test_sop_instance_uid_mismatch_is_refused(gateway: Gateway, tmp_path: Path) -> None:
    """Data set SOP Instance UID differing from the command's: 0xA900 with a comment."""
    path = crafted_file(
        tmp_path,
        dataset=_dataset_with(CT_IMAGE_STORAGE, generate_uid()),
        sop_class_uid=CT_IMAGE_STORAGE,
        sop_instance_uid=generate_uid(),
    )
    status = await asyncio.to_thread(pynetdicom_store, gateway.port, ROUTE_A, path)
    assert status.Status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOP Instance UID" in status.ErrorComment
    assert gateway.received == []


async def test_sop_class_mismatch_is_refused(gateway: Gateway, tmp_path: Path) -> None:
    """Data set SOP Class UID differing from the command's: 0xA900 with a comment."""
    uid = generate_uid()
    path = crafted_file(
        tmp_path,
        dataset=_dataset_with(MR_IMAGE_STORAGE, uid),
        sop_class_uid=CT_IMAGE_STORAGE,
        sop_instance_uid=uid,
    )
    status = await asyncio.to_thread(pynetdicom_store, gateway.port, ROUTE_A, path)
    assert status.Status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOP Class UID" in status.ErrorComment
    assert gateway.received == []


async def test_callback_out_of_resources_reaches_storescu(gateway: Gateway, tmp_path: Path) -> None:
    """The callback's 0xA700 and its comment are what storescu receives."""

    async def full(instance: ReceivedInstance) -> StoreOutcome:
        return StoreOutcome(OUT_OF_RESOURCES, "outbox full")

    gateway.behaviour = full
    out = await storescu(gateway.port, ROUTE_A, fresh_copy("CT_small.dcm", tmp_path), extra=("-d",))
    assert "DIMSE Status                  : 0xa700: Refused: Out of resources" in out, out
    assert "(0000,0902) LO [outbox full]" in out, out


async def test_callback_raising_is_answered_and_serving_goes_on(
    gateway: Gateway, tmp_path: Path
) -> None:
    """A callback that raises yields 0xA700 with a comment; the next store succeeds."""

    async def broken(instance: ReceivedInstance) -> StoreOutcome:
        raise RuntimeError(PHI_MARKER)

    gateway.behaviour = broken
    status = await asyncio.to_thread(
        pynetdicom_store, gateway.port, ROUTE_A, fresh_copy("CT_small.dcm", tmp_path)
    )
    assert status.Status == OUT_OF_RESOURCES
    assert status.ErrorComment
    gateway.behaviour = None
    out = await storescu(gateway.port, ROUTE_B, fresh_copy("MR_small.dcm", tmp_path))
    assert out.startswith("rc=0"), out


async def test_stop_with_a_store_in_flight_does_not_hang(tmp_path: Path) -> None:
    """A callback still waiting when the stop's grace period ends is given up: its
    C-STORE is answered 0xA700 and the stop returns."""
    started = asyncio.Event()

    async def never(instance: ReceivedInstance) -> StoreOutcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    settings = ScpSettings(host="127.0.0.1", port=0, callback_timeout_s=30, shutdown_grace_s=1)
    scp = StorageSCP(policy=AcceptancePolicy.of([ROUTE_A]), on_store=never, settings=settings)
    async with scp:
        store = asyncio.create_task(
            asyncio.to_thread(
                pynetdicom_store, scp.port, ROUTE_A, fresh_copy("CT_small.dcm", tmp_path)
            )
        )
        await asyncio.wait_for(started.wait(), timeout=10)
        await asyncio.wait_for(scp.stop(), timeout=10)
    status = await asyncio.wait_for(store, timeout=10)
    assert status.Status == OUT_OF_RESOURCES


async def test_stop_lets_a_store_being_handed_over_finish(tmp_path: Path) -> None:
    """A C-STORE whose callback is under way when the stop begins gets the callback's own
    answer (the instance may already be stored: 0xA700 would make the modality send it
    twice), and the stop waits for it."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(instance: ReceivedInstance) -> StoreOutcome:
        started.set()
        await release.wait()
        return StoreOutcome(SUCCESS, None)

    settings = ScpSettings(host="127.0.0.1", port=0, callback_timeout_s=30, shutdown_grace_s=20)
    scp = StorageSCP(policy=AcceptancePolicy.of([ROUTE_A]), on_store=slow, settings=settings)
    async with scp:
        store = asyncio.create_task(
            asyncio.to_thread(
                pynetdicom_store, scp.port, ROUTE_A, fresh_copy("CT_small.dcm", tmp_path)
            )
        )
        await asyncio.wait_for(started.wait(), timeout=10)
        stopping = asyncio.create_task(scp.stop())
        await asyncio.sleep(0)  # let the stop begin
        assert not stopping.done()
        release.set()
        await asyncio.wait_for(stopping, timeout=20)
    status = await asyncio.wait_for(store, timeout=10)
    assert status.Status == SUCCESS


async def test_private_sop_class_is_stored(gateway: Gateway, tmp_path: Path) -> None:
    """A private SOP class is accepted and handed on (unrestricted storage service)."""
    private_class = "1.3.6.1.4.1.9590.100.1.2.999"
    uid = generate_uid()
    path = crafted_file(
        tmp_path,
        dataset=_dataset_with(private_class, uid),
        sop_class_uid=private_class,
        sop_instance_uid=uid,
    )
    status = await asyncio.to_thread(pynetdicom_store, gateway.port, ROUTE_B, path)
    assert status.Status == SUCCESS
    assert [r.instance.sop_class_uid for r in gateway.received] == [private_class]
    assert gateway.received[0].data[gateway.received[0].instance.dataset_offset :] == (
        dataset_bytes(path)
    )


def _negotiated_transfer_syntax(port: int, proposed: list[str]) -> str:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, proposed)
    assoc = ae.associate("127.0.0.1", port, ae_title=ROUTE_A)
    try:
        assert assoc.is_established
        return str(assoc.accepted_contexts[0].transfer_syntax[0])
    finally:
        assoc.release()


async def test_storage_context_gets_first_relayed_transfer_syntax(gateway: Gateway) -> None:
    """Of the transfer syntaxes proposed for a storage context, the first relayed one wins."""
    unknown = "1.2.826.0.1.3680043.9.9999.1"
    proposed = [unknown, uid.JPEGLSLossless, uid.ExplicitVRLittleEndian]
    accepted = await asyncio.to_thread(_negotiated_transfer_syntax, gateway.port, proposed)
    assert accepted == uid.JPEGLSLossless


async def test_callback_timeout_answers_out_of_resources(tmp_path: Path) -> None:
    """A callback slower than callback_timeout_s gets 0xA700 answered for it."""
    release = asyncio.Event()

    async def slow(instance: ReceivedInstance) -> StoreOutcome:
        await release.wait()
        return StoreOutcome(SUCCESS)

    settings = ScpSettings(host="127.0.0.1", port=0, callback_timeout_s=0.5)
    scp = StorageSCP(policy=AcceptancePolicy.of([ROUTE_A]), on_store=slow, settings=settings)
    async with scp:
        path = fresh_copy("CT_small.dcm", tmp_path)
        status = await asyncio.to_thread(pynetdicom_store, scp.port, ROUTE_A, path)
        release.set()
    assert status.Status == OUT_OF_RESOURCES
    assert "in time" in status.ErrorComment


async def test_small_data_sets_stay_in_memory_and_large_ones_go_to_disk(
    tmp_path: Path,
) -> None:
    """Up to ``receive_in_memory_bytes`` a data set is handed over as bytes and no file is
    ever created for it; a larger one arrives in a file in ``receive_dir``, removed once
    the callback returned. Both carry the bytes as sent."""
    receive_dir = tmp_path / "receiving"
    seen: list[tuple[type, bytes, list[str]]] = []

    async def on_store(instance: ReceivedInstance) -> StoreOutcome:
        files = sorted(p.name for p in receive_dir.iterdir())
        seen.append((type(instance.source), read_source(instance.source), files))
        return StoreOutcome(SUCCESS)

    small = fresh_copy("CT_small.dcm", tmp_path)  # about 39 KiB
    large = ct_series(tmp_path / "large", 1, rows=256, columns=256)[0]  # about 130 KiB
    settings = ScpSettings(
        host="127.0.0.1", port=0, receive_dir=receive_dir, receive_in_memory_bytes=64 * 1024
    )
    async with StorageSCP(
        policy=AcceptancePolicy.of([ROUTE_A]), on_store=on_store, settings=settings
    ) as scp:
        for path in (small, large):
            status = await asyncio.to_thread(pynetdicom_store, scp.port, ROUTE_A, path)
            assert status.Status == SUCCESS
        assert list(receive_dir.iterdir()) == []
    (small_type, small_bytes, small_files), (large_type, large_bytes, large_files) = seen
    assert small_type is bytes
    assert small_files == []
    assert large_type is not bytes
    assert len(large_files) == 1
    assert large_files[0].startswith(RECEIVE_PREFIX)
    for path, got in ((small, small_bytes), (large, large_bytes)):
        offset = dataset_offset(got)
        assert got[offset:] == dataset_bytes(path), path.name


def _hold_association(port: int, ready: threading.Event) -> bytes:
    """Associate over a raw socket and idle until the SCP ends the association."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(associate_rq_bytes(ROUTE_A))
        header = recv_exactly(sock, 6, timeout_s=10)
        recv_exactly(sock, struct.unpack(">L", header[2:])[0], timeout_s=10)
        ready.set()
        return recv_until_closed(sock, timeout_s=10)


async def test_stop_aborts_an_idle_association_after_the_grace(tmp_path: Path) -> None:
    """Stopping aborts an association its peer keeps open, once the grace period ends."""

    async def accept(instance: ReceivedInstance) -> StoreOutcome:
        return StoreOutcome(SUCCESS)

    settings = ScpSettings(host="127.0.0.1", port=0, shutdown_grace_s=0.2)
    scp = StorageSCP(policy=AcceptancePolicy.of([ROUTE_A]), on_store=accept, settings=settings)
    ready = threading.Event()
    async with scp:
        peer = asyncio.create_task(asyncio.to_thread(_hold_association, scp.port, ready))
        assert await asyncio.to_thread(ready.wait, 10)
        await asyncio.wait_for(scp.stop(), timeout=10)
    reply = await asyncio.wait_for(peer, timeout=10)
    # Closed; pynetdicom's blocking abort may shut the socket before its A-ABORT is out.
    assert reply in (b"", A_ABORT_BY_USER), reply


def test_import_refuses_another_pynetdicom_version() -> None:
    """The acceptance hooks refuse to load with any pynetdicom but the pinned one."""
    code = "import pynetdicom; pynetdicom.__version__ = '3.0.5'; import dicombridge.acceptance"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0
    assert "DependencyVersionError" in result.stderr
    assert "3.0.4" in result.stderr


def test_maximum_pdu_size_is_bounded() -> None:
    """A maximum PDU size outside 16 KiB-4 MiB is refused."""
    with pytest.raises(ValueError, match="maximum_pdu_size"):
        ScpSettings(maximum_pdu_size=0)
    with pytest.raises(ValueError, match="maximum_pdu_size"):
        ScpSettings(maximum_pdu_size=8 * 1024 * 1024)


def test_policy_validates_ae_titles() -> None:
    """Malformed, reserved or unknown AE titles in a policy are refused."""
    with pytest.raises(ValueError, match="1 to 16"):
        AcceptancePolicy.of(["A" * 17])
    with pytest.raises(ValueError, match="reserved"):
        AcceptancePolicy.of(["NO-ROUTE!"])
    with pytest.raises(ValueError, match="not a served"):
        AcceptancePolicy.of(["A"], calling_ae_titles={"B": ["C"]})
    policy = AcceptancePolicy.of(["ROUTE "], calling_ae_titles={"ROUTE": ["MOD"]})
    assert policy.decide("ROUTE", "MOD") is None
    assert policy.decide("ROUTE", "OTHER") is RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
    assert policy.decide("ELSE", "MOD") is RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED
