"""The dicombridge command as an operator and a hospital use it (no broker needed here)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dicombridge.durable import pad
from dicombridge.fragments import INFO_BYTES, SEALED_MAGIC, STATE_BYTES

CLI = [sys.executable, "-c", "from dicombridge.cli import main; main()"]


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI; by default fail the test unless it exits 0."""
    result = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def operator_dir(tmp_path: Path) -> Path:
    """An operator workspace made with `operator init`."""
    path = tmp_path / "operator"
    run("operator", "init", "--dir", path, "--federation", "test-fed")
    return path


def make_site(tmp_path: Path, operator_dir: Path, site: str) -> Path:
    """`init` a site pinned to the operator's key and hand its export to the operator."""
    key = run("operator", "key", "--dir", operator_dir).stdout.strip()
    site_dir = tmp_path / site
    run(
        "init",
        "--site",
        site,
        "--dir",
        site_dir,
        "--operator-key",
        key,
        "--broker-url",
        f"amqp://{site}@127.0.0.1:5672/test-fed",
    )
    export = tmp_path / f"{site}.json"
    export.write_text(run("keys", "export", "--config", site_dir / "gateway.toml").stdout)
    run("directory", "add-site", export, "--dir", operator_dir)
    return site_dir


def test_init_makes_private_keys_0600_and_a_commented_config(tmp_path: Path) -> None:
    """`init` writes key files of mode 0600 in a 0700 directory and a commented gateway.toml."""
    run("init", "--site", "hosp-a", "--dir", tmp_path / "a")
    keys = tmp_path / "a" / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    files = sorted(keys.iterdir())
    assert [p.name.split("-")[0] for p in files] == ["kem", "sign"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    config = (tmp_path / "a" / "gateway.toml").read_text()
    assert 'id = "hosp-a"' in config
    assert config.count("\n#") >= 5


def test_export_holds_public_keys_only(tmp_path: Path) -> None:
    """`keys export` prints the key ids and public keys, and no private key material."""
    run("init", "--site", "hosp-a", "--dir", tmp_path / "a")
    export = json.loads(run("keys", "export", "--config", tmp_path / "a" / "gateway.toml").stdout)
    assert export["id"] == "hosp-a"
    private_values = [
        value
        for path in (tmp_path / "a" / "keys").iterdir()
        for key, value in json.loads(path.read_text()).items()
        if key in ("mlkem768_seed", "x25519", "ed25519")
    ]
    assert len(private_values) == 3
    text = json.dumps(export)
    assert not any(secret in text for secret in private_values)
    key_files = {p.name for p in (tmp_path / "a" / "keys").iterdir()}
    assert f"kem-{export['kem_keys'][0]['key_id']}.key" in key_files
    assert f"sign-{export['signing_keys'][0]['key_id']}.key" in key_files


def test_directory_round_trip_through_the_cli(tmp_path: Path, operator_dir: Path) -> None:
    """Sites added and signed by the operator are listed by each site's `directory show`."""
    site_a = make_site(tmp_path, operator_dir, "hosp-a")
    make_site(tmp_path, operator_dir, "hosp-b")
    assert (
        "signed version 1 with 2 site(s)" in run("directory", "sign", "--dir", operator_dir).stdout
    )
    (site_a / "directory.json").write_bytes((operator_dir / "directory.json").read_bytes())
    shown = run("directory", "show", "--config", site_a / "gateway.toml").stdout
    assert "version 1" in shown
    assert "hosp-a" in shown
    assert "hosp-b" in shown


def test_version_grows_and_an_older_directory_is_refused(
    tmp_path: Path, operator_dir: Path
) -> None:
    """After version 2 was accepted, installing version 1 again fails naming file, field, fix."""
    site_a = make_site(tmp_path, operator_dir, "hosp-a")
    run("directory", "sign", "--dir", operator_dir)
    version_1 = (operator_dir / "directory.json").read_bytes()
    make_site(tmp_path, operator_dir, "hosp-b")
    assert "signed version 2" in run("directory", "sign", "--dir", operator_dir).stdout
    installed = site_a / "directory.json"
    installed.write_bytes((operator_dir / "directory.json").read_bytes())
    run("directory", "show", "--config", site_a / "gateway.toml")
    installed.write_bytes(version_1)
    result = run("directory", "show", "--config", site_a / "gateway.toml", ok=False)
    assert result.returncode == 2
    assert str(installed) in result.stderr
    assert "directory.version" in result.stderr
    assert "older than version 2" in result.stderr
    assert "Fix:" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_directory_is_refused(tmp_path: Path, operator_dir: Path) -> None:
    """A signed directory edited by hand (a broker user changed) fails its signature check."""
    site_a = make_site(tmp_path, operator_dir, "hosp-a")
    run("directory", "sign", "--dir", operator_dir)
    document = json.loads((operator_dir / "directory.json").read_text())
    document["directory"]["sites"][0]["broker_user"] = "mallory"
    (site_a / "directory.json").write_text(json.dumps(document))
    result = run("directory", "show", "--config", site_a / "gateway.toml", ok=False)
    assert result.returncode == 2
    assert "signature.ed25519" in result.stderr
    assert "does not verify" in result.stderr


def test_remove_site_then_sign(tmp_path: Path, operator_dir: Path) -> None:
    """A removed site is absent from the next signed version."""
    make_site(tmp_path, operator_dir, "hosp-a")
    make_site(tmp_path, operator_dir, "hosp-b")
    run("directory", "sign", "--dir", operator_dir)
    run("directory", "remove-site", "hosp-b", "--dir", operator_dir)
    run("directory", "sign", "--dir", operator_dir)
    signed = json.loads((operator_dir / "directory.json").read_text())["directory"]
    assert signed["version"] == 2
    assert [s["id"] for s in signed["sites"]] == ["hosp-a"]


def test_bad_inputs_name_the_file_field_and_fix(tmp_path: Path, operator_dir: Path) -> None:
    """Malformed export, bad config and a re-init each fail with file, field and fix."""
    bad_export = tmp_path / "bad.json"
    bad_export.write_text(json.dumps({"id": "Hosp A", "broker_user": "x"}))
    result = run("directory", "add-site", bad_export, "--dir", operator_dir, ok=False)
    assert result.returncode == 2
    assert str(bad_export) in result.stderr
    assert "id:" in result.stderr
    assert "Fix:" in result.stderr

    run("init", "--site", "hosp-a", "--dir", tmp_path / "a")
    config = tmp_path / "a" / "gateway.toml"
    config.write_text(
        config.read_text().replace("fragment_size_bytes = ", "fragment_size_bytes = -")
    )
    result = run("keys", "export", "--config", config, ok=False)
    assert str(config) in result.stderr
    assert "transfer.fragment_size_bytes" in result.stderr

    result = run("init", "--site", "hosp-a", "--dir", tmp_path / "a", ok=False)
    assert "already initialised" in result.stderr


def test_provision_dry_run_prints_definitions_without_passwords(
    tmp_path: Path, operator_dir: Path
) -> None:
    """`broker provision --dry-run` prints exchanges, quorum queues and users, but no password."""
    make_site(tmp_path, operator_dir, "hosp-a")
    make_site(tmp_path, operator_dir, "hosp-b")
    run("directory", "sign", "--dir", operator_dir)
    env_free = {k: v for k, v in os.environ.items() if k != "DICOMBRIDGE_BROKER_ADMIN_PASSWORD"}
    result = subprocess.run(
        [*CLI, "broker", "provision", "--dir", str(operator_dir), "--vhost", "v", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        env=env_free,
        timeout=60,
    )
    definitions = json.loads(result.stdout)
    assert {e["name"] for e in definitions["exchanges"]} >= {
        "dicombridge.to.hosp-a",
        "dicombridge.to.hosp-b",
    }
    assert all(q["arguments"]["x-queue-type"] == "quorum" for q in definitions["queues"])
    assert {u["name"] for u in definitions["users"]} == {"hosp-a", "hosp-b"}
    for site in ("hosp-a", "hosp-b"):
        password = (operator_dir / "broker-users" / site).read_text().strip()
        assert password not in result.stdout


def retention_site(tmp_path: Path) -> tuple[Path, Path]:
    """A site whose var/ holds an outbox entry 20 days old, a quarantined transfer 40 days
    old and a fresh done marker, laid out as the gateway writes them."""
    from datetime import UTC, datetime, timedelta

    run("init", "--site", "hosp-a", "--dir", tmp_path / "a")
    var = tmp_path / "a" / "var"
    now = datetime.now(UTC).replace(microsecond=0)  # the CLI counts ages in whole seconds
    info = {
        "transfer_id": "0a" * 16,
        "recipient_site": "hosp-b",
        "fragment_size": 3000,
        "fragment_count": 1,
        "total_length": 2952,
        "manifest_length": 0,
    }
    state = {"created_at": (now - timedelta(days=20)).isoformat(), "attempts": 1}
    (var / "outbox").mkdir(parents=True)
    (var / "outbox" / f"{'0a' * 16}.sealed").write_bytes(
        pad(SEALED_MAGIC + json.dumps(info).encode(), INFO_BYTES)
        + pad(json.dumps(state).encode(), STATE_BYTES)
        + b"\0" * 3000
    )
    held = var / "quarantine" / "hosp-b" / ("0b" * 16)
    held.mkdir(parents=True)
    (held / "instance.dcm").write_bytes(b"\0" * 2000)
    (held / "reason.json").write_text(
        json.dumps({"stage": "delivery", "at": (now - timedelta(days=40)).isoformat()})
    )
    (var / "done" / "hosp-b").mkdir(parents=True)
    (var / "done" / "hosp-b" / ("0c" * 16)).write_text(now.isoformat())
    return tmp_path / "a" / "gateway.toml", var


def test_retention_show_reports_each_area_against_its_limits(tmp_path: Path) -> None:
    """`retention show` marks the outbox (alarm only) and quarantine (purge) as over."""
    config, _ = retention_site(tmp_path)
    report = json.loads(run("retention", "show", "--config", config, "--json").stdout)
    areas = {a["area"]: a for a in report["areas"]}
    assert report["level"] == "over"
    assert (areas["outbox"]["level"], areas["outbox"]["past_limit_action"]) == ("over", "alarm")
    assert areas["outbox"]["oldest_age_s"] >= 20 * 86400
    assert areas["outbox"]["max_age_s"] == 14 * 86400
    assert areas["outbox"]["max_bytes"] == 10 * 1024**3
    assert (areas["quarantine"]["level"], areas["quarantine"]["past_limit"]) == ("over", 1)
    assert (areas["done"]["count"], areas["done"]["level"]) == (1, "ok")
    assert (areas["spool"]["count"], areas["spool"]["oldest_age_s"]) == (0, None)
    table = run("retention", "show", "--config", config).stdout
    assert "OVER" in table
    assert "alarm only" in table
    assert "20.0d" in table
    assert "overall: over" in table


def test_retention_purge_dry_run_then_purge(tmp_path: Path) -> None:
    """`--dry-run` lists the old quarantined transfer and keeps it; `purge` deletes it and
    keeps the outbox entry (purge_outbox is off)."""
    config, var = retention_site(tmp_path)
    listed = json.loads(run("retention", "purge", "--config", config, "--dry-run", "--json").stdout)
    assert [(r["area"], r["id"], r["site"]) for r in listed] == [
        ("quarantine", "0b" * 16, "hosp-b")
    ]
    assert (var / "quarantine" / "hosp-b" / ("0b" * 16) / "instance.dcm").exists()
    result = run("retention", "purge", "--config", config)
    assert "purged 1 item(s)" in result.stdout
    assert "purge_outbox = false" in result.stdout
    assert not (var / "quarantine" / "hosp-b" / ("0b" * 16)).exists()
    assert (var / "outbox" / f"{'0a' * 16}.sealed").exists()
    assert json.loads(run("retention", "purge", "--config", config, "--json").stdout) == []


def test_retention_config_error_names_file_field_and_fix(tmp_path: Path) -> None:
    """Done markers kept shorter than outbox entries: exit 2 with file, field and fix."""
    config, _ = retention_site(tmp_path)
    config.write_text(
        config.read_text().replace("done_max_age_days = 90", "done_max_age_days = 10")
    )
    result = run("retention", "show", "--config", config, ok=False)
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "retention:" in result.stderr
    assert "done_max_age_days" in result.stderr
    assert "Fix:" in result.stderr
    assert "Traceback" not in result.stderr
