"""The ``dicombridge`` command: the only place that prints or configures logging.

Every command reports a ``BridgeError`` as one line naming the file, the field and the
fix, and exits with status 2; it never prints a traceback at an operator.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicombridge import config as site_config
from dicombridge import identity, retention, routing_table
from dicombridge.errors import BridgeError, ConfigError
from dicombridge.keys import SiteKeys, utc_now
from dicombridge.management import ManagementClient
from dicombridge.operator import OperatorWorkspace
from dicombridge.outbox import Outbox
from dicombridge.qr_scu import QuerySCU
from dicombridge.quarantine import Quarantine
from dicombridge.topology import Limits, PlaneLimits, build_definitions

app = typer.Typer(
    name="dicombridge",
    help="A DICOM bridge between hospitals through an end-to-end encrypted RabbitMQ tenant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="This site's keys.", no_args_is_help=True)
operator_app = typer.Typer(
    help="The federation operator's key and workspace.", no_args_is_help=True
)
directory_app = typer.Typer(
    help="Edit and sign the federation directory (operator).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
app.add_typer(operator_app, name="operator")
broker_app = typer.Typer(help="The federation's RabbitMQ tenant (operator).", no_args_is_help=True)
app.add_typer(directory_app, name="directory")
app.add_typer(broker_app, name="broker")
gateway_app = typer.Typer(help="Run this site's gateway.", no_args_is_help=True)
sandbox_app = typer.Typer(
    help="A local federation to try things out: broker, PACS and gateways.", no_args_is_help=True
)
app.add_typer(gateway_app, name="gateway")
quarantine_app = typer.Typer(
    help="Transfers set aside at this site: list, show, retry, purge.", no_args_is_help=True
)
outbox_app = typer.Typer(
    help="Instances waiting for the recipient's receipt.", no_args_is_help=True
)
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(outbox_app, name="outbox")
app.add_typer(sandbox_app, name="sandbox")
nodes_app = typer.Typer(
    help="This hospital's DICOM nodes the gateway sends to and queries.", no_args_is_help=True
)
app.add_typer(nodes_app, name="nodes")

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="The site's gateway.toml.", envvar="DICOMBRIDGE_CONFIG"),
]
OperatorDirOption = Annotated[
    Path,
    typer.Option("--dir", help="The operator workspace.", envvar="DICOMBRIDGE_OPERATOR_DIR"),
]


def _out(text: str) -> None:
    typer.echo(text)


@app.command()
def init(
    site: Annotated[str, typer.Option(help="This site's id, a lowercase slug such as hosp-a.")],
    directory: Annotated[Path, typer.Option("--dir", help="Where to create the site.")] = Path(),
    broker_url: Annotated[
        str | None,
        typer.Option(help="amqps://USER@HOST:PORT/VHOST (default: user = site id)."),
    ] = None,
    operator_key: Annotated[
        str, typer.Option(help="The operator's public key (`dicombridge operator key`).")
    ] = "",
) -> None:
    """Create a site: HPKE and Ed25519 key pairs (mode 0600) and a commented gateway.toml."""
    url = broker_url or f"amqps://{site}@broker.example.org:5671/dicombridge"
    config_path = identity.init_site(
        directory, site_id=site, broker_url=url, operator_key=operator_key
    )
    keys = SiteKeys.load(directory / "keys")
    _out(f"site {site} initialised: {config_path}")
    _out(f"  KEM key     {keys.kem_keys[0].key_id}  (ML-KEM-768 + X25519, for receiving)")
    _out(f"  signing key {keys.signing_keys[0].key_id}  (Ed25519)")
    _out("next: edit [broker] and [directory] in gateway.toml, then send the output of")
    _out(f"  dicombridge keys export --config {config_path}")
    _out("to the federation operator.")


@keys_app.command("export")
def keys_export(config: ConfigOption = Path("gateway.toml")) -> None:
    """Print this site's public keys and broker user, for the federation operator."""
    cfg = site_config.load(config)
    _out(identity.export_json(identity.export_public(cfg, SiteKeys.load(cfg.keys.dir))).rstrip())


@operator_app.command("init")
def operator_init(
    directory: OperatorDirOption,
    federation: Annotated[str, typer.Option(help="The federation's name.")] = "dicombridge",
) -> None:
    """Create the operator's signing key and an empty directory draft."""
    workspace = OperatorWorkspace.init(directory, federation=federation)
    _out(f"operator workspace created: {workspace.root}")
    _out(f"operator key: {workspace.public_key_b64()}")
    _out("give this key to every site ([directory] operator_key in gateway.toml).")


