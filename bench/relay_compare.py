"""dicombridge against direct DICOM and conventional routers, side by side on loopback.

One run on this machine (broker, both gateways and every Orthanc share its cores):

- (a) direct: DCMTK storescu -> Orthanc B;
- (b1) conventional router, per instance: storescu -> Orthanc A, whose Lua
  ``OnStoredInstance`` C-STOREs each instance on to Orthanc B (``SendToModality``);
- (b2) conventional router, per study: the same, but Lua ``OnStableStudy`` posts the whole
  study as one store job (one association) once it has been stable for ``STABLE_AGE_S``
  (Orthanc's default is 60 s; sites that route this way lower it);
- (c) dicombridge: storescu -> gateway A -> RabbitMQ -> gateway B -> Orthanc B (the
  sandbox: one broker node, two sites, each gateway its own process).

Workloads (``benchkit``): a 200-instance CT series (512 x 512, 16 bit) and one 1 GiB
multi-frame instance. For each: the time until every instance is in Orthanc B (counted
through its REST API), the time until the first is there, MB/s and instances/s, and the
peak RSS (VmHWM) and CPU seconds of each router or gateway process; then the ratios c/a
and c/b (throughput) from the same run. Orthanc B and the routers are emptied before
each run; every run sends the same files. The series runs ``SERIES_RUNS`` times per
setup and the median run is reported; the 1 GiB instance once.

Prints a table and writes bench-results/relay_compare.json. Run with ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    Arrival,
    ProcessCost,
    big_instance,
    ct_series,
    send,
    total_bytes,
)

from dicombridge.orthanc import DicomModality, OrthancServer, OrthancSettings
from dicombridge.sandbox import Sandbox, sandbox_down, sandbox_up

A, B = "site-a", "site-b"
SETUP_NAMES: Final = ("a_direct", "b1_router_per_instance", "b2_router_per_study", "c_dicombridge")
SERIES_RUNS: Final = 3
STABLE_AGE_S: Final = 2

_PER_INSTANCE_LUA: Final = """\
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'pacs-b')
end
"""
# Lua's SendToModality takes instances only: a study goes as one store job (REST).
_PER_STUDY_LUA: Final = """\
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/pacs-b/store',
              '{"Resources": ["' .. studyId .. '"], "Synchronous": false}', false)
