"""Control messages too old, from the future, or seen before are not acted on (issue 8):
the guard itself on a controlled clock, and a gateway handed copies of a signed receipt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicombridge import replay
from dicombridge.control import Receipt, seal_control
from dicombridge.keys import Validity
from dicombridge.replay import ReplayGuard
from dicombridge.transport import Delivery
from tests.cryptokit import Federation, make_federation
from tests.test_metrics import fed, gateway_for

__all__ = ["fed"]  # the fixture, imported for pytest

NOON = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOON

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The guard's ``utc_now``, set by the test."""
    fake = Clock()
    monkeypatch.setattr(replay, "utc_now", fake)
    return fake


def test_age_skew_and_ids_seen_decide(clock: Clock) -> None:
    """Within max age and skew a new id passes; past the age, beyond the skew in the
    future, without created_at, or an id acted on before: refused with the reason; an id
    is forgotten once no copy of it could be young enough to pass."""
    guard = ReplayGuard(max_age_s=3600, clock_skew_s=300)
    assert guard.refusal("a", NOON - timedelta(seconds=3800)) is None  # within age + skew
    assert guard.refusal("a", NOON + timedelta(seconds=290)) is None  # a clock ahead
    old = guard.refusal("a", NOON - timedelta(seconds=3901))
    assert old is not None
    assert old.startswith("older than max_age_s")
    future = guard.refusal("a", NOON + timedelta(seconds=301))
    assert future is not None
    assert "future" in future
    assert guard.refusal("a", None) == "no created_at"

    guard.acted_on("a")
    assert guard.refusal("a", NOON) == "seen before"
    assert guard.refusal("b", NOON) is None
    clock.now = NOON + timedelta(seconds=3600 + 2 * 300 - 1)
    assert guard.refusal("a", NOON + timedelta(seconds=3600)) == "seen before"
    assert guard.remembered == 1
    clock.now = NOON + timedelta(seconds=3600 + 2 * 300 + 1)
    assert guard.refusal("a", clock.now) is None
    assert guard.remembered == 0


def _receipt_from_b(fed: Federation, *, created_at: datetime | None = None) -> Delivery:
    receipt = Receipt(transfer_id=bytes(16), outcome="stored", status=0x0000, created_at=created_at)
    message_id, body = seal_control(
        receipt.to_document(),
        sender=fed.sender("hosp-b"),
        directory=fed.directory,
        recipient_site="hosp-a",
    )
    return Delivery(body, "hosp-b", "control", message_id, redelivered=False)


async def test_a_gateway_acts_on_a_control_message_once(tmp_path: Path) -> None:
    """A receipt delivered twice (a replay, or the broker's redelivery of a handled
    message) is acted on once; one signed two hours ago (with a key valid then) is not
    acted on at all; both are counted in control_refused and /metrics."""
    fed = make_federation(signing_validity={"hosp-b": Validity(NOON - timedelta(days=1))})
    gateway = gateway_for(tmp_path, fed, nodes={})
    fresh = _receipt_from_b(fed)
    await gateway._on_control(fresh)
    await gateway._on_control(fresh)
    stale = _receipt_from_b(fed, created_at=datetime.now(UTC) - timedelta(hours=2))
    await gateway._on_control(stale)

    text = gateway.metrics.exposition().decode()
    acted = [
        line
        for line in text.splitlines()
        if line.startswith('dicombridge_receipts_unmatched_total{from_site="hosp-b"}')
    ]
    assert acted == ['dicombridge_receipts_unmatched_total{from_site="hosp-b"} 1.0']
    assert gateway.control_refused == 2
    assert "dicombridge_control_refused_total 2.0" in text
