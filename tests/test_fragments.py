"""Transfers end to end on disk: seal into an outbox, spool in any order, assemble or refuse."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from dicombridge import envelope, spool
from dicombridge.envelope import Kind, Manifest, seal_document
from dicombridge.errors import (
    EnvelopeError,
    IncompleteTransferError,
    IntegrityError,
    NotForUsError,
    UnsupportedVersionError,
)
from dicombridge.fragments import (
    INFO_BYTES,
    PREAMBLE_BYTES,
    SEALED_MAGIC,
    STATE_BYTES,
    SealedTransfer,
    migrate_directory,
    seal_file,
)
from dicombridge.keys import Validity
from dicombridge.spool import Spool, fragment_file_name
from tests.cryptokit import (
    COUNT_AT,
    FLAGS_AT,
    FRAGMENT_HEADER_BYTES,
    ID_AT,
    INDEX_AT,
    KEY_ID_AT,
    KIND_AT,
    LONG_AGO,
    MAGIC_AT,
    SEALED_HEADER_BYTES,
    VERSION_AT,
    DicomIdentifiers,
    Federation,
    as_legacy_directory,
    deliver,
    directory_body,
    flip,
    identifiers_of,
    make_federation,
    messages,
    open_sealed,
    patch,
    pydicom_test_files,
    reseal,
    rewrite_fragment,
    write_dicom,
    write_random,
)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def fed() -> Federation:
    return make_federation()


class Site:
    """One test's directories: hosp-a's outbox, a receiver's spool and incoming folder."""

    def __init__(self, root: Path, fed: Federation, *, site_id: str = "hosp-b") -> None:
        self.fed = fed
        self.site_id = site_id
        self.outbox = root / "outbox"
        self.spool = Spool(root / "spool")
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True)
        self.out = self.incoming / "instance.dcm"

    def assemble(self, transfer_id: bytes, *, sender: str = "hosp-a") -> Manifest:
        return self.spool.assemble(
            sender,
            transfer_id,
            self.out,
            site_id=self.site_id,
            keys=self.fed.keys[self.site_id],
            directory=self.fed.directory,
        )

    def refused(
        self,
        transfer_id: bytes,
        expected: type[EnvelopeError] = EnvelopeError,
        *,
        sender: str = "hosp-a",
    ) -> EnvelopeError:
        """Assembly raises ``expected`` and leaves neither output nor temporary file."""
        with pytest.raises(expected) as info:
            self.assemble(transfer_id, sender=sender)
        assert not self.out.exists()
        assert list(self.incoming.iterdir()) == []
        return info.value


@pytest.fixture
def site(tmp_path: Path, fed: Federation) -> Site:
    return Site(tmp_path, fed)


def _source(tmp_path: Path, size: int, seed: int = 1) -> tuple[Path, bytes]:
    path = tmp_path / f"source-{size}-{seed}.bin"
    return path, write_random(path, size, seed=seed)


# --- round trips ---------------------------------------------------------------------------


SHIPPED = pydicom_test_files()


def test_pydicom_ships_test_files() -> None:
    """The round trip below has real DICOM files to work on (not an empty parameter set)."""
    assert len(SHIPPED) > 50
    assert any(p.stat().st_size > 100_000 for p in SHIPPED)


