"""The container image and the compose federation, checked without a Docker engine.

The Dockerfile and compose.yaml are parsed, and what they would run is run here: the
image's ENTRYPOINT and HEALTHCHECK against a site on loopback (only the config path and
the monitoring port mapped), ``deploy/compose/setup.sh`` against the session's RabbitMQ,
the compose sites' ``gateway.toml`` through ``dicombridge.config`` and their PACS
configurations through Debian's Orthanc.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest
import yaml

from dicombridge import config as site_config
from dicombridge import sandbox
from dicombridge.identity import LocalSite
from dicombridge.management import ManagementClient
from dicombridge.orthanc import ORTHANC_BINARY, OrthancServer, free_port, is_listening
from dicombridge.rabbitmq import BrokerNode
from tests.pacskit import DCMTK_BIN, dcmtk_env, wait_for
from tests.relaykit import TwoSites, delete_users, make_two_sites

TOP: Final = Path(__file__).resolve().parents[1]
DOCKERFILE: Final = TOP / "Dockerfile"
COMPOSE: Final = TOP / "compose.yaml"
DEPLOY: Final = TOP / "deploy" / "compose"
SETUP: Final = DEPLOY / "setup.sh"
BASE_IMAGE: Final = "python:3.11-slim-bookworm"
# Where the image keeps each kind of file (the Dockerfile's VOLUMEs).
CONFIG_VOLUME: Final = "/etc/dicombridge"
KEYS_VOLUME: Final = "/var/lib/dicombridge/keys"
DATA_VOLUME: Final = "/var/lib/dicombridge/data"
CONTAINER_CONFIG: Final = f"{CONFIG_VOLUME}/gateway.toml"
COMPOSE_SITES: Final = ("hosp-a", "hosp-b")
VENV_BIN: Final = Path(sys.executable).parent
# What a service in a container listens on to be reachable from outside it.
ALL_INTERFACES: Final = "0.0.0.0"  # noqa: S104


# --- reading the Dockerfile -------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def read_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions, continuation lines joined and comments dropped, as Docker reads them."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in instructions if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def exec_form(arguments: str) -> list[str]:
    """A JSON array of strings (exec form: no shell between Docker and the process)."""
    argv = json.loads(arguments)
    assert isinstance(argv, list)
    assert all(isinstance(a, str) for a in argv)
    return [str(a) for a in argv]


def entrypoint() -> list[str]:
    return exec_form(only(final_stage(read_dockerfile()), "ENTRYPOINT").arguments)


def healthcheck() -> tuple[list[str], list[str]]:
    """The HEALTHCHECK's options and its CMD (exec form)."""
    arguments = only(final_stage(read_dockerfile()), "HEALTHCHECK").arguments
    found = re.fullmatch(r"(?P<options>(?:--\S+\s+)*)CMD\s+(?P<command>\[.*\])", arguments)
    assert found is not None, f"HEALTHCHECK is not `[--options] CMD [exec form]`: {arguments}"
    return found["options"].split(), exec_form(found["command"])


def image_env() -> dict[str, str]:
    """The final stage's ENV, as ``KEY=VALUE`` pairs."""
    env: dict[str, str] = {}
    for ins in final_stage(read_dockerfile()):
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.arguments):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {pair!r}: write KEY=VALUE"
                env[key] = value
    return env


def volumes() -> list[str]:
    return exec_form(only(final_stage(read_dockerfile()), "VOLUME").arguments)


def exposed_ports() -> set[int]:
    ports = only(final_stage(read_dockerfile()), "EXPOSE").arguments.split()
    return {int(port.removesuffix("/tcp")) for port in ports}


def healthcheck_url() -> str:
    _, command = healthcheck()
    urls = [u for arg in command for u in re.findall(r"https?://[^'\"\s]+", arg)]
    assert len(urls) == 1, f"expected one URL in the HEALTHCHECK, found {urls}"
    return str(urls[0])


# --- reading compose.yaml ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    found = compose()["services"][name]
    assert isinstance(found, dict)
    return found


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Each mount's target -> its source (short and long syntax)."""
    result: dict[str, str] = {}
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        result[target] = source
    return result


def published(svc: dict[str, Any]) -> dict[int, str]:
    """Container port -> what publishes it (``HOST_IP:HOST_PORT``)."""
    result: dict[int, str] = {}
    for entry in svc.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        result[int(container)] = host
    return result


