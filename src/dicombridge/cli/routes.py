"""The ``dicombridge routes`` commands: list, add, remove and check the routing table.

Routes with the same called AE title are rules taken in file order (``dicombridge.rules``);
``routes check --explain FILE.dcm`` shows that evaluation step by step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dicombridge import config as site_config
from dicombridge import identity, routing_table
from dicombridge.cli import (
    ConfigOption,
    JsonOption,
    _out,
    _rows_out,
    app,
)
from dicombridge.config import RouteEntry
from dicombridge.errors import BridgeError, ConfigError
from dicombridge.rules import RouteRules, Selection, read_attributes

routes_app = typer.Typer(
    help="The routing table: which called AE title reaches which sites, for what.",
    no_args_is_help=True,
)
app.add_typer(routes_app, name="routes")


def _patterns(wanted: str | list[str]) -> str:
    return "|".join([wanted] if isinstance(wanted, str) else wanted)


def _warn_if_not_in_directory(cfg: site_config.SiteConfig, sites: list[str]) -> None:
    """A route to a site the signed directory does not list cannot carry anything yet."""
    try:
        directory = identity.load_directory(cfg, record=False)
    except BridgeError as exc:
        _out(f"note: the federation directory could not be checked ({exc})")
        return
    for site in dict.fromkeys(sites):
        if directory.site(site) is None:
            _out(
                f"warning: site {site!r} is not in the signed federation directory; "
                "instances sent to it are refused until the operator adds it"
            )


def _route_row(position: int, route: RouteEntry) -> dict[str, object]:
    return {
        "position": position,
        "ae_title": route.ae_title,
        "sites": list(route.destinations),
        "node": route.node,
        "calling_ae_titles": list(route.calling_ae_titles),
        "source_networks": [str(n) for n in route.source_networks],
        "match": dict(route.match),
    }


def _route_cells(row: dict[str, object], route: RouteEntry) -> dict[str, object]:
    conditions = [f"calling={'|'.join(route.calling_ae_titles)}"] if route.calling_ae_titles else []
    if route.source_networks:
        conditions.append(f"from={'|'.join(str(n) for n in route.source_networks)}")
    conditions += [f"{k}={_patterns(v)}" for k, v in route.match.items()]
    return {
        "#": row["position"],
        "ae_title": route.ae_title,
        "sites": ", ".join(route.destinations),
        "node": route.node,
        "when": " and ".join(conditions) or "always",
    }


@routes_app.command("list")
def routes_list(config: ConfigOption = Path("gateway.toml"), as_json: JsonOption = False) -> None:
    """Every route in evaluation order: called AE title, sites, node, conditions."""
    cfg = site_config.load(config)
    rows = [_route_row(i, r) for i, r in enumerate(cfg.routes, start=1)]
    if as_json:
        _out(json.dumps(rows, indent=2))
        return
    cells = [_route_cells(row, route) for row, route in zip(rows, cfg.routes, strict=True)]
    _rows_out(cells, ["#", "ae_title", "sites", "node", "when"], False)


def _parse_match(config: Path, items: list[str]) -> dict[str, list[str]]:
    """``Keyword=PATTERN[,PATTERN...]`` options into the route's ``match`` table."""
    match: dict[str, list[str]] = {}
    for item in items:
        keyword, sep, patterns = item.partition("=")
        if not sep or not keyword.strip():
            raise ConfigError(
                config,
                "routes.match",
                f"--match {item!r} is not KEYWORD=PATTERN",
                "write it as --match Modality=CT or --match Modality=CT,MR",
            )
        match.setdefault(keyword.strip(), []).extend(p.strip() for p in patterns.split(","))
    return match


@routes_app.command("add")
def routes_add(
    ae_title: Annotated[str, typer.Argument(help="The called AE title local devices use.")],
    site: Annotated[
        list[str],
        typer.Option(help="A remote site's id in the directory; repeat to fan out."),
    ],
    node: Annotated[str, typer.Option(help="The node's name at the site(s).")] = "PACS",
    calling: Annotated[
        list[str] | None,
        typer.Option(help="Take only calls from this AE title (* and ? wildcards); repeatable."),
    ] = None,
    source_network: Annotated[
        list[str] | None,
        typer.Option(help="Take only calls from this network (10.1.0.0/16); repeatable."),
    ] = None,
    match: Annotated[
        list[str] | None,
        typer.Option(help="KEYWORD=PATTERN[,PATTERN]: a data set condition; repeatable."),
    ] = None,
    before: Annotated[
        int | None,
        typer.Option(help="Insert before the route at this position (default: last)."),
    ] = None,
    config: ConfigOption = Path("gateway.toml"),
) -> None:
    """Add a route (validated with the whole file before it is written).

    Routes sharing a called AE title are taken in order, the first that holds wins: put
    narrower routes before broader ones (--before)."""
    cfg = routing_table.add_route(
        config,
        ae_title=ae_title,
        sites=site,
        node=node,
        calling_ae_titles=calling or [],
        source_networks=source_network or [],
        match=_parse_match(config, match or []),
        before=before,
    )
    _out(f"route {ae_title.strip()} -> {', '.join(site)} / {node} added to {config}")
    _warn_if_not_in_directory(cfg, site)


