"""The ``dicombridge status`` command (registered on the app by importing this module).

It reads the running gateway's ``/status`` (``[monitoring]`` in ``gateway.toml``, see
``dicombridge.health``) and shows it as tables. A gateway that does not answer is said
in one line naming the URL; the storage areas are then read from disk, and the command
exits 1.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx
import typer
from rich.table import Table

from dicombridge import config as site_config
from dicombridge.cli import (
    ConfigOption,
    JsonOption,
    _age_text,
    _out,
    _size_text,
    app,
    stdout_console,
)
from dicombridge.keys import utc_now
from dicombridge.metrics import measure_storage

STATUS_TIMEOUT_S: Final = 5.0
# A [monitoring] host that listens everywhere is reached on loopback from this machine.
_LOOPBACK: Final = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}  # noqa: S104 - compared, not bound


def status_url(cfg: site_config.SiteConfig) -> str:
    """Where the gateway of ``cfg`` serves ``/status``."""
    host = _LOOPBACK.get(cfg.monitoring.host, cfg.monitoring.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.monitoring.port}/status"


class _NoAnswer(Exception):
    """The gateway did not answer ``/status`` with its document."""


def _fetch(url: str) -> dict[str, Any]:
    try:
        # trust_env off: a proxy from the environment must not stand between us and loopback.
        response = httpx.get(url, timeout=STATUS_TIMEOUT_S, trust_env=False)
    except httpx.ConnectError as exc:
        raise _NoAnswer("nothing listens there") from exc
    except httpx.TimeoutException as exc:
        raise _NoAnswer(f"no answer within {STATUS_TIMEOUT_S:.0f} s") from exc
    except httpx.HTTPError as exc:
        raise _NoAnswer(type(exc).__name__) from exc
    if response.status_code != 200:
        raise _NoAnswer(f"HTTP {response.status_code}")
    try:
        document = response.json()
    except ValueError as exc:
        raise _NoAnswer("not a status document") from exc
    if not isinstance(document, dict):
        raise _NoAnswer("not a status document")
    return document


@app.command("status")
def status(config: ConfigOption = Path("gateway.toml"), as_json: JsonOption = False) -> None:
    """The running gateway at a glance: broker, remote sites, local nodes, outbox, spool
    and quarantine, the last transfers. Exit 1 if the gateway does not answer (the
    storage areas are then read from disk)."""
    cfg = site_config.load(config)
    url = status_url(cfg)
    try:
        if not cfg.monitoring.enabled:
            raise _NoAnswer("[monitoring] enabled = false")
        document = _fetch(url)
    except _NoAnswer as exc:
        typer.echo(
            f"error: the gateway does not answer at {url} ({exc}): is it running "
            f"(`dicombridge gateway run -c {config}`)? is [monitoring] enabled, on this "
            f"host and port, in {config}? Storage below is read from disk.",
            err=True,
        )
        areas = measure_storage(cfg.storage.root)
        if as_json:
            fallback = {
                "site": cfg.site.id,
                "gateway": {"url": url, "answered": False, "error": str(exc)},
                "storage": [area.summary() for area in areas],
            }
            _out(json.dumps(fallback, indent=2))
        else:
            stdout_console().print(_storage_table([area.summary() for area in areas]))
        raise typer.Exit(1) from None
    if as_json:
        _out(json.dumps(document, indent=2))
        return
    _show(document)


def _age_since(value: object, now: datetime) -> str:
    if not value:
        return "never"
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return f"{_age_text(max(0.0, (now - at).total_seconds()))} ago"


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _show(document: dict[str, Any]) -> None:
    console = stdout_console()
    now = utc_now()
    ready = "ready" if document.get("ready") else "NOT READY"
    console.print(f"site {document.get('site')}: {ready} (up since {document.get('started_at')})")
    broker = document.get("broker") or {}
    state = "connected" if broker.get("connected") else "DISCONNECTED"
    since = _age_since(broker.get("since"), now)
    console.print(f"broker: {state} since {since}, node {_text(broker.get('node'))}")
    directory = document.get("directory") or {}
    line = f"directory: version {directory.get('version')}"
    if not directory.get("ok", True):
        line += f", NOT VALID: {directory.get('error')}"
    console.print(line)

    sites = Table(title="remote sites")
    for column in ("site", "last contact"):
        sites.add_column(column)
    for site in document.get("remote_sites") or []:
        sites.add_row(str(site.get("site")), _age_since(site.get("last_contact"), now))
    console.print(sites)

    nodes = Table(title="local nodes (C-ECHO)")
    for column in ("node", "answers", "status", "checked"):
        nodes.add_column(column)
    for node in document.get("local_nodes") or []:
        nodes.add_row(
            str(node.get("name")),
            "yes" if node.get("ok") else f"NO ({_text(node.get('error'))})",
            _text(node.get("status")),
            _age_since(node.get("checked_at"), now),
        )
    console.print(nodes)

    console.print(_storage_table(document.get("storage") or []))

    transfers = Table(title="last transfers (newest first)")
    for column in ("id", "direction", "site", "route/node", "size", "outcome", "status", "when"):
        transfers.add_column(column)
    for item in document.get("recent_transfers") or []:
        size = item.get("size_bytes")
        transfers.add_row(
            str(item.get("transfer_id", ""))[:12],
            str(item.get("direction")),
            str(item.get("site")),
            _text(item.get("route") or item.get("node")),
            "-" if size is None else _size_text(int(size)),
            str(item.get("outcome")),
            _text(item.get("status")),
            _age_since(item.get("at"), now),
        )
    console.print(transfers)


def _storage_table(areas: list[dict[str, Any]]) -> Table:
    table = Table(title="storage")
    for column in ("area", "count", "size", "oldest"):
        table.add_column(column)
    for area in areas:
        oldest = area.get("oldest_age_s")
        table.add_row(
            str(area.get("area")),
            str(area.get("count")),
            _size_text(int(area.get("size_bytes") or 0)),
            "-" if oldest is None else _age_text(float(oldest)),
        )
    return table