def gateway_services() -> list[str]:
    return [name for name, svc in compose()["services"].items() if "build" in svc]


def compose_config(site: str) -> site_config.SiteConfig:
    return site_config.load(DEPLOY / site / "gateway.toml")


def orthanc_json(site: str) -> dict[str, Any]:
    document = json.loads((DEPLOY / site / "orthanc.json").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def config_keys(path: Path) -> set[str]:
    """``section.key`` for every key set in a TOML file (``routes[].site`` for arrays)."""
    keys: set[str] = set()
    for section, value in tomllib.loads(path.read_text(encoding="utf-8")).items():
        if isinstance(value, dict):
            keys |= {f"{section}.{key}" for key in value}
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            keys |= {f"{section}[].{key}" for entry in value for key in entry}
        else:
            keys.add(section)
    return keys


# --- the Dockerfile ---------------------------------------------------------------------


def test_image_builds_a_wheel_then_installs_it_without_build_tools() -> None:
    """Two stages on the slim Python 3.11 base: the wheel is built in the first and
    installed from wheels alone (no index, no compiler) in the second."""
    instructions = read_dockerfile()
    stages = [ins.arguments for ins in instructions if ins.keyword == "FROM"]
    assert len(stages) == 2
    base = only(instructions, "ARG").arguments
    assert base == f"PYTHON_IMAGE={BASE_IMAGE}"
    assert all(stage.split()[0] == "${PYTHON_IMAGE}" for stage in stages)
    build = instructions[: instructions.index(final_stage(instructions)[0])]
    assert any("pip wheel" in ins.arguments for ins in build if ins.keyword == "RUN")
    runs = " ".join(ins.arguments for ins in final_stage(instructions) if ins.keyword == "RUN")
    assert "--no-index" in runs
    assert "dicombridge" in runs
    for tool in ("gcc", "build-essential", "apt-get install"):
        assert tool not in " ".join(ins.arguments for ins in instructions)


def test_image_runs_the_gateway_as_a_fixed_non_root_user() -> None:
    """USER is a fixed numeric uid:gid other than root, and the entrypoint is the gateway
    on the config volume's gateway.toml, in exec form."""
    user = only(final_stage(read_dockerfile()), "USER").arguments
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) >= 1000
    assert int(gid) >= 1000
    assert entrypoint() == ["dicombridge", "gateway", "run", "--config", CONTAINER_CONFIG]


def test_image_declares_volumes_ports_logs_and_healthcheck() -> None:
    """Volumes for config, keys and data; DICOM and monitoring ports; JSON logs; a
    HEALTHCHECK on /readyz of the exposed monitoring port in the standard library."""
    assert volumes() == [CONFIG_VOLUME, KEYS_VOLUME, DATA_VOLUME]
    assert exposed_ports() == {11112, 9110}
    assert image_env()["DICOMBRIDGE_LOG_FORMAT"] == "json"
    assert image_env()["DICOMBRIDGE_CONFIG"] == CONTAINER_CONFIG
    options, command = healthcheck()
    assert {option.partition("=")[0] for option in options} >= {"--interval", "--timeout"}
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    url = urlsplit(healthcheck_url())
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", 9110, "/readyz")


