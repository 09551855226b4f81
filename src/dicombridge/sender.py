"""Send DICOM files through a gateway as a C-STORE SCU (``dicombridge send``).

``collect(paths)`` finds the files (directories walked recursively, in name order) and
reads each one's File Meta Information only: SOP Class UID, SOP Instance UID and
Transfer Syntax. A file that is not DICOM Part 10 (no ``DICM`` prefix, no transfer
syntax, a DICOMDIR) is skipped with its reason, never fatal.

``Sender(peer).send(collected)`` sends them in order over as few associations as PS3.8 allows:
one presentation context per (SOP class, transfer syntax) pair, since the data set goes
out exactly as it is in the file (pynetdicom's chunked send from a path: never decoded
or re-encoded, so the context must match the file's own syntax), and at most 128
contexts per association (PS3.8 9.3.2.2); more pairs open the next association after the
first is released. Outcomes at the DICOM boundary are statuses, not exceptions: each
instance's is in the ``SendReport``. Only a first association that cannot be
established raises (``ConfigError``: it names the AE title or host:port and the fix); a
later one that fails marks the instances left as failed with the reason.

Nothing here prints; logs carry UIDs, statuses and sizes only.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.transport import AddressInformation

from dicombridge.errors import ConfigError
from dicombridge.scu import (
    _AE,
    MAX_PRESENTATION_CONTEXTS,
    OutcomeKind,
    _AssociationSocket,
    _bound_send_queue,
    _configure_pynetdicom,
    classify_status,
)

log = logging.getLogger(__name__)

# Who we are toward the gateway unless told otherwise: says in the gateway's logs and
# audit trail that the command line sent it (16 characters, the most PS3.5 allows).
DEFAULT_CALLING_AE_TITLE: Final = "DICOMBRIDGE_SEND"
DEFAULT_PORT: Final = 11112
# Media Storage Directory Storage: a DICOMDIR indexes files, it is no instance to store.
MEDIA_STORAGE_DIRECTORY: Final = "1.2.840.10008.1.3.10"
# A-ASSOCIATE-RJ result source and diagnostic (PS3.8 Table 9-21).
_SERVICE_USER: Final = 1
_SERVICE_PROVIDER_PRESENTATION: Final = 3
_CALLING_AE_NOT_RECOGNIZED: Final = 3
_CALLED_AE_NOT_RECOGNIZED: Final = 7
_REJECTED_TRANSIENT: Final = 2
# P-DATA message control header, bit 0: 1 for a command fragment, 0 for data (PS3.8 E.2).
_COMMAND_FRAGMENT: Final = 0x01

Pair = tuple[str, str]  # (SOP class, transfer syntax)


# --- the files ------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomFile:
    """A Part 10 file to send, described by its File Meta Information."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_bytes: int  # what goes on the wire: the file after its meta

    @property
    def pair(self) -> Pair:
        return (self.sop_class_uid, self.transfer_syntax)


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not sent, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Collected:
    files: list[DicomFile]
    skipped: list[SkippedFile]


def collect(paths: Iterable[Path]) -> Collected:
    """The DICOM files under ``paths`` in order (directories walked recursively, entries
    sorted by name, symbolic links to directories not followed), each file once; the
    others skipped with their reason. A path that does not exist is a ``ConfigError``."""
    files: list[DicomFile] = []
    skipped: list[SkippedFile] = []
    seen: set[Path] = set()
    for path in _walk(paths):
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        found = read_file(path)
        if isinstance(found, DicomFile):
            files.append(found)
        else:
            skipped.append(found)
    return Collected(files, skipped)


