"""[broker] URL policy and TLS settings: plain amqp:// only to loopback unless allowed,
TLS files checked at load, the client TLS context strict."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from dicombridge.config import SiteConfig, is_loopback, load
from dicombridge.errors import BrokerTlsError, ConfigError
from dicombridge.identity import init_site
from dicombridge.transport import BrokerTls
from tests.tlskit import TestCa


def site(tmp_path: Path, url: str, broker_lines: str = "") -> Path:
    """An initialised site whose [broker] has ``url`` and ``broker_lines`` added."""
    path = init_site(tmp_path / "s", site_id="hosp-a", broker_url=url)
    (tmp_path / "s" / "secrets" / "broker-password").write_text("pw\n")
    if broker_lines:
        text = path.read_text().replace("[broker]\n", f"[broker]\n{broker_lines}\n", 1)
        path.write_text(text)
    return path


def test_plain_amqp_to_a_remote_host_is_refused_with_field_and_fix(tmp_path: Path) -> None:
    """amqp:// to a host that is not loopback fails at load, naming broker.url and both
    fixes (amqps, or allow_plain_remote)."""
    path = site(tmp_path, "amqp://hosp-a@broker.example.org:5672/fed")
    with pytest.raises(ConfigError, match="not loopback") as caught:
        load(path)
    assert caught.value.path == str(path)
    assert caught.value.field == "broker.url"
    assert "amqps://" in caught.value.fix
    assert "allow_plain_remote = true" in caught.value.fix


def test_plain_other_url_to_a_remote_host_is_refused(tmp_path: Path) -> None:
    """A cluster node reached by plain amqp:// off loopback is refused like url."""
    path = site(
        tmp_path,
        "amqps://hosp-a@n1:5671/fed",
        'other_urls = ["amqp://hosp-a@10.0.0.2:5672/fed"]',
    )
    with pytest.raises(ConfigError, match=r"10\.0\.0\.2") as caught:
        load(path)
    assert caught.value.field == "broker.other_urls"
    assert "allow_plain_remote" in caught.value.fix


def test_allow_plain_remote_lets_plain_amqp_through(tmp_path: Path) -> None:
    """With allow_plain_remote = true a plain URL to another host loads."""
    path = site(
        tmp_path,
        "amqp://hosp-a@rabbitmq:5672/fed",
        'allow_plain_remote = true\nother_urls = ["amqp://hosp-a@rabbitmq-2/fed"]',
    )
    broker = load(path).broker
    assert broker.allow_plain_remote is True
    assert broker.url == "amqp://hosp-a@rabbitmq:5672/fed"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.3.4.5", "localhost", "LOCALHOST", "[::1]"], ids=str
)
def test_plain_amqp_to_loopback_is_allowed(tmp_path: Path, host: str) -> None:
    """Plain amqp:// to a loopback address or localhost loads without any flag."""
    path = site(tmp_path, f"amqp://hosp-a@{host}:5672/fed")
    assert load(path).broker.allow_plain_remote is False


def test_amqps_to_a_remote_host_is_allowed(tmp_path: Path) -> None:
    """amqps:// needs no flag, whatever the host."""
    assert load(site(tmp_path, "amqps://hosp-a@broker.example.org/fed")).broker.url


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost.", True),
        ("10.0.0.1", False),
        ("localhost.example.org", False),
        ("128.0.0.1", False),
        ("", False),
    ],
    ids=str,
)
def test_is_loopback(host: str, loopback: bool) -> None:
    """Only localhost and loopback addresses count as loopback."""
    assert is_loopback(host) is loopback


