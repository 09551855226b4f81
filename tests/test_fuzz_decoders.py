"""Fuzzing what arrives from the broker: the envelope, fragment and control decoders and the
receiver, fed tens of thousands of generated inputs from a fixed seed.

Every input is refused with the project's own error (a ``BridgeError``), never with a
Python error leaking out of a decoder (``struct.error``, ``IndexError``, ``KeyError``,
``UnicodeDecodeError``, ``ValueError``, ``RecursionError``, ``MemoryError``); no mutated
message is ever accepted (authenticity); each input is decided in bounded time, and the
decoders' peak memory (``tracemalloc``) stays bounded whatever lengths an input announces.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicombridge import spool as spool_module
from dicombridge.control import (
    Cancel,
    Query,
    QueryResponse,
    Receipt,
    open_control,
    seal_control,
)
from dicombridge.envelope import (
    Manifest,
    open_document,
    open_fragment,
    parse_fragment,
    parse_header,
)
from dicombridge.errors import BridgeError, IntegrityError
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity, open_manifest_body
from dicombridge.transport import Delivery
from tests.cryptokit import (
    COUNT_AT,
    FRAGMENT_HEADER_BYTES,
    HEADER_BYTES,
    ID_AT,
    INDEX_AT,
    KIND_CONTROL,
    KIND_MANIFEST,
    SEALED_HEADER_BYTES,
    Federation,
    make_federation,
    messages,
    open_sealed,
    patch,
    reseal,
    write_random,
)

SEED: Final = 0x8F022
# Inputs per test (the issue asks for at least 10,000 against the decoders).
MUTATED_INPUTS: Final = 20_000
CRAFTED_PLAINTEXTS: Final = 1_500
SIGNED_DOCUMENTS: Final = 1_500
RECEIVER_INPUTS: Final = 3_000
# A decision per input well below this, even on a loaded two-core machine; a hang, or
# work that grows with an announced length, would pass it.
MAX_INPUT_S: Final = 0.5
# The largest input is below 2 MiB (an extension past MAX_DOCUMENT_BYTES): bounded means
# a small multiple of that, never anything that follows a length field (up to 4 GiB).
MAX_PEAK_TRACED_BYTES: Final = 24 * 1024 * 1024
RECEIVER = "hosp-b"
SENDER = "hosp-a"


@dataclass
class Corpus:
    """Valid messages from hosp-a to hosp-b: transfers (manifest, fragments, plaintext)
    and control messages; ``valid`` is every one of them, byte for byte."""

    fed: Federation
    manifests: dict[bytes, tuple[bytes, Manifest, bytes]] = field(default_factory=dict)
    fragments: list[bytes] = field(default_factory=list)
    controls: list[bytes] = field(default_factory=list)
    valid: set[bytes] = field(default_factory=set)

    @property
    def bodies(self) -> list[bytes]:
        return [m for m, _, _ in self.manifests.values()] + self.fragments + self.controls


def _query_document() -> dict[str, Any]:
    return Query(
        query_id="ab" * 16,
        operation="find",
        node="PACS",
        calling_ae_title="MODALITY",
        called_ae_title="SITE_B",
        timeout_s=30.0,
        model="study",
        identifier=b"\x08\x00\x52\x00\x06\x00STUDY ",
    ).to_document()


def _control_documents() -> list[dict[str, Any]]:
    """One control document of each type, created now (after the keys that sign them)."""
    return [
        Receipt(b"\x01" * 16, "stored", 0).to_document(),
        _query_document(),
        QueryResponse("ab" * 16, 0, 0xFF00, final=False, identifier=b"\x00").to_document(),
        Cancel("ab" * 16).to_document(),
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Transfers of 0, 1, 700 and 3000 bytes (0, 1, 1 and 3 fragments of 1024 bytes) and
    one control message of each type, all sealed by hosp-a for hosp-b."""
    root = tmp_path_factory.mktemp("fuzz-corpus")
    fed = make_federation()
    corpus = Corpus(fed)
    b_keys = fed.keys[RECEIVER]
    for seed, size in enumerate((0, 1, 700, 3000)):
        source = root / f"source-{seed}.bin"
        plaintext = write_random(source, size, seed=seed)
        transfer = fed.seal(source, root / "outbox", fragment_size=1024)
        manifest_body, *fragments = messages(transfer)
        manifest = open_manifest_body(
            manifest_body, SENDER, site_id=RECEIVER, keys=b_keys, directory=fed.directory
        )
        corpus.manifests[transfer.transfer_id] = (manifest_body, manifest, plaintext)
        corpus.fragments += fragments
    for document in _control_documents():
        _, body = seal_control(
            document, sender=fed.sender(SENDER), directory=fed.directory, recipient_site=RECEIVER
        )
        corpus.controls.append(body)
    corpus.valid = set(corpus.bodies)
    return corpus