def test_image_entrypoint_is_the_command_the_sandbox_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sandbox up` starts each gateway with the arguments of the image's entrypoint
    (``python -m dicombridge`` is the ``dicombridge`` command)."""
    started: list[list[str]] = []

    class Started:
        pid = -1

    def record(args: list[str], **_: object) -> Started:
        started.append(list(args))
        return Started()

    monkeypatch.setattr(subprocess, "Popen", record)
    config = tmp_path / "gateway.toml"
    sandbox._start_gateway(config, tmp_path / "gateway.log")
    sandbox._GATEWAYS.pop(-1, None)
    assert len(started) == 1
    assert started[0][:3] == [sys.executable, "-m", "dicombridge"]
    image = entrypoint()
    assert started[0][3:] == [*image[1:-1], str(config)]
    assert image[-1] == CONTAINER_CONFIG


def test_dockerignore_lets_only_the_build_inputs_through() -> None:
    """The build context excludes everything (keys, deploy/compose/run, .env, .venv) but
    what the build stage copies."""
    patterns = [
        line.strip()
        for line in (TOP / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source
        for ins in read_dockerfile()
        if ins.keyword == "COPY" and not ins.arguments.startswith("--from")
        for source in ins.arguments.split()[:-1]
    }
    assert copied == allowed == {"pyproject.toml", "README.md", "src"}


# --- compose.yaml -----------------------------------------------------------------------


def test_compose_has_a_broker_two_gateways_and_two_pacs() -> None:
    """Five services: RabbitMQ with management, gateways hosp-a and hosp-b built from the
    Dockerfile, an Orthanc per gateway."""
    services = compose()["services"]
    assert set(services) == {"rabbitmq", "hosp-a", "hosp-b", "orthanc-a", "orthanc-b"}
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert gateway_services() == list(COMPOSE_SITES)
    for name in ("orthanc-a", "orthanc-b"):
        assert services[name]["image"].split(":")[0] in ("jodogne/orthanc", "orthancteam/orthanc")


@pytest.mark.parametrize("name", COMPOSE_SITES)
def test_compose_gateway_runs_the_image_entrypoint_with_its_volumes(name: str) -> None:
    """A gateway service builds the Dockerfile and runs its entrypoint unchanged (no
    entrypoint or command of its own), mounts every volume the image declares, waits for
    a healthy broker and stops with more grace than the gateway's shutdown takes."""
    svc = service(name)
    assert svc["build"] in (".", {"context": "."})
    assert "entrypoint" not in svc
    assert "command" not in svc
    assert set(mounts(svc)) == set(volumes())
    kinds = {CONFIG_VOLUME: "config", KEYS_VOLUME: "keys", DATA_VOLUME: "data"}
    for target, source in mounts(svc).items():
        assert source == f"./deploy/compose/run/{name}/{kinds[target]}"
    assert svc["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
    grace_s = int(str(svc["stop_grace_period"]).removesuffix("s"))
    assert grace_s > compose_config(name).gateway.shutdown_grace_s
    assert set(published(svc)) == exposed_ports()


def test_compose_broker_is_healthchecked_and_provisionable() -> None:
    """The broker has a health check (gateways wait for it), a stable node name, and its
    management API on the host's loopback for setup.sh."""
    svc = service("rabbitmq")
    assert svc["healthcheck"]["test"][0] == "CMD"
    assert svc["hostname"] == "rabbitmq"
    assert published(svc)[15672] == "127.0.0.1:15672"
    assert mounts(svc)["/etc/rabbitmq/conf.d/90-dicombridge.conf"] == (
        "./deploy/compose/run/rabbitmq.conf"
    )


# --- the compose sites' configuration ---------------------------------------------------


@pytest.mark.parametrize("site", COMPOSE_SITES)
def test_compose_gateway_config_loads_with_container_paths(site: str) -> None:
    """deploy/compose/SITE/gateway.toml is valid (directory.json need not exist for
    load()) and keeps keys, config and data in the image's volumes."""
    cfg = compose_config(site)
    assert cfg.site.id == site
    assert cfg.keys.dir == Path(KEYS_VOLUME)
    assert cfg.broker.password_file == Path(KEYS_VOLUME) / "broker-password"
    assert cfg.directory.path == Path(CONFIG_VOLUME) / "directory.json"
    assert cfg.directory.state_path.is_relative_to(DATA_VOLUME)
    assert cfg.storage.root == Path(DATA_VOLUME)
    assert cfg.directory.operator_key == ""  # setup.sh fills it in


@pytest.mark.parametrize("site", COMPOSE_SITES)
def test_compose_gateway_config_points_at_compose_services(site: str) -> None:
    """The broker URL names the rabbitmq service and the site's own user; the gateway
    listens on the exposed DICOM port; routes lead to the other compose sites, which may
    query this one; the PACS node is the site's Orthanc as its config declares it."""
    cfg = compose_config(site)
    services = compose()["services"]
    url = urlsplit(cfg.broker.url)
    assert (url.hostname, url.port, url.path) == ("rabbitmq", 5672, "/dicombridge")
    assert cfg.broker.user == site
    assert cfg.gateway.host == ALL_INTERFACES
    assert cfg.gateway.port in exposed_ports()
    others = set(COMPOSE_SITES) - {site}
    assert {dest for route in cfg.routes for dest in route.destinations} == others
    assert {entry.site for entry in cfg.remote_access} == others
    pacs = cfg.local_node("PACS")
    assert pacs is not None
    assert pacs.host in services
    assert pacs.host in service(site)["depends_on"]
    orthanc = orthanc_json(site)
    assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    assert mounts(services[pacs.host])["/etc/orthanc/orthanc.json"] == (
        f"./deploy/compose/{site}/orthanc.json"
    )


@pytest.mark.parametrize("site", COMPOSE_SITES)
def test_compose_monitoring_listens_where_the_healthcheck_and_prometheus_look(site: str) -> None:
    """[monitoring] is on, on every interface of the container, on the port the
    HEALTHCHECK asks and the image exposes."""
    monitoring = compose_config(site).monitoring
    assert monitoring.enabled
    assert monitoring.host == ALL_INTERFACES
    assert monitoring.port == urlsplit(healthcheck_url()).port
    assert monitoring.port in exposed_ports()


@pytest.mark.parametrize("site", COMPOSE_SITES)
def test_compose_pacs_declares_its_gateway(site: str) -> None:
    """The site's Orthanc knows its gateway (AE title, compose service, port) as a
    modality, for C-MOVE and C-GET toward it."""
    cfg = compose_config(site)
    modalities = orthanc_json(site)["DicomModalities"]
    assert [cfg.gateway.ae_title, site, cfg.gateway.port] in modalities.values()


@pytest.mark.parametrize("site", COMPOSE_SITES)
def test_compose_gateway_config_has_the_keys_the_sandbox_writes(site: str, tmp_path: Path) -> None:
    """A compose site sets every key a sandbox site's gateway.toml sets (the same
    `dicombridge init` template and sandbox edits), and beyond them only [monitoring]."""
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(
        site_config.render_template(
            site_id=site, broker_url=f"amqp://{site}@127.0.0.1:5672/sandbox", operator_key=""
        ),
        encoding="utf-8",
    )
    pacs = OrthancServer(
        workdir=tmp_path, pid=0, ae_title="PACS", host="127.0.0.1", dicom_port=4242, http_port=0
    )
    others = [s for s in COMPOSE_SITES if s != site]
    sandbox._configure_site(
        config_path,
        gateway_ae_title="GATEWAY",
        gateway_port=11112,
        monitoring_port=9110,
        pacs=pacs,
        other_sites=others,
        other_broker_ports=[],
    )
    sandbox_keys = config_keys(config_path)
    compose_keys = config_keys(DEPLOY / site / "gateway.toml")
    assert sandbox_keys - compose_keys == set()
    # Plain AMQP across the compose network must be allowed; the sandbox stays on loopback.
    extra = compose_keys - sandbox_keys - {"broker.allow_plain_remote"}
    assert {key.split(".")[0] for key in extra} <= {"monitoring"}


# --- the PACS configurations, on Debian's Orthanc ---------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("site", COMPOSE_SITES)
def test_compose_pacs_config_starts_orthanc_answering_as_the_node(
    site: str, tmp_path: Path
) -> None:
    """Orthanc starts with the compose PACS config (storage and ports moved to this
    machine) and answers C-ECHO as the AE title the gateway's PACS node names, and REST
    with the documented demo user."""
    document = orthanc_json(site)
    dicom_port, http_port = free_port(), free_port()
    document |= {
        "StorageDirectory": str(tmp_path / "db"),
        "IndexDirectory": str(tmp_path / "db"),
        "DicomPort": dicom_port,
        "HttpPort": http_port,
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(document), encoding="utf-8")
    with (tmp_path / "orthanc.log").open("wb") as log:
        process = subprocess.Popen(
            [str(ORTHANC_BINARY), str(tmp_path / "orthanc.json")],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
    try:
        wait_for(
            lambda: process.poll() is not None or is_listening(dicom_port),
            timeout_s=30,
            what="Orthanc to listen",
        )
        assert process.poll() is None, (tmp_path / "orthanc.log").read_text(errors="replace")
        pacs = compose_config(site).local_node("PACS")
        assert pacs is not None
        echo = dcmtk_echoscu(pacs.ae_title, dicom_port)
        assert echo.returncode == 0, echo.stderr
        wait_for(lambda: is_listening(http_port), timeout_s=10, what="Orthanc's REST API")
        users = document["RegisteredUsers"]
        with httpx.Client(auth=next(iter(users.items())), timeout=10) as client:
            response = client.get(f"http://127.0.0.1:{http_port}/system")
        assert response.status_code == 200
        assert response.json()["DicomAet"] == pacs.ae_title
    finally:
        process.terminate()
        process.wait(timeout=15)


# --- running what the image runs --------------------------------------------------------


def dcmtk_echoscu(called_ae_title: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK_BIN / "echoscu"), "-aec", called_ae_title, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dcmtk_env(),
        check=False,
    )


def container_env(config: Path) -> dict[str, str]:
    """This environment with the image's ENV (config path mapped) and the venv's
    ``dicombridge`` and ``python`` first on PATH, standing in for the image's."""
    env = {**os.environ, **image_env()}
    env = {key: str(config) if value == CONTAINER_CONFIG else value for key, value in env.items()}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class ImageGateway:
    """The image's ENTRYPOINT, run as-is for a loopback site."""

    process: subprocess.Popen[bytes]
    sites: TwoSites
    monitoring_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def management(rabbitmq_node: BrokerNode) -> Iterator[ManagementClient]:
    """The session node's management API (tests/integration's fixtures are out of reach)."""
    with rabbitmq_node.management() as client:
        yield client


@pytest.fixture
def vhost(management: ManagementClient) -> Iterator[str]:
    """A vhost name of this test's own; deleted afterwards."""
    name = f"t-container-{uuid.uuid4().hex[:8]}"
    yield name
    management.delete_vhost(name)


@pytest.fixture
def image_gateway(
    tmp_path: Path, rabbitmq_node: BrokerNode, management: ManagementClient, vhost: str
) -> Iterator[ImageGateway]:
    """Site A of a loopback federation (its monitoring on a free port), its gateway
    started with exactly the entrypoint's argv, the config path mapped to A's file."""
    sites = make_two_sites(
        tmp_path / "federation", broker=rabbitmq_node, vhost=vhost, routes=[], nodes_b=[]
    )
    monitoring_port = site_config.load(sites.config_a).monitoring.port  # a free one
    argv = [str(sites.config_a) if arg == CONTAINER_CONFIG else arg for arg in entrypoint()]
    assert argv.count(str(sites.config_a)) == 1
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            env=container_env(sites.config_a),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    gateway = ImageGateway(process, sites, monitoring_port, log_path)
    try:
        yield gateway
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        delete_users(management, sites)


def wait_answering(gateway: ImageGateway) -> None:
    """Until the gateway answers a DCMTK C-ECHO to its own AE title (fail if it exits)."""
    port = gateway.sites.port_a
    wait_for(
        lambda: (
            gateway.process.poll() is not None
            or (is_listening(port) and dcmtk_echoscu("GATEWAY_A", port).returncode == 0)
        ),
        timeout_s=60,
        interval_s=0.2,
        what="the gateway to answer C-ECHO",
    )
    assert gateway.process.poll() is None, gateway.log()


def readyz(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
    except httpx.TransportError:
        return 0


@pytest.mark.integration
def test_image_entrypoint_runs_as_is_and_stops_cleanly(image_gateway: ImageGateway) -> None:
    """The entrypoint's argv starts a gateway that answers DCMTK's echoscu and /readyz,
    logs JSON lines on stderr, and exits 0 on SIGTERM (Docker's stop signal)."""
    wait_answering(image_gateway)
    wait_for(
        lambda: readyz(image_gateway.monitoring_port) == 200,
        timeout_s=30,
        interval_s=0.2,
        what="/readyz to answer 200",
    )
    assert only(final_stage(read_dockerfile()), "STOPSIGNAL").arguments == "SIGTERM"
    image_gateway.process.send_signal(signal.SIGTERM)
    assert image_gateway.process.wait(timeout=60) == 0, image_gateway.log()
    lines = image_gateway.log().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), line


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's CMD as-is, its URL's port mapped to ``port``, with an HTTP proxy
    in the environment that must not be used (nothing listens there)."""
    _, command = healthcheck()
    url = healthcheck_url()
    mapped = url.replace(f":{urlsplit(url).port}/", f":{port}/", 1)
    argv = [arg.replace(url, mapped) for arg in command]
    env = container_env(Path(CONTAINER_CONFIG))
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env |= {"http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.integration
def test_image_healthcheck_passes_when_ready_and_fails_when_nothing_listens(
    image_gateway: ImageGateway,
) -> None:
    """The HEALTHCHECK command exits 0 against a ready gateway (ignoring HTTP_PROXY) and
    non-zero once nothing listens on the monitoring port."""
    wait_answering(image_gateway)
    wait_for(
        lambda: run_healthcheck(image_gateway.monitoring_port).returncode == 0,
        timeout_s=30,
        interval_s=0.5,
        what="the HEALTHCHECK to pass",
    )
    image_gateway.process.send_signal(signal.SIGTERM)
    assert image_gateway.process.wait(timeout=60) == 0, image_gateway.log()
    assert not is_listening(image_gateway.monitoring_port)
    assert run_healthcheck(image_gateway.monitoring_port).returncode != 0


# --- deploy/compose/setup.sh ------------------------------------------------------------


@pytest.fixture
def compose_broker(management: ManagementClient) -> Iterator[ManagementClient]:
    """The session broker as the compose federation's: vhost `dicombridge` and the users
    hosp-a and hosp-b are deleted afterwards (users are global in RabbitMQ)."""
    yield management
    management.delete_vhost("dicombridge")
    for site in COMPOSE_SITES:
        management.delete_user(site)


def run_setup(run: Path, node: BrokerNode) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DICOMBRIDGE": str(VENV_BIN / "dicombridge"),
        "DICOMBRIDGE_COMPOSE_RUN": str(run),
        "DICOMBRIDGE_MANAGEMENT_URL": node.management_url,
        "DICOMBRIDGE_BROKER_ADMIN_USER": node.admin_user,
        "DICOMBRIDGE_BROKER_ADMIN_PASSWORD": node.admin_password.get_secret_value(),
        "DICOMBRIDGE_OWNER": f"{os.getuid()}:{os.getgid()}",
    }
    result = subprocess.run(
        ["/bin/sh", str(SETUP)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def installed_site(run: Path, site: str, tmp_path: Path) -> LocalSite:
    """The installed site as its container sees it: volume paths mapped to ``run``."""
    text = (run / site / "config" / "gateway.toml").read_text(encoding="utf-8")
    for volume, kind in ((CONFIG_VOLUME, "config"), (KEYS_VOLUME, "keys"), (DATA_VOLUME, "data")):
        text = text.replace(f'"{volume}', f'"{run / site / kind}')
    mapped = tmp_path / f"{site}.toml"
    mapped.write_text(text, encoding="utf-8")
    return LocalSite.load(mapped)


async def broker_login(node: BrokerNode, user: str, password: str) -> None:
    connection = await aio_pika.connect(
        node.amqp_url(user=user, password=password, vhost="dicombridge")
    )
    await connection.close()


@pytest.mark.integration
def test_setup_script_installs_sites_a_gateway_loads(
    tmp_path: Path, rabbitmq_node: BrokerNode, compose_broker: ManagementClient
) -> None:
    """setup.sh makes the operator, both sites' keys, the signed directory and the broker
    users, and installs them so that each site loads as its gateway would load it (keys,
    directory verified against the pinned operator key); the broker accepts each site's
    installed password; a second run keeps keys and edited configs and signs anew."""
    run = tmp_path / "run"
    run_setup(run, rabbitmq_node)
    operator_key = subprocess.run(
        [str(VENV_BIN / "dicombridge"), "operator", "key", "--dir", str(run / "operator")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    versions: dict[str, int] = {}
    key_files: dict[Path, bytes] = {}
    for site in COMPOSE_SITES:
        loaded = installed_site(run, site, tmp_path)
        assert loaded.site_id == site
        assert loaded.config.directory.operator_key == operator_key
        assert {entry.id for entry in loaded.directory.sites} == set(COMPOSE_SITES)
        versions[site] = loaded.directory.version
        keys = run / site / "keys"
        for path in sorted(keys.iterdir()):
            assert path.stat().st_mode & 0o777 == 0o600, path
            assert path.stat().st_uid == os.getuid()
            key_files[path] = path.read_bytes()
        password = loaded.config.broker_password().get_secret_value()
        asyncio.run(broker_login(rabbitmq_node, site, password))
    assert compose_broker.vhost_exists("dicombridge")

    edited = run / "hosp-a" / "config" / "gateway.toml"
    edited.write_text(edited.read_text(encoding="utf-8") + "# edited here\n", encoding="utf-8")
    run_setup(run, rabbitmq_node)
    assert edited.read_text(encoding="utf-8").endswith("# edited here\n")
    for path, content in key_files.items():
        assert path.read_bytes() == content
    for site in COMPOSE_SITES:
        assert installed_site(run, site, tmp_path).directory.version > versions[site]
