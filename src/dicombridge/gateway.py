"""One running site: the SCP, the outbox and its publisher, the spool, delivery, receipts.

::

    modality --C-STORE--> scp --admit--> outbox --publish--> broker (bulk, to the route's site)
    broker (bulk)    --> spool/receiver --> incoming --> delivery --C-STORE--> local PACS
                                                             \\--> receipt (control, to sender)
    broker (control) --> receipts --> outbox (stored: entry removed; failed: kept)

    workstation --C-FIND/C-ECHO--> scp --> requester --query--> broker (control, to the site)
    broker (control) --query--> responder --C-FIND--> local PACS --matches--> requester

Everything runs on one asyncio loop in a ``TaskGroup``; pynetdicom's threads hand work to
it explicitly.

The routing table (routes, local nodes, remote access) is reloaded from ``gateway.toml``
within ``[gateway] reload_check_s`` of an edit, without a restart and without touching
open associations: new associations, deliveries and queries use the new table. An edit
that does not load is logged and the table in force stays.

Stopping (SIGTERM or SIGINT, ``stop`` set): the SCP stops listening and lets open
associations finish within ``gateway.shutdown_grace_s`` (C-STOREs still waiting are
answered 0xA700); the C-STORE under way to the local PACS finishes (its retries do not
wait); owed receipts get a last chance to be confirmed; then the broker connections close
(the broker hands unacked deliveries back to the queue) and ``run`` returns. What was not
finished is on disk, in the outbox, spool or incoming, and resumes at the next start.
A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from dicombridge import config as site_config
from dicombridge import routing_table
from dicombridge.acceptance import AcceptancePolicy, RejectReason
from dicombridge.audit import AuditTrail
from dicombridge.audit import Event as AuditEvent
from dicombridge.config import LocalNode, SiteConfig
from dicombridge.control import (
    CANCEL,
    QUERY,
    QUERY_RESPONSE,
    RECEIPT,
    Cancel,
    ControlMessage,
    Query,
    QueryResponse,
    Receipt,
    open_control,
    seal_control,
)
from dicombridge.delivery import Deliverer, StoreClient
from dicombridge.dicom_tls import gateway_context
from dicombridge.errors import (
    BridgeError,
    BrokerUnreachableError,
    ConfigError,
    IntegrityError,
    OutboxDiskFullError,
    OutboxFullError,
    TransportError,
)
from dicombridge.fragments import SealedTransfer
from dicombridge.health import Monitor
from dicombridge.identity import LocalSite
from dicombridge.metrics import GatewayMetrics
from dicombridge.outbox import Outbox
from dicombridge.qr_scp import from_explicit_little
from dicombridge.quarantine import Quarantine
from dicombridge.query_policy import STATUS_NOT_AUTHORISED, RemoteAccessPolicy
from dicombridge.receipts import UnsentReceipts
from dicombridge.replay import ReplayGuard
from dicombridge.requester import Requester
from dicombridge.responder import Responder
from dicombridge.retention import run_retention
from dicombridge.rules import RouteRules, read_attributes
from dicombridge.scp import ReceivedInstance, ScpSettings, StorageSCP, StoreOutcome
from dicombridge.scu import StoreSCUPool
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity
from dicombridge.transport import BrokerTls, Delivery, Transport

log = logging.getLogger(__name__)

PUBLISHERS: Final = 4
INCOMING_RESCAN_S: Final = 5.0
STATUS_SUCCESS: Final = 0x0000
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
STATUS_PROCESSING_FAILURE: Final = 0x0110
STATUS_CANNOT_UNDERSTAND: Final = 0xC000


class Gateway:
    """A site's gateway; ``await Gateway(site).run()`` until cancelled or signalled."""

    def __init__(self, site: LocalSite) -> None:
        self.site = site
        config = site.config
        root = config.storage.root
        self.outbox = Outbox(
            root / "outbox", max_bytes=config.outbox.max_bytes, max_count=config.outbox.max_count
        )
        self.receiver = Receiver(
            root,
            ReceiverIdentity(site.site_id, site.keys, site.directory),
            self._on_incoming,
            on_duplicate=self._on_resent,
        )
        self._clients: dict[str, StoreSCUPool] = {}
        self._rules = RouteRules(config.routes)
        self._scp: StorageSCP | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Edits of the routing table applied, and refused (the old table stayed).
        self.table_reloads = 0
        self.table_reloads_refused = 0
        self.deliverer = Deliverer(
            local_nodes={n.name: n for n in config.local_nodes},
            clients=self._client,
            send_receipt=self._send_receipt,
            quarantine=root / "quarantine",
            settings=config.delivery,
            observe=self._on_delivered,
        )
        self.unsent_receipts = UnsentReceipts(root / "receipts")
        self._receipt_queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._receipts_queued: set[tuple[str, bytes]] = set()
        self._publish_queue: asyncio.Queue[str] = asyncio.Queue()
        self._transport: Transport | None = None
        self._broker_connected = asyncio.Event()
        self.scp_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = asyncio.Event()
        # transfer id -> SHA-256 of the instance as received from the modality (in memory
        # only: a figure for byte identity, compared with the receiver's stored_sha256).
        self.received_sha256: dict[str, str] = {}
        self.resends = 0
        # Control messages too old, from the future or seen before: not acted on.
        self.replay = ReplayGuard(
            max_age_s=config.query.control_max_age_s, clock_skew_s=config.query.clock_skew_s
        )
        self.control_refused = 0
        self.requester = Requester(
            routes=config.routes,
            publish=self._publish_request,
            timeout_s=config.query.timeout_s,
            retrieve_timeout_s=config.query.retrieve_timeout_s,
            local_nodes=config.local_nodes,
            deep_echo=config.query.deep_echo,
            finish=self._finish_retrieved,
        )
        self.responder = Responder(
            local_nodes={n.name: n for n in config.local_nodes},
            calling_ae_title=config.gateway.ae_title,
            policy=RemoteAccessPolicy(config.remote_access),
            publish=self._publish_answer,
            dimse_timeout_s=config.gateway.dimse_timeout_s,
        )
        # The audit trail ([audit]): a JSON line per instance sent, received, stored...
        self.audit = AuditTrail(
            config.audit.resolved_path(config_dir=config.source.parent, storage_root=root),
            site=site.site_id,
            max_bytes=config.audit.max_bytes,
            keep=config.audit.keep,
            enabled=config.audit.enabled,
        )
        # /metrics, /healthz, /readyz, /status ([monitoring]); figures read when scraped.
        self.monitor = Monitor(self)
        self.metrics = GatewayMetrics(root, figures=self.monitor.figures)

    @property
    def transport(self) -> Transport | None:
        """The broker connections, once made (for the monitor)."""
        return self._transport

    def _client(self, node: LocalNode) -> StoreClient:
        if node.name not in self._clients:
            self._clients[node.name] = StoreSCUPool(
                node,
                size=self.site.config.delivery.associations,
                calling_ae_title=self.site.config.gateway.ae_title,
            )
        return self._clients[node.name]

    # --- sending side ---------------------------------------------------------------

    def acceptance_policy(self) -> AcceptancePolicy:
        """Answer as every route's AE title, and as the gateway's own (Verification only);
        a route AE title admits only the calling AE titles one of its routes could take."""
        config = self.site.config
        admissions = {
            title: admitted
            for title in self._rules.ae_titles
            if (admitted := self._rules.admissions(title)) is not None
        }
        return AcceptancePolicy.of(
            [config.gateway.ae_title, *self._rules.ae_titles], admissions=admissions
        )

    def scp_settings(self) -> ScpSettings:
        gateway = self.site.config.gateway
        return ScpSettings(
            host=gateway.host,
            port=gateway.port,
            maximum_associations=gateway.maximum_associations,
            maximum_pdu_size=gateway.maximum_pdu_bytes,
            acse_timeout_s=gateway.acse_timeout_s,
            dimse_timeout_s=gateway.dimse_timeout_s,
            network_timeout_s=gateway.network_timeout_s,
            shutdown_grace_s=gateway.shutdown_grace_s,
            receive_dir=self.site.config.storage.root / "receiving",
            ssl_context=gateway_context(gateway),
        )

    async def on_instance(self, instance: ReceivedInstance) -> StoreOutcome:
        """The SCP received an instance for a route: seal it into the outbox, once for
        each site its route sends to, then answer.

        Success is answered only once every sealed transfer is fsynced in the outbox; if
        one cannot be admitted, the others are withdrawn, so that the modality's retry
        does not send a site the instance twice.
        """
        if instance.called_ae_title in self._rules.ae_titles:
            return await self._relay(instance)
        # The gateway's own AE title: only a local PACS's sub-operations of a retrieve
        # that another site asked for (C-MOVE to this gateway itself).
        retrieved = self.responder.retrieved(
            instance.called_ae_title, instance.move_originator_message_id
        )
        if retrieved is None:
            return StoreOutcome(
                STATUS_SOP_CLASS_NOT_SUPPORTED,
                f"{instance.called_ae_title} relays nothing; send to a route's AE title",
            )
        retrieve = str(retrieved.meta["retrieve"])
        outcome = await self._admit(instance, [(retrieved.to_site, retrieved.meta)], retrieve)
        if outcome.status == STATUS_SUCCESS:
            retrieved.running.transfers += 1
        return outcome

    async def _relay(self, instance: ReceivedInstance) -> StoreOutcome:
        """Select the route (reading the data set's attributes if its rules need them)
        and admit the instance for each of its sites."""
        keywords = self._rules.keywords(instance.called_ae_title)
        if keywords and self.audit.enabled:
            keywords |= AUDIT_KEYWORDS  # one header read serves the rules and the audit
        attributes = None
        if keywords:
            try:
                attributes = await asyncio.to_thread(read_attributes, instance.source, keywords)
            except Exception as exc:  # pydicom raises many types; any is the data set's fault
                log.warning(
                    "data set unreadable for the route's rules",
                    extra={
                        "sop_instance_uid": instance.sop_instance_uid,
                        "error": type(exc).__name__,
                    },
                )
                return StoreOutcome(
                    STATUS_CANNOT_UNDERSTAND, "data set unreadable: cannot apply route rules"
                )
        selection = self._rules.select(
            instance.called_ae_title,
            instance.calling_ae_title,
            attributes or {},
            instance.calling_address,
        )
        if selection.route is None:
            log.warning(
                "no route selects the instance; C-STORE refused",
                extra={
                    "called_ae_title": instance.called_ae_title,
                    "calling_ae_title": instance.calling_ae_title,
                    "sop_instance_uid": instance.sop_instance_uid,
                },
            )
            return StoreOutcome(
                STATUS_PROCESSING_FAILURE,
                f"no route of {instance.called_ae_title} selects this instance",
            )
        node = {"node": selection.route.node}
        return await self._admit(
            instance,
            [(site, node) for site in selection.sites],
            None,
            study_uids=None if attributes is None else _study_uids(attributes),
        )

    async def _admit(
        self,
        instance: ReceivedInstance,
        destinations: list[tuple[str, dict[str, Any]]],
        retrieve: str | None,
        *,
        study_uids: dict[str, str] | None = None,
    ) -> StoreOutcome:
        """Seal ``instance`` into the outbox for each (site, meta) in ``destinations``.

        With the audit trail on, the meta also carries the Study and Series Instance UIDs
        (``study_uids``, or read from the header in the admission's thread), so that the
        receiver audits them too."""
        config = self.site.config
        common = {
            "sop_class_uid": instance.sop_class_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "transfer_syntax_uid": instance.transfer_syntax,
            "calling_ae_title": instance.calling_ae_title,
            "called_ae_title": instance.called_ae_title,
        }

        def admit_all() -> list[SealedTransfer]:
            if self.audit.enabled:
                uids = _read_study_uids(instance.source) if study_uids is None else study_uids
                common.update(uids)
            admitted: list[SealedTransfer] = []
            try:
                for site, extra in destinations:
                    admitted.append(
                        self.outbox.admit(
                            instance.source,
                            sender=self.site.sender,
                            directory=self.site.directory,
                            site=site,
                            fragment_size=config.transfer.fragment_size_bytes,
                            meta={**extra, **common},
                            retrieve=retrieve,
                        )
                    )
            except BaseException:
                for sealed in admitted:
                    self.outbox.remove(sealed.transfer_id_hex)
                raise
            return admitted

        admission = asyncio.ensure_future(asyncio.to_thread(admit_all))
        try:
            admitted = await asyncio.shield(admission)
        except asyncio.CancelledError:
            # The SCP gave up waiting and answers 0xA700: the modality sends the instance
            # again, so this admission must not stand once it completes.
            admission.add_done_callback(self._withdraw_abandoned)
            raise
        except OutboxDiskFullError:
            # The outbox logged the error with its directory and the bytes free.
            return StoreOutcome(
                STATUS_OUT_OF_RESOURCES, "dicombridge outbox disk full; retry later"
            )
        except OutboxFullError as exc:
            log.warning("outbox full; C-STORE refused", extra={"reason": str(exc)})
            return StoreOutcome(
                STATUS_OUT_OF_RESOURCES,
                "dicombridge outbox full (broker down or slow); retry later",
            )
        for (site, extra), sealed in zip(destinations, admitted, strict=True):
            if sealed.plaintext_sha256 is not None:
                self.received_sha256[sealed.transfer_id_hex] = sealed.plaintext_sha256.hex()
            self._publish_queue.put_nowait(sealed.transfer_id_hex)
            self._admitted(sealed, called_ae_title=instance.called_ae_title)
            self._audit_sent(sealed, site, {**extra, **common})
            log.info(
                "instance admitted to outbox",
                extra={"transfer_id": sealed.transfer_id_hex, "to_site": site},
            )
        return StoreOutcome(STATUS_SUCCESS, None)

    def _audit_rejected(
        self, called_ae_title: str, calling_ae_title: str, address: str, reason: RejectReason
    ) -> None:
        """An association refused at negotiation (in its thread; the trail never blocks)."""
        self.audit.record(
            "association-rejected",
            outcome="failure",
            called_ae_title=called_ae_title,
            calling_ae_title=calling_ae_title,
            source_address=address,
            reason=reason.description,
        )

    def _withdraw_abandoned(self, admission: asyncio.Future[list[SealedTransfer]]) -> None:
        if admission.cancelled() or admission.exception() is not None:
            return
        for sealed in admission.result():
            self.outbox.remove(sealed.transfer_id_hex)
            log.warning(
                "admission withdrawn: the modality was answered 0xA700 meanwhile",
                extra={"transfer_id": sealed.transfer_id_hex},
            )

    def _audit_sent(self, sealed: SealedTransfer, to_site: str, meta: dict[str, Any]) -> None:
        """instance-sent, and the fields its receipt's record will repeat."""
        fields: dict[str, Any] = {
            "to_site": to_site,
            "node": meta.get("node"),
            **{name: meta.get(name) for name in AUDIT_META},
        }
        self.audit.record(
            "instance-sent", status=STATUS_SUCCESS, transfer_id=sealed.transfer_id_hex, **fields
        )
        self.audit.remember(sealed.transfer_id_hex, fields)

    def _admitted(self, sealed: SealedTransfer, *, called_ae_title: str) -> None:
        """Count an instance admitted to the outbox for ``sealed.recipient_site`` (metrics,
        the last transfers of /status, the admission time for the latency histogram).
        Called once per sealed transfer that stands, after the admission succeeded."""
        self.metrics.admitted(sealed, route=called_ae_title)

    async def _resender(self) -> None:
        """Publish again what has waited too long for its stored receipt."""
        outbox = self.site.config.outbox
        while True:
            await asyncio.sleep(min(outbox.resend_after_s / 4, 60.0))
            due = await asyncio.to_thread(
                self.outbox.due_for_resend, older_than_s=outbox.resend_after_s
            )
            for entry in due:
                log.info(
                    "no stored receipt in time; publishing again",
                    extra={"transfer_id": entry.transfer.transfer_id_hex, "to_site": entry.site},
                )
                self.resends += 1
                await self._publish(entry.transfer.transfer_id_hex, force=True)

    async def _publisher(self) -> None:
        while True:
            transfer_id = await self._publish_queue.get()
            await self._publish(transfer_id, force=False)

    async def _publish(self, transfer_id: str, *, force: bool) -> None:
        """Publish one outbox entry until the broker confirmed it (backing off on errors)."""
        await self._broker_connected.wait()
        assert self._transport is not None
        entry = await asyncio.to_thread(self.outbox.get, transfer_id)
        if entry is None or (entry.published and not force):
            return
        delay = 1.0
        while True:
            try:
                published_bytes = await self._transport.publish_transfer(entry.transfer)
                break
            except FileNotFoundError:
                # Its stored receipt ended the entry while it was being published again.
                log.info("entry ended while publishing", extra={"transfer_id": transfer_id})
                return
            except TransportError as exc:
                log.warning(
                    "publish failed; retrying",
                    extra={"transfer_id": transfer_id, "error": type(exc).__name__},
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
                delay = min(delay * 2, 30.0)
        self.metrics.published(entry.transfer, published_bytes)
        await asyncio.to_thread(self.outbox.mark_published, transfer_id)

    # --- receiving side -------------------------------------------------------------

    async def _on_incoming(self, incoming: IncomingTransfer) -> None:
        # A verified transfer is contact from its sender as much as a control message is.
        self.metrics.contact(incoming.sender_site)
        self.audit.record(
            "instance-received",
            status=STATUS_SUCCESS,
            from_site=incoming.sender_site,
            transfer_id=incoming.transfer_id.hex(),
            node=incoming.meta.get("node"),
            **{name: incoming.meta.get(name) for name in AUDIT_META},
        )
        await self._submit(incoming)

    async def _submit(self, incoming: IncomingTransfer) -> None:
        """To the local node (delivery), or, for a C-GET, to the requester's association."""
        if incoming.meta.get("operation") == "get":
            await self.requester.on_retrieved(incoming)
        else:
            self.deliverer.submit(incoming)

    async def _finish_retrieved(self, incoming: IncomingTransfer, receipt: Receipt) -> None:
        """A C-GET instance was sent back (or not): receipt to its sender, file gone."""
        self._audit_delivered(incoming, receipt)
        await self._send_receipt(incoming.sender_site, receipt)
        await asyncio.to_thread(incoming.remove)

    def _on_delivered(self, incoming: IncomingTransfer, receipt: Receipt) -> None:
        self._audit_delivered(incoming, receipt)
        self.metrics.delivered(incoming, receipt)
        if "retrieve" in incoming.meta:
            self.requester.on_delivered(incoming, receipt)

    def _audit_delivered(self, incoming: IncomingTransfer, receipt: Receipt) -> None:
        """instance-stored or instance-failed: the local node's (or C-GET requester's) answer."""
        self.audit.record(
            "instance-stored" if receipt.outcome == "stored" else "instance-failed",
            status=receipt.status,
            outcome="success" if receipt.outcome == "stored" else "failure",
            from_site=incoming.sender_site,
            transfer_id=incoming.transfer_id.hex(),
            node=incoming.meta.get("node"),
            **{name: incoming.meta.get(name) for name in AUDIT_META},
        )

    async def _rescan_incoming(self) -> None:
        """Pick up what `dicombridge quarantine retry` put back into incoming/."""
        while True:
            await asyncio.sleep(INCOMING_RESCAN_S)
            for incoming in await asyncio.to_thread(self.receiver.pending):
                await self._submit(incoming)

    async def _on_resent(self, to_site: str, transfer_id: bytes, document: dict[str, Any]) -> None:
        """A transfer already done arrived again: its sender lacks a final receipt.

        If delivery gave up on it for a reason a retry may fix (0xA7xx: the PACS was out of
        resources or unreachable for ``give_up_after_s``), it is retried from quarantine
        (the plaintext is there; the re-sent copy is dropped) or, if the quarantined copy
        was purged, forgotten so that the next re-send is accepted. Otherwise the sender
        gets the receipt it lacks again.
        """
        tid = transfer_id.hex()
        receipt = Receipt.from_document({**document, "type": RECEIPT})
        if receipt.outcome == "failed" and 0xA700 <= receipt.status <= 0xA7FF:
            incoming = await asyncio.to_thread(self._retry_given_up, to_site, tid)
            if incoming is not None:
                self.deliverer.submit(incoming)
            log.info(
                "re-sent transfer given another chance",
                extra={"transfer_id": tid, "from_quarantine": incoming is not None},
            )
            return
        log.info("receipt owed again for a re-sent transfer", extra={"transfer_id": tid})
        await self._owe_receipt(to_site, transfer_id, {**document, "type": RECEIPT})

    def _retry_given_up(self, sender_site: str, transfer_id_hex: str) -> IncomingTransfer | None:
        """Put a given-up transfer back into incoming/ (returned), or forget it."""
        quarantine = Quarantine(self.site.config.storage.root)
        entry = quarantine.find(sender_site, transfer_id_hex)
        if entry is not None and entry.stage == "delivery":
            quarantine.retry(entry)
            for incoming in self.receiver.pending():
                if incoming.transfer_id.hex() == transfer_id_hex:
                    return incoming
            return None
        (self.receiver.done / sender_site / transfer_id_hex).unlink(missing_ok=True)
        return None

    async def _send_receipt(self, to_site: str, receipt: Receipt) -> None:
        """Record the receipt of a delivered (or given-up) transfer and owe it to the sender.

        Recorded with the done marker first (a re-send of the transfer gets it again),
        then kept in ``receipts/`` until the broker confirmed it; publishing happens in
        the background, so delivery never waits for the broker.
        """
        document = receipt.to_document()
        await asyncio.to_thread(
            self.receiver.record_receipt, to_site, receipt.transfer_id, document
        )
        await self._owe_receipt(to_site, receipt.transfer_id, document)

    async def _owe_receipt(
        self, to_site: str, transfer_id: bytes, document: dict[str, Any]
    ) -> None:
        self.unsent_receipts.add(to_site, transfer_id, document)
        self._queue_receipt(to_site, transfer_id)

    def _queue_receipt(self, to_site: str, transfer_id: bytes) -> None:
        key = (to_site, transfer_id)
        if key not in self._receipts_queued:
            self._receipts_queued.add(key)
            self._receipt_queue.put_nowait(key)

    async def _receipt_publisher(self) -> None:
        """Publish owed receipts, oldest first, until the broker confirmed each."""
        for to_site, transfer_id, _document in list(self.unsent_receipts):
            self._queue_receipt(to_site, transfer_id)
        while True:
            key = await self._receipt_queue.get()
            try:
                await self._publish_owed_receipt(*key)
            finally:
                self._receipts_queued.discard(key)
                self._receipt_queue.task_done()

    async def _publish_owed_receipt(self, to_site: str, transfer_id: bytes) -> None:
        assert self._transport is not None
        document = self.unsent_receipts.get(to_site, transfer_id)
        if document is None:
            return
        receipt = Receipt.from_document(document)
        message_id, body = seal_control(
            receipt.to_document(),
            sender=self.site.sender,
            directory=self.site.directory,
            recipient_site=to_site,
        )
        delay = 1.0
        while True:
            try:
                await self._transport.publish("control", to_site, body, message_id=message_id)
                break
            except TransportError as exc:
                log.warning(
                    "receipt not published; retrying",
                    extra={"transfer_id": transfer_id.hex(), "error": type(exc).__name__},
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
                delay = min(delay * 2, 30.0)
        self.unsent_receipts.confirmed(to_site, transfer_id)

    async def _publish_control(self, to_site: str, document: dict[str, Any]) -> None:
        """Seal a control document for ``to_site`` and publish it (raises TransportError)."""
        transport = self._transport
        if transport is None or not self._broker_connected.is_set():
            raise BrokerUnreachableError("not connected to the broker yet")
        message_id, body = seal_control(
            document, sender=self.site.sender, directory=self.site.directory, recipient_site=to_site
        )
        await transport.publish("control", to_site, body, message_id=message_id)

    async def _publish_request(self, to_site: str, document: dict[str, Any]) -> None:
        """The requester's control messages; a query or retrieve asked of ``to_site`` is
        remembered for the audit record of its final response (or audited as failed
        here if it cannot be published)."""
        query = Query.from_document(document) if document.get("type") == QUERY else None
        key = None if query is None else f"query-sent {query.query_id}"
        if query is not None and key is not None and self.audit.enabled:
            self.audit.remember(key, {"to_site": to_site, **_query_fields(query)})
        try:
            await self._publish_control(to_site, document)
        except BaseException:
            if key is not None:
                self._audit_query(self.audit.recall(key, forget=True), None)
            raise

    async def _publish_answer(self, to_site: str, document: dict[str, Any]) -> None:
        """The responder's control messages; a final response is audited (the query or
        retrieve answered for ``to_site``, or its refusal by policy)."""
        await self._publish_control(to_site, document)
        if document.get("type") == QUERY_RESPONSE and document.get("final"):
            key = f"query-answered {to_site} {document.get('query_id')}"
            fields = self.audit.recall(key, forget=True)
            if fields:
                self._audit_query(fields, int(document["status"]))

    def _audit_query(self, fields: dict[str, Any], status: int | None) -> None:
        """query or retrieve (by operation), or policy-refusal for a responder's 0x0124."""
        operation = fields.get("operation")
        event: AuditEvent = "retrieve" if operation in ("move", "get") else "query"
        if status == STATUS_NOT_AUTHORISED and "from_site" in fields:
            event = "policy-refusal"
        self.audit.record(
            event,
            status=status,
            outcome="failure" if status is None else None,
            **fields,
        )

    async def _on_control(self, delivery: Delivery) -> None:
        message = open_control(
            delivery.body,
            from_site=delivery.sender_site,
            site_id=self.site.site_id,
            keys=self.site.keys,
            directory=self.site.directory,
        )
        sender = message.sender_site
        self.metrics.contact(sender)
        refusal = self.replay.refusal(message.message_id, _created_at(message.document))
        if refusal is not None:
            self.control_refused += 1
            log.warning(
                "control message not acted on",
                extra={
                    "message_id": message.message_id,
                    "from_site": sender,
                    "type": message.type,
                    "reason": refusal,
                },
            )
            return
        await self._act_on_control(message)
        self.replay.acted_on(message.message_id)

    async def _act_on_control(self, message: ControlMessage) -> None:
        sender = message.sender_site
        if message.type == QUERY_RESPONSE:
            response = QueryResponse.from_document(message.document)
            if response.final:
                fields = self.audit.recall(f"query-sent {response.query_id}", forget=True)
                if fields.get("to_site") == sender:
                    self._audit_query(fields, response.status)
            self.requester.on_response(sender, response)
        elif message.type == QUERY:
            query = Query.from_document(message.document)
            if self.audit.enabled:
                self.audit.remember(
                    f"query-answered {sender} {query.query_id}",
                    {"from_site": sender, **_query_fields(query)},
                )
            await self.responder.on_query(sender, query, _created_at(message.document))
        elif message.type == CANCEL:
            await self.responder.on_cancel(sender, Cancel.from_document(message.document))
        elif message.type == RECEIPT:
            await self._on_receipt(sender, Receipt.from_document(message.document))
        else:
            raise IntegrityError(f"unknown control message type {message.type!r}")

    async def _on_receipt(self, sender: str, receipt: Receipt) -> None:
        entry = await asyncio.to_thread(self.outbox.record_receipt, receipt, from_site=sender)
        log.info(
            "receipt",
            extra={
                "transfer_id": receipt.transfer_id.hex(),
                "from_site": sender,
                "outcome": receipt.outcome,
                "status": f"{receipt.status:#06x}",
                "known": entry is not None,
            },
        )
        created_at = None if entry is None else entry.state.get("created_at")
        self.metrics.receipt(sender, receipt, created_at=created_at, known=entry is not None)
        if entry is not None:
            # A failed receipt keeps the entry (and its UIDs) for the re-send's receipt.
            remembered = self.audit.recall(
                receipt.transfer_id.hex(), forget=receipt.outcome == "stored"
            )
            remembered["to_site"] = sender
            self.audit.record(
                "instance-stored" if receipt.outcome == "stored" else "instance-failed",
                status=receipt.status,
                outcome="success" if receipt.outcome == "stored" else "failure",
                transfer_id=receipt.transfer_id.hex(),
                **remembered,
            )

    # --- lifecycle --------------------------------------------------------------------

    async def run(
        self, *, scp_started: asyncio.Event | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Serve until cancelled, or until ``stop`` is set (then stop gracefully)."""
        self._loop = asyncio.get_running_loop()
        self.requester.loop = self._loop
        self.audit.open()
        self.outbox.recover()
        for entry in self.outbox.entries():
            if not entry.published:
                self._publish_queue.put_nowait(entry.transfer.transfer_id_hex)
        await asyncio.to_thread(self.receiver.recover)
        for incoming in self.receiver.pending():
            await self._submit(incoming)
        async with StorageSCP(
            policy=self.acceptance_policy(),
            on_store=self.on_instance,
            settings=self.scp_settings(),
            queries=self.requester,
        ) as scp:
            self.scp_port = scp.port
            self._scp = scp
            scp.gate.on_reject = self._audit_rejected
            self.responder.retrieve_handlers = scp.retrieve_handlers
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.deliverer.run())
                    group.create_task(self._watch_table())
                    group.create_task(self._rescan_incoming())
                    group.create_task(self._retention())
                    group.create_task(self._broker_side(scp_started))
                    group.create_task(self.monitor.run())
                    if stop is not None:
                        group.create_task(self._stop_when(stop, scp))
                    log.info(
                        "gateway serving DICOM",
                        extra={"site": self.site.site_id, "port": scp.port},
                    )
            except* _Stopped:
                log.info("gateway stopped", extra={"site": self.site.site_id})
            finally:
                await self.responder.close()
                for client in self._clients.values():
                    await asyncio.to_thread(client.close)
                self.unsent_receipts.close()
                await asyncio.to_thread(self.audit.close)

    # --- the routing table ------------------------------------------------------------

    def apply_table(self, edited: SiteConfig) -> list[str]:
        """Serve ``edited``'s routing table from now on; return the other sections it
        changes (ignored until a restart). ``ConfigError`` if it does not fit the running
        settings: then nothing changes.

        Open associations keep going; a node whose address changed gets a new pool of
        associations, the old one closing once its C-STORE under way has finished."""
        merged, restart = routing_table.running_table(self.site.config, edited)
        old_nodes = {node.name: node for node in self.site.config.local_nodes}
        nodes = {node.name: node for node in merged.local_nodes}
        self.site = dataclasses.replace(self.site, config=merged)
        self._rules = RouteRules(merged.routes)
        self.deliverer.replace_nodes(nodes)
        self.requester.replace_table(merged.routes, merged.local_nodes)
        self.responder.replace_table(nodes, RemoteAccessPolicy(merged.remote_access))
        if self._scp is not None:
            self._scp.replace_policy(self.acceptance_policy())
        for name, node in old_nodes.items():
            if nodes.get(name) != node and name in self._clients:
                retired = self._clients.pop(name)
                task = asyncio.get_running_loop().create_task(asyncio.to_thread(retired.close))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return restart

    async def _watch_table(self) -> None:
        """Reload the routing table when ``gateway.toml`` changes (its size, time or
        inode: editors and ``dicombridge routes`` replace it by a rename)."""
        path = self.site.config.source
        seen = await asyncio.to_thread(_stamp, path)
        while True:
            await asyncio.sleep(self.site.config.gateway.reload_check_s)
            stamp = await asyncio.to_thread(_stamp, path)
            if stamp == seen:
                continue
            seen = stamp
            try:
                edited = await asyncio.to_thread(site_config.load, path)
                restart = self.apply_table(edited)
            except ConfigError as exc:
                self.table_reloads_refused += 1
                log.error(
                    "routing table not reloaded; the one in force stays",
                    extra={"error": str(exc)},
                )
                continue
            self.table_reloads += 1
            log.info(
                "routing table reloaded",
                extra={
                    "routes": len(self.site.config.routes),
                    "local_nodes": len(self.site.config.local_nodes),
                    "needs_restart": restart,
                },
            )

    async def _retention(self) -> None:
        """Alarms before outbox, spool, incoming or quarantine reach their limits; purges."""
        config = self.site.config
        await run_retention(
            config.storage.root,
            config.retention,
            outbox_max_bytes=config.outbox.max_bytes,
            outbox_max_count=config.outbox.max_count,
            on_purged=lambda item: (
                self.outbox.remove(item.transfer_id) if item.area == "outbox" else None
            ),
        )

    async def _stop_when(self, stop: asyncio.Event, scp: StorageSCP) -> None:
        """Once ``stop`` is set: stop accepting, let in-flight work finish, then end ``run``."""
        await stop.wait()
        grace = self.site.config.gateway.shutdown_grace_s
        log.info("stopping: no new associations", extra={"grace_s": grace})
        await scp.stop()
        deadline = asyncio.get_running_loop().time() + grace
        if not await self.deliverer.finish(timeout_s=grace):
            log.warning("stopping: a C-STORE to the local node did not finish in time")
        if self._broker_connected.is_set():
            # Receipts owed stay in receipts/ anyway; sending them now spares the senders
            # a re-send.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._receipt_queue.join()
        raise _Stopped

    async def _connect(self) -> Transport:
        """Connect to the broker, retrying with backoff while it is unreachable.

        Meanwhile the SCP keeps accepting into the outbox, up to its caps (then 0xA700).
        """
        config = self.site.config
        delay = 1.0
        while True:
            transport = Transport(
                amqp_url=config.amqp_urls(),
                site_id=self.site.site_id,
                broker_user=config.broker.user,
                directory=self.site.directory,
                max_in_flight_bytes=config.transfer.max_in_flight_bytes,
                max_in_flight_messages=config.transfer.max_in_flight_messages,
                connect_timeout_s=config.broker.connect_timeout_s,
                heartbeat_s=config.broker.heartbeat_s,
                tls=BrokerTls.of(config.broker),
            )
            try:
                return await transport.__aenter__()
            except BrokerUnreachableError as exc:
                log.warning(
                    "broker unreachable; instances wait in the outbox",
                    extra={"retry_in_s": round(delay, 1), "error": str(exc)},
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(delay * 2, 30.0)

    async def _broker_side(self, scp_started: asyncio.Event | None) -> None:
        """Everything that needs the broker: consumers, publishers, the resender."""
        transport = await self._connect()
        self._transport = transport
        self._broker_connected.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(transport.consume("bulk", self.receiver.handle))
                group.create_task(transport.consume("control", self._on_control))
                group.create_task(self._resender())
                group.create_task(self._receipt_publisher())
                for _ in range(PUBLISHERS):
                    group.create_task(self._publisher())
                self.ready.set()
                if scp_started is not None:
                    scp_started.set()
                log.info("gateway ready", extra={"site": self.site.site_id})
        finally:
            await transport.__aexit__(None, None, None)


# Header attributes the audit trail needs beyond the SCP's (which knows the SOP Instance UID).
AUDIT_KEYWORDS: Final = frozenset({"StudyInstanceUID", "SeriesInstanceUID"})
# Transfer meta that goes into audit records as it is.
AUDIT_META: Final = (
    "calling_ae_title",
    "called_ae_title",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sop_class_uid",
)


def _study_uids(attributes: dict[str, str | list[str]]) -> dict[str, str]:
    """The Study and Series Instance UIDs among header ``attributes``, as transfer meta."""
    uids = {}
    for keyword, name in (
        ("StudyInstanceUID", "study_instance_uid"),
        ("SeriesInstanceUID", "series_instance_uid"),
    ):
        value = attributes.get(keyword)
        if isinstance(value, str) and value:
            uids[name] = value
    return uids


def _read_study_uids(source: Path | bytes) -> dict[str, str]:
    """Read the UIDs for the audit trail; a header pydicom cannot read gets none (the
    instance is relayed all the same: the audit must not refuse what the route takes)."""
    try:
        return _study_uids(read_attributes(source, AUDIT_KEYWORDS))
    except Exception as exc:  # pydicom raises many types; any is the data set's fault
        log.warning("study and series UIDs unreadable", extra={"error": type(exc).__name__})
        return {}


def _query_fields(query: Query) -> dict[str, Any]:
    """A query's audit fields: who asked which node what, at which level (no keys)."""
    level = None
    if query.identifier:
        with contextlib.suppress(Exception):  # pydicom raises many types; any means none
            level = from_explicit_little(query.identifier).get("QueryRetrieveLevel")
    return {
        "query_id": query.query_id,
        "operation": query.operation,
        "node": query.node,
        "calling_ae_title": query.calling_ae_title,
        "called_ae_title": query.called_ae_title,
        "level": None if level is None else str(level).strip(),
    }


def _created_at(document: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(document["created_at"]))
    except (KeyError, ValueError):
        return None


class _Stopped(Exception):
    """Ends the gateway's task group once a graceful stop is done."""


def run_gateway(config_path: Path) -> None:
    """Load the site and serve until SIGTERM or SIGINT (the CLI's ``gateway run``).

    The first signal stops gracefully (see the module docstring); a second one at once.
    """
    site = LocalSite.load(config_path)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await Gateway(site).run(stop=stop)

    try:
        asyncio.run(main())
    except BaseExceptionGroup as group:
        # A permanent error of one of the gateway's tasks (a broker certificate from an
        # unknown CA, ...): the CLI prints it as one line naming the fix, not a traceback.
        permanent = group.subgroup(lambda exc: isinstance(exc, BridgeError))
        if permanent is None:
            raise
        first = permanent.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells an edited file from the one read before (None: it is gone)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino
