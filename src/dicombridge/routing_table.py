"""Edit the routing table in ``gateway.toml``: routes (a called AE title on this gateway
that reaches a node at another site) and local nodes (this hospital's DICOM nodes).

An edit goes through the TOML document (tomlkit), so the operator's comments and layout
stay as they were. The edited file is validated whole, with the same checks as a gateway
start, before it is written; it is written atomically and durably (temporary file,
fsync, rename). An edit that would leave the file invalid raises ``ConfigError`` naming
the file, the field and the fix, and the file is left unchanged.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import tomlkit
from pydantic import ValidationError
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Table
from tomlkit.toml_document import TOMLDocument

from dicombridge import config as site_config
from dicombridge.config import LocalNode, RouteEntry, SiteConfig
from dicombridge.durable import write_durably
from dicombridge.errors import ConfigError

# What a running gateway takes from an edited file without a restart.
HOT_SECTIONS: Final = ("routes", "local_nodes", "remote_access")
# The command that edits each table, for the fixes in error messages.
_COMMAND = {"routes": "routes", "local_nodes": "nodes"}


def add_route(
    path: Path,
    *,
    ae_title: str,
    sites: Sequence[str],
    node: str = "PACS",
    calling_ae_titles: Sequence[str] = (),
    source_networks: Sequence[str] = (),
    match: Mapping[str, Sequence[str]] | None = None,
    before: int | None = None,
) -> SiteConfig:
    """Add a route: ``ae_title`` on this gateway reaches ``node`` at each of ``sites``,
    for the callers and data sets its conditions select.

    Routes with the same called AE title are rules taken in file order: the new route
    goes last, or before the route at 1-based position ``before``. An edit that leaves
    a route never reached (an earlier one holds whenever it would) is refused."""
    one = len(sites) == 1
    fields: dict[str, Any] = {
        "ae_title": ae_title,
        "site": sites[0] if one else None,
        "sites": [] if one else list(sites),
        "node": node,
        "calling_ae_titles": list(calling_ae_titles),
        "source_networks": list(source_networks),
        "match": {k: v[0] if len(v) == 1 else list(v) for k, v in (match or {}).items()},
    }
    entry: RouteEntry = _entry(path, "routes", RouteEntry, **fields)
    # In the order an operator reads a route: where, then when.
    values: dict[str, Any] = {"ae_title": entry.ae_title}
    if entry.site is not None:
        values["site"] = entry.site
    else:
        values["sites"] = entry.sites
    values["node"] = entry.node
    if entry.calling_ae_titles:
        values["calling_ae_titles"] = entry.calling_ae_titles
    if entry.source_networks:
        values["source_networks"] = [str(network) for network in entry.source_networks]
    if entry.match:
        inline = tomlkit.inline_table()
        inline.update(entry.match)
        values["match"] = inline

    def change(document: TOMLDocument) -> None:
        count = len(_tables(document, "routes"))
        if before is not None and not 1 <= before <= count:
            raise ConfigError(
                path,
                "routes",
                f"there is no route at position {before} (1 to {count})",
                "see the positions with `dicombridge routes list`",
            )
        _append(path, document, "routes", values, at=None if before is None else before - 1)

    return _edit(path, change)


def remove_route(path: Path, ae_title: str, *, position: int | None = None) -> SiteConfig:
    """Remove the route whose called AE title is ``ae_title`` (the one at 1-based
    ``position`` when several routes share that AE title)."""

    def change(document: TOMLDocument) -> None:
        tables = _tables(document, "routes")
        title = ae_title.strip()
        found = [i for i, table in enumerate(tables) if str(table.get("ae_title", "")) == title]
        if position is not None:
            found = [i for i in found if i == position - 1]
        if len(found) > 1:
            where = ", ".join(str(i + 1) for i in found)
            raise ConfigError(
                path,
                "routes.ae_title",
                f"{len(found)} routes have ae_title {title!r} (positions {where})",
                "say which with --position (see `dicombridge routes list`)",
            )
        if not found and position is not None:
            raise ConfigError(
                path,
                "routes.ae_title",
                f"the route at position {position} is not one of ae_title {title!r}",
                "check the positions with `dicombridge routes list`",
            )
        if not found:
            _remove(path, document, "routes", "ae_title", title)  # raises, naming those present
            return
        aot = document["routes"]
        assert isinstance(aot, AoT)
        del aot[found[0]]
        if not len(aot):
            del document["routes"]

    return _edit(path, change)


def add_node(
    path: Path, *, name: str, ae_title: str, host: str, port: int, c_get: bool = True
) -> SiteConfig:
    """Add a local node the gateway may send to and query."""
    entry = _entry(
        path,
        "local_nodes",
        LocalNode,
        name=name,
        ae_title=ae_title,
        host=host,
        port=port,
        c_get=c_get,
    )
    # The node's address as given, other settings only where they differ from the
    # defaults (TLS files and the like are added by hand, with their comments).
    values = {"name": entry.name, "ae_title": entry.ae_title, "host": entry.host}
    values |= {"port": entry.port, "c_get": entry.c_get}
    values |= entry.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
    return _add(path, "local_nodes", "name", values)


def remove_node(path: Path, name: str) -> SiteConfig:
    """Remove the local node ``name``."""
    return _edit(path, lambda document: _remove(path, document, "local_nodes", "name", name))


def running_table(running: SiteConfig, edited: SiteConfig) -> tuple[SiteConfig, list[str]]:
    """The running configuration with ``edited``'s routing table (``HOT_SECTIONS``), and
    the other sections ``edited`` changes (they take effect at the next restart).

    Checked whole again: a table that is valid only with the edited file's other
    sections (say, a route that takes the running gateway's AE title) is refused with
    ``ConfigError``."""
    restart = [
        name
        for name in SiteConfig.model_fields
        if name not in (*HOT_SECTIONS, "source") and getattr(running, name) != getattr(edited, name)
    ]
    merged = running.model_copy(update={name: getattr(edited, name) for name in HOT_SECTIONS})
    try:
        return SiteConfig.model_validate(merged.model_dump()), restart
    except ValidationError as exc:
        first = exc.errors()[0]
        problem = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(
            running.source,
            ".".join(str(p) for p in first["loc"]) or "(routing table)",
            f"{problem} with the running [gateway] settings",
            "restart the gateway to apply the other sections first",
        ) from exc


# --- the document -----------------------------------------------------------------------


def _entry(path: Path, section: str, model: Any, **fields: Any) -> Any:
    """Validate one new entry on its own, so that an error names its field."""
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join([section, *(str(p) for p in first["loc"])])
        raise ConfigError(path, field, first["msg"], "correct that option and run again") from exc


def _add(path: Path, key: str, field: str, values: dict[str, Any]) -> SiteConfig:
    """Append ``values`` as a new ``[[key]]`` table, unless one has the same ``field``."""

    def change(document: TOMLDocument) -> None:
        value = values[field]
        if any(str(t.get(field, "")).strip() == value for t in _tables(document, key)):
            raise ConfigError(
                path,
                f"{key}.{field}",
                f"an entry with {field} {value!r} already exists",
                f"choose another {field}, or `dicombridge {_COMMAND[key]} remove` the old one "
                "first",
            )
        _append(path, document, key, values)

    return _edit(path, change)


def _edit(path: Path, change: Callable[[TOMLDocument], None]) -> SiteConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(path, "(file)", "does not exist", "run `dicombridge init` first") from exc
    site_config.parse(text, path)  # refuse to edit a file that is already broken
    try:
        document = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError(path, "(syntax)", str(exc), "fix the TOML syntax at that line") from exc
    change(document)
    edited = tomlkit.dumps(document)
    validated = site_config.parse(edited, path)
    write_durably(path, edited.encode("utf-8"), mode=stat.S_IMODE(os.stat(path).st_mode))
    return validated


def _tables(document: TOMLDocument, key: str) -> list[Table]:
    found = document.get(key)
    return list(found) if isinstance(found, AoT) else []


def _append(
    path: Path, document: TOMLDocument, key: str, values: dict[str, Any], *, at: int | None = None
) -> None:
    table = tomlkit.table()
    for name, value in values.items():
        table[name] = value
    found = document.get(key)
    if isinstance(found, AoT):
        if at is None:
            found.append(table)
        else:
            table.add(tomlkit.nl())
            found.insert(at, table)
        return
    if found is not None:
        raise ConfigError(
            path, key, f"is not written as [[{key}]] tables", f"rewrite it as [[{key}]] blocks"
        )
    document.add(tomlkit.nl())
    document.append(key, tomlkit.aot())
    aot = document[key]
    assert isinstance(aot, AoT)
    aot.append(table)


def _remove(path: Path, document: TOMLDocument, key: str, field: str, value: str) -> None:
    tables = _tables(document, key)
    for index, table in enumerate(tables):
        if str(table.get(field, "")).strip() == value.strip():
            aot = document[key]
            assert isinstance(aot, AoT)
            del aot[index]
            if not len(aot):
                del document[key]
            return
    present = ", ".join(sorted(str(t.get(field, "")) for t in tables)) or "none"
    raise ConfigError(
        path,
        f"{key}.{field}",
        f"no entry with {field} {value!r} (present: {present})",
        f"check the {field} with `dicombridge {_COMMAND[key]} list`",
    )