@pytest.mark.parametrize("source", SHIPPED, ids=[p.name for p in SHIPPED])
def test_pydicom_test_file_round_trip(site: Site, source: Path) -> None:
    """Each of pydicom's shipped files arrives byte for byte, fragments shuffled and repeated."""
    transfer = site.fed.seal(source, site.outbox, fragment_size=8192, meta={"name": source.name})
    bodies = messages(transfer)
    rng = random.Random(source.name)
    bodies += rng.sample(bodies, k=len(bodies) // 2)
    rng.shuffle(bodies)
    assert deliver(site.spool, "hosp-a", bodies) == []
    manifest = site.assemble(transfer.transfer_id)
    assert site.out.read_bytes() == source.read_bytes()
    assert manifest.meta == {"name": source.name}
    assert manifest.sha256 == hashlib.sha256(source.read_bytes()).digest()
    assert list(site.incoming.iterdir()) == [site.out]


@pytest.mark.parametrize("pixel_bytes", [0, 1000, MIB, 3 * MIB + 17])
def test_generated_dicom_round_trip(tmp_path: Path, site: Site, pixel_bytes: int) -> None:
    """Generated Part 10 files, up to a few MiB, arrive byte for byte with 1 MiB fragments."""
    source = tmp_path / "generated.dcm"
    write_dicom(source, pixel_bytes=pixel_bytes, seed=pixel_bytes)
    transfer = site.fed.seal(source, site.outbox, fragment_size=MIB)
    assert transfer.fragment_count == -(-source.stat().st_size // MIB)
    bodies = messages(transfer)
    bodies.reverse()
    deliver(site.spool, "hosp-a", bodies)
    state = site.spool.state("hosp-a", transfer.transfer_id)
    assert state.complete
    site.assemble(transfer.transfer_id)
    assert site.out.read_bytes() == source.read_bytes()


@st.composite
def transfer_plans(draw: st.DrawFn) -> tuple[int, int]:
    """(size, fragment_size): sizes 0..3 MiB, fragment sizes 1 B..2 MiB, at most ~40 fragments."""
    fragment_size = draw(
        st.one_of(
            st.sampled_from([1, 2, 3, 1000, MIB, 2 * MIB]),
            st.integers(1, 4096),
            st.integers(4096, 2 * MIB),
        )
    )
    limit = min(3 * MIB, fragment_size * 40)
    multiples = limit // fragment_size
    size = draw(
        st.one_of(
            st.sampled_from([0, 1, fragment_size, fragment_size + 1, max(0, fragment_size - 1)]),
            st.integers(0, limit),
            st.integers(limit // 2, limit),
            st.integers(0, multiples).map(lambda k: k * fragment_size),
        )
    )
    return size, fragment_size


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plan=transfer_plans(), rng=st.randoms(use_true_random=False))
@example(plan=(0, 1), rng=random.Random(0))
@example(plan=(1, 1), rng=random.Random(0))
@example(plan=(40, 1), rng=random.Random(1))
@example(plan=(1, 2 * MIB), rng=random.Random(0))
@example(plan=(2 * MIB, MIB), rng=random.Random(2))
@example(plan=(2 * MIB, 2 * MIB), rng=random.Random(0))
@example(plan=(3 * MIB, 2 * MIB), rng=random.Random(3))
@example(plan=(3 * MIB + 1, MIB), rng=random.Random(4))
def test_any_size_any_order_any_duplicates(
    tmp_path_factory: pytest.TempPathFactory,
    fed: Federation,
    plan: tuple[int, int],
    rng: random.Random,
) -> None:
    """For any size, fragment size and delivery order with repeats, bytes out equal bytes in."""
    size, fragment_size = plan
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as work:
        root = Path(work)
        site = Site(root, fed)
        source, content = _source(root, size, seed=size ^ fragment_size)
        transfer = fed.seal(source, site.outbox, fragment_size=fragment_size)
        assert transfer.fragment_count == -(-size // fragment_size)
        bodies = messages(transfer)
        order = list(range(len(bodies)))
        order += [rng.randrange(len(bodies)) for _ in range(rng.randrange(len(bodies) + 1))]
        rng.shuffle(order)
        assert deliver(site.spool, "hosp-a", [bodies[i] for i in order]) == []
        site.assemble(transfer.transfer_id)
        assert site.out.read_bytes() == content
        assert list(site.incoming.iterdir()) == [site.out]


def test_empty_file_round_trip(tmp_path: Path, site: Site) -> None:
    """A zero-byte instance is a manifest without fragments, and arrives empty."""
    source, _ = _source(tmp_path, 0)
    transfer = site.fed.seal(source, site.outbox)
    assert transfer.fragment_count == 0
    assert list(transfer.fragment_bodies()) == []
    deliver(site.spool, "hosp-a", [transfer.manifest_body()])
    state = site.spool.state("hosp-a", transfer.transfer_id)
    assert state.has_manifest
    assert state.fragment_count is None  # only the opened manifest can say "zero"
    site.spool.open_manifest(
        "hosp-a",
        transfer.transfer_id,
        site_id="hosp-b",
        keys=site.fed.keys["hosp-b"],
        directory=site.fed.directory,
    )
    assert site.spool.state("hosp-a", transfer.transfer_id).complete
    site.assemble(transfer.transfer_id)
    assert site.out.read_bytes() == b""


def test_spool_state_follows_arrivals(tmp_path: Path, site: Site) -> None:
    """The spool counts distinct fragments, ignores repeats, is complete with all plus manifest."""
    source, _ = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, fragment_size=3000)
    manifest, *fragments = messages(transfer)
    state = site.spool.put("hosp-a", fragments[2])
    assert (state.has_manifest, state.fragment_count, state.fragments_present) == (False, 4, 1)
    state = site.spool.put("hosp-a", fragments[2])
    assert state.fragments_present == 1
    for body in fragments:
        state = site.spool.put("hosp-a", body)
    assert state.fragments_present == 4
    assert not state.complete
    state = site.spool.put("hosp-a", manifest)
    assert state.complete
    assert state.transfer_id == transfer.transfer_id
    site.spool.discard("hosp-a", transfer.transfer_id)
    gone = site.spool.state("hosp-a", transfer.transfer_id)
    assert (gone.has_manifest, gone.fragments_present, gone.complete) == (False, 0, False)


def test_control_messages_do_not_go_to_the_spool(site: Site) -> None:
    """Only manifests and fragments are spooled."""
    body = seal_document(
        Kind.CONTROL,
        bytes(16),
        {"created_at": "2030-01-01T00:00:00+00:00"},
        sender=site.fed.sender("hosp-a"),
        recipient_site="hosp-b",
        recipient_key=site.fed.kem_key("hosp-b"),
    )
    with pytest.raises(EnvelopeError, match="do not go to the spool"):
        site.spool.put("hosp-a", body)


# --- the sealed transfer on disk ------------------------------------------------------------


def test_sealed_transfer_layout(tmp_path: Path, site: Site) -> None:
    """The outbox holds one file <id>.sealed: magic and info, the state block, the fragment
    records (record i at PREAMBLE_BYTES + i*(32+size+16)), then the manifest."""
    source, _ = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, fragment_size=3000, meta={"x": 1})
    assert [p.name for p in site.outbox.iterdir()] == [f"{transfer.transfer_id_hex}.sealed"]
    assert transfer.path.is_file()
    blob = transfer.path.read_bytes()
    assert blob.startswith(SEALED_MAGIC)
    assert len(blob) == transfer.file_bytes
    record = FRAGMENT_HEADER_BYTES + 3000 + 16
    assert transfer.record_bytes == record
    fragments = blob[PREAMBLE_BYTES : PREAMBLE_BYTES + transfer.fragments_bytes]
    assert len(fragments) == 3 * record + FRAGMENT_HEADER_BYTES + 1000 + 16
    bodies = list(transfer.fragment_bodies())
    assert [i for i, _ in bodies] == [0, 1, 2, 3]
    for index, body in bodies:
        assert fragments[index * record : index * record + len(body)] == body
        assert transfer.fragment_body(index) == body
    for bad in (-1, 4):
        with pytest.raises(IndexError):
            transfer.fragment_body(bad)
    assert blob[PREAMBLE_BYTES + transfer.fragments_bytes :] == transfer.manifest_body()
    assert transfer.sealed_bytes == len(fragments) + len(transfer.manifest_body())
    info = SealedTransfer.info(transfer.path)
    assert info == json.loads(blob[len(SEALED_MAGIC) : INFO_BYTES])
    assert set(info) == {
        "transfer_id",
        "recipient_site",
        "recipient_kem_key_id",
        "created_at",
        "fragment_size",
        "fragment_count",
        "total_length",
        "manifest_length",
    }
    assert json.loads(transfer.read_state()) == {}
    assert SealedTransfer.load(transfer.path) == transfer


def test_state_block_is_rewritten_in_place(tmp_path: Path, site: Site) -> None:
    """write_state replaces the state block and touches nothing else; too large is refused."""
    source, _ = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, fragment_size=3000, state=b'{"a":1}')
    assert json.loads(transfer.read_state()) == {"a": 1}
    before = transfer.path.read_bytes()
    transfer.write_state(b'{"published":true}')
    after = transfer.path.read_bytes()
    assert json.loads(transfer.read_state()) == {"published": True}
    assert after[:INFO_BYTES] == before[:INFO_BYTES]
    assert after[PREAMBLE_BYTES:] == before[PREAMBLE_BYTES:]
    with pytest.raises(ValueError, match="does not fit"):
        transfer.write_state(b"x" * (STATE_BYTES + 1))
    assert json.loads(transfer.read_state()) == {"published": True}


def test_a_file_that_is_not_a_sealed_transfer_is_refused(tmp_path: Path) -> None:
    """load and info refuse a file without the magic, or with unreadable info, by name."""
    stray = tmp_path / "0123.sealed"
    stray.write_bytes(b"hello" * 100)
    for read in (SealedTransfer.load, SealedTransfer.info):
        with pytest.raises(EnvelopeError, match="not a sealed transfer"):
            read(stray)
    stray.write_bytes(SEALED_MAGIC + b'{"transfer_id": "zz"}'.ljust(INFO_BYTES))
    with pytest.raises(EnvelopeError, match="unreadable transfer info"):
        SealedTransfer.load(stray)


def test_truncated_outbox_file_is_reported(tmp_path: Path, site: Site) -> None:
    """A sealed file cut short on disk raises instead of publishing a short fragment."""
    source, _ = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, fragment_size=3000)
    blob = transfer.path.read_bytes()
    transfer.path.write_bytes(blob[: PREAMBLE_BYTES + transfer.fragments_bytes - 1])
    with pytest.raises(EnvelopeError, match="truncated"):
        transfer.fragment_body(3)
    with pytest.raises(EnvelopeError, match="truncated"):
        list(transfer.fragment_bodies())
    with pytest.raises(EnvelopeError, match="truncated"):
        transfer.manifest_body()


