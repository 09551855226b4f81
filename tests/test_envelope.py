"""Messages on the wire: the clear header, signed-then-sealed documents, AEAD fragments."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicombridge.envelope import (
    HEADER_BYTES,
    MAX_DOCUMENT_BYTES,
    MAX_FRAGMENT_SIZE,
    PROTOCOL_VERSION,
    Header,
    Kind,
    Manifest,
    Sender,
    fragment_count_for,
    manifest_from_document,
    new_id,
    open_document,
    open_fragment,
    parse_fragment,
    parse_header,
    seal_document,
    seal_fragment,
    sealed_fragment_bytes,
)
from dicombridge.errors import (
    EnvelopeError,
    IntegrityError,
    NotForUsError,
    UnsupportedVersionError,
)
from dicombridge.keys import SiteKeys, Validity, utc_now
from tests.cryptokit import (
    COUNT_AT,
    FLAGS_AT,
    FRAGMENT_HEADER_BYTES,
    HPKE_ENC_BYTES,
    ID_AT,
    INDEX_AT,
    KEY_ID_AT,
    KIND_AT,
    KIND_CONTROL,
    LONG_AGO,
    MAGIC,
    SEALED_HEADER_BYTES,
    SIGNED_CONTEXT,
    TAG_BYTES,
    VERSION_AT,
    Federation,
    directory_body,
    flip,
    make_federation,
    open_sealed,
    patch,
    reseal,
    rewrite_fragment,
)


@pytest.fixture(scope="module")
def fed() -> Federation:
    return make_federation()


@dataclass(frozen=True)
class Transfer:
    """A transfer sealed in memory with the envelope API (seal_file does the same on disk)."""

    manifest: Manifest
    manifest_body: bytes
    fragments: list[bytes]


def seal_in_memory(
    fed: Federation,
    data: bytes,
    *,
    fragment_size: int = 16,
    sender: str = "hosp-a",
    recipient: str = "hosp-b",
    meta: dict[str, Any] | None = None,
) -> Transfer:
    transfer_id = new_id()
    count = fragment_count_for(len(data), fragment_size)
    manifest = Manifest(
        transfer_id=transfer_id,
        sender_site=sender,
        sender_key_id=fed.keys[sender].current_signing_key.key_id,
        recipient_site=recipient,
        created_at=utc_now(),
        fragment_size=fragment_size,
        fragment_count=count,
        total_length=len(data),
        sha256=hashlib.sha256(data).digest(),
        content_key=AESGCM.generate_key(bit_length=256),
        meta=meta or {},
    )
    body = seal_document(
        Kind.MANIFEST,
        transfer_id,
        manifest.to_document(),
        sender=fed.sender(sender),
        recipient_site=recipient,
        recipient_key=fed.kem_key(recipient),
    )
    aead = AESGCM(manifest.content_key)
    fragments = [
        seal_fragment(
            aead, transfer_id, i, count, data[i * fragment_size : (i + 1) * fragment_size]
        )
        for i in range(count)
    ]
    return Transfer(manifest, body, fragments)


def open_manifest(fed: Federation, body: bytes, site: str = "hosp-b") -> Manifest:
    opened = open_document(body, site_id=site, keys=fed.keys[site], directory=fed.directory)
    return manifest_from_document(opened)


def open_all(fed: Federation, transfer: Transfer, site: str = "hosp-b") -> bytes:
    manifest = open_manifest(fed, transfer.manifest_body, site)
    aead = AESGCM(manifest.content_key)
    parts = [open_fragment(aead, manifest, body) for body in transfer.fragments]
    assert [index for index, _ in parts] == list(range(manifest.fragment_count))
    return b"".join(data for _, data in parts)


DATA = bytes(range(256)) * 3 + b"tail"


# --- the clear header --------------------------------------------------------------------


def test_header_layout_is_as_documented() -> None:
    """The 24 clear bytes are magic, version, kind, zero flags and the 16-byte id."""
    message_id = bytes(range(16))
    packed = Header(PROTOCOL_VERSION, Kind.FRAGMENT, message_id).pack()
    assert packed == b"DCBR\x01\x02\x00\x00" + message_id
    assert len(packed) == HEADER_BYTES == 24
    parsed = parse_header(packed)
    assert (parsed.version, parsed.kind, parsed.message_id) == (1, Kind.FRAGMENT, message_id)
    assert parsed.id_hex == message_id.hex()


def test_fragment_layout_is_as_documented() -> None:
    """A fragment is header, index and count (big-endian), then AES-GCM of data with the tag."""
    key = AESGCM.generate_key(bit_length=256)
    transfer_id = new_id()
    body = seal_fragment(AESGCM(key), transfer_id, 2, 5, b"hello")
    assert body[:HEADER_BYTES] == Header(1, Kind.FRAGMENT, transfer_id).pack()
    assert struct.unpack(">II", body[INDEX_AT:FRAGMENT_HEADER_BYTES]) == (2, 5)
    assert len(body) == sealed_fragment_bytes(5) == FRAGMENT_HEADER_BYTES + 5 + TAG_BYTES
    nonce = (2).to_bytes(12, "big")
    clear = body[:FRAGMENT_HEADER_BYTES]
    assert AESGCM(key).decrypt(nonce, body[FRAGMENT_HEADER_BYTES:], clear) == b"hello"


def test_new_ids_are_random_128_bit() -> None:
    """Transfer ids are 16 bytes and do not repeat."""
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert {len(i) for i in ids} == {16}


@pytest.mark.parametrize("version", [0, 2, 3, 255])
def test_unknown_version_is_refused_at_parse_time(fed: Federation, version: int) -> None:
    """A patched version byte is UnsupportedVersionError before anything is decrypted."""
    transfer = seal_in_memory(fed, DATA)
    manifest = patch(transfer.manifest_body, VERSION_AT, bytes([version]))
    fragment = patch(transfer.fragments[0], VERSION_AT, bytes([version]))
    for body in (manifest, fragment):
        with pytest.raises(UnsupportedVersionError, match=f"protocol version {version}"):
            parse_header(body)
    with pytest.raises(UnsupportedVersionError):
        parse_fragment(fragment)
    # Even a site that could not decrypt it learns only that the version is unknown.
    with pytest.raises(UnsupportedVersionError):
        open_document(manifest, site_id="hosp-c", keys=fed.keys["hosp-c"], directory=fed.directory)
    with pytest.raises(UnsupportedVersionError):
        open_fragment(AESGCM(transfer.manifest.content_key), transfer.manifest, fragment)


@pytest.mark.parametrize("offset", range(4))
def test_bad_magic_is_refused(fed: Federation, offset: int) -> None:
    """Anything that does not start with DCBR is not ours."""
    transfer = seal_in_memory(fed, DATA)
    for body in (transfer.manifest_body, transfer.fragments[0]):
        with pytest.raises(EnvelopeError, match="bad magic"):
            parse_header(flip(body, offset, 0x20))
    with pytest.raises(EnvelopeError, match="bad magic"):
        parse_header(b"AMQP" + bytes(20))


@pytest.mark.parametrize("kind", [0, 4, 255])
def test_unknown_kind_is_refused(fed: Federation, kind: int) -> None:
    """A kind byte that names no message kind is refused."""
    body = patch(seal_in_memory(fed, DATA).fragments[0], KIND_AT, bytes([kind]))
    with pytest.raises(EnvelopeError, match=f"unknown message kind {kind}"):
        parse_header(body)


@pytest.mark.parametrize("flags", [b"\x00\x01", b"\x80\x00"])
def test_nonzero_flags_are_refused(fed: Federation, flags: bytes) -> None:
    """Flags are reserved: anything but zero is refused."""
    body = patch(seal_in_memory(fed, DATA).manifest_body, FLAGS_AT, flags)
    with pytest.raises(EnvelopeError, match="unknown flags"):
        parse_header(body)


def test_short_header_is_refused() -> None:
    """Fewer than 24 bytes is not a message."""
    for length in range(HEADER_BYTES):
        with pytest.raises(EnvelopeError, match="shorter than a header"):
            parse_header(MAGIC + bytes(length)[: max(0, length - 4)])


# --- sealed documents --------------------------------------------------------------------


def test_manifest_round_trip(fed: Federation) -> None:
    """A sealed manifest opens for its recipient with every field as the sender wrote it."""
    transfer = seal_in_memory(fed, DATA, meta={"route": "PACS", "n": [1, 2]})
    manifest = open_manifest(fed, transfer.manifest_body)
    assert manifest == transfer.manifest
    assert open_all(fed, transfer) == DATA


def test_control_document_round_trip(fed: Federation) -> None:
    """A control document carries the caller's fields plus the sealer's envelope fields."""
    message_id = new_id()
    created = utc_now().isoformat()
    body = seal_document(
        Kind.CONTROL,
        message_id,
        {"created_at": created, "query": {"PatientID": "x"}},
        sender=fed.sender("hosp-c"),
        recipient_site="hosp-a",
        recipient_key=fed.kem_key("hosp-a"),
    )
    assert body[KIND_AT] == KIND_CONTROL
    opened = open_document(body, site_id="hosp-a", keys=fed.keys["hosp-a"], directory=fed.directory)
    assert opened.header.kind is Kind.CONTROL
    assert opened.header.message_id == message_id
    assert opened.sender_site == "hosp-c"
    assert opened.sender_key_id == fed.keys["hosp-c"].current_signing_key.key_id
    assert opened.document["query"] == {"PatientID": "x"}
    assert opened.document["v"] == 1
    assert opened.document["kind"] == "control"
    assert opened.document["recipient"] == {
        "site": "hosp-a",
        "kem_key_id": fed.kem_key("hosp-a").key_id,
    }
    with pytest.raises(EnvelopeError, match="expected a manifest"):
        manifest_from_document(opened)


def test_caller_cannot_override_envelope_fields(fed: Federation) -> None:
    """Sender, recipient, id and version in the caller's document are replaced by the sealer's."""
    spoof = {
        "created_at": utc_now().isoformat(),
        "sender": {"site": "hosp-c", "signing_key_id": "0" * 32},
        "recipient": {"site": "hosp-c", "kem_key_id": "0" * 32},
        "v": 99,
        "id": "00",
        "kind": "manifest",
    }
    message_id = new_id()
    body = seal_document(
        Kind.CONTROL,
        message_id,
        spoof,
        sender=fed.sender("hosp-a"),
        recipient_site="hosp-b",
        recipient_key=fed.kem_key("hosp-b"),
    )
    opened = open_document(body, site_id="hosp-b", keys=fed.keys["hosp-b"], directory=fed.directory)
    assert opened.sender_site == "hosp-a"
    assert opened.document["v"] == 1
    assert opened.document["id"] == message_id.hex()
    assert opened.document["kind"] == "control"


def test_fragment_kind_is_not_a_sealed_document(fed: Federation) -> None:
    """seal_document refuses the fragment kind; open_document refuses a fragment message."""
    with pytest.raises(ValueError, match="not a sealed document kind"):
        seal_document(
            Kind.FRAGMENT,
            new_id(),
            {},
            sender=fed.sender("hosp-a"),
            recipient_site="hosp-b",
            recipient_key=fed.kem_key("hosp-b"),
        )
    fragment = seal_in_memory(fed, DATA).fragments[0]
    with pytest.raises(EnvelopeError, match="expected a sealed document"):
        open_document(fragment, site_id="hosp-b", keys=fed.keys["hosp-b"], directory=fed.directory)
    with pytest.raises(EnvelopeError, match="expected a fragment"):
        parse_fragment(seal_in_memory(fed, DATA).manifest_body)


def test_sealing_twice_gives_different_ciphertexts(fed: Federation) -> None:
    """HPKE uses a fresh encapsulation each time: equal documents do not look equal on the wire."""
    message_id = new_id()

    def seal() -> bytes:
        return seal_document(
            Kind.CONTROL,
            message_id,
            {"created_at": "2030-01-01T00:00:00+00:00"},
            sender=fed.sender("hosp-a"),
            recipient_site="hosp-b",
            recipient_key=fed.kem_key("hosp-b"),
        )

    first, second = seal(), seal()
    assert first[:SEALED_HEADER_BYTES] == second[:SEALED_HEADER_BYTES]
    assert first[SEALED_HEADER_BYTES:] != second[SEALED_HEADER_BYTES:]


def test_every_bit_of_a_manifest_is_protected(fed: Federation) -> None:
    """Any flipped bit in a manifest is refused; past the clear part, as an IntegrityError."""
    body = seal_in_memory(fed, DATA, meta={"k": "v"}).manifest_body
    assert len(body) > SEALED_HEADER_BYTES + HPKE_ENC_BYTES + TAG_BYTES
    flips = [(offset, 1 << bit) for offset in range(SEALED_HEADER_BYTES) for bit in range(8)]
    flips += [(offset, 1 << (offset % 8)) for offset in range(SEALED_HEADER_BYTES, len(body))]
    flips += [(len(body) - 1 - i, 0x80) for i in range(TAG_BYTES)]
    accepted: list[int] = []
    wrong_error: list[tuple[int, str]] = []
    for offset, mask in flips:
        try:
            open_manifest(fed, flip(body, offset, mask))
        except EnvelopeError as exc:
            expected: type[EnvelopeError] = EnvelopeError
            if offset == VERSION_AT:
                expected = UnsupportedVersionError
            elif ID_AT <= offset < KEY_ID_AT or offset >= SEALED_HEADER_BYTES:
                expected = IntegrityError
            elif KEY_ID_AT <= offset < SEALED_HEADER_BYTES:
                expected = NotForUsError
            if not isinstance(exc, expected):
                wrong_error.append((offset, type(exc).__name__))
        else:
            accepted.append(offset)
    assert accepted == []
    assert wrong_error == []


def test_manifest_relabelled_as_control_is_refused(fed: Federation) -> None:
    """Changing the clear kind of a sealed manifest breaks the HPKE binding of the header."""
    body = patch(seal_in_memory(fed, DATA).manifest_body, KIND_AT, bytes([KIND_CONTROL]))
    with pytest.raises(IntegrityError, match="does not open"):
        open_document(body, site_id="hosp-b", keys=fed.keys["hosp-b"], directory=fed.directory)


def test_truncated_or_extended_manifest_is_refused(fed: Federation) -> None:
    """A manifest cut at any length, or with bytes appended, is refused."""
    body = seal_in_memory(fed, DATA).manifest_body
    for length in range(len(body)):
        expected = EnvelopeError if length < SEALED_HEADER_BYTES else IntegrityError
        with pytest.raises(expected):
            open_manifest(fed, body[:length])
    with pytest.raises(IntegrityError):
        open_manifest(fed, body + b"\0")


def test_oversized_document_is_refused_unread(fed: Federation) -> None:
    """A sealed document above 1 MiB is refused before any decryption."""
    body = seal_in_memory(fed, DATA).manifest_body
    padded = body + bytes(MAX_DOCUMENT_BYTES + 1 - len(body))
    with pytest.raises(EnvelopeError, match="exceeds"):
        open_manifest(fed, padded)


def test_sealed_for_another_site_is_not_for_us(fed: Federation) -> None:
    """hosp-c cannot open what hosp-a sealed for hosp-b: NotForUsError, no plaintext."""
    body = seal_in_memory(fed, DATA).manifest_body
    with pytest.raises(NotForUsError, match="does not hold"):
        open_manifest(fed, body, site="hosp-c")


def test_sealed_to_our_key_but_addressed_elsewhere_is_not_for_us(fed: Federation) -> None:
    """A document sealed to hosp-c's key but addressed (signed) to hosp-b is refused by both."""
    transfer = seal_in_memory(fed, DATA)
    body = seal_document(
        Kind.MANIFEST,
        transfer.manifest.transfer_id,
        transfer.manifest.to_document(),
        sender=fed.sender("hosp-a"),
        recipient_site="hosp-b",
        recipient_key=fed.kem_key("hosp-c"),
    )
    with pytest.raises(NotForUsError, match="addressed to 'hosp-b'"):
        open_manifest(fed, body, site="hosp-c")
    with pytest.raises(NotForUsError):
        open_manifest(fed, body, site="hosp-b")


