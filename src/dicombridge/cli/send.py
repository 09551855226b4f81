"""The ``dicombridge send`` commands (registered on the app by importing this module)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from dicombridge import config as site_config
from dicombridge import sender
from dicombridge.cli import ConfigOption, _out, _size_text, app
from dicombridge.errors import ConfigError

# A [gateway] host that listens everywhere is reached on loopback from this machine.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - compared, not bound


@app.command("send")
def send(
    paths: Annotated[
        list[Path], typer.Argument(help="DICOM files, or directories walked recursively.")
    ],
    to: Annotated[str, typer.Option("--to", help="The called AE title: a route on the gateway.")],
    host: Annotated[
        str | None,
        typer.Option(help="The gateway's host (default: its \\[gateway] host, else 127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="The gateway's DICOM port (default: \\[gateway] port of --config if that "
            f"file exists, else {sender.DEFAULT_PORT}).",
            min=1,
            max=65535,
        ),
    ] = None,
    calling_ae: Annotated[
        str, typer.Option("--calling-ae", help="Our AE title toward the gateway.")
    ] = sender.DEFAULT_CALLING_AE_TITLE,
    config: ConfigOption = Path("gateway.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Send DICOM files through a gateway (C-STORE), exactly as they are on disk.

    Exit status: 0 if every instance was stored (warnings included), 1 if any failed or
    nothing could be sent, 2 for a usage error (unknown path, association rejected,
    connection refused). Files that are not DICOM are skipped and named, never fatal.
    """
    peer = sender.Peer(
        *_address(host, port, config),
        called_ae_title=_ae_title(to, "--to"),
        calling_ae_title=_ae_title(calling_ae, "--calling-ae"),
    )
    collected = sender.collect(paths)
    # pynetdicom logs a refused connection or an abort as errors; the summary and the
    # one-line error say it better, without drawing over the progress bar.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    with _progress(collected) as (on_result, on_bytes):
        report = (
            sender.Sender(peer).send(collected, on_result=on_result, on_bytes=on_bytes)
            if collected.files
            else sender.SendReport(peer, skipped=collected.skipped)
        )
    if as_json:
        _out(json.dumps(report.summary(), indent=2))
    else:
        _print_summary(report)
    if report.failed or not report.results:
        raise typer.Exit(1)


def _ae_title(value: str, option: str) -> str:
    try:
        return site_config.check_ae_title(value)
    except ValueError as exc:
        raise ConfigError(
            "(command line)", option, f"{value!r}: {exc}", "give 1 to 16 printable ASCII characters"
        ) from exc


def _address(host: str | None, port: int | None, config: Path) -> tuple[str, int]:
    """--host and --port, else the [gateway] section of --config if it exists."""
    if (host is None or port is None) and config.exists():
        gateway = site_config.load(config).gateway
        if host is None and gateway.host not in _WILDCARD_HOSTS:
            host = gateway.host
        if port is None:
            port = gateway.port
    return host or "127.0.0.1", port or sender.DEFAULT_PORT


ProgressCallbacks = tuple[sender.ResultCallback | None, sender.BytesCallback | None]


@contextmanager
def _progress(collected: sender.Collected) -> Iterator[ProgressCallbacks]:
    """A progress bar on stderr (instances, bytes, rate) when it is a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal or not collected.files:
        yield None, None
        return
    total_instances = len(collected.files)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]}/{task.fields[instances]} instances"),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    total_bytes = sum(item.dataset_bytes for item in collected.files)
    finished_bytes = 0
    task: TaskID = progress.add_task(
        "sending", total=total_bytes, done=0, instances=total_instances
    )
    done = 0

    def on_result(result: sender.InstanceResult) -> None:
        nonlocal done, finished_bytes
        done += 1
        finished_bytes += result.file.dataset_bytes
        # Whatever went out of this instance, the bar now stands at the instances done.
        progress.update(task, completed=finished_bytes, done=done)

    def on_bytes(count: int) -> None:
        progress.advance(task, count)

    with progress:
        yield on_result, on_bytes


def _print_summary(report: sender.SendReport) -> None:
    peer = report.peer
    _out(
        f"sent {len(report.results)} instance(s) to {peer.called_ae_title} at {peer.address} "
        f"as {peer.calling_ae_title}: {len(report.succeeded)} succeeded, "
        f"{len(report.warnings)} with a warning, {len(report.failed)} failed"
    )
    for label, results in (("warning", report.warnings), ("failed", report.failed)):
        by_status: dict[str, list[sender.InstanceResult]] = {}
        for result in results:
            by_status.setdefault(result.status_text, []).append(result)
        for status_text, group in by_status.items():
            meaning = sender.status_meaning(group[0].status)
            _out(f"  {label} {status_text} ({meaning}): {len(group)}")
            for result in group:
                comment = result.error_comment or "no Error Comment"
                _out(f"    {result.file.path}: {comment}")
    if report.skipped:
        _out(f"  skipped {len(report.skipped)} file(s), not sent:")
        for skipped in report.skipped:
            _out(f"    {skipped.path}: {skipped.reason}")
    _out(
        f"  {_size_text(report.bytes_sent)} in {report.elapsed_s:.2f} s, "
        f"{_size_text(round(report.rate_bytes_per_s))}/s, "
        f"{report.associations} association(s)"
    )