def test_legacy_directory_is_migrated_byte_for_byte(tmp_path: Path, site: Site) -> None:
    """A transfer in the older directory layout becomes <id>.sealed with the same
    ciphertext, the given state, and opens at the receiver; the directory is gone."""
    source, content = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, fragment_size=3000, meta={"x": 1})
    original = transfer.path.read_bytes()
    legacy = as_legacy_directory(transfer)

    migrated = migrate_directory(legacy, state=b'{"attempts":2}')
    assert not legacy.exists()
    assert migrated == transfer
    assert migrated.path.read_bytes()[PREAMBLE_BYTES:] == original[PREAMBLE_BYTES:]
    assert json.loads(migrated.read_state()) == {"attempts": 2}
    deliver(site.spool, "hosp-a", messages(migrated))
    site.assemble(migrated.transfer_id)
    assert site.out.read_bytes() == content


@pytest.mark.parametrize("fragment_size", [0, -1, 16 * MIB + 1])
def test_fragment_size_out_of_range_is_refused(
    tmp_path: Path, site: Site, fragment_size: int
) -> None:
    """seal_file refuses fragment sizes outside 1 B..16 MiB and leaves the outbox untouched."""
    source, _ = _source(tmp_path, 100)
    with pytest.raises(ValueError, match="fragment_size"):
        site.fed.seal(source, site.outbox, fragment_size=fragment_size)
    assert not site.outbox.exists() or list(site.outbox.iterdir()) == []


def test_sealing_twice_shares_no_ciphertext(tmp_path: Path, site: Site) -> None:
    """Each seal uses a fresh content key: the same file sealed twice shares no fragment bytes."""
    source, content = _source(tmp_path, 5000)
    one = site.fed.seal(source, site.outbox, fragment_size=1000)
    two = site.fed.seal(source, site.outbox, fragment_size=1000)
    assert one.transfer_id != two.transfer_id
    for (_, a), (_, b) in zip(one.fragment_bodies(), two.fragment_bodies(), strict=True):
        assert a[FRAGMENT_HEADER_BYTES:] != b[FRAGMENT_HEADER_BYTES:]
    docs = [open_sealed(t.manifest_body(), site.fed.keys["hosp-b"])[0] for t in (one, two)]
    assert docs[0]["content_key"] != docs[1]["content_key"]
    assert docs[0]["sha256"] == docs[1]["sha256"] == hashlib.sha256(content).hexdigest()


def test_existing_transfer_id_is_not_overwritten(tmp_path: Path, site: Site) -> None:
    """Sealing again under an existing transfer id fails and keeps the first transfer intact."""
    source, _ = _source(tmp_path, 5000)
    first = site.fed.seal(source, site.outbox, fragment_size=1000)
    before = first.path.read_bytes()
    with pytest.raises(FileExistsError):
        seal_file(
            source,
            site.outbox,
            sender=site.fed.sender("hosp-a"),
            recipient=site.fed.recipient("hosp-b"),
            fragment_size=1000,
            transfer_id=first.transfer_id,
        )
    assert first.path.read_bytes() == before
    assert sorted(p.name for p in site.outbox.iterdir()) == [first.path.name]


# --- refusals: nothing is written -------------------------------------------------------------


def _sealed(tmp_path: Path, site: Site, size: int = 10_000, seed: int = 1) -> SealedTransfer:
    source, _ = _source(tmp_path, size, seed=seed)
    return site.fed.seal(source, site.outbox, fragment_size=3000)


FRAGMENT_SPOTS = {
    "magic": (MAGIC_AT + 1, 0x01),
    "version": (VERSION_AT, 0x02),
    "kind": (KIND_AT, 0x01),
    "flags": (FLAGS_AT + 1, 0x01),
    "transfer id": (ID_AT + 7, 0x10),
    "index": (INDEX_AT + 3, 0x01),
    "index high": (INDEX_AT, 0x80),
    "count": (COUNT_AT + 3, 0x01),
    "count high": (COUNT_AT, 0x80),
    "ciphertext": (FRAGMENT_HEADER_BYTES + 100, 0x04),
    "tag": (-1, 0x80),
}