end
"""


@dataclass(frozen=True)
class Setup:
    """Where storescu sends, and the processes between it and Orthanc B."""

    name: str
    port: int
    called_ae: str
    processes: dict[str, int]
    clear: tuple[OrthancServer, ...] = ()


def start_router(workdir: Path, name: str, lua: str, pacs_b: OrthancServer) -> OrthancServer:
    script = workdir / "route.lua"
    workdir.mkdir(parents=True, exist_ok=True)
    script.write_text(lua, encoding="utf-8")
    return OrthancServer.start(
        workdir / "orthanc",
        OrthancSettings(
            ae_title=name,
            name=f"bench-{name.lower()}",
            modalities={"pacs-b": DicomModality(pacs_b.ae_title, "127.0.0.1", pacs_b.dicom_port)},
            lua_scripts=[script],
            stable_age_s=STABLE_AGE_S,
        ),
    )


def clear(pacs: OrthancServer) -> None:
    with pacs.client(timeout_s=300) as client:
        client.delete_everything()


def run_once(setup: Setup, paths: list[Path], pacs_b: OrthancServer) -> dict[str, Any]:
    for pacs in (pacs_b, *setup.clear):
        clear(pacs)
    arrival = Arrival(pacs_b, expected=len(paths))
    costs = {name: ProcessCost(pid) for name, pid in setup.processes.items()}
    for cost in costs.values():
        cost.start()
    sent: dict[str, float] = {}
    failure: list[BaseException] = []

    def sender() -> None:
        try:
            send(paths, host="127.0.0.1", port=setup.port, called_ae=setup.called_ae)
            sent["seconds"] = arrival.elapsed()
        except BaseException as exc:  # reported below, in the main thread
            failure.append(exc)

    arrival.start()
    thread = threading.Thread(target=sender, name=f"storescu-{setup.name}")
    thread.start()
    try:
        arrival.wait(timeout_s=1800)
    finally:
        thread.join(timeout=1800)
    if failure:
        raise failure[0]
    for cost in costs.values():
        cost.stop()
    assert arrival.last_s is not None
    assert arrival.first_s is not None
    size = total_bytes(paths)
    return {
        "seconds": arrival.last_s,
        "first_instance_s": arrival.first_s,
        "storescu_s": sent.get("seconds"),
        "mb_per_s": size / 1e6 / arrival.last_s,
        "instances_per_s": len(paths) / arrival.last_s,
        "processes": {
            name: {
                "cpu_s": cost.cpu_s,
                "user_s": cost.user_s,
                "system_s": cost.system_s,
                "cpu_s_per_gb": cost.cpu_s / (size / 1e9),
                "peak_rss_mb": cost.peak_rss_mb,
            }
            for name, cost in costs.items()
        },
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: float(run["seconds"]))
    chosen = dict(ordered[len(ordered) // 2])
    chosen["all_seconds"] = [run["seconds"] for run in runs]
    return chosen


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    speed = {name: float(result["mb_per_s"]) for name, result in results.items()}
    if len(speed) < len(SETUP_NAMES):
        return {}
    best_router = max(speed["b1_router_per_instance"], speed["b2_router_per_study"])
    return {
        "c_over_a": speed["c_dicombridge"] / speed["a_direct"],
        "c_over_b1": speed["c_dicombridge"] / speed["b1_router_per_instance"],
        "c_over_b2": speed["c_dicombridge"] / speed["b2_router_per_study"],
        "c_over_best_b": speed["c_dicombridge"] / best_router,
    }


def print_table(report: dict[str, Any]) -> None:
    for workload, entry in report["workloads"].items():
        print(f"\n{workload} ({entry['instances']} instances, {entry['megabytes']:.0f} MB)")
        print(
            f"  {'setup':<24} {'all in B s':>10} {'first s':>8} {'MB/s':>7} {'inst/s':>7}"
            "   process: CPU s (user), CPU s/GB, peak RSS MB"
        )
        for name, result in entry["results"].items():
            processes = "; ".join(
                f"{proc} {cost['cpu_s']:.1f} ({cost['user_s']:.1f} user), "
                f"{cost['cpu_s_per_gb']:.1f}, {cost['peak_rss_mb']:.0f}"
                for proc, cost in result["processes"].items()
            )
            print(
                f"  {name:<24} {result['seconds']:>10.2f} {result['first_instance_s']:>8.2f} "
                f"{result['mb_per_s']:>7.1f} {result['instances_per_s']:>7.1f}   {processes}"
            )
        r = entry["ratios"]
        if not r:
            continue
        print(
            f"  throughput ratios: c/a {r['c_over_a']:.2f}, c/b1 {r['c_over_b1']:.2f}, "
            f"c/b2 {r['c_over_b2']:.2f}, c/best b {r['c_over_best_b']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--series-only", action="store_true", help="skip the 1 GiB instance (quicker)"
    )
    parser.add_argument(
        "--setups", default="a,b1,b2,c", help="which setups to run (default: a,b1,b2,c)"
    )
    args = parser.parse_args()
    wanted = {name.strip() for name in args.setups.split(",")}
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dicombridge-compare-") as tmp:
        work = Path(tmp)
        workloads = {"ct_series_200": (ct_series(work / "series"), SERIES_RUNS)}
        if not args.series_only:
            workloads["one_1gib_instance"] = (big_instance(work / "big" / "big.dcm"), 1)
        sandbox_up(work / "sandbox", sites=2)
        routers: list[OrthancServer] = []
        try:
            sandbox = Sandbox.load(work / "sandbox")
            a = sandbox.site(A)
            pacs_b = sandbox.pacs(B)
            per_instance = start_router(work / "b1", "ROUTER_B1", _PER_INSTANCE_LUA, pacs_b)
            routers.append(per_instance)
            per_study = start_router(work / "b2", "ROUTER_B2", _PER_STUDY_LUA, pacs_b)
            routers.append(per_study)
            setups = [
                Setup("a_direct", pacs_b.dicom_port, pacs_b.ae_title, {"orthanc_b": pacs_b.pid}),
                Setup(
                    "b1_router_per_instance",
                    per_instance.dicom_port,
                    per_instance.ae_title,
                    {"router": per_instance.pid},
                    (per_instance,),
                ),
                Setup(
                    "b2_router_per_study",
                    per_study.dicom_port,
                    per_study.ae_title,
                    {"router": per_study.pid},
                    (per_study,),
                ),
                Setup(
                    "c_dicombridge",
                    int(a["gateway"]["port"]),
                    str(a["routes"][B]),
                    {
                        "gateway_a": sandbox.gateway_pid(A),
                        "gateway_b": sandbox.gateway_pid(B),
                        "broker": sandbox.broker_nodes()[0].pid,
                        "orthanc_b": pacs_b.pid,
                    },
                ),
            ]
            setups = [setup for setup in setups if setup.name.split("_")[0] in wanted]
            report: dict[str, Any] = {"stable_age_s": STABLE_AGE_S, "workloads": {}}
            for workload, (paths, runs) in workloads.items():
                results = {}
                for setup in setups:
                    samples = [run_once(setup, paths, pacs_b) for _ in range(runs)]
                    results[setup.name] = median_run(samples)
                    print(
                        f"{workload} {setup.name}: "
                        f"{statistics.median(r['seconds'] for r in samples):.2f} s",
                        flush=True,
                    )
                report["workloads"][workload] = {
                    "instances": len(paths),
                    "megabytes": total_bytes(paths) / 1e6,
                    "results": results,
                    "ratios": ratios(results),
                }
        finally:
            for router in routers:
                router.stop()
            sandbox_down(work / "sandbox")
    (out / "relay_compare.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print_table(report)
    print("\nwritten to bench-results/relay_compare.json")


if __name__ == "__main__":
    main()
