"""C-FIND, C-MOVE and C-GET toward a node in this hospital (the PACS) on a remote site's
behalf.

``QuerySCU(node, calling_ae_title=...)`` is the Query/Retrieve SCU (PS3.4 C) a receiving
site's gateway runs toward its own PACS: ``find`` streams the matches of a C-FIND,
``move`` sends a C-MOVE whose destination is the gateway itself, ``get`` sends a C-GET
whose instances come back on its own association in the (SOP class, transfer syntax)
pairs given (the node may transcode to one of them, as Orthanc does), ``echo`` checks the
node. Every call is blocking (the gateway runs it with ``asyncio.to_thread``) and opens
an association of its own, so concurrent calls share nothing; the socket has TCP_NODELAY
(scu.py's requestor socket), and is DICOM TLS for a node with ``tls = true``
(``dicom_tls``).

Identifiers stay as raw as pydicom allows, so that Specific Character Set and the bytes
of non-ASCII values (ISO_IR 100, ISO_IR 192, ...) pass through unchanged:

- the request Identifier is given as an Explicit VR Little Endian data set (no file
  meta); it is read with ``read_dataset`` into raw elements whose values are never
  touched;
- each presentation context proposes one transfer syntax, Explicit VR Little Endian
  first and Implicit VR Little Endian second; pynetdicom uses the lowest accepted one, so
  when the node accepts Explicit VR Little Endian nothing is decoded or re-encoded either
  way. On Implicit VR Little Endian pydicom converts (VR lookup; text decoded and
  encoded again in the data set's own character set; a private element of a match
  becomes UN, its value bytes unchanged);
- each match reaches ``on_match`` as soon as its pending response arrives, encoded
  Explicit VR Little Endian with its Specific Character Set.

Cancel (PS3.7 9.3.2.3): pynetdicom's ``send_c_find``/``send_c_move``/``send_c_get`` block
while waiting for the next response, so a C-CANCEL cannot wait for the loop that reads
them. When ``cancelled`` is
given, a watcher thread waits on it and sends C-CANCEL the moment it is set, even while
the node is busy preparing its next response (the thread outlives the call by at most
``_WATCH_INTERVAL_S``); the call then reads on to the node's final response (0xFE00
Cancel normally). No match reaches ``on_match`` once ``cancelled`` is set. A node that
still sends matches ``dimse_timeout_s`` after the C-CANCEL is aborted.

``max_matches``: the first match beyond the cap is not delivered; C-CANCEL is sent and
the call returns the node's Cancel status (``from_peer`` True) with the Error Comment
"more than N matches", the caller having received exactly N.

Orthanc 1.10 prepares every C-FIND answer before it sends the first and then sends
them back to back, so a C-CANCEL usually reaches it after its final Success (it logs
"cannot handle command: 0xfff" and goes on): hence the next rule.

Outcomes are statuses, never exceptions: ``QueryOutcome.status`` is the node's final
status, passed through. A result is complete only if it is 0x0000: where matches were
dropped (capped or cancelled) but the node's final status was Success (it had sent all
before the C-CANCEL reached it), the outcome is 0xFE00 with ``from_peer`` False. Where
the node gave no status, ``from_peer`` is False and the status is a stand-in as in
scu.py: 0xA700 no association (refused, aborted, timed out, no final response), 0x0124
association rejected permanently, 0x0122 the information model not accepted, 0xA900 the
given Identifier is not a well-formed Explicit VR Little Endian data set. Error Comments
we write are at most 64 characters (LO). Only programming errors raise (a bad argument;
an exception from ``on_match`` or ``on_progress`` propagates, the association aborted).

Timeouts: TCP connect and association negotiation each within ``connect_timeout_s``;
each response within ``dimse_timeout_s`` of the one before.

Logs carry AE titles, SOP Class UIDs, statuses and counts, never an Identifier:
pynetdicom's identifier logging is switched off.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Final

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext, build_context, build_role

from dicombridge.config import LocalNode
from dicombridge.dicom_tls import node_tls_args
from dicombridge.errors import ConfigError
from dicombridge.scu import (
    _AE,
    MAX_PDU_BYTES,
    MIN_PDU_BYTES,
    STATUS_NO_ASSOCIATION,
    STATUS_NOT_ACCEPTED,
    STATUS_REJECTED,
)

log = logging.getLogger(__name__)

__all__ = [
    "STATUS_BAD_IDENTIFIER",
    "STATUS_CANCEL",
    "STATUS_NOT_ACCEPTED",
    "STATUS_NO_ASSOCIATION",
    "STATUS_REJECTED",
    "STATUS_SUCCESS",
    "Counts",
    "Model",
    "QueryOutcome",
    "QuerySCU",
]

STATUS_SUCCESS: Final = 0x0000
STATUS_CANCEL: Final = 0xFE00
# Stand-in (from_peer False): PS3.4 C.4.1.1.4 "Identifier does not match SOP Class".
STATUS_BAD_IDENTIFIER: Final = 0xA900
# PS3.4 C.4.1.1.4, C.4.2.1.5: Pending; 0xFF01 "optional keys not supported" (C-FIND).
_PENDING: Final = (0xFF00, 0xFF01)
# A-ASSOCIATE-RJ result 2 is rejected-transient (PS3.8 9.3.4).
_REJECTED_TRANSIENT: Final = 0x02
_ERROR_COMMENT_MAX: Final = 64  # (0000,0902) is LO
# How often an idle cancel watcher looks whether its call has ended (not a latency:
# it wakes at once when ``cancelled`` is set).
_WATCH_INTERVAL_S: Final = 0.2

VERIFICATION: Final = "1.2.840.10008.1.1"
# PS3.4 C.6.1.3, C.6.2.3 (Patient Root and Study Root Query/Retrieve Information Models).
_FIND: Final = {
    "patient": "1.2.840.10008.5.1.4.1.2.1.1",
    "study": "1.2.840.10008.5.1.4.1.2.2.1",
}
_MOVE: Final = {
    "patient": "1.2.840.10008.5.1.4.1.2.1.2",
    "study": "1.2.840.10008.5.1.4.1.2.2.2",
}
_GET: Final = {
    "patient": "1.2.840.10008.5.1.4.1.2.1.3",
    "study": "1.2.840.10008.5.1.4.1.2.2.3",
}
# An association proposes at most 128 presentation contexts (PS3.8 9.3.2.2: odd IDs
# 1..255); a C-GET's information model takes two (``_contexts``), its storage the rest.
_MAX_STORAGE_CONTEXTS: Final = 126


class Model(enum.StrEnum):
    """The Query/Retrieve Information Model, by its root."""

    PATIENT = "patient"  # Patient Root
    STUDY = "study"  # Study Root

    @property
    def find_sop_class_uid(self) -> str:
        return _FIND[self.value]

    @property
    def move_sop_class_uid(self) -> str:
        return _MOVE[self.value]

    @property
    def get_sop_class_uid(self) -> str:
        return _GET[self.value]


@dataclass(frozen=True)
class Counts:
    """Sub-operation counts of a C-MOVE or C-GET response (PS3.4 C.4.2.1.6, C.4.3.1.6)."""

    remaining: int | None
    completed: int
    failed: int
    warning: int


@dataclass(frozen=True)
class QueryOutcome:
    """How a C-ECHO, C-FIND or C-MOVE ended.

    ``status`` is the node's final (0000,0900) when ``from_peer``, else a stand-in (see
    the module docstring); ``error_comment`` is the node's (0000,0902) or our reason.
    ``counts`` and ``failed_sop_instance_uids`` (0008,0058) are a retrieve's final ones.
    """

    status: int
    error_comment: str | None
    from_peer: bool
    counts: Counts | None = None
    failed_sop_instance_uids: tuple[str, ...] = ()

    @property
    def is_success(self) -> bool:
        return self.status == STATUS_SUCCESS


def _local(status: int, reason: str) -> QueryOutcome:
    """An outcome where the node gave no status (stand-in code, our reason)."""
    return QueryOutcome(status=status, error_comment=reason[:_ERROR_COMMENT_MAX], from_peer=False)


def _configure_pynetdicom() -> None:
    """Identifiers are PHI: pynetdicom must not log them (a process-wide switch)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def _decode_identifier(identifier: bytes) -> Dataset | None:
    """The Identifier as raw elements (values never decoded), or None if it is not a
    well-formed Explicit VR Little Endian data set.

    pydicom reads leniently (a truncated value, implicit VR guessed), so the data set is
    encoded again and must give back the same bytes, less any group length elements
    (gggg,0000), which pydicom never writes: what is sent is then what was given.
    """
    try:
        dataset: Dataset = read_dataset(
            BytesIO(identifier), is_implicit_VR=False, is_little_endian=True
        )
        expected = bytearray(identifier)
        group_lengths = [
            element.value_tell
            for element in dataset.elements()
            if isinstance(element, RawDataElement)
            and element.tag.element == 0
            and element.tag.group > 6
        ]
        for value_tell in sorted(group_lengths, reverse=True):
            # An Explicit VR UL element: 8 bytes of header, 4 of value.
            del expected[value_tell - 8 : value_tell + 4]
        if not dataset or _encode_explicit_le(dataset) != expected:
            return None
    except Exception:  # pydicom raises many kinds on malformed input
        return None
    return dataset