# --- mutations ------------------------------------------------------------------------------


def _flip_bits(rng: random.Random, body: bytes) -> bytes:
    damaged = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def _truncate(rng: random.Random, body: bytes) -> bytes:
    return body[: rng.randrange(len(body))]


def _extend(rng: random.Random, body: bytes) -> bytes:
    return body + rng.randbytes(rng.choice((1, 16, rng.randint(1, 4096))))


def _extend_past_the_document_cap(rng: random.Random, body: bytes) -> bytes:
    return body + bytes(1024 * 1024 + rng.randint(-64, 64))


def _huge_length_field(rng: random.Random, body: bytes) -> bytes:
    """A u32 length-like field (fragment index or count) set huge, zero, or "negative"."""
    value = rng.choice((0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF))
    value = value if rng.random() < 0.8 else rng.getrandbits(32)
    return patch(body, rng.choice((INDEX_AT, COUNT_AT)), struct.pack(">I", value))


def _header_byte(rng: random.Random, body: bytes) -> bytes:
    """Version, kind or flags (offsets 4 to 7) set to another value."""
    return patch(body, rng.randint(4, 7), bytes([rng.randrange(256)]))


def _insert_or_delete(rng: random.Random, body: bytes) -> bytes:
    at = rng.randrange(len(body))
    if rng.random() < 0.5:
        return body[:at] + rng.randbytes(rng.randint(1, 64)) + body[at:]
    return body[:at] + body[at + rng.randint(1, 64) :]


def _random_bytes(rng: random.Random, body: bytes) -> bytes:
    noise = rng.randbytes(rng.choice((0, 3, 23, 24, 31, 32, 40, 48, rng.randint(0, 2000))))
    return (body[:8] + noise) if rng.random() < 0.5 else noise


MUTATIONS: Final[tuple[Callable[[random.Random, bytes], bytes], ...]] = (
    _flip_bits,
    _truncate,
    _extend,
    _huge_length_field,
    _header_byte,
    _insert_or_delete,
    _random_bytes,
)


def mutate(rng: random.Random, corpus: Corpus) -> tuple[str, bytes]:
    """One generated input from the valid corpus: its mutation's name and bytes."""
    bodies = corpus.bodies
    body = rng.choice(bodies)
    roll = rng.random()
    if roll < 0.08:  # headers swapped between messages
        other = rng.choice(bodies)
        cut = rng.choice((HEADER_BYTES, FRAGMENT_HEADER_BYTES, SEALED_HEADER_BYTES))
        return "swap-header", other[:cut] + body[cut:]
    if roll < 0.12:  # transfer id of another message
        return "swap-id", patch(body, ID_AT, rng.choice(bodies)[ID_AT : ID_AT + 16])
    if roll < 0.14:  # one message's head on another's tail
        other = rng.choice(bodies)
        return "splice", body[: rng.randrange(len(body))] + other[rng.randrange(len(other)) :]
    if roll < 0.145:
        return "oversized", _extend_past_the_document_cap(rng, body)
    mutation = rng.choice(MUTATIONS)
    damaged = mutation(rng, body)
    if rng.random() < 0.2:  # and a second one on top
        damaged = rng.choice(MUTATIONS)(rng, damaged or b"\x00")
    return mutation.__name__.lstrip("_"), damaged


