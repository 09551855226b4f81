"""A local federation for trying dicombridge out and for its tests.

A RabbitMQ node (or a cluster of nodes) on loopback (``rabbitmq.py``), a federation
operator, and N sites with keys, configs, a signed directory and broker users,
provisioned exactly as a real federation is: through the same functions the CLI calls;
then one Orthanc and one gateway per site (``sandbox up``).

``Sandbox.load(workdir)`` takes hold of a running sandbox again, to break it on purpose
(the fault-injection suite): kill and restart a gateway, stop and start a PACS, kill
and restart a broker node. Each PACS logs every C-STORE it receives, repeats included
(``OrthancServer.received``), so an instance stored twice shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from pynetdicom import AE

from dicombridge import config as site_config
from dicombridge import identity
from dicombridge.durable import write_durably
from dicombridge.errors import SandboxError
from dicombridge.keys import SiteKeys
from dicombridge.operator import SIGNED, OperatorWorkspace
from dicombridge.orthanc import (
    DicomModality,
    OrthancServer,
    OrthancSettings,
    free_port,
    is_listening,
)
from dicombridge.rabbitmq import BrokerCluster, BrokerNode
from dicombridge.topology import Limits, Permission, build_definitions


@dataclass
class Federation:
    """An operator workspace and the site directories it provisioned."""

    root: Path
    vhost: str
    operator: OperatorWorkspace
    site_configs: dict[str, Path] = field(default_factory=dict)

    def site(self, site_id: str) -> identity.LocalSite:
        return identity.LocalSite.load(self.site_configs[site_id])

    def amqp_url(self, site_id: str) -> str:
        return self.site(site_id).config.amqp_url()


def create_federation(
    root: Path,
    *,
    broker: BrokerNode,
    site_ids: list[str],
    vhost: str,
    limits: Limits | None = None,
) -> Federation:
    """Make an operator and sites under ``root`` and provision them on ``broker``.

    The same steps an operator and hospitals take by hand (README), in one go: each site
    is initialised, exports its public keys, the operator adds and signs them, provisions
    the broker, and each site gets the signed directory and its broker password. The
    broker admin is also given rights on the vhost, to inspect what crossed it.
    """
    operator = OperatorWorkspace.init(root / "operator", federation=vhost)
    operator_key = operator.public_key_b64()
    federation = Federation(root=root, vhost=vhost, operator=operator)
    for site_id in site_ids:
        site_dir = root / "sites" / site_id
        broker_url = f"amqp://{site_id}@127.0.0.1:{broker.amqp_port}/{quote(vhost, safe='')}"
        config_path = identity.init_site(
            site_dir, site_id=site_id, broker_url=broker_url, operator_key=operator_key
        )
        cfg = site_config.load(config_path)
        export = root / "operator" / f"{site_id}.export.json"
        export.write_text(
            identity.export_json(identity.export_public(cfg, SiteKeys.load(cfg.keys.dir)))
        )
        operator.add_site(export)
        federation.site_configs[site_id] = config_path
    operator.sign()
    definitions = build_definitions(vhost=vhost, accounts=operator.site_accounts(), limits=limits)
    with broker.management() as client:
        client.apply(definitions)
        client.set_permission(
            Permission(user=broker.admin_user, vhost=vhost, configure=".*", write=".*", read=".*")
        )
    for site_id, config_path in federation.site_configs.items():
        site_dir = config_path.parent
        shutil.copyfile(operator.root / SIGNED, site_dir / "directory.json")
        password = operator.broker_password(site_id).get_secret_value()
        write_durably(
            site_dir / "secrets" / "broker-password", f"{password}\n".encode(), mode=0o600
        )
    return federation


# --- the whole sandbox: broker, one Orthanc and one gateway per site ------------------

SANDBOX_FILE: Final = "sandbox.json"
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
_LETTERS: Final = "abcdefghijklmnopqrstuvwxyz"


def site_ids_for(count: int) -> list[str]:
    """``site-a``, ``site-b``, ... for ``count`` sites (at most 26)."""
    if not 1 <= count <= len(_LETTERS):
        raise SandboxError(f"--sites must be 1 to {len(_LETTERS)}, not {count}")
    return [f"site-{letter}" for letter in _LETTERS[:count]]


def route_ae_title(site_id: str) -> str:
    """The called AE title that reaches ``site_id`` from every other site: SITE_B."""
    return site_id.upper().replace("-", "_")[:16]


def _configure_site(
    config_path: Path,
    *,
    gateway_ae_title: str,
    gateway_port: int,
    monitoring_port: int,
    pacs: OrthancServer,
    other_sites: list[str],
    other_broker_ports: list[int],
) -> None:
    """Give a freshly initialised site its gateway and monitoring ports, routes, local
    PACS node, the other sites' access to it and, in a cluster, the other nodes' URLs."""
    text = config_path.read_text(encoding="utf-8")
    if other_broker_ports:
        url = site_config.load(config_path).broker.url
        others = [re.sub(r":\d+/", f":{port}/", url, count=1) for port in other_broker_ports]
        text = text.replace(
            f'url = "{url}"\n', f'url = "{url}"\nother_urls = {json.dumps(others)}\n', 1
        )
    text = text.replace('ae_title = "DICOMBRIDGE"', f'ae_title = "{gateway_ae_title}"', 1)
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {gateway_port}", 1)
    blocks = [
        f'\n[[routes]]\nae_title = "{route_ae_title(other)}"\nsite = "{other}"\nnode = "PACS"\n'
        for other in other_sites
    ]
    blocks.append(
        f'\n[[local_nodes]]\nname = "PACS"\nae_title = "{pacs.ae_title}"\n'
        f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n'
    )
    # Every other sandbox site may query and retrieve from this one (default rules).
    blocks += [f'\n[[remote_access]]\nsite = "{other}"\n' for other in other_sites]
    # Several gateways on one host: each its own /metrics, /readyz and /status port.
    blocks.append(f"\n[monitoring]\nport = {monitoring_port}\n")
    config_path.write_text(text + "".join(blocks), encoding="utf-8")
    site_config.load(config_path)  # fail here, not in the gateway, if the edit is wrong


def _echo(host: str, port: int, ae_title: str, *, timeout_s: float = 5.0) -> bool:
    """True if a C-ECHO to ``ae_title`` at host:port succeeds."""
    ae = AE(ae_title="SANDBOX")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


# Gateways this interpreter started, by pid: reaped by ``wait`` when stopped or killed.
_GATEWAYS: Final[dict[int, subprocess.Popen[bytes]]] = {}


def _start_gateway(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicombridge", "gateway", "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `sandbox up`; `sandbox down` stops it
        )
    _GATEWAYS[process.pid] = process
    return process


def wait_gateway(
    process: subprocess.Popen[bytes], *, port: int, ae_title: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SandboxError(f"gateway exited with {process.returncode}:\n{tail}")
        if is_listening(port) and _echo("127.0.0.1", port, ae_title, timeout_s=2.0):
            return
        time.sleep(0.2)  # polling a child process's port: no event to wait on
    raise SandboxError(f"gateway on port {port} not ready after {timeout_s:.0f} s; see {log_path}")


def sandbox_up(
    workdir: Path, *, sites: int, broker_nodes: int = 1, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Start a broker (a cluster of ``broker_nodes``), one Orthanc and one gateway per
    site; write and return sandbox.json.

    Each site reaches every other site's PACS through the route AE title ``SITE_X``; in
    a cluster, gateways know every node's URL. On any failure, whatever was started is
    stopped again.
    """
    if not 1 <= broker_nodes <= 5:
        raise SandboxError(f"--broker-nodes must be 1 to 5, not {broker_nodes}")
    workdir = workdir.resolve()
    if (workdir / SANDBOX_FILE).exists():
        raise SandboxError(
            f"{workdir / SANDBOX_FILE} exists: a sandbox may be running. "
            f"Stop it with `dicombridge sandbox down --workdir {workdir}` or use another dir"
        )
    ids = site_ids_for(sites)
    workdir.mkdir(parents=True, exist_ok=True)
    started: dict[str, Any] = {"workdir": str(workdir), "sites": []}
    cluster: BrokerCluster | None = None
    if broker_nodes == 1:
        broker = BrokerNode.start(workdir / "broker")
        started["broker"] = {"workdir": str(broker.workdir)}
    else:
        cluster = BrokerCluster.start(workdir / "broker", nodes=broker_nodes)
        broker = cluster.nodes[0]
        started["broker"] = {"cluster": str(cluster.workdir)}
    try:
        federation = create_federation(
            workdir / "federation", broker=broker, site_ids=ids, vhost="sandbox"
        )
        for site_id in ids:
            letter = site_id.rsplit("-", 1)[1].upper()
            gateway_port = free_port()
            gateway_ae = f"GATEWAY_{letter}"
            site_dir = federation.site_configs[site_id].parent
            pacs = OrthancServer.start(
                site_dir / "pacs",
                OrthancSettings(
                    ae_title=f"PACS_{letter}",
                    name=f"sandbox-{site_id}",
                    modalities={
                        "gateway": DicomModality(gateway_ae, "127.0.0.1", gateway_port),
                    },
                    count_received=True,
                ),
            )
            entry: dict[str, Any] = {
                "id": site_id,
                "config": str(federation.site_configs[site_id]),
                "pacs": {
                    "ae_title": pacs.ae_title,
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "rest_url": pacs.rest_url,
                    "pid": pacs.pid,
                    "workdir": str(pacs.workdir),
                },
                "routes": {other: route_ae_title(other) for other in ids if other != site_id},
            }
            started["sites"].append(entry)
            monitoring_port = free_port()
            entry["monitoring"] = {"url": f"http://127.0.0.1:{monitoring_port}"}
            _configure_site(
                federation.site_configs[site_id],
                gateway_ae_title=gateway_ae,
                gateway_port=gateway_port,
                monitoring_port=monitoring_port,
                pacs=pacs,
                other_sites=[o for o in ids if o != site_id],
                other_broker_ports=cluster.amqp_ports[1:] if cluster else [],
            )
            log_path = site_dir / "gateway.log"
            process = _start_gateway(federation.site_configs[site_id], log_path)
            entry["gateway"] = {
                "host": "127.0.0.1",
                "port": gateway_port,
                "ae_title": gateway_ae,
                "pid": process.pid,
                "log": str(log_path),
            }
            wait_gateway(
                process,
                port=gateway_port,
                ae_title=gateway_ae,
                log_path=log_path,
                timeout_s=timeout_s,
            )
        started["broker"] = {
            **started["broker"],
            "workdir": str(broker.workdir),
            "node": broker.node,
            "amqp_url": broker.admin_amqp_url("sandbox"),
            "management_url": broker.management_url,
            "vhost": "sandbox",
            "pid": broker.pid,
        }
        write_durably(workdir / SANDBOX_FILE, json.dumps(started, indent=2).encode(), mode=0o600)
    except BaseException:
        _stop_everything(started)
        raise
    return started