# --- who signed ----------------------------------------------------------------------------


def _resealed(
    fed: Federation,
    body: bytes,
    *,
    signer: str,
    recipient: str = "hosp-b",
    edit: dict[str, Any] | None = None,
    plaintext: bytes | None = None,
    payload: bytes | None = None,
) -> bytes:
    """``body`` opened by its recipient, edited, and signed and sealed again by ``signer``."""
    document, _ = open_sealed(body, fed.keys[recipient])
    document.update(edit or {})
    return reseal(
        document,
        message_id=body[ID_AT:KEY_ID_AT],
        signing_key=fed.keys[signer].current_signing_key,
        recipient_key=fed.kem_key(recipient),
        kind=body[KIND_AT],
        plaintext=plaintext,
        payload=payload,
    )


def test_resealing_with_the_true_key_is_accepted(fed: Federation) -> None:
    """Control for the forgery tests: the test's own sealing, by the real sender, opens."""
    transfer = seal_in_memory(fed, DATA)
    body = _resealed(fed, transfer.manifest_body, signer="hosp-a")
    assert open_manifest(fed, body) == transfer.manifest


def test_sender_field_forged_and_signed_by_another_site_is_refused(fed: Federation) -> None:
    """hosp-c claiming to be hosp-a (naming hosp-a's key id) fails the signature check."""
    transfer = seal_in_memory(fed, DATA)
    document, _ = open_sealed(transfer.manifest_body, fed.keys["hosp-b"])
    assert document["sender"]["site"] == "hosp-a"
    body = _resealed(fed, transfer.manifest_body, signer="hosp-c")
    with pytest.raises(IntegrityError, match="does not verify for 'hosp-a'"):
        open_manifest(fed, body)


