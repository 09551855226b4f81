"""``make demo``: a study crosses the bridge from hospital A's modality to hospital B's PACS.

Starts a two-site sandbox (a RabbitMQ node, an Orthanc PACS and a gateway per site),
makes a small CT study with fresh UIDs, sends it with DCMTK's ``storescu`` to site A's
gateway under the AE title that stands for site B, waits until B's Orthanc holds every
instance, compares what arrived, shows what the broker saw, and stops everything.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicombridge import sandbox
from dicombridge.rabbitmq import BrokerNode

STUDY_SIZE = 12


def say(text: str = "") -> None:
    print(text, flush=True)


def make_study(folder: Path, count: int) -> list[Path]:
    """``count`` CT instances of one new study (pydicom's CT_small with fresh UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = template.copy()
        ds.PatientName = "DEMO^BRIDGE"
        ds.PatientID = "DEMO-0001"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        path = folder / f"ct{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_for_instances(rest_url: str, count: int, *, timeout_s: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=rest_url, timeout=10) as client:
        while time.monotonic() < deadline:
            ids: list[str] = client.get("/instances").json()
            if len(ids) >= count:
                return ids
            time.sleep(0.2)  # Orthanc offers no change feed we could block on here
    raise SystemExit(
        f"demo failed: B's PACS holds fewer than {count} instances after {timeout_s} s"
    )


def show_broker(started: dict[str, Any]) -> None:
    broker = started["broker"]
    node = BrokerNode.from_workdir(Path(broker["workdir"]))
    deadline = time.monotonic() + 20
    with node.management() as client:
        # The management API's counters trail by a statistics interval: wait for them.
        while True:
            queues = client.list_queues(broker["vhost"])
            counted = sum(q.get("message_stats", {}).get("publish", 0) for q in queues)
            if counted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    say("what the broker holds and has carried (management API; bodies are sealed):")
    for queue in sorted(queues, key=lambda q: q["name"]):
        stats = queue.get("message_stats", {})
        say(
            f"  {queue['name']:<30} published {stats.get('publish', 0):>4}  "
            f"delivered {stats.get('deliver_get', 0):>4}  waiting {queue.get('messages', 0)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temporary)")
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="dicombridge-demo-"))).resolve()

    say(f"starting a two-site sandbox in {workdir} (RabbitMQ, 2 Orthanc, 2 gateways) ...")
    started = sandbox.sandbox_up(workdir, sites=2)
    try:
        site_a, site_b = started["sites"]
        gateway = site_a["gateway"]
        route = site_a["routes"]["site-b"]
        say(
            f"  site-a gateway {gateway['ae_title']} on 127.0.0.1:{gateway['port']}; "
            f"AE title {route} there stands for site-b's PACS"
        )
        say(f"  site-b PACS {site_b['pacs']['ae_title']} (Orthanc, {site_b['pacs']['rest_url']})")
        study = make_study(workdir / "study", STUDY_SIZE)
        say()
        say(f"modality at site-a: storescu of {len(study)} CT instances to {route} ...")
        began = time.monotonic()
        subprocess.run(
            [
                "/usr/bin/storescu",
                "-aet",
                "MODALITY",
                "-aec",
                route,
                "127.0.0.1",
                str(gateway["port"]),
                *map(str, study),
            ],
            check=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            timeout=120,
        )
        elapsed = time.monotonic() - began
        say(f"  every C-STORE answered success by site-a's gateway ({elapsed:.2f} s)")
        ids = wait_for_instances(site_b["pacs"]["rest_url"], len(study))
        elapsed = time.monotonic() - began
        say(f"  all {len(ids)} instances are in site-b's PACS {elapsed:.2f} s after the first send")
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in study}
        same = 0
        with httpx.Client(base_url=site_b["pacs"]["rest_url"], timeout=30) as client:
            for orthanc_id in ids:
                data = client.get(f"/instances/{orthanc_id}/file").content
                received = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
                original = pydicom.dcmread(sent[received.SOPInstanceUID])
                same += (
                    original.PixelData == received.PixelData
                    and original.PatientName == received.PatientName
                )
        say(f"  {same}/{len(ids)} instances match what the modality sent (pixel data and patient)")
        say()
        show_broker(started)
        say("  the broker saw only sealed bytes: no name, id or UID (see docs/wire.md)")
        if same != len(study):
            raise SystemExit("demo failed: instances differ")
    finally:
        say()
        for line in sandbox.sandbox_down(workdir):
            say(f"stopped {line}")
        say(f"files kept in {workdir}")


if __name__ == "__main__":
    main()