@operator_app.command("key")
def operator_key(directory: OperatorDirOption) -> None:
    """Print the operator's public key, which sites pin in their config."""
    _out(OperatorWorkspace(directory).public_key_b64())


@directory_app.command("add-site")
def directory_add_site(
    export: Annotated[Path, typer.Argument(help="A file written by `dicombridge keys export`.")],
    directory: OperatorDirOption,
) -> None:
    """Add a site's public keys to the draft (replacing its earlier entry)."""
    entry = OperatorWorkspace(directory).add_site(export)
    _out(f"site {entry.id} in the draft; run `dicombridge directory sign` to publish it")


@directory_app.command("remove-site")
def directory_remove_site(
    site: Annotated[str, typer.Argument(help="The site id to remove.")],
    directory: OperatorDirOption,
) -> None:
    """Remove a site from the draft."""
    OperatorWorkspace(directory).remove_site(site)
    _out(f"site {site} removed from the draft; run `dicombridge directory sign` to publish it")


@directory_app.command("sign")
def directory_sign(directory: OperatorDirOption) -> None:
    """Sign the draft with a new, higher version and write directory.json."""
    workspace = OperatorWorkspace(directory)
    signed = workspace.sign()
    _out(
        f"signed version {signed.version} with {len(signed.sites)} site(s): "
        f"{workspace.root / 'directory.json'}"
    )