def test_sender_claim_with_own_key_id_is_refused(fed: Federation) -> None:
    """hosp-c claiming hosp-a but naming its own signing key: the key is not hosp-a's."""
    keys_c = fed.keys["hosp-c"]
    transfer = seal_in_memory(fed, DATA)
    body = seal_document(
        Kind.MANIFEST,
        transfer.manifest.transfer_id,
        transfer.manifest.to_document(),
        sender=Sender("hosp-a", keys_c),
        recipient_site="hosp-b",
        recipient_key=fed.kem_key("hosp-b"),
    )
    with pytest.raises(IntegrityError, match="not listed for 'hosp-a'"):
        open_manifest(fed, body)


def test_sender_not_in_directory_is_refused(fed: Federation) -> None:
    """A document from a site the directory does not list is refused."""
    transfer = seal_in_memory(fed, DATA)
    body = seal_document(
        Kind.MANIFEST,
        transfer.manifest.transfer_id,
        transfer.manifest.to_document(),
        sender=Sender("hosp-z", SiteKeys.generate()),
        recipient_site="hosp-b",
        recipient_key=fed.kem_key("hosp-b"),
    )
    with pytest.raises(IntegrityError, match="'hosp-z' is not in the directory"):
        open_manifest(fed, body)


def test_signature_without_the_context_label_is_refused(fed: Federation) -> None:
    """A signature over the bare document (no domain label) does not verify."""
    transfer = seal_in_memory(fed, DATA)
    document, signature = open_sealed(transfer.manifest_body, fed.keys["hosp-b"])
    key = fed.keys["hosp-a"].current_signing_key
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert key.public.verify(signature, SIGNED_CONTEXT + payload)
    bare = struct.pack(">I", len(payload)) + payload + key.sign(payload)
    body = _resealed(fed, transfer.manifest_body, signer="hosp-a", plaintext=bare)
    with pytest.raises(IntegrityError, match="does not verify"):
        open_manifest(fed, body)


