"""This site's identity: its directory on disk, keys, config, and the public part it exports.

::

    SITEDIR/gateway.toml              commented configuration
    SITEDIR/keys/                     private keys (0700; files 0600)
    SITEDIR/secrets/broker-password   from the operator (0600)
    SITEDIR/directory.json            the signed federation directory
    SITEDIR/state/                    newest directory version accepted, and later more
    SITEDIR/var/                      outbox, spool, quarantine
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicombridge import config as site_config
from dicombridge import directory as fed
from dicombridge.envelope import Sender
from dicombridge.errors import ConfigError, KeyMaterialError
from dicombridge.keys import KEM_KIND, SIGNING_KIND, SiteKeys
from dicombridge.operator import operator_public_key
from dicombridge.topology import check_site_id


def init_site(
    root: Path, *, site_id: str, broker_url: str, operator_key: str = "", force: bool = False
) -> Path:
    """Create a site directory with fresh keys and a commented config; return the config path."""
    check_site_id(site_id)
    config_path = root / site_config.CONFIG_FILE
    if config_path.exists() and not force:
        raise ConfigError(
            config_path,
            "(file)",
            "a site is already initialised here",
            "use another --dir; re-running init would replace the keys other sites know",
        )
    keys_dir = root / "keys"
    if keys_dir.exists() and any(keys_dir.iterdir()) and not force:
        raise ConfigError(keys_dir, "(directory)", "holds keys already", "use another --dir")
    root.mkdir(parents=True, exist_ok=True)
    SiteKeys.generate().save(keys_dir)
    (root / "secrets").mkdir(mode=0o700, exist_ok=True)
    (root / "state").mkdir(exist_ok=True)
    config_path.write_text(
        site_config.render_template(
            site_id=site_id, broker_url=broker_url, operator_key=operator_key
        ),
        encoding="utf-8",
    )
    return config_path


def export_public(config: site_config.SiteConfig, keys: SiteKeys) -> fed.SiteEntry:
    """What the operator needs from a site: id, broker user and public keys, no secret."""
    return fed.SiteEntry(
        id=config.site.id,
        broker_user=config.broker.user,
        kem_keys=[
            fed.public_entry(KEM_KIND, k.public.encoding, k.public.validity) for k in keys.kem_keys
        ],
        signing_keys=[
            fed.public_entry(SIGNING_KIND, k.public.ed25519, k.public.validity)
            for k in keys.signing_keys
        ],
    )


def export_json(entry: fed.SiteEntry) -> str:
    document: dict[str, Any] = entry.model_dump(mode="json")
    return json.dumps(document, indent=2) + "\n"


@dataclass(frozen=True)
class LocalSite:
    """Everything a gateway process needs to know about itself, loaded and checked."""

    config: site_config.SiteConfig
    keys: SiteKeys
    directory: fed.Directory

    @property
    def site_id(self) -> str:
        return self.config.site.id

    @property
    def sender(self) -> Sender:
        return Sender(self.site_id, self.keys)

    @classmethod
    def load(cls, config_path: Path) -> LocalSite:
        config = site_config.load(config_path)
        keys = SiteKeys.load(config.keys.dir)
        directory = load_directory(config)
        entry = directory.site(config.site.id)
        if entry is None:
            raise ConfigError(
                config.directory.path,
                "directory.sites",
                f"this site ({config.site.id!r}) is not in the federation directory",
                "send `dicombridge keys export` to the operator and install the directory "
                "they sign next",
            )
        if entry.broker_user != config.broker.user:
            raise ConfigError(
                config_path,
                "broker.url",
                f"user {config.broker.user!r} differs from {entry.broker_user!r} in the directory",
                "use the broker user the operator provisioned for this site",
            )
        held = {k.key_id for k in keys.kem_keys}
        if not held & {k.key_id for k in entry.kem_keys}:
            raise KeyMaterialError(
                f"{config.keys.dir}: none of this site's KEM keys is in the directory; "
                "other sites would seal to keys we cannot open. Fix: send `dicombridge keys "
                "export` to the operator"
            )
        return cls(config, keys, directory)


def load_directory(config: site_config.SiteConfig, *, record: bool = True) -> fed.Directory:
    """Load the federation directory, verified against the pinned operator key; with
    ``record``, remember its version as the newest accepted (rollback protection)."""
    if not config.directory.operator_key:
        raise ConfigError(
            config.source,
            "directory.operator_key",
            "empty",
            "paste the output of `dicombridge operator key` from the federation operator",
        )
    pinned = operator_public_key(
        config.directory.operator_key, source=config.source, field="directory.operator_key"
    )
    state_path = config.directory.state_path if record else None
    return fed.load(config.directory.path, pinned, state_path=state_path)