@pytest.mark.parametrize("spot", list(FRAGMENT_SPOTS))
@pytest.mark.parametrize("which", [0, 1, 3], ids=["first", "middle", "last"])
def test_flipped_bit_in_a_fragment_is_refused(
    tmp_path: Path, site: Site, spot: str, which: int
) -> None:
    """A fragment with one bit flipped anywhere, delivered instead of the real one, is refused."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    offset, mask = FRAGMENT_SPOTS[spot]
    target = 1 + which
    bodies[target] = flip(bodies[target], offset % len(bodies[target]), mask)
    deliver(site.spool, "hosp-a", bodies)
    site.refused(transfer.transfer_id)


@pytest.mark.parametrize("spot", ["ciphertext", "tag", "index", "count"])
def test_tampered_fragment_arriving_first_is_refused(tmp_path: Path, site: Site, spot: str) -> None:
    """A forged copy delivered before the genuine fragment spoils the transfer (never its bytes)."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    offset, mask = FRAGMENT_SPOTS[spot]
    forged = flip(bodies[1], offset % len(bodies[1]), mask)
    deliver(site.spool, "hosp-a", [forged, *bodies])
    site.refused(transfer.transfer_id)


@pytest.mark.parametrize("spot", ["ciphertext", "tag", "transfer id"])
def test_tampered_fragment_arriving_late_is_harmless(tmp_path: Path, site: Site, spot: str) -> None:
    """A forged copy delivered after the genuine fragment was spooled is dropped as a repeat."""
    source, content = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, fragment_size=3000)
    bodies = messages(transfer)
    offset, mask = FRAGMENT_SPOTS[spot]
    forged = flip(bodies[2], offset % len(bodies[2]), mask)
    deliver(site.spool, "hosp-a", [*bodies, forged])
    site.assemble(transfer.transfer_id)
    assert site.out.read_bytes() == content


MANIFEST_SPOTS = {
    "magic": (MAGIC_AT, 0x40),
    "version": (VERSION_AT, 0x01),
    "kind": (KIND_AT, 0x02),
    "flags": (FLAGS_AT, 0x01),
    "transfer id": (ID_AT + 15, 0x01),
    "key id": (KEY_ID_AT + 3, 0x08),
    "hpke enc": (SEALED_HEADER_BYTES + 500, 0x01),
    "ciphertext": (SEALED_HEADER_BYTES + 1200, 0x20),
    "tag": (-1, 0x01),
}


@pytest.mark.parametrize("spot", list(MANIFEST_SPOTS))
def test_flipped_bit_in_the_manifest_is_refused(tmp_path: Path, site: Site, spot: str) -> None:
    """A manifest with one bit flipped, delivered instead of the real one, is refused."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    offset, mask = MANIFEST_SPOTS[spot]
    bodies[0] = flip(bodies[0], offset % len(bodies[0]), mask)
    deliver(site.spool, "hosp-a", bodies)
    site.refused(transfer.transfer_id)


def test_fragment_relabelled_with_another_index_is_refused(tmp_path: Path, site: Site) -> None:
    """Fragment 0 relabelled as fragment 1 (clear index rewritten) in place of the real 1."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    bodies[2] = rewrite_fragment(bodies[1], index=1)
    deliver(site.spool, "hosp-a", bodies)
    error = site.refused(transfer.transfer_id, IntegrityError)
    assert "fragment 1 fails authentication" in str(error)


def test_fragment_from_another_transfer_rewritten_is_refused(tmp_path: Path, site: Site) -> None:
    """A same-sender fragment of another transfer, transfer id rewritten, fails authentication."""
    transfer = _sealed(tmp_path, site, seed=1)
    other = _sealed(tmp_path, site, seed=2)
    bodies = messages(transfer)
    bodies[2] = rewrite_fragment(other.fragment_body(1), transfer_id=transfer.transfer_id)
    deliver(site.spool, "hosp-a", bodies)
    site.refused(transfer.transfer_id, IntegrityError)


def test_fragment_from_another_transfer_unrewritten_is_refused(tmp_path: Path, site: Site) -> None:
    """A same-sender fragment of another transfer, swapped in as is, lands elsewhere: incomplete."""
    transfer = _sealed(tmp_path, site, seed=1)
    other = _sealed(tmp_path, site, seed=2)
    bodies = messages(transfer)
    bodies[2] = other.fragment_body(1)
    deliver(site.spool, "hosp-a", bodies)
    site.refused(transfer.transfer_id, IncompleteTransferError)


def test_sealed_for_another_site_is_not_for_us(tmp_path: Path, fed: Federation) -> None:
    """hosp-c receiving a transfer sealed for hosp-b refuses it with NotForUsError."""
    site_c = Site(tmp_path, fed, site_id="hosp-c")
    source, _ = _source(tmp_path, 10_000)
    transfer = fed.seal(source, site_c.outbox, recipient="hosp-b", fragment_size=3000)
    deliver(site_c.spool, "hosp-a", messages(transfer))
    site_c.refused(transfer.transfer_id, NotForUsError)


