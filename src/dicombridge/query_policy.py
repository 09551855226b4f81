"""The responding site decides what other sites may ask of its nodes (``[[remote_access]]``).

A query or retrieve from another site is checked here before anything reaches the PACS:
the site must have an entry (or ``site = "*"`` must exist), the operation and the Query/
Retrieve Level must be among the entry's, and the keys the entry requires at that level
must hold a value: not empty and not wildcards only (``*`` and ``?``), so that
``PatientName=*`` at PATIENT level is refused unless the entry allows it. A refusal
carries status 0x0124 (Refused: Not Authorized, a general status of PS3.7 Annex C) and
an Error Comment naming the rule; it is logged with the site, query id, operation, level
and key names, never with values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset

from dicombridge.config import RemoteAccessEntry
from dicombridge.control import Query

log = logging.getLogger(__name__)

STATUS_NOT_AUTHORISED: Final = 0x0124
ANY_SITE: Final = "*"
_WILDCARDS: Final = frozenset("*?")


@dataclass(frozen=True)
class Refusal:
    """Why a query is not run: a DIMSE status and its Error Comment (at most 64 chars)."""

    status: int
    comment: str


def has_value(identifier: Dataset, keyword: str) -> bool:
    """True if ``keyword`` holds something other than empty or only wildcards."""
    value = identifier.get(keyword)
    if value is None:
        return False
    text = str(value).replace("^", "").replace("=", "").strip()
    return bool(text) and not set(text) <= _WILDCARDS


class RemoteAccessPolicy:
    """``[[remote_access]]`` entries, looked up per requesting site."""

    def __init__(self, entries: list[RemoteAccessEntry]) -> None:
        self._entries = {entry.site: entry for entry in entries}

    def entry(self, site: str) -> RemoteAccessEntry | None:
        return self._entries.get(site) or self._entries.get(ANY_SITE)

    def decide(self, from_site: str, query: Query, identifier: Dataset | None) -> Refusal | None:
        """None to run the query, or the refusal to answer with."""
        refusal = self._decide(from_site, query, identifier)
        if refusal is not None:
            log.warning(
                "query refused by policy",
                extra={
                    "audit": "policy refusal",
                    "from_site": from_site,
                    "query_id": query.query_id,
                    "operation": query.operation,
                    "calling_ae_title": query.calling_ae_title,
                    "reason": refusal.comment,
                },
            )
        return refusal

    def _decide(self, from_site: str, query: Query, identifier: Dataset | None) -> Refusal | None:
        entry = self.entry(from_site)
        if entry is None:
            return Refusal(STATUS_NOT_AUTHORISED, f"{from_site} may not query this site")
        if query.operation not in entry.operations:
            return Refusal(STATUS_NOT_AUTHORISED, f"C-{query.operation.upper()} not allowed")
        if query.operation == "echo":
            return None
        if identifier is None:
            return Refusal(0xA900, "identifier missing")
        level = str(identifier.get("QueryRetrieveLevel", "")).strip()
        if level not in entry.levels:
            return Refusal(STATUS_NOT_AUTHORISED, f"level {level or '(none)'} not allowed")
        for alternatives in entry.required_keys.get(level, []):
            keywords = [k.strip() for k in alternatives.split("|") if k.strip()]
            if not any(has_value(identifier, keyword) for keyword in keywords):
                wanted = " or ".join(keywords)
                return Refusal(STATUS_NOT_AUTHORISED, f"{wanted} required at {level} level")
        return None

    def max_matches(self, from_site: str) -> int | None:
        entry = self.entry(from_site)
        return None if entry is None else entry.max_matches
