"""The hospital-facing C-MOVE and C-GET SCP: a retrieve from a route's AE title, answered by
the route's remote site, the instances stored to a node here (C-MOVE, PS3.4 C.4.2) or
sent back on the requester's association (C-GET, PS3.4 C.4.3).

pynetdicom's Query/Retrieve service class takes decoded Datasets for its sub-operations
(re-encoding bytes, holding instances in memory) and needs their number up front. Here
the sub-operations are the gateway's own deliveries: the remote site C-MOVEs the
instances from its PACS to its gateway, which seals each one back as a transfer; this
gateway delivers it to the Move Destination from the verified file, bytes as received,
with Move Originator AE Title and Message ID set, through the ordinary delivery path
(retries, quarantine, receipts). This module answers the requester meanwhile:

- Move Destination not among ``[[local_nodes]]`` (by AE title): 0xA801 at once;
- a pending response after each sub-operation here, with remaining (from the remote
  PACS's counts), completed, failed and warning;
- the final response once the remote site's final response came and every transfer it
  announced was delivered or failed: 0x0000, 0xB000 with the Failed SOP Instance UID
  List when some failed (here or at the remote PACS), 0xA702 when all failed; a remote
  failure before any instance (policy refusal, PACS down) is passed through;
- C-CANCEL: the remote retrieve is cancelled, and the final response is 0xFE00 with the
  counts so far; instances already on their way are still delivered;
- nothing from the remote site for ``retrieve_timeout_s``: the remote retrieve is
  cancelled, and the final response counts what did not come as failed.

C-GET is the same, except that each instance is C-STOREd by this module on the
requester's own association, from the verified file, in the (SOP class, transfer syntax)
pairs the requester accepted with the SCP role (PS3.7 D.3.3.4): bytes as received where
its transfer syntax was accepted, else converted between uncompressed syntaxes (up to
``MAX_CONVERTED_BYTES``); an instance no accepted context can carry is counted as
failed, never dropped silently.
Its receipt goes back to the remote site either way.

``RelayedRetrieveService`` replaces pynetdicom's service class for the C-MOVE and C-GET SOP classes
of the associations of an AE that carries a ``RetrieveHandler`` (``acceptance`` installs
the hook); any other AE in the process keeps pynetdicom's.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.service_class import QueryRetrieveServiceClass

from dicombridge.acceptance import is_storage_like
from dicombridge.control import InformationModel, QueryResponse
from dicombridge.qr_scp import (
    ERROR_COMMENT_LENGTH,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STATUS_IDENTIFIER_DOES_NOT_MATCH,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    QueryBridge,
    parse_identifier,
    run_on_loop,
)
from dicombridge.requester import (
    STATUS_CANCEL,
    QuerySession,
    Retrieved,
    ScpRequest,
    SubOperation,
)

LOGGER = logging.getLogger(__name__)

MOVE_MODELS: Final[dict[str, InformationModel]] = {
    PATIENT_ROOT_MOVE: "patient",
    STUDY_ROOT_MOVE: "study",
}
GET_MODELS: Final[dict[str, InformationModel]] = {
    PATIENT_ROOT_GET: "patient",
    STUDY_ROOT_GET: "study",
}
STATUS_SUCCESS: Final = 0x0000
STATUS_PENDING: Final = 0xFF00
STATUS_WARNING: Final = 0xB000
STATUS_MOVE_DESTINATION_UNKNOWN: Final = 0xA801
STATUS_SUB_OPERATIONS_FAILED: Final = 0xA702
_POLL_S: Final = 0.05
# C-GET: an uncompressed instance up to this size may be converted to another
# uncompressed transfer syntax the requester accepted (decoded in memory to do so).
MAX_CONVERTED_BYTES: Final = 256 * 1024 * 1024
# Statuses of a final response the remote side ends a retrieve with, other than failures.
_NOT_FAILURES: Final = frozenset({STATUS_SUCCESS, STATUS_WARNING, STATUS_CANCEL})


class RetrieveBridge(QueryBridge, Protocol):
    """What the C-MOVE SCP needs beyond queries: the local node a destination names."""

    def local_node(self, ae_title: str) -> Any: ...

    def close(self, session: QuerySession) -> None: ...

    async def finished(
        self, incoming: Any, status: int, *, stored: bool, comment: str | None = ...
    ) -> None: ...


@dataclass
class _Tally:
    """Sub-operations of one retrieve, as the requester is told of them."""

    total: int | None = None  # from the remote PACS's counts, once known
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remote_failed: int = 0
    failed_uids: list[str] = field(default_factory=list)
    expected: int | None = None  # transfers the remote site sent, from its final response
    delivered: int = 0
    final: QueryResponse | None = None

    @property
    def remaining(self) -> int | None:
        if self.total is None:
            return None
        done = self.completed + self.failed + self.warning + self.remote_failed
        return max(self.total - done, 0)

    def add(self, result: SubOperation) -> None:
        self.delivered += 1
        if not result.stored:
            self.failed += 1
            self.failed_uids.append(result.sop_instance_uid)
        elif result.status in (0x0000,):
            self.completed += 1
        else:
            self.warning += 1

    def take(self, response: QueryResponse) -> None:
        counts = response.counts
        if counts is not None and counts.remaining is not None:
            self.total = counts.remaining + counts.completed + counts.failed + counts.warning
        if response.final:
            self.final = response
            self.expected = int(response.detail.get("transfers", 0))
            if counts is not None:
                self.remote_failed = counts.failed
            self.failed_uids.extend(response.failed_sop_instance_uids)

    @property
    def finished(self) -> bool:
        return (
            self.final is not None
            and self.expected is not None
            and (self.delivered >= self.expected)
        )


class RetrieveHandler:
    """C-MOVE for every route AE title; set as ``ae.dicombridge_retrieve`` on the SCP's AE."""

    def __init__(self, bridge: RetrieveBridge) -> None:
        self._bridge = bridge
        self._message_id = 0  # of C-GET sub-operations (one association at a time each)

    def move(self, service: QueryRetrieveServiceClass, req: C_MOVE, context: Any) -> None:
        """Answer one C-MOVE on ``service``'s association (its thread); never raises."""
        self._answer(service, req, context, "move")

    def get(self, service: QueryRetrieveServiceClass, req: C_GET, context: Any) -> None:
        """Answer one C-GET, its instances sent on the same association; never raises."""
        self._answer(service, req, context, "get")

    def _answer(
        self, service: QueryRetrieveServiceClass, req: C_MOVE | C_GET, context: Any, operation: str
    ) -> None:
        responder = _Responses(service, req, context)
        try:
            self._retrieve(service, req, context, responder, operation)
        except Exception as exc:
            LOGGER.error("C-%s failed in the gateway: %s", operation.upper(), type(exc).__name__)
            responder.final(0xC000, _Tally(), comment="gateway error")

    def _retrieve(
        self,
        service: QueryRetrieveServiceClass,
        req: C_MOVE | C_GET,
        context: Any,
        out: _Responses,
        operation: str,
    ) -> None:
        assoc = service.assoc
        called = str(assoc.acceptor.ae_title).strip()
        calling = str(assoc.requestor.ae_title).strip()
        models = MOVE_MODELS if operation == "move" else GET_MODELS
        model = models.get(str(context.abstract_syntax))
        if model is None:
            out.final(0x0122, _Tally(), comment="SOP class not supported")
            return
        node = None
        accepted: tuple[tuple[str, str], ...] = ()
        if isinstance(req, C_MOVE):
            destination = str(req.MoveDestination or "").strip()
            node = self._bridge.local_node(destination)
            if node is None:
                LOGGER.warning("C-MOVE to unknown destination %r refused", destination)
                out.final(
                    STATUS_MOVE_DESTINATION_UNKNOWN, _Tally(), comment="move destination unknown"
                )
                return
        else:
            # Where this association can carry C-STOREs back to the requester.
            accepted = tuple(
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
                if cx.as_scu and is_storage_like(str(cx.abstract_syntax))
            )
        try:
            identifier = parse_identifier(req.Identifier, str(context.transfer_syntax[0]))
        except ValueError as exc:
            out.final(STATUS_IDENTIFIER_DOES_NOT_MATCH, _Tally(), comment=str(exc))
            return
        request = ScpRequest(
            "move" if node is not None else "get",
            called,
            calling,
            model,
            identifier,
            accepted=accepted,
            destination=None if node is None else node.name,
            message_id=int(req.MessageID or 0),
        )
        session: QuerySession = self._run(self._bridge.start(request))
        try:
            self._follow(service, req, session, out)
        finally:
            self._bridge.close(session)

    def _follow(
        self,
        service: QueryRetrieveServiceClass,
        req: C_MOVE | C_GET,
        session: QuerySession,
        out: _Responses,
    ) -> None:
        tally = _Tally()
        waited_s = 0.0
        site = session.to_site or "the remote site"
        while not tally.finished:
            if service.is_cancelled(int(req.MessageID or 0)):
                self._run(self._bridge.cancel(session, reason="C-CANCEL from the requester"))
                out.final(STATUS_CANCEL, tally)
                return
            item = session.next(_POLL_S)
            if item is None:
                waited_s += _POLL_S
                if waited_s >= session.timeout_s:
                    self._run(self._bridge.cancel(session, reason="timed out"))
                    comment = f"{site} did not answer within {session.timeout_s:.0f} s"
                    out.final(_final_status(tally, timed_out=True), tally, comment=comment)
                    return
                continue
            waited_s = 0.0
            if isinstance(item, Retrieved):
                item = self._send_back(service, item, session)
            if isinstance(item, SubOperation):
                tally.add(item)
                if not tally.finished:
                    out.pending(tally)
                continue
            tally.take(item)
            if item.final and item.status not in _NOT_FAILURES and not tally.expected:
                # Refused or failed at the remote site before any instance was sent.
                out.final(item.status, tally, comment=item.error_comment)
                return
        out.final(_final_status(tally), tally)

    def _send_back(
        self, service: QueryRetrieveServiceClass, retrieved: Retrieved, session: QuerySession
    ) -> SubOperation:
        """C-STORE a C-GET instance on the requester's association, from its file."""
        incoming = retrieved.incoming
        uid = str(incoming.meta.get("sop_instance_uid", ""))
        self._message_id = self._message_id % 0xFFFF + 1
        status = 0x0122
        comment: str | None = "no accepted presentation context for this instance"
        try:
            response = _store_on(service.assoc, incoming, self._message_id)
            if response is not None:
                status = int(getattr(response, "Status", 0xC000))
                comment = None
            else:
                LOGGER.warning(
                    "C-GET %s: instance %s not sent: no accepted context", session.query_id, uid
                )
        except Exception as exc:
            LOGGER.warning(
                "C-GET %s: instance %s not sent: %s", session.query_id, uid, type(exc).__name__
            )
            status, comment = 0xC000, "C-STORE sub-operation failed"
        stored = status == 0x0000 or 0xB000 <= status <= 0xBFFF
        self._run(self._bridge.finished(incoming, status, stored=stored, comment=comment))
        return SubOperation(uid, status, stored)

    def _run(self, coroutine: Any) -> Any:
        return run_on_loop(self._bridge, coroutine)


