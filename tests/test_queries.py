"""Query documents, the responding site's policy and the requester's ordering, without a
broker (the end-to-end behaviour is in tests/integration/test_query.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicombridge.config import RemoteAccessEntry, RouteEntry
from dicombridge.control import Cancel, Query, QueryResponse, SubOperations
from dicombridge.errors import IntegrityError, TransportError
from dicombridge.qr_scp import from_explicit_little, to_explicit_little
from dicombridge.query_policy import STATUS_NOT_AUTHORISED, RemoteAccessPolicy, has_value
from dicombridge.requester import Requester, ScpRequest
from tests.dicomkit import encode_explicit_le

QID = "ab" * 16


def identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def query(operation: str = "find", ds: Dataset | None = None) -> Query:
    return Query(
        query_id=QID,
        operation=operation,  # type: ignore[arg-type]
        node="PACS",
        calling_ae_title="WS",
        called_ae_title="SITE_B",
        timeout_s=30,
        model="study",
        identifier=None if ds is None else encode_explicit_le(ds),
    )


def test_query_and_responses_round_trip_their_documents() -> None:
    sent = Query(
        QID, "get", "PACS", "WS", "SITE_B", 12.5, "patient", b"\x08\x00", (("1.2", "1.2.840"),)
    )
    assert Query.from_document(sent.to_document()) == sent
    response = QueryResponse(
        QID,
        3,
        0xB000,
        final=True,
        identifier=b"x",
        error_comment="partly",
        counts=SubOperations(0, 5, 1, 0),
        failed_sop_instance_uids=("1.2.3",),
        clock=1234.5,
    )
    assert QueryResponse.from_document(response.to_document()) == response
    assert Cancel.from_document(Cancel(QID).to_document()) == Cancel(QID)


@pytest.mark.parametrize(
    "edit",
    [
        {"operation": "delete"},
        {"model": "worklist"},
        {"timeout_s": -1},
        {"timeout_s": "30"},
        {"query_id": "short"},
        {"identifier": "not base64!"},
        {"node": ""},
    ],
)
def test_malformed_query_is_an_integrity_error(edit: dict[str, Any]) -> None:
    document = {**query().to_document(), **edit}
    with pytest.raises(IntegrityError):
        Query.from_document(document)


@pytest.mark.parametrize(
    "edit",
    [{"seq": -1}, {"status": 0x10000}, {"final": 1}, {"counts": [1, 2]}, {"clock": "now"}],
)
def test_malformed_response_is_an_integrity_error(edit: dict[str, Any]) -> None:
    document = {**QueryResponse(QID, 0, 0, final=True).to_document(), **edit}
    with pytest.raises(IntegrityError):
        QueryResponse.from_document(document)


def test_identifier_bytes_keep_non_ascii_values_through_both_transfer_syntaxes() -> None:
    ds = identifier("PATIENT", PatientName="Müller^Jürgen", PatientID="")
    ds.SpecificCharacterSet = "ISO_IR 100"
    explicit = encode_explicit_le(ds)
    assert "Müller".encode("latin-1") in explicit
    assert to_explicit_little(explicit, "1.2.840.10008.1.2.1") == explicit
    back = from_explicit_little(explicit)
    assert str(back.PatientName) == "Müller^Jürgen"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", False), ("*", False), ("?*", False), ("^*", False), ("Mül*", True), ("P-1", True)],
)
def test_wildcards_alone_are_no_value(value: str, expected: bool) -> None:
    assert has_value(identifier("PATIENT", PatientName=value), "PatientName") is expected


def test_policy_checks_site_operation_level_and_required_keys() -> None:
    policy = RemoteAccessPolicy(
        [RemoteAccessEntry(site="hosp-a", operations=["find"], levels=["PATIENT", "STUDY"])]
    )
    everyone = identifier("PATIENT", PatientName="*", PatientID="")
    one = identifier("PATIENT", PatientName="", PatientID="P-1")
    study = identifier("STUDY", StudyDate="20240101")
    image = identifier("IMAGE", SOPInstanceUID="")
    refused = policy.decide("hosp-c", query("find", study), study)
    assert refused is not None
    assert (refused.status, refused.comment) == (
        STATUS_NOT_AUTHORISED,
        "hosp-c may not query this site",
    )
    move = policy.decide("hosp-a", query("move", study), study)
    assert move is not None
    assert move.comment == "C-MOVE not allowed"
    level = policy.decide("hosp-a", query("find", image), image)
    assert level is not None
    assert level.comment == "level IMAGE not allowed"
    keys = policy.decide("hosp-a", query("find", everyone), everyone)
    assert keys is not None
    assert keys.comment == "PatientName or PatientID required at PATIENT level"
    assert policy.decide("hosp-a", query("find", one), one) is None
    assert policy.decide("hosp-a", query("find", study), study) is None
    assert policy.max_matches("hosp-a") == 1000
    assert policy.max_matches("hosp-c") is None


def test_any_site_entry_applies_to_sites_without_their_own() -> None:
    policy = RemoteAccessPolicy(
        [RemoteAccessEntry(site="*", operations=["echo"]), RemoteAccessEntry(site="hosp-a")]
    )
    study = identifier("STUDY", StudyDate="20240101")
    assert policy.decide("hosp-a", query("find", study), study) is None
    other = policy.decide("hosp-z", query("find", study), study)
    assert other is not None
    assert other.comment == "C-FIND not allowed"
    assert policy.decide("hosp-z", query("echo"), None) is None


async def test_requester_passes_responses_on_in_order_and_drops_strays() -> None:
    published: list[tuple[str, dict[str, Any]]] = []

    async def publish(site: str, document: dict[str, Any]) -> None:
        published.append((site, document))

    requester = Requester(
        routes=[RouteEntry(ae_title="SITE_B", site="hosp-b")], publish=publish, timeout_s=5
    )
    session = await requester.start(ScpRequest("find", "SITE_B", "WS", "study", b"q"))
    assert [(site, doc["type"]) for site, doc in published] == [("hosp-b", "query")]
    qid = session.query_id
    requester.on_response("hosp-b", QueryResponse(qid, 1, 0xFF00, final=False, identifier=b"2"))
    assert session.next_response(0.01) is None  # held until seq 0 arrives
    requester.on_response("hosp-x", QueryResponse(qid, 0, 0xFF00, final=False, identifier=b"x"))
    assert session.next_response(0.01) is None  # another site cannot answer for hosp-b
    requester.on_response("hosp-b", QueryResponse(qid, 0, 0xFF00, final=False, identifier=b"1"))
    requester.on_response("hosp-b", QueryResponse(qid, 0, 0xFF00, final=False, identifier=b"1"))
    requester.on_response("hosp-b", QueryResponse(qid, 2, 0x0000, final=True))
    got = [session.next_response(0.01) for _ in range(4)]
    assert [(r.seq, r.identifier) for r in got if r is not None] == [
        (0, b"1"),
        (1, b"2"),
        (2, None),
    ]
    assert got[3] is None
    assert requester.open_sessions == 0


async def test_requester_fails_at_once_without_a_route_or_a_broker() -> None:
    async def publish(site: str, document: dict[str, Any]) -> None:
        raise TransportError("broker down")

    requester = Requester(
        routes=[RouteEntry(ae_title="SITE_B", site="hosp-b")], publish=publish, timeout_s=5
    )
    unknown = await requester.start(ScpRequest("find", "NOWHERE", "WS", "study", b"q"))
    down = await requester.start(ScpRequest("find", "SITE_B", "WS", "study", b"q"))
    first, second = unknown.next_response(0.01), down.next_response(0.01)
    assert first is not None
    assert second is not None
    assert (first.final, first.status, first.error_comment) == (
        True,
        0xC000,
        "no remote site behind this AE title",
    )
    assert (second.final, second.status) == (True, 0xA700)
    assert second.error_comment == "broker unreachable; hosp-b not asked"
    assert requester.open_sessions == 0
