"""Key pairs of a site: files on disk, key ids, and what never gets printed."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from dicombridge.errors import KeyMaterialError
from dicombridge.keys import (
    KEM_KIND,
    SIGNING_KIND,
    KemPrivateKey,
    KemPublicKey,
    SigningPrivateKey,
    SigningPublicKey,
    SiteKeys,
    Validity,
    key_id_for,
    load_kem_key,
    load_signing_key,
    newest_valid,
    utc_now,
)
from tests.cryptokit import flip


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _key_files(keys_dir: Path) -> list[Path]:
    return sorted(keys_dir.glob("*.key"))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[SiteKeys, Path]:
    keys = SiteKeys.generate()
    keys_dir = tmp_path / "site" / "keys"
    keys.save(keys_dir)
    return keys, keys_dir


def test_save_load_round_trip(saved: tuple[SiteKeys, Path]) -> None:
    """Loaded keys have the same ids, public keys and creation times, and still work."""
    keys, keys_dir = saved
    loaded = SiteKeys.load(keys_dir)
    assert [k.key_id for k in loaded.kem_keys] == [k.key_id for k in keys.kem_keys]
    assert [k.public for k in loaded.kem_keys] == [k.public for k in keys.kem_keys]
    assert [k.created_at for k in loaded.kem_keys] == [k.created_at for k in keys.kem_keys]
    assert [k.key_id for k in loaded.signing_keys] == [k.key_id for k in keys.signing_keys]
    assert [k.public for k in loaded.signing_keys] == [k.public for k in keys.signing_keys]
    message = b"signed before saving, verified after loading"
    assert keys.current_signing_key.public.verify(loaded.current_signing_key.sign(message), message)
    from dicombridge.keys import HPKE_SUITE

    sealed = HPKE_SUITE.encrypt(b"secret", keys.kem_keys[0].public.to_hpke(), info=b"t")
    assert HPKE_SUITE.decrypt(sealed, loaded.kem_keys[0].to_hpke(), info=b"t") == b"secret"


def test_round_trip_with_several_keys_of_each_kind(tmp_path: Path) -> None:
    """Every key of a rotating site is saved and loaded, and the newest one signs."""
    older = SigningPrivateKey(
        SigningPrivateKey.generate()._raw, created_at=utc_now() - timedelta(days=30)
    )
    keys = SiteKeys([KemPrivateKey.generate(), KemPrivateKey.generate()], [older])
    keys.signing_keys.append(SigningPrivateKey.generate())
    keys.save(tmp_path / "keys")
    loaded = SiteKeys.load(tmp_path / "keys")
    assert {k.key_id for k in loaded.kem_keys} == {k.key_id for k in keys.kem_keys}
    assert {k.key_id for k in loaded.signing_keys} == {k.key_id for k in keys.signing_keys}
    assert loaded.current_signing_key.key_id == keys.signing_keys[1].key_id
    for kem_key in keys.kem_keys:
        found = loaded.kem_key(kem_key.key_id)
        assert found is not None
        assert found.public == kem_key.public
    assert loaded.kem_key("0" * 32) is None


def test_private_files_are_0600_in_a_0700_directory(saved: tuple[SiteKeys, Path]) -> None:
    """Every private key file is mode 0600 and the key directory is mode 0700."""
    _, keys_dir = saved
    assert _mode(keys_dir) == 0o700
    files = _key_files(keys_dir)
    assert len(files) == 2
    assert all(_mode(path) == 0o600 for path in files)
    assert sorted(p.name for p in keys_dir.iterdir()) == sorted(p.name for p in files)


def test_save_tightens_an_existing_open_directory(tmp_path: Path) -> None:
    """Saving into an existing world-readable directory makes it 0700."""
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o755)
    keys_dir.chmod(0o755)
    SiteKeys.generate().save(keys_dir)
    assert _mode(keys_dir) == 0o700


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610, 0o601])
@pytest.mark.parametrize("prefix", ["kem-", "sign-"])
def test_readable_by_others_is_refused(
    saved: tuple[SiteKeys, Path], mode: int, prefix: str
) -> None:
    """A group- or world-accessible key file is refused, naming the path and the chmod fix."""
    _, keys_dir = saved
    (path,) = keys_dir.glob(f"{prefix}*.key")
    path.chmod(mode)
    loader = load_kem_key if prefix == "kem-" else load_signing_key
    with pytest.raises(KeyMaterialError) as info:
        loader(path)
    assert str(path) in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        SiteKeys.load(keys_dir)


def test_owner_only_modes_are_accepted(saved: tuple[SiteKeys, Path]) -> None:
    """Modes without group or world bits (0400, 0600) load."""
    keys, keys_dir = saved
    for path in _key_files(keys_dir):
        path.chmod(0o400)
    assert SiteKeys.load(keys_dir).current_signing_key.key_id == keys.current_signing_key.key_id


def test_missing_key_file_is_key_material_error(tmp_path: Path) -> None:
    """Loading a key file that does not exist raises KeyMaterialError naming the path."""
    path = tmp_path / "keys" / "sign-missing.key"
    with pytest.raises(KeyMaterialError, match=r"sign-missing\.key"):
        load_signing_key(path)


def test_missing_or_empty_key_directory_is_refused(tmp_path: Path) -> None:
    """A missing key directory, or one without both kinds of key, says how to fix it."""
    with pytest.raises(KeyMaterialError, match="dicombridge init"):
        SiteKeys.load(tmp_path / "nowhere")
    keys_dir = tmp_path / "keys"
    SiteKeys.generate().save(keys_dir)
    next(keys_dir.glob("sign-*.key")).unlink()
    with pytest.raises(KeyMaterialError, match=r"sign-\*\.key"):
        SiteKeys.load(keys_dir)


def _rewrite(path: Path, **changes: object) -> None:
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("prefix", ["kem-", "sign-"])
def test_key_id_not_matching_the_key_is_refused(saved: tuple[SiteKeys, Path], prefix: str) -> None:
    """A key file whose recorded key_id is not its key's is refused (tampered or mixed up)."""
    _, keys_dir = saved
    (path,) = keys_dir.glob(f"{prefix}*.key")
    other = KemPrivateKey.generate() if prefix == "kem-" else SigningPrivateKey.generate()
    _rewrite(path, key_id=other.key_id)
    with pytest.raises(KeyMaterialError, match="key_id does not match") as info:
        SiteKeys.load(keys_dir)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("prefix", "secret_field"),
    [("kem-", "mlkem768_seed"), ("kem-", "x25519"), ("sign-", "ed25519")],
)
def test_swapped_key_material_is_refused(
    saved: tuple[SiteKeys, Path], prefix: str, secret_field: str
) -> None:
    """A key file with a secret replaced (same key_id, another key) is refused."""
    _, keys_dir = saved
    (path,) = keys_dir.glob(f"{prefix}*.key")
    other = KemPrivateKey.generate() if prefix == "kem-" else SigningPrivateKey.generate()
    _rewrite(path, **{secret_field: other.to_json()[secret_field]})
    with pytest.raises(KeyMaterialError, match="key_id does not match"):
        SiteKeys.load(keys_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "rsa"}, "kind is not"),
        ({"x25519": "not base64!"}, "not valid base64"),
        ({"x25519": base64.b64encode(b"short").decode()}, "5 bytes, expected 32"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": "2024-01-01T00:00:00"}, "no time zone"),
    ],
)
def test_malformed_kem_key_file_is_refused(
    saved: tuple[SiteKeys, Path], change: dict[str, object], message: str
) -> None:
    """A KEM key file of the wrong kind, bad base64, wrong length or bad time is refused."""
    _, keys_dir = saved
    (path,) = keys_dir.glob("kem-*.key")
    _rewrite(path, **change)
    with pytest.raises(KeyMaterialError, match=message):
        load_kem_key(path)


