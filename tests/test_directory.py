"""The signed federation directory: signature, malformed files, rollback, versions."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicombridge import directory as fed
from dicombridge.errors import DirectoryError, DirectoryRollbackError, DirectorySignatureError
from dicombridge.keys import KemPrivateKey, SigningPrivateKey, SiteKeys, utc_now
from dicombridge.topology import check_site_id
from tests.cryptokit import (
    SITES,
    directory_body,
    sign_raw,
    site_entry,
    write_json,
)


class Operator:
    """An operator key and the sites' keys, to sign directories of any version."""

    def __init__(self) -> None:
        self.key = SigningPrivateKey.generate()
        self.keys = {site_id: SiteKeys.generate() for site_id in SITES}

    def body(self, version: int) -> fed.DirectoryBody:
        return directory_body(self.keys, version=version)

    def document(self, version: int) -> dict[str, Any]:
        return fed.sign(self.body(version), self.key)

    def write(self, path: Path, version: int) -> Path:
        return write_json(path, self.document(version))


@pytest.fixture
def operator() -> Operator:
    return Operator()


def _load(path: Path, operator: Operator, state: Path | None = None) -> fed.Directory:
    return fed.load(path, operator.key.public, state_path=state)


# --- signature ---------------------------------------------------------------------------


def test_sign_then_load_round_trip(tmp_path: Path, operator: Operator) -> None:
    """A signed directory loads back with the same body; its digest covers the canonical JSON."""
    body = operator.body(7)
    document = fed.sign(body, operator.key)
    loaded = _load(write_json(tmp_path / "d.json", document), operator)
    assert loaded.body == body
    assert loaded.version == 7
    assert [s.id for s in loaded.sites] == sorted(SITES)
    canonical = fed.canonical_json(document["directory"])
    assert loaded.digest == hashlib.sha256(canonical).hexdigest()
    entry = loaded.site("hosp-b")
    assert entry is not None
    assert loaded.site_for_broker_user(entry.broker_user) == entry
    kem = operator.keys["hosp-b"].kem_keys[0]
    found = entry.kem_public_key(kem.key_id)
    assert found is not None
    assert found.encoding == kem.public.encoding
    signing = operator.keys["hosp-b"].current_signing_key
    verified = entry.signing_public_key(signing.key_id)
    assert verified is not None
    assert verified.verify(signing.sign(b"m"), b"m")
    assert loaded.site("hosp-z") is None


def test_layout_of_the_file_does_not_matter(tmp_path: Path, operator: Operator) -> None:
    """Re-indenting the file or reordering its keys keeps the signature valid (canonical JSON)."""
    document = operator.document(3)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")))
    compact = _load(path, operator)
    reordered = dict(reversed(list(document["directory"].items())))
    path.write_text(json.dumps({"signature": document["signature"], "directory": reordered}))
    assert _load(path, operator).digest == compact.digest


def _leaves(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path


def _changed(value: Any) -> Any:
    """A value of the same type that differs, as little as possible."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + chr(ord(value[-1]) ^ 1)
    if value is None:
        return "2099-01-01T00:00:00Z"
    raise AssertionError(f"unexpected leaf {value!r}")


def test_every_changed_field_breaks_the_signature(tmp_path: Path, operator: Operator) -> None:
    """Changing any single field of the signed body, however slightly, is a signature error."""
    document = operator.document(4)
    leaves = list(_leaves(document["directory"]))
    assert len(leaves) > 40  # every site's id, user, and both keys' fields
    accepted = []
    for leaf in leaves:
        tampered = copy.deepcopy(document)
        parent = tampered["directory"]
        for part in leaf[:-1]:
            parent = parent[part]
        parent[leaf[-1]] = _changed(parent[leaf[-1]])
        try:
            _load(write_json(tmp_path / "d.json", tampered), operator)
        except DirectorySignatureError:
            continue
        accepted.append(leaf)
    assert accepted == []


def test_changed_broker_user_is_refused(tmp_path: Path, operator: Operator) -> None:
    """Pointing hosp-b's broker_user elsewhere is refused with a message naming the file."""
    document = operator.document(2)
    sites = document["directory"]["sites"]
    site = next(s for s in sites if s["id"] == "hosp-b")
    site["broker_user"] = "mallory"
    path = write_json(tmp_path / "d.json", document)
    with pytest.raises(DirectorySignatureError) as info:
        _load(path, operator)
    assert info.value.path == str(path)
    assert info.value.field == "signature.ed25519"
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    "edit",
    ["add a site member", "drop a key", "add a site", "reverse the sites", "drop a site"],
)
def test_structural_edits_break_the_signature(
    tmp_path: Path, operator: Operator, edit: str
) -> None:
    """Adding or removing members, keys or sites, or reordering them, is a signature error."""
    document = operator.document(2)
    body = document["directory"]
    if edit == "add a site member":
        body["sites"][0]["note"] = "x"
    elif edit == "drop a key":
        body["sites"][1]["kem_keys"].pop()
    elif edit == "add a site":
        extra = site_entry("hosp-d", SiteKeys.generate()).model_dump(mode="json")
        body["sites"].append(extra)
    elif edit == "reverse the sites":
        body["sites"].reverse()
    else:
        body["sites"].pop()
    with pytest.raises(DirectorySignatureError):
        _load(write_json(tmp_path / "d.json", document), operator)


