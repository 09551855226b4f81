"""A site's configuration: pydantic models of ``gateway.toml``, and loading it.

Relative paths in the file are taken relative to the file's own directory, so a site
directory can be moved or mounted anywhere. Errors name the file, the field and the fix.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from dicombridge.directory import SiteId
from dicombridge.envelope import DEFAULT_FRAGMENT_SIZE, MAX_FRAGMENT_SIZE
from dicombridge.errors import ConfigError

CONFIG_FILE: Final = "gateway.toml"

# What to do about a bad value, by field; the default points at the commented example.
_FIXES: Final = {
    "site.id": "use the lowercase slug the federation operator assigned (a-z, 0-9, '-')",
    "broker.url": "write amqp[s]://USER@HOST[:PORT]/VHOST and put the password in password_file",
    "directory.operator_key": "paste the output of `dicombridge operator key` from the operator",
}
_DEFAULT_FIX: Final = "compare with the commented file that `dicombridge init` writes"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SiteSection(_Section):
    """Who this gateway is."""

    id: SiteId


class KeysSection(_Section):
    """Where the site's private keys live (mode 0700 directory)."""

    dir: Path = Path("keys")


class DirectorySection(_Section):
    """The signed federation directory and the operator key it must be signed with."""

    path: Path = Path("directory.json")
    operator_key: str = ""
    # The newest version accepted so far; older directories are refused (anti-rollback).
    state_path: Path = Path("state/directory-accepted.json")


class BrokerSection(_Section):
    """The federation's RabbitMQ tenant. The password never goes in this file."""

    url: str
    password_file: Path | None = None
    heartbeat_s: int = Field(default=30, ge=0, le=600)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError("scheme must be amqp or amqps")
        if not parts.hostname or not parts.username:
            raise ValueError("must name a user and a host")
        if parts.password:
            raise ValueError("must not contain a password (use password_file)")
        return url

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.url).username or "")


class TransferSection(_Section):
    """How instances are cut and how much may be in flight to the broker."""

    fragment_size_bytes: int = Field(default=DEFAULT_FRAGMENT_SIZE, ge=4096, le=MAX_FRAGMENT_SIZE)
    max_in_flight_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    max_in_flight_messages: int = Field(default=64, ge=1, le=4096)


class StorageSection(_Section):
    """Outbox, spool and quarantine live under ``root``; they hold PHI (sealed or not)."""

    root: Path = Path("var")


class SiteConfig(_Section):
    """The whole of ``gateway.toml``; paths already resolved against its directory."""

    site: SiteSection
    keys: KeysSection = KeysSection()
    directory: DirectorySection = DirectorySection()
    broker: BrokerSection
    transfer: TransferSection = TransferSection()
    storage: StorageSection = StorageSection()
    source: Path = Path()

    def broker_password(self) -> SecretStr:
        """Read the broker password from its file (first line, stripped)."""
        path = self.broker.password_file
        if path is None:
            raise ConfigError(
                self.source,
                "broker.password_file",
                "not set",
                "write the password the operator gave you to a file of mode 0600 and name it",
            )
        try:
            return SecretStr(path.read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise ConfigError(
                self.source, "broker.password_file", f"{path}: {exc.strerror}", "check the path"
            ) from exc

    def amqp_url(self) -> str:
        """The broker URL with the password filled in (never log it)."""
        parts = urlsplit(self.broker.url)
        password = quote(self.broker_password().get_secret_value(), safe="")
        netloc = f"{parts.username}:{password}@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _resolve(base: Path, section: dict[str, object], *keys: str) -> None:
    for key in keys:
        value = section.get(key)
        if isinstance(value, str) and value:
            section[key] = str(base / value) if not Path(value).is_absolute() else value


def load(path: Path) -> SiteConfig:
    """Read and validate ``gateway.toml``."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(path, "(file)", "does not exist", "run `dicombridge init` first") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc), "fix the TOML syntax at that line") from exc
    base = path.resolve().parent
    for name, keys in (
        ("keys", ("dir",)),
        ("directory", ("path", "state_path")),
        ("broker", ("password_file",)),
        ("storage", ("root",)),
    ):
        section = raw.get(name)
        if isinstance(section, dict):
            _resolve(base, section, *keys)
    defaults = {
        "keys": {"dir": str(base / "keys")},
        "directory": {
            "path": str(base / "directory.json"),
            "state_path": str(base / "state" / "directory-accepted.json"),
        },
        "storage": {"root": str(base / "var")},
    }
    for name, values in defaults.items():
        section = raw.setdefault(name, {})
        if isinstance(section, dict):
            for key, value in values.items():
                section.setdefault(key, value)
    raw["source"] = str(path)
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(path, field, first["msg"], _FIXES.get(field, _DEFAULT_FIX)) from exc


def render_template(*, site_id: str, broker_url: str, operator_key: str) -> str:
    """The commented ``gateway.toml`` that ``dicombridge init`` writes."""
    return f"""\
# dicombridge gateway configuration for site {site_id}.
# Relative paths are relative to this file's directory.

[site]
# This institution's id in the federation (a lowercase slug, assigned by the operator).
id = "{site_id}"

[keys]
# Private keys (HPKE ML-KEM-768+X25519 for receiving, Ed25519 for signing), mode 0700.
# Back this directory up offline; anyone holding it can read what is sent to this site.
dir = "keys"

[directory]
# The signed federation directory, as distributed by the federation operator.
path = "directory.json"
# The operator's Ed25519 public key (base64, from `dicombridge operator key`). A directory
# signed by any other key is refused.
operator_key = "{operator_key}"
# Newest directory version accepted; an older directory is refused (rollback protection).
state_path = "state/directory-accepted.json"

[broker]
# The federation's RabbitMQ tenant: amqps://USER@HOST:PORT/VHOST (no password here).
url = "{broker_url}"
# File holding the broker password the operator gave you (mode 0600).
password_file = "secrets/broker-password"
heartbeat_s = 30
connect_timeout_s = 10

[transfer]
# Instances are cut into sealed fragments of this size (bytes).
fragment_size_bytes = {DEFAULT_FRAGMENT_SIZE}
# Cap on unconfirmed publishes to the broker, in bytes and in messages.
max_in_flight_bytes = {64 * 1024 * 1024}
max_in_flight_messages = 64

[storage]
# Outbox, spool and quarantine (they hold PHI; keep on an encrypted volume).
root = "var"
"""
