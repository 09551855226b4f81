"""``make demo``: a DICOM file crosses a real RabbitMQ broker, sealed for its recipient.

Starts a broker on loopback, makes an operator and two sites (hosp-a, hosp-b), provisions
the broker, seals one of pydicom's sample CT files at hosp-a for hosp-b, publishes it,
receives, verifies and decrypts it at hosp-b, compares the bytes, and shows what the
broker saw. Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import aio_pika
import pydicom
from pydicom.data import get_testdata_file

from dicombridge.fragments import Recipient, seal_file
from dicombridge.keys import newest_valid, utc_now
from dicombridge.sandbox import BrokerNode, Federation, create_federation
from dicombridge.spool import IncomingTransfer, Receiver, ReceiverIdentity
from dicombridge.topology import exchange_name
from dicombridge.transport import Transport

TAP_QUEUE = "demo.operator-tap"


def say(text: str = "") -> None:
    print(text, flush=True)


def phi_markers(path: Path) -> dict[str, bytes]:
    """The identifying values in the sample file that must never be visible on the broker."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    markers = {
        "PatientName": str(ds.PatientName).encode(),
        "PatientID": str(ds.PatientID).encode(),
        "StudyInstanceUID": str(ds.StudyInstanceUID).encode(),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID).encode(),
        "SOPInstanceUID": str(ds.SOPInstanceUID).encode(),
        "SHA-256": hashlib.sha256(path.read_bytes()).hexdigest().encode(),
    }
    return {k: v for k, v in markers.items() if v}


async def relay(federation: Federation, broker: BrokerNode, source: Path) -> None:
    site_a = federation.site("hosp-a")
    site_b = federation.site("hosp-b")

    # What the cloud operator can see: an admin's extra queue on hosp-b's exchange.
    admin = await aio_pika.connect(broker.admin_amqp_url(federation.vhost))
    async with admin:
        channel = await admin.channel()
        tap = await channel.declare_queue(TAP_QUEUE, durable=False, auto_delete=False)
        await tap.bind(exchange_name("hosp-b"), routing_key="#")

        entry_b = site_a.directory.site("hosp-b")
        assert entry_b is not None
        kem_key = newest_valid(entry_b.kem_public_keys(), utc_now())
        assert kem_key is not None
        outbox = site_a.config.storage.root / "outbox"
        outbox.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        sealed = seal_file(
            source,
            outbox,
            sender=site_a.sender,
            recipient=Recipient("hosp-b", kem_key),
            fragment_size=16 * 1024,  # small, so that this small file travels as several
        )
        say(
            f"[hosp-a] sealed {source.name} ({sealed.total_length} bytes) as transfer "
            f"{sealed.transfer_id_hex}: 1 manifest + {sealed.fragment_count} fragments, "
            f"sealed for hosp-b key {kem_key.key_id[:12]}"
        )

        arrived: asyncio.Future[IncomingTransfer] = asyncio.get_running_loop().create_future()

        async def on_transfer(incoming: IncomingTransfer) -> None:
            if not arrived.done():
                arrived.set_result(incoming)

        receiver = Receiver(
            site_b.config.storage.root,
            ReceiverIdentity(site_b.site_id, site_b.keys, site_b.directory),
            on_transfer,
        )
        async with (
            Transport(
                amqp_url=site_a.config.amqp_url(),
                site_id="hosp-a",
                broker_user=site_a.config.broker.user,
                directory=site_a.directory,
            ) as transport_a,
            Transport(
                amqp_url=site_b.config.amqp_url(),
                site_id="hosp-b",
                broker_user=site_b.config.broker.user,
                directory=site_b.directory,
            ) as transport_b,
        ):
            consumer = asyncio.create_task(transport_b.consume("bulk", receiver.handle))
            published = await transport_a.publish_transfer(sealed)
            say(f"[hosp-a] published {published} bytes to {exchange_name('hosp-b')}, all confirmed")
            incoming = await asyncio.wait_for(arrived, timeout=60)
            path = incoming.path
            consumer.cancel()
        elapsed = time.perf_counter() - started
        sent, received = await asyncio.to_thread(lambda: (source.read_bytes(), path.read_bytes()))
        same = sent == received
        say(
            f"[hosp-b] verified and decrypted transfer {incoming.transfer_id.hex()} from "
            f"{incoming.sender_site} in {elapsed * 1000:.0f} ms"
        )
        say(f"[hosp-b] SHA-256 sent     {hashlib.sha256(sent).hexdigest()}")
        say(f"[hosp-b] SHA-256 received {hashlib.sha256(received).hexdigest()}")
        say(f"[hosp-b] bytes identical: {'yes' if same else 'NO'}")
        if not same:
            raise SystemExit("demo failed: the received bytes differ")

        say()
        say("what the broker saw (the operator's tap on hosp-b's exchange):")
        say(f"  {'routing key':<14} {'message id':<38} {'user_id':<8} {'bytes':>8}")
        bodies = []
        while (message := await tap.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body + repr(message.properties).encode())
            say(
                f"  {message.routing_key or '':<14} {message.message_id or '':<38} "
                f"{message.user_id or '':<8} {len(message.body):>8}"
            )
        found = [
            name for name, marker in phi_markers(source).items() if any(marker in b for b in bodies)
        ]
        say(
            f"  searched {len(bodies)} messages for {', '.join(phi_markers(source))}: "
            + ("none found" if not found else f"FOUND {found}")
        )
        if found:
            raise SystemExit("demo failed: identifying data visible on the broker")
        await tap.delete(if_unused=False, if_empty=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temporary)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicombridge-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "CT_small.dcm"
    shutil.copyfile(str(get_testdata_file("CT_small.dcm")), source)

    say(f"starting a RabbitMQ node on loopback in {workdir / 'broker'} ...")
    broker = BrokerNode.start(workdir / "broker")
    try:
        say(
            f"  node {broker.node}: AMQP 127.0.0.1:{broker.amqp_port}, "
            f"management :{broker.mgmt_port}"
        )
        federation = create_federation(
            workdir / "federation", broker=broker, site_ids=["hosp-a", "hosp-b"], vhost="demo"
        )
        say(
            "federation 'demo': operator key made, sites hosp-a and hosp-b initialised, "
            "directory signed (version 1), broker provisioned:"
        )
        with broker.management() as client:
            for queue in client.list_queues("demo"):
                args_ = queue.get("arguments", {})
                say(
                    f"  queue {queue['name']:<28} {args_.get('x-queue-type', 'classic'):<8} "
                    f"max {args_.get('x-max-length-bytes', '-')} bytes, "
                    f"delivery limit {args_.get('x-delivery-limit', '-')}"
                )
        say()
        asyncio.run(relay(federation, broker, source))
    finally:
        broker.stop()
        say()
        say(f"broker stopped; files kept in {workdir}")


if __name__ == "__main__":
    main()