def _with_hosp_a_signing(fed: Federation, validity: Validity) -> Federation:
    return fed.with_directory(directory_body(fed.keys, signing_validity={"hosp-a": validity}))


@pytest.mark.parametrize(
    "validity",
    [
        Validity(LONG_AGO, revoked=True),
        Validity(LONG_AGO, LONG_AGO + timedelta(days=365)),
        Validity(datetime(2999, 1, 1, tzinfo=UTC)),
    ],
    ids=["revoked", "expired", "not yet valid"],
)
def test_signing_key_not_valid_is_refused(fed: Federation, validity: Validity) -> None:
    """A manifest signed with a key the directory revoked, or outside its validity, is refused."""
    body = seal_in_memory(fed, DATA).manifest_body
    with pytest.raises(IntegrityError, match="signing key"):
        open_manifest(_with_hosp_a_signing(fed, validity), body)
    assert open_manifest(_with_hosp_a_signing(fed, Validity(LONG_AGO)), body)


# --- envelope fields the opener checks ----------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"v": 2}, "version differs"),
        ({"id": "00" * 16}, "id differs"),
        ({"kind": "control"}, "kind differs"),
        ({"recipient": {"site": "hosp-b", "kem_key_id": "0" * 32}}, "another KEM key"),
        ({"recipient": "hosp-b"}, "lacks sender or recipient"),
        ({"sender": None}, "lacks sender or recipient"),
        ({"sender": {"site": 7, "signing_key_id": "x"}}, "sender is malformed"),
        ({"created_at": "2030-01-01T00:00:00"}, "no time zone"),
        ({"created_at": "tomorrow"}, "created_at"),
    ],
)
def test_envelope_fields_disagreeing_with_the_header_are_refused(
    fed: Federation, edit: dict[str, Any], message: str
) -> None:
    """Validly signed documents whose envelope fields are wrong are refused."""
    body = _resealed(fed, seal_in_memory(fed, DATA).manifest_body, signer="hosp-a", edit=edit)
    with pytest.raises(IntegrityError, match=message):
        open_manifest(fed, body)