# --- the decoders under test ----------------------------------------------------------------


@dataclass
class Findings:
    """What went wrong, by (decoder, mutation): leaked exceptions and accepted forgeries."""

    leaked: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    accepted: dict[tuple[str, str], int] = field(default_factory=dict)
    refused: int = 0
    passed: int = 0
    slowest_s: float = 0.0

    def check(
        self, name: str, mutation: str, call: Callable[[], object], *, authentic: bool
    ) -> None:
        """Run one decoder: a ``BridgeError`` is a refusal; any other exception is a leak;
        success for an authenticating decoder on a mutated input is an accepted forgery."""
        try:
            call()
        except BridgeError:
            self.refused += 1
            return
        except Exception as exc:
            self.leaked.setdefault((name, mutation), set()).add(type(exc).__name__)
            return
        self.passed += 1
        if authentic:
            key = (name, mutation)
            self.accepted[key] = self.accepted.get(key, 0) + 1


def decode_everywhere(corpus: Corpus, body: bytes, mutation: str, findings: Findings) -> None:
    """Give ``body`` to every decoder of what arrives from the broker."""
    fed, keys = corpus.fed, corpus.fed.keys[RECEIVER]
    findings.check("parse_header", mutation, lambda: parse_header(body), authentic=False)
    findings.check("parse_fragment", mutation, lambda: parse_fragment(body), authentic=False)
    findings.check(
        "open_document",
        mutation,
        lambda: open_document(body, site_id=RECEIVER, keys=keys, directory=fed.directory),
        authentic=True,
    )
    findings.check(
        "open_manifest_body",
        mutation,
        lambda: open_manifest_body(
            body, SENDER, site_id=RECEIVER, keys=keys, directory=fed.directory
        ),
        authentic=True,
    )
    findings.check(
        "open_control",
        mutation,
        lambda: open_control(
            body, from_site=SENDER, site_id=RECEIVER, keys=keys, directory=fed.directory
        ),
        authentic=True,
    )
    # The manifest of the transfer the input claims to belong to (else any one).
    known = corpus.manifests.get(body[ID_AT : ID_AT + 16])
    _, manifest, _ = known or next(iter(corpus.manifests.values()))
    aead = AESGCM(manifest.content_key)
    findings.check(
        "open_fragment", mutation, lambda: open_fragment(aead, manifest, body), authentic=True
    )


@dataclass
class Peak:
    """The peak of memory traced while a block ran (``tracemalloc``), in bytes."""

    bytes: int = 0


@contextlib.contextmanager
def traced_peak() -> Iterator[Peak]:
    """Trace allocations for the block; the peak is filled in when it ends."""
    peak = Peak()
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    try:
        yield peak
    finally:
        peak.bytes = tracemalloc.get_traced_memory()[1] - baseline
        tracemalloc.stop()


def _report(what: str, count: int, findings: Findings, elapsed_s: float, peak: Peak) -> None:
    print(
        f"\n{what}: {count} inputs in {elapsed_s:.1f}s, {findings.refused} refusals, "
        f"slowest input {findings.slowest_s * 1000:.1f} ms, "
        f"peak traced memory {peak.bytes / 2**20:.1f} MiB"
    )


def _assert_clean(findings: Findings, peak: Peak) -> None:
    assert findings.leaked == {}, f"decoders leaked non-BridgeError exceptions: {findings.leaked}"
    assert findings.accepted == {}, f"mutated messages were accepted: {findings.accepted}"
    assert findings.slowest_s < MAX_INPUT_S, findings.slowest_s
    assert peak.bytes < MAX_PEAK_TRACED_BYTES, peak.bytes


# --- 1. valid messages, mutated ---------------------------------------------------------------


