"""`dicombridge send`: files to a Storage SCP as they are on disk, with a summary and exit
codes; against DCMTK's storescp +B, the gateway's own SCP, and a real relay to Orthanc."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid

from dicombridge import identity, sender
from dicombridge.acceptance import AcceptancePolicy
from dicombridge.config import LocalNode
from dicombridge.errors import ConfigError
from dicombridge.orthanc import OrthancServer, free_port
from dicombridge.rabbitmq import BrokerNode
from dicombridge.scp import ReceivedInstance, ScpSettings, StorageSCP, StoreOutcome
from tests.dicomkit import read_source
from tests.pacskit import StoreSCPNode, dataset_bytes, fresh_copy, sop_instance_uid, wait_for
from tests.relaykit import Route, ct_series, delete_users, make_two_sites, running_gateways

pytestmark = pytest.mark.timeout(180)

CLI: Final = [sys.executable, "-c", "from dicombridge.cli import main; main()"]
ROUTE: Final = "SITE_B"
SUCCESS: Final = 0x0000
# pydicom's shipped files in six transfer syntaxes (explicit and implicit little endian,
# big endian, deflated, JPEG 2000, RLE).
SHIPPED: Final = (
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
)
# 13 SOP classes x 10 transfer syntaxes: 130 presentation contexts, two associations.
SOP_CLASSES: Final = tuple(
    f"1.2.840.10008.5.1.4.1.1.{suffix}"
    for suffix in (
        "2",
        "4",
        "1",
        "6.1",
        "7",
        "20",
        "128",
        "12.1",
        "12.2",
        "1.1",
        "1.2",
        "481.5",
        "481.2",
    )
)
TRANSFER_SYNTAXES: Final = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
)


def run_send(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`dicombridge send ARGS` as a subprocess."""
    return subprocess.run(
        [*CLI, "send", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The --json summary on stdout."""
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def tiny_instance(directory: Path, sop_class_uid: str, transfer_syntax: str) -> Path:
    """A small instance without pixel data: in an encapsulated transfer syntax its data
    set is plain explicit VR little endian, so any syntax can label it."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "SEND-0001"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCPNode]:
    """DCMTK's storescp +B (bit preserving), every transfer syntax it knows."""
    node = StoreSCPNode.start(tmp_path / "storescp")
    yield node
    node.stop()


# --- files and plans --------------------------------------------------------------------


def test_collect_walks_directories_in_order_and_skips_what_is_not_dicom(tmp_path: Path) -> None:
    """Directories are walked recursively in name order, each file once; a text file,
    an empty file, a DICOMDIR and a file without transfer syntax are skipped with why."""
    top = tmp_path / "study"
    second = fresh_copy("MR_small_implicit.dcm", top / "b")
    first = fresh_copy("CT_small.dcm", top / "a")
    (top / "notes.txt").write_text("not an image")
    (top / "empty.dcm").write_bytes(b"")
    dicomdir = tiny_instance(top / "c", sender.MEDIA_STORAGE_DIRECTORY, "1.2.840.10008.1.2.1")
    no_syntax = top / "c" / "no-syntax.dcm"
    raw = fresh_copy("CT_small.dcm", tmp_path / "x").read_bytes()
    no_syntax.write_bytes(raw.replace(b"\x02\x00\x10\x00UI", b"\x02\x00\x11\x00UI", 1))
    collected = sender.collect([top, first])
    assert [f.path for f in collected.files] == [first, second]
    assert collected.files[0].transfer_syntax == "1.2.840.10008.1.2.1"
    assert collected.files[0].dataset_bytes == len(dataset_bytes(first))
    reasons = {s.path.name: s.reason for s in collected.skipped}
    assert reasons == {
        "notes.txt": "not a DICOM Part 10 file",
        "empty.dcm": "not a DICOM Part 10 file",
        dicomdir.name: "a DICOMDIR (an index of files), not an instance",
        "no-syntax.dcm": "file meta lacks TransferSyntaxUID",
    }
    with pytest.raises(ConfigError, match="no such file or directory"):
        sender.collect([tmp_path / "absent"])


def _planned(name: str, sop_class_uid: str) -> sender.DicomFile:
    return sender.DicomFile(
        path=Path(name),
        sop_class_uid=sop_class_uid,
        sop_instance_uid=generate_uid(),
        transfer_syntax="1.2.840.10008.1.2.1",
        dataset_bytes=1,
    )


def test_plan_cuts_at_128_contexts_keeping_the_order() -> None:
    """Files are grouped in order into associations of at most 128 distinct (SOP class,
    transfer syntax) pairs; a pair seen before the cut is proposed again after it."""
    files = [_planned(f"{n}.dcm", f"1.2.3.{n}") for n in range(130)]
    files.insert(5, _planned("again.dcm", "1.2.3.0"))
    files.append(_planned("late.dcm", "1.2.3.0"))
    batches = sender.plan_associations(files)
    assert [len({f.pair for f in batch}) for batch in batches] == [128, 3]
    assert [f for batch in batches for f in batch] == files
    assert [f.path.name for f in batches[1]] == ["128.dcm", "129.dcm", "late.dcm"]


# --- against storescp +B -----------------------------------------------------------------


def test_send_stores_every_file_byte_for_byte_and_summarises(
    tmp_path: Path, storescp: StoreSCPNode
) -> None:
    """Six transfer syntaxes in nested directories and a text file: exit 0, each data set
    stored exactly as in its file, the text file named as skipped, figures in --json."""
    files = [fresh_copy(name, tmp_path / "in" / str(n % 2)) for n, name in enumerate(SHIPPED)]
    notes = tmp_path / "in" / "notes.txt"
    notes.write_text("hello")
    result = run_send(tmp_path / "in", "--to", "STORESCP", "--port", str(storescp.port), "--json")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["instances"] == summary["succeeded"] == len(files)
    assert summary["failed"] == summary["warnings"] == 0
    assert summary["skipped_files"] == [{"path": str(notes), "reason": "not a DICOM Part 10 file"}]
    assert summary["bytes"] == sum(len(dataset_bytes(p)) for p in files)
    assert summary["associations"] == 1
    assert summary["calling_ae_title"] == sender.DEFAULT_CALLING_AE_TITLE
    assert summary["rate_bytes_per_s"] > 0
    for path in files:
        stored = storescp.wait_stored(path.stem)
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
    assert storescp.associations() == 1


def test_more_than_128_contexts_take_a_second_association(
    tmp_path: Path, storescp: StoreSCPNode
) -> None:
    """130 (SOP class, transfer syntax) pairs go over two associations, all stored."""
    paths = [
        tiny_instance(tmp_path / "in", sop, syntax)
        for sop in SOP_CLASSES
        for syntax in TRANSFER_SYNTAXES
    ]
    result = run_send(tmp_path / "in", "--to", "ANY", "--port", str(storescp.port), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = summary_of(result)
    assert summary["succeeded"] == len(paths) == 130
    assert summary["associations"] == 2
    wait_for(lambda: storescp.associations() == 2, what="storescp to log two associations")
    for path in paths:
        assert dataset_bytes(storescp.wait_stored(path.stem)) == dataset_bytes(path)


def test_port_comes_from_the_gateway_config(tmp_path: Path, storescp: StoreSCPNode) -> None:
    """Without --port the [gateway] port of --config is used (host 0.0.0.0: loopback)."""
    config = identity.init_site(
        tmp_path / "site", site_id="hosp-a", broker_url="amqp://hosp-a@127.0.0.1:5672/x"
    )
    config.write_text(config.read_text().replace("port = 11112", f"port = {storescp.port}", 1))
    path = fresh_copy("CT_small.dcm", tmp_path / "in")
    result = run_send(path, "--to", "STORESCP", env={"DICOMBRIDGE_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert f"to STORESCP at 127.0.0.1:{storescp.port}" in result.stdout
    storescp.wait_stored(path.stem)


def test_sender_socket_has_tcp_nodelay(tmp_path: Path, storescp: StoreSCPNode) -> None:
    """The association's socket is opened with TCP_NODELAY."""
    peer = sender.Peer("127.0.0.1", storescp.port, "STORESCP")
    assoc = sender.Sender(peer).associate([("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")])
    try:
        assert assoc.dul.socket is not None
        sock = assoc.dul.socket.socket
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_progress_bar_on_a_terminal(tmp_path: Path, storescp: StoreSCPNode) -> None:
    """With stderr on a terminal, a progress bar shows instances and bytes; the summary
    still goes to stdout."""
    for n in range(3):
        fresh_copy(SHIPPED[n], tmp_path / "in")
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            [*CLI, "send", str(tmp_path / "in"), "--to", "X", "--port", str(storescp.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
        )
    finally:
        os.close(slave)
    terminal = b""
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                terminal += os.read(master, 65536)
        while select.select([master], [], [], 0.2)[0]:
            terminal += os.read(master, 65536)
    except OSError:  # EIO: the child closed the terminal
        pass
    finally:
        os.close(master)
    stdout = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, terminal
    text = terminal.decode(errors="replace")
    assert "sending" in text
    assert "3/3 instances" in text
    assert "sent 3 instance(s)" in stdout
    assert "instances" not in stdout.split("\n", 1)[1]


# --- usage errors -----------------------------------------------------------------------


def test_connection_refused_names_host_and_port(tmp_path: Path) -> None:
    """Nothing listening: exit 2 and one line naming host:port and the fix."""
    port = free_port()
    path = fresh_copy("CT_small.dcm", tmp_path)
    result = run_send(path, "--to", ROUTE, "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: 127.0.0.1:{port}: --host/--port: connection refused")
    assert "dicombridge gateway run" in result.stderr
    assert result.stderr.count("\n") == 1


def test_only_files_that_are_not_dicom_exit_1_naming_them(tmp_path: Path) -> None:
    """No DICOM file at all: nothing is sent (no connection), exit 1, the files named."""
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.bin").write_bytes(os.urandom(300))
    result = run_send(tmp_path, "--to", ROUTE, "--port", str(free_port()))
    assert result.returncode == 1, result.stderr
    assert "sent 0 instance(s)" in result.stdout
    assert f"{tmp_path / 'a.txt'}: not a DICOM Part 10 file" in result.stdout
    assert f"{tmp_path / 'b.bin'}: not a DICOM Part 10 file" in result.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--to", "A" * 17), "--to"),
        (("--to", ROUTE, "--calling-ae", "BAD\\AE"), "--calling-ae"),
        (("--to", ROUTE, "--port", "0"), "--port"),
    ],
    ids=["called-too-long", "calling-backslash", "port-zero"],
)
def test_bad_options_are_usage_errors(tmp_path: Path, args: tuple[str, ...], named: str) -> None:
    """A bad AE title or port exits 2 naming the option."""
    result = run_send(tmp_path, *args)
    assert result.returncode == 2
    assert named in result.stderr


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    """A path that does not exist exits 2 naming it."""
    result = run_send(tmp_path / "nope", "--to", ROUTE)
    assert result.returncode == 2
    assert f"{tmp_path / 'nope'}: PATH: no such file or directory" in result.stderr


# --- against the gateway's SCP ------------------------------------------------------------


@dataclass
class Scp:
    """The gateway's Storage SCP on a free port, answering as ``outcomes`` says."""

    scp: StorageSCP
    outcomes: dict[str, StoreOutcome] = field(default_factory=dict)
    received: dict[str, bytes] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.scp.port


@pytest.fixture
async def gateway_scp() -> AsyncIterator[Scp]:
    """The SCP serving route SITE_B, which only calling AE MODALITY may use on
    route RESTRICTED."""
    holder: list[Scp] = []

    async def on_store(instance: ReceivedInstance) -> StoreOutcome:
        scp = holder[0]
        data = read_source(instance.source)
        scp.received[instance.sop_instance_uid] = data[instance.dataset_offset :]
        return scp.outcomes.get(instance.sop_instance_uid, StoreOutcome(SUCCESS))

    policy = AcceptancePolicy.of(
        [ROUTE, "RESTRICTED"], calling_ae_titles={"RESTRICTED": ["MODALITY"]}
    )
    settings = ScpSettings(host="127.0.0.1", port=0, callback_timeout_s=10)
    async with StorageSCP(policy=policy, on_store=on_store, settings=settings) as scp:
        holder.append(Scp(scp))
        yield holder[0]


async def test_failures_and_warnings_are_summarised_by_status_and_exit_1(
    tmp_path: Path, gateway_scp: Scp
) -> None:
    """One success, a 0xB000 warning and a 0xA700 failure with Error Comments: exit 1;
    the summary groups them by status with the comments and file names."""
    ok, warned, failed = (fresh_copy("CT_small.dcm", tmp_path / "in" / n) for n in "abc")
    gateway_scp.outcomes[warned.stem] = StoreOutcome(0xB000, "coerced: Patient ID")
    gateway_scp.outcomes[failed.stem] = StoreOutcome(0xA700, "outbox full, retry later")
    common = ("--to", ROUTE, "--port", str(gateway_scp.port))
    result = await asyncio.to_thread(run_send, tmp_path / "in", *common)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"sent 3 instance(s) to {ROUTE} at 127.0.0.1:{gateway_scp.port} as DICOMBRIDGE_SEND: "
        "1 succeeded, 1 with a warning, 1 failed"
    )
    assert "  warning 0xB000 (Coercion of Data Elements): 1" in lines
    assert f"    {warned}: coerced: Patient ID" in lines
    assert "  failed 0xA700 (Refused: Out of Resources): 1" in lines
    assert f"    {failed}: outbox full, retry later" in lines
    for path in (ok, warned, failed):
        assert gateway_scp.received[path.stem] == dataset_bytes(path)

    result = await asyncio.to_thread(run_send, tmp_path / "in", *common, "--json")
    assert result.returncode == 1
    summary = summary_of(result)
    assert (summary["succeeded"], summary["warnings"], summary["failed"]) == (1, 1, 1)
    assert summary["failed_by_status"] == {"0xA700": 1}
    assert summary["warnings_by_status"] == {"0xB000": 1}
    assert summary["failed_instances"] == [
        {
            "path": str(failed),
            "sop_instance_uid": failed.stem,
            "status": "0xA700",
            "meaning": "Refused: Out of Resources",
            "error_comment": "outbox full, retry later",
        }
    ]
    assert summary["bytes"] == sum(len(dataset_bytes(p)) for p in (ok, warned, failed))


async def test_unknown_called_ae_is_rejected_with_the_fix(tmp_path: Path, gateway_scp: Scp) -> None:
    """An AE title that is no route: exit 2, naming it and `dicombridge routes add`."""
    path = fresh_copy("CT_small.dcm", tmp_path)
    result = await asyncio.to_thread(
        run_send, path, "--to", "NO_SUCH_ROUTE", "--port", str(gateway_scp.port)
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: 127.0.0.1:{gateway_scp.port}: --to: association rejected: called AE title "
        "'NO_SUCH_ROUTE' not recognised. Fix: add a route with `dicombridge routes add "
        "NO_SUCH_ROUTE --site SITE` on that gateway, or pick one from `dicombridge routes list`\n"
    )
    assert gateway_scp.received == {}


async def test_calling_ae_outside_the_route_is_rejected_naming_the_option(
    tmp_path: Path, gateway_scp: Scp
) -> None:
    """A route that takes only some calling AE titles: exit 2 naming --calling-ae;
    with an allowed one the same send succeeds."""
    path = fresh_copy("CT_small.dcm", tmp_path)
    common = (path, "--to", "RESTRICTED", "--port", str(gateway_scp.port))
    result = await asyncio.to_thread(run_send, *common)
    assert result.returncode == 2
    assert "--calling-ae: association rejected: calling AE title 'DICOMBRIDGE_SEND'" in (
        result.stderr
    )
    result = await asyncio.to_thread(run_send, *common, "--calling-ae", "MODALITY")
    assert result.returncode == 0, result.stderr
    assert gateway_scp.received[path.stem] == dataset_bytes(path)


# --- through a real relay ------------------------------------------------------------------


@pytest.mark.integration
async def test_send_through_a_gateway_reaches_orthanc_at_the_other_site(
    tmp_path: Path, rabbitmq_node: BrokerNode, orthanc_b: OrthancServer
) -> None:
    """`send --config A --to ROUTE` reaches gateway A on its configured port; every
    instance is in site B's Orthanc; an unknown route is refused by the real gateway."""
    vhost = f"t-send-{secrets.token_hex(4)}"
    sites = make_two_sites(
        tmp_path / "fed",
        broker=rabbitmq_node,
        vhost=vhost,
        routes=[Route(ROUTE, "PACS")],
        nodes_b=[
            LocalNode(
                name="PACS",
                ae_title=orthanc_b.ae_title,
                host="127.0.0.1",
                port=orthanc_b.dicom_port,
            )
        ],
    )
    series = ct_series(tmp_path / "series", 5, rows=64, columns=64)
    try:
        async with running_gateways(sites.config_a, sites.config_b):
            result = await asyncio.to_thread(
                run_send, tmp_path / "series", "--to", ROUTE, "--config", sites.config_a, "--json"
            )
            assert result.returncode == 0, result.stderr
            summary = summary_of(result)
            assert summary["port"] == sites.port_a
            assert summary["succeeded"] == len(series)
            refused = await asyncio.to_thread(
                run_send, series[0], "--to", "NOT_A_ROUTE", "--config", sites.config_a
            )
            assert refused.returncode == 2
            assert "called AE title 'NOT_A_ROUTE' not recognised" in refused.stderr
            uids = {sop_instance_uid(p) for p in series}

            def all_in_orthanc() -> bool:
                with orthanc_b.client() as client:
                    return uids <= set(client.iter_sop_instance_uids())

            await asyncio.to_thread(
                wait_for, all_in_orthanc, timeout_s=60, interval_s=0.2, what="series in Orthanc B"
            )
    finally:
        with rabbitmq_node.management() as management:
            delete_users(management, sites)
            management.delete_vhost(vhost)
