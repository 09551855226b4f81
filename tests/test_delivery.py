"""Delivery to the local node: how many C-STOREs are under way at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dicombridge.config import DeliverySection, LocalNode
from dicombridge.control import Receipt
from dicombridge.delivery import Deliverer
from dicombridge.scu import STATUS_SUCCESS, StoreOutcome
from dicombridge.spool import IncomingTransfer
from tests.brokerkit import wait_until

NODE = LocalNode(name="PACS", ae_title="PACS", host="127.0.0.1", port=104)


class MeetingNode:
    """A StoreClient whose C-STOREs return only once ``together`` of them are under way
    at the same time (a barrier); it records the most it saw at once."""

    def __init__(self, together: int, *, timeout_s: float = 10.0) -> None:
        self._barrier = threading.Barrier(together, timeout=timeout_s)
        self._lock = threading.Lock()
        self._under_way = 0
        self.most_at_once = 0
        self.stored: list[str] = []

    def store(
        self,
        path: Path,
        *,
        move_originator_ae_title: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> StoreOutcome:
        with self._lock:
            self._under_way += 1
            self.most_at_once = max(self.most_at_once, self._under_way)
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            return StoreOutcome.from_status(0xA700, "never met another C-STORE")
        finally:
            with self._lock:
                self._under_way -= 1
        with self._lock:
            self.stored.append(path.name)
        return StoreOutcome.from_status(STATUS_SUCCESS, None)

    def holds(self, path: Path) -> bool | None:
        return None


def incomings(directory: Path, count: int) -> list[IncomingTransfer]:
    directory.mkdir(parents=True)
    made = []
    for n in range(count):
        path = directory / f"site-a.{n:032x}.dcm"
        path.write_bytes(b"\0" * 100)
        incoming = IncomingTransfer(
            "site-a", bytes.fromhex(f"{n:032x}"), path, 100, {"node": "PACS"}
        )
        incoming.save()
        made.append(incoming)
    return made


@pytest.mark.parametrize("associations", [2, 3])
async def test_deliveries_overlap_up_to_the_associations_setting(
    tmp_path: Path, associations: int
) -> None:
    """With [delivery] associations = N, N C-STOREs are under way at once (the node's
    barrier lets none return before N meet), never more; every instance is stored once,
    a stored receipt each, incoming/ empty."""
    node = MeetingNode(together=associations)
    receipts: list[Receipt] = []

    async def send_receipt(site: str, receipt: Receipt) -> None:
        receipts.append(receipt)

    deliverer = Deliverer(
        local_nodes={"PACS": NODE},
        clients=lambda n: node,
        send_receipt=send_receipt,
        quarantine=tmp_path / "quarantine",
        settings=DeliverySection(associations=associations),
    )
    waiting = incomings(tmp_path / "incoming", 4 * associations)
    for incoming in waiting:
        deliverer.submit(incoming)
    async with _running(deliverer), asyncio.timeout(60):
        await deliverer.join()
    assert node.most_at_once == associations
    assert sorted(node.stored) == sorted(i.path.name for i in waiting)
    assert [r.outcome for r in receipts] == ["stored"] * len(waiting)
    assert list((tmp_path / "incoming").iterdir()) == []


async def test_one_association_delivers_one_at_a_time(tmp_path: Path) -> None:
    """With associations = 1 no two C-STOREs overlap: a node that needs two at once
    never gets them (its barrier breaks after 0.5 s: a transient failure), and the
    instances are retried, not lost (still in incoming/)."""
    node = MeetingNode(together=2, timeout_s=0.5)

    async def send_receipt(site: str, receipt: Receipt) -> None:
        raise AssertionError("nothing is stored, so no receipt is sent")

    deliverer = Deliverer(
        local_nodes={"PACS": NODE},
        clients=lambda n: node,
        send_receipt=send_receipt,
        quarantine=tmp_path / "quarantine",
        settings=DeliverySection(associations=1, retry_initial_s=30),
    )
    waiting = incomings(tmp_path / "incoming", 2)
    for incoming in waiting:
        deliverer.submit(incoming)
    async with _running(deliverer):
        await wait_until(lambda: _retried(deliverer), timeout_s=10, what="a retry")
        assert await deliverer.finish(timeout_s=10)
    assert node.most_at_once == 1
    assert node.stored == []
    assert all(i.path.exists() and i.sidecar.exists() for i in waiting)


async def _retried(deliverer: Deliverer) -> bool:
    return deliverer.retries > 0


@contextlib.asynccontextmanager
async def _running(deliverer: Deliverer) -> AsyncIterator[None]:
    """Run ``deliverer.run()`` as a task for the block, cancelled after it."""
    task = asyncio.create_task(deliverer.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
