"""Control-plane messages: receipts, queries and their responses, cancels.

Each is a sealed document (``Kind.CONTROL``): signed by the sending site, sealed for the
recipient, carried on the ``control`` plane so that it never waits behind bulk. The
document's ``type`` says what it is; unknown types are refused, not guessed at.

- ``receipt``: the recipient's word on a transfer (stored or failed), back to its sender;
- ``query``: a C-FIND, C-MOVE, C-GET or deep C-ECHO that a requester at one site sends
  to the site whose PACS answers it; the Identifier travels as encoded bytes (Explicit VR
  Little Endian), so that Specific Character Set and every value pass unchanged;
- ``query-response``: one response to a query, numbered from 0 (``seq``): pending
  matches or progress, then exactly one ``final`` with the status (and Error Comment);
- ``cancel``: the requester's C-CANCEL, or its giving up, for a query.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, get_args

from dicombridge.directory import Directory
from dicombridge.envelope import Kind, Sender, new_id, open_document, seal_document
from dicombridge.errors import EnvelopeError, IntegrityError, KeyMaterialError
from dicombridge.keys import SiteKeys, newest_valid, utc_now

RECEIPT: Final = "receipt"
QUERY: Final = "query"
QUERY_RESPONSE: Final = "query-response"
CANCEL: Final = "cancel"
Outcome = Literal["stored", "failed"]
Operation = Literal["find", "move", "get", "echo"]
InformationModel = Literal["patient", "study"]
# A query's id: 16 random bytes, hex (as transfer ids).
_QUERY_ID_CHARS: Final = 32


@dataclass(frozen=True)
class Receipt:
    """The recipient's signed word on a transfer: stored (maybe with a warning) or failed.

    ``status`` is the DIMSE status the PACS answered (or the gateway's own, e.g. 0xA801
    for an unknown node); ``error_comment`` is the PACS's Error Comment, if any.
    """

    transfer_id: bytes
    outcome: Outcome
    status: int
    error_comment: str | None = None
    created_at: datetime | None = None

    def to_document(self) -> dict[str, Any]:
        return {
            "type": RECEIPT,
            "transfer_id": self.transfer_id.hex(),
            "outcome": self.outcome,
            "status": self.status,
            "error_comment": self.error_comment,
            "created_at": (self.created_at or utc_now()).isoformat(),
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Receipt:
        try:
            outcome = document["outcome"]
            status = document["status"]
            comment = document.get("error_comment")
            if outcome not in ("stored", "failed") or type(status) is not int:
                raise TypeError("outcome or status malformed")
            if comment is not None and not isinstance(comment, str):
                raise TypeError("error_comment malformed")
            return cls(
                transfer_id=bytes.fromhex(str(document["transfer_id"])),
                outcome=outcome,
                status=status,
                error_comment=comment,
                created_at=datetime.fromisoformat(str(document["created_at"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError("receipt field missing or malformed") from exc


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("identifier malformed")
    return base64.b64decode(value, validate=True)


def _query_id(value: object) -> str:
    if not isinstance(value, str) or len(value) != _QUERY_ID_CHARS:
        raise TypeError("query_id malformed")
    bytes.fromhex(value)
    return value


def _optional_str(value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{what} malformed")
    return value


@dataclass(frozen=True)
class Query:
    """A query or retrieve for the recipient's PACS, on behalf of a node at the sender.

    ``node`` is the name, at the recipient, of the node the route points to; the AE titles
    are those of the association at the sender (for the recipient's policy and audit).
    ``timeout_s`` is how long the requester waits: a query older than that is not run.
    ``accepted`` (C-GET) lists the (SOP Class UID, Transfer Syntax UID) pairs the
    requester accepted for its storage sub-operations. ``destination`` (C-MOVE) is the
    requester's local node that receives the instances, and ``message_id`` the Message ID
    of the requester's C-MOVE or C-GET: the retrieved transfers carry both back, so the
    requester can deliver them with Move Originator set even after a restart.
    """

    query_id: str
    operation: Operation
    node: str
    calling_ae_title: str
    called_ae_title: str
    timeout_s: float
    model: InformationModel | None = None
    identifier: bytes | None = None
    accepted: tuple[tuple[str, str], ...] = ()
    destination: str | None = None
    message_id: int | None = None

    def to_document(self) -> dict[str, Any]:
        return {
            "type": QUERY,
            "destination": self.destination,
            "message_id": self.message_id,
            "query_id": self.query_id,
            "operation": self.operation,
            "node": self.node,
            "calling_ae_title": self.calling_ae_title,
            "called_ae_title": self.called_ae_title,
            "timeout_s": self.timeout_s,
            "model": self.model,
            "identifier": _b64(self.identifier),
            "accepted": [list(pair) for pair in self.accepted],
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Query:
        try:
            operation = document["operation"]
            model = document.get("model")
            timeout_s = document["timeout_s"]
            if operation not in get_args(Operation):
                raise TypeError("operation malformed")
            if model is not None and model not in get_args(InformationModel):
                raise TypeError("model malformed")
            if type(timeout_s) not in (int, float) or not 0 < timeout_s <= 86400:
                raise TypeError("timeout_s malformed")
            accepted = tuple(
                (str(pair[0]), str(pair[1]))
                for pair in document.get("accepted") or ()
                if isinstance(pair, list) and len(pair) == 2
            )
            message_id = document.get("message_id")
            if message_id is not None and (
                type(message_id) is not int or not 0 <= message_id <= 0xFFFF
            ):
                raise TypeError("message_id malformed")
            strings = {
                key: document[key] for key in ("node", "calling_ae_title", "called_ae_title")
            }
            if not all(isinstance(value, str) and value for value in strings.values()):
                raise TypeError("node or AE title malformed")
            return cls(
                query_id=_query_id(document["query_id"]),
                operation=operation,
                node=strings["node"],
                calling_ae_title=strings["calling_ae_title"],
                called_ae_title=strings["called_ae_title"],
                timeout_s=float(timeout_s),
                model=model,
                identifier=_unb64(document.get("identifier")),
                accepted=accepted,
                destination=_optional_str(document.get("destination"), "destination"),
                message_id=message_id,
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise IntegrityError("query field missing or malformed") from exc


@dataclass(frozen=True)
class SubOperations:
    """C-MOVE/C-GET sub-operation counts (PS3.7 9.1.3/9.1.4)."""

    remaining: int | None
    completed: int
    failed: int
    warning: int


@dataclass(frozen=True)
class QueryResponse:
    """One response to a query: pending (a match, or progress) or the ``final`` one.

    ``clock`` is the responder's time (seconds since the epoch, fractional) when it sent
    the response: a deep echo reports the skew between the sites from it.
    """

    query_id: str
    seq: int
    status: int
    final: bool
    identifier: bytes | None = None
    error_comment: str | None = None
    counts: SubOperations | None = None
    failed_sop_instance_uids: tuple[str, ...] = ()
    clock: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "type": QUERY_RESPONSE,
            "query_id": self.query_id,
            "seq": self.seq,
            "status": self.status,
            "final": self.final,
            "identifier": _b64(self.identifier),
            "error_comment": self.error_comment,
            "counts": None
            if counts is None
            else [counts.remaining, counts.completed, counts.failed, counts.warning],
            "failed_sop_instance_uids": list(self.failed_sop_instance_uids),
            "clock": self.clock,
            "detail": self.detail,
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> QueryResponse:
        try:
            seq, status, final = document["seq"], document["status"], document["final"]
            if type(seq) is not int or seq < 0 or type(status) is not int:
                raise TypeError("seq or status malformed")
            if not 0 <= status <= 0xFFFF or type(final) is not bool:
                raise TypeError("status or final malformed")
            raw_counts = document.get("counts")
            counts = None
            if raw_counts is not None:
                if not isinstance(raw_counts, list) or len(raw_counts) != 4:
                    raise TypeError("counts malformed")
                remaining, completed, failed, warning = raw_counts
                if remaining is not None and type(remaining) is not int:
                    raise TypeError("counts malformed")
                if not all(type(n) is int and n >= 0 for n in (completed, failed, warning)):
                    raise TypeError("counts malformed")
                counts = SubOperations(remaining, completed, failed, warning)
            failed_uids = document.get("failed_sop_instance_uids") or []
            if not isinstance(failed_uids, list) or not all(
                isinstance(uid, str) for uid in failed_uids
            ):
                raise TypeError("failed_sop_instance_uids malformed")
            clock = document.get("clock")
            if clock is not None and type(clock) not in (int, float):
                raise TypeError("clock malformed")
            detail = document.get("detail") or {}
            if not isinstance(detail, dict):
                raise TypeError("detail malformed")
            return cls(
                query_id=_query_id(document["query_id"]),
                seq=seq,
                status=status,
                final=final,
                identifier=_unb64(document.get("identifier")),
                error_comment=_optional_str(document.get("error_comment"), "error_comment"),
                counts=counts,
                failed_sop_instance_uids=tuple(failed_uids),
                clock=None if clock is None else float(clock),
                detail=detail,
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise IntegrityError("query response field missing or malformed") from exc


@dataclass(frozen=True)
class Cancel:
    """The requester cancels a query (C-CANCEL, or it stopped waiting)."""

    query_id: str

    def to_document(self) -> dict[str, Any]:
        return {"type": CANCEL, "query_id": self.query_id}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Cancel:
        try:
            return cls(_query_id(document["query_id"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError("cancel field missing or malformed") from exc


@dataclass(frozen=True)
class ControlMessage:
    """An opened control message from ``sender_site``."""

    type: str
    document: dict[str, Any]
    sender_site: str
    message_id: str


def seal_control(
    document: dict[str, Any], *, sender: Sender, directory: Directory, recipient_site: str
) -> tuple[str, bytes]:
    """Seal a control document for ``recipient_site``'s newest valid key: (message id, body)."""
    entry = directory.site(recipient_site)
    if entry is None:
        raise KeyMaterialError(f"site {recipient_site!r} is not in the directory")
    key = newest_valid(entry.kem_public_keys(), utc_now())
    if key is None:
        raise KeyMaterialError(f"site {recipient_site!r} has no valid KEM key in the directory")
    message_id = new_id()
    document = {"created_at": utc_now().isoformat(), **document}
    body = seal_document(
        Kind.CONTROL,
        message_id,
        document,
        sender=sender,
        recipient_site=recipient_site,
        recipient_key=key,
    )
    return message_id.hex(), body


def open_control(
    body: bytes, *, from_site: str, site_id: str, keys: SiteKeys, directory: Directory
) -> ControlMessage:
    """Open a control message that the broker delivered from ``from_site``.

    The signed sender must be the site the broker vouched for (``user_id``/routing key).
    """
    opened = open_document(body, site_id=site_id, keys=keys, directory=directory)
    if opened.header.kind is not Kind.CONTROL:
        raise EnvelopeError(f"{opened.header.kind.name} message on the control plane")
    if opened.sender_site != from_site:
        raise IntegrityError(
            f"control message signed by {opened.sender_site!r} arrived from {from_site!r}"
        )
    kind = opened.document.get("type")
    if not isinstance(kind, str):
        raise IntegrityError("control message without a type")
    return ControlMessage(kind, opened.document, opened.sender_site, opened.header.id_hex)