def _walk(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            for directory, subdirectories, names in os.walk(path):
                subdirectories.sort()
                for name in sorted(names):
                    yield Path(directory) / name
        elif path.exists():
            yield path
        else:
            raise ConfigError(
                path, "PATH", "no such file or directory", "check the path (files or directories)"
            )


def read_file(path: Path) -> DicomFile | SkippedFile:
    """Describe ``path`` from its File Meta Information, or say why it cannot be sent."""
    try:
        meta, offset = split_dataset(path)
        size = path.stat().st_size
    except OSError as exc:
        return SkippedFile(path, f"unreadable: {exc.strerror or exc}")
    except Exception:  # pydicom raises many kinds of error on arbitrary bytes
        return SkippedFile(path, "not a DICOM Part 10 file")
    required = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    missing = [keyword for keyword in required if not meta.get(keyword)]
    if len(missing) == len(required):
        return SkippedFile(path, "not a DICOM Part 10 file")
    if missing:
        return SkippedFile(path, "file meta lacks " + ", ".join(missing))
    sop_class_uid = str(meta.MediaStorageSOPClassUID)
    if sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        return SkippedFile(path, "a DICOMDIR (an index of files), not an instance")
    return DicomFile(
        path=path,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax=str(meta.TransferSyntaxUID),
        dataset_bytes=size - offset,
    )


def plan_associations(
    files: Sequence[DicomFile], *, max_contexts: int = MAX_PRESENTATION_CONTEXTS
) -> list[list[DicomFile]]:
    """Cut ``files`` (in their order) into runs of at most ``max_contexts`` distinct
    (SOP class, transfer syntax) pairs: one association each."""
    batches: list[list[DicomFile]] = []
    pairs: set[Pair] = set()
    for item in files:
        if not batches or (item.pair not in pairs and len(pairs) == max_contexts):
            batches.append([])
            pairs = set()
        pairs.add(item.pair)
        batches[-1].append(item)
    return batches


# --- outcomes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The gateway (or any Storage SCP) and the AE titles of the association."""

    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = DEFAULT_CALLING_AE_TITLE

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Outcome(enum.StrEnum):
    """How a C-STORE ended, for the one who sent it."""

    SUCCESS = "success"
    WARNING = "warning"  # stored, with a warning
    FAILED = "failed"  # not stored: the peer's failure status, or no status at all

    @classmethod
    def of(cls, status: int) -> Outcome:
        kind = classify_status(status)  # the gateway's own classification (scu.py)
        if kind is OutcomeKind.SUCCESS:
            return cls.SUCCESS
        return cls.WARNING if kind is OutcomeKind.WARNING else cls.FAILED


@dataclass(frozen=True)
class InstanceResult:
    """How one instance's C-STORE ended.

    ``status`` is the peer's (0000,0900), or None when the peer gave none (no context
    for it, association aborted, no response); ``error_comment`` is the peer's
    (0000,0902) or, without a status, our reason.
    """

    file: DicomFile
    outcome: Outcome
    status: int | None
    error_comment: str | None = None

    @property
    def status_text(self) -> str:
        """``0xA700`` style, or ``none`` when the peer gave no status."""
        return "none" if self.status is None else f"0x{self.status:04X}"


def status_meaning(status: int | None) -> str:
    """The standard's words for a C-STORE status (PS3.4 B.2.3, PS3.7 C, as pynetdicom
    tabulates them, ranges included), or a plain phrase."""
    if status is None:
        return "no status from the peer"
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("unknown status", ""))
    return meaning or category


