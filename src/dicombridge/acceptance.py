"""Association acceptance: many route AE titles on one port, and bounded PDU reads.

pynetdicom's acceptor compares the Called AE Title with the single ``ae_title`` of its
server. A gateway answers as every route AE title of its routing table on one port, so
this module decides acceptance itself (PS3.8 9.3.4, Table 9-21): an unknown called AE
title is rejected permanent / service-user / "called-AE-title-not-recognized" (0x07), and
a calling AE title outside a route's allow-list with reason 0x03 ("calling-AE-title not
recognized"). The accepted association's acceptor AE title becomes the called one, so
responses carry it. The policy is an immutable snapshot that ``AssociationGate.replace``
swaps atomically (hot reload); each association reads it once, when it is negotiated.

The same per-association hook bounds what a peer can make us read: pynetdicom reads a
PDU of whatever length its header announces. Here a P-DATA-TF PDU longer than the
Maximum Length Received we advertised (PS3.8 D.1), or any other PDU longer than
``MAXIMUM_CONTROL_PDU_SIZE``, is not read: the association is aborted (A-ABORT, as for an
invalid PDU, PS3.8 9.3.1 Evt19) and the connection closed.

This is the one place that reaches into pynetdicom's internals, all per association and
installed from an ``EVT_CONN_OPEN`` handler, which pynetdicom runs after creating the
``Association`` and before starting its threads (``transport.RequestHandler.handle``):

- ``Association.acse`` is replaced by a subclass of ``acse.ACSE`` whose
  ``_negotiate_as_acceptor`` decides on the AE titles, then calls the original;
- ``DULServiceProvider._read_pdu_data`` (dul.py) is replaced by a copy that checks the
  PDU length field before reading the body, and stops reading from a peer that sent an
  unknown or oversized PDU (``_BoundedPduReader``);
- ``AssociationSocket.socket`` gets ``TCP_NODELAY`` (``_shutdown_socket`` drops a
  connection whose hooks could not be installed);
- ``sop_class._STORAGE_CLASSES`` tells storage SOP classes apart, as pynetdicom's
  unrestricted storage negotiation does, to narrow their proposed transfer syntaxes;
- ``association.uid_to_service_class`` (the name ``Association._serve_request`` looks
  up) gives ``retrieve_scp.RelayedRetrieveService`` for the Query/Retrieve SOP classes
  (``use_service_class``): process-wide, but that class behaves as pynetdicom's own unless
  the association's AE carries the gateway's retrieve handler.

These internals change between releases, so pynetdicom is pinned in ``pyproject.toml``
and importing this module fails loudly with any other version.
"""

from __future__ import annotations

import enum
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, cast

import pynetdicom
from pydicom.uid import UID
from pynetdicom import association as _association
from pynetdicom import evt, sop_class
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicombridge.errors import DependencyVersionError
from dicombridge.rules import Admission

LOGGER = logging.getLogger(__name__)

PINNED_PYNETDICOM_VERSION: Final = "3.0.4"
if pynetdicom.__version__ != PINNED_PYNETDICOM_VERSION:
    raise DependencyVersionError(
        f"dicombridge.acceptance hooks pynetdicom {PINNED_PYNETDICOM_VERSION} internals "
        f"(acse.ACSE._negotiate_as_acceptor, dul.DULServiceProvider._read_pdu_data); "
        f"found pynetdicom {pynetdicom.__version__}: install the pinned version, or "
        f"re-check those internals and update the pin"
    )

# The server's own AE title. Every association is first given to our ACSE, which sets
# the acceptor AE title to the called one before pynetdicom's own check; if the hook were
# ever missing, pynetdicom would compare the called AE title with this one, which no
# route may take, and reject everything: fail closed.
SERVER_AE_TITLE: Final = "NO-ROUTE!"

# Bound for PDUs other than P-DATA-TF (association requests with many presentation
# contexts and a user identity, releases, aborts): generous, but bounded.
MAXIMUM_CONTROL_PDU_SIZE: Final = 1024 * 1024

_PDU_HEADER: Final = struct.Struct(">BBL")
_P_DATA_TF: Final = 0x04
_A_ASSOCIATE_RQ: Final = 0x01
_PDU_TYPES: Final = frozenset(range(0x01, 0x08))

# A-ASSOCIATE-RJ result and source (PS3.8 Table 9-21).
_REJECTED_PERMANENT: Final = 0x01
_SERVICE_USER: Final = 0x01


