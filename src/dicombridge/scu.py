"""C-STORE toward a node in this hospital (the PACS), one reused association per node.

``StoreSCU(node, calling_ae_title=...).store(path)`` sends the data set of a Part 10 file
exactly as it is in the file (pynetdicom's chunked send from a path: never decoded or
re-encoded) in the file's own transfer syntax, and returns a ``StoreOutcome``: the
peer's status and Error Comment, classified for the caller's retry or quarantine.

The association is kept open and reused; a new one is negotiated when the (SOP class,
transfer syntax) pair needed is not among the accepted presentation contexts, when the
peer released or aborted it, or after ``idle_timeout_s`` without use. Each presentation
context proposes exactly one transfer syntax (a chunked send needs an exact match), for
every SOP class and transfer syntax this SCU has sent so far, so a mixed study settles on
one association.

Status classification (PS3.4 B.2.3, PS3.7 C): success 0x0000; warning 0x0001, 0xBxxx
(0xB000, 0xB006, 0xB007: stored with a warning); transient 0xA7xx (out of resources),
0x0213 (resource limitation), 0x0210 (duplicate invocation), and anything where the peer
gave no status (association rejected-transient, aborted, network error, timeout);
permanent everything else, notably 0xA9xx, 0xCxxx, 0x0122 and a SOP class or transfer
syntax the peer did not accept. An unknown status is permanent: never masked as success.

Where the peer gave no status, ``StoreOutcome.status`` carries a stand-in code and
``from_peer`` is False; the stand-ins are ``STATUS_NO_ASSOCIATION`` (0xA700, transient),
``STATUS_NOT_ACCEPTED`` (0x0122, permanent), ``STATUS_REJECTED`` (0x0124, permanent) and
``STATUS_UNREADABLE_FILE`` (0xC000, permanent).

A node with ``tls = true`` is reached over DICOM TLS (``dicom_tls``: BCP 195 profiles,
its certificate and host name verified); unusable TLS files are a transient outcome
naming them, so that delivery retries once the operator fixed them.

Logs carry UIDs, statuses and sizes only: pynetdicom's identifier logging is switched off.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext
from types import TracebackType
from typing import Any, Final, Self

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicombridge.config import LocalNode
from dicombridge.dicom_tls import node_tls_args
from dicombridge.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "STATUS_NOT_ACCEPTED",
    "STATUS_NO_ASSOCIATION",
    "STATUS_REJECTED",
    "STATUS_UNREADABLE_FILE",
    "LocalNode",
    "OutcomeKind",
    "StoreOutcome",
    "StoreSCU",
    "classify_status",
]

STATUS_SUCCESS: Final = 0x0000
# Stand-ins when the peer gave no status (``StoreOutcome.from_peer`` is False).
STATUS_NO_ASSOCIATION: Final = 0xA700
STATUS_NOT_ACCEPTED: Final = 0x0122
STATUS_REJECTED: Final = 0x0124
STATUS_UNREADABLE_FILE: Final = 0xC000

# PS3.8 9.3.2: at most 128 presentation contexts (odd ids 1..255) per association.
MAX_PRESENTATION_CONTEXTS: Final = 128
MIN_PDU_BYTES: Final = 16 * 1024
MAX_PDU_BYTES: Final = 4 * 1024 * 1024
# A-ASSOCIATE-RJ result 2 is rejected-transient (PS3.8 9.3.4).
_REJECTED_TRANSIENT: Final = 0x02
# Study Root Query/Retrieve Information Model - FIND (PS3.4 C.4.1): asking the node
# whether it already holds an instance whose C-STORE response was lost.
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
# C-FIND pending statuses (PS3.4 C.4.1.1.4): a match follows.
_FIND_PENDING: Final = (0xFF00, 0xFF01)
# P-DATA primitives a C-STORE may queue ahead of the socket (each at most the peer's
# maximum PDU size): the bound on what a from-file send holds in memory.
MAX_QUEUED_PDUS: Final = 8


class OutcomeKind(enum.StrEnum):
    """How a C-STORE ended, for the caller's next step."""

    SUCCESS = "success"
    WARNING = "warning"  # stored, with a warning
    TRANSIENT = "transient"  # retry later
    PERMANENT = "permanent"  # quarantine


