"""Route rules: DICOM wildcards, first route that holds, fan-out, shadowed routes, and
the calling AE titles an AE title admits at association time."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicombridge.acceptance import AcceptancePolicy, RejectReason
from dicombridge.config import RouteEntry
from dicombridge.rules import (
    Admission,
    RouteRules,
    attribute_matches,
    check_keyword,
    never_reached,
    read_attributes,
    wildcard_match,
)
from tests.dicomkit import fresh_copy


def route(ae_title: str, *sites: str, **conditions: Any) -> RouteEntry:
    if len(sites) == 1:
        return RouteEntry(ae_title=ae_title, site=sites[0], **conditions)
    return RouteEntry(ae_title=ae_title, sites=list(sites), **conditions)


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("CT", "CT", True),
        ("CT", "ct", False),  # DICOM matching is case-sensitive
        ("CT", "CTX", False),
        ("C?", "CT", True),
        ("C?", "C", False),
        ("*HEAD*", "CT HEAD W/O", True),
        ("*HEAD*", "CT CHEST", False),
        ("*", "", True),
        ("a.b", "axb", False),  # regex characters are literal
        ("MR[1]", "MR[1]", True),
    ],
)
def test_wildcards_are_dicoms(pattern: str, value: str, expected: bool) -> None:
    """`*` is any run, `?` one character, everything else literal and case-sensitive."""
    assert wildcard_match(pattern, value) is expected


def test_a_multi_valued_attribute_matches_whole_or_by_value() -> None:
    """ImageType ORIGINAL\\PRIMARY\\AXIAL matches AXIAL and the whole text; an absent
    attribute matches `*` only."""
    image_type = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert attribute_matches(["AXIAL"], image_type)
    assert attribute_matches(["ORIGINAL\\PRIMARY*"], image_type)
    assert not attribute_matches(["DERIVED"], image_type)
    assert attribute_matches(["*"], None)
    assert not attribute_matches(["CT"], None)
    assert not attribute_matches(["CT"], "")


def test_the_first_route_that_holds_is_taken_in_file_order() -> None:
    """CT goes to the CT route, MR from MR01 to the MR route, anything else to the
    catch-all; another AE title's routes are never looked at."""
    rules = RouteRules(
        [
            route("RESEARCH", "hosp-b", "hosp-c", match={"Modality": ["CT", "PT"]}),
            route("RESEARCH", "hosp-c", calling_ae_titles=["MR0?"], match={"Modality": "MR"}),
            route("OTHER", "hosp-d"),
            route("RESEARCH", "hosp-b"),
        ]
    )
    ct = rules.select("RESEARCH", "CT01", {"Modality": "CT"})
    assert (ct.position, ct.sites) == (1, ("hosp-b", "hosp-c"))
    mr = rules.select("RESEARCH", "MR01", {"Modality": "MR"})
    assert (mr.position, mr.sites) == (2, ("hosp-c",))
    mr_elsewhere = rules.select("RESEARCH", "MR_ROOM2", {"Modality": "MR"})
    assert (mr_elsewhere.position, mr_elsewhere.sites) == (4, ("hosp-b",))
    assert [step.position for step in mr_elsewhere.steps] == [1, 2, 4]
    assert [check.held for check in mr_elsewhere.steps[1].checks] == [False, True]
    assert rules.select("NOBODY", "CT01", {}).route is None


def test_no_route_holds_when_every_route_has_a_condition() -> None:
    """Without a catch-all, an instance no condition selects gets no route, and the
    explanation shows each failing check with the value seen."""
    rules = RouteRules([route("CT_ONLY", "hosp-b", match={"Modality": "CT"})])
    selection = rules.select("CT_ONLY", "US01", {"Modality": "US"})
    assert selection.route is None
    assert selection.sites == ()
    (step,) = selection.steps
    (check,) = step.checks
    assert (check.what, check.seen, check.held) == ("Modality", "US", False)


def test_queries_ignore_data_set_conditions_and_checks_may_skip_the_caller() -> None:
    """attributes=None leaves `match` out (queries); calling=None leaves the calling AE
    condition out (`routes check` without --calling-ae)."""
    rules = RouteRules(
        [route("HOSP_B", "hosp-b", calling_ae_titles=["WS*"], match={"Modality": "CT"})]
    )
    assert rules.select("HOSP_B", "WS1").position == 1
    assert rules.select("HOSP_B", "CT01").route is None
    assert rules.select("HOSP_B", None, {"Modality": "CT"}).position == 1