def test_signed_by_another_key_is_refused(tmp_path: Path, operator: Operator) -> None:
    """A directory signed by a key other than the pinned operator key is refused."""
    other = SigningPrivateKey.generate()
    path = write_json(tmp_path / "d.json", fed.sign(operator.body(5), other))
    with pytest.raises(DirectorySignatureError) as info:
        _load(path, operator)
    assert info.value.field == "signature.key_id"
    assert other.key_id in str(info.value)


def test_other_key_claiming_the_operator_key_id_is_refused(
    tmp_path: Path, operator: Operator
) -> None:
    """A signature by another key, labelled with the operator's key id, does not verify."""
    document = fed.sign(operator.body(5), SigningPrivateKey.generate())
    document["signature"]["key_id"] = operator.key.key_id
    with pytest.raises(DirectorySignatureError) as info:
        _load(write_json(tmp_path / "d.json", document), operator)
    assert info.value.field == "signature.ed25519"


@pytest.mark.parametrize(("offset", "mask"), [(0, 0x01), (31, 0x80), (32, 0x10), (63, 0x40)])
def test_corrupted_signature_is_refused(
    tmp_path: Path, operator: Operator, offset: int, mask: int
) -> None:
    """A signature with one bit flipped is a signature error."""
    document = operator.document(5)
    raw = bytearray(base64.b64decode(document["signature"]["ed25519"]))
    raw[offset] ^= mask
    document["signature"]["ed25519"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(DirectorySignatureError):
        _load(write_json(tmp_path / "d.json", document), operator)


@pytest.mark.parametrize(
    "signature",
    ["", "not base64!", base64.b64encode(bytes(63)).decode(), base64.b64encode(bytes(65)).decode()],
    ids=["empty", "not base64", "63 bytes", "65 bytes"],
)
def test_mangled_signature_is_a_signature_error(
    tmp_path: Path, operator: Operator, signature: str
) -> None:
    """An empty, non-base64 or wrong-length signature is a signature error naming its field."""
    document = operator.document(5)
    document["signature"]["ed25519"] = signature
    with pytest.raises(DirectorySignatureError) as info:
        _load(write_json(tmp_path / "d.json", document), operator)
    assert info.value.field == "signature.ed25519"


# --- malformed files ---------------------------------------------------------------------


def _assert_names_file_field_fix(exc: DirectoryError, path: Path, field: str) -> None:
    assert type(exc) is DirectoryError, f"expected a plain DirectoryError, got {exc!r}"
    assert exc.path == str(path)
    assert exc.field == field
    assert exc.fix
    message = str(exc)
    assert message.startswith(f"{path}: {field}: ")
    assert f"Fix: {exc.fix}" in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{not json", "line 1"),
        ("\n\n[1, 2", "line 3"),
        ("", "line 1"),
        ("[]", "(document)"),
        ('"directory"', "(document)"),
    ],
)
def test_unreadable_json_names_file_line_and_fix(
    tmp_path: Path, operator: Operator, text: str, field: str
) -> None:
    """A file that is not JSON, or not a JSON object, is a DirectoryError with the fix."""
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DirectoryError) as info:
        _load(path, operator)
    _assert_names_file_field_fix(info.value, path, field)


