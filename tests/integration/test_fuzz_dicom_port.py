"""Fuzzing the gateway's DICOM port over raw sockets (issue 8): over 10,000 generated
inputs (malformed PDUs, unknown types, lying and oversized length fields, truncated
A-ASSOCIATE-RQs, garbage variable items, P-DATA before association, aborts mid-message,
connections opened and closed at once, slow partial writes) at a gateway process; then
the process is alive, its peak RSS bounded, its threads and file descriptors back to what
they were, and a DCMTK storescu of a small study through the route arrives whole in
Orthanc B."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from dicombridge.acceptance import MAXIMUM_CONTROL_PDU_SIZE, AcceptancePolicy
from dicombridge.management import ManagementClient
from dicombridge.orthanc import OrthancServer
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import wait_gateway
from dicombridge.scp import ReceivedInstance, ScpSettings, StorageSCP, StoreOutcome
from tests import dicomkit
from tests.brokerkit import wait_until
from tests.pacskit import DCMTK_BIN, dcmtk_env, sop_instance_uid, wait_for
from tests.relaykit import (
    GATEWAY_B_AE_TITLE,
    GatewayProcess,
    TwoSites,
    ct_series,
    delete_users,
    route_to_pacs,
)

pytestmark = pytest.mark.integration

SEED: Final = 0x8F0D1C
INPUTS: Final = 10_500
SLOW_CONNECTIONS: Final = 12
CLIENT_THREADS: Final = 6
ROUTE: Final = "SITE_B"
OWN_AE: Final = "GATEWAY_A"
# Gateway A waits this long for a peer's next bytes (socket timeout) and for an
# association request: a connection that goes quiet is dropped within it.
PEER_TIMEOUT_S: Final = 3
# Longest a fuzzed connection may stay open after its input (the gateway closes first).
REPLY_TIMEOUT_S: Final = 20.0
CONNECT_TIMEOUT_S: Final = 60.0
MAXIMUM_PDU_BYTES: Final = 1024 * 1024  # gateway.toml default, advertised to peers
# Peak RSS: a gateway at rest is about 80 MB here. A peer can make it hold at most one
# PDU (1 MiB) per association, 16 associations: a bound of 2x rest plus 64 MiB leaves room
# for the DICOM threads' stacks and allocator slack, and fails anything that follows an
# announced length (up to 4 GiB).
RSS_SLACK_BYTES: Final = 64 * 1024 * 1024
STUDY_INSTANCES: Final = 5

_VERIFICATION: Final = "1.2.840.10008.1.1"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def sites(
    tmp_path: Path,
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    orthanc_b: OrthancServer,
) -> Iterator[TwoSites]:
    """Sites A and B; A's route SITE_B leads to Orthanc B; A drops quiet peers quickly."""
    made = route_to_pacs(
        tmp_path, broker=rabbitmq_node, vhost=vhost, pacs_port=orthanc_b.dicom_port, route=ROUTE
    )
    text = made.config_a.read_text(encoding="utf-8")
    for name, default in (("acse_timeout_s", 30), ("network_timeout_s", 60)):
        line = f"\n{name} = {default}\n"
        assert line in text, name
        text = text.replace(line, f"\n{name} = {PEER_TIMEOUT_S}\n", 1)
    made.config_a.write_text(text, encoding="utf-8")
    yield made
    delete_users(management, made)