def test_missing_created_at_is_refused(fed: Federation) -> None:
    """A document without created_at cannot be checked against key validity: refused."""
    transfer = seal_in_memory(fed, DATA)
    document, _ = open_sealed(transfer.manifest_body, fed.keys["hosp-b"])
    del document["created_at"]
    body = reseal(
        document,
        message_id=transfer.manifest.transfer_id,
        signing_key=fed.keys["hosp-a"].current_signing_key,
        recipient_key=fed.kem_key("hosp-b"),
    )
    with pytest.raises(IntegrityError, match="created_at"):
        open_manifest(fed, body)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"\xff not json", "not JSON"), (b"[1, 2]", "not a JSON object")],
)
def test_document_that_is_not_a_json_object_is_refused(
    fed: Federation, payload: bytes, message: str
) -> None:
    """A signed payload that is not a JSON object is refused."""
    body = _resealed(fed, seal_in_memory(fed, DATA).manifest_body, signer="hosp-a", payload=payload)
    with pytest.raises(IntegrityError, match=message):
        open_manifest(fed, body)


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"\0\0\0\x05" + bytes(10), b"\0\0\0\x01" + bytes(64), b"\xff\xff\xff\xff" + bytes(80)],
    ids=["empty", "too short", "length too short", "length too long"],
)
def test_sealed_plaintext_that_does_not_add_up_is_refused(
    fed: Federation, plaintext: bytes
) -> None:
    """A sealed plaintext whose length prefix does not match is refused."""
    body = _resealed(
        fed, seal_in_memory(fed, DATA).manifest_body, signer="hosp-a", plaintext=plaintext
    )
    with pytest.raises(IntegrityError, match=r"too short|does not add up"):
        open_manifest(fed, body)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"fragment_count": 999}, "count does not match"),
        ({"total_length": 5}, "count does not match"),
        ({"fragment_size": 0}, "out of range"),
        ({"fragment_size": MAX_FRAGMENT_SIZE + 1}, "out of range"),
        ({"total_length": -1}, "out of range"),
        ({"sha256": "00" * 31}, "wrong length"),
        ({"content_key": "00" * 16}, "wrong length"),
        ({"sha256": "zz"}, "missing or malformed"),
        ({"fragment_size": None}, "missing or malformed"),
        ({"meta": [1]}, "meta is not an object"),
    ],
)
def test_inconsistent_manifest_is_refused(
    fed: Federation, edit: dict[str, Any], message: str
) -> None:
    """A manifest signed by the true sender but inconsistent in itself is refused."""
    body = _resealed(fed, seal_in_memory(fed, DATA).manifest_body, signer="hosp-a", edit=edit)
    with pytest.raises(IntegrityError, match=message):
        open_manifest(fed, body)