def test_manifest_of_another_sender_under_a_claimed_sender_is_refused(
    tmp_path: Path, site: Site
) -> None:
    """A transfer signed by hosp-c but arriving as from hosp-a (broker's user_id) is refused."""
    source, content = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, sender="hosp-c", fragment_size=3000)
    deliver(site.spool, "hosp-a", messages(transfer))
    error = site.refused(transfer.transfer_id, IntegrityError, sender="hosp-a")
    assert "signed by 'hosp-c' arrived from 'hosp-a'" in str(error)
    # Control: under its true sender, the same messages assemble.
    deliver(site.spool, "hosp-c", messages(transfer))
    site.assemble(transfer.transfer_id, sender="hosp-c")
    assert site.out.read_bytes() == content


@pytest.mark.parametrize("claimed_key", ["hosp-a's", "hosp-c's"])
def test_manifest_forging_the_sender_field_is_refused(
    tmp_path: Path, site: Site, claimed_key: str
) -> None:
    """hosp-c re-signs its manifest claiming sender hosp-a: refused, content otherwise valid."""
    fed = site.fed
    source, content = _source(tmp_path, 10_000)
    transfer = fed.seal(source, site.outbox, sender="hosp-c", fragment_size=3000)
    document, _ = open_sealed(transfer.manifest_body(), fed.keys["hosp-b"])
    key_owner = "hosp-a" if claimed_key == "hosp-a's" else "hosp-c"
    document["sender"] = {
        "site": "hosp-a",
        "signing_key_id": fed.keys[key_owner].current_signing_key.key_id,
    }

    def forged(signer: str) -> bytes:
        return reseal(
            document,
            message_id=transfer.transfer_id,
            signing_key=fed.keys[signer].current_signing_key,
            recipient_key=fed.kem_key("hosp-b"),
        )

    bodies = [forged("hosp-c"), *(body for _, body in transfer.fragment_bodies())]
    deliver(site.spool, "hosp-a", bodies)
    site.refused(transfer.transfer_id, IntegrityError)
    # Control: had hosp-a really signed it, the same fragments would assemble.
    if claimed_key == "hosp-a's":
        site.spool.discard("hosp-a", transfer.transfer_id)
        deliver(site.spool, "hosp-a", [forged("hosp-a"), *bodies[1:]])
        site.assemble(transfer.transfer_id)
        assert site.out.read_bytes() == content


@pytest.mark.parametrize("missing", [1, 2, 4], ids=["first", "middle", "last"])
def test_missing_fragment_is_incomplete(tmp_path: Path, site: Site, missing: int) -> None:
    """A transfer assembled with a fragment missing raises IncompleteTransferError."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    del bodies[missing]
    deliver(site.spool, "hosp-a", bodies)
    assert not site.spool.state("hosp-a", transfer.transfer_id).complete
    error = site.refused(transfer.transfer_id, IncompleteTransferError)
    assert f"lacks fragment {missing - 1} of 4" in str(error)


def test_missing_manifest_is_incomplete(tmp_path: Path, site: Site) -> None:
    """A transfer assembled before its manifest arrived raises IncompleteTransferError."""
    transfer = _sealed(tmp_path, site)
    deliver(site.spool, "hosp-a", messages(transfer)[1:])
    site.refused(transfer.transfer_id, IncompleteTransferError)
    with pytest.raises(IncompleteTransferError):
        site.spool.open_manifest(
            "hosp-a",
            transfer.transfer_id,
            site_id="hosp-b",
            keys=site.fed.keys["hosp-b"],
            directory=site.fed.directory,
        )


@pytest.mark.parametrize("target", [0, 1], ids=["manifest", "fragment"])
def test_unknown_version_is_refused_when_spooled(tmp_path: Path, site: Site, target: int) -> None:
    """A message with a patched version byte is refused by the spool, and the transfer with it."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    bodies[target] = patch(bodies[target], VERSION_AT, b"\x02")
    refusals = deliver(site.spool, "hosp-a", bodies)
    assert [type(e) for e in refusals] == [UnsupportedVersionError]
    site.refused(transfer.transfer_id, IncompleteTransferError)


def test_bad_magic_is_refused_when_spooled(tmp_path: Path, site: Site) -> None:
    """A message that does not start with DCBR is refused by the spool."""
    transfer = _sealed(tmp_path, site)
    with pytest.raises(EnvelopeError, match="bad magic"):
        site.spool.put("hosp-a", b"XXXX" + transfer.fragment_body(0)[4:])


@pytest.mark.parametrize("cut", [10, 30, 47, 48, 100, -1])
def test_truncated_fragment_is_refused(tmp_path: Path, site: Site, cut: int) -> None:
    """A fragment cut short is refused by the spool or, once spooled, at assembly."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    bodies[2] = bodies[2][:cut]
    deliver(site.spool, "hosp-a", bodies)
    site.refused(transfer.transfer_id)


@pytest.mark.parametrize("cut", [10, 39, 40, 1200, -1])
def test_truncated_manifest_is_refused(tmp_path: Path, site: Site, cut: int) -> None:
    """A manifest cut short is refused at assembly."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    bodies[0] = bodies[0][:cut]
    deliver(site.spool, "hosp-a", bodies)
    site.refused(transfer.transfer_id)