def test_key_file_that_is_not_json_is_refused(saved: tuple[SiteKeys, Path]) -> None:
    """A key file that is not a JSON object is refused with its path."""
    _, keys_dir = saved
    (path,) = keys_dir.glob("sign-*.key")
    path.write_text("[1, 2]")
    with pytest.raises(KeyMaterialError, match="expected a JSON object"):
        load_signing_key(path)
    path.write_text("{not json")
    with pytest.raises(KeyMaterialError, match="not a readable key file") as info:
        load_signing_key(path)
    assert str(path) in str(info.value)


def test_key_id_is_the_documented_digest_of_the_public_encoding() -> None:
    """key id = first 16 bytes of SHA-256('dicombridge-key-v1/<kind>/' + public), in hex."""
    kem = KemPrivateKey.generate()
    sig = SigningPrivateKey.generate()
    expected_kem = hashlib.sha256(
        b"dicombridge-key-v1/mlkem768-x25519/" + kem.public.mlkem768 + kem.public.x25519
    ).hexdigest()[:32]
    expected_sig = hashlib.sha256(b"dicombridge-key-v1/ed25519/" + sig.public.ed25519)
    assert kem.key_id == kem.public.key_id == expected_kem
    assert sig.key_id == sig.public.key_id == expected_sig.hexdigest()[:32]