@dataclass
class SendReport:
    """What ``send`` did: each instance's result, the files skipped, the time taken."""

    peer: Peer
    results: list[InstanceResult] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    elapsed_s: float = 0.0
    associations: int = 0

    @property
    def succeeded(self) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome is Outcome.SUCCESS]

    @property
    def warnings(self) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome is Outcome.WARNING]

    @property
    def failed(self) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome is Outcome.FAILED]

    @property
    def bytes_sent(self) -> int:
        """Data set bytes the peer answered for (stored, or refused with a status)."""
        return sum(r.file.dataset_bytes for r in self.results if r.status is not None)

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes_sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The report as JSON-ready data (``dicombridge send --json``)."""

        def entry(result: InstanceResult) -> dict[str, Any]:
            return {
                "path": str(result.file.path),
                "sop_instance_uid": result.file.sop_instance_uid,
                "status": None if result.status is None else result.status_text,
                "meaning": status_meaning(result.status),
                "error_comment": result.error_comment,
            }

        return {
            "called_ae_title": self.peer.called_ae_title,
            "calling_ae_title": self.peer.calling_ae_title,
            "host": self.peer.host,
            "port": self.peer.port,
            "instances": len(self.results),
            "succeeded": len(self.succeeded),
            "warnings": len(self.warnings),
            "failed": len(self.failed),
            "skipped": len(self.skipped),
            "warnings_by_status": _count_by_status(self.warnings),
            "failed_by_status": _count_by_status(self.failed),
            "warning_instances": [entry(r) for r in self.warnings],
            "failed_instances": [entry(r) for r in self.failed],
            "skipped_files": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "bytes": self.bytes_sent,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_bytes_per_s": round(self.rate_bytes_per_s, 1),
            "associations": self.associations,
        }


def _count_by_status(results: Iterable[InstanceResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status_text] = counts.get(result.status_text, 0) + 1
    return counts


# --- the association ------------------------------------------------------------------


class _RecordingSocket(socket.socket):
    """A socket that keeps the error of its ``connect``."""

    connect_error: OSError | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.connect_error = exc
            raise


class _SenderSocket(_AssociationSocket):
    """The SCU's association socket (TCP_NODELAY, closed even if shutdown fails) that
    remembers why the TCP connection failed: pynetdicom logs and swallows the error, and
    the operator must hear "connection refused", not "no association".

    ``_create_socket`` takes the same steps as pynetdicom 3.0.4's (SO_REUSEADDR, the
    network timeout, bind) with a ``_RecordingSocket``; ``connect`` drops the socket
    when it fails, so the error is kept here.
    """

    connect_error: OSError | None = None

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = _RecordingSocket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.assoc.network_timeout is not None:
            sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        self._is_connected = False
        return sock

    def connect(self, primitive: Any) -> None:
        sock = self.socket
        super().connect(primitive)
        self.connect_error = getattr(sock, "connect_error", None)


class _SenderAE(_AE):
    """An AE whose associations use ``_SenderSocket``."""

    def _create_socket(self, assoc: Association, address: AddressInformation, tls_args: Any) -> Any:
        sock = _SenderSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


class _NoAssociation(Exception):
    """An association could not be established; ``problem`` and ``fix`` say why."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.fix = fix


def _count_sent_bytes(dul: Any, on_bytes: Callable[[int], None]) -> None:
    """Report the data set bytes of each P-DATA as it is queued for the socket (at most
    a few PDUs ahead of the wire, see ``scu._bound_send_queue``): live progress for a
    large instance. pynetdicom 3.0.4: ``DULServiceProvider.send_pdu``."""
    original = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        original(primitive)
        if isinstance(primitive, P_DATA):
            for _context_id, data in primitive.presentation_data_value_list:
                if data and not data[0] & _COMMAND_FRAGMENT:
                    on_bytes(len(data) - 1)

    dul.send_pdu = send_pdu


ResultCallback = Callable[[InstanceResult], None]
BytesCallback = Callable[[int], None]


