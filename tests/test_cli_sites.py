"""`dicombridge sites list | add | remove | show`: the operator's view of the signed
directory, every command as a subprocess, errors included."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dicombridge import config as site_config
from dicombridge import identity
from tests.test_cli import run


@dataclass(frozen=True)
class Federation:
    """An operator workspace and two initialised sites with their export files."""

    operator: Path
    sites: dict[str, Path]  # site id -> its directory
    exports: dict[str, Path]  # site id -> what `keys export` printed

    def export(self, site: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.exports[site].read_text())
        return loaded


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """`operator init`, then `init` and `keys export` of hosp-a and hosp-b (once)."""
    root = tmp_path_factory.mktemp("sites")
    operator = root / "operator"
    run("operator", "init", "--dir", operator, "--federation", "test-fed")
    key = run("operator", "key", "--dir", operator).stdout.strip()
    sites, exports = {}, {}
    for site in ("hosp-a", "hosp-b"):
        sites[site] = root / site
        run("init", "--site", site, "--dir", sites[site], "--operator-key", key)
        exports[site] = root / f"{site}.json"
        exports[site].write_text(run("keys", "export", "-c", sites[site] / "gateway.toml").stdout)
    return Federation(operator, sites, exports)


@pytest.fixture
def fed(prepared: Federation, tmp_path: Path) -> Federation:
    """A fresh copy of the prepared federation for this test."""
    root = tmp_path / "fed"
    shutil.copytree(prepared.operator.parent, root)
    return Federation(
        root / "operator",
        {site: root / path.name for site, path in prepared.sites.items()},
        {site: root / path.name for site, path in prepared.exports.items()},
    )


def listed(fed: Federation) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        run("sites", "list", "--dir", fed.operator, "--json").stdout
    )
    return document


def states(fed: Federation) -> dict[str, str]:
    sites = listed(fed)["sites"]
    return {site["id"]: site["state"] for site in sites}


def test_add_signs_and_a_gateway_accepts_the_directory(fed: Federation) -> None:
    """`sites add` validates, adds and signs (printing the version); the site's gateway
    loads that directory.json against its pinned operator key."""
    out = run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator).stdout
    assert "site hosp-a (broker user hosp-a) added to the draft" in out
    assert "signed version 1 with 1 site(s)" in out
    site_dir = fed.sites["hosp-a"]
    shutil.copy(fed.operator / "directory.json", site_dir / "directory.json")
    cfg = site_config.load(site_dir / "gateway.toml")
    directory = identity.load_directory(cfg)
    assert directory.version == 1
    entry = directory.site("hosp-a")
    assert entry is not None
    assert entry.model_dump(mode="json") == fed.export("hosp-a")
    shown = run("directory", "show", "--config", site_dir / "gateway.toml").stdout
    assert "version 1" in shown
    assert "hosp-a" in shown


def test_add_no_sign_stages_and_list_says_directory_json_is_behind(fed: Federation) -> None:
    """With --no-sign nothing is signed; `list` shows the site as new and the signed
    directory behind until `directory sign`."""
    out = run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator, "--no-sign").stdout
    assert "not signed" in out
    assert not (fed.operator / "directory.json").exists()
    assert "not signed yet" in run("sites", "list", "--dir", fed.operator).stdout
    document = listed(fed)
    assert document["signed_version"] is None
    assert document["behind"] is True
    assert states(fed) == {"hosp-a": "new"}
    run("directory", "sign", "--dir", fed.operator)
    run("sites", "add", fed.exports["hosp-b"], "--dir", fed.operator, "--no-sign")
    assert states(fed) == {"hosp-a": "signed", "hosp-b": "new"}
    run("directory", "sign", "--dir", fed.operator)
    document = listed(fed)
    assert document["behind"] is False
    assert document["signed_version"] == 2
    assert states(fed) == {"hosp-a": "signed", "hosp-b": "signed"}


def test_list_table_shows_ids_users_keys_validity_and_signed_state(fed: Federation) -> None:
    """The table names each site, its broker user, its key ids (first 12 digits), when
    its keys are valid, and whether directory.json has it."""
    run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator)
    run("sites", "add", fed.exports["hosp-b"], "--dir", fed.operator, "--no-sign")
    out = run("sites", "list", "--dir", fed.operator).stdout
    lines = {site: next(line for line in out.splitlines() if site in line) for site in fed.sites}
    for site, line in lines.items():
        export = fed.export(site)
        kem_keys, signing_keys = export["kem_keys"], export["signing_keys"]
        assert kem_keys[0]["key_id"][:12] in line
        assert signing_keys[0]["key_id"][:12] in line
        assert f"{kem_keys[0]['not_before'][:10]} → open" in line
    assert lines["hosp-a"].rstrip(" │").endswith("yes")
    assert "no: new in the draft" in lines["hosp-b"]
    assert "directory.json (version 1) is behind the draft" in out
    document = listed(fed)
    sites = document["sites"]
    assert [s["id"] for s in sites] == ["hosp-a", "hosp-b"]
    assert sites[0]["kem_keys"] == [k["key_id"] for k in fed.export("hosp-a")["kem_keys"]]
    assert sites[0]["valid_now"] is True
    assert sites[0]["valid_until"] is None


def test_add_again_replaces_and_signs_only_a_change(fed: Federation) -> None:
    """The same export again changes nothing and signs nothing; a new broker user
    replaces the entry and is signed as the next version."""
    run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator)
    out = run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator).stdout
    assert "unchanged in the draft" in out
    assert "version 1 has it already; nothing to sign" in out
    changed = fed.export("hosp-a") | {"broker_user": "hosp-a-2"}
    fed.exports["hosp-a"].write_text(json.dumps(changed))
    out = run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator).stdout
    assert "replaced in the draft" in out
    assert "signed version 2" in out
    signed = json.loads((fed.operator / "directory.json").read_text())["directory"]
    assert [s["broker_user"] for s in signed["sites"]] == ["hosp-a-2"]


def test_remove_signs_and_an_unknown_site_names_the_known_ones(fed: Federation) -> None:
    """`sites remove` drops the site and signs; an unknown id fails (exit 2) naming the
    draft, the known sites and the fix, and changes nothing."""
    run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator)
    run("sites", "add", fed.exports["hosp-b"], "--dir", fed.operator)
    out = run("sites", "remove", "hosp-b", "--dir", fed.operator).stdout
    assert "site hosp-b removed from the draft" in out
    assert "signed version 3 with 1 site(s)" in out
    assert states(fed) == {"hosp-a": "signed"}
    before = (fed.operator / "directory.draft.json").read_bytes()
    result = run("sites", "remove", "hosp-x", "--dir", fed.operator, ok=False)
    assert result.returncode == 2
    assert str(fed.operator / "directory.draft.json") in result.stderr
    assert "no site 'hosp-x' in the draft (known: hosp-a)" in result.stderr
    assert "Fix: check the id with `dicombridge sites list" in result.stderr
    assert (fed.operator / "directory.draft.json").read_bytes() == before


def test_remove_without_signing_shows_the_site_as_removed(fed: Federation) -> None:
    """Removed with --no-sign, a site is still listed (and shown) as removed from the
    draft, since directory.json still carries it."""
    run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator)
    run("sites", "remove", "hosp-a", "--dir", fed.operator, "--no-sign")
    assert states(fed) == {"hosp-a": "removed"}
    assert listed(fed)["behind"] is True
    assert "no: removed from the draft" in run("sites", "list", "--dir", fed.operator).stdout
    shown = json.loads(run("sites", "show", "hosp-a", "--dir", fed.operator, "--json").stdout)
    assert shown["state"] == "removed"


def test_show_gives_every_field_with_fingerprints_and_validity(fed: Federation) -> None:
    """`sites show` prints id, broker user, signed state and, per key, its id, kind,
    SHA-256 fingerprint (which starts with the key id) and validity; --json as well."""
    run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator)
    export = fed.export("hosp-a")
    shown = json.loads(run("sites", "show", "hosp-a", "--dir", fed.operator, "--json").stdout)
    assert shown["id"] == "hosp-a"
    assert shown["broker_user"] == "hosp-a"
    assert shown["state"] == "signed"
    assert shown["signed_version"] == 1
    exported = [*export["kem_keys"], *export["signing_keys"]]
    assert [k["key_id"] for k in shown["keys"]] == [k["key_id"] for k in exported]
    for key, original in zip(shown["keys"], exported, strict=True):
        raw = base64.b64decode(original["public"])
        label = b"dicombridge-key-v1/" + original["kind"].encode() + b"/"
        assert key["fingerprint_sha256"] == hashlib.sha256(label + raw).hexdigest()
        assert key["fingerprint_sha256"].startswith(key["key_id"])
        assert key["public"] == original["public"]
        assert key["not_before"] == datetime.fromisoformat(original["not_before"]).isoformat()
        assert key["not_after"] is None
        assert key["revoked"] is False
        assert key["valid_now"] is True
    text = run("sites", "show", "hosp-a", "--dir", fed.operator).stdout
    assert "broker user   hosp-a" in text
    assert "signed        yes (directory.json version 1)" in text
    for key in shown["keys"]:
        fingerprint = key["fingerprint_sha256"]
        assert f"{key['key_id']}\n" in text
        assert " ".join(fingerprint[i : i + 4] for i in range(0, 64, 4)) in text
    assert text.count("until open: valid now") == 2


def test_show_unknown_site_names_the_known_ones(fed: Federation) -> None:
    """`sites show` of an unknown id exits 2 naming the known sites."""
    run("sites", "add", fed.exports["hosp-a"], "--dir", fed.operator)
    result = run("sites", "show", "hosp-z", "--dir", fed.operator, ok=False)
    assert result.returncode == 2
    assert "no site 'hosp-z' in the draft (known: hosp-a)" in result.stderr


def test_bad_export_files_name_the_file_the_field_and_the_fix(
    fed: Federation, tmp_path: Path
) -> None:
    """Missing, not JSON, a key id that does not match its key, every key expired, or a
    broker user taken: exit 2 naming file, field and fix; nothing is written."""
    run("sites", "add", fed.exports["hosp-b"], "--dir", fed.operator)
    export = fed.export("hosp-a")
    kem = export["kem_keys"][0]
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    cases: dict[str, tuple[object | None, str, str]] = {
        "missing.json": (None, "(file)", "does not exist"),
        "garbage.json": ("not json {", "line 1", "not valid JSON"),
        "bad-key-id.json": (
            export | {"kem_keys": [kem | {"key_id": "0" * 32}]},
            "kem_keys.0",
            "key_id does not match the public key",
        ),
        "expired.json": (
            export | {"signing_keys": [k | {"not_after": past} for k in export["signing_keys"]]},
            "signing_keys",
            "every key is revoked or expired",
        ),
        "user-taken.json": (
            export | {"broker_user": "hosp-b"},
            "broker_user",
            "'hosp-b' is already the broker user of 'hosp-b'",
        ),
    }
    before = {p.name: p.read_bytes() for p in fed.operator.iterdir() if p.is_file()}
    for name, (content, field, problem) in cases.items():
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_text(json.dumps(content))
        result = run("sites", "add", path, "--dir", fed.operator, ok=False)
        assert result.returncode == 2, name
        assert result.stderr.startswith(f"error: {path}: {field}"), result.stderr
        assert problem in result.stderr, result.stderr
        assert "Fix:" in result.stderr, name
    after = {p.name: p.read_bytes() for p in fed.operator.iterdir() if p.is_file()}
    assert after == before


def test_commands_outside_an_operator_workspace_say_how_to_make_one(tmp_path: Path) -> None:
    """Every sites command on a directory without operator.key fails naming the fix."""
    for args in (("list",), ("show", "hosp-a"), ("remove", "hosp-a")):
        result = run("sites", *args, "--dir", tmp_path, ok=False)
        assert result.returncode == 2, args
        assert "not an operator workspace" in result.stderr, args
        assert "dicombridge operator init" in result.stderr, args
