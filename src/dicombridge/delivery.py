"""Delivery of received transfers to the local PACS, with retries, quarantine and receipts.

Every verified transfer in ``incoming/`` is C-STOREd to the local node its sender named
(the route's node). Success or a PACS warning (0xB000, 0xB006, 0xB007: stored with a
warning) sends a *stored* receipt and removes the file. A permanent failure (0xA9xx,
0xCxxx, SOP class or transfer syntax refused, unknown node) moves it to quarantine at
once and sends a *failed* receipt with the PACS's status and Error Comment. A transient
failure (PACS down, association aborted, 0xA7xx) is retried with exponential backoff
and jitter until ``give_up_after_s``, then quarantined the same way.

A C-STORE whose response never came (the gateway was killed, or the association broke,
after the request went out) leaves the instance *in doubt*: the PACS may hold it. A
mark in the file's sidecar (``IncomingTransfer.mark_storing``) records that a request
is out; before sending an
instance in doubt again, the node is asked (C-FIND) whether it holds it already, so a
crash does not store it twice. A node that cannot say gets it again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Protocol

from dicombridge.config import DeliverySection, LocalNode
from dicombridge.control import Receipt
from dicombridge.durable import fsync_dir, write_durably
from dicombridge.keys import utc_now
from dicombridge.scu import StoreOutcome
from dicombridge.spool import IncomingTransfer

log = logging.getLogger(__name__)

# No such node at this site: the route at the sender names a node we do not have.
STATUS_UNKNOWN_NODE: Final = 0xA801


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class StoreClient(Protocol):
    """What delivery needs of an SCU (blocking calls): store one file, say how it went;
    say whether the node already holds it (None: cannot say)."""

    def store(
        self,
        path: Path,
        *,
        move_originator_ae_title: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> StoreOutcome: ...

    def holds(self, path: Path) -> bool | None: ...


ReceiptSender = Callable[[str, Receipt], Awaitable[None]]
# Told of every delivery's outcome (a retrieve counts its sub-operations from it).
OutcomeObserver = Callable[[IncomingTransfer, Receipt], None]


class Deliverer:
    """Delivers incoming transfers, ``[delivery] associations`` at a time; run ``run()``
    as a task."""

    def __init__(
        self,
        *,
        local_nodes: dict[str, LocalNode],
        clients: Callable[[LocalNode], StoreClient],
        send_receipt: ReceiptSender,
        quarantine: Path,
        settings: DeliverySection,
        observe: OutcomeObserver | None = None,
    ) -> None:
        self._observe = observe
        self._nodes = local_nodes
        self._clients = clients
        self._send_receipt = send_receipt
        self._quarantine = quarantine
        self._settings = settings
        self._queue: asyncio.Queue[IncomingTransfer] = asyncio.Queue()
        self._known: set[str] = set()
        self._stopping = False
        self._idle = asyncio.Event()  # no worker is delivering
        self._idle.set()
        self._busy = 0
        self._wake = asyncio.Event()  # cuts a retry's backoff short when stopping
        self.stored = 0
        # transfer id -> SHA-256 of the file stored in the local node (in memory only).
        self.stored_sha256: dict[str, str] = {}
        self.failed = 0
        self.retries = 0
        # Instances in doubt found already stored by the node: not sent twice.
        self.in_doubt_found = 0

    def replace_nodes(self, local_nodes: dict[str, LocalNode]) -> None:
        """Deliver to these nodes from the next transfer on (a reloaded routing table)."""
        self._nodes = local_nodes

    def submit(self, incoming: IncomingTransfer) -> None:
        """Queue a transfer for delivery, unless it is already queued or under way."""
        tid = incoming.transfer_id.hex()
        if tid in self._known:
            return
        self._known.add(tid)
        self._queue.put_nowait(incoming)

    async def run(self) -> None:
        """Deliver with ``[delivery] associations`` workers at once (each C-STORE goes on
        an association of its own: the node stores one while the next is on its way)."""
        async with asyncio.TaskGroup() as group:
            for _ in range(self._settings.associations):
                group.create_task(self._work())

    async def _work(self) -> None:
        while not self._stopping:
            incoming = await self._queue.get()
            self._busy += 1
            self._idle.clear()
            try:
                if not self._stopping:
                    await self._deliver(incoming)
            except Exception as exc:
                # A bug or the disk: the file stays in incoming/ for the next rescan, and
                # the other transfers are still delivered (never stop the gateway).
                log.error(
                    "delivery failed in the gateway; left in incoming",
                    extra={"transfer_id": incoming.transfer_id.hex(), "error": type(exc).__name__},
                )
            finally:
                self._known.discard(incoming.transfer_id.hex())
                self._queue.task_done()
                self._busy -= 1
                if self._busy == 0:
                    self._idle.set()

    async def join(self) -> None:
        """Wait until every transfer submitted so far has been handled."""
        await self._queue.join()

    async def finish(self, *, timeout_s: float) -> bool:
        """Take no more transfers, let a C-STORE under way end; False if it did not in time.

        A transfer waiting for a retry is handed back at once: it stays in ``incoming/``
        and is delivered after the next start.
        """
        self._stopping = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _deliver(self, incoming: IncomingTransfer) -> None:
        if not incoming.sidecar.exists():
            return  # delivered meanwhile (a rescan saw it just before it was removed)
        if not incoming.path.exists():
            # Only a sidecar left: delivered, its receipt recorded, then stopped while it
            # was being removed (before the sidecar went first).
            await asyncio.to_thread(self._remove, incoming)
            return
        node_name = str(incoming.meta.get("node", ""))
        node = self._nodes.get(node_name)
        tid = incoming.transfer_id.hex()
        if node is None:
            await self._fail(
                incoming,
                STATUS_UNKNOWN_NODE,
                f"no local node {node_name!r} at this site; check the sender's route",
            )
            return
        client = self._clients(node)
        started = time.monotonic()
        delay = self._settings.retry_initial_s
        while True:
            outcome, sha256 = await self._store_once(client, incoming)
            if outcome.is_stored:
                self.stored += 1
                if sha256 is not None:
                    self.stored_sha256[tid] = sha256
                log.info(
                    "instance stored in local node",
                    extra={
                        "transfer_id": tid,
                        "node": node.name,
                        "status": f"{outcome.status:#06x}",
                    },
                )
                await self._receipt(incoming, "stored", outcome.status, outcome.error_comment)
                await asyncio.to_thread(self._remove, incoming)
                return
            if not outcome.is_transient:
                await self._fail(incoming, outcome.status, outcome.error_comment)
                return
            if time.monotonic() - started > self._settings.give_up_after_s:
                await self._fail(
                    incoming,
                    outcome.status,
                    f"gave up after {self._settings.give_up_after_s:.0f} s: "
                    f"{outcome.error_comment}",
                )
                return
            if self._stopping:
                return  # handed back: still in incoming/ for the next start
            self.retries += 1
            log.warning(
                "local node unavailable; retrying",
                extra={"transfer_id": tid, "node": node.name, "retry_in_s": round(delay, 2)},
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):  # noqa: S311 - jitter
                    await self._wake.wait()
            if self._stopping:
                return
            delay = min(delay * 2, self._settings.retry_max_s)

    async def _store_once(
        self, client: StoreClient, incoming: IncomingTransfer
    ) -> tuple[StoreOutcome, str | None]:
        """One C-STORE, unless the node already holds an instance in doubt; the outcome,
        and the SHA-256 of the file if it was stored (one thread hop when not in doubt)."""
        meta = incoming.meta
        originator = meta.get("move_originator_ae_title")
        message_id = meta.get("move_originator_message_id")

        def attempt(check_doubt: bool) -> tuple[StoreOutcome, str | None] | None:
            if check_doubt and incoming.is_storing():
                return None  # in doubt: ask the node first
            # Stored: the mark stays until the file leaves incoming/ (``_remove``). A crash
            # in between (the receipt) finds the mark, asks the node, and sends nothing.
            incoming.mark_storing()
            outcome = client.store(
                incoming.path,
                move_originator_ae_title=originator if isinstance(originator, str) else None,
                move_originator_message_id=message_id if isinstance(message_id, int) else None,
            )
            if outcome.from_peer and not outcome.is_stored:
                incoming.mark_storing(False)  # the node answered it does not hold it
            return outcome, _sha256_of(incoming.path) if outcome.is_stored else None

        attempted = await asyncio.to_thread(attempt, True)
        if attempted is not None:
            return attempted
        if await asyncio.to_thread(client.holds, incoming.path):
            self.in_doubt_found += 1
            log.info(
                "instance in doubt already in the local node; not sent again",
                extra={"transfer_id": incoming.transfer_id.hex()},
            )
            outcome = StoreOutcome.from_status(
                0x0000, "already held by the node (a C-STORE response had been lost)"
            )
            return outcome, await asyncio.to_thread(_sha256_of, incoming.path)
        attempted = await asyncio.to_thread(attempt, False)
        assert attempted is not None
        return attempted

    @staticmethod
    def _remove(incoming: IncomingTransfer) -> None:
        incoming.remove()

    async def _fail(self, incoming: IncomingTransfer, status: int, comment: str | None) -> None:
        self.failed += 1
        await asyncio.to_thread(self._move_to_quarantine, incoming, status, comment)
        log.warning(
            "transfer quarantined: local node refused it",
            extra={"transfer_id": incoming.transfer_id.hex(), "status": f"{status:#06x}"},
        )
        await self._receipt(incoming, "failed", status, comment)

    def _move_to_quarantine(
        self, incoming: IncomingTransfer, status: int, comment: str | None
    ) -> None:
        target = self._quarantine / incoming.sender_site / incoming.transfer_id.hex()
        target.mkdir(parents=True, exist_ok=True)
        incoming.mark_storing(False)  # refused: a retry from quarantine sends it afresh
        os.replace(incoming.path, target / "instance.dcm")
        os.replace(incoming.sidecar, target / "transfer.json")
        reason = {
            "stage": "delivery",
            "status": status,
            "error_comment": comment,
            "at": utc_now().isoformat(),
        }
        write_durably(target / "reason.json", json.dumps(reason).encode())
        fsync_dir(target)

    async def _receipt(
        self, incoming: IncomingTransfer, outcome: str, status: int, comment: str | None
    ) -> None:
        receipt = Receipt(
            transfer_id=incoming.transfer_id,
            outcome="stored" if outcome == "stored" else "failed",
            status=status,
            error_comment=comment,
        )
        if self._observe is not None:
            self._observe(incoming, receipt)
        await self._send_receipt(incoming.sender_site, receipt)
