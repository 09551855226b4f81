"""`dicombridge routes` and `dicombridge nodes`: edits of gateway.toml that keep its
comments, are validated whole before they are written, and refuse what would break it."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicombridge import config as site_config
from dicombridge import routing_table
from dicombridge.errors import ConfigError
from dicombridge.orthanc import OrthancServer, OrthancSettings, free_port
from tests.test_cli import run


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site made by `dicombridge init`; its gateway.toml."""
    run("init", "--site", "hosp-a", "--dir", tmp_path / "a")
    return tmp_path / "a" / "gateway.toml"


def test_routes_add_list_remove_keep_the_operators_comments(site: Path) -> None:
    """Routes added appear in `routes list` (table and JSON) and in the loaded config;
    every comment of the file is still there and its mode unchanged; removing them
    leaves the file as it was."""
    original = site.read_text()
    mode = stat.S_IMODE(os.stat(site).st_mode)
    added = run("routes", "add", "HOSP_B", "--site", "hosp-b", "--config", site)
    assert "route HOSP_B -> hosp-b / PACS added" in added.stdout
    assert "directory could not be checked" in added.stdout  # none distributed yet
    run("routes", "add", "HOSP_C_CT", "--site", "hosp-c", "--node", "CT_ARCHIVE", "--config", site)

    listed = json.loads(run("routes", "list", "--config", site, "--json").stdout)
    assert listed == [
        {
            "position": 1,
            "ae_title": "HOSP_B",
            "sites": ["hosp-b"],
            "node": "PACS",
            "calling_ae_titles": [],
            "source_networks": [],
            "match": {},
        },
        {
            "position": 2,
            "ae_title": "HOSP_C_CT",
            "sites": ["hosp-c"],
            "node": "CT_ARCHIVE",
            "calling_ae_titles": [],
            "source_networks": [],
            "match": {},
        },
    ]
    table = run("routes", "list", "--config", site).stdout
    assert "HOSP_C_CT" in table
    assert "CT_ARCHIVE" in table
    cfg = site_config.load(site)
    assert [r.destinations for r in cfg.routes] == [("hosp-b",), ("hosp-c",)]
    edited = site.read_text()
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert all(line in edited.splitlines() for line in comments)
    assert stat.S_IMODE(os.stat(site).st_mode) == mode

    run("routes", "remove", "HOSP_B", "--config", site)
    run("routes", "remove", "HOSP_C_CT", "--config", site)
    assert site_config.load(site).routes == []
    assert run("routes", "list", "--config", site).stdout.strip() == "(none)"
    assert site.read_text().strip() == original.strip()