def test_admissions_say_whom_an_ae_title_admits() -> None:
    """An AE title admits a caller one of its routes admits, by AE title pattern and by
    source network together, or anyone as soon as one route has neither condition; the
    acceptance policy applies them, IPv4-mapped IPv6 addresses included."""
    lan = ipaddress.ip_network("10.1.0.0/16")
    rules = RouteRules(
        [
            route("RESTRICTED", "hosp-b", calling_ae_titles=["CT*"]),
            route("RESTRICTED", "hosp-c", calling_ae_titles=["MR01"], source_networks=[lan]),
            route("OPEN", "hosp-b", calling_ae_titles=["CT*"]),
            route("OPEN", "hosp-b", match={"Modality": "MR"}),
        ]
    )
    assert rules.admissions("RESTRICTED") == (
        Admission(("CT*",), None),
        Admission(("MR01",), (lan,)),
    )
    assert rules.admissions("OPEN") is None
    assert rules.keywords("OPEN") == {"Modality"}
    policy = AcceptancePolicy.of(
        ["RESTRICTED", "OPEN"], admissions={"RESTRICTED": rules.admissions("RESTRICTED") or ()}
    )
    assert policy.decide("RESTRICTED", "CT_ROOM1", "192.0.2.7") is None
    assert policy.decide("RESTRICTED", "MR01", "10.1.4.2") is None
    assert policy.decide("RESTRICTED", "MR01", "::ffff:10.1.4.2") is None
    not_recognised = RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
    assert policy.decide("RESTRICTED", "MR01", "10.2.0.1") is not_recognised
    assert policy.decide("RESTRICTED", "MR01", None) is not_recognised
    assert policy.decide("RESTRICTED", "MR02", "10.1.4.2") is not_recognised
    assert policy.decide("OPEN", "ANYONE", "203.0.113.9") is None


def test_a_route_selects_by_source_address_when_it_is_known() -> None:
    """With the caller's address, a route limited to a network is passed over for a
    caller outside it, and the explanation names the address; without it (a query),
    source networks are not looked at."""
    rules = RouteRules(
        [
            route("HOSP_B", "hosp-c", source_networks=[ipaddress.ip_network("10.1.0.0/16")]),
            route("HOSP_B", "hosp-b"),
        ]
    )
    inside = rules.select("HOSP_B", "CT01", {}, "10.1.2.3")
    outside = rules.select("HOSP_B", "CT01", {}, "10.9.2.3")
    assert (inside.sites, outside.sites) == (("hosp-c",), ("hosp-b",))
    check = outside.steps[0].checks[0]
    assert (check.what, check.seen, check.held) == ("source address", "10.9.2.3", False)
    assert rules.select("HOSP_B", "CT01").sites == ("hosp-c",)


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ({}, {}, True),
        ({}, {"match": {"Modality": "CT"}}, True),
        ({"match": {"Modality": "CT"}}, {}, False),
        ({"match": {"Modality": ["CT", "MR"]}}, {"match": {"Modality": "CT"}}, True),
        ({"match": {"Modality": "CT"}}, {"match": {"Modality": ["CT", "MR"]}}, False),
        ({"calling_ae_titles": ["CT*"]}, {"calling_ae_titles": ["CT*"]}, True),
        ({"calling_ae_titles": ["CT*"]}, {}, False),
        ({"calling_ae_titles": ["CT1"]}, {"calling_ae_titles": ["CT1", "CT2"]}, False),
        ({"source_networks": ["10.0.0.0/8"]}, {}, False),
        ({}, {"source_networks": ["10.0.0.0/8"]}, True),
        ({"source_networks": ["10.0.0.0/8"]}, {"source_networks": ["10.0.0.0/8"]}, True),
    ],
)
def test_a_route_an_earlier_one_always_beats_is_never_reached(
    earlier: dict[str, Any], later: dict[str, Any], shadowed: bool
) -> None:
    """A later route whose conditions include all of an earlier one's (same AE title)
    can never be taken; one with a condition the earlier lacks can."""
    routes = [route("X", "hosp-b", **earlier), route("X", "hosp-c", **later)]
    assert (never_reached(routes) == (1, 2)) is shadowed
    other_title = [route("X", "hosp-b", **earlier), route("Y", "hosp-c", **later)]
    assert never_reached(other_title) is None


def test_keywords_are_checked_against_the_dictionary() -> None:
    """A misspelt keyword or one holding a sequence or bulk data is refused by name."""
    assert check_keyword("StudyDescription") == "StudyDescription"
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        check_keyword("Modalty")
    with pytest.raises(ValueError, match="sequence or bulk"):
        check_keyword("PixelData")
    with pytest.raises(ValueError, match="sequence or bulk"):
        check_keyword("ReferencedSeriesSequence")


def test_attributes_are_read_from_the_header_of_a_file_or_its_bytes(tmp_path: Path) -> None:
    """Modality, ImageType (several values) and an absent attribute, from a file on disk
    and from the same bytes in memory."""
    path = fresh_copy("CT_small.dcm", tmp_path)
    dataset = pydicom.dcmread(path)
    wanted = ["Modality", "ImageType", "StudyDescription", "BodyPartExamined"]
    from_file = read_attributes(path, wanted)
    assert from_file["Modality"] == dataset.Modality
    assert from_file["ImageType"] == list(dataset.ImageType)
    assert "BodyPartExamined" not in from_file or from_file["BodyPartExamined"] == str(
        dataset.BodyPartExamined
    )
    assert read_attributes(path.read_bytes(), wanted) == from_file