def sandbox_down(workdir: Path) -> list[str]:
    """Stop exactly what ``sandbox_up`` started in ``workdir``; return what was stopped."""
    path = workdir / SANDBOX_FILE
    try:
        started = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SandboxError(f"{path}: no sandbox recorded here (nothing to stop)") from exc
    stopped = _stop_everything(started)
    os.replace(path, workdir / "sandbox.stopped.json")
    return stopped


def _stop_everything(started: dict[str, Any]) -> list[str]:
    stopped: list[str] = []
    for site in started.get("sites", []):
        gateway = site.get("gateway")
        if gateway and _terminate(int(gateway["pid"])):
            stopped.append(f"gateway {site['id']} (pid {gateway['pid']})")
    for site in started.get("sites", []):
        pacs = OrthancServer.from_workdir(Path(site["pacs"]["workdir"]))
        if pacs is not None:
            pacs.stop()
            stopped.append(f"orthanc {site['id']} (pid {pacs.pid})")
    cluster_dir = started.get("broker", {}).get("cluster")
    broker_dir = started.get("broker", {}).get("workdir")
    if cluster_dir and (Path(cluster_dir) / "cluster.json").exists():
        cluster = BrokerCluster.from_workdir(Path(cluster_dir))
        cluster.stop()
        stopped.append(f"rabbitmq cluster of {len(cluster.nodes)} nodes")
    elif broker_dir and (Path(broker_dir) / "node.json").exists():
        broker = BrokerNode.from_workdir(Path(broker_dir))
        broker.stop()
        stopped.append(f"rabbitmq {broker.node} (pid {broker.pid})")
    return stopped