_PYNETDICOM_SERVICE_CLASS: Final = getattr(_association, "uid_to_service_class")  # noqa: B009
_OWN_SERVICE_CLASSES: dict[str, type[Any]] = {}


def _service_class_for(uid: str) -> type[Any]:
    own = _OWN_SERVICE_CLASSES.get(str(uid))
    return own if own is not None else _PYNETDICOM_SERVICE_CLASS(uid)


def use_service_class(sop_class_uids: Iterable[str], service_class: type[Any]) -> None:
    """Serve requests of these SOP classes with ``service_class`` (a subclass of the
    pynetdicom class it replaces) in every association of this process from now on."""
    for uid in sop_class_uids:
        _OWN_SERVICE_CLASSES[str(uid)] = service_class
    _association.uid_to_service_class = _service_class_for  # type: ignore[attr-defined]


class RejectReason(enum.IntEnum):
    """A-ASSOCIATE-RJ reasons given by the service user (PS3.8 Table 9-21)."""

    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07

    @property
    def description(self) -> str:
        """The standard's words for the reason."""
        return self.name.lower().replace("_", " ").replace(" ae ", " AE ")


def _ae_title(value: str, what: str) -> str:
    """Return ``value`` without padding, or raise ValueError if it is no AE title (PS3.5)."""
    stripped = value.strip(" ")
    if not stripped or len(stripped) > 16:
        raise ValueError(f"{what} {value!r} must have 1 to 16 characters")
    if "\\" in stripped or any(ord(char) < 0x20 or ord(char) > 0x7E for char in stripped):
        raise ValueError(f"{what} {value!r} may hold printable ASCII only, no backslash")
    return stripped


@dataclass(frozen=True, eq=False)
class AcceptancePolicy:
    """Which called AE titles this gateway answers as, and whom each one admits.

    ``called_ae_titles`` maps each route AE title to the admissions of its routes (a
    caller is admitted if one of them admits its AE title, with DICOM's ``*`` and ``?``
    wildcards, and its address), or to ``None`` to accept any caller from anywhere.
    Build it with ``AcceptancePolicy.of``.
    """

    called_ae_titles: Mapping[str, tuple[Admission, ...] | None]

    @classmethod
    def of(
        cls,
        called_ae_titles: Iterable[str],
        *,
        calling_ae_titles: Mapping[str, Iterable[str]] | None = None,
        admissions: Mapping[str, Iterable[Admission]] | None = None,
    ) -> AcceptancePolicy:
        """A policy answering as ``called_ae_titles``; ``calling_ae_titles`` (an allow-list
        of calling AE titles) or ``admissions`` (AE titles and source networks, per route)
        restrict some.

        Raises ValueError for a malformed AE title, for an allow-list of a called AE title
        that is not served, and for the reserved ``SERVER_AE_TITLE``.
        """
        served: dict[str, tuple[Admission, ...] | None] = {}
        for title in called_ae_titles:
            called = _ae_title(title, "called AE title")
            if called == SERVER_AE_TITLE:
                raise ValueError(f"called AE title {SERVER_AE_TITLE!r} is reserved")
            served[called] = None
        restricted = {
            title: (Admission(tuple(_ae_title(c, "calling AE title") for c in callers)),)
            for title, callers in (calling_ae_titles or {}).items()
        } | {title: tuple(rules) for title, rules in (admissions or {}).items()}
        for title, rules in restricted.items():
            called = _ae_title(title, "called AE title")
            if called not in served:
                raise ValueError(f"allow-list for {called!r}, which is not a served AE title")
            served[called] = rules
        return cls(MappingProxyType(served))

    def decide(
        self, called_ae_title: str, calling_ae_title: str, address: str | None = None
    ) -> RejectReason | None:
        """Return why an association must be rejected, or None to accept it.

        A caller outside every admission, by AE title or by address, is rejected
        "calling AE title not recognized": PS3.8 has no reason for an address.
        """
        called = called_ae_title.strip(" ")
        if called not in self.called_ae_titles:
            return RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED
        allowed = self.called_ae_titles[called]
        calling = calling_ae_title.strip(" ")
        if allowed is not None and not any(rule.admits(calling, address) for rule in allowed):
            return RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
        return None


