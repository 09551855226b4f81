"""The hospital-facing DICOM services: Verification and Storage SCP (PS3.4 A, B).

One pynetdicom AE listens on one port and answers as every route AE title
(``acceptance``). It accepts all storage SOP classes, private ones included (pynetdicom's
unrestricted storage service), in the transfer syntaxes of ``TRANSFER_SYNTAXES``.

A received data set is written to disk in chunks as it arrives and is never decoded
whole. Each C-STORE is checked at the edge, reading the file only up to (0008,0018):
the data set must parse, and its SOP Class and SOP Instance UIDs must equal the
command's Affected SOP Class and Affected SOP Instance UIDs. An instance that passes is
handed, as a ``ReceivedInstance``, to an async callback on the gateway's event loop, and
the callback's ``StoreOutcome`` is the C-STORE response. C-ECHO is answered here.

Statuses (PS3.4 Table B.2-1, PS3.7 C.4.2.1.4 for the Error Comment):

- 0xC000 Error: cannot understand: the data set does not parse as far as (0008,0018), or
  lacks either UID, or came in a transfer syntax this gateway does not relay;
- 0xA900 Error: data set does not match SOP class: its SOP Class UID differs from the
  command's, and also when its SOP Instance UID differs from the command's. PS3.4 names
  no status for the latter; DCMTK's storescp and dcmqrdb answer
  ``STATUS_STORE_Error_DataSetDoesNotMatchSOPClass`` (0xA900) for both, and so do we;
- 0xA700 Refused: out of resources: the callback failed, timed out, or the SCP is
  stopping; or the disk that receives data sets is full (see below); the modality may
  try again.

pynetdicom writes each received data set to a temporary file from the association's
reader thread, and an error there (ENOSPC) aborts the association and leaves the partial
file behind. For the associations of this SCP the temporary file is a ``_ReceiveFile``:
a data set up to ``ScpSettings.receive_in_memory_bytes`` (with its file meta) stays in
memory and never touches the disk (plaintext PHI is not written at all, and creating and
deleting a file per instance is what costs most on some file systems); a larger one goes
to a file in ``ScpSettings.receive_dir``. A write there that fails removes the file at
once, swallows the rest of the data set, and the C-STORE is answered 0xA700 with an
Error Comment saying the gateway's disk is full; the association goes on, and the next
C-STORE after space is freed succeeds. (pynetdicom's
``dimse_messages.NamedTemporaryFile`` is replaced by a factory that gives such a file
only inside this SCP's associations, and pynetdicom's own file everywhere else: the
version is pinned, see ``acceptance``.)

pynetdicom runs handlers in its association threads; they hand work to the loop with
``asyncio.run_coroutine_threadsafe`` and never let an exception escape to pynetdicom. Logs
carry UIDs, AE titles and statuses, never patient data; pynetdicom's logging of request
and response identifiers is turned off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import os
import ssl
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self, cast

from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import P_DATA

from dicombridge.acceptance import (
    SERVER_AE_TITLE,
    AcceptancePolicy,
    AssociationGate,
    use_service_class,
)
from dicombridge.durable import free_bytes, is_disk_full
from dicombridge.errors import DicomServiceError
from dicombridge.qr_scp import FIND_MODELS, FindHandler, deep_echo, status_dataset
from dicombridge.retrieve_scp import (
    GET_MODELS,
    MOVE_MODELS,
    RelayedRetrieveService,
    RetrieveBridge,
    RetrieveHandler,
)

LOGGER = logging.getLogger(__name__)

# PS3.5 A.4.11; pydicom 3.0 has no constant for it.
ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN: Final = dicom_uid.UID("1.2.840.10008.1.2.1.98")

TRANSFER_SYNTAXES: Final[tuple[dicom_uid.UID, ...]] = (
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.HTJ2KLossless,
    dicom_uid.HTJ2KLosslessRPCL,
    dicom_uid.HTJ2K,
    dicom_uid.RLELossless,
    dicom_uid.MPEG2MPML,
    dicom_uid.MPEG2MPMLF,
    dicom_uid.MPEG2MPHL,
    dicom_uid.MPEG2MPHLF,
    dicom_uid.MPEG4HP41,
    dicom_uid.MPEG4HP41F,
    dicom_uid.MPEG4HP41BD,
    dicom_uid.MPEG4HP41BDF,
    dicom_uid.MPEG4HP422D,
    dicom_uid.MPEG4HP422DF,
    dicom_uid.MPEG4HP423D,
    dicom_uid.MPEG4HP423DF,
    dicom_uid.MPEG4HP42STEREO,
    dicom_uid.MPEG4HP42STEREOF,
    dicom_uid.HEVCMP51,
    dicom_uid.HEVCM10P51,
    ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN,
)

VERIFICATION_SOP_CLASS: Final = dicom_uid.UID("1.2.840.10008.1.1")  # PS3.4 A.4

MINIMUM_PDU_SIZE: Final = 16 * 1024
MAXIMUM_PDU_SIZE: Final = 4 * 1024 * 1024

SUCCESS: Final = 0x0000
PROCESSING_FAILURE: Final = 0x0110
OUT_OF_RESOURCES: Final = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000

_SOP_CLASS_UID: Final = Tag(0x0008, 0x0016)
_SOP_INSTANCE_UID: Final = Tag(0x0008, 0x0018)
# How much of a data set the edge check reads: the elements before (0008,0018) are few
# and short; a data set whose SOP Instance UID lies beyond this is not understood.
_HEAD_BYTES: Final = 1024 * 1024
_DEFLATED_HEAD_BYTES: Final = 1024 * 1024
_ERROR_COMMENT_LENGTH: Final = 64  # LO (PS3.7 C.4.2.1.4)
# Part 10: 128-byte preamble, b"DICM", then (0002,0000) UL: tag 4, VR 2, length 2, value 4.
_GROUP_LENGTH_AT: Final = 132
_GROUP_LENGTH_ELEMENT: Final = struct.Struct("<HH2sHL")
# Received data sets are written to <receive_dir>/dicombridge-recv-*.dcm.
RECEIVE_PREFIX: Final = "dicombridge-recv-"
RECEIVE_DISK_FULL_COMMENT: Final = "dicombridge gateway receive disk full; retry later"


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """One instance received by C-STORE and accepted by the edge checks.

    ``source`` is a DICOM Part 10 file, in memory (``bytes``) or on disk (``Path``): a
    128-byte preamble, ``DICM``, File Meta Information that pynetdicom writes from the
    command (Media Storage SOP Class/Instance UID = the Affected ones, Transfer Syntax UID
    = the presentation context's, pynetdicom's implementation UID and version), then, from
    ``dataset_offset`` to the end, the data set bytes exactly as received on the wire. A
    modality sends no file meta over the network, so those bytes are all there is to
    relay bit for bit.

    A file belongs to pynetdicom and is deleted when the callback returns: the callback
    must copy (or seal) it before returning.
    """

    source: Path | bytes
    dataset_offset: int
    size_bytes: int
    called_ae_title: str
    calling_ae_title: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    # Set by a C-MOVE's sub-operations (PS3.7 9.1.1): who asked, with which Message ID.
    move_originator_ae_title: str | None = None
    move_originator_message_id: int | None = None
    # The peer's IP address (route rules on source networks).
    calling_address: str | None = None


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """The C-STORE response: a status and, for failures and warnings, an Error Comment."""

    status: int
    error_comment: str | None = None


StoreCallback = Callable[[ReceivedInstance], Coroutine[Any, Any, StoreOutcome]]


@dataclass(frozen=True, slots=True)
class ScpSettings:
    """How the SCP listens; timeouts in seconds, sizes in bytes.

    ``maximum_pdu_size`` is the Maximum Length Received we advertise (PS3.8 D.1), bounded
    to 16 KiB-4 MiB and enforced on read. ``callback_timeout_s`` bounds how long a C-STORE
    waits for the callback before answering 0xA700; keep it below the modalities' DIMSE
    timeout. ``shutdown_grace_s`` is how long stopping waits for open associations to end
    before aborting them. ``receive_dir`` is where received data sets larger than
    ``receive_in_memory_bytes`` are written while they arrive (``None``: the system's
    temporary directory; smaller ones stay in memory, at most that much per association);
    a directory given here belongs to this SCP, which removes leftovers of an earlier run
    from it at start.
    """

    host: str = "0.0.0.0"  # noqa: S104  # the SCP serves the hospital network
    port: int = 11112
    maximum_associations: int = 10
    maximum_pdu_size: int = 1024 * 1024
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    callback_timeout_s: float = 50.0
    shutdown_grace_s: float = 10.0
    receive_dir: Path | None = None
    receive_in_memory_bytes: int = 8 * 1024 * 1024
    # DICOM TLS (PS3.15 B.9/B.10, ``dicom_tls.gateway_context``): the port then serves
    # TLS only; None: plain DICOM.
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if not MINIMUM_PDU_SIZE <= self.maximum_pdu_size <= MAXIMUM_PDU_SIZE:
            raise ValueError(
                f"maximum_pdu_size {self.maximum_pdu_size} must be between "
                f"{MINIMUM_PDU_SIZE} and {MAXIMUM_PDU_SIZE}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} must be between 0 and 65535")
        if self.maximum_associations < 1:
            raise ValueError("maximum_associations must be at least 1")
        if self.receive_in_memory_bytes < 0:
            raise ValueError("receive_in_memory_bytes must not be negative")
        timeouts = (
            self.acse_timeout_s,
            self.dimse_timeout_s,
            self.network_timeout_s,
            self.callback_timeout_s,
            self.shutdown_grace_s,
        )
        if min(timeouts) <= 0:
            raise ValueError("timeouts must be positive")


class _Refused(Exception):
    """An edge check failed; carries the C-STORE outcome (never leaves this module)."""

    def __init__(self, outcome: StoreOutcome) -> None:
        super().__init__(outcome.error_comment)
        self.outcome = outcome


def _configure_pynetdicom() -> None:
    """Set pynetdicom's process-wide switches this SCP depends on.

    They are module globals in pynetdicom, so they apply to every AE in the process:
    chunked receiving also applies to a C-GET SCU's storage sub-operations (desired), and
    identifier logging stays off everywhere (request/response identifiers are PHI). The
    temporary-file factory gives pynetdicom's own file outside this SCP's associations.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # pynetdicom imports the name into dimse_messages and looks it up there at each use.
    dimse_messages.NamedTemporaryFile = _receive_file  # type: ignore[attr-defined]