def classify_status(status: int) -> OutcomeKind:
    """Classify a C-STORE response status (PS3.4 B.2.3, PS3.7 C.4/C.5)."""
    if status == STATUS_SUCCESS:
        return OutcomeKind.SUCCESS
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return OutcomeKind.WARNING
    if 0xA700 <= status <= 0xA7FF or status in (0x0210, 0x0213):
        return OutcomeKind.TRANSIENT
    return OutcomeKind.PERMANENT


@dataclass(frozen=True)
class StoreOutcome:
    """The result of one C-STORE: status, Error Comment, classification.

    ``status`` is the peer's (0000,0900) when ``from_peer``, else a stand-in code (see
    the module docstring); ``error_comment`` is the peer's (0000,0902) or our reason.
    """

    status: int
    kind: OutcomeKind
    error_comment: str | None = None
    from_peer: bool = True
    sop_instance_uid: str | None = None
    bytes_sent: int = 0

    @property
    def is_stored(self) -> bool:
        """Success or warning: the peer stored the instance."""
        return self.kind in (OutcomeKind.SUCCESS, OutcomeKind.WARNING)

    @property
    def is_transient(self) -> bool:
        return self.kind is OutcomeKind.TRANSIENT

    @property
    def is_permanent(self) -> bool:
        return self.kind is OutcomeKind.PERMANENT

    @classmethod
    def from_status(
        cls, status: int, error_comment: str | None, *, sop_instance_uid: str | None = None
    ) -> StoreOutcome:
        return cls(
            status=status,
            kind=classify_status(status),
            error_comment=error_comment,
            sop_instance_uid=sop_instance_uid,
        )

    @classmethod
    def local(
        cls, status: int, kind: OutcomeKind, reason: str, *, sop_instance_uid: str | None = None
    ) -> StoreOutcome:
        """An outcome where the peer gave no status (stand-in code, our reason)."""
        return cls(
            status=status,
            kind=kind,
            error_comment=reason,
            from_peer=False,
            sop_instance_uid=sop_instance_uid,
        )


@dataclass(frozen=True)
class _FileInfo:
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax: UID
    dataset_bytes: int


def _read_file_meta(path: Path) -> _FileInfo:
    """The UIDs of a Part 10 file from its File Meta Information only (cheap)."""
    meta, offset = split_dataset(path)
    missing = [
        keyword
        for keyword in (
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
        )
        if keyword not in meta
    ]
    if missing:
        raise ValueError(f"file meta lacks {', '.join(missing)}")
    return _FileInfo(
        sop_class_uid=UID(meta.MediaStorageSOPClassUID),
        sop_instance_uid=UID(meta.MediaStorageSOPInstanceUID),
        transfer_syntax=UID(meta.TransferSyntaxUID),
        dataset_bytes=os.path.getsize(path) - offset,
    )


