"""The requesting side of a query across sites: one session per C-FIND, C-MOVE, C-GET or
deep C-ECHO that a node here sent to a route's AE title.

``Requester.start`` turns the request into a sealed ``query`` for the route's site and
returns a ``QuerySession``. The responding site's ``query-response`` messages arrive on
this site's control queue (``Requester.on_response``) and are handed to the session in
order of their ``seq`` (the control queue keeps order, but a redelivery may not): the
SCP's thread reads them from the session as they come, so the first match is passed on
before the last one is found. A session ends with its ``final`` response, or when the
requester cancels it or stops waiting (``cancel``): the responding site is told, and
later responses are dropped.

Nothing here blocks the event loop; ``QuerySession.next`` is for the SCP's threads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from pydicom.dataset import Dataset

from dicombridge.config import LocalNode, RouteEntry
from dicombridge.control import (
    Cancel,
    InformationModel,
    Operation,
    Query,
    QueryResponse,
    Receipt,
)
from dicombridge.envelope import new_id
from dicombridge.errors import BridgeError
from dicombridge.rules import RouteRules
from dicombridge.spool import IncomingTransfer

log = logging.getLogger(__name__)

# Statuses the requester's own side answers with (PS3.4 C.4, PS3.7 C).
STATUS_CANCEL: Final = 0xFE00
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_UNABLE_TO_PROCESS: Final = 0xC000
STATUS_PROCESSING_FAILURE: Final = 0x0110
# Held out-of-order responses per session, at most (a match is small; a flood is not).
MAX_HELD_RESPONSES: Final = 1024

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
# Ends a C-GET instance here: its receipt to the sender, the file out of incoming/.
Finish = Callable[[IncomingTransfer, Receipt], Awaitable[None]]


@dataclass(frozen=True)
class ScpRequest:
    """What a node here asked of a route's AE title."""

    operation: Operation
    called_ae_title: str
    calling_ae_title: str
    model: InformationModel | None = None
    identifier: bytes | None = None
    accepted: tuple[tuple[str, str], ...] = ()
    destination: str | None = None  # C-MOVE: the local node's name
    message_id: int | None = None  # the requester's C-MOVE/C-GET Message ID


@dataclass(frozen=True)
class Retrieved:
    """An instance of a C-GET, verified and waiting in incoming/ to be sent on the
    requester's association."""

    incoming: IncomingTransfer


@dataclass(frozen=True)
class SubOperation:
    """A retrieved instance's outcome here: stored in the move destination (or sent on the
    C-GET association), or failed, with the status."""

    sop_instance_uid: str
    status: int
    stored: bool


