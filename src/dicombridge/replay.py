"""Replay and age of control messages: what is too old, from the future, or seen before is
not acted on.

Control messages (queries, responses, cancels, receipts, echoes) are signed and sealed, so
nobody can forge one; but the broker (or anyone holding a copy) could deliver one again.
Each carries a random 128-bit message id and its signed ``created_at``:

- older than ``max_age_s`` (plus ``clock_skew_s``) or newer than now plus
  ``clock_skew_s``: refused;
- a message id already acted on within ``max_age_s``: refused.

The ids are remembered in memory, for ``max_age_s`` plus the skew, so the memory is bounded
by the message rate. After a restart, a copy younger than ``max_age_s`` is acted on once
more: receipts and cancels are idempotent, and a query is answered again, sealed, to the
site that asked. Transfers are not concerned: they are protected by the record of
transfer ids done (``done/``), never by age, since an instance may wait in an outbox for
days.

A message refused for its age costs nothing that is not repaired: a late receipt is
repeated by the receiver when the sender re-sends; a late query response belongs to a
query timed out long before.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dicombridge.envelope import control_age
from dicombridge.keys import utc_now


@dataclass
class ReplayGuard:
    """Remembers the control messages acted on; says why one must not be."""

    max_age_s: float
    clock_skew_s: float
    _seen: set[str] = field(default_factory=set)
    _expiry: list[tuple[datetime, str]] = field(default_factory=list)

    def refusal(self, message_id: str, created_at: datetime | None) -> str | None:
        """Why the message must not be acted on, or None."""
        if created_at is None:
            return "no created_at"
        now = utc_now()
        self._forget(now)
        age_s = control_age(created_at, now).total_seconds()
        if age_s > self.max_age_s + self.clock_skew_s:
            return f"older than max_age_s ({age_s:.0f} s)"
        if age_s < -self.clock_skew_s:
            return f"from {-age_s:.0f} s in the future (beyond clock_skew_s)"
        if message_id in self._seen:
            return "seen before"
        return None

    def acted_on(self, message_id: str) -> None:
        """Remember ``message_id`` until no copy of it can be young enough to pass."""
        if message_id in self._seen:
            return
        keep = timedelta(seconds=self.max_age_s + 2 * self.clock_skew_s)
        self._seen.add(message_id)
        heapq.heappush(self._expiry, (utc_now() + keep, message_id))

    @property
    def remembered(self) -> int:
        return len(self._seen)

    def _forget(self, now: datetime) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, message_id = heapq.heappop(self._expiry)
            self._seen.discard(message_id)
