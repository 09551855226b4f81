"""A full disk at either end (issue 4, "nothing lost"): a clear error, nothing acked that
is not on disk, and everything goes on once there is room.

Each disk is a small tmpfs mounted by the test (root needed: a failure, never a skip).
Sending side: the SCP's receive directory and the outbox; a modality gets 0xA700 with an
Error Comment, and what was answered success arrives. Receiving side: the spool and
``incoming/``; deliveries are held unacked, and arrive once there is room.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest

from dicombridge.acceptance import AcceptancePolicy
from dicombridge.durable import write_durably
from dicombridge.management import ManagementClient
from dicombridge.rabbitmq import BrokerNode
from dicombridge.scp import (
    RECEIVE_DISK_FULL_COMMENT,
    RECEIVE_PREFIX,
    SUCCESS,
    ReceivedInstance,
    ScpSettings,
    StorageSCP,
    StoreOutcome,
)
from dicombridge.spool import DISK_FULL_HOLD_S, Receiver, ReceiverIdentity
from dicombridge.topology import dead_queue_name, queue_name
from dicombridge.transport import Delivery
from tests.brokerkit import Inbox, wait_until
from tests.cryptokit import Federation, make_federation, messages, sha256_file, write_random
from tests.dicomkit import read_source
from tests.pacskit import StoreSCPNode, dcmtk_env
from tests.relaykit import (
    TwoSites,
    ct_series,
    delete_users,
    route_to_pacs,
    running_gateways,
)
from tests.test_outbox import fill_disk, mounted_tmpfs

pytestmark = pytest.mark.integration
ROUTE = "SITE_B"
MIB = 1024 * 1024
_ERROR_COMMENT = re.compile(r"\(0000,0902\) LO \[([^\]]*)\]")


def files_in(directory: Path) -> list[str]:
    """Every file under ``directory``, relative (directories themselves not listed)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def storescu(port: int, files: Sequence[Path]) -> str:
    """DCMTK's storescu sending ``files`` on one association, going on after a failed
    C-STORE; its debug output (``-d`` prints each response with its Error Comment)."""
    result = subprocess.run(
        [
            "/usr/bin/storescu",
            "-d",
            "--no-halt",
            "-aet",
            "MODALITY",
            "-aec",
            ROUTE,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=dcmtk_env(),
    )
    return result.stdout + result.stderr


def store_each(port: int, files: Sequence[Path]) -> list[str | None]:
    """Send each file on its own association: ``None`` for success, else the Error
    Comment of a 0xA700 response (anything else fails the test)."""
    outcomes: list[str | None] = []
    for path in files:
        output = storescu(port, [path])
        if "0x0000: Success" in output or "(Success)" in output:
            outcomes.append(None)
            continue
        assert "0xa700" in output.lower(), output
        comments = _ERROR_COMMENT.findall(output)
        assert comments, output
        outcomes.append(comments[-1])
    return outcomes


@pytest.fixture
def fed() -> Federation:
    """Sites hosp-a, hosp-b, hosp-c with keys and a signed directory."""
    return make_federation()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCPNode]:
    """DCMTK's storescp as site B's PACS."""
    node = StoreSCPNode.start(tmp_path / "storescp", ae_title="PACS_B")
    yield node
    node.stop()


# --- durable writes -----------------------------------------------------------------------


def test_write_durably_on_a_full_disk_keeps_the_old_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    """ENOSPC while writing leaves the target as it was, whole, and removes the temporary."""
    with mounted_tmpfs(tmp_path / "disk", size_bytes=256 * 1024) as disk:
        target = disk / "state.json"
        write_durably(target, b"old")
        fill_disk(disk, leave_bytes=8192)
        with pytest.raises(OSError, match="No space left") as info:
            write_durably(target, os.urandom(64 * 1024))
        assert info.value.errno == errno.ENOSPC
        assert target.read_bytes() == b"old"
        assert files_in(disk) == ["filler", "state.json"]


# --- the receiving side, one receiver -------------------------------------------------------


def bulk(body: bytes) -> Delivery:
    return Delivery(
        body=body, sender_site="hosp-a", plane="bulk", message_id=None, redelivered=False
    )


async def handle_all(receiver: Receiver, bodies: Sequence[bytes]) -> None:
    for body in bodies:
        await receiver.handle(bulk(body))


def receiver_for(
    root: Path, fed: Federation, inbox: Inbox, *, disk_full_hold_s: float = DISK_FULL_HOLD_S
) -> Receiver:
    identity = ReceiverIdentity("hosp-b", fed.keys["hosp-b"], fed.directory)
    return Receiver(root, identity, inbox.on_transfer, disk_full_hold_s=disk_full_hold_s)