def test_revoked_signing_key_is_refused(tmp_path: Path, site: Site) -> None:
    """A transfer signed with a key the directory now revokes is refused."""
    transfer = _sealed(tmp_path, site)
    deliver(site.spool, "hosp-a", messages(transfer))
    revoking = directory_body(
        site.fed.keys, signing_validity={"hosp-a": Validity(LONG_AGO, revoked=True)}
    )
    site.fed = site.fed.with_directory(revoking)
    site.refused(transfer.transfer_id, IntegrityError)


def test_fragments_disagreeing_on_count_are_refused(tmp_path: Path, site: Site) -> None:
    """A fragment whose clear count differs from the ones spooled before is refused at once."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    site.spool.put("hosp-a", bodies[1])
    with pytest.raises(IntegrityError, match="disagree on their count"):
        site.spool.put("hosp-a", rewrite_fragment(bodies[2], count=5))


def test_fragment_count_disagreeing_with_the_manifest_is_refused(
    tmp_path: Path, site: Site
) -> None:
    """If the first fragment to arrive lies about the count, the manifest refuses the transfer."""
    transfer = _sealed(tmp_path, site)
    bodies = messages(transfer)
    liar = rewrite_fragment(bodies[1], count=9)
    refusals = deliver(site.spool, "hosp-a", [liar, *bodies])
    assert refusals
    assert all(isinstance(e, IntegrityError) for e in refusals)
    error = site.refused(transfer.transfer_id, IntegrityError)
    assert "count" in str(error)


def _signed_by_true_sender(site: Site, transfer: SealedTransfer, **edit: Any) -> bytes:
    document, _ = open_sealed(transfer.manifest_body(), site.fed.keys["hosp-b"])
    document.update(edit)
    return reseal(
        document,
        message_id=transfer.transfer_id,
        signing_key=site.fed.keys["hosp-a"].current_signing_key,
        recipient_key=site.fed.kem_key("hosp-b"),
    )


def test_plaintext_not_matching_the_signed_hash_is_refused(tmp_path: Path, site: Site) -> None:
    """Fragments that authenticate but whose whole differs from the signed SHA-256 are refused."""
    transfer = _sealed(tmp_path, site)
    wrong_hash = hashlib.sha256(b"something else").hexdigest()
    manifest = _signed_by_true_sender(site, transfer, sha256=wrong_hash)
    deliver(site.spool, "hosp-a", [manifest, *messages(transfer)[1:]])
    error = site.refused(transfer.transfer_id, IntegrityError)
    assert "do not match the signed hash" in str(error)


def test_plaintext_not_matching_the_signed_length_is_refused(tmp_path: Path, site: Site) -> None:
    """A signed total length one byte short (same fragment count) is refused."""
    transfer = _sealed(tmp_path, site)
    manifest = _signed_by_true_sender(site, transfer, total_length=transfer.total_length - 1)
    deliver(site.spool, "hosp-a", [manifest, *messages(transfer)[1:]])
    site.refused(transfer.transfer_id, IntegrityError)


def test_spool_file_holding_another_fragment_is_refused(tmp_path: Path, site: Site) -> None:
    """A spool file renamed to another index (disk mix-up) is refused, not assembled."""
    transfer = _sealed(tmp_path, site)
    deliver(site.spool, "hosp-a", messages(transfer))
    folder = site.spool.transfer_dir("hosp-a", transfer.transfer_id)
    count = transfer.fragment_count
    (folder / fragment_file_name(0, count)).write_bytes(
        (folder / fragment_file_name(1, count)).read_bytes()
    )
    error = site.refused(transfer.transfer_id, IntegrityError)
    assert "holds fragment 1" in str(error)


def test_output_appears_only_after_verification(
    tmp_path: Path, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While fragments are decrypted the output does not exist: plaintext goes to a temp file."""
    seen: list[bool] = []
    real_open_fragment = envelope.open_fragment

    def spy(aead: AESGCM, manifest: Manifest, body: bytes) -> tuple[int, bytes]:
        seen.append(site.out.exists())
        return real_open_fragment(aead, manifest, body)

    monkeypatch.setattr(spool, "open_fragment", spy)
    source, content = _source(tmp_path, 10_000)
    transfer = site.fed.seal(source, site.outbox, fragment_size=3000)
    deliver(site.spool, "hosp-a", messages(transfer))
    site.assemble(transfer.transfer_id)
    assert seen == [False] * 4
    assert site.out.read_bytes() == content