def test_missing_file_names_itself(tmp_path: Path, operator: Operator) -> None:
    """A directory file that does not exist is a DirectoryError naming the path."""
    path = tmp_path / "absent.json"
    with pytest.raises(DirectoryError) as info:
        _load(path, operator)
    _assert_names_file_field_fix(info.value, path, "(file)")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ("no signature", "signature"),
        ("no directory", "directory"),
        ("signature not an object", "signature"),
        ("directory not an object", "directory"),
        ("unknown member", "comment"),
    ],
)
def test_malformed_envelope_names_the_member(
    tmp_path: Path, operator: Operator, edit: str, field: str
) -> None:
    """Missing, mistyped or unknown top-level members are named in the error."""
    document: dict[str, Any] = operator.document(1)
    if edit == "no signature":
        del document["signature"]
    elif edit == "no directory":
        del document["directory"]
    elif edit == "signature not an object":
        document["signature"] = "abc"
    elif edit == "directory not an object":
        document["directory"] = [1]
    else:
        document["comment"] = "hello"
    path = write_json(tmp_path / "d.json", document)
    with pytest.raises(DirectoryError) as info:
        _load(path, operator)
    _assert_names_file_field_fix(info.value, path, field)


def _site(raw: dict[str, Any], site_id: str) -> dict[str, Any]:
    site: dict[str, Any] = next(s for s in raw["sites"] if s["id"] == site_id)
    return site


def _drop_federation(raw: dict[str, Any]) -> None:
    del raw["federation"]


def _version_text(raw: dict[str, Any]) -> None:
    raw["version"] = "three"


def _negative_version(raw: dict[str, Any]) -> None:
    raw["version"] = -1


def _sites_object(raw: dict[str, Any]) -> None:
    raw["sites"] = {"hosp-a": {}}


def _bad_site_id(raw: dict[str, Any]) -> None:
    _site(raw, "hosp-b")["id"] = "Hosp_B"


def _duplicate_site(raw: dict[str, Any]) -> None:
    twin = copy.deepcopy(_site(raw, "hosp-a"))
    twin["broker_user"] = "someone-else"
    raw["sites"].append(twin)


def _duplicate_broker_user(raw: dict[str, Any]) -> None:
    _site(raw, "hosp-c")["broker_user"] = _site(raw, "hosp-a")["broker_user"]


def _key_id_mismatch(raw: dict[str, Any]) -> None:
    _site(raw, "hosp-a")["kem_keys"][0]["key_id"] = KemPrivateKey.generate().key_id


def _public_swapped(raw: dict[str, Any]) -> None:
    key = _site(raw, "hosp-b")["signing_keys"][0]
    key["public"] = base64.b64encode(SigningPrivateKey.generate().public.ed25519).decode()


def _wrong_kind_list(raw: dict[str, Any]) -> None:
    site = _site(raw, "hosp-a")
    site["kem_keys"] = site["signing_keys"]


def _revoked_not_bool(raw: dict[str, Any]) -> None:
    _site(raw, "hosp-a")["signing_keys"][0]["revoked"] = "maybe"


def _unknown_format(raw: dict[str, Any]) -> None:
    raw["format"] = "dicombridge-directory/2"


def _no_kem_keys(raw: dict[str, Any]) -> None:
    _site(raw, "hosp-a")["kem_keys"] = []


def _naive_not_before(raw: dict[str, Any]) -> None:
    _site(raw, "hosp-a")["signing_keys"][0]["not_before"] = "2024-01-01T00:00:00"


def _naive_issued_at(raw: dict[str, Any]) -> None:
    raw["issued_at"] = "2024-01-01T00:00:00"


MALFORMED_BODIES = {
    "federation missing": (_drop_federation, "directory.federation"),
    "version not a number": (_version_text, "directory.version"),
    "negative version": (_negative_version, "directory.version"),
    "sites not a list": (_sites_object, "directory.sites"),
    "bad site id": (_bad_site_id, "directory.sites.1.id"),
    "duplicated site": (_duplicate_site, "directory.sites"),
    "duplicated broker user": (_duplicate_broker_user, "directory.sites"),
    "key_id not the public key's": (_key_id_mismatch, "directory.sites.0.kem_keys.0"),
    "public key swapped": (_public_swapped, "directory.sites.1.signing_keys.0"),
    "signing keys as kem keys": (_wrong_kind_list, "directory.sites.0.kem_keys"),
    "revoked not a boolean": (_revoked_not_bool, "directory.sites.0.signing_keys.0.revoked"),
    "unknown format": (_unknown_format, "directory.format"),
    "site without kem keys": (_no_kem_keys, "directory.sites.0.kem_keys"),
    "key time without zone": (_naive_not_before, "directory.sites.0.signing_keys.0.not_before"),
    "issued_at without zone": (_naive_issued_at, "directory.issued_at"),
}


