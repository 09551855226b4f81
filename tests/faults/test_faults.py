"""Nothing lost, nothing stored twice: a 200-instance study through single faults.

Each case sends a fresh study from DCMTK's storescu to site A's route to site B, injects
one fault mid-transfer, repairs it the way the fault ends in life (a restart, a PACS back,
a network back; a dead cluster node stays dead), and then needs no hand: the case passes
when every instance A answered with success is in B's PACS with the same bytes, none was
received twice there, and nothing is left in outbox, spool, incoming, quarantine or owed
receipts (see rig.py). Outage lengths are the faults' own durations, not waits for a
condition.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

import pytest

from dicombridge.sandbox import Sandbox
from tests.faults.conftest import record
from tests.faults.proxy import TcpProxy
from tests.faults.rig import RECEIVER, SENDER, STUDY_SIZE, Case
from tests.relaykit import ct_series

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(900)]

# Break things once this many instances of the study are past the stage that matters.
MID: Final = STUDY_SIZE // 4
PACS_OUTAGE_S: Final = 30.0
NETWORK_OUTAGE_S: Final = 20.0


def new_case(name: str, sandbox: Sandbox, study_dir: Path) -> Case:
    return Case(name, sandbox, ct_series(study_dir / name, STUDY_SIZE))


def test_sending_gateway_killed_mid_transfer(
    proxied_sandbox: tuple[Sandbox, TcpProxy], study_dir: Path
) -> None:
    """kill -9 of gateway A while the modality sends; the modality sends the rest after
    the restart (the one instance in flight at the kill is not sent again: unanswered,
    it may or may not be in A's outbox, and a modality would repeat it, storing it twice
    at worst, as DICOM allows)."""
    sandbox, _ = proxied_sandbox
    case = new_case("1 kill -9 sending gateway", sandbox, study_dir)
    first = case.send()
    case.wait_mid_transfer(lambda: first.answered_count >= MID, "A to answer a quarter")
    sandbox.kill_gateway(SENDER)
    first.wait()
    sandbox.start_gateway(SENDER)
    if rest := first.never_attempted():
        case.send(rest)
    record(case.finish())


def test_receiving_gateway_killed_mid_transfer(
    proxied_sandbox: tuple[Sandbox, TcpProxy], study_dir: Path
) -> None:
    sandbox, _ = proxied_sandbox
    case = new_case("2 kill -9 receiving gateway", sandbox, study_dir)
    case.send()
    case.wait_mid_transfer(lambda: case.received_at_b() >= MID, "B's PACS to get a quarter")
    sandbox.kill_gateway(RECEIVER)
    sandbox.start_gateway(RECEIVER)
    record(case.finish())


def test_broker_node_killed_mid_transfer(
    proxied_sandbox: tuple[Sandbox, TcpProxy], study_dir: Path
) -> None:
    sandbox, _ = proxied_sandbox
    case = new_case("3 kill -9 broker node", sandbox, study_dir)
    case.send()
    case.wait_mid_transfer(lambda: case.received_at_b() >= MID, "B's PACS to get a quarter")
    sandbox.kill_broker_node()
    sandbox.restart_broker_node()
    record(case.finish())


def test_receiving_pacs_down_for_30_s(
    proxied_sandbox: tuple[Sandbox, TcpProxy], study_dir: Path
) -> None:
    sandbox, _ = proxied_sandbox
    case = new_case("4 B's PACS down 30 s", sandbox, study_dir)
    case.send()
    case.wait_mid_transfer(lambda: case.received_at_b() >= MID, "B's PACS to get a quarter")
    sandbox.stop_pacs(RECEIVER)
    time.sleep(PACS_OUTAGE_S)  # the outage itself
    sandbox.start_pacs(RECEIVER)
    record(case.finish())


def test_gateway_broker_connection_cut_for_20_s(
    proxied_sandbox: tuple[Sandbox, TcpProxy], study_dir: Path
) -> None:
    sandbox, proxy = proxied_sandbox
    case = new_case("6 A's broker link cut 20 s", sandbox, study_dir)
    case.send()
    case.wait_mid_transfer(lambda: case.received_at_b() >= MID, "B's PACS to get a quarter")
    dropped = proxy.cut()
    assert dropped >= 2, f"the proxy carried {dropped} connections; A has bulk and control"
    time.sleep(NETWORK_OUTAGE_S)  # the outage itself
    proxy.restore()
    record(case.finish())


def test_cluster_node_killed_and_left_down(cluster_sandbox: Sandbox, study_dir: Path) -> None:
    """kill -9 the node both gateways connected to first; it stays down."""
    sandbox = cluster_sandbox
    case = new_case("5 cluster: kill -9 one of 3 nodes", sandbox, study_dir)
    case.send()
    case.wait_mid_transfer(lambda: case.received_at_b() >= MID, "B's PACS to get a quarter")
    sandbox.kill_broker_node(0)
    record(case.finish())


def test_sending_gateway_stopped_with_sigterm_mid_transfer(
    proxied_sandbox: tuple[Sandbox, TcpProxy], study_dir: Path
) -> None:
    """SIGTERM to gateway A while the modality sends: it stops accepting, finishes what it
    was admitting and exits 0 within its grace period; after the restart the modality
    sends what it was refused or never sent, and the outbox carries on."""
    sandbox, _ = proxied_sandbox
    case = new_case("7 SIGTERM sending gateway", sandbox, study_dir)
    first = case.send()
    case.wait_mid_transfer(lambda: first.answered_count >= MID, "A to answer a quarter")
    assert sandbox.stop_gateway(SENDER, timeout_s=60) == 0, "gateway A did not exit 0"
    first.wait()
    sandbox.start_gateway(SENDER)
    answered = set(first.answered)
    if rest := [path for path in case.study if path not in answered]:
        case.send(rest)
    record(case.finish())


def test_receiving_gateway_stopped_with_sigterm_mid_transfer(
    proxied_sandbox: tuple[Sandbox, TcpProxy], study_dir: Path
) -> None:
    """SIGTERM to gateway B while instances arrive: the C-STORE under way finishes,
    unacked deliveries go back to the queue, it exits 0; the restart delivers the rest."""
    sandbox, _ = proxied_sandbox
    case = new_case("8 SIGTERM receiving gateway", sandbox, study_dir)
    case.send()
    case.wait_mid_transfer(lambda: case.received_at_b() >= MID, "B's PACS to get a quarter")
    assert sandbox.stop_gateway(RECEIVER, timeout_s=60) == 0, "gateway B did not exit 0"
    sandbox.start_gateway(RECEIVER)
    record(case.finish())