@pytest.fixture
def gateways(sites: TwoSites) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Gateway A and B as processes (A's memory, threads and descriptors are its own)."""
    started: list[GatewayProcess] = []
    try:
        for config, port, ae in (
            (sites.config_a, sites.port_a, OWN_AE),
            (sites.config_b, sites.port_b, GATEWAY_B_AE_TITLE),
        ):
            started.append(GatewayProcess.start(config))
            wait_gateway(
                started[-1].process,
                port=port,
                ae_title=ae,
                log_path=started[-1].log_path,
                timeout_s=60,
            )
        yield started[0], started[1]
    finally:
        for gateway in started:
            gateway.stop()


# --- PDUs -------------------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A PDU: type, reserved, length (the body's unless given), body."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def echo_rq_p_data(message_id: int = 1, context_id: int = 1) -> bytes:
    """A P-DATA-TF carrying a C-ECHO-RQ command (Implicit VR Little Endian)."""
    elements = (
        _element(0x0000, 0x0002, _uid(_VERIFICATION))
        + _element(0x0000, 0x0100, struct.pack("<H", 0x0030))
        + _element(0x0000, 0x0110, struct.pack("<H", message_id))
        + _element(0x0000, 0x0800, struct.pack("<H", 0x0101))
    )
    command = _element(0x0000, 0x0000, struct.pack("<L", len(elements))) + elements
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return pdu(0x04, pdv)


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU from ``sock``."""
    header = dicomkit.recv_exactly(sock, 6, timeout_s=REPLY_TIMEOUT_S)
    (length,) = struct.unpack(">L", header[2:])
    return header + dicomkit.recv_exactly(sock, length, timeout_s=REPLY_TIMEOUT_S)


@dataclass(frozen=True)
class Input:
    """One generated input: sent as is on a new connection, after an accepted association
    if ``associate``; ``half_close`` ends our side after it (else the gateway must end it)."""

    kind: str
    payload: bytes
    associate: bool = False
    half_close: bool = True


def _flip(rng: random.Random, data: bytes, start: int = 0) -> bytes:
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        damaged[rng.randrange(start, len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def _garbage_item(rng: random.Random) -> bytes:
    item_type = rng.choice((0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55))
    item_type = item_type if rng.random() < 0.8 else rng.randrange(256)
    body = rng.randbytes(rng.randint(0, 80))
    length = len(body) if rng.random() < 0.5 else rng.choice((0, 1, 0xFFFF, rng.randrange(65536)))
    return struct.pack(">BBH", item_type, 0, length) + body


def generate(rng: random.Random, associate_rq: dict[str, bytes]) -> Input:
    """One input, of a kind drawn at random."""
    rq = associate_rq[OWN_AE]
    roll = rng.randrange(15)
    if roll == 0:
        pdu_type = rng.choice([0x00, *range(0x08, 0x100)])
        body = rng.randbytes(rng.randint(0, 64))
        return Input("unknown-type", pdu(pdu_type, body, length=rng.choice((None, 0, 0xFFFFFFFF))))
    if roll == 1:
        return Input("associate-truncated", rq[: rng.randrange(len(rq))])
    if roll == 2:
        lie = rng.choice((len(rq) - 6 - rng.randint(1, 60), len(rq) - 6 + rng.randint(1, 100)))
        return Input("associate-length-lies", pdu(0x01, rq[6:], length=lie))
    if roll == 3:
        return Input("associate-flipped", _flip(rng, rq, 6))
    if roll == 4:
        items = b"".join(_garbage_item(rng) for _ in range(rng.randint(1, 6)))
        return Input("associate-garbage-items", pdu(0x01, rq[6:74] + items))
    if roll == 5:
        pdu_type = rng.randint(0x01, 0x07)
        floor = MAXIMUM_PDU_BYTES if pdu_type == 0x04 else MAXIMUM_CONTROL_PDU_SIZE
        length = rng.choice((floor + 1, 2**31, 0xFFFFFFFF, rng.randint(floor + 1, 0xFFFFFFFF)))
        return Input(
            "oversized",
            pdu(pdu_type, rng.randbytes(rng.randint(0, 256)), length=length),
            associate=rng.random() < 0.3,
            half_close=False,
        )
    if roll == 6:
        return Input("p-data-before-association", echo_rq_p_data(rng.randrange(65536)))
    if roll == 7:
        pdu_type = rng.choice((0x02, 0x03, 0x05, 0x06, 0x07))
        return Input("other-before-association", pdu(pdu_type, rng.randbytes(rng.choice((4, 10)))))
    if roll == 8:
        return Input("random-bytes", rng.randbytes(rng.randint(1, 300)))
    if roll == 9:
        return Input("open-and-close", b"")
    if roll == 10:
        damaged = _flip(rng, echo_rq_p_data(rng.randrange(65536)), 6)
        return Input("p-data-mutated", damaged, associate=True)
    if roll == 11:
        whole = echo_rq_p_data() + rng.randbytes(rng.randint(0, 4000))
        announced = pdu(0x04, whole[6:], length=len(whole) - 6 + rng.randint(1, 65536))
        return Input("abort-mid-message", announced[: rng.randrange(7, len(announced))], True)
    if roll == 12:
        pdu_type = rng.choice((0x05, 0x06, 0x07, 0x01, 0x02))
        body = rng.randbytes(rng.choice((0, 3, 4, 5, 100)))
        return Input("control-pdu-after-association", pdu(pdu_type, body), associate=True)
    if roll == 13:
        called = rng.choice(("NOWHERE", ROUTE, "", "A" * 16, "BAD\\AE"))
        rq_bytes = associate_rq.get(called) or _flip(rng, rq, 10)
        return Input("associate-other-called-ae", rq_bytes)
    # A C-ECHO and a release: answered (P-DATA, A-RELEASE-RP), then closed by the gateway.
    echo_and_release = echo_rq_p_data(rng.randrange(65536)) + pdu(0x05, bytes(4))
    return Input("associate-then-echo", echo_and_release, associate=True, half_close=False)


# --- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one input got back: its kind, the first byte (PDU type) of the reply, how long
    the connection stayed open after the input, and any failure."""

    kind: str
    reply_type: int | None
    held_s: float
    failure: str | None = None
    # An A-ASSOCIATE-RJ's result, source and reason, in hex.
    rejected: str | None = None


def _connect(port: int) -> socket.socket:
    """A connection to ``port`` with TCP_NODELAY. Connecting may wait for the gateway to
    accept (its listen backlog is short, and a full one drops SYNs, retried after 1, 3,
    7, 15 s): a slow accept under this flood is not a connection held open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(REPLY_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(port: int, item: Input, associate_rq: bytes) -> Outcome:
    """Send one input on a new connection and read until the gateway closes it."""
    try:
        sock = _connect(port)
    except OSError as exc:
        return Outcome(item.kind, None, 0.0, f"connect: {type(exc).__name__}")
    try:
        with sock:
            if item.associate:
                sock.sendall(associate_rq)
                accept = read_pdu(sock)
                if accept[:1] != b"\x02":  # rejected (busy?): an answer too
                    return Outcome(item.kind, accept[0], 0.0, rejected=accept[7:10].hex())
            sent = time.monotonic()
            try:
                sock.sendall(item.payload)
                if item.half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the gateway refused and closed (or reset) before all of it was sent
            reply = dicomkit.recv_until_closed(sock, timeout_s=REPLY_TIMEOUT_S)
            rejected = reply[7:10].hex() if reply[:1] == b"\x03" else None
            return Outcome(
                item.kind, reply[0] if reply else None, time.monotonic() - sent, rejected=rejected
            )
    except TimeoutError:
        return Outcome(item.kind, None, REPLY_TIMEOUT_S, "no answer, connection not closed")
    except OSError as exc:
        return Outcome(item.kind, None, 0.0, f"{type(exc).__name__}")


def slow_writer(port: int, payload: bytes, *, interval_s: float, budget_s: float) -> Outcome:
    """Slowloris: dribble ``payload`` a byte at a time, every ``interval_s``, for at most
    ``budget_s``; return when the gateway closed the connection, or the budget ran out."""
    began = time.monotonic()
    with _connect(port) as sock:
        sock.settimeout(interval_s)
        for byte in payload:
            if time.monotonic() - began > budget_s:
                return Outcome("slow-writer", None, time.monotonic() - began, "still open")
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(65536) == b"":
                    break  # the gateway closed
            except TimeoutError:
                continue  # nothing from the gateway yet: the next byte
            except (BrokenPipeError, ConnectionResetError):
                break
    return Outcome("slow-writer", None, time.monotonic() - began)


# --- the gateway process ----------------------------------------------------------------------


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status (kB fields in bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            value = int(line.split()[1])
            return value * 1024 if line.endswith("kB") else value
    raise AssertionError(f"no {field} for pid {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def echo_ok(port: int) -> bool:
    """A C-ECHO to the gateway's own AE title over a raw socket is answered success."""
    with _connect(port) as sock:
        sock.sendall(dicomkit.associate_rq_bytes(OWN_AE))
        if read_pdu(sock)[:1] != b"\x02":
            return False
        sock.sendall(echo_rq_p_data())
        response = read_pdu(sock)
        sock.sendall(pdu(0x05, bytes(4)))  # A-RELEASE-RQ
        read_pdu(sock)
    # Status (0000,0900) = 0x0000 in the C-ECHO-RSP command.
    return response[:1] == b"\x04" and b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00" in response


def storescu(port: int, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(DCMTK_BIN / "storescu"),
            "-aet",
            "MODALITY",
            "-aec",
            ROUTE,
            "-xe",
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dcmtk_env(),
        check=False,
    )


# --- the test ---------------------------------------------------------------------------------


def test_gateway_survives_10000_malformed_inputs_and_still_relays(
    tmp_path: Path,
    sites: TwoSites,
    gateways: tuple[GatewayProcess, GatewayProcess],
    orthanc_b: OrthancServer,
) -> None:
    """Over 10,000 generated inputs on gateway A's DICOM port each end with the gateway
    closing the connection (none held open); afterwards the process is alive, its peak RSS
    bounded, its threads and descriptors back to their level before, and a study sent by
    DCMTK's storescu arrives whole in Orthanc B."""
    gateway_a, _ = gateways
    port, pid = sites.port_a, gateway_a.pid
    assert echo_ok(port)
    rest_rss = proc_status(pid, "VmRSS")
    threads_before, fds_before = proc_status(pid, "Threads"), open_fds(pid)
    rng = random.Random(SEED)
    associate_rq = {
        called: dicomkit.associate_rq_bytes(called) for called in (OWN_AE, ROUTE, "NOWHERE")
    }
    inputs = [generate(rng, associate_rq) for _ in range(INPUTS)]

    began = time.monotonic()
    # Slow writers first, in the background: each dribbles an association request a byte
    # every 0.5 s (faster than the gateway's socket timeout) for at most 4x its timeouts.
    slow: list[Outcome] = []
    slow_threads = [
        threading.Thread(
            target=lambda: slow.append(
                slow_writer(
                    port, associate_rq[OWN_AE], interval_s=0.5, budget_s=4 * PEER_TIMEOUT_S + 5
                )
            )
        )
        for _ in range(SLOW_CONNECTIONS)
    ]
    for thread in slow_threads:
        thread.start()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        outcomes = list(pool.map(lambda item: exchange(port, item, associate_rq[OWN_AE]), inputs))
    for thread in slow_threads:
        thread.join()
    fuzz_s = time.monotonic() - began

    kinds = Counter(outcome.kind for outcome in outcomes)
    replies = Counter(
        f"0x{outcome.reply_type:02X}" if outcome.reply_type is not None else "closed"
        for outcome in outcomes
    )
    failures = Counter((o.kind, o.failure) for o in [*outcomes, *slow] if o.failure)
    slowest = max(outcome.held_s for outcome in outcomes)
    rejections = Counter(outcome.rejected for outcome in outcomes if outcome.rejected)
    print(
        f"\n{len(outcomes)} inputs + {len(slow)} slow writers in {fuzz_s:.1f}s; "
        f"kinds {dict(kinds)}; replies {dict(replies)}; longest held {slowest:.2f}s; "
        f"slow writers held {max(o.held_s for o in slow):.1f}s at most; rejections "
        f"(result, source, reason) {dict(rejections)}; threads {proc_status(pid, 'Threads')}"
        f" (before {threads_before})"
    )
    assert failures == Counter(), failures
    assert len(slow) == SLOW_CONNECTIONS
    # Slow writers are dropped once a PDU has not arrived whole within the timeout.
    assert max(o.held_s for o in slow) < 2 * PEER_TIMEOUT_S + 1
    # Associations refused for the local limit only while the slow writers held slots at
    # the start (before bad connections freed theirs at once: 3,089 of these inputs).
    assert rejections["020302"] < INPUTS // 10, rejections
    # Every kind was generated, and the gateway answered some of them (aborts, accepts).
    assert len(kinds) == 15, kinds
    assert replies["0x07"] > 0  # A-ABORTs
    assert replies["0x04"] > 0  # C-ECHO responses

    # Afterwards: alive, memory bounded, no thread or descriptor left behind.
    assert gateway_a.process.poll() is None, gateway_a.log()[-3000:]
    wait_for(
        lambda: proc_status(pid, "Threads") <= threads_before and open_fds(pid) <= fds_before,
        timeout_s=30,
        interval_s=0.2,
        what=f"threads <= {threads_before} and fds <= {fds_before}",
    )
    peak = gateway_a.peak_rss_bytes()
    print(f"gateway A: RSS at rest {rest_rss / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB")
    assert peak < 2 * rest_rss + RSS_SLACK_BYTES, (peak, rest_rss)
    assert echo_ok(port)

    # And a study still relays, whole.
    study = ct_series(tmp_path / "study", STUDY_INSTANCES, rows=64, columns=64)
    result = storescu(port, study)
    assert result.returncode == 0, result.stdout + result.stderr
    uids = [sop_instance_uid(path) for path in study]
    with orthanc_b.client() as client:
        wait_for(
            lambda: all(client.find_instance(uid) is not None for uid in uids),
            timeout_s=60,
            interval_s=0.25,
            what="the study in Orthanc B",
        )
    assert gateway_a.process.poll() is None


async def test_a_peer_dribbling_a_pdu_is_dropped_within_the_network_timeout() -> None:
    """Regression (found by the fuzzer): a peer sending an A-ASSOCIATE-RQ a byte every
    0.3 s, under the 1 s socket timeout, is dropped once the PDU has not arrived whole
    within the network timeout, instead of holding its association for ever."""

    async def never(instance: ReceivedInstance) -> StoreOutcome:
        raise AssertionError("no C-STORE expected")

    settings = ScpSettings(host="127.0.0.1", port=0, acse_timeout_s=1, network_timeout_s=1)
    scp = StorageSCP(policy=AcceptancePolicy.of([ROUTE]), on_store=never, settings=settings)
    async with scp:
        request = dicomkit.associate_rq_bytes(ROUTE)
        outcome = await asyncio.to_thread(
            slow_writer, scp.port, request, interval_s=0.3, budget_s=10
        )
    assert outcome.failure is None, outcome
    assert outcome.held_s < 4, outcome


async def test_bad_connections_do_not_hold_association_slots() -> None:
    """Regression (found by the fuzzer): connections that end or are refused before an
    A-ASSOCIATE-RQ free their association slot at once, not after the 30 s ACSE timeout,
    so a burst of them does not get the next association rejected (local limit exceeded)."""

    async def never(instance: ReceivedInstance) -> StoreOutcome:
        raise AssertionError("no C-STORE expected")

    settings = ScpSettings(host="127.0.0.1", port=0, maximum_associations=2, acse_timeout_s=30)
    scp = StorageSCP(policy=AcceptancePolicy.of([ROUTE]), on_store=never, settings=settings)
    bad = [
        Input("unknown-type", pdu(0x47, b"ET / HTTP/1.1\r\n\r\n")),
        Input("open-and-close", b""),
        Input("associate-truncated", dicomkit.associate_rq_bytes(ROUTE)[:40]),
        Input("p-data-before-association", echo_rq_p_data()),
    ] * 2
    request = dicomkit.associate_rq_bytes(ROUTE)
    async with scp:
        for item in bad:
            outcome = await asyncio.to_thread(exchange, scp.port, item, request)
            assert outcome.failure is None, outcome
        # Slots are freed by the gateway's threads shortly after each connection closed.
        answers: list[Outcome] = []

        async def slot_free() -> bool:
            answers.append(
                await asyncio.to_thread(exchange, scp.port, Input("ok", b"", True), request)
            )
            return answers[-1].rejected is None

        await wait_until(slot_free, timeout_s=5, interval_s=0.1, what="an association slot")
