"""A site's configuration: pydantic models of ``gateway.toml``, and loading it.

Relative paths in the file are taken relative to the file's own directory, so a site
directory can be moved or mounted anywhere. Errors name the file, the field and the fix.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dicombridge.directory import SiteId
from dicombridge.envelope import DEFAULT_FRAGMENT_SIZE, MAX_FRAGMENT_SIZE
from dicombridge.errors import ConfigError
from dicombridge.rules import check_keyword, check_pattern, never_reached
from dicombridge.topology import check_site_id

CONFIG_FILE: Final = "gateway.toml"

# What to do about a bad value, by field; the default points at the commented example.
_FIXES: Final = {
    "site.id": "use the lowercase slug the federation operator assigned (a-z, 0-9, '-')",
    "broker.url": "write amqps://USER@HOST[:PORT]/VHOST and put the password in password_file "
    "(amqp:// only to loopback, or set allow_plain_remote = true on a private network)",
    "broker.other_urls": "write amqps://USER@HOST[:PORT]/VHOST like url (amqp:// only to "
    "loopback, or set allow_plain_remote = true on a private network)",
    "directory.operator_key": "paste the output of `dicombridge operator key` from the operator",
    "retention": "raise done_max_age_days above outbox_max_age_days and spool_max_age_days",
}
_DEFAULT_FIX: Final = "compare with the commented file that `dicombridge init` writes"
# Checks across entries (SiteConfig._consistent): the field to name and the fix, by problem.
_WHOLE_FILE: Final = {
    "is never reached": (
        "routes",
        "put the narrower route first, give the earlier one a condition the later one "
        "lacks, or remove one of them (`dicombridge routes list` shows the order)",
    ),
    "a route uses the gateway's own ae_title": (
        "routes.ae_title",
        "choose another AE title: [gateway] ae_title is the gateway's own (C-ECHO only)",
    ),
    "a route leads to this site itself": (
        "routes.site",
        "route to other sites only; this site's nodes are reached directly",
    ),
    "two local_nodes have the same name": (
        "local_nodes.name",
        "give each local node its own name",
    ),
    "monitoring.ready_nodes names a node": (
        "monitoring.ready_nodes",
        "name nodes of [[local_nodes]] (`dicombridge nodes list`), or remove the key",
    ),
    "two remote_access entries name the same site": (
        "remote_access.site",
        "merge the two entries into one",
    ),
}


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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` (RFC 6761) and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_plain(url: str, *, allowed: bool) -> None:
    """Refuse ``amqp://`` (no TLS) to a host that is not loopback unless ``allowed``."""
    parts = urlsplit(url)
    if parts.scheme == "amqp" and not allowed and not is_loopback(parts.hostname or ""):
        raise ValueError(
            f"plain amqp:// to {parts.hostname}, which is not loopback, is refused "
            "(the password and all traffic would cross the network unencrypted)"
        )


class BrokerSection(_Section):
    """The federation's RabbitMQ tenant. The password never goes in this file.

    ``amqps`` URLs verify the broker's certificate against ``ca_file`` (default: the
    system's CA store) and its name against the URL's host. ``cert_file``/``key_file``
    present a client certificate; ``auth = "external"`` logs in with it (RabbitMQ's x509
    authentication, EXTERNAL mechanism) instead of a password. Plain ``amqp`` is refused
    to a host that is not loopback unless ``allow_plain_remote`` (a private network).
    """

    # Declared before the URLs: their validators read it.
    allow_plain_remote: bool = False
    url: str
    # Other nodes of the same cluster (same user and vhost): the gateway fails over to them.
    other_urls: list[str] = Field(default_factory=list)
    password_file: Path | None = None
    heartbeat_s: int = Field(default=30, ge=0, le=600)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    auth: Literal["plain", "external"] = "plain"

    @field_validator("url")
    @classmethod
    def _plain_url(cls, url: str, info: ValidationInfo) -> str:
        _check_plain(url, allowed=info.data.get("allow_plain_remote") is True)
        return url

    @field_validator("other_urls")
    @classmethod
    def _plain_other_urls(cls, urls: list[str], info: ValidationInfo) -> list[str]:
        for url in urls:
            _check_plain(url, allowed=info.data.get("allow_plain_remote") is True)
        return urls

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a file")
        return path

    @model_validator(mode="after")
    def _tls(self) -> BrokerSection:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file")
        if self.auth == "external":
            if self.cert_file is None:
                raise ValueError('auth = "external" needs cert_file (and key_file)')
            if any(urlsplit(u).scheme != "amqps" for u in (self.url, *self.other_urls)):
                raise ValueError('auth = "external" needs amqps:// URLs')
        return self

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

    @model_validator(mode="after")
    def _same_user(self) -> BrokerSection:
        for other in self.other_urls:
            self._url(other)
            if unquote(urlsplit(other).username or "") != self.user:
                raise ValueError("other_urls must name the same user as url")
        return self

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


