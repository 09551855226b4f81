"""Control-plane messages: receipts now; queries, retrieves and deep echoes later.

Each is a sealed document (``Kind.CONTROL``): signed by the sending site, sealed for the
recipient, carried on the ``control`` plane so that it never waits behind bulk. The
document's ``type`` says what it is; unknown types are refused, not guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from dicombridge.directory import Directory
from dicombridge.envelope import Kind, Sender, new_id, open_document, seal_document
from dicombridge.errors import EnvelopeError, IntegrityError, KeyMaterialError
from dicombridge.keys import SiteKeys, newest_valid, utc_now

RECEIPT: Final = "receipt"
Outcome = Literal["stored", "failed"]


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
