"""Local RabbitMQ nodes and clusters on loopback, for the sandbox, tests and benchmarks.

Thin handles over the ``broker/`` scripts, which do the work (and can be run by hand):
``start-node``/``stop-node`` for one node, ``start-cluster``/``stop-cluster`` for a
cluster. A handle is read back from the ``node.json``/``cluster.json`` a script wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from pydantic import SecretStr

from dicombridge.errors import SandboxError
from dicombridge.management import ManagementClient
from dicombridge.orthanc import (
    is_listening,
)

BROKER_SCRIPTS: Final = Path(__file__).resolve().parents[2] / "broker"


@dataclass(frozen=True)
class NodeTls:
    """A TLS-only AMQP listener (https://www.rabbitmq.com/docs/ssl): the node's certificate
    and key, the CA that signs client certificates, and whether a client certificate is
    required (``verify_peer``) and may log in by itself (``external``: x509 login, the
    certificate's CN is the user; implies ``verify_peer``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    verify_peer: bool = False
    external: bool = False

    def arguments(self) -> list[str]:
        """``broker/start-node`` options for this listener."""
        arguments = [
            "--tls-ca",
            str(self.ca_file),
            "--tls-cert",
            str(self.cert_file),
            "--tls-key",
            str(self.key_file),
        ]
        if self.verify_peer:
            arguments.append("--tls-verify-peer")
        if self.external:
            arguments.append("--tls-external")
        return arguments

    @classmethod
    def from_json(cls, info: dict[str, Any] | None) -> NodeTls | None:
        if not info:
            return None
        return cls(
            ca_file=Path(info["ca_file"]),
            cert_file=Path(info["cert_file"]),
            key_file=Path(info["key_file"]),
            verify_peer=bool(info["verify_peer"]),
            external=bool(info["external"]),
        )


@dataclass(frozen=True)
class BrokerNode:
    """A RabbitMQ node started by ``broker/start-node``; read from its ``node.json``."""

    workdir: Path
    node: str
    amqp_port: int
    mgmt_port: int
    dist_port: int
    admin_user: str
    admin_password: SecretStr
    pid: int
    # Set when the AMQP port speaks amqps only.
    tls: NodeTls | None = None

    @classmethod
    def from_workdir(cls, workdir: Path) -> BrokerNode:
        info = json.loads((workdir / "node.json").read_text(encoding="utf-8"))
        return cls(
            workdir=workdir,
            node=info["node"],
            amqp_port=int(info["amqp_port"]),
            mgmt_port=int(info["mgmt_port"]),
            dist_port=int(info["dist_port"]),
            admin_user=info["admin_user"],
            admin_password=SecretStr(info["admin_password"]),
            pid=int(info["pid"]),
            tls=NodeTls.from_json(info.get("tls")),
        )

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        memory_mib: int = 1024,
        timeout_s: int = 90,
        tls: NodeTls | None = None,
    ) -> BrokerNode:
        """Start a node in ``workdir`` and return when its management API answers.

        With ``tls`` its AMQP port speaks amqps only (``amqp_url`` then says ``amqps``).
        """
        run_script(
            "start-node",
            [
                "--workdir",
                str(workdir),
                "--memory-mib",
                str(memory_mib),
                *(tls.arguments() if tls else []),
            ],
            timeout_s=timeout_s,
            where=workdir,
        )
        return cls.from_workdir(workdir)

    def stop(self, *, timeout_s: int = 30) -> None:
        """Stop the node with ``broker/stop-node``; raise ``SandboxError`` if that fails."""
        run_script(
            "stop-node", ["--workdir", str(self.workdir)], timeout_s=timeout_s, where=self.workdir
        )

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.mgmt_port}"

    def management(self) -> ManagementClient:
        return ManagementClient(
            self.management_url, user=self.admin_user, password=self.admin_password
        )

    def amqp_url(self, *, user: str, password: SecretStr | str, vhost: str) -> str:
        """``amqp://user:pass@127.0.0.1:port/vhost`` (``amqps`` for a TLS node), every part
        percent-encoded."""
        raw = password.get_secret_value() if isinstance(password, SecretStr) else password
        secret = quote(raw, safe="")
        path = quote(vhost, safe="")
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{quote(user, safe='')}:{secret}@127.0.0.1:{self.amqp_port}/{path}"

    def admin_amqp_url(self, vhost: str) -> str:
        return self.amqp_url(user=self.admin_user, password=self.admin_password, vhost=vhost)

    def is_running(self) -> bool:
        return _is_beam(self.pid)

    def kill(self) -> None:
        """kill -9 the node and return once its VM is gone: a crash."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _is_beam(self.pid):
            if time.monotonic() > deadline:
                raise SandboxError(f"{self.node} (pid {self.pid}) survived SIGKILL for 30 s")
            time.sleep(0.05)  # another process's exit: no event to wait on

    def restart(
        self,
        *,
        memory_mib: int,
        timeout_s: int = 90,
        cookie_file: Path | None = None,
        join: str | None = None,
    ) -> BrokerNode:
        """Start the node again (after a crash or a stop) with its name, ports, data and
        administrator; ``join`` and ``cookie_file`` for a node of a cluster."""
        stop = subprocess.run(
            [str(BROKER_SCRIPTS / "stop-node"), "--workdir", str(self.workdir)],
            capture_output=True,
            text=True,
            check=False,
            timeout=90,
        )
        if stop.returncode != 0 and (self.workdir / "node.json").exists():
            raise SandboxError(f"broker/stop-node failed in {self.workdir}:\n{stop.stderr}")
        password_file = self.workdir / "admin-password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(self.admin_password.get_secret_value())
        arguments = [
            "--workdir",
            str(self.workdir),
            "--node",
            self.node,
            "--amqp-port",
            str(self.amqp_port),
            "--mgmt-port",
            str(self.mgmt_port),
            "--dist-port",
            str(self.dist_port),
            "--memory-mib",
            str(memory_mib),
            "--admin-password-file",
            str(password_file),
        ]
        if cookie_file is not None:
            arguments += ["--cookie-file", str(cookie_file)]
        if join is not None:
            arguments += ["--join", join]
        if self.tls is not None:
            arguments += self.tls.arguments()
        run_script("start-node", arguments, timeout_s=timeout_s, where=self.workdir)
        return BrokerNode.from_workdir(self.workdir)


# --- a RabbitMQ cluster on loopback (broker/start-cluster) -----------------------------

CLUSTER_FILE: Final = "cluster.json"
RABBITMQ_BIN: Final = Path("/usr/lib/rabbitmq/bin")


@dataclass(frozen=True)
class BrokerCluster:
    """A RabbitMQ cluster started by ``broker/start-cluster``; read from its ``cluster.json``.

    The nodes share one Erlang cookie and one administrator, so each node's ``BrokerNode``
    (from its own ``node.json``) carries the cluster's admin password.
    """

    workdir: Path
    nodes: tuple[BrokerNode, ...]
    memory_mib: int

    @classmethod
    def from_workdir(cls, workdir: Path) -> BrokerCluster:
        info = json.loads((workdir / CLUSTER_FILE).read_text(encoding="utf-8"))
        return cls(
            workdir=workdir,
            nodes=tuple(BrokerNode.from_workdir(Path(n["workdir"])) for n in info["nodes"]),
            memory_mib=int(info["memory_mib"]),
        )

    @classmethod
    def start(
        cls, workdir: Path, *, nodes: int = 3, memory_mib: int = 512, timeout_s: int = 90
    ) -> BrokerCluster:
        """Start ``nodes`` clustered nodes in ``workdir``; return once all of them run.

        ``timeout_s`` bounds each node's start (node 1, then the others in parallel).
        """
        arguments = [
            "--workdir",
            str(workdir),
            "--nodes",
            str(nodes),
            "--memory-mib",
            str(memory_mib),
        ]
        # Nodes 2..N boot while joining: allow two node starts and some slack.
        run_script(
            "start-cluster", arguments, timeout_s=timeout_s, where=workdir, slack_s=timeout_s + 30
        )
        return cls.from_workdir(workdir)

    def stop(self, *, timeout_s: int = 30) -> None:
        """Stop every node (``broker/stop-cluster``); raise ``SandboxError`` if one is left."""
        run_script(
            "stop-cluster",
            ["--workdir", str(self.workdir)],
            timeout_s=timeout_s,
            where=self.workdir,
        )

    @property
    def amqp_ports(self) -> list[int]:
        return [node.amqp_port for node in self.nodes]

    def amqp_urls(self, *, user: str, password: SecretStr | str, vhost: str) -> list[str]:
        """One AMQP URL per node, in node order; a client may use any of them."""
        return [node.amqp_url(user=user, password=password, vhost=vhost) for node in self.nodes]

    def admin_amqp_urls(self, vhost: str) -> list[str]:
        return [node.admin_amqp_url(vhost) for node in self.nodes]

    def running_nodes(self) -> list[BrokerNode]:
        """The nodes whose Erlang VM is alive and whose management port listens."""
        return [node for node in self.nodes if _is_beam(node.pid) and is_listening(node.mgmt_port)]

    def management(self) -> ManagementClient:
        """The cluster's management API through the first running node."""
        return self._first_running().management()

    def _first_running(self) -> BrokerNode:
        running = self.running_nodes()
        if not running:
            raise SandboxError(f"no node of the cluster in {self.workdir} is running")
        return running[0]

    def cluster_status(self, *, timeout_s: int = 30) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` (JSON) as seen by the first running node."""
        node = self._first_running()
        result = subprocess.run(
            [
                "bash",
                "-c",
                '. "$1" && exec "$2" -n "$3" cluster_status --formatter json',
                "cluster_status",
                str(node.workdir / "env.sh"),
                str(RABBITMQ_BIN / "rabbitmqctl"),
                node.node,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise SandboxError(
                f"rabbitmqctl cluster_status on {node.node} failed:\n{result.stderr}"
            )
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def kill_node(self, index: int) -> None:
        """kill -9 node ``index`` (0-based) and return once its VM is gone: a crash."""
        self.nodes[index].kill()

    def restart_node(self, index: int, *, timeout_s: int = 90) -> BrokerCluster:
        """Start node ``index`` again (after a crash or a stop) with its ports and data.

        It rejoins the cluster from its own data. Returns the cluster as it now is.
        """
        peer = self.nodes[1 if index == 0 else 0]
        self.nodes[index].restart(
            memory_mib=self.memory_mib,
            timeout_s=timeout_s,
            cookie_file=self.workdir / "erlang.cookie",
            join=peer.node,
        )
        return BrokerCluster.from_workdir(self.workdir)


def _is_beam(pid: int) -> bool:
    """True if ``pid`` is alive and still an Erlang VM (a pid may be reused after exit)."""
    try:
        return b"beam" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def run_script(
    name: str, arguments: list[str], *, timeout_s: int, where: Path, slack_s: int = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``broker/<name>`` with ``--timeout-s``; its failure or hang is a ``SandboxError``
    carrying the tail of what it printed (node log tails included)."""
    command = [str(BROKER_SCRIPTS / name), *arguments, "--timeout-s", str(timeout_s)]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout_s + slack_s
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"broker/{name} hung for {exc.timeout:.0f} s in {where}") from exc
    if result.returncode != 0:
        raise SandboxError(
            f"broker/{name} failed (exit {result.returncode}) in {where}:\n{result.stderr[-6000:]}"
        )
    return result