class _ReceiveFile:
    """Where one C-STORE's data set goes as it arrives: memory up to ``memory_limit``
    bytes, then a file in ``directory``; it survives a full disk.

    pynetdicom (``DIMSEMessage.decode_msg``, in the association's reader thread) takes
    ``name`` once, calls ``write`` and ``file.flush`` as the data set arrives, then, after
    the C-STORE handler, ``close`` and ``os.unlink(name)`` (which fails harmlessly when
    everything stayed in memory: nothing was created under that unique name). An error
    escaping from there would abort the association, so a failed write (ENOSPC) is kept
    in ``error`` instead: the partial file is removed at once, freeing its space, the rest
    of the data set is dropped, and the handler answers 0xA700.
    """

    def __init__(self, directory: Path, memory_limit: int) -> None:
        self.directory = directory
        self.error: OSError | None = None
        self._lock = threading.Lock()
        self._memory: bytearray | None = bytearray()
        self._memory_limit = memory_limit
        self._handle: IO[bytes] | None = None
        self.name = str(directory / f"{RECEIVE_PREFIX}{os.urandom(12).hex()}.dcm")

    @property
    def file(self) -> _ReceiveFile:
        """pynetdicom flushes ``NamedTemporaryFile.file``; this is both."""
        return self

    @property
    def in_memory(self) -> bytes | None:
        """The whole data set with its file meta, if it stayed in memory."""
        with self._lock:
            return None if self._memory is None or self.error else bytes(self._memory)

    def write(self, data: bytes) -> int:
        with self._lock:
            memory = self._memory
            if memory is not None and len(memory) + len(data) <= self._memory_limit:
                memory += data
            elif memory is not None:
                self._memory = None
                self._spill(bytes(memory) + data)
            elif self._handle is not None:
                try:
                    self._handle.write(data)
                except OSError as exc:
                    self._fail(exc)
        return len(data)

    def flush(self) -> None:
        with self._lock:
            if self._handle is not None:
                try:
                    self._handle.flush()
                except OSError as exc:
                    self._fail(exc)

    def close(self) -> None:
        with self._lock:
            self._memory = None
            handle, self._handle = self._handle, None
            if handle is not None:
                try:
                    handle.close()
                except OSError as exc:
                    self.error = exc
                    self._remove()

    def _spill(self, data: bytes) -> None:
        """Go on in a file under ``name``, starting with ``data`` (lock held)."""
        try:
            fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            self.error = exc
            return
        self._handle = os.fdopen(fd, "wb")
        try:
            self._handle.write(data)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        """Keep the first error, drop the handle and the partial file (lock held)."""
        self.error = exc
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):  # flushing what is buffered fails again
                handle.close()
        self._remove()

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.name)