def check_ae_title(value: str) -> str:
    """An AE title as PS3.5 allows it: 1-16 characters of the default repertoire, no
    backslash or control character, not only spaces; leading/trailing spaces dropped."""
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if any(c == "\\" or not 0x20 <= ord(c) < 0x7F for c in title):
        raise ValueError("an AE title uses printable ASCII without backslash")
    return title


AETitle = Annotated[str, AfterValidator(check_ae_title)]
# PS3.15 B.9 (BCP 195) and B.10 (Non-downgrading BCP 195); see dicombridge.dicom_tls.
DicomTlsProfile = Literal["bcp195", "bcp195-non-downgrading"]


class GatewaySection(_Section):
    """The gateway's DICOM side toward the hospital (PS3.8 association parameters)."""

    ae_title: AETitle = "DICOMBRIDGE"
    host: str = "0.0.0.0"  # noqa: S104 - the hospital's devices must reach it
    port: int = Field(default=11112, ge=1, le=65535)
    maximum_associations: int = Field(default=16, ge=1, le=512)
    # Advertised and enforced on read; PS3.8 allows up to 2^32-1, we bound it.
    maximum_pdu_bytes: int = Field(default=1024 * 1024, ge=16 * 1024, le=4 * 1024 * 1024)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # On SIGTERM: how long open associations and the C-STORE under way may take to finish.
    shutdown_grace_s: float = Field(default=20.0, ge=0, le=600)
    # How often the running gateway looks for an edited routing table (routes, local
    # nodes, remote access) in this file, and applies it without a restart.
    reload_check_s: float = Field(default=2.0, ge=0.1, le=300)
    # DICOM TLS (PS3.15 B.9/B.10, see dicombridge.dicom_tls): set tls_cert_file and
    # tls_key_file and the port serves TLS only (by convention 2762). Client certificates
    # are verified against tls_ca_file; required unless tls_require_client_cert = false.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_require_client_cert: bool = True
    tls_profile: DicomTlsProfile = "bcp195-non-downgrading"

    @model_validator(mode="after")
    def _tls_complete(self) -> GatewaySection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("DICOM TLS needs both tls_cert_file and tls_key_file")
        if self.tls and self.tls_require_client_cert and self.tls_ca_file is None:
            raise ValueError(
                "tls_require_client_cert needs tls_ca_file, the CA that signs the "
                "hospital's client certificates (or set tls_require_client_cert = false)"
            )
        return self

    @property
    def tls(self) -> bool:
        """True when the SCP serves DICOM over TLS (only)."""
        return self.tls_cert_file is not None


def check_ae_pattern(value: str) -> str:
    """A calling AE title, or a pattern of them with DICOM's ``*`` and ``?`` wildcards."""
    return check_ae_title(value)


def check_network(value: object) -> object:
    """A network in CIDR notation, with the host bits zero (10.1.0.0/16, fd00::/8)."""
    if not isinstance(value, str):
        return value
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is no network: write it as 10.1.0.0/16") from exc
    try:
        ipaddress.ip_network(value)
    except ValueError as exc:
        network = ipaddress.ip_network(value, strict=False)
        raise ValueError(f"{value} has host bits set: write the network, {network}") from exc
    return value


AEPattern = Annotated[str, AfterValidator(check_ae_pattern)]
SourceNetwork = Annotated[IPvAnyNetwork, BeforeValidator(check_network)]
Keyword = Annotated[str, AfterValidator(check_keyword)]
Pattern = Annotated[str, AfterValidator(check_pattern)]


