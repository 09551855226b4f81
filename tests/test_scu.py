"""StoreSCU against real peers: DCMTK's storescp (bit preserving) and Orthanc."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicombridge.config import LocalNode
from dicombridge.orthanc import OrthancServer, OrthancSettings, free_port
from dicombridge.scu import (
    STATUS_NO_ASSOCIATION,
    STATUS_NOT_ACCEPTED,
    STATUS_UNREADABLE_FILE,
    OutcomeKind,
    StoreSCU,
    StoreSCUPool,
    classify_status,
)
from tests.pacskit import (
    SHIPPED_BY_TRANSFER_SYNTAX,
    StoreSCPNode,
    dataset_bytes,
    dcmtk_storescu,
    fresh_copy,
    restricted_storescp_args,
    sop_class_uid,
    sop_instance_uid,
    transfer_syntax,
    wait_for,
)
from tests.relaykit import ct_series

pytestmark = pytest.mark.integration

CALLING_AE = "BRIDGE"
PACS_AE = "PACS"


def orthanc_associations(server: OrthancServer) -> int:
    """Associations Orthanc received, from its log (``--verbose-dicom``)."""
    return len(re.findall(r"Association Received from AET", server.log_path.read_text()))


@pytest.fixture(scope="module")
def orthancs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancServer, ...]]:
    """Two identically configured Orthancs: A receives through StoreSCU, B from DCMTK."""
    root = tmp_path_factory.mktemp("orthanc")
    settings = OrthancSettings(ae_title=PACS_AE, verbose_dicom=True)
    servers: list[OrthancServer] = []
    try:
        for name in ("a", "b"):
            servers.append(OrthancServer.start(root / name, settings))
        yield tuple(servers)
    finally:
        with ThreadPoolExecutor() as pool:
            list(pool.map(lambda server: server.stop(), servers))


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCPNode]:
    """DCMTK's storescp +B accepting every transfer syntax it knows (+xa)."""
    node = StoreSCPNode.start(tmp_path / "storescp")
    yield node
    node.stop()