def test_key_id_is_stable_across_save_load_and_validity(saved: tuple[SiteKeys, Path]) -> None:
    """The same public key keeps its id: after loading, and whatever its validity says."""
    keys, keys_dir = saved
    loaded = SiteKeys.load(keys_dir)
    assert loaded.kem_keys[0].key_id == keys.kem_keys[0].key_id
    public = keys.kem_keys[0].public
    revoked = KemPublicKey(public.mlkem768, public.x25519, Validity(utc_now(), revoked=True))
    assert revoked.key_id == public.key_id
    signing = keys.signing_keys[0].public
    assert SigningPublicKey(signing.ed25519, Validity(utc_now())).key_id == signing.key_id


def test_key_id_changes_with_any_part_of_the_public_key() -> None:
    """Changing the ML-KEM half, the X25519 half, or an Ed25519 key changes the id."""
    kem = KemPrivateKey.generate().public
    assert KemPublicKey(flip(kem.mlkem768, 0), kem.x25519).key_id != kem.key_id
    assert KemPublicKey(kem.mlkem768, flip(kem.x25519, 31)).key_id != kem.key_id
    other = KemPrivateKey.generate().public
    assert KemPublicKey(kem.mlkem768, other.x25519).key_id != kem.key_id
    sig = SigningPrivateKey.generate().public
    assert SigningPublicKey(flip(sig.ed25519, 5)).key_id != sig.key_id
    assert KemPrivateKey.generate().key_id != KemPrivateKey.generate().key_id


def test_key_id_separates_kinds() -> None:
    """The same bytes under two kinds give two ids (the kind is in the digest)."""
    raw = bytes(32)
    assert key_id_for(KEM_KIND, raw) != key_id_for(SIGNING_KIND, raw)
    assert len(key_id_for(SIGNING_KIND, raw)) == 32


def test_repr_and_str_of_private_keys_hold_no_key_material() -> None:
    """repr/str of private keys (alone, in SiteKeys) show the key id and no secret bytes."""
    keys = SiteKeys.generate()
    kem, sig = keys.kem_keys[0], keys.signing_keys[0]
    secrets = [kem._mlkem_seed, kem._x25519, sig._raw]
    texts = [repr(kem), str(kem), repr(sig), str(sig), repr(keys), str(keys), f"{keys!r}"]
    for text in texts:
        for secret in secrets:
            for form in (
                secret.hex(),
                secret.hex().upper(),
                base64.b64encode(secret).decode(),
                base64.urlsafe_b64encode(secret).decode(),
                repr(secret),
                repr(secret)[2:18],
            ):
                assert form not in text
    assert kem.key_id in repr(kem)
    assert sig.key_id in repr(sig)


def test_private_keys_have_no_instance_dict() -> None:
    """Private keys use __slots__, so vars() cannot dump their secrets into a log."""
    with pytest.raises(TypeError):
        vars(KemPrivateKey.generate())
    with pytest.raises(TypeError):
        vars(SigningPrivateKey.generate())


def test_wrong_length_keys_are_refused() -> None:
    """Constructors refuse key material of the wrong length with KeyMaterialError."""
    with pytest.raises(KeyMaterialError):
        KemPrivateKey(bytes(63), bytes(32), created_at=utc_now())
    with pytest.raises(KeyMaterialError):
        KemPrivateKey(bytes(64), bytes(31), created_at=utc_now())
    with pytest.raises(KeyMaterialError):
        SigningPrivateKey(bytes(31), created_at=utc_now())
    with pytest.raises(KeyMaterialError):
        KemPublicKey(bytes(1183), bytes(32))
    with pytest.raises(KeyMaterialError):
        SigningPublicKey(bytes(33))


def test_validity_window() -> None:
    """A key is valid from not_before (inclusive) to not_after (exclusive), never if revoked."""
    start = utc_now()
    end = start + timedelta(days=1)
    window = Validity(start, end)
    assert not window.valid_at(start - timedelta(seconds=1))
    assert window.valid_at(start)
    assert window.valid_at(end - timedelta(seconds=1))
    assert not window.valid_at(end)
    assert Validity(start).valid_at(start + timedelta(days=3650))
    assert not Validity(start, revoked=True).valid_at(start + timedelta(seconds=1))


def test_newest_valid_picks_the_newest_usable_kem_key() -> None:
    """Senders seal to the newest key valid now: not a revoked, expired or future one."""
    now = utc_now()
    publics = [KemPrivateKey.generate().public for _ in range(4)]

    def at(key: KemPublicKey, validity: Validity) -> KemPublicKey:
        return KemPublicKey(key.mlkem768, key.x25519, validity)

    old = at(publics[0], Validity(now - timedelta(days=10)))
    newer = at(publics[1], Validity(now - timedelta(days=1)))
    revoked = at(publics[2], Validity(now - timedelta(hours=1), revoked=True))
    future = at(publics[3], Validity(now + timedelta(days=1)))
    assert newest_valid([old, newer, revoked, future], now) == newer
    assert newest_valid([old, revoked, future], now) == old
    assert newest_valid([revoked, future], now) is None