class RouteEntry(_Section):
    """A called AE title on this gateway that reaches a node at one or more remote sites.

    Routes with the same ``ae_title`` are rules taken in file order; ``calling_ae_titles``
    and ``match`` are their conditions (see ``dicombridge.rules``).
    """

    ae_title: AETitle
    # One site, or several (fan-out: each gets every instance the route takes).
    site: SiteId | None = None
    sites: list[SiteId] = Field(default_factory=list)
    node: str = Field(default="PACS", min_length=1, max_length=64)
    # Conditions: the modality's AE title, and data set attributes by keyword.
    calling_ae_titles: list[AEPattern] = Field(default_factory=list)
    source_networks: list[SourceNetwork] = Field(default_factory=list)
    match: dict[Keyword, Pattern | list[Pattern]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_way_to_name_sites(self) -> RouteEntry:
        if (self.site is None) == (not self.sites):
            raise ValueError('name the destination as site = "..." or sites = ["...", ...]')
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("a site is named twice in sites")
        for keyword, wanted in self.match.items():
            if isinstance(wanted, list) and not wanted:
                raise ValueError(f"match.{keyword} lists no pattern")
        return self

    @property
    def destinations(self) -> tuple[str, ...]:
        """The sites this route sends to, in the order written."""
        return (self.site,) if self.site is not None else tuple(self.sites)

    @property
    def conditions(self) -> bool:
        return bool(self.calling_ae_titles or self.source_networks or self.match)


class LocalNode(_Section):
    """A DICOM node in this hospital that the gateway may send to (the PACS)."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    # When another site asks for a C-GET, retrieve from this node with a C-GET proposing
    # the requester's accepted transfer syntaxes (the node may transcode). False: a
    # C-MOVE to the gateway instead (for a node whose C-GET SCP is off).
    c_get: bool = True
    # DICOM TLS toward the node (PS3.15 B.9/B.10; its TLS port is by convention 2762).
    # The node's certificate is verified against tls_ca_file (default: the system's CA
    # store) and must name tls_server_name (default: host); tls_cert_file/tls_key_file
    # are the gateway's client certificate, for a node that asks for one.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_server_name: str | None = Field(default=None, min_length=1, max_length=253)
    tls_profile: DicomTlsProfile = "bcp195-non-downgrading"

    @model_validator(mode="after")
    def _tls_complete(self) -> LocalNode:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("a client certificate needs both tls_cert_file and tls_key_file")
        if not self.tls and (
            self.tls_ca_file or self.tls_cert_file or self.tls_server_name is not None
        ):
            raise ValueError("tls_* keys are set but tls is not true")
        return self


class OutboxSection(_Section):
    """Received instances wait here, sealed, until the recipient's stored receipt."""

    max_bytes: int = Field(default=10 * 1024**3, ge=1024 * 1024)
    max_count: int = Field(default=100_000, ge=1)
    # A published transfer with no stored receipt after this long is published again
    # (the same sealed bytes; the recipient drops what it has and repeats its receipt).
    resend_after_s: float = Field(default=900.0, gt=0)


class DeliverySection(_Section):
    """Delivery of received instances to the local PACS."""

    # C-STOREs to a local node under way at once, each on its own association.
    associations: int = Field(default=2, ge=1, le=16)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)
    # Transient failures (PACS down) are retried this long before quarantine.
    give_up_after_s: float = Field(default=24 * 3600.0, gt=0)


class RetentionSection(_Section):
    """How long outbox, spool, quarantine, incoming and done markers may keep things.

    Outbox, spool, incoming and quarantine hold PHI (sealed or plaintext); done markers
    hold only transfer ids and receipts. Ages are in days. Spool (incomplete transfers:
    the sender still holds them and re-sends), quarantine and done markers past their
    age are purged. The outbox is *not* purged unless ``purge_outbox`` is set: an entry
    there is an instance the recipient has not confirmed stored, and deleting it is data
    loss; past its age it raises an alarm. ``incoming/`` (verified, waiting for the local
    PACS) is never purged (delivery quarantines it after ``give_up_after_s``); only an
    alarm. An area warns when its oldest item reaches ``warn_at_fraction`` of its age, or
    its size that fraction of its byte limit (the outbox's is ``[outbox] max_bytes``).
    """

    check_interval_s: float = Field(default=3600.0, ge=10, le=86400)
    warn_at_fraction: float = Field(default=0.8, gt=0, lt=1)
    outbox_max_age_days: float = Field(default=14.0, ge=1)
    purge_outbox: bool = False
    spool_max_age_days: float = Field(default=7.0, ge=1)
    quarantine_max_age_days: float = Field(default=30.0, ge=1)
    incoming_max_age_days: float = Field(default=2.0, ge=1)
    # Done markers drop replays and re-sends: keep them longer than anything can wait.
    done_max_age_days: float = Field(default=90.0, ge=7)
    # Sizes that raise the alarm (nothing is deleted for its size); unset: no size alarm.
    spool_max_bytes: int | None = Field(default=None, ge=1)
    quarantine_max_bytes: int | None = Field(default=None, ge=1)
    incoming_max_bytes: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _done_outlives_the_rest(self) -> RetentionSection:
        longest = max(self.outbox_max_age_days, self.spool_max_age_days)
        if self.done_max_age_days <= longest:
            raise ValueError(
                f"done_max_age_days ({self.done_max_age_days:g}) must be longer than "
                f"outbox_max_age_days and spool_max_age_days ({longest:g}): a transfer "
                "re-sent or redelivered after its done marker is gone reaches the PACS twice"
            )
        return self