def _encode_explicit_le(dataset: Dataset) -> bytes:
    """``dataset`` encoded Explicit VR Little Endian; raw elements read in that transfer
    syntax are written as they are."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _encode_match(match: Dataset | None) -> bytes | None:
    """A match identifier for ``on_match``, or None where pynetdicom could not decode it
    or pydicom cannot convert it (only possible from Implicit VR Little Endian)."""
    if match is None:
        return None
    try:
        return _encode_explicit_le(match)
    except Exception:  # pydicom raises many kinds on malformed input
        return None


def _status_of(response: Dataset | None) -> int | None:
    """The (0000,0900) Status of a response, or None where there was none."""
    if response is None or "Status" not in response:
        return None
    return int(response.Status)


def _comment_of(response: Dataset) -> str | None:
    comment = response.get("ErrorComment")
    return None if comment is None else str(comment)


def _counts_of(response: Dataset) -> Counts | None:
    keywords = (
        "NumberOfRemainingSuboperations",
        "NumberOfCompletedSuboperations",
        "NumberOfFailedSuboperations",
        "NumberOfWarningSuboperations",
    )
    values = [response.get(keyword) for keyword in keywords]
    if all(value is None for value in values):
        return None
    remaining, completed, failed, warning = values
    return Counts(
        remaining=None if remaining is None else int(remaining),
        completed=int(completed or 0),
        failed=int(failed or 0),
        warning=int(warning or 0),
    )


def _failed_uids_of(identifier: Dataset | None) -> tuple[str, ...]:
    """(0008,0058) Failed SOP Instance UID List of a final C-MOVE or C-GET response."""
    if identifier is None:
        return ()
    try:
        value = identifier.get("FailedSOPInstanceUIDList")
    except Exception:  # a malformed list from the node is no list
        return ()
    if not value:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(uid) for uid in value)


def _contexts(sop_class_uid: str) -> list[PresentationContext]:
    """Explicit VR Little Endian first (no re-encoding), Implicit VR Little Endian
    second (every node supports it, PS3.5 10.1): one transfer syntax per context."""
    return [
        build_context(sop_class_uid, [ExplicitVRLittleEndian]),
        build_context(sop_class_uid, [ImplicitVRLittleEndian]),
    ]


class _Canceller:
    """Sends at most one C-CANCEL for a request: when ``cancelled`` is set (a watcher
    thread waits on it) or when ``cancel()`` is called; never after ``close()``."""

    def __init__(
        self,
        assoc: Association,
        *,
        msg_id: int,
        sop_class_uid: str,
        cancelled: threading.Event | None,
        name: str,
    ) -> None:
        self._assoc = assoc
        self._msg_id = msg_id
        self._sop_class_uid = sop_class_uid
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._closed = False
        self.sent_at: float | None = None
        if cancelled is not None:
            threading.Thread(target=self._watch, name=name, daemon=True).start()

    def _watch(self) -> None:
        assert self._cancelled is not None
        while not self._closed:
            if self._cancelled.wait(_WATCH_INTERVAL_S):
                self.cancel()
                return

    def cancel(self) -> None:
        with self._lock:
            if self._closed or self.sent_at is not None:
                return
            self.sent_at = time.monotonic()
            try:
                self._assoc.send_c_cancel(self._msg_id, query_model=self._sop_class_uid)
            except (RuntimeError, ValueError):
                return  # the association ended meanwhile: the reader sees that
            log.info(
                "C-CANCEL sent to local node",
                extra={"sop_class_uid": self._sop_class_uid, "message_id": self._msg_id},
            )

    @property
    def sent(self) -> bool:
        return self.sent_at is not None

    def close(self) -> None:
        """No C-CANCEL after this; the watcher ends within ``_WATCH_INTERVAL_S``."""
        with self._lock:
            self._closed = True


class _FindReader:
    """The C-FIND side of an exchange: delivers matches, applies the cap and cancel."""

    what = "C-FIND"

    def __init__(
        self,
        on_match: Callable[[bytes], None],
        cancelled: threading.Event | None,
        max_matches: int | None,
        *,
        ignored_cancel_s: float,
    ) -> None:
        self._on_match = on_match
        self._cancelled = cancelled
        self._max_matches = max_matches
        self._ignored_cancel_s = ignored_cancel_s
        self.delivered = 0
        self.dropped = 0
        self.capped = False

    def pending(
        self, response: Dataset, match: Dataset | None, canceller: _Canceller
    ) -> QueryOutcome | None:
        """Deliver one match, or drop it once cancelled or capped; an outcome to end
        with (after aborting) if the node goes on long after the C-CANCEL."""
        if canceller.sent or (self._cancelled is not None and self._cancelled.is_set()):
            self.dropped += 1
            sent_at = canceller.sent_at
            if sent_at is not None and time.monotonic() - sent_at > self._ignored_cancel_s:
                return _local(STATUS_CANCEL, "node ignored C-CANCEL; aborted")
            return None
        if self._max_matches is not None and self.delivered >= self._max_matches:
            self.capped = True
            self.dropped += 1
            canceller.cancel()
            return None
        encoded = _encode_match(match)
        if encoded is None:
            # Not decodable or encodable: the result would be incomplete.
            log.warning("undeliverable C-FIND match from local node")
            self.dropped += 1
            canceller.cancel()
            return None
        self._on_match(encoded)
        self.delivered += 1
        return None

    def final(self, response: Dataset, status: int, identifier: Dataset | None) -> QueryOutcome:
        """The node's final status, passed through, except that an incomplete result is
        never Success (see the module docstring)."""
        if self.capped and status in (STATUS_SUCCESS, STATUS_CANCEL):
            return QueryOutcome(
                status=STATUS_CANCEL,
                error_comment=f"more than {self._max_matches} matches"[:_ERROR_COMMENT_MAX],
                from_peer=status == STATUS_CANCEL,
            )
        if self.dropped and status == STATUS_SUCCESS:
            return _local(STATUS_CANCEL, f"cancelled; {self.dropped} matches not delivered")
        return QueryOutcome(status=status, error_comment=_comment_of(response), from_peer=True)

    def log_extra(self) -> dict[str, Any]:
        return {"matches": self.delivered, "dropped": self.dropped}


class _MoveReader:
    """The C-MOVE or C-GET side of an exchange: reports progress, reads the final counts."""

    def __init__(
        self,
        on_progress: Callable[[Counts], None] | None,
        destination_ae: str | None,
        msg_id: int,
        *,
        what: str = "C-MOVE",
    ) -> None:
        self.what = what
        self._on_progress = on_progress
        self._destination_ae = destination_ae
        self._msg_id = msg_id
        self._counts: Counts | None = None

    def pending(
        self, response: Dataset, identifier: Dataset | None, canceller: _Canceller
    ) -> QueryOutcome | None:
        counts = _counts_of(response)
        if self._on_progress is not None and counts is not None:
            self._on_progress(counts)
        return None

    def final(self, response: Dataset, status: int, identifier: Dataset | None) -> QueryOutcome:
        self._counts = _counts_of(response)
        return QueryOutcome(
            status=status,
            error_comment=_comment_of(response),
            from_peer=True,
            counts=self._counts,
            failed_sop_instance_uids=_failed_uids_of(identifier),
        )

    def log_extra(self) -> dict[str, Any]:
        counts = self._counts
        return {
            "move_destination": self._destination_ae,
            "message_id": self._msg_id,
            "completed": counts.completed if counts else None,
            "failed": counts.failed if counts else None,
            "warning": counts.warning if counts else None,
        }


class QuerySCU:
    """C-ECHO, C-FIND, C-MOVE and C-GET to one local node; blocking, one association per
    call.

    ``maximum_pdu_size`` is the largest PDU we accept (16 KiB..4 MiB).
    """

    def __init__(
        self,
        node: LocalNode,
        *,
        calling_ae_title: str,
        connect_timeout_s: float = 10,
        dimse_timeout_s: float = 60,
        maximum_pdu_size: int = 1024 * 1024,
    ) -> None:
        if not MIN_PDU_BYTES <= maximum_pdu_size <= MAX_PDU_BYTES:
            raise ValueError(f"maximum_pdu_size must be within [{MIN_PDU_BYTES}, {MAX_PDU_BYTES}]")
        if connect_timeout_s <= 0 or dimse_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.node = node
        self.calling_ae_title = calling_ae_title
        self.connect_timeout_s = connect_timeout_s
        self.dimse_timeout_s = dimse_timeout_s
        self.maximum_pdu_size = maximum_pdu_size
        # Only read after setup: shared by the calls, each with its own association.
        self._ae = _AE(ae_title=calling_ae_title)
        self._ae.connection_timeout = connect_timeout_s
        self._ae.acse_timeout = connect_timeout_s
        self._ae.dimse_timeout = dimse_timeout_s
        # The DUL's idle limit: a node may be silent as long as between two responses.
        self._ae.network_timeout = dimse_timeout_s
        _configure_pynetdicom()

    # --- public ---------------------------------------------------------------------

    def echo(self, *, log_level: int = logging.INFO) -> QueryOutcome:
        """C-ECHO (PS3.7 9.1.5): whether the node answers at all. A periodic check logs
        its answers at ``logging.DEBUG`` (it logs changes itself)."""
        assoc = self._associate(VERIFICATION, "C-ECHO")
        if isinstance(assoc, QueryOutcome):
            return assoc
        response: Dataset | None = None
        try:
            response = assoc.send_c_echo(msg_id=1)
        except RuntimeError:
            pass  # the association ended before the request went out
        finally:
            _end(assoc)
        status = _status_of(response)
        if status is None:
            return self._no_response(assoc, "C-ECHO")
        assert response is not None
        log.log(
            log_level,
            "C-ECHO to local node",
            extra={**self._log_extra(), "status": f"{status:#06x}"},
        )
        return QueryOutcome(status=status, error_comment=_comment_of(response), from_peer=True)

    def find(
        self,
        model: Model,
        identifier: bytes,
        *,
        on_match: Callable[[bytes], None],
        cancelled: threading.Event | None = None,
        max_matches: int | None = None,
    ) -> QueryOutcome:
        """C-FIND ``identifier`` (Explicit VR Little Endian bytes) in ``model``; each
        match goes to ``on_match`` as it arrives, encoded the same way.

        An exception from ``on_match`` aborts the association and propagates.
        """
        if max_matches is not None and max_matches < 1:
            raise ValueError("max_matches must be at least 1")
        sop_class_uid = Model(model).find_sop_class_uid
        reader = _FindReader(
            on_match, cancelled, max_matches, ignored_cancel_s=self.dimse_timeout_s
        )
        return self._exchange(
            reader,
            sop_class_uid,
            identifier,
            msg_id=1,
            cancelled=cancelled,
            send=lambda assoc, request: assoc.send_c_find(request, sop_class_uid, msg_id=1),
        )

    def move(
        self,
        model: Model,
        identifier: bytes,
        *,
        destination_ae: str,
        on_progress: Callable[[Counts], None] | None = None,
        cancelled: threading.Event | None = None,
        message_id: int | None = None,
    ) -> QueryOutcome:
        """C-MOVE ``identifier`` (Explicit VR Little Endian bytes) in ``model`` to
        ``destination_ae`` (the gateway's own AE title, known to the node).

        ``message_id`` is the C-MOVE's Message ID, which the node's sub-operation
        C-STOREs carry as Move Originator Message ID (Orthanc 1.10 does); 1 if None.
        Pending responses' counts go to ``on_progress``; an exception from it aborts
        the association and propagates.
        """
        msg_id = 1 if message_id is None else message_id
        if not 0 <= msg_id <= 0xFFFF:
            raise ValueError("message_id must be within [0, 65535]")
        sop_class_uid = Model(model).move_sop_class_uid
        return self._exchange(
            _MoveReader(on_progress, destination_ae, msg_id),
            sop_class_uid,
            identifier,
            msg_id=msg_id,
            cancelled=cancelled,
            send=lambda assoc, request: assoc.send_c_move(
                request, destination_ae, sop_class_uid, msg_id=msg_id
            ),
        )

    def get(
        self,
        model: Model,
        identifier: bytes,
        *,
        storage: Sequence[tuple[str, str]],
        evt_handlers: Sequence[EventHandlerType],
        on_progress: Callable[[Counts], None] | None = None,
        cancelled: threading.Event | None = None,
        message_id: int | None = None,
    ) -> QueryOutcome:
        """C-GET ``identifier`` (Explicit VR Little Endian bytes) in ``model``.

        The association proposes the (SOP Class UID, Transfer Syntax UID) pairs of
        ``storage`` with this side as the Storage SCP (PS3.7 D.3.3.4): the node sends
        each instance in one of them, transcoding if it can, or counts it failed. Its
        C-STOREs go to the ``evt.EVT_C_STORE`` handler among ``evt_handlers`` (bound for
        the association's life), in the association's reader thread; the file a data
        set was received into (pynetdicom's chunked receiving) is closed and removed
        after it returns. Only the first ``_MAX_STORAGE_CONTEXTS`` SOP classes are
        proposed (logged when more are given).
        """
        msg_id = 1 if message_id is None else message_id
        if not 0 <= msg_id <= 0xFFFF:
            raise ValueError("message_id must be within [0, 65535]")
        sop_class_uid = Model(model).get_sop_class_uid
        return self._exchange(
            _MoveReader(on_progress, None, msg_id, what="C-GET"),
            sop_class_uid,
            identifier,
            msg_id=msg_id,
            cancelled=cancelled,
            send=lambda assoc, request: assoc.send_c_get(request, sop_class_uid, msg_id=msg_id),
            storage=storage,
            evt_handlers=[_removing_received_file(item) for item in evt_handlers],
        )

    # --- internals ------------------------------------------------------------------

    def _exchange(
        self,
        reader: _FindReader | _MoveReader,
        sop_class_uid: str,
        identifier: bytes,
        *,
        msg_id: int,
        cancelled: threading.Event | None,
        send: Callable[[Association, Dataset], Iterator[tuple[Dataset, Dataset | None]]],
        storage: Sequence[tuple[str, str]] = (),
        evt_handlers: Sequence[EventHandlerType] = (),
    ) -> QueryOutcome:
        """One request on an association of its own: read its responses to the final
        one, C-CANCEL when ``cancelled`` is set, release (or abort if left half-way)."""
        what = reader.what
        request = _decode_identifier(identifier)
        if request is None:
            return _local(STATUS_BAD_IDENTIFIER, "Identifier is not an Explicit VR LE data set")
        if cancelled is not None and cancelled.is_set():
            return _local(STATUS_CANCEL, f"cancelled before the {what} was sent")
        assoc = self._associate(sop_class_uid, what, storage=storage, evt_handlers=evt_handlers)
        if isinstance(assoc, QueryOutcome):
            return assoc
        canceller = _Canceller(
            assoc,
            msg_id=msg_id,
            sop_class_uid=sop_class_uid,
            cancelled=cancelled,
            name=f"qr-cancel-{self.node.name}",
        )
        started = time.monotonic()
        finished = False
        try:
            try:
                responses = send(assoc, request)
            except (RuntimeError, ValueError):
                return self._not_sent(assoc, what)
            for response, data in responses:
                status = _status_of(response)
                if status is None:
                    return self._no_response(assoc, what)
                if status in _PENDING:
                    stop = reader.pending(response, data, canceller)
                    if stop is not None:
                        assoc.abort()
                        return stop
                    continue
                finished = True
                outcome = reader.final(response, status, data)
                log.log(
                    logging.INFO if outcome.is_success else logging.WARNING,
                    "query/retrieve request to local node",
                    extra={
                        **self._log_extra(),
                        "op": what,
                        **reader.log_extra(),
                        "sop_class_uid": sop_class_uid,
                        "status": f"{outcome.status:#06x}",
                        "peer_status": f"{status:#06x}",
                        "cancel_sent": canceller.sent,
                        "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
                    },
                )
                return outcome
            return self._no_response(assoc, what)
        finally:
            canceller.close()
            _end(assoc, finished=finished)

    def _associate(
        self,
        sop_class_uid: str,
        what: str,
        *,
        storage: Sequence[tuple[str, str]] = (),
        evt_handlers: Sequence[EventHandlerType] = (),
    ) -> Association | QueryOutcome:
        """An association accepting ``sop_class_uid`` (and proposing ``storage`` with the
        SCP role), or the outcome saying why not."""
        _configure_pynetdicom()
        try:
            # Built per call: a QuerySCU lives for one request or check.
            tls_args = node_tls_args(self.node)
        except ConfigError as exc:
            log.warning("DICOM TLS toward local node unusable", extra=self._log_extra())
            return _local(STATUS_NO_ASSOCIATION, str(exc))
        started = time.monotonic()
        storage_contexts, roles = self._storage_contexts(storage)
        assoc = self._ae.associate(
            self.node.host,
            self.node.port,
            contexts=[*_contexts(sop_class_uid), *storage_contexts],
            ae_title=self.node.ae_title,
            max_pdu=self.maximum_pdu_size,
            ext_neg=roles or None,
            evt_handlers=list(evt_handlers) or None,
            tls_args=tls_args,
        )
        if assoc.is_established:
            if not any(cx.abstract_syntax == sop_class_uid for cx in assoc.accepted_contexts):
                _end(assoc)
                log.warning(
                    "local node did not accept the SOP class",
                    extra={**self._log_extra(), "sop_class_uid": sop_class_uid},
                )
                return _local(
                    STATUS_NOT_ACCEPTED, f"{self.node.ae_title} does not support this {what}"
                )
            log.debug(
                "association with local node established",
                extra={
                    **self._log_extra(),
                    "sop_class_uid": sop_class_uid,
                    "transfer_syntax_uid": str(
                        next(
                            cx.transfer_syntax[0]
                            for cx in assoc.accepted_contexts
                            if cx.abstract_syntax == sop_class_uid
                        )
                    ),
                    "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
                },
            )
            return assoc
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            result = getattr(primitive, "result", None)
            source = getattr(primitive, "result_source", None)
            diagnostic = getattr(primitive, "diagnostic", None)
            transient = result == _REJECTED_TRANSIENT
            log.warning(
                "association rejected by local node",
                extra={
                    **self._log_extra(),
                    "result": result,
                    "source": source,
                    "reason": diagnostic,
                },
            )
            return _local(
                STATUS_NO_ASSOCIATION if transient else STATUS_REJECTED,
                f"{self.node.ae_title} rejected the association "
                f"({'transient' if transient else 'permanent'}, reason {diagnostic})",
            )
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            log.warning(
                "local node accepted no presentation context",
                extra={**self._log_extra(), "sop_class_uid": sop_class_uid},
            )
            return _local(STATUS_NOT_ACCEPTED, f"{self.node.ae_title} does not support this {what}")
        log.warning(
            "no association with local node",
            extra={
                **self._log_extra(),
                "aborted": bool(assoc.is_aborted),
                "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        return _local(
            STATUS_NO_ASSOCIATION,
            f"no association with {self.node.ae_title} (refused or timed out)",
        )

    def _storage_contexts(
        self, storage: Sequence[tuple[str, str]]
    ) -> tuple[list[PresentationContext], list[Any]]:
        """One context per SOP class with its transfer syntaxes in the order given, and a
        role selection making this side its SCP."""
        by_class: dict[str, list[str]] = {}
        for sop_class_uid, transfer_syntax in storage:
            syntaxes = by_class.setdefault(sop_class_uid, [])
            if transfer_syntax not in syntaxes:
                syntaxes.append(transfer_syntax)
        if len(by_class) > _MAX_STORAGE_CONTEXTS:
            log.warning(
                "C-GET storage SOP classes beyond the association's limit not proposed",
                extra={
                    **self._log_extra(),
                    "given": len(by_class),
                    "proposed": _MAX_STORAGE_CONTEXTS,
                },
            )
        chosen = list(by_class.items())[:_MAX_STORAGE_CONTEXTS]
        contexts = [build_context(uid, syntaxes) for uid, syntaxes in chosen]
        # list[Any]: ``associate`` takes a list of pynetdicom's private union of items.
        roles: list[Any] = [build_role(uid, scp_role=True) for uid, _ in chosen]
        return contexts, roles

    def _no_response(self, assoc: Association, what: str) -> QueryOutcome:
        """No final response: the node aborted (Orthanc does so for a C-FIND or C-MOVE
        from a caller it does not know), the connection broke, or ``dimse_timeout_s``
        passed (pynetdicom then aborts)."""
        log.warning(
            "no final response from local node",
            extra={**self._log_extra(), "op": what, "aborted": bool(assoc.is_aborted)},
        )
        return _local(
            STATUS_NO_ASSOCIATION,
            f"no {what} response from {self.node.ae_title}: aborted or timed out",
        )

    def _not_sent(self, assoc: Association, what: str) -> QueryOutcome:
        """The request could not be encoded for the negotiated transfer syntax, or the
        association ended before it was sent."""
        if assoc.is_established:
            log.warning("request not sent to local node", extra={**self._log_extra(), "op": what})
            return _local(STATUS_BAD_IDENTIFIER, f"Identifier could not be encoded for {what}")
        return _local(STATUS_NO_ASSOCIATION, f"association ended before the {what} was sent")

    def _log_extra(self) -> dict[str, Any]:
        return {
            "node": self.node.name,
            "called_ae_title": self.node.ae_title,
            "calling_ae_title": self.calling_ae_title,
        }


def _removing_received_file(item: EventHandlerType) -> EventHandlerType:
    """An ``evt.EVT_C_STORE`` handler made to close and remove, once it returns, the file
    the C-STORE's data set was received into: pynetdicom 3.0.4 does so after the handler
    on an SCP's associations only, not for the C-STOREs a C-GET SCU receives (the file
    and its open handle would be left). Other handlers are returned as they are."""
    if item[0] is not evt.EVT_C_STORE:
        return item
    handler = item[1]

    def on_c_store(event: evt.Event, *args: Any) -> Any:
        try:
            return handler(event, *args)
        finally:
            received = getattr(event.request, "_dataset_file", None)
            if received is not None:
                received.close()
                with contextlib.suppress(OSError):
                    os.unlink(received.name)

    return (evt.EVT_C_STORE, on_c_store, *item[2:])


def _end(assoc: Association, *, finished: bool = True) -> None:
    """Release an association that is still up, or abort it if its exchange was left
    half-way (no final response read), and wait for its thread."""
    if assoc.is_established:
        if finished:
            assoc.release()
        else:
            assoc.abort()
    if assoc.is_alive():
        assoc.join(timeout=5)