@routes_app.command("remove")
def routes_remove(
    ae_title: Annotated[str, typer.Argument(help="The route's called AE title.")],
    position: Annotated[
        int | None,
        typer.Option(help="Which one, when several routes share the AE title (routes list)."),
    ] = None,
    config: ConfigOption = Path("gateway.toml"),
) -> None:
    """Remove a route."""
    routing_table.remove_route(config, ae_title, position=position)
    _out(f"route {ae_title.strip()} removed from {config}")


def _check_table(config: Path) -> None:
    cfg = site_config.load(config)
    rules = RouteRules(cfg.routes)
    _out(
        f"{config}: {len(cfg.routes)} route(s) on {len(rules.ae_titles)} AE title(s), "
        "valid; evaluation order as listed by `dicombridge routes list`"
    )
    for title in rules.ae_titles:
        if all(route.conditions for route in cfg.routes if route.ae_title == title):
            _out(
                f"note: every route of {title} has a condition; an instance none selects "
                "is refused (0x0110)"
            )
    _warn_if_not_in_directory(cfg, [s for r in cfg.routes for s in r.destinations])


def _explain(selection: Selection) -> None:
    for step in selection.steps:
        verdict = "taken" if step.taken else "not taken"
        _out(f"  route {step.position} ({', '.join(step.route.destinations)}): {verdict}")
        if not step.checks:
            _out("    no condition: holds for every instance")
        for check in step.checks:
            mark = "holds" if check.held else "fails"
            seen = "absent" if check.seen is None else json.dumps(check.seen)
            _out(f"    {check.what} {seen} ~ {'|'.join(check.patterns)}: {mark}")
        if step.taken:
            break


@routes_app.command("check")
def routes_check(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="DICOM files to route; none: check the table itself."),
    ] = None,
    called_ae: Annotated[
        str | None, typer.Option(help="Route as if called with this AE title (default: all).")
    ] = None,
    calling_ae: Annotated[
        str | None,
        typer.Option(help="The caller's AE title (default: calling AE conditions not applied)."),
    ] = None,
    source_address: Annotated[
        str | None,
        typer.Option(help="The caller's IP address (default: source networks not applied)."),
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show each route looked at and each condition.")
    ] = False,
    config: ConfigOption = Path("gateway.toml"),
    as_json: JsonOption = False,
) -> None:
    """Check the routing table, or show where each FILE would go, in evaluation order."""
    if not files:
        _check_table(config)
        return
    cfg = site_config.load(config)
    rules = RouteRules(cfg.routes)
    titles = [called_ae.strip()] if called_ae else rules.ae_titles
    for title in titles:
        if title not in rules.ae_titles:
            served = ", ".join(rules.ae_titles) or "none"
            raise ConfigError(
                config,
                "routes.ae_title",
                f"no route has ae_title {title!r} (present: {served})",
                "check the AE title with `dicombridge routes list`",
            )
    keywords = {k for title in titles for k in rules.keywords(title)}
    results: list[dict[str, object]] = []
    for path in files:
        try:
            attributes = read_attributes(path, keywords)
        except Exception as exc:  # pydicom raises many types for a broken file
            raise ConfigError(
                path,
                "(file)",
                f"not a readable DICOM file ({type(exc).__name__}: {exc})",
                "give a DICOM Part 10 file (with its 128-byte preamble and DICM)",
            ) from exc
        for title in titles:
            selection = rules.select(title, calling_ae, attributes, source_address)
            results.append(
                {
                    "file": str(path),
                    "called_ae_title": title,
                    "route": selection.position,
                    "sites": list(selection.sites),
                    "node": None if selection.route is None else selection.route.node,
                }
            )
            if as_json:
                continue
            if selection.route is None:
                _out(f"{path}: {title} -> no route holds: the C-STORE is refused (0x0110)")
            else:
                _out(
                    f"{path}: {title} -> route {selection.position} -> "
                    f"{', '.join(selection.sites)} / {selection.route.node}"
                )
            if explain:
                _explain(selection)
    if as_json:
        _out(json.dumps(results, indent=2))