QueryLevel = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
RemoteOperation = Literal["echo", "find", "move", "get"]


class QuerySection(_Section):
    """Queries and retrieves this site's nodes send to a route's AE title."""

    # A remote site that sends nothing for this long (no match, no progress) fails the
    # query or retrieve with an Error Comment; the remote side is told to stop.
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # The same for C-MOVE and C-GET, between two instances or responses (a large instance
    # crossing a slow link sends nothing meanwhile).
    retrieve_timeout_s: float = Field(default=600.0, gt=0, le=86400)
    # C-ECHO to a route's AE title succeeds only if the remote gateway and its node
    # answer (false: the gateway answers C-ECHO itself).
    deep_echo: bool = True
    # Control messages (queries, responses, receipts) older than this, or seen before,
    # are not acted on; clocks may differ by clock_skew_s (keep them on NTP).
    control_max_age_s: float = Field(default=3600.0, ge=60, le=7 * 86400)
    clock_skew_s: float = Field(default=300.0, ge=0, le=3600)


def _patient_key_required() -> dict[QueryLevel, list[str]]:
    return {"PATIENT": ["PatientName|PatientID"]}


class RemoteAccessEntry(_Section):
    """What another site may ask of this site's nodes (C-FIND, C-MOVE, C-GET, deep echo).

    The responding site decides: a site without an entry (nor ``site = "*"``) is refused.
    ``required_keys`` maps a level to keys that must hold a value other than empty or
    wildcards only; ``"PatientName|PatientID"`` means one of them.
    """

    site: str = Field(min_length=1, max_length=64)
    operations: list[RemoteOperation] = Field(default=["echo", "find", "move", "get"])
    levels: list[QueryLevel] = Field(default=["PATIENT", "STUDY", "SERIES", "IMAGE"])
    required_keys: dict[QueryLevel, list[str]] = Field(default_factory=_patient_key_required)
    max_matches: int = Field(default=1000, ge=1, le=65535)

    @model_validator(mode="after")
    def _site_or_any(self) -> RemoteAccessEntry:
        if self.site != "*":
            check_site_id(self.site)
        return self


