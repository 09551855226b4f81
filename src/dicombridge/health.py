"""The gateway's HTTP endpoints for operations (``[monitoring]`` in ``gateway.toml``).

::

    GET /metrics   Prometheus text format (metrics.py)
    GET /healthz   200 "ok" while the gateway's event loop answers (liveness)
    GET /readyz    200 when ready, else 503; a JSON body names each check and its state:
                     broker       both broker connections (bulk, control) open
                     local_nodes  every ready node ([monitoring] ready_nodes, default PACS)
                                  answered the last C-ECHO with success
                     directory    the signed directory in use (verified at start) is not
                                  older than the newest version accepted on this site
    GET /status    JSON for ``dicombridge status``: broker since when, each remote site's
                   last contact, outbox/spool/incoming/quarantine, the last transfers

A small HTTP/1.1 server on the gateway's loop (``asyncio.start_server``): GET only, a
request head of at most ``MAX_REQUEST_BYTES`` read within ``READ_TIMEOUT_S``, one answer
per connection, then it closes. Local nodes are C-ECHOed every ``node_check_s`` in
threads, as the gateway's AE title. Nothing served holds PHI: site ids, AE titles,
node names, transfer ids, sizes, statuses and times only. Plain HTTP: keep ``host`` on
loopback or a trusted network.

If the port cannot be bound, the error is logged and the gateway relays all the same
(a busy metrics port must not stop DICOM); ``/readyz`` then cannot answer, which an
orchestrator sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

from dicombridge.config import LocalNode, SiteConfig
from dicombridge.directory import AcceptedVersion
from dicombridge.keys import utc_now
from dicombridge.metrics import CONTENT_TYPE, Figures, status_text
from dicombridge.qr_scu import QuerySCU
from dicombridge.transport import PLANES

if TYPE_CHECKING:
    from dicombridge.gateway import Gateway

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES: Final = 8192
READ_TIMEOUT_S: Final = 5.0
# After answering, what the client still sends is read and dropped, this long at most.
LINGER_S: Final = 1.0
LINGER_BYTES: Final = 1024 * 1024
# A local node that has not answered a C-ECHO within this is unreachable.
ECHO_TIMEOUT_S: Final = 10.0
# How often the broker connections' state is sampled (for "connected since").
BROKER_SAMPLE_S: Final = 1.0
JSON_TYPE: Final = "application/json"
PATHS: Final = ("/metrics", "/healthz", "/readyz", "/status")


@dataclass(frozen=True)
class Response:
    """One HTTP answer."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, document: object) -> Response:
        return cls(status, json.dumps(document, indent=2).encode() + b"\n")

    def encode(self) -> bytes:
        reason = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


Handler = Callable[[str], Awaitable[Response]]


def _error(status: HTTPStatus, detail: str, *headers: tuple[str, str]) -> Response:
    document = {"error": status.phrase, "detail": detail}
    return Response(status.value, json.dumps(document).encode() + b"\n", headers=headers)


