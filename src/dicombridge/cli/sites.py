"""The ``dicombridge sites`` commands (registered on the app by importing this module).

The federation operator's view of the signed directory: the draft in the operator
workspace, compared site by site with the last signed ``directory.json``. ``add`` and
``remove`` sign by default (``--no-sign`` only stages the change in the draft, as the
``directory add-site`` and ``remove-site`` commands do).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dicombridge import directory as fed
from dicombridge.cli import JsonOption, OperatorDirOption, _out, app, stdout_console
from dicombridge.keys import utc_now
from dicombridge.operator import OperatorWorkspace, SignedState, SiteView, key_fingerprint

sites_app = typer.Typer(
    help="The federation's sites in the signed directory (operator): list, add, remove, show.",
    no_args_is_help=True,
)
app.add_typer(sites_app, name="sites")

SignOption = Annotated[
    bool,
    typer.Option(
        "--sign/--no-sign",
        help="Sign the directory right away (default), or only change the draft.",
    ),
]
SiteArgument = Annotated[str, typer.Argument(help="The site's id, e.g. hosp-a.")]

_STATE_TEXT = {
    SignedState.SIGNED: "yes",
    SignedState.CHANGED: "no: changed in the draft",
    SignedState.NEW: "no: new in the draft",
    SignedState.REMOVED: "no: removed from the draft",
}


@sites_app.command("list")
def sites_list(directory: OperatorDirOption, as_json: JsonOption = False) -> None:
    """Every site: broker user, key ids, validity, and whether directory.json has it as
    in the draft."""
    workspace = OperatorWorkspace(directory)
    views = workspace.sites()
    draft = workspace.draft()
    signed = workspace.last_signed()
    behind = workspace.is_behind()
    if as_json:
        document = {
            "federation": draft.federation,
            "signed_version": signed.version if signed else None,
            "signed_issued_at": signed.body.issued_at.isoformat() if signed else None,
            "behind": behind,
            "sites": [_site_row(view) for view in views],
        }
        _out(json.dumps(document, indent=2))
        return
    table = Table(title=f"federation {draft.federation}", title_justify="left")
    for column in ("site", "broker user", "KEM keys", "signing keys", "valid", "signed"):
        table.add_column(column, no_wrap=column != "valid")
    for view in views:
        row = _site_row(view)
        table.add_row(
            view.entry.id,
            view.entry.broker_user,
            "\n".join(k.key_id[:12] for k in view.entry.kem_keys),
            "\n".join(k.key_id[:12] for k in view.entry.signing_keys),
            _validity_text(row),
            _STATE_TEXT[view.state],
        )
    stdout_console().print(table if views else "(no site in the draft)")
    if signed is None:
        _out(f"not signed yet: run `dicombridge directory sign --dir {workspace.root}`")
    elif behind:
        _out(
            f"directory.json (version {signed.version}) is behind the draft: run "
            f"`dicombridge directory sign --dir {workspace.root}`"
        )
    else:
        _out(f"directory.json version {signed.version} ({signed.body.issued_at}) is up to date")


@sites_app.command("add")
def sites_add(
    export: Annotated[
        Path, typer.Argument(help="The file a site's `dicombridge keys export` wrote.")
    ],
    directory: OperatorDirOption,
    sign: SignOption = True,
) -> None:
    """Add a site from its exported public keys (or replace its earlier entry); sign."""
    workspace = OperatorWorkspace(directory)
    before = workspace.draft()
    entry = workspace.add_site(export)
    previous = before.site(entry.id)
    if previous is None:
        what = "added to the draft"
    elif previous == entry:
        what = "unchanged in the draft"
    else:
        what = "replaced in the draft (its earlier entry is gone)"
    _out(f"site {entry.id} (broker user {entry.broker_user}) {what}")
    _sign_or_say(workspace, sign)


@sites_app.command("remove")
def sites_remove(site: SiteArgument, directory: OperatorDirOption, sign: SignOption = True) -> None:
    """Remove a site from the directory; sign (sites then refuse what it sends)."""
    workspace = OperatorWorkspace(directory)
    workspace.remove_site(site)
    _out(f"site {site} removed from the draft")
    _sign_or_say(workspace, sign)


@sites_app.command("show")
def sites_show(
    site: SiteArgument, directory: OperatorDirOption, as_json: JsonOption = False
) -> None:
    """One site: every field, each key's id, fingerprint and validity."""
    workspace = OperatorWorkspace(directory)
    view = workspace.site_view(site)
    signed = workspace.last_signed()
    now = utc_now()
    keys = [
        {
            "kind": key.kind,
            "key_id": key.key_id,
            "fingerprint_sha256": key_fingerprint(key),
            "public": key.public,
            "not_before": key.not_before.isoformat(),
            "not_after": key.not_after.isoformat() if key.not_after else None,
            "revoked": key.revoked,
            "valid_now": key.validity.valid_at(now),
        }
        for key in [*view.entry.kem_keys, *view.entry.signing_keys]
    ]
    document: dict[str, Any] = {
        "id": view.entry.id,
        "broker_user": view.entry.broker_user,
        "state": view.state.value,
        "signed_version": signed.version if signed else None,
        "keys": keys,
    }
    if as_json:
        _out(json.dumps(document, indent=2))
        return
    _out(f"site          {view.entry.id}")
    _out(f"broker user   {view.entry.broker_user}")
    version = f" (directory.json version {signed.version})" if signed else ""
    _out(f"signed        {_STATE_TEXT[view.state]}{version}")
    for key in keys:
        label = "KEM key" if key["kind"] != "ed25519" else "signing key"
        _out(f"{label:<13} {key['key_id']}")
        _out(f"  kind        {key['kind']}")
        fingerprint = str(key["fingerprint_sha256"])
        _out(f"  fingerprint {' '.join(fingerprint[i : i + 4] for i in range(0, 64, 4))}")
        until = key["not_after"] or "open"
        state = (
            "revoked" if key["revoked"] else "valid now" if key["valid_now"] else "not valid now"
        )
        _out(f"  valid       from {key['not_before']} until {until}: {state}")