def _configure_pynetdicom() -> None:
    """Set pynetdicom's process-wide switches a from-file C-STORE depends on.

    ``STORE_SEND_CHUNKED_DATASET`` makes ``send_c_store(path)`` send the bytes after the
    file meta as they are instead of decoding and re-encoding them; it is a module global
    in pynetdicom, so it is set again before every send. Identifier logging is PHI.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


class _AssociationSocket(AssociationSocket):
    """pynetdicom's requestor socket with two changes (pynetdicom 3.0.4 is pinned):

    - TCP_NODELAY before connecting: the C-STORE command and small PDUs must not wait
      for the peer's delayed ACK (Nagle);
    - the socket is closed even when ``shutdown`` fails: after a refused connection
      pynetdicom's ``_shutdown_socket`` raises on ``shutdown`` and never closes it.
    """

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = super()._create_socket(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


class _AE(AE):
    """An AE whose associations use ``_AssociationSocket``."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = _AssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _bound_send_queue(dul: Any, *, max_queued: int = MAX_QUEUED_PDUS) -> None:
    """Make ``dul.send_pdu`` wait while ``max_queued`` primitives are waiting to be sent.

    pynetdicom's DIMSE layer cuts a from-file C-STORE into P-DATA primitives and puts
    them all on the DUL's unbounded ``to_provider_queue`` as fast as it reads the file;
    the DUL thread sends them as fast as the peer takes them. A slow peer (Orthanc takes
    a 1 GiB instance at its own pace) let ~300 MB of it pile up in memory. Here
    the sender waits for room instead, so TCP flow control reaches the file read. The
    wait re-checks every half second that the DUL thread still runs: after an abort
    nothing drains the queue, and the primitive is then queued unbounded as before.
    (pynetdicom 3.0.4: ``DULServiceProvider.send_pdu``, ``to_provider_queue``; every
    ``get`` of a ``queue.Queue`` notifies ``not_full`` even without a ``maxsize``.)
    """
    original = dul.send_pdu
    pending = dul.to_provider_queue

    def send_pdu(primitive: Any) -> None:
        with pending.not_full:
            while pending._qsize() >= max_queued and dul.is_alive() and not dul._kill_thread:
                pending.not_full.wait(timeout=0.5)
        original(primitive)

    dul.send_pdu = send_pdu


Pair = tuple[UID, UID]  # (SOP class, transfer syntax)