class Sender:
    """Sends files to one peer; blocking (pynetdicom is threaded), one association at a
    time. ``max_pdu_bytes`` is the largest PDU we accept; what we send is cut to the
    peer's maximum. The DIMSE and network timeouts are long: a gateway answers a large
    instance only once it is sealed into its outbox."""

    def __init__(
        self,
        peer: Peer,
        *,
        max_pdu_bytes: int = 1024 * 1024,
        connection_timeout_s: float = 10.0,
        acse_timeout_s: float = 30.0,
        dimse_timeout_s: float = 600.0,
        network_timeout_s: float = 600.0,
    ) -> None:
        self.peer = peer
        self.max_pdu_bytes = max_pdu_bytes
        self._ae = _SenderAE(ae_title=peer.calling_ae_title)
        self._ae.connection_timeout = connection_timeout_s
        self._ae.acse_timeout = acse_timeout_s
        self._ae.dimse_timeout = dimse_timeout_s
        self._ae.network_timeout = network_timeout_s

    def send(
        self,
        collected: Collected,
        *,
        on_result: ResultCallback | None = None,
        on_bytes: BytesCallback | None = None,
    ) -> SendReport:
        """C-STORE every collected file; ``on_result`` hears each instance's outcome and
        ``on_bytes`` the data set bytes as they go out (both in the calling thread)."""
        report = SendReport(self.peer, skipped=list(collected.skipped))
        started = time.monotonic()
        batches = plan_associations(collected.files)
        try:
            for index, batch in enumerate(batches):
                later = [f for b in batches[index + 1 :] for f in b]
                if not self._send_batch(batch, later, report, on_result, on_bytes):
                    break
        finally:
            report.elapsed_s = time.monotonic() - started
        log.info(
            "send finished",
            extra={
                "called_ae_title": self.peer.called_ae_title,
                "instances": len(report.results),
                "failed": len(report.failed),
                "bytes": report.bytes_sent,
                "associations": report.associations,
                "elapsed_ms": round(report.elapsed_s * 1000, 1),
            },
        )
        return report

    def associate(self, pairs: Iterable[Pair]) -> Association:
        """Open an association proposing each pair in its own context (exact matches for
        a send from file); ``_NoAssociation`` says why none was established."""
        contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
        assoc = self._ae.associate(
            self.peer.host,
            self.peer.port,
            contexts=contexts,
            ae_title=self.peer.called_ae_title,
            max_pdu=self.max_pdu_bytes,
        )
        if assoc.is_established:
            return assoc
        raise self._why_not(assoc, len(contexts))

    # --- internals --------------------------------------------------------------------

    def _send_batch(
        self,
        batch: list[DicomFile],
        later: list[DicomFile],
        report: SendReport,
        on_result: ResultCallback | None,
        on_bytes: BytesCallback | None,
    ) -> bool:
        """Send one planned batch, re-associating after an abort; False if an
        association failed (the files left are then marked failed)."""
        pairs = list(dict.fromkeys(item.pair for item in batch))
        pending = list(batch)

        def record(result: InstanceResult) -> None:
            report.results.append(result)
            if on_result is not None:
                on_result(result)

        while pending:
            try:
                assoc = self.associate(pairs)
            except _NoAssociation as exc:
                if not report.results:
                    raise ConfigError(
                        self.peer.address,
                        exc.field,
                        exc.problem,
                        exc.fix,
                    ) from None
                for item in [*pending, *later]:
                    record(_local_failure(item, f"no association: {exc.problem}"))
                return False
            report.associations += 1
            _bound_send_queue(assoc.dul)
            if on_bytes is not None:
                _count_sent_bytes(assoc.dul, on_bytes)
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            log.info(
                "association established",
                extra={
                    "called_ae_title": self.peer.called_ae_title,
                    "contexts_proposed": len(pairs),
                    "contexts_accepted": len(accepted),
                    "peer_max_pdu_bytes": assoc.acceptor.maximum_length,
                },
            )
            try:
                message_id = 0
                while pending:
                    item = pending.pop(0)
                    if item.pair not in accepted:
                        record(_not_accepted(item, self.peer.called_ae_title))
                        continue
                    message_id = message_id % 0xFFFF + 1
                    result = self._store(assoc, item, message_id)
                    record(result)
                    if result.status is None and not assoc.is_established:
                        break  # aborted: the rest go on a new association
            finally:
                _end(assoc)
        return True

    def _store(self, assoc: Association, item: DicomFile, message_id: int) -> InstanceResult:
        uid = item.sop_instance_uid
        started = time.monotonic()
        _configure_pynetdicom()  # a module global in pynetdicom: set before every send
        try:
            response = assoc.send_c_store(item.path, msg_id=message_id)
        except RuntimeError:
            return _local_failure(item, "the association ended before the C-STORE was sent")
        except (OSError, AttributeError, ValueError) as exc:
            # The file vanished or changed since its meta was read.
            return _local_failure(item, f"not sent from the file: {exc}")
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        if response is None or "Status" not in response:
            log.info(
                "no C-STORE response",
                extra={"sop_instance_uid": uid, "elapsed_ms": elapsed_ms},
            )
            return _local_failure(
                item,
                "no C-STORE response (association aborted, network error or DIMSE timeout)",
            )
        status = int(response.Status)
        comment = response.get("ErrorComment")
        outcome = Outcome.of(status)
        log.info(
            "C-STORE sent",
            extra={
                "sop_instance_uid": uid,
                "status": f"0x{status:04X}",
                "bytes": item.dataset_bytes,
                "elapsed_ms": elapsed_ms,
            },
        )
        return InstanceResult(item, outcome, status, str(comment) if comment is not None else None)

    def _why_not(self, assoc: Association, proposed: int) -> _NoAssociation:
        peer = self.peer
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            source = getattr(primitive, "result_source", None)
            diagnostic = getattr(primitive, "diagnostic", None)
            transient = getattr(primitive, "result", None) == _REJECTED_TRANSIENT
            log.info(
                "association rejected",
                extra={"result_source": source, "reason": diagnostic, "transient": transient},
            )
            if (source, diagnostic) == (_SERVICE_USER, _CALLED_AE_NOT_RECOGNIZED):
                return _NoAssociation(
                    "--to",
                    f"association rejected: called AE title {peer.called_ae_title!r} not "
                    "recognised",
                    f"add a route with `dicombridge routes add {peer.called_ae_title} --site "
                    "SITE` on that gateway, or pick one from `dicombridge routes list`",
                )
            if (source, diagnostic) == (_SERVICE_USER, _CALLING_AE_NOT_RECOGNIZED):
                return _NoAssociation(
                    "--calling-ae",
                    f"association rejected: calling AE title {peer.calling_ae_title!r} not "
                    f"recognised by route {peer.called_ae_title}",
                    "pass --calling-ae with a title the route allows, or add this one to the "
                    "route's calling_ae_titles",
                )
            reason = primitive.reason_str.lower() if primitive is not None else "no reason given"
            if source == _SERVICE_PROVIDER_PRESENTATION:
                return _NoAssociation(
                    "--host/--port",
                    f"association rejected for now: {reason} (the gateway is busy)",
                    "retry later, or raise [gateway] maximum_associations",
                )
            return _NoAssociation(
                "--to",
                f"association rejected ({'transient' if transient else 'permanent'}): {reason}",
                "check --to and --calling-ae against the gateway's routes",
            )
        connect_error = getattr(assoc.dul.socket, "connect_error", None)
        if connect_error is not None:
            if connect_error.errno == errno.ECONNREFUSED:
                problem = "connection refused"
            elif isinstance(connect_error, TimeoutError):
                problem = f"no answer within {self._ae.connection_timeout} s"
            else:
                problem = f"cannot connect: {connect_error.strerror or connect_error}"
            return _NoAssociation(
                "--host/--port",
                problem,
                "is the gateway running (`dicombridge gateway run`)? check --host and --port "
                "(default: [gateway] port of --config, else 11112)",
            )
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            return _NoAssociation(
                "PATH",
                f"the peer accepted none of the {proposed} presentation context(s) proposed "
                "(SOP class and transfer syntax of the files)",
                "check that the route's node takes these SOP classes in these transfer syntaxes",
            )
        return _NoAssociation(
            "--host/--port",
            "association aborted or timed out during negotiation",
            "check that this is a DICOM port and see the gateway's log",
        )


def _local_failure(item: DicomFile, reason: str) -> InstanceResult:
    return InstanceResult(item, Outcome.FAILED, None, reason)


def _not_accepted(item: DicomFile, called_ae_title: str) -> InstanceResult:
    sop_class, syntax = UID(item.sop_class_uid), UID(item.transfer_syntax)
    return _local_failure(
        item,
        f"{called_ae_title} did not accept {sop_class.name} in {syntax.name} "
        "(presentation context rejected; the file is sent as it is, never converted)",
    )


def _end(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    with contextlib.suppress(RuntimeError):
        if assoc.is_alive():
            assoc.join(timeout=5)