@pytest.mark.parametrize("case", list(MALFORMED_BODIES))
def test_malformed_signed_body_names_file_field_and_fix(
    tmp_path: Path, operator: Operator, case: str
) -> None:
    """A correctly signed but invalid body is a DirectoryError naming the file, field and fix."""
    edit, field = MALFORMED_BODIES[case]
    raw = operator.body(1).model_dump(mode="json")
    edit(raw)
    path = write_json(tmp_path / "d.json", sign_raw(raw, operator.key))
    with pytest.raises(DirectoryError) as info:
        _load(path, operator)
    _assert_names_file_field_fix(info.value, path, field)


def test_duplicated_site_error_names_the_site(tmp_path: Path, operator: Operator) -> None:
    """The error for a site listed twice says which site it is."""
    raw = operator.body(1).model_dump(mode="json")
    _duplicate_site(raw)
    path = write_json(tmp_path / "d.json", sign_raw(raw, operator.key))
    with pytest.raises(DirectoryError, match="'hosp-a'"):
        _load(path, operator)


@pytest.mark.parametrize("site_id", ["hosp-a", "a", "0", "a-b-c", "x" * 32, "hosp-2", "9lives"])
def test_valid_site_ids(site_id: str) -> None:
    """Lowercase slugs of 1 to 32 characters are site ids."""
    assert check_site_id(site_id) == site_id


@pytest.mark.parametrize(
    "site_id", ["", "Hosp-a", "hosp_a", "-hosp", "hosp-", "x" * 33, "hosp a", "hösp", "a\n"]
)
def test_invalid_site_ids(site_id: str) -> None:
    """Anything but a lowercase slug of 1 to 32 characters is refused with the rule spelled out."""
    with pytest.raises(ValueError, match="lowercase slug"):
        check_site_id(site_id)


# --- rollback ----------------------------------------------------------------------------


def test_rollback_to_an_older_version_is_refused(tmp_path: Path, operator: Operator) -> None:
    """After version 3 was accepted, version 2 is refused, again and again."""
    state = tmp_path / "state" / "directory-version.json"
    v3 = operator.write(tmp_path / "v3.json", 3)
    v2 = operator.write(tmp_path / "v2.json", 2)
    assert _load(v3, operator, state).version == 3
    with pytest.raises(DirectoryRollbackError) as info:
        _load(v2, operator, state)
    assert info.value.path == str(v2)
    assert info.value.field == "directory.version"
    assert "older than version 3" in str(info.value)
    with pytest.raises(DirectoryRollbackError):
        _load(v2, operator, state)
    assert _load(v3, operator, state).version == 3


def test_rollback_is_remembered_in_the_state_file(tmp_path: Path, operator: Operator) -> None:
    """The accepted version lives in the state file: a fresh load (a restart) refuses v2."""
    state = tmp_path / "state.json"
    _load(operator.write(tmp_path / "v3.json", 3), operator, state)
    recorded = json.loads(state.read_text())
    assert recorded["version"] == 3
    # A new process knows nothing but the files: copy v2 to where v3 used to be.
    target = tmp_path / "directory.json"
    operator.write(target, 2)
    with pytest.raises(DirectoryRollbackError):
        fed.load(target, operator.key.public, state_path=state)
    assert json.loads(state.read_text()) == recorded
    # Without a state file there is no memory, hence no protection: documented behaviour.
    assert _load(target, operator, None).version == 2


def test_same_version_with_other_content_is_refused(tmp_path: Path, operator: Operator) -> None:
    """A second, different directory signed with an already accepted version is refused."""
    state = tmp_path / "state.json"
    _load(operator.write(tmp_path / "a.json", 4), operator, state)
    changed = operator.body(4).without_site("hosp-c")
    path = write_json(tmp_path / "b.json", fed.sign(changed, operator.key))
    with pytest.raises(DirectoryRollbackError, match="differs from the version 4"):
        _load(path, operator, state)