class MonitoringSection(_Section):
    """The gateway's HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``
    and ``/status`` (what ``dicombridge status`` reads). Plain HTTP without PHI; a
    restart applies a change."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9110, ge=1, le=65535)
    # How often the ready nodes are C-ECHOed for /readyz.
    node_check_s: float = Field(default=15.0, gt=0, le=3600)
    # The local nodes that must answer C-ECHO for /readyz: those inbound studies go to.
    # Default: the node named PACS, if there is one. A workstation that is only a C-MOVE
    # destination may be switched off at night; it should not make the gateway unready.
    ready_nodes: list[str] | None = None

    def ready_node_names(self, local_nodes: list[LocalNode]) -> list[str]:
        if self.ready_nodes is not None:
            return list(self.ready_nodes)
        return [node.name for node in local_nodes if node.name == "PACS"]


class AuditSection(_Section):
    """The audit trail (``dicombridge.audit``): a JSON line per instance sent, received,
    stored or failed, query, retrieve and policy refusal. It holds UIDs (PHI-adjacent,
    never names or patient ids): keep it with the outbox and spool, under retention."""

    enabled: bool = True
    # Default: <storage.root>/audit/audit.jsonl; a relative path is taken against the
    # directory of gateway.toml.
    path: Path | None = None
    # The file is rotated to audit.jsonl.1 (.2 ...) before it passes this size.
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=4096)
    # Rotated files kept; older ones are deleted.
    keep: int = Field(default=10, ge=0, le=1000)

    def resolved_path(self, *, config_dir: Path, storage_root: Path) -> Path:
        if self.path is None:
            return storage_root / "audit" / "audit.jsonl"
        return self.path if self.path.is_absolute() else config_dir / self.path


class SiteConfig(_Section):
    """The whole of ``gateway.toml``; paths already resolved against its directory."""

    site: SiteSection
    keys: KeysSection = KeysSection()
    directory: DirectorySection = DirectorySection()
    broker: BrokerSection
    transfer: TransferSection = TransferSection()
    storage: StorageSection = StorageSection()
    gateway: GatewaySection = GatewaySection()
    routes: list[RouteEntry] = Field(default_factory=list)
    local_nodes: list[LocalNode] = Field(default_factory=list)
    outbox: OutboxSection = OutboxSection()
    delivery: DeliverySection = DeliverySection()
    retention: RetentionSection = RetentionSection()
    query: QuerySection = QuerySection()
    remote_access: list[RemoteAccessEntry] = Field(default_factory=list)
    monitoring: MonitoringSection = MonitoringSection()
    audit: AuditSection = AuditSection()
    source: Path = Path()

    @model_validator(mode="after")
    def _consistent(self) -> SiteConfig:
        titles = [r.ae_title for r in self.routes]
        shadowed = never_reached(self.routes)
        if shadowed is not None:
            earlier, later = shadowed
            raise ValueError(
                f"route {later} is never reached: route {earlier} has the same ae_title "
                "and holds whenever it would"
            )
        if self.gateway.ae_title in titles:
            raise ValueError("a route uses the gateway's own ae_title")
        if any(self.site.id in r.destinations for r in self.routes):
            raise ValueError("a route leads to this site itself")
        names = [n.name for n in self.local_nodes]
        if len(names) != len(set(names)):
            raise ValueError("two local_nodes have the same name")
        granted = [entry.site for entry in self.remote_access]
        if len(granted) != len(set(granted)):
            raise ValueError("two remote_access entries name the same site")
        if set(self.monitoring.ready_node_names(self.local_nodes)) - set(names):
            raise ValueError("monitoring.ready_nodes names a node that is not a local node")
        return self

    def local_node(self, name: str) -> LocalNode | None:
        return next((n for n in self.local_nodes if n.name == name), None)

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
        return self._with_password(self.broker.url)

    def amqp_urls(self) -> list[str]:
        """``url`` then ``other_urls`` (other nodes of the cluster), passwords filled in."""
        return [self._with_password(url) for url in (self.broker.url, *self.broker.other_urls)]

    def _with_password(self, url: str) -> str:
        parts = urlsplit(url)
        if self.broker.auth == "external":
            return url  # the client certificate logs in (EXTERNAL): no password
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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(path, "(file)", "does not exist", "run `dicombridge init` first") from exc
    return parse(text, path)


def parse(text: str, path: Path) -> SiteConfig:
    """Validate ``text`` as the content of ``gateway.toml`` at ``path`` (relative paths
    are taken against its directory); ``ConfigError`` names the field and the fix."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc), "fix the TOML syntax at that line") from exc
    base = path.resolve().parent
    for name, keys in (
        ("keys", ("dir",)),
        ("directory", ("path", "state_path")),
        ("broker", ("password_file", "ca_file", "cert_file", "key_file")),
        ("storage", ("root",)),
        ("gateway", ("tls_cert_file", "tls_key_file", "tls_ca_file")),
    ):
        section = raw.get(name)
        if isinstance(section, dict):
            _resolve(base, section, *keys)
    for node in raw.get("local_nodes") or []:
        if isinstance(node, dict):
            _resolve(base, node, "tls_ca_file", "tls_cert_file", "tls_key_file")
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
        problem = str(first["msg"]).removeprefix("Value error, ")
        whole = next((key for key in _WHOLE_FILE if key in problem), None)
        if not field and whole is not None:
            field, fix = _WHOLE_FILE[whole]
            raise ConfigError(path, field, problem, fix) from exc
        fix = _FIXES.get(field, _DEFAULT_FIX)
        raise ConfigError(path, field or "(whole file)", problem, fix) from exc


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
# Other nodes of the same RabbitMQ cluster, tried in turn if this one is unreachable.
# other_urls = ["amqps://USER@HOST2:5671/VHOST", "amqps://USER@HOST3:5671/VHOST"]
# File holding the broker password the operator gave you (mode 0600).
password_file = "secrets/broker-password"
heartbeat_s = 30
connect_timeout_s = 10
# amqps: the broker's certificate must verify against this CA (PEM) and name the URL's
# host; without ca_file, the system's CA store is used.
# ca_file = "secrets/broker-ca.pem"
# A client certificate (PEM), if the broker asks for one; key_file may be left out when
# cert_file holds the key too.
# cert_file = "secrets/broker-client.pem"
# key_file = "secrets/broker-client.key"
# "external": log in with the client certificate (RabbitMQ x509 authentication, the
# certificate's CN is the broker user) instead of password_file.
# auth = "plain"
# Plain amqp:// is refused to any host but loopback; true allows it (private network only:
# the password and all traffic cross it unencrypted).
# allow_plain_remote = false

