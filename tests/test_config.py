"""gateway.toml: what loads, and how a mistake is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicombridge.config import load
from dicombridge.errors import ConfigError
from dicombridge.identity import init_site


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A freshly initialised site's gateway.toml with a broker password file."""
    path = init_site(tmp_path / "s", site_id="hosp-a", broker_url="amqps://hosp-a@n1:5672/fed")
    (tmp_path / "s" / "secrets" / "broker-password").write_text("pw/with:odd@chars\n")
    return path


def add(config: Path, text: str) -> None:
    config.write_text(config.read_text().replace("[broker]\n", "[broker]\n" + text + "\n", 1))


def test_other_urls_follow_url_with_the_password_filled_in(config: Path) -> None:
    """amqp_urls() lists url then other_urls, each with the percent-encoded password."""
    add(config, 'other_urls = ["amqps://hosp-a@n2:5672/fed", "amqps://hosp-a@n3/fed"]')
    urls = load(config).amqp_urls()
    assert urls == [
        "amqps://hosp-a:pw%2Fwith%3Aodd%40chars@n1:5672/fed",
        "amqps://hosp-a:pw%2Fwith%3Aodd%40chars@n2:5672/fed",
        "amqps://hosp-a:pw%2Fwith%3Aodd%40chars@n3/fed",
    ]


def test_other_url_with_another_user_is_refused(config: Path) -> None:
    """A cluster node URL naming another broker user fails with file, field and fix."""
    add(config, 'other_urls = ["amqps://hosp-b@n2/fed"]')
    with pytest.raises(ConfigError, match="same user") as caught:
        load(config)
    assert caught.value.path == str(config)
    assert caught.value.field == "broker"


def test_password_in_url_is_refused(config: Path) -> None:
    """A password in the broker URL is refused: it belongs in password_file."""
    config.write_text(config.read_text().replace("amqps://hosp-a@n1", "amqps://hosp-a:secret@n1"))
    with pytest.raises(ConfigError, match="password_file") as caught:
        load(config)
    assert caught.value.field == "broker.url"


def test_a_route_an_earlier_one_shadows_is_refused(config: Path) -> None:
    """Two routes with one AE title and no condition: the second is never reached, and
    the file is refused naming both positions and the fix."""
    routes = '\n[[routes]]\nae_title = "HOSP_B"\nsite = "hosp-b"\n' * 2
    config.write_text(config.read_text() + routes)
    with pytest.raises(ConfigError, match="route 2 is never reached: route 1") as caught:
        load(config)
    assert caught.value.field == "routes"
    assert "narrower route first" in str(caught.value)


def test_routes_sharing_an_ae_title_with_conditions_load(config: Path) -> None:
    """A narrower route before a catch-all of the same AE title loads; site and sites
    give the destinations; naming both, or neither, is refused."""
    routes = (
        '\n[[routes]]\nae_title = "HOSP_B"\nsites = ["hosp-b", "hosp-c"]\n'
        'calling_ae_titles = ["CT*"]\nmatch = {Modality = ["CT", "PT"]}\n'
        '\n[[routes]]\nae_title = "HOSP_B"\nsite = "hosp-b"\n'
    )
    config.write_text(config.read_text() + routes)
    loaded = load(config)
    assert [r.destinations for r in loaded.routes] == [("hosp-b", "hosp-c"), ("hosp-b",)]
    assert loaded.routes[0].match == {"Modality": ["CT", "PT"]}
    config.write_text(config.read_text() + '\n[[routes]]\nae_title = "X"\n')
    with pytest.raises(ConfigError, match="name the destination") as caught:
        load(config)
    assert caught.value.field == "routes.2"