def _sign_or_say(workspace: OperatorWorkspace, sign: bool) -> None:
    if not sign:
        _out(f"not signed: run `dicombridge directory sign --dir {workspace.root}` to publish it")
        return
    if not workspace.is_behind():
        signed = workspace.last_signed()
        assert signed is not None  # not behind: there is a signed directory
        _out(f"directory.json version {signed.version} has it already; nothing to sign")
        return
    signed = workspace.sign()
    _out(
        f"signed version {signed.version} with {len(signed.sites)} site(s): "
        f"{workspace.root / 'directory.json'} (distribute it to every site)"
    )


def _site_row(view: SiteView) -> dict[str, Any]:
    """One site for ``list --json``: ids, broker user, validity of its keys, state."""
    entry = view.entry
    keys = [*entry.kem_keys, *entry.signing_keys]
    now = utc_now()
    not_afters = [k.not_after for k in keys]
    return {
        "id": entry.id,
        "broker_user": entry.broker_user,
        "kem_keys": [k.key_id for k in entry.kem_keys],
        "signing_keys": [k.key_id for k in entry.signing_keys],
        "valid_from": min(k.not_before for k in keys).isoformat(),
        "valid_until": None if None in not_afters else _latest(not_afters).isoformat(),
        "valid_now": _valid_now(entry.kem_keys, now) and _valid_now(entry.signing_keys, now),
        "state": view.state.value,
    }


def _latest(times: list[datetime | None]) -> datetime:
    return max(t for t in times if t is not None)


def _valid_now(keys: list[fed.PublicKeyEntry], now: datetime) -> bool:
    return any(key.validity.valid_at(now) for key in keys)


def _validity_text(row: dict[str, Any]) -> str:
    text = f"{row['valid_from'][:10]} → {(row['valid_until'] or 'open')[:10]}"
    return text if row["valid_now"] else f"{text} (no valid key now)"