[transfer]
# Instances are cut into sealed fragments of this size (bytes).
fragment_size_bytes = {DEFAULT_FRAGMENT_SIZE}
# Cap on unconfirmed publishes to the broker, in bytes and in messages.
max_in_flight_bytes = {64 * 1024 * 1024}
max_in_flight_messages = 64

[storage]
# Outbox, spool and quarantine (they hold PHI; keep on an encrypted volume).
root = "var"

[gateway]
# The gateway's own AE title (answers C-ECHO; calling AE toward local nodes).
ae_title = "DICOMBRIDGE"
host = "0.0.0.0"
port = 11112
maximum_associations = 16
# Largest PDU advertised and accepted (16 KiB to 4 MiB); larger PDUs abort the association.
maximum_pdu_bytes = 1048576
acse_timeout_s = 30
dimse_timeout_s = 60
network_timeout_s = 60
# The routing table below (routes, local_nodes, remote_access) is reloaded while the
# gateway runs, within this many seconds of an edit; other sections need a restart.
reload_check_s = 2
# DICOM TLS for the hospital's devices (PS3.15 B.9/B.10; DCMTK: storescu +tls KEY CERT
# +cf CA). With a certificate and key set, this port serves TLS only (plain DICOM to
# it fails): use the DICOM TLS port 2762 by convention. TLS 1.2 or 1.3; the profile
# "bcp195-non-downgrading" (B.10, default) allows only the four BCP 195 AES-GCM suites
# with ECDHE/DHE, "bcp195" (B.9) also TLS_RSA_WITH_AES_128_CBC_SHA for older peers.
# Client certificates are verified against tls_ca_file; set tls_require_client_cert =
# false to accept devices without one (those that offer one are still verified).
# tls_cert_file = "secrets/dicom-tls.crt"   # PEM, RSA, may hold the chain
# tls_key_file = "secrets/dicom-tls.key"    # PEM, unencrypted, mode 0600
# tls_ca_file = "secrets/hospital-ca.pem"   # CA of the devices' client certificates
# tls_require_client_cert = true
# tls_profile = "bcp195-non-downgrading"

# Routes: a called AE title on this gateway that reaches a node at another site.
# [[routes]]
# ae_title = "HOSP_B"
# site = "hosp-b"
# node = "PACS"
#
# Rules and fan-out: routes sharing an ae_title are tried in file order and the first
# whose conditions hold is taken; each site in `sites` gets every instance it takes.
# Conditions: calling_ae_titles, and data set attributes by keyword, with DICOM's * and ?
# wildcards. An instance no route takes is refused (0x0110). See docs/routing.md and
# `dicombridge routes check --explain FILE.dcm`.
# [[routes]]
# ae_title = "RESEARCH"
# sites = ["hosp-b", "hosp-c"]
# node = "PACS"
# calling_ae_titles = ["CT*"]
# match = {{ Modality = ["CT", "PT"], StudyDescription = "*HEAD*" }}