class _ReceiveContext:
    """Where the association being read writes its data sets (set around its reads)."""

    def __init__(self, directory: Path, memory_limit: int) -> None:
        self.directory = directory
        self.memory_limit = memory_limit


_receiving = threading.local()


def _receive_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``tempfile.NamedTemporaryFile`` in pynetdicom's ``dimse_messages``."""
    context: _ReceiveContext | None = getattr(_receiving, "context", None)
    if context is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    return _ReceiveFile(context.directory, context.memory_limit)


def _receive_into(event: evt.Event, directory: Path, memory_limit: int) -> None:
    """Make the association of ``event`` write received data sets as ``_ReceiveFile``s
    (this SCP's associations, and those of a C-GET the gateway sends to a local node).

    Wraps its DIMSE provider's ``receive_primitive`` (called by the reader thread for
    each P-DATA) so that the factory above knows, in that thread, whose data set it is.
    """
    dimse = event.assoc.dimse
    receive = dimse.receive_primitive
    context = _ReceiveContext(directory, memory_limit)

    def receive_primitive(primitive: P_DATA) -> None:
        _receiving.context = context
        try:
            receive(primitive)
        finally:
            _receiving.context = None

    # An instance attribute: only this association's provider is wrapped.
    dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]


def open_source(source: Path | bytes) -> IO[bytes]:
    """A Part 10 file in memory or on disk, opened for reading."""
    return io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")