def test_mutated_messages_are_refused_by_every_decoder(corpus: Corpus) -> None:
    """20,000 mutations of valid manifests, fragments and control messages (bit flips,
    truncation, extension, huge or "negative" length fields, swapped headers and ids,
    splices, random bytes) are each refused by every decoder with a BridgeError, none is
    accepted, each in bounded time and with bounded memory."""
    rng = random.Random(SEED)
    findings = Findings()
    mutated = 0
    began = time.monotonic()
    with traced_peak() as peak:
        while mutated < MUTATED_INPUTS:
            mutation, body = mutate(rng, corpus)
            if body in corpus.valid:
                continue  # a mutation that gave a valid message back is no mutation
            mutated += 1
            started = time.perf_counter()
            decode_everywhere(corpus, body, mutation, findings)
            findings.slowest_s = max(findings.slowest_s, time.perf_counter() - started)
    _report("mutated messages", mutated, findings, time.monotonic() - began, peak)
    # Six decoders per input; each input refused at least by the five that authenticate
    # or expect another kind.
    assert findings.refused >= mutated * 4
    _assert_clean(findings, peak)


def test_the_valid_corpus_is_accepted(corpus: Corpus) -> None:
    """The unmutated messages open (so a decoder refusing everything would fail above)."""
    fed, keys = corpus.fed, corpus.fed.keys[RECEIVER]
    for body, manifest, _ in corpus.manifests.values():
        opened = open_manifest_body(
            body, SENDER, site_id=RECEIVER, keys=keys, directory=fed.directory
        )
        assert opened == manifest
    for body in corpus.fragments:
        manifest = corpus.manifests[body[ID_AT : ID_AT + 16]][1]
        index, _ = open_fragment(AESGCM(manifest.content_key), manifest, body)
        assert index == parse_fragment(body).index
    for body in corpus.controls:
        message = open_control(
            body, from_site=SENDER, site_id=RECEIVER, keys=keys, directory=fed.directory
        )
        assert message.sender_site == SENDER


# --- 2. sealed to us by anyone: crafted plaintexts ------------------------------------------


def _deeply_nested(rng: random.Random) -> bytes:
    depth = rng.choice((50, 1_000, 100_000, 400_000))
    opener, closer = rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
    return opener * depth + b"1" + closer * depth


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value of any type, awkward values favoured."""
    roll = rng.randrange(12 if depth < 3 else 9)
    if roll == 0:
        return None
    if roll == 1:
        return rng.random() < 0.5
    if roll == 2:
        return rng.choice((0, -1, 1, 2**31, 2**32, 2**63, -(2**64), 10**40))
    if roll == 3:
        return rng.choice((0.5, -1.0, 1e308, float("inf"), float("-inf"), float("nan")))
    if roll == 4:
        return rng.choice(("", "x", "00" * 16, "ab" * 16, "zz" * 32, "\x00\n", "é" * 40))
    if roll == 5:
        return rng.randbytes(rng.randint(0, 40)).hex()
    if roll == 6:
        return "2026-12-08T06:00:00" + rng.choice(("", "+00:00", "Z", "+14:00", "-99:00"))
    if roll == 7:
        return rng.choice(("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "now"))
    if roll == 8:
        return rng.choice(("stored", "failed", "find", "move", "get", "echo", "study", "PACS"))
    if roll in (9, 10):
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(("a", "type", "seq", "site")): _json_value(rng, depth + 1)
        for _ in range(rng.randint(0, 3))
    }


def _crafted_payload(rng: random.Random, genuine: dict[str, Any]) -> bytes:
    """A payload an attacker without a site's signing key might seal to us."""
    roll = rng.randrange(6)
    if roll == 0:
        return rng.randbytes(rng.randint(0, 600))
    if roll == 1:
        return _deeply_nested(rng)
    if roll == 2:
        return b'{"v":1,"x":"' + rng.randbytes(rng.randint(1, 40)) + b'"}'  # invalid UTF-8
    if roll == 3:
        return b'{"n":' + b"9" * rng.choice((10, 5_000, 100_000)) + b"}"  # huge integer
    document = dict(genuine)  # the genuine fields, one altered: the signature no longer fits
    while document == genuine:
        document[rng.choice([*document, "extra"])] = _json_value(rng)
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _crafted_plaintext(rng: random.Random, payload: bytes, signature: bytes) -> bytes:
    length = len(payload)
    if rng.random() < 0.3:  # the length prefix lies: huge, "negative", zero, off by one
        length = rng.choice((0, 1, length - 1, length + 1, 0x7FFFFFFF, 0xFFFFFFFF))
    if rng.random() < 0.05:
        return rng.randbytes(rng.randint(0, 70))  # shorter than length and signature
    return struct.pack(">I", length % 2**32) + payload + signature