def test_same_version_same_content_is_accepted(tmp_path: Path, operator: Operator) -> None:
    """Loading the accepted directory again (even re-indented) is fine."""
    state = tmp_path / "state.json"
    document = operator.document(4)
    first = _load(write_json(tmp_path / "a.json", document), operator, state)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(document, separators=(",", ":")))
    again = _load(path, operator, state)
    assert again.digest == first.digest
    assert again.version == 4


def test_newer_version_is_accepted_and_recorded(tmp_path: Path, operator: Operator) -> None:
    """A newer version is accepted, becomes the floor, and the older one is refused after."""
    state = tmp_path / "state.json"
    _load(operator.write(tmp_path / "v2.json", 2), operator, state)
    newest = _load(operator.write(tmp_path / "v9.json", 9), operator, state)
    assert json.loads(state.read_text()) == {"version": 9, "digest": newest.digest}
    with pytest.raises(DirectoryRollbackError):
        _load(tmp_path / "v2.json", operator, state)


def test_refused_directory_does_not_move_the_state(tmp_path: Path, operator: Operator) -> None:
    """A directory refused for its signature leaves the recorded version untouched."""
    state = tmp_path / "state.json"
    _load(operator.write(tmp_path / "v2.json", 2), operator, state)
    before = state.read_bytes()
    forged = fed.sign(operator.body(50), SigningPrivateKey.generate())
    with pytest.raises(DirectorySignatureError):
        _load(write_json(tmp_path / "v50.json", forged), operator, state)
    assert state.read_bytes() == before
    assert _load(tmp_path / "v2.json", operator, state).version == 2


def test_unreadable_state_file_is_refused(tmp_path: Path, operator: Operator) -> None:
    """A corrupt record of the accepted version is a DirectoryError naming the state file."""
    state = tmp_path / "state.json"
    state.write_text("{garbage")
    with pytest.raises(DirectoryError) as info:
        _load(operator.write(tmp_path / "v2.json", 2), operator, state)
    assert info.value.path == str(state)
    assert "rollback protection" in info.value.fix


# --- versions ----------------------------------------------------------------------------


@given(
    draft_version=st.integers(min_value=0, max_value=2**53),
    signed_version=st.one_of(st.none(), st.integers(min_value=0, max_value=2**53)),
)
def test_next_version_grows_past_draft_and_last_signed(
    draft_version: int, signed_version: int | None
) -> None:
    """next_version is above both the draft's version and the last signed one, by exactly 1."""
    keys = {"hosp-a": _SITE_KEYS}
    draft = directory_body(keys, version=draft_version)
    last = None
    if signed_version is not None:
        last = fed.Directory(draft.model_copy(update={"version": signed_version}), digest="x")
    before = utc_now()
    bumped = fed.next_version(draft, last)
    floor = max(draft_version, signed_version or 0)
    assert bumped.version == floor + 1
    assert bumped.version > draft_version
    assert signed_version is None or bumped.version > signed_version
    assert bumped.issued_at >= before
    assert bumped.sites == draft.sites


_SITE_KEYS = SiteKeys.generate()


def test_new_body_is_an_empty_version_zero_draft() -> None:
    """A new draft has version 0 and no sites; its first signing makes version 1."""
    body = fed.new_body("fed")
    assert body.version == 0
    assert body.sites == []
    assert fed.next_version(body, None).version == 1


def test_with_site_replaces_and_without_site_removes() -> None:
    """with_site replaces a site of the same id (sorted by id); without_site drops it."""
    keys = {site_id: SiteKeys.generate() for site_id in ("hosp-c", "hosp-a")}
    body = directory_body(keys)
    assert [s.id for s in body.sites] == ["hosp-a", "hosp-c"]
    replaced = body.with_site(site_entry("hosp-a", keys["hosp-a"], broker_user="new-user"))
    assert [s.id for s in replaced.sites] == ["hosp-a", "hosp-c"]
    site = replaced.site("hosp-a")
    assert site is not None
    assert site.broker_user == "new-user"
    assert [s.id for s in replaced.without_site("hosp-a").sites] == ["hosp-c"]
