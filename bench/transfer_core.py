"""Benchmark of the secure transfer core: seal, open, and a relay through a real broker.

Prints a table and writes bench-results/transfer_core.json. Run with ``make bench``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dicombridge.fragments import Recipient, SealedTransfer, seal_file
from dicombridge.identity import LocalSite
from dicombridge.keys import KemPublicKey, newest_valid, utc_now
from dicombridge.rabbitmq import BrokerNode
from dicombridge.sandbox import create_federation
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity, Spool
from dicombridge.transport import Transport

SIZE_MB = 256


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(
    label: str, results: dict[str, dict[str, float]], size: int, fn: Callable[[], None]
) -> None:
    wall, cpu = time.perf_counter(), cpu_s()
    fn()
    wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
    results[label] = {"seconds": wall, "cpu_seconds": cpu, "mb_per_s": size / 1e6 / wall}


async def relay(work: Path, a: LocalSite, b: LocalSite, key: KemPublicKey, source: Path) -> float:
    done: asyncio.Future[IncomingTransfer] = asyncio.get_running_loop().create_future()

    async def arrived(incoming: IncomingTransfer) -> None:
        done.set_result(incoming)

    receiver = Receiver(
        b.config.storage.root, ReceiverIdentity("hosp-b", b.keys, b.directory), arrived
    )
    async with (
        Transport(
            amqp_url=a.config.amqp_url(),
            site_id="hosp-a",
            broker_user="hosp-a",
            directory=a.directory,
            max_in_flight_bytes=64 * 1024 * 1024,
            max_in_flight_messages=64,
        ) as ta,
        Transport(
            amqp_url=b.config.amqp_url(),
            site_id="hosp-b",
            broker_user="hosp-b",
            directory=b.directory,
        ) as tb,
    ):
        consumer = asyncio.create_task(tb.consume("bulk", receiver.handle))
        started = time.perf_counter()
        (work / "outbox").mkdir(exist_ok=True)
        sealed = await asyncio.to_thread(
            seal_file, source, work / "outbox", sender=a.sender, recipient=Recipient("hosp-b", key)
        )
        await ta.publish_transfer(sealed)
        await asyncio.wait_for(done, timeout=600)
        elapsed = time.perf_counter() - started
        consumer.cancel()
    return elapsed


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="dicombridge-bench-"))
    source = work / "source.bin"
    with open(source, "wb") as out:
        for _ in range(SIZE_MB):
            out.write(os.urandom(1024 * 1024))
    size = source.stat().st_size
    results: dict[str, dict[str, float]] = {}
    broker = BrokerNode.start(work / "broker")
    try:
        fed = create_federation(
            work / "fed", broker=broker, site_ids=["hosp-a", "hosp-b"], vhost="bench"
        )
        a, b = fed.site("hosp-a"), fed.site("hosp-b")
        entry = a.directory.site("hosp-b")
        assert entry is not None
        key = newest_valid(entry.kem_public_keys(), utc_now())
        assert key is not None
        holder: dict[str, SealedTransfer] = {}

        def seal() -> None:
            holder["t"] = seal_file(
                source, work / "outbox-offline", sender=a.sender, recipient=Recipient("hosp-b", key)
            )

        (work / "outbox-offline").mkdir()
        timed("seal (1 MiB fragments, fsync)", results, size, seal)
        transfer = holder["t"]
        spool = Spool(work / "spool-offline")

        def spool_and_open() -> None:
            spool.put("hosp-a", transfer.manifest_body())
            for _, body in transfer.fragment_bodies():
                spool.put("hosp-a", body)
            spool.assemble(
                "hosp-a",
                transfer.transfer_id,
                work / "out.bin",
                site_id="hosp-b",
                keys=b.keys,
                directory=b.directory,
            )

        timed("spool (fsync each) + verify + decrypt", results, size, spool_and_open)
        elapsed = asyncio.run(relay(work, a, b, key, source))
        results["relay through RabbitMQ (seal, publish, consume, open)"] = {
            "seconds": elapsed,
            "mb_per_s": size / 1e6 / elapsed,
        }
    finally:
        broker.stop()
    results["peak RSS of this process"] = {
        "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"transfer core, {SIZE_MB} MiB of random bytes")
    for label, figures in results.items():
        print(f"  {label:<58} " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    results_dir = Path("bench-results")
    results_dir.mkdir(exist_ok=True)
    (results_dir / "transfer_core.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