def test_plaintexts_sealed_to_us_without_a_signing_key_are_refused(corpus: Corpus) -> None:
    """1,500 plaintexts that anyone holding our public KEM key can seal (random bytes, JSON
    nested 400,000 deep, invalid UTF-8, 100,000-digit numbers, genuine documents with one
    field changed, lying length prefixes, random or stale signatures) are refused with a
    BridgeError by every decoder, in bounded time and memory."""
    rng = random.Random(SEED + 1)
    fed, keys = corpus.fed, corpus.fed.keys[RECEIVER]
    genuine = [
        (open_sealed(body, keys), kind)
        for body, kind in [(m, KIND_MANIFEST) for m, _, _ in corpus.manifests.values()]
        + [(c, KIND_CONTROL) for c in corpus.controls]
    ]
    recipient_key = fed.kem_key(RECEIVER)
    findings = Findings()
    began = time.monotonic()
    with traced_peak() as peak:
        for _ in range(CRAFTED_PLAINTEXTS):
            (document, signature), kind = rng.choice(genuine)
            payload = _crafted_payload(rng, document)
            if rng.random() < 0.5:
                signature = rng.randbytes(64)
            body = reseal(
                {},
                message_id=bytes.fromhex(str(document["id"])),
                signing_key=fed.keys[SENDER].current_signing_key,
                recipient_key=recipient_key,
                kind=kind,
                plaintext=_crafted_plaintext(rng, payload, signature),
            )
            started = time.perf_counter()
            decode_everywhere(corpus, body, "crafted", findings)
            findings.slowest_s = max(findings.slowest_s, time.perf_counter() - started)
    _report("crafted plaintexts", CRAFTED_PLAINTEXTS, findings, time.monotonic() - began, peak)
    _assert_clean(findings, peak)


def test_deeply_nested_json_sealed_to_us_is_refused_as_not_json(corpus: Corpus) -> None:
    """Regression (found by the fuzzer): JSON nested deeper than the parser's recursion
    limit, sealed to our public key, is refused with IntegrityError, not RecursionError."""
    fed = corpus.fed
    payload = b"[" * 200_000 + b"]" * 200_000
    body = reseal(
        {},
        message_id=bytes(16),
        signing_key=fed.keys[SENDER].current_signing_key,
        recipient_key=fed.kem_key(RECEIVER),
        payload=payload,
    )
    with pytest.raises(IntegrityError, match="not JSON"):
        open_document(body, site_id=RECEIVER, keys=fed.keys[RECEIVER], directory=fed.directory)


# --- 3. signed by a federation site: any field values -------------------------------------


CONTROL_TYPES: Final[dict[str, Callable[[dict[str, Any]], object]]] = {
    "receipt": Receipt.from_document,
    "query": Query.from_document,
    "query-response": QueryResponse.from_document,
    "cancel": Cancel.from_document,
}