def _terminate(pid: int, *, timeout_s: float = 30.0) -> bool:
    """SIGTERM ``pid`` (a gateway drains and exits 0), SIGKILL after ``timeout_s``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if _wait_exit(pid, timeout_s=timeout_s):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_exit(pid, timeout_s=10)
    return True


def _wait_exit(pid: int, *, timeout_s: float) -> bool:
    """Wait until ``pid`` is gone (reaping it if it is our child); True if it went."""
    process = _GATEWAYS.get(pid)
    if process is not None:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        del _GATEWAYS[pid]
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)  # another process's exit: no event to wait on
    return False


# --- breaking a running sandbox on purpose --------------------------------------------


@dataclass
class Sandbox:
    """A running sandbox, from its sandbox.json: what the fault-injection suite breaks."""

    workdir: Path
    state: dict[str, Any]

    @classmethod
    def load(cls, workdir: Path) -> Sandbox:
        path = workdir / SANDBOX_FILE
        try:
            return cls(workdir, json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            raise SandboxError(f"{path}: no sandbox running here") from exc

    def _save(self) -> None:
        write_durably(
            self.workdir / SANDBOX_FILE, json.dumps(self.state, indent=2).encode(), mode=0o600
        )

    def site(self, site_id: str) -> dict[str, Any]:
        for entry in self.state["sites"]:
            if entry["id"] == site_id:
                return dict(entry)
        raise SandboxError(f"no site {site_id!r} in this sandbox")

    def config_path(self, site_id: str) -> Path:
        return Path(self.site(site_id)["config"])

    # gateways

    def gateway_pid(self, site_id: str) -> int:
        return int(self.site(site_id)["gateway"]["pid"])

    def kill_gateway(self, site_id: str) -> None:
        """kill -9 the site's gateway: a crash at whatever moment it is."""
        pid = self.gateway_pid(site_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_exit(pid, timeout_s=30):
            raise SandboxError(f"gateway {site_id} (pid {pid}) survived SIGKILL")

    def stop_gateway(self, site_id: str, *, timeout_s: float = 60.0) -> int | None:
        """SIGTERM the gateway and wait; its exit status if it is our child."""
        pid = self.gateway_pid(site_id)
        process = _GATEWAYS.get(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout_s=timeout_s):
            raise SandboxError(f"gateway {site_id} (pid {pid}) did not stop in {timeout_s} s")
        return process.returncode if process is not None else None

    def start_gateway(self, site_id: str, *, timeout_s: float = 60.0) -> int:
        """Start the site's gateway again (same config and log); return its pid once ready."""
        entry = self.site(site_id)
        gateway = entry["gateway"]
        log_path = Path(gateway["log"])
        process = _start_gateway(Path(entry["config"]), log_path)
        for site in self.state["sites"]:
            if site["id"] == site_id:
                site["gateway"]["pid"] = process.pid
        self._save()
        wait_gateway(
            process,
            port=int(gateway["port"]),
            ae_title=gateway["ae_title"],
            log_path=log_path,
            timeout_s=timeout_s,
        )
        return process.pid

    # PACS

    def pacs(self, site_id: str) -> OrthancServer:
        pacs = OrthancServer.from_workdir(Path(self.site(site_id)["pacs"]["workdir"]))
        if pacs is None:
            raise SandboxError(f"the PACS of {site_id} was not started by this sandbox")
        return pacs

    def stop_pacs(self, site_id: str) -> None:
        self.pacs(site_id).stop()

    def start_pacs(self, site_id: str) -> OrthancServer:
        """Start the site's PACS again on its ports, with its data."""
        entry = self.site(site_id)
        pacs, gateway = entry["pacs"], entry["gateway"]
        server = OrthancServer.start(
            Path(pacs["workdir"]),
            OrthancSettings(
                ae_title=pacs["ae_title"],
                name=f"sandbox-{site_id}",
                dicom_port=int(pacs["port"]),
                http_port=int(pacs["rest_url"].rsplit(":", 1)[1]),
                modalities={
                    "gateway": DicomModality(gateway["ae_title"], "127.0.0.1", gateway["port"]),
                },
                count_received=True,
            ),
        )
        for site in self.state["sites"]:
            if site["id"] == site_id:
                site["pacs"]["pid"] = server.pid
        self._save()
        return server

    # broker

    def broker_nodes(self) -> list[BrokerNode]:
        broker = self.state["broker"]
        if "cluster" in broker:
            return list(BrokerCluster.from_workdir(Path(broker["cluster"])).nodes)
        return [BrokerNode.from_workdir(Path(broker["workdir"]))]

    def kill_broker_node(self, index: int = 0) -> BrokerNode:
        node = self.broker_nodes()[index]
        node.kill()
        return node

    def restart_broker_node(self, index: int = 0) -> BrokerNode:
        broker = self.state["broker"]
        if "cluster" in broker:
            cluster = BrokerCluster.from_workdir(Path(broker["cluster"]))
            return cluster.restart_node(index).nodes[index]
        node = self.broker_nodes()[0].restart(memory_mib=1024)
        broker["pid"] = node.pid
        self._save()
        return node