def node_of(port: int, ae_title: str) -> LocalNode:
    return LocalNode(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


def shipped_copies(directory: Path, *, strip_trailing_padding: bool = False) -> list[Path]:
    return [
        fresh_copy(name, directory, strip_trailing_padding=strip_trailing_padding)
        for name in SHIPPED_BY_TRANSFER_SYNTAX.values()
    ]


def test_every_transfer_syntax_arrives_bit_identical_in_storescp(
    tmp_path: Path, storescp: StoreSCPNode
) -> None:
    """Files in nine transfer syntaxes arrive in storescp +B with the sent data set bytes."""
    files = shipped_copies(tmp_path / "in")
    with StoreSCU(node_of(storescp.port, storescp.ae_title), calling_ae_title=CALLING_AE) as scu:
        outcomes = [scu.store(path) for path in files]
    assert [o.kind for o in outcomes] == [OutcomeKind.SUCCESS] * len(files), outcomes
    for path, outcome in zip(files, outcomes, strict=True):
        uid = sop_instance_uid(path)
        assert outcome.sop_instance_uid == uid
        stored = storescp.wait_stored(uid)
        assert transfer_syntax(stored) == transfer_syntax(path)
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
        assert outcome.bytes_sent == len(dataset_bytes(path))


def test_new_pairs_renegotiate_once_then_one_association_serves_all(
    tmp_path: Path, storescp: StoreSCPNode
) -> None:
    """A new (SOP class, transfer syntax) pair renegotiates; once all were seen, one
    association carries every pair (counted by StoreSCU and in storescp's log)."""
    files = shipped_copies(tmp_path / "in")
    with StoreSCU(node_of(storescp.port, storescp.ae_title), calling_ae_title=CALLING_AE) as scu:
        first = [scu.store(path) for path in files]
        opened_first_round = scu.associations_opened
        again = [scu.store(path) for path in shipped_copies(tmp_path / "again")]
        for path in files:  # interleaved re-sends of the same pairs
            assert scu.store(path).is_stored
        assert all(o.is_stored for o in first + again)
        assert 1 < opened_first_round <= len(files)
        assert scu.associations_opened == opened_first_round
    wait_for(
        lambda: storescp.associations() == opened_first_round,
        what="storescp to log every association",
    )


def test_several_instances_share_one_association(tmp_path: Path, storescp: StoreSCPNode) -> None:
    """Five instances with SOP classes and syntaxes announced up front use one association."""
    files = shipped_copies(tmp_path / "in")[:5]
    sop_classes = sorted({str(sop_class_uid(path)) for path in files})
    with StoreSCU(
        node_of(storescp.port, storescp.ae_title),
        calling_ae_title=CALLING_AE,
        sop_classes=sop_classes,
        transfer_syntaxes=[transfer_syntax(path) for path in files],
    ) as scu:
        outcomes = [scu.store(path) for path in files]
        assert scu.associations_opened == 1
        assert scu.instances_sent == len(files)
        transport = scu._assoc.dul.socket if scu._assoc else None
        assert transport is not None
        assert transport.socket is not None
        assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert all(o.is_stored for o in outcomes)
    assert storescp.associations() == 1
    for path in files:
        storescp.wait_stored(sop_instance_uid(path))


def test_idle_association_is_released_and_renewed(tmp_path: Path, storescp: StoreSCPNode) -> None:
    """After idle_timeout_s the association is released; the next store opens a new one."""
    files = [fresh_copy("CT_small.dcm", tmp_path / "in") for _ in range(2)]
    node = node_of(storescp.port, storescp.ae_title)
    with StoreSCU(node, calling_ae_title=CALLING_AE, idle_timeout_s=0.3) as scu:
        assert scu.store(files[0]).is_stored
        wait_for(lambda: not scu.is_associated, timeout_s=5, what="idle release")
        wait_for(lambda: "Association Release" in storescp.log(), what="storescp release log")
        assert scu.store(files[1]).is_stored
        assert scu.associations_opened == 2
    assert storescp.associations() == 2


def test_association_ended_by_peer_is_renewed(tmp_path: Path) -> None:
    """When the peer ends an idle association (Orthanc's DicomScpTimeout of 1 s), the next
    store negotiates a new one instead of failing."""
    settings = OrthancSettings(ae_title=PACS_AE, dicom_scp_timeout_s=1, verbose_dicom=True)
    with OrthancServer.start(tmp_path / "orthanc", settings) as orthanc:
        files = [fresh_copy("CT_small.dcm", tmp_path / "in") for _ in range(2)]
        node = node_of(orthanc.dicom_port, PACS_AE)
        with StoreSCU(node, calling_ae_title=CALLING_AE, idle_timeout_s=60) as scu:
            assert scu.store(files[0]).is_stored
            wait_for(lambda: not scu.is_associated, timeout_s=10, what="Orthanc to end it")
            outcome = scu.store(files[1])
            assert outcome.is_stored, outcome
            assert scu.associations_opened == 2
        assert orthanc_associations(orthanc) == 2
        with orthanc.client() as client:
            assert client.count_instances() == 2


def test_pacs_down_is_a_transient_outcome(tmp_path: Path) -> None:
    """A closed port gives a transient outcome with the stand-in status, not an exception."""
    path = fresh_copy("CT_small.dcm", tmp_path)
    with StoreSCU(node_of(free_port(), PACS_AE), calling_ae_title=CALLING_AE) as scu:
        outcome = scu.store(path)
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.is_transient
        assert not outcome.is_stored
        assert outcome.status == STATUS_NO_ASSOCIATION
        assert not outcome.from_peer
        assert scu.associations_opened == 0


def test_refused_sop_class_or_transfer_syntax_is_permanent(tmp_path: Path) -> None:
    """A node accepting CT and SC uncompressed only: MR (SOP class) and JPEG (transfer
    syntax) are permanent outcomes, and CT keeps flowing."""
    workdir = tmp_path / "storescp"
    workdir.mkdir()
    peer = StoreSCPNode.start(workdir, extra_args=restricted_storescp_args(workdir))
    try:
        ct = [fresh_copy("CT_small.dcm", tmp_path / "in") for _ in range(2)]
        mr = fresh_copy("MR_small_implicit.dcm", tmp_path / "in")
        jpeg = fresh_copy("SC_rgb_jpeg_dcmtk.dcm", tmp_path / "in")
        node = node_of(peer.port, peer.ae_title)
        with StoreSCU(node, calling_ae_title=CALLING_AE) as scu:
            assert scu.store(ct[0]).is_stored
            refused_sop = scu.store(mr)
            refused_ts = scu.store(jpeg)
            assert scu.store(ct[1]).is_stored
        for outcome, word in ((refused_sop, "SOP class"), (refused_ts, "transfer syntax")):
            assert outcome.kind is OutcomeKind.PERMANENT, outcome
            assert outcome.status == STATUS_NOT_ACCEPTED
            assert not outcome.from_peer
            assert outcome.error_comment is not None
            assert word in outcome.error_comment
        # A first association where nothing is acceptable: pynetdicom aborts it.
        with StoreSCU(node, calling_ae_title=CALLING_AE) as scu:
            outcome = scu.store(mr)
            assert outcome.kind is OutcomeKind.PERMANENT, outcome
            assert outcome.status == STATUS_NOT_ACCEPTED
        assert peer.stored(sop_instance_uid(mr)) is None
        peer.wait_stored(sop_instance_uid(ct[1]))
    finally:
        peer.stop()


def test_orthanc_stores_the_same_file_as_from_dcmtk(
    tmp_path: Path, orthancs: tuple[OrthancServer, ...]
) -> None:
    """Orthanc A (fed by StoreSCU) holds the same file bytes as the identically configured
    Orthanc B fed directly by DCMTK's storescu, for every transfer syntax, over one
    association (Orthanc's log)."""
    orthanc_a, orthanc_b = orthancs
    # DCMTK's storescu drops trailing padding: the reference path must not see any.
    files = shipped_copies(tmp_path / "in", strip_trailing_padding=True)
    uids = [sop_instance_uid(path) for path in files]
    before_a = orthanc_associations(orthanc_a)
    with orthanc_a.client() as client_a, orthanc_b.client() as client_b:
        count_a = client_a.count_instances()
        with StoreSCU(
            node_of(orthanc_a.dicom_port, PACS_AE),
            calling_ae_title=CALLING_AE,
            sop_classes=sorted({str(sop_class_uid(path)) for path in files}),
            transfer_syntaxes=list(SHIPPED_BY_TRANSFER_SYNTAX),
        ) as scu:
            outcomes = [scu.store(path) for path in files]
            assert scu.associations_opened == 1
        assert all(o.kind is OutcomeKind.SUCCESS for o in outcomes), outcomes
        for path in files:
            result = dcmtk_storescu(
                orthanc_b.dicom_port, PACS_AE, path, calling_ae_title=CALLING_AE
            )
            assert result.returncode == 0, result.stderr
        assert client_a.count_instances() == count_a + len(files)
        assert set(uids) <= set(client_a.iter_sop_instance_uids())
        for path, uid in zip(files, uids, strict=True):
            stored_a = client_a.file_by_uid(uid)
            stored_b = client_b.file_by_uid(uid)
            assert stored_a is not None
            assert stored_b is not None
            assert stored_a == stored_b, path.name
    wait_for(
        lambda: orthanc_associations(orthanc_a) == before_a + 1,
        what="Orthanc to log one association",
    )


def test_pool_stores_on_as_many_associations_as_members(
    tmp_path: Path, orthancs: tuple[OrthancServer, ...]
) -> None:
    """A StoreSCUPool of two, called from four threads, stores every instance over two
    associations (one per member, counted by the pool and in Orthanc's log); once closed
    it refuses to store."""
    orthanc_a, _ = orthancs
    files = ct_series(tmp_path / "series", 12, rows=16, columns=16)
    before = orthanc_associations(orthanc_a)
    pool = StoreSCUPool(
        node_of(orthanc_a.dicom_port, PACS_AE),
        size=2,
        calling_ae_title=CALLING_AE,
        sop_classes=[str(sop_class_uid(files[0]))],
        transfer_syntaxes=[transfer_syntax(files[0])],
    )
    try:
        with ThreadPoolExecutor(max_workers=4) as threads:
            outcomes = list(threads.map(pool.store, files))
        assert all(o.kind is OutcomeKind.SUCCESS for o in outcomes), outcomes
        assert (pool.associations_opened, pool.instances_sent) == (2, len(files))
        assert [m.instances_sent > 0 for m in pool.members] == [True, True]
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.store(files[0])
    with orthanc_a.client() as client:
        stored = set(client.iter_sop_instance_uids())
    assert {sop_instance_uid(path) for path in files} <= stored
    wait_for(
        lambda: orthanc_associations(orthanc_a) == before + 2,
        what="Orthanc to log two associations",
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0x0000, OutcomeKind.SUCCESS),
        (0x0001, OutcomeKind.WARNING),
        (0xB000, OutcomeKind.WARNING),
        (0xB006, OutcomeKind.WARNING),
        (0xB007, OutcomeKind.WARNING),
        (0xA700, OutcomeKind.TRANSIENT),
        (0xA7FF, OutcomeKind.TRANSIENT),
        (0x0213, OutcomeKind.TRANSIENT),
        (0x0210, OutcomeKind.TRANSIENT),
        (0xA900, OutcomeKind.PERMANENT),
        (0xA9FF, OutcomeKind.PERMANENT),
        (0xC000, OutcomeKind.PERMANENT),
        (0xCFFF, OutcomeKind.PERMANENT),
        (0x0122, OutcomeKind.PERMANENT),
        (0x0124, OutcomeKind.PERMANENT),
        (0x0117, OutcomeKind.PERMANENT),
        (0xFF00, OutcomeKind.PERMANENT),
        (0x1234, OutcomeKind.PERMANENT),
    ],
)
def test_classification_table(status: int, kind: OutcomeKind) -> None:
    """PS3.4 B.2.3 / PS3.7 C statuses map to success, warning, transient or permanent;
    an unknown status is permanent, never success."""
    assert classify_status(status) is kind