def _uncompressed(transfer_syntax: str) -> bool:
    return transfer_syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


def _store_on(assoc: Any, incoming: Any, message_id: int) -> Dataset | None:
    """Send ``incoming`` on ``assoc``; None if no accepted context can carry it.

    From the file, bytes as received (chunked, never decoded), when a context accepted its
    SOP class in its transfer syntax. Otherwise, for an uncompressed instance of at most
    ``MAX_CONVERTED_BYTES`` and an uncompressed context for its SOP class, pynetdicom
    converts it (decoded in memory: bounded by that size).
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # a process-wide switch; scu.py sets it too
    path = incoming.path
    sop_class = str(incoming.meta.get("sop_class_uid", ""))
    syntax = str(incoming.meta.get("transfer_syntax_uid", ""))
    contexts = [
        cx for cx in assoc.accepted_contexts if cx.as_scu and str(cx.abstract_syntax) == sop_class
    ]
    if any(str(cx.transfer_syntax[0]) == syntax for cx in contexts):
        result: Dataset = assoc.send_c_store(path, msg_id=message_id)
        return result
    convertible = _uncompressed(syntax) and any(
        _uncompressed(str(cx.transfer_syntax[0])) for cx in contexts
    )
    if not convertible or path.stat().st_size > MAX_CONVERTED_BYTES:
        return None
    dataset = dcmread(path)
    converted: Dataset = assoc.send_c_store(dataset, msg_id=message_id)
    return converted


def _final_status(tally: _Tally, *, timed_out: bool = False) -> int:
    final = tally.final
    if final is not None and final.status == STATUS_CANCEL:
        return STATUS_CANCEL
    failed = tally.failed + tally.remote_failed + ((tally.remaining or 0) if timed_out else 0)
    if timed_out and tally.remaining is None:
        failed += 1  # nothing is known of what did not come: not a success
    done = tally.completed + tally.warning
    if failed == 0 and tally.warning == 0:
        return STATUS_SUCCESS
    if done == 0:
        return STATUS_SUB_OPERATIONS_FAILED
    return STATUS_WARNING


class _Responses:
    """Sends C-MOVE responses on the association (PS3.4 C.4.2.1.4, PS3.7 9.1.4)."""

    def __init__(
        self, service: QueryRetrieveServiceClass, req: C_MOVE | C_GET, context: Any
    ) -> None:
        self._service = service
        self._req = req
        self._context_id = cast(int, context.context_id)
        syntax = UID(str(context.transfer_syntax[0]))
        self._implicit = syntax.is_implicit_VR
        self._little = syntax.is_little_endian
        self.sent_final = False

    def _response(self, status: int, tally: _Tally, *, remaining: bool) -> C_MOVE | C_GET:
        rsp = C_MOVE() if isinstance(self._req, C_MOVE) else C_GET()
        rsp.MessageIDBeingRespondedTo = self._req.MessageID
        rsp.AffectedSOPClassUID = self._req.AffectedSOPClassUID
        rsp.Status = status
        if remaining and tally.remaining is not None:
            rsp.NumberOfRemainingSuboperations = tally.remaining
        rsp.NumberOfCompletedSuboperations = tally.completed
        rsp.NumberOfFailedSuboperations = tally.failed + tally.remote_failed
        rsp.NumberOfWarningSuboperations = tally.warning
        return rsp

    def pending(self, tally: _Tally) -> None:
        self._service.dimse.send_msg(
            self._response(STATUS_PENDING, tally, remaining=True), self._context_id
        )

    def final(self, status: int, tally: _Tally, *, comment: str | None = None) -> None:
        if self.sent_final or not self._service.assoc.is_established:
            return
        self.sent_final = True
        rsp = self._response(status, tally, remaining=status == STATUS_CANCEL)
        if comment and status not in (STATUS_SUCCESS, STATUS_PENDING):
            rsp.ErrorComment = comment[:ERROR_COMMENT_LENGTH]  # type: ignore[assignment]
        if status != STATUS_SUCCESS and tally.failed_uids:
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = tally.failed_uids
            encoded = encode(identifier, self._implicit, self._little)
            rsp.Identifier = io.BytesIO(encoded or b"")
        self._service.dimse.send_msg(rsp, self._context_id)
        LOGGER.info(
            "C-%s answered: status 0x%04X, %d completed, %d failed, %d warning",
            "MOVE" if isinstance(self._req, C_MOVE) else "GET",
            status,
            tally.completed,
            tally.failed + tally.remote_failed,
            tally.warning,
        )


class RelayedRetrieveService(QueryRetrieveServiceClass):
    """pynetdicom's Query/Retrieve service class, with C-MOVE answered by a
    ``RetrieveHandler`` when the association's AE carries one."""

    def _move_scp(self, req: C_MOVE, context: Any) -> None:
        handler = getattr(self.assoc.ae, "dicombridge_retrieve", None)
        if not isinstance(handler, RetrieveHandler):
            super()._move_scp(req, context)
            return
        handler.move(self, req, context)

    def _get_scp(self, req: C_GET, context: Any) -> None:
        handler = getattr(self.assoc.ae, "dicombridge_retrieve", None)
        if not isinstance(handler, RetrieveHandler):
            super()._get_scp(req, context)
            return
        handler.get(self, req, context)
