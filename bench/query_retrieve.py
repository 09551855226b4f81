"""Benchmark of Query/Retrieve across sites, in a sandbox (two sites, one broker node).

- C-FIND, study level: 50 through the relay (findscu -> gateway A -> broker -> gateway B
  -> Orthanc B and back) against 50 sent to Orthanc B directly; median and p95 of each,
  and the added latency;
- the same while a 1 GiB instance is being relayed on the same route (A -> B);
- C-MOVE of a 200-instance CT study (512 x 512, 16 bit) from Orthanc B to a DCMTK storescp
  at site A: time until movescu's final response.

Prints a table and writes bench-results/query_retrieve.json. Run with ``make bench``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pacskit import StoreSCPNode, dcmtk_env
from tests.qrkit import Patient, make_study, query_file, store
from tests.relaykit import big_multiframe

from dicombridge.sandbox import Sandbox, sandbox_down, sandbox_up

RUNS = 50
STUDY_SIZE = 200
BIG_FRAMES = 2048  # 1 GiB of Pixel Data
A, B = "site-a", "site-b"


def findscu(port: int, called: str, calling: str, query: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [
            "/usr/bin/findscu",
            "-S",
            "-aet",
            calling,
            "-aec",
            called,
            "127.0.0.1",
            str(port),
            str(query),
        ],
        capture_output=True,
        env=dcmtk_env(),
        timeout=120,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace"))
    return elapsed


def figures(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[int(len(ordered) * 0.95) - 1] * 1000,
    }


def find_latency(sandbox: Sandbox, query: Path) -> dict[str, Any]:
    a, b = sandbox.site(A), sandbox.site(B)
    relayed = [
        findscu(a["gateway"]["port"], a["routes"][B], "WORKSTATION", query) for _ in range(RUNS)
    ]
    # Orthanc B answers its own gateway's AE title (the sandbox registers it).
    direct = [
        findscu(b["pacs"]["port"], b["pacs"]["ae_title"], b["gateway"]["ae_title"], query)
        for _ in range(RUNS)
    ]
    relay, plain = figures(relayed), figures(direct)
    return {
        "relay": relay,
        "direct": plain,
        "added_median_ms": relay["median_ms"] - plain["median_ms"],
        "added_p95_ms": relay["p95_ms"] - plain["p95_ms"],
    }


def main() -> None:
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dicombridge-qr-bench-") as tmp:
        work = Path(tmp)
        sandbox_up(work / "sandbox", sites=2)
        try:
            sandbox = Sandbox.load(work / "sandbox")
            b = sandbox.site(B)
            patient = Patient("Bench^Patient", "P-BENCH", "ISO_IR 100")
            study = make_study(
                work / "study",
                patient,
                study_date="20240101",
                series=1,
                instances=STUDY_SIZE,
                rows=512,
            )
            store(study, port=b["pacs"]["port"], called_ae=b["pacs"]["ae_title"])
            for number in range(20):  # more studies to match against
                extra = make_study(
                    work / f"other{number}", patient, study_date="20230101", series=1, instances=1
                )
                store(extra, port=b["pacs"]["port"], called_ae=b["pacs"]["ae_title"])
            query = query_file(
                work / "query.dcm",
                "STUDY",
                PatientID="P-BENCH",
                StudyInstanceUID="",
                StudyDate="",
                PatientName="",
            )
            results["c_find_idle"] = find_latency(sandbox, query)

            big = work / "big.dcm"
            big_multiframe(big, frames=BIG_FRAMES)
            a = sandbox.site(A)
            sender = subprocess.Popen(
                [
                    "/usr/bin/storescu",
                    "-aec",
                    a["routes"][B],
                    "127.0.0.1",
                    str(a["gateway"]["port"]),
                    str(big),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dcmtk_env(),
            )
            try:
                results["c_find_during_1gib"] = find_latency(sandbox, query)
                results["c_find_during_1gib"]["big_still_sending"] = sender.poll() is None
            finally:
                sender.wait(timeout=600)

            storescp = StoreSCPNode.start(work / "store-a", ae_title="STORE_A")
            try:
                config = sandbox.config_path(A)
                config.write_text(
                    config.read_text(encoding="utf-8")
                    + f'\n[[local_nodes]]\nname = "WORKSTATION"\nae_title = "STORE_A"\n'
                    f'host = "127.0.0.1"\nport = {storescp.port}\n',
                    encoding="utf-8",
                )
                sandbox.stop_gateway(A)
                sandbox.start_gateway(A)
                a = sandbox.site(A)
                study_uid = (
                    subprocess.run(
                        ["/usr/bin/dcmdump", "+P", "0020,000d", str(study[0])],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    .stdout.split("[")[1]
                    .split("]")[0]
                )
                started = time.perf_counter()
                moved = subprocess.run(
                    [
                        "/usr/bin/movescu",
                        "-S",
                        "-aet",
                        "WORKSTATION",
                        "-aec",
                        a["routes"][B],
                        "-aem",
                        "STORE_A",
                        "-k",
                        "QueryRetrieveLevel=STUDY",
                        "-k",
                        f"StudyInstanceUID={study_uid}",
                        "127.0.0.1",
                        str(a["gateway"]["port"]),
                    ],
                    capture_output=True,
                    text=True,
                    env=dcmtk_env(),
                    timeout=1200,
                    check=False,
                )
                elapsed = time.perf_counter() - started
                arrived = sum(1 for _ in storescp.output.iterdir())
                results["c_move_200"] = {
                    "seconds": elapsed,
                    "instances_arrived": arrived,
                    "instances_per_s": arrived / elapsed,
                    "movescu_exit": moved.returncode,
                }
            finally:
                storescp.stop()
        finally:
            sandbox_down(work / "sandbox")
    (out / "query_retrieve.json").write_text(json.dumps(results, indent=2))
    idle, busy, move = results["c_find_idle"], results["c_find_during_1gib"], results["c_move_200"]
    print(f"Query/Retrieve across sites (sandbox, {os.cpu_count()} cores)")
    print(f"{'':34}{'median ms':>10}{'p95 ms':>10}")
    for label, data in (
        ("C-FIND direct to Orthanc B", idle["direct"]),
        ("C-FIND through the relay", idle["relay"]),
        ("  direct, 1 GiB on the route", busy["direct"]),
        ("  relay, 1 GiB on the route", busy["relay"]),
    ):
        print(f"{label:34}{data['median_ms']:>10.1f}{data['p95_ms']:>10.1f}")
    print(
        f"added latency idle: median {idle['added_median_ms']:.1f} ms, "
        f"p95 {idle['added_p95_ms']:.1f} ms"
    )
    print(
        f"added latency, 1 GiB in flight: median {busy['added_median_ms']:.1f} ms, "
        f"p95 {busy['added_p95_ms']:.1f} ms (big instance still sending at the end: "
        f"{busy['big_still_sending']})"
    )
    print(
        f"C-MOVE of {STUDY_SIZE} instances: {move['seconds']:.1f} s, "
        f"{move['instances_arrived']} arrived ({move['instances_per_s']:.1f}/s)"
    )
    print("(written to bench-results/query_retrieve.json)")


if __name__ == "__main__":
    main()