class QuerySession:
    """The responses to one query, in order, for the thread that answers the requester;
    for a retrieve also the outcomes of its sub-operations here."""

    def __init__(
        self, query_id: str, to_site: str | None, timeout_s: float, *, retrieve: bool = False
    ) -> None:
        self.query_id = query_id
        self.to_site = to_site
        self.timeout_s = timeout_s
        self.retrieve = retrieve
        self._queue: queue.Queue[QueryResponse | SubOperation | Retrieved] = queue.Queue()
        self._next_seq = 0
        self._held: dict[int, QueryResponse] = {}
        self.finished = False

    def deliver(self, response: QueryResponse) -> bool:
        """Take a response (on the loop); returns True once the final one was passed on."""
        if self.finished or response.seq < self._next_seq:
            return self.finished  # a redelivery of one passed on already
        if len(self._held) >= MAX_HELD_RESPONSES:
            self.fail(STATUS_UNABLE_TO_PROCESS, "responses out of order beyond the limit")
            return True
        self._held[response.seq] = response
        while self._next_seq in self._held:
            ready = self._held.pop(self._next_seq)
            self._next_seq += 1
            self._queue.put(ready)
            if ready.final:
                self.finished = True
                self._held.clear()
        return self.finished

    def fail(self, status: int, comment: str) -> None:
        """End the session here with a failure of our own (no remote answer)."""
        if self.finished:
            return
        self.finished = True
        self._queue.put(
            QueryResponse(
                self.query_id, self._next_seq, status, final=True, error_comment=comment[:64]
            )
        )

    def sub_operation(self, result: SubOperation | Retrieved) -> None:
        self._queue.put(result)

    def next(self, timeout_s: float) -> QueryResponse | SubOperation | Retrieved | None:
        """The next response or sub-operation outcome, waiting up to ``timeout_s`` (None:
        nothing came)."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def next_response(self, timeout_s: float) -> QueryResponse | None:
        """The next response (queries other than retrieves have only responses)."""
        item = self.next(timeout_s)
        assert not isinstance(item, SubOperation | Retrieved), "a retrieve read as a query"
        return item


class Requester:
    """Sessions of queries sent from here; one per site's gateway."""

    def __init__(
        self,
        *,
        routes: list[RouteEntry],
        publish: Publish,
        timeout_s: float,
        retrieve_timeout_s: float = 600.0,
        local_nodes: list[LocalNode] | None = None,
        deep_echo: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
        finish: Finish | None = None,
    ) -> None:
        self._finish = finish
        # C-GET instances handed to a session and not yet finished (rescans see them).
        self._handed: set[bytes] = set()
        self._rules = RouteRules(routes)
        self._nodes_by_ae = {node.ae_title: node for node in local_nodes or []}
        self.retrieve_timeout_s = retrieve_timeout_s
        self._publish = publish
        self.timeout_s = timeout_s
        self.deep_echo_enabled = deep_echo
        self._loop = loop
        self._sessions: dict[str, QuerySession] = {}
        # The last deep echo's figures per site: round trip and the remote clock's skew.
        self.last_echo: dict[str, EchoResult] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the SCP's threads hand requests to (the one ``start`` runs on)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @loop.setter
    def loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def replace_table(self, routes: list[RouteEntry], local_nodes: list[LocalNode]) -> None:
        """Use these routes and nodes from the next request on (sessions under way keep
        the site they started with)."""
        self._rules = RouteRules(routes)
        self._nodes_by_ae = {node.ae_title: node for node in local_nodes}

    def route(self, called_ae_title: str, calling_ae_title: str) -> RouteEntry | None:
        """The route a query through ``called_ae_title`` takes: the first whose calling AE
        titles admit the caller (a query has no data set for ``match``)."""
        return self._rules.select(called_ae_title, calling_ae_title).route

    def local_node(self, ae_title: str) -> LocalNode | None:
        """The local node a C-MOVE names as its Move Destination (by AE title)."""
        return self._nodes_by_ae.get(ae_title.strip())

    async def start(self, request: ScpRequest, *, site: str | None = None) -> QuerySession:
        """Send ``request`` to the site behind its called AE title (or to ``site``, one of
        that route's sites); return its session.

        A session that could not be sent is returned already failed, with an Error
        Comment that says why. A route that fans out to several sites answers no query:
        which site's matches would the requester get?
        """
        query_id = new_id().hex()
        route = self.route(request.called_ae_title, request.calling_ae_title)
        if route is not None and site is None and len(route.destinations) == 1:
            site = route.destinations[0]
        retrieve = request.operation in ("move", "get")
        session = QuerySession(
            query_id,
            site,
            self.retrieve_timeout_s if retrieve else self.timeout_s,
            retrieve=retrieve,
        )
        if route is None:
            session.fail(STATUS_UNABLE_TO_PROCESS, "no remote site behind this AE title")
            return session
        if site is None or site not in route.destinations:
            session.fail(
                STATUS_UNABLE_TO_PROCESS,
                f"fans out to {len(route.destinations)} sites; use a single-site AE title",
            )
            return session
        query = Query(
            query_id=query_id,
            operation=request.operation,
            node=route.node,
            calling_ae_title=request.calling_ae_title.strip(),
            called_ae_title=request.called_ae_title.strip(),
            timeout_s=self.timeout_s,
            model=request.model,
            identifier=request.identifier,
            accepted=request.accepted,
            destination=request.destination,
            message_id=request.message_id,
        )
        self._sessions[query_id] = session
        try:
            await self._publish(site, query.to_document())
        except BridgeError as exc:
            self._sessions.pop(query_id, None)
            log.warning(
                "query not sent",
                extra={"query_id": query_id, "to_site": site, "error": type(exc).__name__},
            )
            session.fail(STATUS_OUT_OF_RESOURCES, f"broker unreachable; {site} not asked")
            return session
        log.info(
            "query sent",
            extra={"query_id": query_id, "to_site": site, "operation": request.operation},
        )
        return session

    async def cancel(self, session: QuerySession, *, reason: str = "cancelled") -> None:
        """Stop a session and tell the responding site (best effort)."""
        if self._sessions.pop(session.query_id, None) is None or session.to_site is None:
            return
        log.info("query cancelled", extra={"query_id": session.query_id, "reason": reason})
        try:
            await self._publish(session.to_site, Cancel(session.query_id).to_document())
        except BridgeError as exc:
            log.warning(
                "cancel not sent",
                extra={"query_id": session.query_id, "error": type(exc).__name__},
            )

    async def deep_echo(self, called_ae_title: str, calling_ae_title: str) -> int | Dataset | None:
        """C-ECHO to a route's AE title: 0x0000 only if the remote gateway and its node
        answered (every site of a route that fans out); 0x0110 with an Error Comment
        otherwise. None: answer locally (deep echo off, or the gateway's own AE title)."""
        route = self.route(called_ae_title, calling_ae_title)
        if route is None or not self.deep_echo_enabled:
            return None
        for site in route.destinations:
            failure = await self._deep_echo_site(site, called_ae_title, calling_ae_title)
            if failure is not None:
                return failure
        return 0x0000

    async def _deep_echo_site(
        self, site: str, called_ae_title: str, calling_ae_title: str
    ) -> Dataset | None:
        sent_at = time.time()
        request = ScpRequest("echo", called_ae_title, calling_ae_title)
        session = await self.start(request, site=site)
        response = await asyncio.to_thread(session.next_response, self.timeout_s)
        received_at = time.time()
        if response is None:
            await self.cancel(session, reason="timed out")
            return _echo_failure(f"{site} did not answer within {self.timeout_s:.0f} s")
        if response.clock is not None:
            result = EchoResult(
                site=site,
                status=response.status,
                round_trip_s=received_at - sent_at,
                skew_s=response.clock - (sent_at + received_at) / 2,
            )
            self.last_echo[site] = result
            log.info(
                "deep echo",
                extra={
                    "to_site": site,
                    "status": f"{response.status:#06x}",
                    "round_trip_s": round(result.round_trip_s, 3),
                    "clock_skew_s": round(result.skew_s, 3),
                },
            )
        if response.status != 0x0000:
            comment = response.error_comment or f"status {response.status:#06x}"
            return _echo_failure(f"{site}: {comment}")
        return None

    def on_response(self, from_site: str, response: QueryResponse) -> None:
        """A response arrived on the control queue (on the loop)."""
        session = self._sessions.get(response.query_id)
        if session is None or session.to_site != from_site:
            log.info(
                "response to no open query dropped",
                extra={"query_id": response.query_id, "from_site": from_site},
            )
            return
        if session.deliver(response) and not session.retrieve:
            self._sessions.pop(response.query_id, None)

    def close(self, session: QuerySession) -> None:
        """A retrieve is over here: later sub-operation outcomes are not its concern."""
        self._sessions.pop(session.query_id, None)

    async def on_retrieved(self, incoming: IncomingTransfer) -> None:
        """A C-GET instance arrived (on the loop): to its session's association, or, if
        the requester stopped waiting, back to the sender as failed."""
        if incoming.transfer_id in self._handed:
            return
        query_id = incoming.meta.get("retrieve")
        session = self._sessions.get(query_id) if isinstance(query_id, str) else None
        if session is not None and session.to_site == incoming.sender_site:
            self._handed.add(incoming.transfer_id)
            session.sub_operation(Retrieved(incoming))
            return
        log.info(
            "C-GET instance for no open retrieve dropped",
            extra={"transfer_id": incoming.transfer_id.hex(), "from_site": incoming.sender_site},
        )
        await self.finished(
            incoming, STATUS_UNABLE_TO_PROCESS, stored=False, comment="the C-GET is over"
        )

    async def finished(
        self, incoming: IncomingTransfer, status: int, *, stored: bool, comment: str | None = None
    ) -> None:
        """A C-GET instance was sent on the requester's association (or not)."""
        self._handed.discard(incoming.transfer_id)
        receipt = Receipt(
            transfer_id=incoming.transfer_id,
            outcome="stored" if stored else "failed",
            status=status,
            error_comment=comment,
        )
        if self._finish is not None:
            await self._finish(incoming, receipt)

    def on_delivered(self, incoming: IncomingTransfer, receipt: Receipt) -> None:
        """A retrieved instance was stored in its move destination, or failed (on the loop)."""
        query_id = incoming.meta.get("retrieve")
        session = self._sessions.get(query_id) if isinstance(query_id, str) else None
        if session is None or session.to_site != incoming.sender_site:
            return
        uid = str(incoming.meta.get("sop_instance_uid", ""))
        session.sub_operation(SubOperation(uid, receipt.status, receipt.outcome == "stored"))

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)


@dataclass(frozen=True)
class EchoResult:
    """A deep echo's figures: the remote site's status, round trip and clock skew
    (remote clock minus ours at the middle of the round trip; positive: theirs is ahead)."""

    site: str
    status: int
    round_trip_s: float
    skew_s: float


def _echo_failure(comment: str) -> Dataset:
    status = Dataset()
    status.Status = STATUS_PROCESSING_FAILURE
    status.ErrorComment = comment[:64]
    return status