# --- any damage: refused or exact --------------------------------------------------------------

Damage = Callable[[bytes], bytes]


@st.composite
def damages(draw: st.DrawFn, other_id: bytes, stranger: bytes) -> Damage:
    kind = draw(st.sampled_from(["flip", "truncate", "index", "count", "id", "swap", "extend"]))
    if kind == "flip":
        position, bit = draw(st.integers(0, 10**6)), draw(st.integers(0, 7))
        return lambda body: flip(body, position % len(body), 1 << bit)
    if kind == "truncate":
        keep = draw(st.integers(0, 10**6))
        return lambda body: body[: keep % len(body)]
    if kind == "index":
        index = draw(st.integers(0, 6))
        return lambda body: rewrite_fragment(body, index=index)
    if kind == "count":
        count = draw(st.integers(0, 6))
        return lambda body: rewrite_fragment(body, count=count)
    if kind == "id":
        return lambda body: patch(body, ID_AT, other_id)
    if kind == "swap":
        return lambda body: stranger
    tail = draw(st.binary(min_size=1, max_size=8))
    return lambda body: body + tail


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_damaged_deliveries_are_refused_or_exact(
    tmp_path_factory: pytest.TempPathFactory, fed: Federation, data: Any
) -> None:
    """Whatever is damaged, dropped, repeated or reordered: exact bytes out, or an EnvelopeError."""
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as work:
        root = Path(work)
        site = Site(root, fed)
        size = data.draw(st.integers(0, 5000), label="size")
        source, content = _source(root, size, seed=size)
        transfer = fed.seal(source, site.outbox, fragment_size=1000)
        other = fed.seal(source, site.outbox, fragment_size=1000)
        genuine = messages(transfer)
        n = len(genuine)
        stranger = data.draw(st.sampled_from(messages(other)), label="stranger")
        delivered: list[bytes] = []
        for index in data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3 * n)):
            body = genuine[index]
            if data.draw(st.booleans(), label="damage"):
                body = data.draw(damages(other.transfer_id, stranger), label="how")(body)
            delivered.append(body)
        deliver(site.spool, "hosp-a", delivered)
        try:
            site.assemble(transfer.transfer_id)
        except EnvelopeError:
            assert list(site.incoming.iterdir()) == []
        else:
            assert site.out.read_bytes() == content
            assert list(site.incoming.iterdir()) == [site.out]


# --- nothing readable leaves the sender ---------------------------------------------------------


def _leak_sources(tmp_path: Path) -> list[tuple[Path, DicomIdentifiers]]:
    sources = []
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        found = get_testdata_file(name, download=False)
        assert isinstance(found, str), f"{name} is not shipped with pydicom"
        sources.append((Path(found), identifiers_of(Path(found))))
    generated = tmp_path / "generated.dcm"
    sources.append((generated, write_dicom(generated, pixel_bytes=300_000, seed=7)))
    return sources


def _forbidden(source: Path, ids: DicomIdentifiers) -> dict[str, bytes]:
    digest = hashlib.sha256(source.read_bytes())
    forbidden = {name: value for name, value in ids.as_bytes().items() if len(value) >= 4}
    forbidden["sha256 hex"] = digest.hexdigest().encode()
    forbidden["sha256 HEX"] = digest.hexdigest().upper().encode()
    forbidden["sha256 raw"] = digest.digest()
    forbidden["sha256 half"] = digest.hexdigest()[:32].encode()
    return forbidden


def test_no_identifier_or_hash_in_clear(tmp_path: Path, site: Site) -> None:
    """No PatientName, PatientID, SOP/Study Instance UID or SHA-256 in the outbox or the spool."""
    sources = _leak_sources(tmp_path)
    for source, ids in sources:
        assert ids.sop_instance_uid.encode() in source.read_bytes()  # the check can see them
        meta = {"sop_instance_uid": ids.sop_instance_uid, "study": ids.study_instance_uid}
        transfer = site.fed.seal(source, site.outbox, fragment_size=16384, meta=meta)
        deliver(site.spool, "hosp-a", messages(transfer))
        spooled = site.spool.transfer_dir("hosp-a", transfer.transfer_id)
        files = [transfer.path, *spooled.iterdir()]
        assert transfer.path.is_file()
        found = [
            (what, str(path.relative_to(tmp_path)))
            for path in files
            for what, needle in _forbidden(source, ids).items()
            if needle in path.read_bytes() or needle in str(path).encode()
        ]
        assert found == [], f"{source.name} leaks"
        # ...while the receiver still gets everything back.
        manifest = site.assemble(transfer.transfer_id)
        assert site.out.read_bytes() == source.read_bytes()
        assert manifest.meta == meta
        site.out.unlink()