def is_storage_like(abstract_syntax: str) -> bool:
    """True if pynetdicom's unrestricted storage service treats the SOP class as storage.

    Mirrors ``presentation.negotiate_unrestricted``: private, storage, or unknown UIDs.
    """
    uid = UID(abstract_syntax)
    return (
        uid.is_private
        or uid in sop_class._STORAGE_CLASSES.values()
        or not hasattr(sop_class, uid.keyword)
    )


class AssociationGate:
    """The current acceptance policy, and the hooks that apply it to each association.

    Thread-safe by construction: ``replace`` swaps one reference, and an association reads
    ``policy`` once, in its own thread, when it is negotiated.
    """

    def __init__(
        self,
        policy: AcceptancePolicy,
        *,
        transfer_syntaxes: Sequence[str],
        maximum_pdu_size: int,
    ) -> None:
        self._policy = policy
        self._transfer_syntaxes = tuple(UID(ts) for ts in transfer_syntaxes)
        self._maximum_pdu_size = maximum_pdu_size
        # Told of each rejection (called, calling, address, reason), in the association's
        # thread: the audit trail. It must not block.
        self.on_reject: Callable[[str, str, str, RejectReason], None] | None = None

    @property
    def policy(self) -> AcceptancePolicy:
        """The policy new associations are negotiated with."""
        return self._policy

    def replace(self, policy: AcceptancePolicy) -> None:
        """Apply ``policy`` to associations negotiated from now on (hot reload)."""
        self._policy = policy
        LOGGER.info("acceptance policy replaced: %d called AE titles", len(policy.called_ae_titles))

    @property
    def evt_handlers(self) -> list[EventHandlerType]:
        """The handlers to pass to ``AE.start_server(evt_handlers=...)``."""
        return [(evt.EVT_CONN_OPEN, self._on_conn_open)]

    def _on_conn_open(self, event: evt.Event) -> None:
        """Install the hooks; if that fails, drop the connection (fail closed)."""
        assoc = event.assoc
        sock = assoc.dul.socket
        try:
            if sock is None or sock.socket is None:
                raise RuntimeError("association without a socket")
            assoc.acse = _RoutedACSE(assoc, self)
            assoc.dul._read_pdu_data = _BoundedPduReader(  # type: ignore[method-assign]  # the hook
                assoc.dul,
                maximum_p_data_size=self._maximum_pdu_size,
                maximum_other_size=MAXIMUM_CONTROL_PDU_SIZE,
            )
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception:
            LOGGER.exception("could not install the acceptance hooks; dropping the connection")
            if sock is not None:
                sock._shutdown_socket()

    def prefer_accepted_transfer_syntaxes(self, contexts: Iterable[Any]) -> None:
        """Narrow each storage context's proposed transfer syntaxes to those we accept.

        The unrestricted storage service accepts the first transfer syntax proposed for a
        storage SOP class; narrowing the proposal makes that the first one we accept.
        A context that proposes none is left as it is and refused per C-STORE.
        """
        for context in contexts:
            if not is_storage_like(context.abstract_syntax):
                continue
            accepted = [ts for ts in context.transfer_syntax if ts in self._transfer_syntaxes]
            if accepted and accepted != list(context.transfer_syntax):
                context.transfer_syntax = accepted


class _RoutedACSE(ACSE):
    """pynetdicom's ACSE, deciding on the AE titles before its own negotiation."""

    def __init__(self, assoc: Association, gate: AssociationGate) -> None:
        super().__init__(assoc)
        self._gate = gate

    def _negotiate_as_acceptor(self) -> None:
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        called = str(request.called_ae_title).strip(" ")
        calling = str(request.calling_ae_title).strip(" ")
        address = str(self.requestor.address)
        reason = self._gate.policy.decide(called, calling, address)
        if reason is not None:
            self.requestor.ae_title = request.calling_ae_title
            LOGGER.warning(
                "association rejected: %s (called %r, calling %r, from %s)",
                reason.description,
                called,
                calling,
                address,
            )
            if self._gate.on_reject is not None:
                try:
                    self._gate.on_reject(called, calling, address, reason)
                except Exception:
                    LOGGER.exception("the rejection observer failed; rejecting all the same")
            self.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, int(reason))
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.acceptor.ae_title = called
        self._gate.prefer_accepted_transfer_syntaxes(request.presentation_context_definition_list)
        super()._negotiate_as_acceptor()