class HttpServer:
    """A minimal HTTP/1.1 server: GET only, one bounded request per connection.

    ``handler`` gets the request's path (its query string dropped) and returns the
    answer; an exception in it is answered 500 and logged by type only.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._handler = handler
        self._max_request_bytes = max_request_bytes
        self._read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen (``OSError`` if the address cannot be bound)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=self._max_request_bytes
        )

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self._answer(reader)
            if response is not None:
                writer.write(response.encode())
                writer.write_eof()
                await writer.drain()
                await _linger(reader)
        except (ConnectionError, TimeoutError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(self._read_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _error(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"a request head is at most {self._max_request_bytes} bytes",
            )
        except asyncio.IncompleteReadError:
            return None  # closed before a whole request head: nobody to answer
        except TimeoutError:
            return _error(HTTPStatus.REQUEST_TIMEOUT, "no whole request in time")
        try:
            method, target, version = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            return _error(HTTPStatus.BAD_REQUEST, "not an HTTP/1.1 request line")
        if not version.startswith("HTTP/1.") or not target.startswith("/"):
            return _error(HTTPStatus.BAD_REQUEST, "not an HTTP/1.1 request line")
        if method != "GET":
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, "only GET", ("Allow", "GET"))
        path = target.split("?", 1)[0]
        try:
            return await self._handler(path)
        except Exception as exc:
            log.error(
                "monitoring request failed", extra={"path": path, "error": type(exc).__name__}
            )
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, type(exc).__name__)


async def _linger(reader: asyncio.StreamReader) -> None:
    """Read what the client still sends (a body, the rest of an oversized head) for a
    moment before closing: closing on unread bytes resets the connection, and a reset may
    discard our answer before the client read it (RFC 9112, 9.6)."""
    with contextlib.suppress(TimeoutError, ConnectionError, asyncio.LimitOverrunError):
        async with asyncio.timeout(LINGER_S):
            drained = 0
            while drained < LINGER_BYTES and (data := await reader.read(64 * 1024)):
                drained += len(data)


# --- what the checks know -------------------------------------------------------------


@dataclass(frozen=True)
class NodeCheck:
    """The last C-ECHO to one local node."""

    ok: bool
    checked_at: datetime
    status: int | None = None
    error: str | None = None  # why it failed, from this gateway (never the node's text)

    def summary(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "ok": self.ok,
            "status": None if self.status is None else status_text(self.status),
            "error": self.error,
            "checked_at": self.checked_at.isoformat(),
        }


def echo_node(node: LocalNode, *, calling_ae_title: str) -> NodeCheck:
    """C-ECHO ``node`` once (blocking): whether it answers success."""
    try:
        outcome = QuerySCU(
            node,
            calling_ae_title=calling_ae_title,
            connect_timeout_s=ECHO_TIMEOUT_S,
            dimse_timeout_s=ECHO_TIMEOUT_S,
        ).echo(log_level=logging.DEBUG)  # every node_check_s: changes are logged below
    except Exception as exc:  # pynetdicom raises many types; any means no answer
        return NodeCheck(False, utc_now(), error=type(exc).__name__)
    if outcome.is_success:
        return NodeCheck(True, utc_now(), status=outcome.status)
    if not outcome.from_peer:  # the status is our own stand-in, not the node's
        return NodeCheck(False, utc_now(), error="no association (not listening, or refused)")
    return NodeCheck(False, utc_now(), status=outcome.status, error="C-ECHO failed")


class BrokerWatch:
    """Whether the broker connections are open, and since when (sampled)."""

    def __init__(self) -> None:
        self.connected = False
        self.since = utc_now()

    def observe(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.since = utc_now()


# --- the gateway's monitor ------------------------------------------------------------


class Monitor:
    """Serves a gateway's ``/metrics``, ``/healthz``, ``/readyz`` and ``/status``;
    ``run()`` as one of the gateway's tasks."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.started_at = utc_now()
        self.broker = BrokerWatch()
        # local node name -> its last C-ECHO (only nodes of the table in force).
        self.node_checks: dict[str, NodeCheck] = {}
        self.port: int | None = None  # where it listens, once it does

    async def run(self) -> None:
        """Serve until cancelled, checking the local nodes and the broker meanwhile."""
        settings = self.gateway.site.config.monitoring
        if not settings.enabled:
            log.info("monitoring endpoints off ([monitoring] enabled = false)")
            return
        server = HttpServer(self.respond)
        try:
            await server.start(settings.host, settings.port)
        except OSError as exc:
            log.error(
                "monitoring endpoints not served: cannot listen; check [monitoring] port",
                extra={"host": settings.host, "port": settings.port, "error": exc.strerror},
            )
            return
        self.port = server.port
        log.info("monitoring endpoints served", extra={"host": settings.host, "port": self.port})
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._check_nodes_every(settings.node_check_s))
                group.create_task(self._watch_broker())
        finally:
            await server.close()

    async def respond(self, path: str) -> Response:
        """The answer to ``GET path``."""
        if path == "/healthz":
            return Response(200, b"ok\n", content_type="text/plain; charset=utf-8")
        if path == "/readyz":
            ready, checks = await self.readiness()
            return Response.json(200 if ready else 503, {"ready": ready, "checks": checks})
        if path == "/metrics":
            await self.gateway.metrics.storage.current()
            return Response(200, self.gateway.metrics.exposition(), content_type=CONTENT_TYPE)
        if path == "/status":
            return Response.json(200, await self.status())
        return _error(HTTPStatus.NOT_FOUND, f"no {path}; try one of {', '.join(PATHS)}")

    # --- the broker -------------------------------------------------------------------

    def broker_connected(self) -> bool:
        """Whether both broker connections (bulk and control) are open now."""
        transport = self.gateway.transport
        connected = transport is not None and all(
            transport.broker_node(plane) is not None for plane in PLANES
        )
        self.broker.observe(connected)
        return connected

    async def _watch_broker(self) -> None:
        while True:
            self.broker_connected()
            await asyncio.sleep(BROKER_SAMPLE_S)

    # --- local nodes ------------------------------------------------------------------

    async def check_nodes(self) -> None:
        """C-ECHO the ready nodes of the table in force (``[monitoring] ready_nodes``),
        at once, each in a thread."""
        config = self.gateway.site.config
        nodes = _ready_nodes(config)
        checks = await asyncio.gather(
            *(
                asyncio.to_thread(echo_node, node, calling_ae_title=config.gateway.ae_title)
                for node in nodes
            )
        )
        for node, check in zip(nodes, checks, strict=True):
            before = self.node_checks.get(node.name)
            if before is None or before.ok != check.ok:
                log.log(
                    logging.INFO if check.ok else logging.WARNING,
                    "local node answers C-ECHO" if check.ok else "local node does not answer",
                    extra={"node": node.name, "error": check.error},
                )
        self.node_checks = {node.name: check for node, check in zip(nodes, checks, strict=True)}

    async def _check_nodes_every(self, interval_s: float) -> None:
        while True:
            await self.check_nodes()
            await asyncio.sleep(interval_s)

    # --- readiness and status ---------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the gateway is ready, and each check's state."""
        checks = {
            "broker": self._broker_check(),
            "local_nodes": self._nodes_check(),
            "directory": await asyncio.to_thread(self._directory_check),
        }
        return all(check["ok"] for check in checks.values()), checks

    def _broker_check(self) -> dict[str, Any]:
        connected = self.broker_connected()
        transport = self.gateway.transport
        return {
            "ok": connected,
            "state": "connected" if connected else "disconnected",
            "since": self.broker.since.isoformat(),
            "node": None if transport is None else transport.broker_node("control"),
        }

    def _nodes_check(self) -> dict[str, Any]:
        """Every local node answered its last C-ECHO, and that check is recent (a check
        that stopped coming, say behind a busy thread pool, proves nothing)."""
        interval_s = self.gateway.site.config.monitoring.node_check_s
        stale_after_s = 2 * (interval_s + ECHO_TIMEOUT_S)
        now = utc_now()
        nodes = []
        for node in _ready_nodes(self.gateway.site.config):
            check = self.node_checks.get(node.name)
            if check is None:
                nodes.append({"name": node.name, "ok": False, "error": "not checked yet"})
                continue
            summary = check.summary(node.name)
            if (now - check.checked_at).total_seconds() > stale_after_s:
                summary |= {"ok": False, "error": f"no check for over {stale_after_s:.0f} s"}
            nodes.append(summary)
        return {"ok": all(n["ok"] for n in nodes), "nodes": nodes}

    def _directory_check(self) -> dict[str, Any]:
        """The directory in use against the newest version this site accepted (another
        process, say `dicombridge directory show` of a newer file, may have recorded one:
        then this gateway runs on an older directory and must be restarted)."""
        version = self.gateway.site.directory.version
        state_path = self.gateway.site.config.directory.state_path
        check: dict[str, Any] = {"ok": True, "version": version, "accepted_version": None}
        try:
            accepted = AcceptedVersion.model_validate_json(state_path.read_bytes())
        except FileNotFoundError:
            return check
        except (OSError, ValidationError):
            return {**check, "ok": False, "error": f"{state_path} unreadable"}
        check["accepted_version"] = accepted.version
        if accepted.version > version:
            check["ok"] = False
            check["error"] = (
                f"version {version} in use, {accepted.version} accepted since: restart the gateway"
            )
        return check

    def figures(self) -> Figures:
        """What the gateway's parts count now (read at scrape time)."""
        gateway = self.gateway
        dead: dict[tuple[str, str], int] = {}
        again: dict[str, int] = {}
        transport = gateway.transport
        if transport is not None:
            for plane in PLANES:
                counters = transport.counters(plane)
                again[plane] = counters.redelivered
                for reason, count in counters.dead_lettered.items():
                    dead[(plane, reason)] = count
        return Figures(
            resends=gateway.resends,
            delivery_retries=gateway.deliverer.retries,
            delivery_in_doubt_found=gateway.deliverer.in_doubt_found,
            duplicates_dropped=gateway.receiver.duplicates_dropped,
            quarantined_at_spool=gateway.receiver.quarantined,
            quarantined_at_delivery=gateway.deliverer.failed,
            disk_full_holds=gateway.receiver.disk_full_holds,
            fragments_received=gateway.receiver.fragments_received,
            table_reloads=gateway.table_reloads,
            table_reloads_refused=gateway.table_reloads_refused,
            control_refused=gateway.control_refused,
            broker_connected=self.broker_connected(),
            directory_version=gateway.site.directory.version,
            outbox_max_bytes=gateway.outbox.max_bytes,
            outbox_max_count=gateway.outbox.max_count,
            dead_lettered=dead,
            redelivered=again,
            local_nodes_up={name: check.ok for name, check in self.node_checks.items()},
        )

    async def status(self) -> dict[str, Any]:
        """The document ``dicombridge status`` shows (no PHI)."""
        gateway = self.gateway
        metrics = gateway.metrics
        areas = await metrics.storage.current()
        ready, checks = await self.readiness()
        now = utc_now()
        remote_sites = []
        for entry in gateway.site.directory.sites:
            if entry.id == gateway.site.site_id:
                continue
            contact = metrics.last_contact.get(entry.id)
            remote_sites.append(
                {
                    "site": entry.id,
                    "last_contact": None if contact is None else contact.isoformat(),
                    "age_s": None if contact is None else (now - contact).total_seconds(),
                }
            )
        return {
            "site": gateway.site.site_id,
            "at": now.isoformat(),
            "started_at": self.started_at.isoformat(),
            "ready": ready,
            "broker": {
                "connected": checks["broker"]["ok"],
                "since": checks["broker"]["since"],
                "node": checks["broker"]["node"],
            },
            "directory": checks["directory"],
            "local_nodes": checks["local_nodes"]["nodes"],
            "remote_sites": remote_sites,
            "storage": [area.summary() for area in areas],
            "recent_transfers": metrics.recent.summary(),
        }


def _ready_nodes(config: SiteConfig) -> list[LocalNode]:
    """The local nodes /readyz needs answering (``[monitoring] ready_nodes``)."""
    names = config.monitoring.ready_node_names(config.local_nodes)
    return [node for node in config.local_nodes if node.name in names]