# --- fragments -----------------------------------------------------------------------------


def test_every_bit_of_a_fragment_is_protected(fed: Federation) -> None:
    """Any flipped bit of a fragment (header, index, count, ciphertext, tag) is refused."""
    transfer = seal_in_memory(fed, DATA, fragment_size=20)
    manifest = transfer.manifest
    aead = AESGCM(manifest.content_key)
    body = transfer.fragments[3]
    assert open_fragment(aead, manifest, body) == (3, DATA[60:80])
    accepted: list[tuple[int, int]] = []
    wrong_error: list[tuple[int, str]] = []
    for offset in range(len(body)):
        for bit in range(8):
            try:
                open_fragment(aead, manifest, flip(body, offset, 1 << bit))
            except EnvelopeError as exc:
                if offset == VERSION_AT and not isinstance(exc, UnsupportedVersionError):
                    wrong_error.append((offset, type(exc).__name__))
                in_authenticated_part = ID_AT <= offset < INDEX_AT or offset >= COUNT_AT + 4
                if in_authenticated_part and not isinstance(exc, IntegrityError):
                    wrong_error.append((offset, type(exc).__name__))
            else:
                accepted.append((offset, bit))
    assert accepted == []
    assert wrong_error == []


def test_fragment_relabelled_with_another_index_is_refused(fed: Federation) -> None:
    """Rewriting a fragment's clear index fails authentication (index is nonce and AAD)."""
    transfer = seal_in_memory(fed, DATA, fragment_size=20)
    aead = AESGCM(transfer.manifest.content_key)
    for index, target in [(0, 1), (1, 0), (5, 2), (2, 38)]:
        moved = rewrite_fragment(transfer.fragments[index], index=target)
        with pytest.raises(IntegrityError, match="fails authentication"):
            open_fragment(aead, transfer.manifest, moved)


