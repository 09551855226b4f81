"""The hospital-facing Query/Retrieve SCP: C-FIND (and deep C-ECHO) to a route's AE title
answered by the route's remote site (PS3.4 C).

pynetdicom calls the ``EVT_C_FIND`` handler in the association's thread; the handler is a
generator: each ``(status, identifier)`` it yields is sent at once as a response, so the
matches the remote site streams back reach the workstation as they arrive. The handler
hands the request to the ``Requester`` on the gateway's event loop and reads the
``QuerySession`` from its own thread:

- each pending response's identifier gets Retrieve AE Title (0008,0054) = the route's AE
  title (the node a workstation retrieves from is the gateway, under the route's title);
- a C-CANCEL from the workstation cancels the remote query and is answered 0xFE00 at once;
- no response from the remote site for ``timeout_s`` (the site or its broker link is
  down): the remote query is cancelled and the workstation gets 0xC000 with an Error
  Comment naming the site, never a hang;
- the remote site's final status and Error Comment are passed through.

Identifiers cross as encoded bytes (Explicit VR Little Endian), converted from and to
the presentation context's transfer syntax by pydicom with the elements left raw where
the transfer syntax allows: values and Specific Character Set pass unchanged.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from typing import Any, Final, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode, encode

from dicombridge.control import InformationModel, QueryResponse
from dicombridge.requester import (
    STATUS_CANCEL,
    STATUS_UNABLE_TO_PROCESS,
    QuerySession,
    ScpRequest,
)

LOGGER = logging.getLogger(__name__)

# PS3.4 C.6: Query/Retrieve information models and their SOP classes.
PATIENT_ROOT_FIND: Final = UID("1.2.840.10008.5.1.4.1.2.1.1")
PATIENT_ROOT_MOVE: Final = UID("1.2.840.10008.5.1.4.1.2.1.2")
PATIENT_ROOT_GET: Final = UID("1.2.840.10008.5.1.4.1.2.1.3")
STUDY_ROOT_FIND: Final = UID("1.2.840.10008.5.1.4.1.2.2.1")
STUDY_ROOT_MOVE: Final = UID("1.2.840.10008.5.1.4.1.2.2.2")
STUDY_ROOT_GET: Final = UID("1.2.840.10008.5.1.4.1.2.2.3")
FIND_MODELS: Final[dict[str, InformationModel]] = {
    PATIENT_ROOT_FIND: "patient",
    STUDY_ROOT_FIND: "study",
}
ERROR_COMMENT_LENGTH: Final = 64  # LO (PS3.7 C.4)
QUERY_LEVELS: Final = frozenset({"PATIENT", "STUDY", "SERIES", "IMAGE"})
STATUS_IDENTIFIER_DOES_NOT_MATCH: Final = 0xA900
# How often the answering thread looks at C-CANCEL while it waits for the remote site.
_POLL_S: Final = 0.05
_START_TIMEOUT_S: Final = 30.0


class QueryBridge(Protocol):
    """What the SCP needs from the gateway to answer queries (see ``Requester``)."""

    loop: asyncio.AbstractEventLoop
    timeout_s: float

    async def start(self, request: ScpRequest) -> QuerySession: ...

    async def cancel(self, session: QuerySession, *, reason: str = ...) -> None: ...

    async def deep_echo(
        self, called_ae_title: str, calling_ae_title: str
    ) -> int | Dataset | None: ...


def to_explicit_little(raw: io.BytesIO | bytes, transfer_syntax: str) -> bytes:
    """An identifier in ``transfer_syntax`` as Explicit VR Little Endian bytes."""
    syntax = UID(transfer_syntax)
    stream = raw if isinstance(raw, io.BytesIO) else io.BytesIO(raw)
    stream.seek(0)
    dataset = decode(stream, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    encoded = encode(dataset, False, True)
    if encoded is None:
        raise ValueError("identifier cannot be encoded")
    return encoded


def from_explicit_little(data: bytes) -> Dataset:
    """Decode an Explicit VR Little Endian identifier, leaving its elements raw."""
    return read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def parse_identifier(raw: io.BytesIO | None, transfer_syntax: str) -> bytes:
    """A request's Identifier as Explicit VR Little Endian bytes, with a known Query/
    Retrieve Level; ValueError carries the Error Comment for 0xA900 otherwise."""
    try:
        if raw is None:
            raise ValueError("no identifier")
        identifier = to_explicit_little(raw, transfer_syntax)
        level = from_explicit_little(identifier).get("QueryRetrieveLevel")
    except Exception as exc:
        raise ValueError("identifier cannot be parsed") from exc
    if level not in QUERY_LEVELS:
        raise ValueError("Query/Retrieve Level missing or unknown")
    return identifier


def status_dataset(status: int, comment: str | None) -> Dataset:
    """A response status, with its Error Comment (failures only, PS3.7 C.4)."""
    result = Dataset()
    result.Status = status
    if comment and status not in (0x0000, 0xFF00, 0xFF01):
        result.ErrorComment = comment[:ERROR_COMMENT_LENGTH]
    return result


class FindHandler:
    """``EVT_C_FIND`` for every route AE title, answered by the route's remote site."""

    def __init__(self, bridge: QueryBridge) -> None:
        self._bridge = bridge

    def __call__(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        called = str(event.assoc.acceptor.ae_title).strip()
        calling = str(event.assoc.requestor.ae_title).strip()
        context = event.context
        model = FIND_MODELS.get(str(context.abstract_syntax))
        if model is None:
            yield status_dataset(0x0122, "SOP class not supported"), None
            return
        try:
            identifier = parse_identifier(
                cast(C_FIND, event.request).Identifier, str(context.transfer_syntax)
            )
        except ValueError as exc:
            yield status_dataset(STATUS_IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        request = ScpRequest("find", called, calling, model, identifier)
        bridge = self._bridge
        session: QuerySession = run_on_loop(bridge, bridge.start(request))
        yield from self._responses(event, session, called)

    def _responses(
        self, event: evt.Event, session: QuerySession, called: str
    ) -> Iterator[tuple[Any, Dataset | None]]:
        bridge = self._bridge
        matches = 0
        waited_s = 0.0
        while True:
            if event.is_cancelled:
                run_on_loop(bridge, bridge.cancel(session, reason="C-CANCEL from the requester"))
                LOGGER.info("C-FIND %s cancelled after %d matches", session.query_id, matches)
                yield STATUS_CANCEL, None
                return
            response = session.next_response(_POLL_S)
            if response is None:
                waited_s += _POLL_S
                if waited_s >= session.timeout_s:
                    run_on_loop(bridge, bridge.cancel(session, reason="timed out"))
                    site = session.to_site or "the remote site"
                    LOGGER.warning(
                        "C-FIND %s: %s did not answer within %.0f s",
                        session.query_id,
                        site,
                        session.timeout_s,
                    )
                    comment = f"{site} did not answer within {session.timeout_s:.0f} s"
                    yield status_dataset(STATUS_UNABLE_TO_PROCESS, comment), None
                    return
                continue
            waited_s = 0.0
            if response.final:
                LOGGER.info(
                    "C-FIND %s to %r: %d matches, status 0x%04X",
                    session.query_id,
                    called,
                    matches,
                    response.status,
                )
                yield status_dataset(response.status, response.error_comment), None
                return
            match = _match(response, called)
            if match is None:
                continue
            matches += 1
            yield response.status, match


def _match(response: QueryResponse, called: str) -> Dataset | None:
    if response.identifier is None:
        return None
    try:
        match = from_explicit_little(response.identifier)
    except Exception:
        LOGGER.warning("C-FIND %s: a match that cannot be parsed dropped", response.query_id)
        return None
    match.RetrieveAETitle = called
    return match


def run_on_loop(bridge: QueryBridge, coroutine: Any) -> Any:
    """Run a coroutine on the gateway's loop from an association thread."""
    return asyncio.run_coroutine_threadsafe(coroutine, bridge.loop).result(timeout=_START_TIMEOUT_S)


def deep_echo(bridge: QueryBridge, called: str, calling: str) -> int | Dataset | None:
    """The status of a deep echo through ``called``'s route, or None to answer locally."""
    result: int | Dataset | None = asyncio.run_coroutine_threadsafe(
        bridge.deep_echo(called, calling), bridge.loop
    ).result(timeout=bridge.timeout_s + _START_TIMEOUT_S)
    return result