@directory_app.command("show")
def directory_show(
    config: ConfigOption = Path("gateway.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Verify this site's directory against the pinned operator key and list its sites."""
    cfg = site_config.load(config)
    signed = identity.load_directory(cfg)
    if as_json:
        _out(json.dumps(signed.body.model_dump(mode="json"), indent=2))
        return
    _out(f"federation {signed.body.federation}, version {signed.version}, {signed.body.issued_at}")
    for entry in signed.sites:
        kem = ", ".join(k.key_id[:12] for k in entry.kem_keys)
        _out(f"  {entry.id:<20} user {entry.broker_user:<20} kem {kem}")


@broker_app.command("provision")
def broker_provision(
    directory: OperatorDirOption,
    management_url: Annotated[
        str, typer.Option(help="RabbitMQ management API, e.g. https://broker:15671.")
    ] = "http://127.0.0.1:15672",
    admin_user: Annotated[str, typer.Option(help="An administrator of the broker.")] = "admin",
    admin_password_file: Annotated[
        Path | None,
        typer.Option(
            help="File with the admin password (else $DICOMBRIDGE_BROKER_ADMIN_PASSWORD)."
        ),
    ] = None,
    vhost: Annotated[str, typer.Option(help="The federation's vhost.")] = "dicombridge",
    bulk_max_bytes: Annotated[
        int, typer.Option(help="Cap of each site's bulk queue (reject-publish beyond).")
    ] = Limits().bulk.max_length_bytes,
    control_max_bytes: Annotated[
        int, typer.Option(help="Cap of each site's control queue.")
    ] = Limits().control.max_length_bytes,
    delivery_limit: Annotated[
        int, typer.Option(help="Deliveries before a message is dead-lettered.")
    ] = Limits().bulk.delivery_limit,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the definitions; change nothing.")
    ] = False,
) -> None:
    """Create or update the vhost, exchanges, queues, users and permissions (idempotent)."""
    workspace = OperatorWorkspace(directory)
    limits = Limits(
        bulk=PlaneLimits(max_length_bytes=bulk_max_bytes, delivery_limit=delivery_limit),
        control=PlaneLimits(max_length_bytes=control_max_bytes, delivery_limit=delivery_limit),
    )
    definitions = build_definitions(vhost=vhost, accounts=workspace.site_accounts(), limits=limits)
    if dry_run:
        _out(definitions.render())
        return
    password = _admin_password(admin_password_file)
    with ManagementClient(management_url, user=admin_user, password=password) as client:
        client.apply(definitions)
    _out(
        f"provisioned vhost {vhost!r}: {len(definitions.exchanges)} exchanges, "
        f"{len(definitions.queues)} queues, {len(definitions.users)} users"
    )
    _out(f"site passwords are in {workspace.root / 'broker-users'} (hand each to its site)")


@gateway_app.command("run")
def gateway_run(
    config: ConfigOption = Path("gateway.toml"),
    log_format: Annotated[
        str | None,
        typer.Option(
            help="Logs on stderr: auto, json or text (default: $DICOMBRIDGE_LOG_FORMAT, else "
            "auto: text on a terminal, JSON lines otherwise).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve DICOM for every route and relay through the broker until SIGTERM."""
    from dicombridge import logs  # noqa: PLC0415
    from dicombridge.gateway import run_gateway  # noqa: PLC0415 - pynetdicom only when serving

    logs.configure(log_format)
    run_gateway(config)


WorkdirOption = Annotated[Path, typer.Option(help="Where the sandbox keeps everything.")]


@sandbox_app.command("up")
def sandbox_up(
    workdir: WorkdirOption,
    sites: Annotated[int, typer.Option(help="How many sites (site-a, site-b, ...).")] = 2,
    broker_nodes: Annotated[
        int, typer.Option(help="RabbitMQ nodes: 1, or a cluster of 3 (or up to 5).")
    ] = 1,
) -> None:
    """Start a broker, one Orthanc PACS and one gateway per site; write DIR/sandbox.json."""
    from dicombridge import sandbox  # noqa: PLC0415 - heavy imports only for this command

    started = sandbox.sandbox_up(workdir, sites=sites, broker_nodes=broker_nodes)
    _out(f"sandbox up in {started['workdir']} (broker {started['broker']['node']})")
    for site in started["sites"]:
        gw, pacs = site["gateway"], site["pacs"]
        routes = ", ".join(f"{ae} -> {other}" for other, ae in site["routes"].items())
        _out(
            f"  {site['id']}: gateway {gw['ae_title']}@127.0.0.1:{gw['port']}  "
            f"PACS {pacs['ae_title']}@127.0.0.1:{pacs['port']} ({pacs['rest_url']})  "
            f"routes: {routes}"
        )
    _out(f"details: {Path(started['workdir']) / sandbox.SANDBOX_FILE}")


@sandbox_app.command("down")
def sandbox_down(workdir: WorkdirOption) -> None:
    """Stop exactly what `sandbox up` started in this directory."""
    from dicombridge import sandbox  # noqa: PLC0415

    for line in sandbox.sandbox_down(workdir):
        _out(f"stopped {line}")


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
EntryArgument = Annotated[str, typer.Argument(help="A transfer id (a unique prefix will do).")]


def _quarantine(config: Path) -> Quarantine:
    return Quarantine(site_config.load(config).storage.root)


def stdout_console() -> Console:
    """Rich's console on stdout; piped, 200 columns wide whatever COLUMNS says (rich's
    80 would fold tables; --json is there for machines)."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=200)


def _table(rows: list[dict[str, object]], columns: list[str]) -> None:
    if not rows:
        _out("(none)")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(
            *(escape(str(row.get(c) if row.get(c) is not None else "-")) for c in columns)
        )
    stdout_console().print(table)


@quarantine_app.command("list")
def quarantine_list(
    config: ConfigOption = Path("gateway.toml"), as_json: JsonOption = False
) -> None:
    """Every quarantined transfer: id, sender, stage, status, when."""
    rows = [e.summary() for e in _quarantine(config).entries()]
    if as_json:
        _out(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["id"] = str(row["id"])[:12]
    _table(rows, ["id", "from_site", "stage", "status", "error", "at", "size_bytes"])


@quarantine_app.command("show")
def quarantine_show(
    entry: EntryArgument, config: ConfigOption = Path("gateway.toml"), as_json: JsonOption = False
) -> None:
    """One quarantined transfer: why it is there, and its files."""
    found = _quarantine(config).get(entry)
    details = {**found.summary(), "files": sorted(p.name for p in found.path.iterdir())}
    if as_json:
        _out(json.dumps(details, indent=2))
        return
    for key, value in details.items():
        _out(f"{key:<14} {value}")


@quarantine_app.command("retry")
def quarantine_retry(
    entry: Annotated[str | None, typer.Argument(help="A transfer id (or use --all).")] = None,
    retry_all: Annotated[bool, typer.Option("--all", help="Retry every entry.")] = False,
    config: ConfigOption = Path("gateway.toml"),
) -> None:
    """Give quarantined transfers another chance (after fixing the PACS or the key)."""
    quarantine = _quarantine(config)
    if retry_all == (entry is not None):
        raise ConfigError("(command line)", "ID", "give one id or --all", "see --help")
    targets = quarantine.entries() if retry_all else [quarantine.get(str(entry))]
    for found in targets:
        _out(f"{found.transfer_id[:12]}: {quarantine.retry(found)}")


@quarantine_app.command("purge")
def quarantine_purge(entry: EntryArgument, config: ConfigOption = Path("gateway.toml")) -> None:
    """Delete a quarantined transfer for good (it holds PHI)."""
    quarantine = _quarantine(config)
    found = quarantine.get(entry)
    quarantine.purge(found)
    _out(f"{found.transfer_id[:12]}: purged")


@outbox_app.command("list")
def outbox_list(config: ConfigOption = Path("gateway.toml"), as_json: JsonOption = False) -> None:
    """Instances sealed here and not yet confirmed stored by their recipient."""
    cfg = site_config.load(config)
    outbox = Outbox(
        cfg.storage.root / "outbox", max_bytes=cfg.outbox.max_bytes, max_count=cfg.outbox.max_count
    )
    rows: list[dict[str, object]] = []
    for item in outbox.entries():
        receipt = item.state.get("receipt") or {}
        rows.append(
            {
                "id": item.transfer.transfer_id_hex,
                "to_site": item.site,
                "size_bytes": item.transfer.total_length,
                "created_at": item.state.get("created_at"),
                "published": "yes" if item.published else "no",
                "attempts": item.state.get("attempts", 0),
                "last_receipt": receipt.get("outcome"),
                "status": f"{receipt['status']:#06x}" if "status" in receipt else None,
            }
        )
    if as_json:
        _out(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["id"] = str(row["id"])[:12]
    _table(
        rows,
        [
            "id",
            "to_site",
            "size_bytes",
            "created_at",
            "published",
            "attempts",
            "last_receipt",
            "status",
        ],
    )
    _out(
        f"{outbox.count} transfer(s), {outbox.used_bytes} bytes "
        f"(caps {outbox.max_count} transfers, {outbox.max_bytes} bytes)"
    )


retention_app = typer.Typer(
    help="How long outbox, spool, quarantine and done markers keep things: show, purge.",
    no_args_is_help=True,
)
app.add_typer(retention_app, name="retention")


def _age_text(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@retention_app.command("show")
def retention_show(
    config: ConfigOption = Path("gateway.toml"), as_json: JsonOption = False
) -> None:
    """Each storage area: count, size, oldest item against its age limit, alarm level."""
    cfg = site_config.load(config)
    report = retention.survey(
        cfg.storage.root,
        cfg.retention,
        utc_now(),
        outbox_max_bytes=cfg.outbox.max_bytes,
        outbox_max_count=cfg.outbox.max_count,
    )
    if as_json:
        _out(json.dumps(report.summary(), indent=2))
        return
    rows: list[dict[str, object]] = [
        {
            "area": area.area,
            "count": area.count if area.max_count is None else f"{area.count}/{area.max_count}",
            "size": _size_text(area.size_bytes)
            + ("" if area.max_bytes is None else f" / {_size_text(area.max_bytes)}"),
            "oldest": _age_text(area.oldest_age_s),
            "max_age": _age_text(area.max_age_s),
            "past_limit": area.past_limit,
            "then": "purge" if area.purged else "alarm only",
            "level": area.level.upper() if area.level != "ok" else "ok",
        }
        for area in report.areas
    ]
    _table(rows, ["area", "count", "size", "oldest", "max_age", "past_limit", "then", "level"])
    _out(f"overall: {report.level} (warning at {cfg.retention.warn_at_fraction:.0%} of a limit)")


@retention_app.command("purge")
def retention_purge(
    config: ConfigOption = Path("gateway.toml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what is past its age; delete nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete what is past its age: spool, quarantine, done markers (outbox only if
    purge_outbox is on). The gateway does this by itself every check_interval_s."""
    cfg = site_config.load(config)
    removed = retention.purge(cfg.storage.root, cfg.retention, utc_now(), dry_run=dry_run)
    rows = [item.summary() for item in removed]
    if as_json:
        _out(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["id"] = str(row["id"])[:12]
        row["age"] = _age_text(float(row.pop("age_s")))
    _table(rows, ["area", "id", "site", "size_bytes", "age"])
    verb = "would purge" if dry_run else "purged"
    total = sum(item.size_bytes for item in removed)
    _out(f"{verb} {len(rows)} item(s), {total} bytes")
    if not cfg.retention.purge_outbox:
        _out("outbox entries are kept past their age (alarm only; purge_outbox = false)")


def _admin_password(path: Path | None) -> SecretStr:
    if path is not None:
        try:
            return SecretStr(path.read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise ConfigError(
                path, "--admin-password-file", exc.strerror or "unreadable", "check the path"
            ) from exc
    value = os.environ.get("DICOMBRIDGE_BROKER_ADMIN_PASSWORD")
    if not value:
        raise ConfigError(
            "(command line)",
            "--admin-password-file",
            "no admin password given",
            "pass --admin-password-file or set DICOMBRIDGE_BROKER_ADMIN_PASSWORD",
        )
    return SecretStr(value)


# --- the routing table ----------------------------------------------------------------


def _rows_out(rows: list[dict[str, object]], columns: list[str], as_json: bool) -> None:
    if as_json:
        _out(json.dumps(rows, indent=2))
    else:
        _table(rows, columns)


def _node_rows(cfg: site_config.SiteConfig) -> list[dict[str, object]]:
    return [
        {"name": n.name, "ae_title": n.ae_title, "host": n.host, "port": n.port, "c_get": n.c_get}
        for n in cfg.local_nodes
    ]


@nodes_app.command("list")
def nodes_list(config: ConfigOption = Path("gateway.toml"), as_json: JsonOption = False) -> None:
    """Every local node: name, AE title, address, whether it answers C-GET."""
    columns = ["name", "ae_title", "host", "port", "c_get"]
    _rows_out(_node_rows(site_config.load(config)), columns, as_json)


@nodes_app.command("add")
def nodes_add(
    name: Annotated[str, typer.Argument(help="The node's name here (the PACS is 'PACS').")],
    ae_title: Annotated[str, typer.Option(help="The node's own AE title.")],
    host: Annotated[str, typer.Option(help="Its host name or address.")],
    port: Annotated[int, typer.Option(help="Its DICOM port.")],
    c_get: Annotated[
        bool, typer.Option("--c-get/--no-c-get", help="Whether it answers C-GET.")
    ] = True,
    config: ConfigOption = Path("gateway.toml"),
) -> None:
    """Add a local node (validated with the whole file before it is written)."""
    routing_table.add_node(config, name=name, ae_title=ae_title, host=host, port=port, c_get=c_get)
    _out(f"node {name} ({ae_title.strip()} at {host}:{port}) added to {config}")


@nodes_app.command("remove")
def nodes_remove(
    name: Annotated[str, typer.Argument(help="The node's name.")],
    config: ConfigOption = Path("gateway.toml"),
) -> None:
    """Remove a local node."""
    routing_table.remove_node(config, name)
    _out(f"node {name} removed from {config}")


@nodes_app.command("echo")
def nodes_echo(
    name: Annotated[str, typer.Argument(help="The node's name.")],
    config: ConfigOption = Path("gateway.toml"),
) -> None:
    """C-ECHO the node as the gateway's AE title; exit 1 if it does not answer success."""
    cfg = site_config.load(config)
    node = cfg.local_node(name)
    if node is None:
        names = ", ".join(n.name for n in cfg.local_nodes) or "none"
        raise ConfigError(
            config,
            "local_nodes.name",
            f"no local node named {name!r} (present: {names})",
            "check the name with `dicombridge nodes list`",
        )
    started = time.monotonic()
    outcome = QuerySCU(node, calling_ae_title=cfg.gateway.ae_title, connect_timeout_s=10).echo()
    elapsed_ms = (time.monotonic() - started) * 1000
    where = f"{node.name} ({node.ae_title} at {node.host}:{node.port})"
    if outcome.is_success:
        _out(f"{where}: C-ECHO success in {elapsed_ms:.0f} ms")
        return
    _out(f"{where}: C-ECHO failed, status {outcome.status:#06x}: {outcome.error_comment or '-'}")
    raise typer.Exit(1)


# Commands kept in their own modules register themselves on ``app`` when imported; they
# use the options and helpers above, so they are imported last.
from dicombridge.cli import routes, send, sites, status  # noqa: E402

__all__ = ["app", "main", "routes", "send", "sites", "status"]


def main() -> None:
    """Entry point of the console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except BridgeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