def test_fragment_of_another_transfer_is_refused(fed: Federation) -> None:
    """A fragment of another transfer is refused, whether or not its transfer id is rewritten."""
    one = seal_in_memory(fed, DATA, fragment_size=20)
    other = seal_in_memory(fed, DATA[::-1], fragment_size=20)
    aead = AESGCM(one.manifest.content_key)
    stranger = other.fragments[4]
    with pytest.raises(IntegrityError, match="another transfer"):
        open_fragment(aead, one.manifest, stranger)
    rewritten = rewrite_fragment(stranger, transfer_id=one.manifest.transfer_id)
    with pytest.raises(IntegrityError, match="fails authentication"):
        open_fragment(aead, one.manifest, rewritten)


def test_fragment_with_rewritten_count_is_refused(fed: Federation) -> None:
    """A fragment whose clear count differs from the manifest's is refused."""
    transfer = seal_in_memory(fed, DATA, fragment_size=20)
    aead = AESGCM(transfer.manifest.content_key)
    count = transfer.manifest.fragment_count
    for new_count in (count - 1, count + 1, 2**32 - 1):
        body = rewrite_fragment(transfer.fragments[0], count=new_count)
        with pytest.raises(IntegrityError, match="count differs"):
            open_fragment(aead, transfer.manifest, body)
    with pytest.raises(EnvelopeError, match="not below its count"):
        parse_fragment(rewrite_fragment(transfer.fragments[5], count=5))


def test_truncated_or_extended_fragment_is_refused(fed: Federation) -> None:
    """A fragment cut at any length, or with a byte appended, is refused."""
    transfer = seal_in_memory(fed, DATA, fragment_size=20)
    aead = AESGCM(transfer.manifest.content_key)
    body = transfer.fragments[1]
    for length in range(len(body)):
        with pytest.raises(EnvelopeError):
            open_fragment(aead, transfer.manifest, body[:length])
    with pytest.raises(IntegrityError):
        open_fragment(aead, transfer.manifest, body + b"\0")


def test_fragment_under_another_key_is_refused(fed: Federation) -> None:
    """A fragment sealed under a key other than the manifest's content key does not open."""
    transfer = seal_in_memory(fed, DATA, fragment_size=20)
    wrong = AESGCM(AESGCM.generate_key(bit_length=256))
    with pytest.raises(IntegrityError):
        open_fragment(wrong, transfer.manifest, transfer.fragments[0])


@pytest.mark.parametrize(
    ("total", "size", "count"),
    [(0, 1, 0), (1, 1, 1), (1, 2**20, 1), (2**20, 2**20, 1), (2**20 + 1, 2**20, 2), (10, 3, 4)],
)
def test_fragment_count_and_lengths(total: int, size: int, count: int) -> None:
    """count = ceil(total/size), and the fragment lengths add up to the total."""
    assert fragment_count_for(total, size) == count
    manifest = Manifest(
        transfer_id=new_id(),
        sender_site="hosp-a",
        sender_key_id="",
        recipient_site="hosp-b",
        created_at=utc_now(),
        fragment_size=size,
        fragment_count=count,
        total_length=total,
        sha256=bytes(32),
        content_key=bytes(32),
        meta={},
    )
    lengths = [manifest.fragment_length(i) for i in range(count)]
    assert sum(lengths) == total
    assert all(1 <= length <= size for length in lengths)