def test_documents_signed_by_a_site_with_any_field_values_are_decoded_or_refused(
    corpus: Corpus,
) -> None:
    """1,500 manifests and control documents genuinely signed by hosp-a but with fields of
    any type and value (a buggy or hostile peer) are either decoded to well-typed values
    or refused with a BridgeError; never a leaked Python error."""
    rng = random.Random(SEED + 2)
    fed, keys = corpus.fed, corpus.fed.keys[RECEIVER]
    genuine = [
        (open_sealed(body, keys)[0], kind)
        for body, kind in [(m, KIND_MANIFEST) for m, _, _ in corpus.manifests.values()]
        + [(c, KIND_CONTROL) for c in corpus.controls]
    ]
    envelope_fields = {"v", "id", "kind", "sender", "recipient"}
    findings = Findings()
    decoded = 0
    began = time.monotonic()
    with traced_peak() as peak:
        for _ in range(SIGNED_DOCUMENTS):
            document, kind = rng.choice(genuine)
            document = dict(document)
            fields = [name for name in document if name not in envelope_fields]
            for _ in range(rng.randint(1, 3)):
                document[rng.choice([*fields, "type", "extra"])] = _json_value(rng)
            body = reseal(
                document,
                message_id=bytes.fromhex(str(document["id"])),
                signing_key=fed.keys[SENDER].current_signing_key,
                recipient_key=fed.kem_key(RECEIVER),
                kind=kind,
            )
            started = time.perf_counter()
            if kind == KIND_MANIFEST:

                def manifest(body: bytes = body) -> Manifest:
                    return open_manifest_body(
                        body, SENDER, site_id=RECEIVER, keys=keys, directory=fed.directory
                    )

                findings.check("manifest", "signed", manifest, authentic=False)
            else:
                try:
                    message = open_control(
                        body, from_site=SENDER, site_id=RECEIVER, keys=keys, directory=fed.directory
                    )
                except BridgeError:
                    findings.refused += 1
                else:
                    for name, decode in CONTROL_TYPES.items():
                        call = functools.partial(decode, message.document)
                        findings.check(name, "signed", call, authentic=False)
            decoded += 1
            findings.slowest_s = max(findings.slowest_s, time.perf_counter() - started)
    _report("signed documents", decoded, findings, time.monotonic() - began, peak)
    assert findings.refused > 0
    assert findings.passed > 0  # and some decoded: the generator is not all garbage
    _assert_clean(findings, peak)


# --- 4. the receiver: mutated and valid deliveries interleaved -------------------------------


async def test_receiver_hands_on_only_exact_transfers_whatever_arrives(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3,000 bulk deliveries, valid messages and mutations of them interleaved, through
    the Receiver (spool, gathering, quarantine): each is handled or refused with a
    BridgeError, and every transfer handed on holds exactly the bytes its sender sealed."""
    # A lone message of a one-fragment transfer waits this long for the other one.
    monkeypatch.setattr(spool_module, "GATHER_S", 0.01)
    delivered: list[IncomingTransfer] = []

    async def on_transfer(incoming: IncomingTransfer) -> None:
        delivered.append(incoming)

    fed = corpus.fed
    receiver = Receiver(
        tmp_path / "b", ReceiverIdentity(RECEIVER, fed.keys[RECEIVER], fed.directory), on_transfer
    )
    rng = random.Random(SEED + 3)
    findings = Findings()
    began = time.monotonic()
    with traced_peak() as peak:
        for _ in range(RECEIVER_INPUTS):
            if rng.random() < 0.15:
                body = rng.choice(corpus.bodies[: len(corpus.manifests) + len(corpus.fragments)])
                mutation = "valid"
            else:
                mutation, body = mutate(rng, corpus)
            started = time.perf_counter()
            try:
                await receiver.handle(Delivery(body, SENDER, "bulk", None, False))
            except BridgeError:
                findings.refused += 1
            except Exception as exc:
                findings.leaked.setdefault(("receiver", mutation), set()).add(type(exc).__name__)
            findings.slowest_s = max(findings.slowest_s, time.perf_counter() - started)
    _report("receiver deliveries", RECEIVER_INPUTS, findings, time.monotonic() - began, peak)
    for incoming in delivered:
        assert incoming.transfer_id in corpus.manifests, incoming.transfer_id.hex()
        assert incoming.path.read_bytes() == corpus.manifests[incoming.transfer_id][2]
    assert delivered, "no valid transfer got through"
    assert len({incoming.transfer_id for incoming in delivered}) == len(delivered)
    assert receiver.quarantined > 0
    _assert_clean(findings, peak)