@pytest.mark.parametrize(
    ("args", "field", "problem"),
    [
        (["HOSP_B", "--site", "hosp-c"], "routes: route 2 is never reached", "narrower"),
        (["HOSP_M", "--site", "hosp-c", "--match", "Modalty=CT"], "routes.match", "keyword"),
        (["HOSP_M", "--site", "hosp-c", "--match", "Modality"], "routes.match", "KEYWORD="),
        (["HOSP_M", "--site", "hosp-c", "--site", "hosp-c"], "routes", "named twice"),
        (
            ["HOSP_M", "--site", "hosp-c", "--source-network", "10.1.0.1/16"],
            "routes.source_networks",
            "10.1.0.0/16",
        ),
        (
            ["HOSP_M", "--site", "hosp-c", "--source-network", "lan"],
            "routes.source_networks",
            "no network",
        ),
        (["A" * 17, "--site", "hosp-c"], "routes.ae_title", "1 to 16 characters"),
        (["HOSP_X", "--site", "Not A Slug"], "routes.site", ""),
        (["HOSP_SELF", "--site", "hosp-a"], "routes.site: a route leads to this site", "other"),
        (["DICOMBRIDGE", "--site", "hosp-c"], "routes.ae_title: a route uses the gateway", "own"),
    ],
)
def test_an_invalid_route_is_refused_and_the_file_left_unchanged(
    site: Path, args: list[str], field: str, problem: str
) -> None:
    """A route shadowed by an earlier one, a bad keyword or --match, a site named twice, a
    bad AE title or site id, a route to this site itself or one that takes the gateway's
    own AE title: exit 2, one line naming the file, the field and the
    problem, and not a byte of gateway.toml changed."""
    run("routes", "add", "HOSP_B", "--site", "hosp-b", "--config", site)
    before = site.read_bytes()
    refused = run("routes", "add", *args, "--config", site, ok=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ")
    assert str(site) in refused.stderr
    assert field in refused.stderr
    assert problem in refused.stderr
    assert "Traceback" not in refused.stderr
    assert site.read_bytes() == before


def test_removing_what_is_not_there_names_what_is(site: Path) -> None:
    """`routes remove` and `nodes remove` of an unknown name exit 2 and list the present
    ones; the file is unchanged."""
    run("routes", "add", "HOSP_B", "--site", "hosp-b", "--config", site)
    before = site.read_bytes()
    route = run("routes", "remove", "HOSP_Z", "--config", site, ok=False)
    assert route.returncode == 2
    assert "no entry with ae_title 'HOSP_Z' (present: HOSP_B)" in route.stderr
    node = run("nodes", "remove", "CT", "--config", site, ok=False)
    assert node.returncode == 2
    assert "(present: none)" in node.stderr
    assert site.read_bytes() == before


def test_nodes_add_list_remove_and_refusals(site: Path) -> None:
    """Nodes added appear in `nodes list` and the loaded config; a duplicate name or a
    port out of range is refused naming the field; remove takes it out."""
    run(
        "nodes", "add", "PACS", "--ae-title", "ORTHANC", "--host", "10.0.0.5", "--port", "4242",
        "--config", site,
    )  # fmt: skip
    run(
        "nodes", "add", "CT", "--ae-title", "CT01", "--host", "ct.local", "--port", "104",
        "--no-c-get", "--config", site,
    )  # fmt: skip
    listed = json.loads(run("nodes", "list", "--config", site, "--json").stdout)
    assert listed == [
        {"name": "PACS", "ae_title": "ORTHANC", "host": "10.0.0.5", "port": 4242, "c_get": True},
        {"name": "CT", "ae_title": "CT01", "host": "ct.local", "port": 104, "c_get": False},
    ]
    before = site.read_bytes()
    duplicate = run(
        "nodes", "add", "PACS", "--ae-title", "X", "--host", "h", "--port", "1", "--config", site,
        ok=False,
    )  # fmt: skip
    assert "local_nodes.name" in duplicate.stderr
    assert "an entry with name 'PACS' already exists" in duplicate.stderr
    bad_port = run(
        "nodes", "add", "MR", "--ae-title", "MR1", "--host", "h", "--port", "70000",
        "--config", site, ok=False,
    )  # fmt: skip
    assert bad_port.returncode == 2
    assert "local_nodes.port" in bad_port.stderr
    assert site.read_bytes() == before
    run("nodes", "remove", "CT", "--config", site)
    assert [n.name for n in site_config.load(site).local_nodes] == ["PACS"]


def test_a_file_already_broken_is_not_edited(site: Path) -> None:
    """An edit of a gateway.toml that does not load is refused with the file's own
    error (field and fix), before anything is written."""
    site.write_text(site.read_text().replace('id = "hosp-a"', 'id = "Hosp A"'))
    before = site.read_bytes()
    refused = run("routes", "add", "HOSP_B", "--site", "hosp-b", "--config", site, ok=False)
    assert refused.returncode == 2
    assert "site.id" in refused.stderr
    assert site.read_bytes() == before


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer.start(tmp_path / "orthanc", OrthancSettings(ae_title="ORTHANC")) as server:
        yield server


def test_nodes_echo_answers_for_a_real_pacs_and_fails_for_a_dead_one(
    site: Path, orthanc: OrthancServer
) -> None:
    """`nodes echo` C-ECHOes Orthanc (exit 0, success and the time); a node nobody
    listens for fails with exit 1 and a status; an unknown name is a config error."""
    run(
        "nodes", "add", "PACS", "--ae-title", "ORTHANC", "--host", "127.0.0.1",
        "--port", str(orthanc.dicom_port), "--config", site,
    )  # fmt: skip
    run(
        "nodes", "add", "GONE", "--ae-title", "GONE", "--host", "127.0.0.1",
        "--port", str(free_port()), "--config", site,
    )  # fmt: skip
    answered = run("nodes", "echo", "PACS", "--config", site)
    assert "PACS (ORTHANC at 127.0.0.1" in answered.stdout
    assert "C-ECHO success" in answered.stdout
    dead = run("nodes", "echo", "GONE", "--config", site, ok=False)
    assert dead.returncode == 1
    assert "C-ECHO failed, status 0x" in dead.stdout
    unknown = run("nodes", "echo", "NOPE", "--config", site, ok=False)
    assert unknown.returncode == 2
    assert "no local node named 'NOPE' (present: PACS, GONE)" in unknown.stderr


def test_running_table_takes_only_the_routing_table_from_an_edit(site: Path) -> None:
    """A running gateway takes routes, local nodes and remote access from the edited
    file, keeps its other settings (named as needing a restart), and refuses a table
    that fits only the edited file's other settings."""
    running = site_config.load(site)
    run("routes", "add", "HOSP_B", "--site", "hosp-b", "--config", site)
    run(
        "nodes", "add", "PACS", "--ae-title", "ORTHANC", "--host", "h", "--port", "104",
        "--config", site,
    )  # fmt: skip
    site.write_text(site.read_text().replace("port = 11112", "port = 11113", 1))
    edited = site_config.load(site)
    merged, restart = routing_table.running_table(running, edited)
    assert [r.ae_title for r in merged.routes] == ["HOSP_B"]
    assert [n.name for n in merged.local_nodes] == ["PACS"]
    assert merged.gateway == running.gateway
    assert restart == ["gateway"]

    # The edit frees the AE title HOSP_B from the gateway and gives it to a route: valid
    # as a file, but not with the running gateway's own AE title.
    site.write_text(site.read_text().replace('ae_title = "DICOMBRIDGE"', 'ae_title = "OTHER"', 1))
    clash = running.model_copy(
        update={"gateway": running.gateway.model_copy(update={"ae_title": "HOSP_B"})}
    )
    with pytest.raises(ConfigError, match=r"with the running \[gateway\] settings"):
        routing_table.running_table(clash, site_config.load(site))


def test_rules_and_fan_out_through_the_cli(site: Path) -> None:
    """`routes add` writes a fan-out route with calling AE and attribute conditions as
    readable TOML, --before puts a narrower route first, and `routes remove` asks which
    one when several share the AE title, then takes the one at --position."""
    run("routes", "add", "RESEARCH", "--site", "hosp-b", "--config", site)
    run(
        "routes", "add", "RESEARCH", "--site", "hosp-b", "--site", "hosp-c",
        "--calling", "CT*", "--match", "Modality=CT,PT", "--match", "BodyPartExamined=HEAD",
        "--source-network", "10.1.0.0/16", "--before", "1", "--config", site,
    )  # fmt: skip
    text = site.read_text()
    assert 'sites = ["hosp-b", "hosp-c"]' in text
    assert 'match = {Modality = ["CT", "PT"], BodyPartExamined = "HEAD"}' in text
    cfg = site_config.load(site)
    assert [r.destinations for r in cfg.routes] == [("hosp-b", "hosp-c"), ("hosp-b",)]
    assert cfg.routes[0].calling_ae_titles == ["CT*"]
    assert 'source_networks = ["10.1.0.0/16"]' in text
    table = run("routes", "list", "--config", site).stdout
    assert "calling=CT* and from=10.1.0.0/16 and Modality=CT|PT and BodyPartExamined=HEAD" in table
    assert "always" in table

    ambiguous = run("routes", "remove", "RESEARCH", "--config", site, ok=False)
    assert ambiguous.returncode == 2
    assert "2 routes have ae_title 'RESEARCH' (positions 1, 2)" in ambiguous.stderr
    assert "--position" in ambiguous.stderr
    wrong = run("routes", "remove", "RESEARCH", "--position", "3", "--config", site, ok=False)
    assert "position 3 is not one of ae_title 'RESEARCH'" in wrong.stderr
    run("routes", "remove", "RESEARCH", "--position", "1", "--config", site)
    assert [r.destinations for r in site_config.load(site).routes] == [("hosp-b",)]
    beyond = run(
        "routes", "add", "RESEARCH", "--site", "hosp-c", "--match", "Modality=MR",
        "--before", "5", "--config", site, ok=False,
    )  # fmt: skip
    assert "no route at position 5 (1 to 1)" in beyond.stderr


def test_routes_check_explains_where_a_file_goes(site: Path, tmp_path: Path) -> None:
    """`routes check --explain FILE` shows each route looked at in order, each condition
    with the value seen, and the sites taken; a file no route selects is reported as
    refused; --json gives the same verdicts; a file that is no DICOM is named."""
    from tests.dicomkit import fresh_copy

    ct = fresh_copy("CT_small.dcm", tmp_path)  # Modality CT
    mr = fresh_copy("MR_small.dcm", tmp_path)  # Modality MR
    run("routes", "add", "RESEARCH", "--site", "hosp-b", "--site", "hosp-c",
        "--match", "Modality=CT", "--config", site)  # fmt: skip
    run("routes", "add", "RESEARCH", "--site", "hosp-c", "--match", "Modality=MR",
        "--calling", "MR0?", "--config", site)  # fmt: skip
    run("routes", "add", "CT_ONLY", "--site", "hosp-b", "--match", "Modality=CT",
        "--config", site)  # fmt: skip

    checked = run("routes", "check", "--config", site).stdout
    assert "3 route(s) on 2 AE title(s), valid" in checked
    assert "every route of RESEARCH has a condition" in checked

    explained = run(
        "routes", "check", ct, mr, "--called-ae", "RESEARCH", "--calling-ae", "MR01",
        "--explain", "--config", site,
    ).stdout  # fmt: skip
    assert f"{ct}: RESEARCH -> route 1 -> hosp-b, hosp-c / PACS" in explained
    assert f"{mr}: RESEARCH -> route 2 -> hosp-c / PACS" in explained
    assert 'Modality "MR" ~ CT: fails' in explained
    assert 'calling AE title "MR01" ~ MR0?: holds' in explained

    verdicts = json.loads(
        run("routes", "check", mr, "--calling-ae", "US01", "--json", "--config", site).stdout
    )
    assert [(v["called_ae_title"], v["route"], v["sites"]) for v in verdicts] == [
        ("RESEARCH", None, []),
        ("CT_ONLY", None, []),
    ]
    refused = run("routes", "check", mr, "--called-ae", "CT_ONLY", "--config", site).stdout
    assert "CT_ONLY -> no route holds: the C-STORE is refused (0x0110)" in refused

    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not an image")
    bad = run("routes", "check", not_dicom, "--config", site, ok=False)
    assert bad.returncode == 2
    assert f"{not_dicom}: (file): not a readable DICOM file" in bad.stderr
    unknown = run("routes", "check", ct, "--called-ae", "NOPE", "--config", site, ok=False)
    assert "no route has ae_title 'NOPE' (present: RESEARCH, CT_ONLY)" in unknown.stderr
