"""The responding side of a query across sites: run another site's query against a node
here and stream the answers back.

A ``query`` from another site (control plane, already opened and verified) is checked
against ``[[remote_access]]`` (``query_policy``); a refusal is answered at once. A query
older than its own ``timeout_s`` is dropped: its requester has stopped waiting. Otherwise
it runs in a thread against the node the route names (``QuerySCU``), each match sealed
and published as a ``query-response`` the moment the PACS returns it, then the final
status. A ``cancel`` from the requester sets the running query's cancel flag, which sends
C-CANCEL to the PACS. The handler returns as soon as the query is started, so the
control queue goes on (receipts, other queries) while a query runs.

Each response is published before the next match is taken from the PACS: a slow broker
slows the query instead of piling matches up in memory.

A retrieve (``move`` or ``get``) is sent to the PACS with a Message ID unique among the
retrieves under way. The PACS's instances come to the gateway's Storage SCP (``scp``),
which asks ``retrieved`` whose they are and seals each one back to the requester as a
transfer. A C-MOVE from the requester becomes a C-MOVE to the gateway itself (the most
widely supported retrieve). A C-GET becomes a C-GET, proposing exactly the (SOP class,
transfer syntax) pairs the requester accepted (those this gateway relays) so that the
PACS sends, or transcodes to, a syntax the requester can take; a PACS without C-GET (it
does not accept the C-GET SOP class, or its node says ``c_get = false``) gets a C-MOVE to
the gateway instead, and the requesting gateway converts what it can.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydicom.dataset import Dataset
from pynetdicom.events import EventHandlerType

from dicombridge.config import LocalNode
from dicombridge.control import Cancel, Query, QueryResponse, SubOperations
from dicombridge.envelope import control_age
from dicombridge.errors import BridgeError
from dicombridge.qr_scp import from_explicit_little
from dicombridge.qr_scu import STATUS_NOT_ACCEPTED, Counts, Model, QueryOutcome, QuerySCU
from dicombridge.query_policy import RemoteAccessPolicy
from dicombridge.scp import TRANSFER_SYNTAXES

log = logging.getLogger(__name__)

STATUS_SUCCESS: Final = 0x0000
STATUS_PENDING: Final = 0xFF00
STATUS_UNABLE_TO_PROCESS: Final = 0xC000
STATUS_MATCH_LIMIT: Final = 0xB001

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
# The Storage SCP's handlers for a C-GET association with this Message ID.
RetrieveHandlers = Callable[[int], list[EventHandlerType]]


class _Running:
    """One query being answered: its cancel flag and next response number; for a
    retrieve, the Message ID of the C-MOVE sent to the PACS and the transfers sent back."""

    def __init__(self, from_site: str, query: Query) -> None:
        self.from_site = from_site
        self.query = query
        self.cancelled = threading.Event()
        self.seq = 0
        self.message_id: int | None = None
        self.transfers = 0


@dataclass(frozen=True)
class Retrieved:
    """Where an instance a PACS sent for a running retrieve goes: to the requesting site,
    with this meta in its sealed transfer."""

    to_site: str
    meta: dict[str, Any]
    running: _Running


class Responder:
    """Answers other sites' queries against this site's nodes."""

    def __init__(
        self,
        *,
        local_nodes: dict[str, LocalNode],
        calling_ae_title: str,
        policy: RemoteAccessPolicy,
        publish: Publish,
        dimse_timeout_s: float = 60.0,
    ) -> None:
        self._nodes = local_nodes
        self._calling_ae_title = calling_ae_title
        self._policy = policy
        self._publish = publish
        self._dimse_timeout_s = dimse_timeout_s
        self._running: dict[tuple[str, str], _Running] = {}
        # Retrieves under way, by the Message ID of their C-MOVE to the PACS: the PACS's
        # C-STOREs name it as their Move Originator Message ID.
        self._moves: dict[int, _Running] = {}
        self._next_message_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Set by the gateway once its Storage SCP runs; without it C-GET becomes C-MOVE.
        self.retrieve_handlers: RetrieveHandlers | None = None
        # Retrieves sent to a local node as C-GET / as C-MOVE (figures for tests).
        self.gets_sent = 0
        self.moves_sent = 0
        # Responses the broker confirmed, over the gateway's life (a figure for tests).
        self.responses_sent = 0

    def replace_table(self, local_nodes: dict[str, LocalNode], policy: RemoteAccessPolicy) -> None:
        """Answer with these nodes and this policy from the next request on."""
        self._nodes = local_nodes
        self._policy = policy

    @property
    def policy(self) -> RemoteAccessPolicy:
        """The ``[[remote_access]]`` policy in force (replaced by a table reload)."""
        return self._policy

    @property
    def running(self) -> int:
        return len(self._running)

    async def on_query(self, from_site: str, query: Query, created_at: datetime | None) -> None:
        """Start answering ``query`` (returns at once; the answer streams in the background)."""
        if created_at is not None and control_age(created_at).total_seconds() > query.timeout_s:
            log.warning(
                "query older than its timeout dropped",
                extra={"query_id": query.query_id, "from_site": from_site},
            )
            return
        key = (from_site, query.query_id)
        if key in self._running:
            return  # a redelivery of a query being answered
        running = _Running(from_site, query)
        self._running[key] = running
        task = asyncio.create_task(self._answer(running))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_cancel(self, from_site: str, cancel: Cancel) -> None:
        running = self._running.get((from_site, cancel.query_id))
        if running is not None:
            running.cancelled.set()
            log.info(
                "query cancelled by its requester",
                extra={"query_id": cancel.query_id, "from_site": from_site},
            )

    def retrieved(self, ae_title: str, message_id: int | None) -> Retrieved | None:
        """The retrieve a C-STORE to this gateway's own AE title belongs to, if any."""
        running = self._moves.get(message_id) if message_id is not None else None
        if running is None or ae_title != self._calling_ae_title:
            return None
        query = running.query
        meta = {
            "retrieve": query.query_id,
            "operation": query.operation,
            "node": query.destination,
            "move_originator_ae_title": query.calling_ae_title
            if query.operation == "move"
            else None,
            "move_originator_message_id": query.message_id if query.operation == "move" else None,
        }
        return Retrieved(running.from_site, meta, running)

    async def close(self) -> None:
        for running in self._running.values():
            running.cancelled.set()
        for task in list(self._tasks):
            task.cancel()

    async def _answer(self, running: _Running) -> None:
        query = running.query
        started = time.monotonic()
        try:
            final = await self._final_response(running)
        except Exception as exc:
            log.error(
                "query failed in the gateway",
                extra={"query_id": query.query_id, "error": type(exc).__name__},
            )
            final = self._response(
                running, STATUS_UNABLE_TO_PROCESS, final=True, comment="remote gateway error"
            )
        finally:
            self._running.pop((running.from_site, query.query_id), None)
        log.info(
            "query answered",
            extra={
                "query_id": query.query_id,
                "from_site": running.from_site,
                "operation": query.operation,
                "status": f"{final.status:#06x}",
                "responses": final.seq + 1,
                "elapsed_s": round(time.monotonic() - started, 3),
            },
        )
        await self._send(running, final)

    async def _final_response(self, running: _Running) -> QueryResponse:
        query = running.query
        identifier = _identifier(query)
        refusal = self._policy.decide(running.from_site, query, identifier)
        if refusal is not None:
            return self._response(running, refusal.status, final=True, comment=refusal.comment)
        node = self._nodes.get(query.node)
        if node is None:
            return self._response(
                running, STATUS_UNABLE_TO_PROCESS, final=True, comment=f"no node {query.node!r}"
            )
        scu = QuerySCU(
            node, calling_ae_title=self._calling_ae_title, dimse_timeout_s=self._dimse_timeout_s
        )
        if query.operation == "echo":
            outcome = await asyncio.to_thread(scu.echo)
            return self._response(
                running, outcome.status, final=True, comment=outcome.error_comment
            )
        if query.operation == "find" and query.model is not None and query.identifier:
            outcome = await self._find(running, scu, query.model, query.identifier)
            return self._outcome_response(running, outcome)
        if query.operation in ("move", "get") and query.model is not None and query.identifier:
            outcome = await self._retrieve(running, scu, query.model, query.identifier)
            return self._outcome_response(running, outcome)
        return self._response(
            running,
            STATUS_UNABLE_TO_PROCESS,
            final=True,
            comment=f"C-{query.operation.upper()} not supported yet",
        )

    async def _find(
        self, running: _Running, scu: QuerySCU, model: str, identifier: bytes
    ) -> QueryOutcome:
        loop = asyncio.get_running_loop()

        def on_match(match: bytes) -> None:  # in the SCU's thread
            response = self._response(running, STATUS_PENDING, final=False, identifier=match)
            sent = asyncio.run_coroutine_threadsafe(self._send(running, response), loop)
            if not sent.result():
                running.cancelled.set()  # the requester cannot get it: stop the PACS

        cap = self._policy.max_matches(running.from_site)
        return await asyncio.to_thread(
            scu.find,
            Model(model),
            identifier,
            on_match=on_match,
            cancelled=running.cancelled,
            max_matches=cap,
        )

    async def _retrieve(
        self, running: _Running, scu: QuerySCU, model: str, identifier: bytes
    ) -> QueryOutcome:
        """C-GET or C-MOVE from the PACS to this gateway (see the module docstring); each
        instance it sends is sealed back to the requester as a transfer (``retrieved``);
        progress goes back as it comes.
        """
        loop = asyncio.get_running_loop()
        self._next_message_id = self._next_message_id % 0xFFFF + 1
        while self._next_message_id in self._moves:
            self._next_message_id = self._next_message_id % 0xFFFF + 1
        running.message_id = self._next_message_id
        self._moves[running.message_id] = running

        def on_progress(counts: Counts) -> None:  # in the SCU's thread
            response = self._response(
                running, STATUS_PENDING, final=False, counts=_sub_operations(counts)
            )
            sent = asyncio.run_coroutine_threadsafe(self._send(running, response), loop)
            if not sent.result():
                running.cancelled.set()

        query = running.query
        storage = [pair for pair in query.accepted if pair[1] in TRANSFER_SYNTAXES]
        try:
            node = self._nodes[query.node]
            if (
                query.operation == "get"
                and node.c_get
                and storage
                and self.retrieve_handlers is not None
            ):
                self.gets_sent += 1
                outcome = await asyncio.to_thread(
                    scu.get,
                    Model(model),
                    identifier,
                    storage=storage,
                    evt_handlers=self.retrieve_handlers(running.message_id),
                    on_progress=on_progress,
                    cancelled=running.cancelled,
                    message_id=running.message_id,
                )
                if outcome.from_peer or outcome.status != STATUS_NOT_ACCEPTED:
                    return outcome
                log.info(
                    "local node has no C-GET; retrieving with C-MOVE",
                    extra={"query_id": query.query_id, "node": query.node},
                )
            self.moves_sent += 1
            return await asyncio.to_thread(
                scu.move,
                Model(model),
                identifier,
                destination_ae=self._calling_ae_title,
                on_progress=on_progress,
                cancelled=running.cancelled,
                message_id=running.message_id,
            )
        finally:
            self._moves.pop(running.message_id, None)

    def _outcome_response(self, running: _Running, outcome: QueryOutcome) -> QueryResponse:
        counts = None if outcome.counts is None else _sub_operations(outcome.counts)
        response = self._response(
            running,
            outcome.status,
            final=True,
            comment=outcome.error_comment,
            failed=outcome.failed_sop_instance_uids,
            counts=counts,
        )
        if running.query.operation in ("move", "get"):
            # The requester waits for exactly these transfers before its final response.
            return dataclasses.replace(response, detail={"transfers": running.transfers})
        return response

    def _response(
        self,
        running: _Running,
        status: int,
        *,
        final: bool,
        identifier: bytes | None = None,
        comment: str | None = None,
        failed: tuple[str, ...] = (),
        counts: SubOperations | None = None,
    ) -> QueryResponse:
        response = QueryResponse(
            query_id=running.query.query_id,
            seq=running.seq,
            status=status,
            final=final,
            identifier=identifier,
            error_comment=None if comment is None else comment[:64],
            failed_sop_instance_uids=failed,
            counts=counts,
            clock=time.time(),
        )
        running.seq += 1
        return response

    async def _send(self, running: _Running, response: QueryResponse) -> bool:
        """Publish one response; False (logged) if the broker did not take it."""
        try:
            await self._publish(running.from_site, response.to_document())
        except BridgeError as exc:
            log.warning(
                "query response not published",
                extra={"query_id": response.query_id, "error": type(exc).__name__},
            )
            return False
        self.responses_sent += 1
        return True


def _sub_operations(counts: Counts) -> SubOperations:
    return SubOperations(counts.remaining, counts.completed, counts.failed, counts.warning)


def _identifier(query: Query) -> Dataset | None:
    if query.identifier is None:
        return None
    try:
        return from_explicit_little(query.identifier)
    except Exception:
        return None