def dataset_offset(source: Path | bytes) -> int:
    """Where the data set begins in a Part 10 file whose meta starts with its group length.

    Raises ValueError when the file does not start that way.
    """
    with open_source(source) as fp:
        fp.seek(_GROUP_LENGTH_AT)
        raw = fp.read(_GROUP_LENGTH_ELEMENT.size)
        fp.seek(128)
        magic = fp.read(4)
    if magic != b"DICM" or len(raw) != _GROUP_LENGTH_ELEMENT.size:
        raise ValueError("not a DICOM Part 10 file")
    group, element, vr, length, value = _GROUP_LENGTH_ELEMENT.unpack(raw)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise ValueError("file meta does not start with its group length")
    return int(_GROUP_LENGTH_AT + _GROUP_LENGTH_ELEMENT.size + value)


def _read_sop_uids(source: Path | bytes, offset: int, transfer_syntax: str) -> tuple[str, str]:
    """Read (0008,0016) and (0008,0018), parsing nothing beyond (0008,0018).

    The data set is read in the negotiated transfer syntax from ``offset``. A deflated one
    is inflated only as far as ``_DEFLATED_HEAD_BYTES`` (pydicom would inflate it whole,
    and a few kilobytes can inflate to gigabytes). Raises ``_Refused`` with 0xC000 when
    the data set cannot be read that far.
    """

    def past_sop_instance_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
        return bool(tag > _SOP_INSTANCE_UID)

    try:
        with open_source(source) as fp:
            fp.seek(offset)
            if transfer_syntax == dicom_uid.DeflatedExplicitVRLittleEndian:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                head = inflater.decompress(fp.read(_DEFLATED_HEAD_BYTES), _DEFLATED_HEAD_BYTES)
            else:
                head = fp.read(_HEAD_BYTES)
        dataset = read_dataset(
            io.BytesIO(head),
            is_implicit_VR=transfer_syntax == dicom_uid.ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax != dicom_uid.ExplicitVRBigEndian,
            stop_when=past_sop_instance_uid,
            specific_tags=[_SOP_CLASS_UID, _SOP_INSTANCE_UID],
        )
        values = [dataset.get(tag) for tag in (_SOP_CLASS_UID, _SOP_INSTANCE_UID)]
        found = [None if elem is None else elem.value for elem in values]
    except Exception as exc:
        raise _Refused(
            StoreOutcome(CANNOT_UNDERSTAND, "data set cannot be parsed as DICOM")
        ) from exc
    if not all(isinstance(value, str) and value for value in found):
        raise _Refused(
            StoreOutcome(CANNOT_UNDERSTAND, "data set lacks SOP Class or SOP Instance UID")
        )
    return str(found[0]).rstrip("\0 "), str(found[1]).rstrip("\0 ")