# Local nodes: DICOM nodes here that the gateway sends to (the PACS receiving inbound
# studies is the node named "PACS").
# [[local_nodes]]
# name = "PACS"
# ae_title = "ORTHANC"
# host = "127.0.0.1"
# port = 4242
# DICOM TLS toward the node (its TLS port, by convention 2762): its certificate must
# verify against tls_ca_file (default: the system's CA store) and name tls_server_name
# (default: host); tls_cert_file/tls_key_file: the gateway's client certificate.
# tls = true
# tls_ca_file = "secrets/pacs-ca.pem"
# tls_server_name = "pacs.hospital.example"
# tls_cert_file = "secrets/gateway-client.crt"
# tls_key_file = "secrets/gateway-client.key"
# tls_profile = "bcp195-non-downgrading"

[outbox]
# Beyond either cap the gateway answers C-STORE with 0xA700 (out of resources).
max_bytes = {10 * 1024**3}
max_count = 100000
# Publish again if no stored receipt came back within this many seconds.
resend_after_s = 900

[delivery]
# C-STOREs to a local node under way at once, each on its own association.
associations = 2
retry_initial_s = 1
retry_max_s = 60
give_up_after_s = 86400

[retention]
# Outbox, spool, incoming and quarantine hold PHI. Ages in days; the gateway checks every
# check_interval_s, logs a warning when an area's oldest item reaches warn_at_fraction of
# its age (or its size that fraction of its byte limit), and purges what is past its age
# (`dicombridge retention show` and `purge` do the same by hand).
check_interval_s = 3600
warn_at_fraction = 0.8
# Instances not yet confirmed stored by their recipient: past this age, an alarm only.
outbox_max_age_days = 14
# true: also delete outbox entries past their age. They were never confirmed stored:
# deleting them loses those instances for the recipient.
purge_outbox = false
# Incomplete transfers (fragments without the rest); the sender re-sends from its outbox.
spool_max_age_days = 7
# Transfers set aside (see `dicombridge quarantine list`); retry them before this age.
quarantine_max_age_days = 30
# Verified instances waiting for the local PACS: an alarm only, never purged.
incoming_max_age_days = 2
# Ids of transfers done (no PHI), kept to drop replays: longer than any queue wait.
done_max_age_days = 90
# Optional size alarms in bytes (the outbox uses [outbox] max_bytes):
# spool_max_bytes = 10737418240
# quarantine_max_bytes = 10737418240
# incoming_max_bytes = 10737418240

[query]
# C-FIND, C-MOVE, C-GET sent by nodes here to a route's AE title: a remote site silent
# for this many seconds fails the request with an Error Comment.
timeout_s = 30
# C-MOVE and C-GET: the same, between two instances or responses.
retrieve_timeout_s = 600
# C-ECHO to a route's AE title succeeds only if the remote gateway and its PACS answer.
deep_echo = true
# Control messages (queries, responses, receipts) older than this, from further than
# clock_skew_s in the future, or seen before are not acted on. Keep clocks on NTP.
control_max_age_s = 3600
clock_skew_s = 300

# HTTP endpoints for monitoring: /metrics (Prometheus), /healthz, /readyz (broker
# connected, local nodes answer C-ECHO, directory valid) and /status (read by
# `dicombridge status`). Plain HTTP, no PHI; listen beyond 127.0.0.1 (host = "0.0.0.0")
# only on a trusted network. A restart applies a change.
# [monitoring]
# enabled = true
# host = "127.0.0.1"
# port = 9110
# node_check_s = 15
# ready_nodes = ["PACS"]   # local nodes that must answer C-ECHO (default: PACS if any)

# The audit trail: one JSON line per instance sent, received, stored or failed, query,
# retrieve and policy refusal, with time, sites, AE titles, UIDs and outcome (no patient
# names or ids). UIDs are PHI-adjacent: it lives with the outbox and spool by default.
# [audit]
# enabled = true
# path = "var/audit/audit.jsonl"   # default: <storage.root>/audit/audit.jsonl
# max_bytes = 104857600            # rotated to audit.jsonl.1 ... before passing this
# keep = 10                        # rotated files kept

# What other sites may ask of this site's nodes. This site decides: a site not listed
# (nor "*") is refused with status 0x0124 (not authorised), and so is anything outside
# its entry. required_keys: keys that must hold a value (not empty, not only wildcards)
# at a level; "A|B" means one of them.
# [[remote_access]]
# site = "hosp-a"
# operations = ["echo", "find", "move", "get"]
# levels = ["PATIENT", "STUDY", "SERIES", "IMAGE"]
# required_keys = {{ PATIENT = ["PatientName|PatientID"] }}
# max_matches = 1000
"""
