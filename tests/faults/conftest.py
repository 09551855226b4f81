"""The fault-injection suite's sandboxes and its report (``make faults``; CI runs it).

One two-site sandbox on a single RabbitMQ node serves the cases that break a gateway, the
broker node, the PACS or the network; site A reaches the broker through a TCP proxy the
network case cuts. The cluster case gets its own sandbox on a 3-node cluster. Each case's
figures are printed at the end of the run and written to ``bench-results/faults.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from dicombridge import config as site_config
from dicombridge.errors import SandboxError
from dicombridge.sandbox import Sandbox, sandbox_down, sandbox_up
from tests.faults.proxy import TcpProxy
from tests.faults.rig import SENDER, CaseResult

RESULTS: list[CaseResult] = []
REPORT = Path(__file__).resolve().parents[2] / "bench-results" / "faults.json"


def _up(workdir: Path, *, broker_nodes: int) -> Sandbox:
    try:
        sandbox_up(workdir, sites=2, broker_nodes=broker_nodes, timeout_s=120)
    except SandboxError as exc:
        pytest.fail(f"sandbox did not start: {exc}", pytrace=False)
    return Sandbox.load(workdir)


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="module")
def proxied_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, TcpProxy]]:
    """Two sites on one broker node; site A's broker connection runs through a proxy.

    Putting the proxy in place is an operator's edit: stop A's gateway (SIGTERM: it must
    exit 0), point [broker] url at the proxy, start it again.
    """
    workdir = tmp_path_factory.mktemp("faults-sandbox")
    sandbox = _up(workdir, broker_nodes=1)
    try:
        node = sandbox.broker_nodes()[0]
        with TcpProxy(node.amqp_port) as proxy:
            assert sandbox.stop_gateway(SENDER) == 0, "gateway A did not exit 0 on SIGTERM"
            config = sandbox.config_path(SENDER)
            url = site_config.load(config).broker.url
            proxied = url.replace(f":{node.amqp_port}/", f":{proxy.port}/")
            config.write_text(config.read_text().replace(url, proxied, 1))
            sandbox.start_gateway(SENDER)
            yield sandbox, proxy
    finally:
        sandbox_down(workdir)


@pytest.fixture(scope="module")
def cluster_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("faults-cluster")
    sandbox = _up(workdir, broker_nodes=3)
    try:
        yield sandbox
    finally:
        sandbox_down(workdir)


def record(result: CaseResult) -> None:
    RESULTS.append(result)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps([asdict(r) for r in RESULTS], indent=2) + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("fault-injection suite (200-instance CT study, site A -> site B):")
    header = (
        f"{'case':<34} {'answered':>8} {'done after fault':>16} {'dups dropped':>12} "
        f"{'re-sends':>8} {'retries':>7} {'in doubt':>8} {'PACS stores':>11}"
    )
    write(header)
    for r in RESULTS:
        write(
            f"{r.case:<34} {r.answered:>8} {r.time_to_completion_s:>14.1f} s "
            f"{r.duplicates_dropped:>12} {r.resends:>8} {r.retries:>7} "
            f"{r.in_doubt_found_stored:>8} {r.stores_at_pacs:>11}"
        )
    write(f"(written to {REPORT})")