@pytest.mark.parametrize("full", ["spool", "incoming"])
async def test_receiver_holds_a_delivery_while_its_disk_is_full(
    tmp_path: Path, fed: Federation, full: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A full spool (fragments) or incoming/ (assembly) holds the delivery unfinished,
    with an error naming the directory and the bytes free and no partial file; once the
    filler is gone the transfer arrives whole."""
    source = tmp_path / "instance.bin"
    write_random(source, 200_000)
    sealed = fed.seal(source, tmp_path / "outbox", fragment_size=65536)
    inbox = Inbox()
    root = tmp_path / "site"
    with mounted_tmpfs(root / full, size_bytes=MIB) as disk:
        receiver = receiver_for(root, fed, inbox)
        filler = fill_disk(disk, leave_bytes=0 if full == "spool" else 64 * 1024)
        task = asyncio.create_task(handle_all(receiver, messages(sealed)))

        async def held() -> bool:
            return receiver.disk_full_holds == 1

        await wait_until(held, what="the delivery to be held")
        assert not task.done()
        assert files_in(disk) == ["filler"]  # no temporary, no partial plaintext
        [record] = [r for r in caplog.records if "delivery held" in r.getMessage()]
        assert record.levelno == logging.ERROR
        assert record.__dict__["directory"] == str(disk)
        assert record.__dict__["free_bytes"] < 200_000

        filler.unlink()
        await asyncio.wait_for(task, timeout=30)
        await inbox.wait_for(1)
        [(incoming, path)] = inbox.received
        assert sha256_file(path) == sha256_file(source)
        assert incoming.sidecar.exists()
        assert receiver.quarantined == 0


async def test_receiver_gives_a_held_delivery_back_after_the_hold(
    tmp_path: Path, fed: Federation
) -> None:
    """A disk still full after ``disk_full_hold_s`` fails the delivery with the OSError
    (the transport requeues it) and leaves no partial file; its redelivery, once there is
    room, completes the transfer."""
    source = tmp_path / "instance.bin"
    write_random(source, 100_000)
    sealed = fed.seal(source, tmp_path / "outbox", fragment_size=65536)
    bodies = messages(sealed)
    inbox = Inbox()
    root = tmp_path / "site"
    with mounted_tmpfs(root / "spool", size_bytes=MIB) as disk:
        receiver = receiver_for(root, fed, inbox, disk_full_hold_s=0.5)
        filler = fill_disk(disk)
        with pytest.raises(OSError, match="No space left"):
            await receiver.handle(bulk(bodies[0]))
        assert files_in(disk) == ["filler"]
        filler.unlink()
        await handle_all(receiver, bodies)
        await inbox.wait_for(1)
        assert sha256_file(inbox.received[0][1]) == sha256_file(source)


# --- the sending side: the SCP's receive directory --------------------------------------------


async def test_scp_answers_a700_when_its_receive_disk_is_full_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A data set that does not fit in the receive directory gets 0xA700 with the disk-full
    comment, leaves no temporary file, and does not end the association: the next, small
    C-STORE on it succeeds; once there is room the large one succeeds too."""
    big, small = (
        ct_series(tmp_path / "big", 1, rows=512, columns=512)[0],
        ct_series(tmp_path / "small", 1, rows=32, columns=32)[0],
    )
    received: dict[str, str] = {}

    async def on_store(instance: ReceivedInstance) -> StoreOutcome:
        received[instance.sop_instance_uid] = hashlib.sha256(
            read_source(instance.source)
        ).hexdigest()
        return StoreOutcome(SUCCESS)

    with mounted_tmpfs(tmp_path / "receiving", size_bytes=MIB) as disk:
        (disk / f"{RECEIVE_PREFIX}left-by-a-crash.dcm").write_bytes(b"partial")
        settings = ScpSettings(
            host="127.0.0.1", port=0, receive_dir=disk, receive_in_memory_bytes=0
        )
        async with StorageSCP(
            policy=AcceptancePolicy.of([ROUTE]), on_store=on_store, settings=settings
        ) as scp:
            assert files_in(disk) == []  # the crash's leftover is gone
            filler = fill_disk(disk, leave_bytes=128 * 1024)
            output = await asyncio.to_thread(storescu, scp.port, [big, small])
            assert _ERROR_COMMENT.findall(output) == [RECEIVE_DISK_FULL_COMMENT]
            assert "0xa700" in output.lower()
            assert "Abort" not in output
            assert "Releasing Association" in output
            assert list(received) == [sop_instance_uid(small)]
            assert files_in(disk) == ["filler"]
            [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert "disk full" in record.getMessage()
            assert str(disk) in record.getMessage()
            assert "bytes free" in record.getMessage()

            filler.unlink()
            output = await asyncio.to_thread(storescu, scp.port, [big])
            assert "(Success)" in output or "0x0000: Success" in output, output
            assert sop_instance_uid(big) in received
            assert files_in(disk) == []


# --- gateways ----------------------------------------------------------------------------


@pytest.fixture
def sites(
    rabbitmq_node: BrokerNode,
    management: ManagementClient,
    vhost: str,
    storescp: StoreSCPNode,
    tmp_path: Path,
) -> Iterator[TwoSites]:
    """Sites A and B, A's route AE title leading to B's storescp."""
    provisioned = route_to_pacs(
        tmp_path / "fed", broker=rabbitmq_node, vhost=vhost, pacs_port=storescp.port
    )
    yield provisioned
    delete_users(management, provisioned)


async def test_gateway_with_a_full_outbox_disk_answers_a700_and_loses_nothing(
    sites: TwoSites, storescp: StoreSCPNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Site A's outbox on a 1 MiB tmpfs, site B not running: storescu sends until the disk
    is full; the refused instances get 0xA700 with an outbox Error Comment and leave
    nothing behind; once B runs, every instance answered success arrives there (its
    receipts free the outbox), and the refused ones are then accepted and arrive too."""
    files = ct_series(tmp_path / "series", 10, rows=256, columns=256)
    outbox_dir = sites.storage_root(sites.site_a) / "outbox"
    with mounted_tmpfs(outbox_dir, size_bytes=MIB):
        async with running_gateways(sites.config_a) as [gateway_a]:
            outcomes = await asyncio.to_thread(store_each, sites.port_a, files)
            accepted = [f for f, o in zip(files, outcomes, strict=True) if o is None]
            refused = [f for f, o in zip(files, outcomes, strict=True) if o is not None]
            assert accepted
            assert refused
            for comment in outcomes:
                if comment is not None:
                    assert comment == "dicombridge outbox disk full; retry later", comment
            assert gateway_a.outbox.count == len(accepted)
            assert not [name for name in os.listdir(outbox_dir) if name.startswith(".")]
            assert any(
                r.name == "dicombridge.outbox"
                and r.levelno == logging.ERROR
                and "disk full" in r.getMessage()
                and r.__dict__["directory"] == str(outbox_dir)
                and isinstance(r.__dict__["free_bytes"], int)
                for r in caplog.records
            )

            async def drained() -> bool:
                return gateway_a.outbox.count == 0

            async with running_gateways(sites.config_b):
                await wait_until(drained, timeout_s=90, interval_s=0.2, what="A's outbox")
                for path in accepted:
                    assert storescp.stored(sop_instance_uid(path)) is not None
                for path in refused:
                    assert storescp.stored(sop_instance_uid(path)) is None

                again = await asyncio.to_thread(store_each, sites.port_a, refused)
                assert again == [None] * len(refused)
                await wait_until(drained, timeout_s=90, interval_s=0.2, what="A's outbox")
                for path in files:
                    assert storescp.stored(sop_instance_uid(path)) is not None


async def test_gateway_with_a_full_spool_disk_keeps_transfers_in_the_queue(
    sites: TwoSites,
    storescp: StoreSCPNode,
    tmp_path: Path,
    management: ManagementClient,
    vhost: str,
) -> None:
    """Site B's spool on a tmpfs filled to the brim: transfers wait unacked in B's queue
    (not acked, not dead-lettered), A's outbox keeps them; once the filler is removed they
    arrive at B's PACS and A's outbox empties. (Several fragments each: a transfer of one
    fragment whose messages come together does not go through the spool.)"""
    config_a = sites.config_a.read_text()
    sites.config_a.write_text(
        config_a.replace("fragment_size_bytes = 1048576", "fragment_size_bytes = 4096", 1)
    )
    files = ct_series(tmp_path / "series", 3, rows=64, columns=64)
    spool_dir = sites.storage_root(sites.site_b) / "spool"
    bulk_queue = queue_name(sites.site_b, "bulk")
    with mounted_tmpfs(spool_dir, size_bytes=256 * 1024) as spool:
        filler = fill_disk(spool)
        async with running_gateways(sites.config_a, sites.config_b) as [gateway_a, gateway_b]:
            assert await asyncio.to_thread(store_each, sites.port_a, files) == [None] * 3

            async def waiting_unacked() -> bool:
                queue = await asyncio.to_thread(management.get_queue, vhost, bulk_queue)
                return (
                    gateway_b.receiver.disk_full_holds >= 1
                    and queue is not None
                    and queue.get("messages_unacknowledged", 0) >= 1
                    and queue.get("messages", 0) >= len(files)
                )

            await wait_until(
                waiting_unacked, timeout_s=60, interval_s=0.5, what="unacked transfers"
            )
            assert gateway_a.outbox.count == len(files)
            assert all(storescp.stored(sop_instance_uid(f)) is None for f in files)
            assert files_in(spool) == ["filler"]  # nothing half-written

            filler.unlink()

            async def drained() -> bool:
                return gateway_a.outbox.count == 0

            await wait_until(drained, timeout_s=90, interval_s=0.2, what="A's outbox")
            for path in files:
                assert storescp.stored(sop_instance_uid(path)) is not None
            assert gateway_b.receiver.quarantined == 0
            dead = await asyncio.to_thread(
                management.get_queue, vhost, dead_queue_name(sites.site_b)
            )
            assert dead is not None
            assert dead.get("messages", 0) == 0