def test_unreadable_file_and_closed_scu(tmp_path: Path) -> None:
    """A file that is not Part 10 is a permanent outcome; a closed SCU refuses to work."""
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    scu = StoreSCU(node_of(free_port(), PACS_AE), calling_ae_title=CALLING_AE)
    outcome = scu.store(junk)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.status == STATUS_UNREADABLE_FILE
    assert not outcome.from_peer
    scu.close()
    with pytest.raises(RuntimeError, match="closed"):
        scu.store(fresh_copy("CT_small.dcm", tmp_path))


def test_max_pdu_is_bounded() -> None:
    """A maximum PDU outside 16 KiB..4 MiB is refused at construction."""
    node = node_of(104, PACS_AE)
    with pytest.raises(ValueError, match="max_pdu_bytes"):
        StoreSCU(node, calling_ae_title=CALLING_AE, max_pdu_bytes=64 * 1024 * 1024)


def test_move_originator_is_sent(tmp_path: Path) -> None:
    """Move Originator AE Title and Message ID reach the peer (storescp's debug log)."""
    peer = StoreSCPNode.start(tmp_path / "storescp", extra_args=("+xa", "-d"))
    try:
        path = fresh_copy("CT_small.dcm", tmp_path / "in")
        with StoreSCU(node_of(peer.port, peer.ae_title), calling_ae_title=CALLING_AE) as scu:
            outcome = scu.store(
                path, move_originator_ae_title="MOVER", move_originator_message_id=4242
            )
        assert outcome.is_stored
        wait_for(lambda: "MOVER" in peer.log(), what="storescp to log the originator")
        assert "4242" in peer.log()
    finally:
        peer.stop()
