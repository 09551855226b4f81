"""A local federation for trying dicombridge out and for its tests.

A RabbitMQ node on loopback (started by ``broker/start-node`` in a work directory), a
federation operator, and N sites with keys, configs, a signed directory and broker users,
provisioned exactly as a real federation is: through the same functions the CLI calls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote

from pydantic import SecretStr

from dicombridge import config as site_config
from dicombridge import identity
from dicombridge.durable import write_durably
from dicombridge.errors import SandboxError
from dicombridge.keys import SiteKeys
from dicombridge.management import ManagementClient
from dicombridge.operator import SIGNED, OperatorWorkspace
from dicombridge.topology import Limits, Permission, build_definitions

BROKER_SCRIPTS: Final = Path(__file__).resolve().parents[2] / "broker"


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
        )

    @classmethod
    def start(cls, workdir: Path, *, memory_mib: int = 1024, timeout_s: int = 90) -> BrokerNode:
        """Start a node in ``workdir`` and return when its management API answers."""
        script = BROKER_SCRIPTS / "start-node"
        try:
            result = subprocess.run(
                [
                    str(script),
                    "--workdir",
                    str(workdir),
                    "--memory-mib",
                    str(memory_mib),
                    "--timeout-s",
                    str(timeout_s),
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=timeout_s + 30,
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"broker/start-node hung for {exc.timeout}s in {workdir}") from exc
        if result.returncode != 0:
            raise SandboxError(
                f"broker/start-node failed (exit {result.returncode}) in {workdir}:\n"
                f"{result.stderr[-4000:]}"
            )
        return cls.from_workdir(workdir)

    def stop(self, *, timeout_s: int = 30) -> None:
        """Stop the node with ``broker/stop-node``; raise ``SandboxError`` if that fails."""
        script = BROKER_SCRIPTS / "stop-node"
        result = subprocess.run(
            [str(script), "--workdir", str(self.workdir), "--timeout-s", str(timeout_s)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s + 30,
        )
        if result.returncode != 0:
            raise SandboxError(f"broker/stop-node failed in {self.workdir}:\n{result.stderr}")

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.mgmt_port}"

    def management(self) -> ManagementClient:
        return ManagementClient(
            self.management_url, user=self.admin_user, password=self.admin_password
        )

    def amqp_url(self, *, user: str, password: SecretStr | str, vhost: str) -> str:
        """``amqp://user:pass@127.0.0.1:port/vhost``, every part percent-encoded."""
        raw = password.get_secret_value() if isinstance(password, SecretStr) else password
        secret = quote(raw, safe="")
        path = quote(vhost, safe="")
        return f"amqp://{quote(user, safe='')}:{secret}@127.0.0.1:{self.amqp_port}/{path}"

    def admin_amqp_url(self, vhost: str) -> str:
        return self.amqp_url(user=self.admin_user, password=self.admin_password, vhost=vhost)


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