class StoreSCU:
    """C-STORE to one local node over one reused association; blocking, thread-safe.

    The gateway calls ``store`` through ``asyncio.to_thread``; a lock serialises calls,
    so one node sees one association from this SCU. ``close()`` releases it.

    ``max_pdu_bytes`` is the largest PDU we accept (16 KiB..4 MiB); what we send is cut
    to the peer's maximum. ``idle_timeout_s`` should stay below the peer's own idle
    timeout (Orthanc's ``DicomScpTimeout`` defaults to 30 s) so that we release first.
    ``sop_classes`` and ``transfer_syntaxes`` are proposed from the first association on
    (otherwise they are learnt from the files sent); ``associations_opened`` and
    ``instances_sent`` count for metrics and tests.
    """

    def __init__(
        self,
        node: LocalNode,
        *,
        calling_ae_title: str,
        max_pdu_bytes: int = 1024 * 1024,
        connection_timeout_s: float = 10.0,
        acse_timeout_s: float = 30.0,
        dimse_timeout_s: float = 120.0,
        network_timeout_s: float = 60.0,
        idle_timeout_s: float = 15.0,
        sop_classes: Sequence[str] = (),
        transfer_syntaxes: Sequence[str] = (),
    ) -> None:
        if not MIN_PDU_BYTES <= max_pdu_bytes <= MAX_PDU_BYTES:
            raise ValueError(f"max_pdu_bytes must be within [{MIN_PDU_BYTES}, {MAX_PDU_BYTES}]")
        self.node = node
        self.calling_ae_title = calling_ae_title
        self.max_pdu_bytes = max_pdu_bytes
        self.idle_timeout_s = idle_timeout_s
        self._ae = _AE(ae_title=calling_ae_title)
        self._ae.connection_timeout = connection_timeout_s
        self._ae.acse_timeout = acse_timeout_s
        self._ae.dimse_timeout = dimse_timeout_s
        self._ae.network_timeout = network_timeout_s
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._proposed: set[Pair] = set()
        self._accepted: set[Pair] = set()
        self._last_used = 0.0
        self._message_id = 0
        self._closed = False
        self._idle_timer: threading.Timer | None = None
        # SOP classes and transfer syntaxes seen (or expected, from the arguments), most
        # recent last: every combination is proposed, so a mixed study needs one
        # association once each pair has been seen.
        self._sop_classes: dict[UID, None] = {UID(sop): None for sop in sop_classes}
        self._transfer_syntaxes: dict[UID, None] = {UID(ts): None for ts in transfer_syntaxes}
        self.associations_opened = 0
        self.instances_sent = 0
        self._tls: tuple[SSLContext, str] | None = None
        _configure_pynetdicom()

    # --- public ---------------------------------------------------------------------

    def store(
        self,
        path: Path | str,
        *,
        move_originator_ae_title: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> StoreOutcome:
        """C-STORE the instance in ``path`` to the node; never raises for DICOM or
        network failures (they are outcomes). Raises ``RuntimeError`` once closed."""
        path = Path(path)
        try:
            info = _read_file_meta(path)
        except (OSError, ValueError, EOFError, InvalidDicomError) as exc:
            log.warning(
                "instance file unreadable; not sent",
                extra={"node": self.node.name, "error": type(exc).__name__},
            )
            return StoreOutcome.local(
                STATUS_UNREADABLE_FILE,
                OutcomeKind.PERMANENT,
                f"instance file is not a readable DICOM Part 10 file: {exc}",
            )
        with self._lock:
            if self._closed:
                raise RuntimeError(f"StoreSCU for {self.node.name} is closed")
            self._cancel_idle_timer()
            try:
                return self._store_locked(
                    path, info, move_originator_ae_title, move_originator_message_id
                )
            finally:
                self._last_used = time.monotonic()
                self._arm_idle_timer()

    def holds(self, path: Path | str) -> bool | None:
        """Does the node already hold the instance in ``path``? Blocking.

        Asked before sending again an instance whose C-STORE response never came (the
        gateway crashed, or the association broke, after the request went out): a
        C-FIND at IMAGE level (Study Root, with the study, series and instance UIDs, so
        that a strictly hierarchical PACS can answer too), on an association of its own.
        True or False as the node answers; None when it cannot say (no C-FIND there,
        refused, no answer), and the caller then stores again: at least once.
        """
        try:
            ident = dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
            )
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = ident.StudyInstanceUID
            query.SeriesInstanceUID = ident.SeriesInstanceUID
            query.SOPInstanceUID = uid = str(ident.SOPInstanceUID)
        except (OSError, ValueError, AttributeError, EOFError, InvalidDicomError):
            return None
        ae = _AE(ae_title=self.calling_ae_title)
        ae.add_requested_context(STUDY_ROOT_FIND)
        ae.connection_timeout = self._ae.connection_timeout
        ae.acse_timeout = self._ae.acse_timeout
        ae.dimse_timeout = self._ae.dimse_timeout
        ae.network_timeout = self._ae.network_timeout
        try:
            tls_args = self._tls_args()
        except ConfigError:
            return None
        assoc = ae.associate(
            self.node.host,
            self.node.port,
            ae_title=self.node.ae_title,
            max_pdu=self.max_pdu_bytes,
            tls_args=tls_args,
        )
        if not assoc.is_established:
            return None
        found = False
        try:
            for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
                code = _status_of(status)
                if code in _FIND_PENDING:
                    found = found or (
                        identifier is not None and identifier.get("SOPInstanceUID") == uid
                    )
                elif code == STATUS_SUCCESS:
                    return found
                else:
                    return None  # failed, cancelled or no answer: the node cannot say
            return None
        finally:
            if assoc.is_established:
                assoc.release()

    def close(self) -> None:
        """Release the association (if any); further ``store`` calls raise."""
        with self._lock:
            self._closed = True
            self._cancel_idle_timer()
            self._release()

    def release_if_idle(self) -> None:
        """Release the association if unused for ``idle_timeout_s`` (the timer calls it)."""
        # Never wait: a store in progress is not idle.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._assoc is not None and self._idle_for() >= self.idle_timeout_s:
                self._release()
        finally:
            self._lock.release()

    @property
    def is_associated(self) -> bool:
        assoc = self._assoc
        return assoc is not None and bool(assoc.is_established)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- association ----------------------------------------------------------------

    def _store_locked(
        self,
        path: Path,
        info: _FileInfo,
        originator_ae_title: str | None,
        originator_message_id: int | None,
    ) -> StoreOutcome:
        pair: Pair = (info.sop_class_uid, info.transfer_syntax)
        uid = str(info.sop_instance_uid)
        self._remember(pair)
        assoc = self._assoc
        if assoc is not None and (
            not assoc.is_established or self._idle_for() >= self.idle_timeout_s
        ):
            self._release()
            assoc = None
        if assoc is not None and pair not in self._accepted and pair not in self._proposed:
            # Needed context never proposed on this association: negotiate again.
            self._release()
            assoc = None
        if assoc is None:
            failure = self._associate(pair, uid)
            if failure is not None:
                return failure
            assoc = self._assoc
            assert assoc is not None
        if pair not in self._accepted:
            what = (
                "SOP class"
                if not any(sop == pair[0] for sop, _ in self._accepted)
                else "transfer syntax"
            )
            log.warning(
                "presentation context not accepted by local node",
                extra={
                    "node": self.node.name,
                    "sop_class_uid": str(pair[0]),
                    "transfer_syntax_uid": str(pair[1]),
                    "sop_instance_uid": uid,
                },
            )
            return StoreOutcome.local(
                STATUS_NOT_ACCEPTED,
                OutcomeKind.PERMANENT,
                f"{self.node.ae_title} did not accept the {what}: {pair[0].name} in {pair[1].name}",
                sop_instance_uid=uid,
            )
        return self._send(assoc, path, info, originator_ae_title, originator_message_id)

    def _associate(self, pair: Pair, uid: str) -> StoreOutcome | None:
        """Open an association proposing the needed pair first; None on success."""
        contexts, proposed = self._contexts(pair)
        try:
            tls_args = self._tls_args()
        except ConfigError as exc:
            log.warning("DICOM TLS toward local node unusable", extra={"node": self.node.name})
            return StoreOutcome.local(
                STATUS_NO_ASSOCIATION, OutcomeKind.TRANSIENT, str(exc), sop_instance_uid=uid
            )
        started = time.monotonic()
        assoc = self._ae.associate(
            self.node.host,
            self.node.port,
            contexts=contexts,
            ae_title=self.node.ae_title,
            max_pdu=self.max_pdu_bytes,
            tls_args=tls_args,
        )
        if assoc.is_established:
            _bound_send_queue(assoc.dul)
            self._assoc = assoc
            self._proposed = proposed
            self._accepted = {
                (UID(str(cx.abstract_syntax)), UID(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            self._message_id = 0
            self.associations_opened += 1
            log.info(
                "association with local node established",
                extra={
                    "node": self.node.name,
                    "contexts_proposed": len(proposed),
                    "contexts_accepted": len(self._accepted),
                    "peer_max_pdu_bytes": assoc.acceptor.maximum_length,
                    "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
                },
            )
            return None
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            result = getattr(primitive, "result", None)
            source = getattr(primitive, "result_source", None)
            diagnostic = getattr(primitive, "diagnostic", None)
            transient = result == _REJECTED_TRANSIENT
            log.warning(
                "association rejected by local node",
                extra={
                    "node": self.node.name,
                    "result": result,
                    "source": source,
                    "reason": diagnostic,
                },
            )
            return StoreOutcome.local(
                STATUS_NO_ASSOCIATION if transient else STATUS_REJECTED,
                OutcomeKind.TRANSIENT if transient else OutcomeKind.PERMANENT,
                f"{self.node.ae_title} at {self.node.host}:{self.node.port} rejected the "
                f"association ({'transient' if transient else 'permanent'}, "
                f"source {source}, reason {diagnostic})",
                sop_instance_uid=uid,
            )
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # The peer answered but accepted no context at all; pynetdicom then aborts.
            log.warning(
                "local node accepted no presentation context",
                extra={
                    "node": self.node.name,
                    "sop_class_uid": str(pair[0]),
                    "transfer_syntax_uid": str(pair[1]),
                    "sop_instance_uid": uid,
                },
            )
            return StoreOutcome.local(
                STATUS_NOT_ACCEPTED,
                OutcomeKind.PERMANENT,
                f"{self.node.ae_title} accepted none of the proposed presentation contexts, "
                f"including {pair[0].name} in {pair[1].name}",
                sop_instance_uid=uid,
            )
        log.warning(
            "no association with local node",
            extra={"node": self.node.name, "aborted": bool(assoc.is_aborted)},
        )
        return StoreOutcome.local(
            STATUS_NO_ASSOCIATION,
            OutcomeKind.TRANSIENT,
            f"no association with {self.node.ae_title} at {self.node.host}:{self.node.port} "
            "(connection refused, aborted or timed out)",
            sop_instance_uid=uid,
        )

    def _tls_args(self) -> tuple[SSLContext, str] | None:
        """``tls_args`` toward the node (None: plain DICOM); the context is built on first
        use and kept. Raises ``ConfigError`` when its certificate or CA files are unusable."""
        if self._tls is None and self.node.tls:
            self._tls = node_tls_args(self.node)
        return self._tls

    def _contexts(self, needed: Pair) -> tuple[list[PresentationContext], set[Pair]]:
        """One context per (SOP class, transfer syntax) seen, the needed pair first, most
        recently seen next, capped at 128 (PS3.8)."""
        pairs: list[Pair] = [needed]
        for sop_class in reversed(self._sop_classes):
            for transfer_syntax in reversed(self._transfer_syntaxes):
                if (sop_class, transfer_syntax) != needed:
                    pairs.append((sop_class, transfer_syntax))
        pairs = pairs[:MAX_PRESENTATION_CONTEXTS]
        contexts = [build_context(sop_class, [ts]) for sop_class, ts in pairs]
        return contexts, set(pairs)

    def _remember(self, pair: Pair) -> None:
        for seen, key in ((self._sop_classes, pair[0]), (self._transfer_syntaxes, pair[1])):
            seen.pop(key, None)
            seen[key] = None
            while len(seen) > MAX_PRESENTATION_CONTEXTS:
                del seen[next(iter(seen))]

    def _send(
        self,
        assoc: Association,
        path: Path,
        info: _FileInfo,
        originator_ae_title: str | None,
        originator_message_id: int | None,
    ) -> StoreOutcome:
        uid = str(info.sop_instance_uid)
        self._message_id = self._message_id % 0xFFFF + 1
        _configure_pynetdicom()
        started = time.monotonic()
        try:
            response: Dataset = assoc.send_c_store(
                path,
                msg_id=self._message_id,
                originator_aet=originator_ae_title,
                originator_id=originator_message_id,
            )
        except RuntimeError:
            # The peer released or aborted between our check and the send.
            self._release()
            return StoreOutcome.local(
                STATUS_NO_ASSOCIATION,
                OutcomeKind.TRANSIENT,
                f"association with {self.node.ae_title} ended before the C-STORE was sent",
                sop_instance_uid=uid,
            )
        except (OSError, AttributeError, ValueError) as exc:
            # The file vanished or its meta changed after we read it, or the context
            # bookkeeping disagrees with pynetdicom's: the association state is unknown.
            log.warning(
                "C-STORE not sent",
                extra={
                    "node": self.node.name,
                    "sop_instance_uid": uid,
                    "error": type(exc).__name__,
                },
            )
            self._release()
            return StoreOutcome.local(
                STATUS_UNREADABLE_FILE,
                OutcomeKind.PERMANENT,
                f"C-STORE could not be sent from the file: {exc}",
                sop_instance_uid=uid,
            )
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        status = _status_of(response)
        if status is None:
            # Aborted, timed out or an invalid response: pynetdicom has aborted the
            # association already; the instance may or may not be stored.
            self._release()
            log.warning(
                "no C-STORE response from local node",
                extra={"node": self.node.name, "sop_instance_uid": uid, "elapsed_ms": elapsed_ms},
            )
            return StoreOutcome.local(
                STATUS_NO_ASSOCIATION,
                OutcomeKind.TRANSIENT,
                f"no C-STORE response from {self.node.ae_title} (association aborted, "
                "network error or DIMSE timeout)",
                sop_instance_uid=uid,
            )
        self.instances_sent += 1
        comment = response.get("ErrorComment")
        outcome = StoreOutcome(
            status=status,
            kind=classify_status(status),
            error_comment=str(comment) if comment is not None else None,
            sop_instance_uid=uid,
            bytes_sent=info.dataset_bytes,
        )
        log.log(
            logging.INFO if outcome.is_stored else logging.WARNING,
            "C-STORE to local node",
            extra={
                "node": self.node.name,
                "sop_instance_uid": uid,
                "status": f"{status:#06x}",
                "outcome": outcome.kind.value,
                "bytes": info.dataset_bytes,
                "elapsed_ms": elapsed_ms,
            },
        )
        return outcome

    def _release(self) -> None:
        assoc, self._assoc = self._assoc, None
        self._proposed = set()
        self._accepted = set()
        if assoc is None:
            return
        if assoc.is_established:
            assoc.release()
        if assoc.is_alive():
            assoc.join(timeout=5)

    def _idle_for(self) -> float:
        return time.monotonic() - self._last_used

    def _arm_idle_timer(self) -> None:
        if self._assoc is None or self._closed:
            return
        timer = threading.Timer(self.idle_timeout_s, self.release_if_idle)
        timer.daemon = True
        timer.name = f"scu-idle-{self.node.name}"
        self._idle_timer = timer
        timer.start()

    def _cancel_idle_timer(self) -> None:
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()


def _status_of(response: Dataset | Any) -> int | None:
    """The (0000,0900) Status of a DIMSE response, or None if there was none."""
    if response is None or "Status" not in response:
        return None
    return int(response.Status)


class StoreSCUPool:
    """Up to ``size`` ``StoreSCU`` to one node, each over its own association: ``store``
    and ``holds`` take whichever is free (blocking, thread-safe).

    So that several deliveries to the node overlap: while the node stores one instance
    (Orthanc writes it and indexes it), the next is on its way. Each member opens its
    association on first use and releases it when idle, as a ``StoreSCU`` does.
    """

    def __init__(self, node: LocalNode, *, size: int, **settings: Any) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one StoreSCU")
        self.node = node
        self.members = [StoreSCU(node, **settings) for _ in range(size)]
        self._free: queue.SimpleQueue[StoreSCU] = queue.SimpleQueue()
        for member in self.members:
            self._free.put(member)

    @contextlib.contextmanager
    def _member(self) -> Iterator[StoreSCU]:
        member = self._free.get()
        try:
            yield member
        finally:
            self._free.put(member)

    def store(
        self,
        path: Path | str,
        *,
        move_originator_ae_title: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> StoreOutcome:
        with self._member() as member:
            return member.store(
                path,
                move_originator_ae_title=move_originator_ae_title,
                move_originator_message_id=move_originator_message_id,
            )

    def holds(self, path: Path | str) -> bool | None:
        with self._member() as member:
            return member.holds(path)

    def close(self) -> None:
        for member in self.members:
            member.close()

    @property
    def associations_opened(self) -> int:
        return sum(member.associations_opened for member in self.members)

    @property
    def instances_sent(self) -> int:
        return sum(member.instances_sent for member in self.members)