class _BoundedPduReader:
    """``DULServiceProvider._read_pdu_data`` with the length checked before the body is read.

    Same events as the original (PS3.8 9.3.1): Evt17 when the connection ends, Evt19 for
    an unknown, undecodable or (here) oversized PDU. After an unknown or oversized PDU
    nothing more is read from the peer: the state machine sends its A-ABORT, and the next
    read reports the connection closed, instead of parsing the rest of the stream as PDUs
    or waiting for a body that may never come.

    A PDU must also arrive whole within the network timeout of its first byte. The
    socket's own timeout restarts with every byte received, so a peer dribbling a byte at
    a time (slowloris) would otherwise hold its association, and a thread, for ever: past
    the deadline the connection is treated as closed (Evt17), and nothing more is read.

    A connection that ends or is refused before an A-ASSOCIATE-RQ arrived also wakes the
    association's thread, which otherwise waits the whole ACSE timeout for a request that
    cannot come, holding one of the ``maximum_associations`` slots: a peer opening bad
    connections faster than that would have every association refused (local limit
    exceeded). The wake-up is pynetdicom's own path for an ACSE timeout (``None`` from
    ``receive_pdu``): the association stops its DUL and closes the connection.
    """

    def __init__(self, dul: Any, *, maximum_p_data_size: int, maximum_other_size: int) -> None:
        self._dul = dul
        self._maximum_p_data_size = maximum_p_data_size
        self._maximum_other_size = maximum_other_size
        self._refused = False
        self._request_seen = False
        self._woken = False

    def __call__(self) -> None:
        dul = self._dul
        if self._refused:
            self._report("Evt17")
            return
        timeout_s = dul.network_timeout
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            header = self._recv(_PDU_HEADER.size, deadline)
        except OSError:  # TimeoutError included
            self._closed_on_error()
            return
        if len(header) != _PDU_HEADER.size:
            self._report("Evt17")
            return
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        if pdu_type not in _PDU_TYPES:
            self._refuse("unknown PDU type 0x%02X received; aborting the association", pdu_type)
            return
        limit = self._maximum_p_data_size if pdu_type == _P_DATA_TF else self._maximum_other_size
        if pdu_length > limit:
            self._refuse(
                "PDU type 0x%02X announces %d bytes, more than the %d accepted; aborting the "
                "association without reading it",
                pdu_type,
                pdu_length,
                limit,
            )
            return
        try:
            body = self._recv(pdu_length, deadline)
        except TimeoutError:
            LOGGER.warning(
                "PDU type 0x%02X of %d bytes not received whole within %s s; dropping the "
                "connection",
                pdu_type,
                pdu_length,
                timeout_s,
            )
            self._closed_on_error()
            return
        except OSError:
            self._closed_on_error()
            return
        if len(body) != pdu_length:
            LOGGER.warning("connection closed within a PDU (%d of %d bytes)", len(body), pdu_length)
            self._report("Evt17")
            return
        try:
            pdu, event = dul._decode_pdu(bytearray(header + body))
        except Exception:
            LOGGER.warning("undecodable PDU of type 0x%02X received; aborting", pdu_type)
            self._report("Evt19")
            return
        if pdu_type == _A_ASSOCIATE_RQ:
            self._request_seen = True
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    def _recv(self, count: int, deadline: float | None) -> bytes:
        """Up to ``count`` bytes, fewer if the peer closed; ``TimeoutError`` once
        ``deadline`` (``time.monotonic``) passes before they came."""
        raw = self._dul.socket.socket
        if raw is None:
            return b""
        previous = raw.gettimeout()
        received = bytearray()
        try:
            while len(received) < count:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("PDU not received within the network timeout")
                    raw.settimeout(remaining if previous is None else min(remaining, previous))
                chunk = raw.recv(min(count - len(received), 65536))
                if not chunk:
                    break
                received += chunk
        finally:
            if deadline is not None:
                raw.settimeout(previous)
        return bytes(received)

    def _closed_on_error(self) -> None:
        """The connection failed or timed out, maybe within a PDU: report it closed, and
        read nothing more from it (the stream may be cut mid-PDU)."""
        self._refused = True
        self._report("Evt17")

    def _report(self, event: str) -> None:
        """Put a DUL event (Evt17, Evt19); before any A-ASSOCIATE-RQ, wake the acceptor."""
        self._dul.event_queue.put(event)
        if not self._request_seen and not self._woken:
            self._woken = True
            self._dul.to_user_queue.put(None)

    def _refuse(self, message: str, *args: object) -> None:
        LOGGER.warning(message, *args)
        self._refused = True
        self._report("Evt19")