def test_tls_files_are_resolved_and_must_exist(tmp_path: Path) -> None:
    """Relative ca_file/cert_file/key_file are taken against the config's directory; a
    missing one is refused naming its field."""
    ca = TestCa.create(tmp_path / "s" / "secrets", "ca")
    client = ca.client("hosp-a")
    lines = (
        'ca_file = "secrets/ca.pem"\n'
        f'cert_file = "secrets/{client.cert_file.name}"\n'
        f'key_file = "secrets/{client.key_file.name}"'
    )
    path = site(tmp_path, "amqps://hosp-a@n1/fed", lines)
    broker = load(path).broker
    assert broker.ca_file == ca.ca_file
    assert broker.cert_file == client.cert_file
    assert broker.key_file == client.key_file
    path.write_text(path.read_text().replace('"secrets/ca.pem"', '"secrets/nope.pem"'))
    with pytest.raises(ConfigError, match=r"nope\.pem") as caught:
        load(path)
    assert caught.value.field == "broker.ca_file"


def test_key_file_without_cert_file_is_refused(tmp_path: Path) -> None:
    """key_file alone is a mistake: the certificate it belongs to is missing."""
    (tmp_path / "k.pem").write_text("x")
    path = site(tmp_path, "amqps://hosp-a@n1/fed", f'key_file = "{tmp_path / "k.pem"}"')
    with pytest.raises(ConfigError, match="key_file is set without cert_file"):
        load(path)


def test_external_auth_needs_a_client_certificate_and_amqps(tmp_path: Path) -> None:
    """auth = "external" without cert_file, or with an amqp:// URL, is refused."""
    path = site(tmp_path, "amqps://hosp-a@n1/fed", 'auth = "external"')
    with pytest.raises(ConfigError, match="needs cert_file"):
        load(path)
    ca = TestCa.create(tmp_path / "pki")
    client = ca.client("hosp-a")
    lines = f'auth = "external"\ncert_file = "{client.cert_file}"\nkey_file = "{client.key_file}"'
    path = site(tmp_path / "plain", "amqp://hosp-a@127.0.0.1/fed", lines)
    with pytest.raises(ConfigError, match="needs amqps"):
        load(path)


def test_external_auth_urls_carry_no_password(tmp_path: Path) -> None:
    """With x509 login the URLs handed to the transport hold no password, even if a
    password file exists, and BrokerTls asks for the EXTERNAL mechanism."""
    ca = TestCa.create(tmp_path / "pki")
    client = ca.client("hosp-a")
    lines = f'auth = "external"\ncert_file = "{client.cert_file}"\nkey_file = "{client.key_file}"'
    config: SiteConfig = load(site(tmp_path, "amqps://hosp-a@n1:5671/fed", lines))
    assert config.amqp_urls() == ["amqps://hosp-a@n1:5671/fed"]
    tls = BrokerTls.of(config.broker)
    assert tls == BrokerTls(
        ca_file=None, cert_file=client.cert_file, key_file=client.key_file, external_auth=True
    )


def test_client_context_is_strict(tmp_path: Path) -> None:
    """The TLS context verifies the peer, checks its name and refuses below TLS 1.2."""
    ca = TestCa.create(tmp_path)
    client = ca.client("hosp-a")
    context = BrokerTls(
        ca_file=ca.ca_file, cert_file=client.cert_file, key_file=client.key_file
    ).context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    # Only the configured CA is trusted, not the system store as well.
    assert len(context.get_ca_certs()) == 1


def test_unreadable_tls_files_are_a_permanent_error_naming_the_file(tmp_path: Path) -> None:
    """A CA file that is not PEM, or a certificate without its key, raises BrokerTlsError
    naming the file and the settings to check."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(BrokerTlsError, match="ca_file") as caught:
        BrokerTls(ca_file=bad).context()
    assert str(bad) in str(caught.value)
    assert caught.value.transient is False
    ca = TestCa.create(tmp_path / "pki")
    with pytest.raises(BrokerTlsError, match="cert_file and key_file") as caught:
        BrokerTls(ca_file=ca.ca_file, cert_file=ca.ca_file).context()
    assert str(ca.ca_file) in str(caught.value)