def _response(outcome: StoreOutcome) -> Dataset:
    """The status part of a C-STORE response."""
    response = Dataset()
    response.Status = outcome.status
    if outcome.status != SUCCESS and outcome.error_comment:
        response.ErrorComment = outcome.error_comment[:_ERROR_COMMENT_LENGTH]
    return response


class StorageSCP:
    """Verification and Storage SCP on one port for every route AE title.

    Use as ``async with StorageSCP(policy=..., on_store=..., settings=...) as scp:``;
    the server runs in pynetdicom's threads and stops, aborting open associations, on
    exit. ``replace_policy`` changes the served AE titles while running.
    """

    def __init__(
        self,
        *,
        policy: AcceptancePolicy,
        on_store: StoreCallback,
        settings: ScpSettings | None = None,
        queries: RetrieveBridge | None = None,
    ) -> None:
        self.settings = settings or ScpSettings()
        self._on_store = on_store
        self._queries = queries
        self._gate = AssociationGate(
            policy,
            transfer_syntaxes=TRANSFER_SYNTAXES,
            maximum_pdu_size=self.settings.maximum_pdu_size,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ae: Any = None
        self._server: Any = None
        self._pending: set[concurrent.futures.Future[StoreOutcome]] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self.receive_dir = self.settings.receive_dir or Path(tempfile.gettempdir())

    @property
    def port(self) -> int:
        """The port the server listens on (useful when ``settings.port`` is 0)."""
        if self._server is None:
            raise DicomServiceError("the SCP is not running")
        return int(self._server.server_address[1])

    @property
    def policy(self) -> AcceptancePolicy:
        """The acceptance policy new associations are negotiated with."""
        return self._gate.policy

    @property
    def gate(self) -> AssociationGate:
        """The acceptance policy in force and its hooks (``gate.on_reject`` for audit)."""
        return self._gate

    def replace_policy(self, policy: AcceptancePolicy) -> None:
        """Serve the AE titles of ``policy`` from the next association on."""
        self._gate.replace(policy)

    async def __aenter__(self) -> Self:
        if self._server is not None:
            raise DicomServiceError("the SCP is already running")
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        _configure_pynetdicom()
        settings = self.settings
        if settings.receive_dir is not None:
            await asyncio.to_thread(_prepare_receive_dir, settings.receive_dir)
        ae = AE(ae_title=SERVER_AE_TITLE)
        ae.maximum_associations = settings.maximum_associations
        ae.maximum_pdu_size = settings.maximum_pdu_size
        ae.acse_timeout = settings.acse_timeout_s
        ae.dimse_timeout = settings.dimse_timeout_s
        ae.network_timeout = settings.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = []
        ae.add_supported_context(VERIFICATION_SOP_CLASS, list(TRANSFER_SYNTAXES[:3]))
        handlers: list[EventHandlerType] = [
            *self._gate.evt_handlers,
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        if self._queries is not None:
            for qr_sop_class in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
                ae.add_supported_context(qr_sop_class, list(TRANSFER_SYNTAXES[:3]))
            handlers.append((evt.EVT_C_FIND, FindHandler(self._queries)))
            use_service_class([*MOVE_MODELS, *GET_MODELS], RelayedRetrieveService)
            ae.dicombridge_retrieve = RetrieveHandler(self._queries)  # type: ignore[attr-defined]
        try:
            self._server = ae.start_server(
                (settings.host, settings.port),
                block=False,
                evt_handlers=handlers,
                ae_title=SERVER_AE_TITLE,
                ssl_context=settings.ssl_context,
            )
        except OSError as exc:
            raise DicomServiceError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
            ) from exc
        self._ae = ae
        LOGGER.info(
            "DICOM SCP listening on %s:%d (%s) for %d AE titles",
            settings.host,
            self.port,
            "TLS only" if settings.ssl_context is not None else "plain",
            len(self.policy.called_ae_titles),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop listening; C-STOREs being handed over finish (the callback's answer
        stands), later ones are answered 0xA700; abort what is still open after the grace.

        Handed-over C-STOREs are not cancelled: the callback may have stored the instance
        already, and answering 0xA700 for it would make the modality send it twice.
        """
        if self._server is None:
            return
        with self._lock:
            self._stopping = True
        ae, server, self._ae, self._server = self._ae, self._server, None, None
        await asyncio.to_thread(self._drain_then_shutdown, ae, server)
        LOGGER.info("DICOM SCP stopped")

    def _drain_then_shutdown(self, ae: Any, server: Any) -> None:
        """Stop listening, let open associations finish for a grace period, abort the rest.

        C-STOREs arriving now are answered 0xA700, so a peer normally releases soon.
        Callbacks still running when the grace is over are cancelled (their C-STOREs are
        answered 0xA700), and associations still open are aborted.
        """
        server.shutdown()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        for assoc in list(ae.active_associations):
            # Only established ones have work to finish; a connection still negotiating
            # (or one that sent junk) would only keep us waiting for its ACSE timeout.
            if assoc.is_established:
                assoc.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            late = list(self._pending)
        for future in late:
            future.cancel()
        for assoc in list(ae.active_associations):
            if assoc.is_established and late:
                assoc.join(timeout=1.0)  # time to send the 0xA700 answers
        ae.shutdown()

    def retrieve_handlers(self, message_id: int) -> list[EventHandlerType]:
        """Event handlers for an association on which the gateway is the C-GET SCU toward
        a local node (PS3.4 C.4.3): the node's C-STOREs on it are received into
        ``receive_dir``, checked and handed over exactly like those sent to this SCP, as
        if sent to the gateway's own AE title (the association's calling AE title) by a
        C-MOVE with Move Originator Message ID ``message_id``: that is how the callback
        knows whose retrieve an instance belongs to."""

        def on_c_store(event: evt.Event) -> Dataset:
            return self._on_c_store(event, retrieve_message_id=message_id)

        return [(evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_C_STORE, on_c_store)]

    def _on_conn_open(self, event: evt.Event) -> None:
        _receive_into(event, self.receive_dir, self.settings.receive_in_memory_bytes)

    def _on_c_echo(self, event: evt.Event) -> int | Dataset:
        """C-ECHO (PS3.4 A): answered by the gateway itself, or, to a route's AE title with
        deep echo on, only once the remote gateway and its node answered (0x0110 with an
        Error Comment otherwise)."""
        if self._queries is None:
            return SUCCESS
        try:
            answer = deep_echo(self._queries, _called(event), _calling(event))
        except Exception as exc:
            LOGGER.error("deep C-ECHO failed in the gateway: %s", type(exc).__name__)
            return status_dataset(PROCESSING_FAILURE, "gateway error")
        return SUCCESS if answer is None else answer

    def _on_c_store(self, event: evt.Event, *, retrieve_message_id: int | None = None) -> Dataset:
        """Check one C-STORE, hand it to the callback; never raises (pynetdicom thread).

        ``retrieve_message_id``: the C-STORE came on the gateway's own C-GET association
        (``retrieve_handlers``), whose acceptor is the sender.
        """
        sop_instance_uid = "?"
        if retrieve_message_id is None:
            calling, called = _calling(event), _called(event)
        else:
            calling, called = _called(event), _calling(event)
        try:
            sop_instance_uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
            outcome = self._store(event, calling, called, retrieve_message_id)
        except _Refused as refused:
            outcome = refused.outcome
        except Exception as exc:
            LOGGER.error(  # a traceback could carry data set values
                "C-STORE %s failed in the gateway: %s", sop_instance_uid, type(exc).__name__
            )
            outcome = StoreOutcome(OUT_OF_RESOURCES, "gateway error, try again later")
        log = LOGGER.info if outcome.status == SUCCESS else LOGGER.warning
        log(
            "C-STORE %s from %r to %r: status 0x%04X%s",
            sop_instance_uid,
            calling,
            called,
            outcome.status,
            f" ({outcome.error_comment})" if outcome.error_comment else "",
        )
        return _response(outcome)

    def _store(
        self, event: evt.Event, calling: str, called: str, retrieve_message_id: int | None
    ) -> StoreOutcome:
        request = cast(C_STORE, event.request)
        sop_class_uid = str(request.AffectedSOPClassUID)
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        transfer_syntax = str(event.context.transfer_syntax)
        received = getattr(request, "_dataset_file", None)
        if isinstance(received, _ReceiveFile) and received.error is not None:
            raise _Refused(self._receive_failed(sop_instance_uid, received.error))
        in_memory = received.in_memory if isinstance(received, _ReceiveFile) else None
        source: Path | bytes = Path(event.dataset_path) if in_memory is None else in_memory
        if transfer_syntax not in TRANSFER_SYNTAXES:
            raise _Refused(
                StoreOutcome(CANNOT_UNDERSTAND, "transfer syntax not relayed by this gateway")
            )
        offset = dataset_offset(source)
        found_class, found_instance = _read_sop_uids(source, offset, transfer_syntax)
        if found_class != sop_class_uid:
            raise _Refused(
                StoreOutcome(
                    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOP Class UID differs from Affected SOP Class UID",
                )
            )
        if found_instance != sop_instance_uid:
            raise _Refused(
                StoreOutcome(
                    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOP Instance UID differs from Affected SOP Instance UID",
                )
            )
        instance = ReceivedInstance(
            source=source,
            dataset_offset=offset,
            size_bytes=len(source) if isinstance(source, bytes) else source.stat().st_size,
            called_ae_title=called,
            calling_ae_title=calling,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            move_originator_ae_title=_optional_text(request.MoveOriginatorApplicationEntityTitle),
            move_originator_message_id=request.MoveOriginatorMessageID
            if retrieve_message_id is None
            else retrieve_message_id,
            calling_address=str(event.assoc.requestor.address),
        )
        return self._hand_over(instance)

    def _receive_failed(self, sop_instance_uid: str, error: OSError) -> StoreOutcome:
        """The data set could not be written where it is received: 0xA700."""
        directory = self.receive_dir
        if is_disk_full(error):
            LOGGER.error(
                "C-STORE %s not received: disk full in %s (%s bytes free)",
                sop_instance_uid,
                directory,
                free_bytes(directory),
            )
            return StoreOutcome(OUT_OF_RESOURCES, RECEIVE_DISK_FULL_COMMENT)
        LOGGER.error(
            "C-STORE %s not received: cannot write in %s: %s",
            sop_instance_uid,
            directory,
            error.strerror,
        )
        return StoreOutcome(OUT_OF_RESOURCES, "gateway cannot write what it receives; retry later")

    def _hand_over(self, instance: ReceivedInstance) -> StoreOutcome:
        """Run the callback on the loop and wait for it, bounded by the callback timeout."""
        loop = self._loop
        with self._lock:
            if self._stopping or loop is None:
                return StoreOutcome(OUT_OF_RESOURCES, "gateway is stopping")
            future = asyncio.run_coroutine_threadsafe(self._on_store(instance), loop)
            self._pending.add(future)
        try:
            outcome = future.result(timeout=self.settings.callback_timeout_s)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                return StoreOutcome(OUT_OF_RESOURCES, "gateway did not store in time")
            outcome = future.result()  # it finished as the wait ran out: that answer stands
        except concurrent.futures.CancelledError:
            return StoreOutcome(OUT_OF_RESOURCES, "gateway is stopping")
        finally:
            with self._lock:
                self._pending.discard(future)
        if not isinstance(outcome, StoreOutcome) or not 0 <= outcome.status <= 0xFFFF:
            raise TypeError("the store callback must return a StoreOutcome")
        return outcome


def _prepare_receive_dir(directory: Path) -> None:
    """Create the SCP's own receive directory; remove what a crash left in it."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f"{RECEIVE_PREFIX}*.dcm"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def _optional_text(value: object) -> str | None:
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip() or None


def _called(event: evt.Event) -> str:
    return str(event.assoc.acceptor.ae_title)


def _calling(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title)
