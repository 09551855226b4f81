"""The federation operator's workspace: the operator key, the directory draft, signing.

::

    OPDIR/operator.key          Ed25519 signing key (0600): signs the directory
    OPDIR/operator.json         federation name and the operator's public key
    OPDIR/directory.draft.json  the unsigned working copy that add/remove edit
    OPDIR/directory.json        the newest signed directory, to distribute to sites
    OPDIR/broker-users/SITE     each site's broker password (0600), made at provisioning

Sites hand in what ``dicombridge keys export`` printed; the operator adds it, signs
(the version grows by one at least), and distributes ``directory.json``. ``sites()``
compares the draft with the last signed directory, site by site, so that the operator
sees what is not published yet (``dicombridge sites list``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from pydantic import SecretStr, ValidationError

from dicombridge import directory as fed
from dicombridge.durable import write_durably
from dicombridge.errors import ConfigError, DirectoryError, KeyMaterialError
from dicombridge.keys import (
    SigningPrivateKey,
    SigningPublicKey,
    Validity,
    b64decode,
    b64encode,
    load_signing_key,
    utc_now,
    write_private,
)
from dicombridge.topology import SiteAccount

OPERATOR_KEY: Final = "operator.key"
OPERATOR_INFO: Final = "operator.json"
DRAFT: Final = "directory.draft.json"
SIGNED: Final = "directory.json"
BROKER_USERS: Final = "broker-users"


def operator_public_key(text: str, *, source: Path | str, field: str) -> SigningPublicKey:
    """Parse the operator's base64 public key as pinned in a gateway's config."""
    try:
        raw = b64decode(text.strip(), what=field, length=32)
        return SigningPublicKey(raw, Validity(not_before=datetime.min.replace(tzinfo=UTC)))
    except KeyMaterialError as exc:
        raise ConfigError(
            source, field, str(exc), "paste the output of `dicombridge operator key`"
        ) from exc


def key_fingerprint(key: fed.PublicKeyEntry) -> str:
    """SHA-256 (hex) over the same input as the key id, which is its first 32 digits
    (``keys.key_id_for``): read it to the site over the phone to check a key handed in."""
    raw = b64decode(key.public, what="public")
    return hashlib.sha256(b"dicombridge-key-v1/" + key.kind.encode() + b"/" + raw).hexdigest()


class SignedState(enum.StrEnum):
    """A site of the draft compared with the last signed directory."""

    SIGNED = "signed"  # in directory.json exactly as in the draft
    CHANGED = "changed"  # in both, but the draft differs: sign to publish
    NEW = "new"  # only in the draft: sign to publish
    REMOVED = "removed"  # only in directory.json: removed from the draft, sign to publish


@dataclass(frozen=True)
class SiteView:
    """A site as the operator sees it: its entry (the draft's, or the signed one if
    removed from the draft) and whether directory.json has it as in the draft."""

    entry: fed.SiteEntry
    state: SignedState


class OperatorWorkspace:
    """An operator directory; create it with ``init``, then edit, sign, provision."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def init(cls, root: Path, *, federation: str) -> OperatorWorkspace:
        if (root / OPERATOR_KEY).exists():
            raise ConfigError(
                root / OPERATOR_KEY,
                "(file)",
                "an operator key already exists",
                "use another --dir, or keep using this workspace",
            )
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = SigningPrivateKey.generate()
        write_private(root / OPERATOR_KEY, key.to_json())
        info = {
            "federation": federation,
            "key_id": key.key_id,
            "public": b64encode(key.public.ed25519),
        }
        write_durably(root / OPERATOR_INFO, (json.dumps(info, indent=2) + "\n").encode())
        workspace = cls(root)
        workspace.save_draft(fed.new_body(federation))
        return workspace

    def _require(self) -> None:
        if not (self.root / OPERATOR_KEY).exists():
            raise ConfigError(
                self.root,
                "(directory)",
                "not an operator workspace (no operator.key)",
                "run `dicombridge operator init --dir DIR` or point --dir at the workspace",
            )

    def signing_key(self) -> SigningPrivateKey:
        self._require()
        return load_signing_key(self.root / OPERATOR_KEY)

    def public_key_b64(self) -> str:
        return b64encode(self.signing_key().public.ed25519)

    def draft(self) -> fed.DirectoryBody:
        self._require()
        path = self.root / DRAFT
        return fed.parse_body(fed.read_json(path), path=path)

    def save_draft(self, body: fed.DirectoryBody) -> None:
        text = json.dumps(body.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
        write_durably(self.root / DRAFT, text.encode())

    def last_signed(self) -> fed.Directory | None:
        path = self.root / SIGNED
        if not path.exists():
            return None
        return fed.verify_document(fed.read_json(path), self.signing_key().public, path=path)

    def add_site(self, export_path: Path) -> fed.SiteEntry:
        """Add (or replace) a site from the file that ``dicombridge keys export`` wrote."""
        raw = fed.read_json(export_path)
        try:
            entry = fed.SiteEntry.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise DirectoryError(
                export_path,
                ".".join(str(p) for p in first["loc"]) or "(document)",
                first["msg"],
                "ask the site for a fresh `dicombridge keys export` output",
            ) from exc
        _check_usable(entry, export_path)
        draft = self.draft()
        clash = draft.site_for_broker_user(entry.broker_user)
        if clash is not None and clash.id != entry.id:
            raise DirectoryError(
                export_path,
                "broker_user",
                f"{entry.broker_user!r} is already the broker user of {clash.id!r}",
                "give each site its own broker user (dicombridge init --broker-user)",
            )
        self.save_draft(draft.with_site(entry))
        return entry

    def remove_site(self, site_id: str) -> None:
        draft = self.draft()
        if draft.site(site_id) is None:
            raise self._unknown_site(site_id, draft)
        self.save_draft(draft.without_site(site_id))

    def sites(self) -> list[SiteView]:
        """Every site of the draft and of the last signed directory, by id, with how the
        signed directory stands against the draft."""
        draft = self.draft()
        signed = self.last_signed()
        published = {entry.id: entry for entry in signed.sites} if signed else {}
        views = []
        for entry in draft.sites:
            before = published.pop(entry.id, None)
            if before is None:
                state = SignedState.NEW
            else:
                state = SignedState.SIGNED if before == entry else SignedState.CHANGED
            views.append(SiteView(entry, state))
        views += [SiteView(entry, SignedState.REMOVED) for entry in published.values()]
        return sorted(views, key=lambda view: view.entry.id)

    def site_view(self, site_id: str) -> SiteView:
        """One site of ``sites()``; an unknown id names the known ones."""
        for view in self.sites():
            if view.entry.id == site_id:
                return view
        raise self._unknown_site(site_id, self.draft())

    def is_behind(self) -> bool:
        """Whether directory.json lacks a change made in the draft (or does not exist)."""
        if self.last_signed() is None:
            return True
        return any(view.state is not SignedState.SIGNED for view in self.sites())

    def _unknown_site(self, site_id: str, draft: fed.DirectoryBody) -> DirectoryError:
        known = ", ".join(entry.id for entry in draft.sites) or "none yet"
        return DirectoryError(
            self.root / DRAFT,
            "sites",
            f"no site {site_id!r} in the draft (known: {known})",
            f"check the id with `dicombridge sites list --dir {self.root}`",
        )

    def sign(self) -> fed.Directory:
        """Sign the draft with a version above every one signed before; write directory.json."""
        key = self.signing_key()
        body = fed.next_version(self.draft(), self.last_signed())
        document = fed.sign(body, key)
        write_durably(
            self.root / SIGNED, (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
        )
        self.save_draft(body)
        return fed.verify_document(document, key.public, path=self.root / SIGNED)

    def site_accounts(self) -> list[SiteAccount]:
        """Every site of the signed directory with its broker user and password."""
        signed = self.last_signed()
        if signed is None:
            raise ConfigError(
                self.root / SIGNED,
                "(file)",
                "no signed directory yet",
                "run `dicombridge directory sign` first: the broker serves the signed sites",
            )
        return [
            SiteAccount(
                site_id=entry.id,
                broker_user=entry.broker_user,
                password=self.broker_password(entry.id),
            )
            for entry in signed.sites
        ]

    def broker_password(self, site_id: str) -> SecretStr:
        """The site's broker password, made (random, 0600) the first time it is asked for."""
        path = self.root / BROKER_USERS / site_id
        if not path.exists():
            path.parent.mkdir(mode=0o700, exist_ok=True)
            write_durably(path, (secrets.token_urlsafe(24) + "\n").encode(), mode=0o600)
        return SecretStr(path.read_text().strip())


def _check_usable(entry: fed.SiteEntry, export_path: Path) -> None:
    """A site needs a KEM key and a signing key that are not revoked or expired: other
    sites could neither seal to it nor check what it signs."""
    now = utc_now()
    for field, keys in (("kem_keys", entry.kem_keys), ("signing_keys", entry.signing_keys)):
        if not any(
            not key.revoked and (key.not_after is None or key.not_after > now) for key in keys
        ):
            raise DirectoryError(
                export_path,
                field,
                "every key is revoked or expired",
                "ask the site for a fresh `dicombridge keys export` after adding a key",
            )
