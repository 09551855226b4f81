"""Structured logs: JSON lines off a terminal, one readable line on one, and the override
(`gateway run --log-format`, DICOMBRIDGE_LOG_FORMAT); in process and from a gateway."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from dicombridge import config as site_config
from dicombridge import identity, logs
from dicombridge.errors import ConfigError
from dicombridge.keys import SiteKeys
from dicombridge.operator import OperatorWorkspace
from dicombridge.orthanc import free_port
from tests.pacskit import wait_for

ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SERVING = "gateway serving DICOM"


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts without DICOMBRIDGE_LOG_FORMAT; what configure() changed on the
    root logger is undone (pytest's own handlers write elsewhere and stay)."""
    monkeypatch.delenv(logs.LOG_FORMAT_ENV, raising=False)
    root = logging.getLogger()
    level = root.level
    pynetdicom_level = logging.getLogger("pynetdicom").level
    yield
    for handler in list(root.handlers):
        if handler.get_name() == logs.HANDLER_NAME:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- in process -------------------------------------------------------------------------


def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    """Off a terminal each record is one JSON object: UTC ms time, level, logger,
    message and every extra field with its type kept."""
    stream = io.StringIO()
    assert logs.configure(stream=stream) is logs.LogFormat.JSON
    logging.getLogger("dicombridge.test").warning(
        "transfer stored", extra={"transfer_id": "ab12", "size_bytes": 4096, "path": Path("/x")}
    )
    (line,) = _lines(stream)
    record = json.loads(line)
    assert ISO_UTC_MS.match(record["time"]), record["time"]
    assert record["level"] == "WARNING"
    assert record["logger"] == "dicombridge.test"
    assert record["message"] == "transfer stored"
    assert record["transfer_id"] == "ab12"
    assert record["size_bytes"] == 4096
    assert record["path"] == "/x"


def test_json_exception_is_exc_type_and_a_traceback_string_on_one_line() -> None:
    """A logged exception adds exc_type and the traceback as one string; the record
    stays one line."""
    stream = io.StringIO()
    logs.configure("json", stream=stream)
    try:
        raise ConfigError("gateway.toml", "site.id", "bad\nvalue", "fix it")
    except ConfigError:
        logging.getLogger("dicombridge.test").exception("load failed", extra={"step": 2})
    (line,) = _lines(stream)
    record = json.loads(line)
    assert record["exc_type"] == "dicombridge.errors.ConfigError"
    assert "Traceback (most recent call last)" in record["traceback"]
    assert "bad\nvalue" in record["traceback"]
    assert record["step"] == 2


def test_an_extra_field_never_replaces_the_base_keys() -> None:
    """An extra field named like a base key keeps it under an extra_ prefix."""
    stream = io.StringIO()
    logs.configure("json", stream=stream)
    logging.getLogger("dicombridge.test").info("hello", extra={"level": "mine", "time": 3})
    record = json.loads(_lines(stream)[0])
    assert record["level"] == "INFO"
    assert ISO_UTC_MS.match(record["time"])
    assert record["extra_level"] == "mine"
    assert record["extra_time"] == 3


def test_auto_on_a_terminal_is_one_readable_line_with_the_fields() -> None:
    """On a terminal: time, level, logger: message, then key=value (quoted if spaced)."""
    stream = _Terminal()
    assert logs.configure(stream=stream) is logs.LogFormat.TEXT
    logging.getLogger("dicombridge.test").info(
        "receipt sent", extra={"transfer_id": "ab12", "error": "two words"}
    )
    (line,) = _lines(stream)
    stamp, rest = line.split(" ", 1)
    assert ISO_UTC_MS.match(stamp)
    assert rest == 'INFO dicombridge.test: receipt sent transfer_id=ab12 error="two words"'


def test_text_keeps_fields_on_the_first_line_before_a_traceback() -> None:
    """A text record with an exception: fields stay on the message line, the traceback
    follows."""
    stream = io.StringIO()
    logs.configure("text", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("dicombridge.test").exception("failed", extra={"transfer_id": "cd"})
    lines = _lines(stream)
    assert lines[0].endswith("ERROR dicombridge.test: failed transfer_id=cd")
    assert lines[-1] == "ValueError: boom"


def test_environment_overrides_auto_and_the_argument_overrides_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DICOMBRIDGE_LOG_FORMAT=text gives text off a terminal; an explicit json wins."""
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "text")
    stream = io.StringIO()
    assert logs.configure(stream=stream) is logs.LogFormat.TEXT
    logging.getLogger("dicombridge.test").info("one")
    assert _lines(stream)[0].endswith("INFO dicombridge.test: one")
    stream = _Terminal()
    assert logs.configure("json", stream=stream) is logs.LogFormat.JSON
    logging.getLogger("dicombridge.test").info("two")
    assert json.loads(_lines(stream)[0])["message"] == "two"


def test_an_unknown_format_names_where_it_came_from_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad --log-format or DICOMBRIDGE_LOG_FORMAT is a ConfigError naming it and the fix."""
    with pytest.raises(ConfigError, match=r"--log-format: 'xml' is not a log format\. Fix: use"):
        logs.configure("xml", stream=io.StringIO())
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "yaml")
    with pytest.raises(ConfigError, match=r"DICOMBRIDGE_LOG_FORMAT: 'yaml'"):
        logs.configure(stream=io.StringIO())


def test_configure_replaces_handlers_on_its_stream_and_keeps_the_others() -> None:
    """A second configure, or a handler already writing to the stream, leaves one handler
    there (no record twice); a handler writing elsewhere still gets records."""
    stream, elsewhere = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    plain = logging.StreamHandler(stream)  # as logging.basicConfig leaves it
    other = logging.StreamHandler(elsewhere)
    root.addHandler(plain)
    root.addHandler(other)
    try:
        logs.configure("text", stream=stream)
        logs.configure("json", stream=stream)
        logging.getLogger("dicombridge.test").info("once")
        assert plain not in root.handlers
        assert other in root.handlers
    finally:
        root.removeHandler(plain)
        root.removeHandler(other)
    (line,) = _lines(stream)
    assert json.loads(line)["message"] == "once"
    assert _lines(elsewhere) == ["once"]


def test_pynetdicom_info_is_dropped_and_its_warnings_kept() -> None:
    """pynetdicom's logger stays at WARNING (it logs every PDU at INFO)."""
    stream = io.StringIO()
    logs.configure("json", stream=stream)
    logging.getLogger("pynetdicom.dul").info("PDU received")
    logging.getLogger("pynetdicom.assoc").warning("association aborted")
    assert [json.loads(line)["message"] for line in _lines(stream)] == ["association aborted"]


# --- a gateway process --------------------------------------------------------------------


def _site(root: Path) -> Path:
    """A site the gateway loads: its own operator, a signed directory, a broker nobody
    listens on (the gateway serves DICOM and logs its retries), no monitoring port."""
    workspace = OperatorWorkspace.init(root / "operator", federation="logs")
    config_path = identity.init_site(
        root / "site",
        site_id="hosp-a",
        broker_url=f"amqp://hosp-a@127.0.0.1:{free_port()}/logs",
        operator_key=workspace.public_key_b64(),
    )
    export = root / "hosp-a.json"
    entry = identity.export_public(
        site_config.load(config_path), SiteKeys.load(root / "site" / "keys")
    )
    export.write_text(identity.export_json(entry))
    workspace.add_site(export)
    workspace.sign()
    shutil.copy(workspace.root / "directory.json", root / "site" / "directory.json")
    password = root / "site" / "secrets" / "broker-password"
    password.write_text("unused\n")
    password.chmod(0o600)
    text = config_path.read_text()
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"', 1)
    text = text.replace("port = 11112", f"port = {free_port()}", 1)
    config_path.write_text(text + "\n[monitoring]\nenabled = false\n")
    site_config.load(config_path)
    return config_path


def _gateway(
    config: Path,
    *args: str,
    output: int | IO[bytes],
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`dicombridge gateway run` with stdout and stderr to ``output``."""
    return subprocess.Popen(
        [sys.executable, "-m", "dicombridge", "gateway", "run", "--config", str(config), *args],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        env={**os.environ, **(env or {})},
    )


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


def _run_until_serving(
    config: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> str:
    """Run the gateway with stderr to ``log`` (a file: no terminal) until it serves."""
    with log.open("wb") as handle:
        process = _gateway(config, *args, output=handle, env=env)
    try:
        wait_for(
            lambda: SERVING in log.read_text() or process.poll() is not None,
            timeout_s=30,
            what="the gateway to serve DICOM",
        )
    finally:
        code = _stop(process)
    text = log.read_text()
    assert SERVING in text, text
    assert code == 0, text
    return text


@pytest.fixture(scope="module")
def site_config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site for the gateway runs of this module."""
    return _site(tmp_path_factory.mktemp("logs-site"))


def test_gateway_logs_json_lines_to_a_file(site_config_path: Path, tmp_path: Path) -> None:
    """A gateway whose stderr is not a terminal writes only JSON lines, with the extra
    fields of its records (site and port of 'gateway serving DICOM')."""
    text = _run_until_serving(site_config_path, tmp_path / "gateway.log")
    records = [json.loads(line) for line in text.splitlines()]
    serving = next(r for r in records if r["message"] == SERVING)
    assert serving["logger"] == "dicombridge.gateway"
    assert serving["site"] == "hosp-a"
    assert serving["port"] == site_config.load(site_config_path).gateway.port
    assert {r["level"] for r in records} <= {"INFO", "WARNING", "ERROR"}
    assert not [r for r in records if r["logger"].startswith("pynetdicom") and r["level"] == "INFO"]


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--log-format", "text"), {}), ((), {logs.LOG_FORMAT_ENV: "text"})],
    ids=["option", "environment"],
)
def test_gateway_log_format_text_by_option_or_environment(
    site_config_path: Path, tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    """`--log-format text` or DICOMBRIDGE_LOG_FORMAT=text: readable lines to a file."""
    text = _run_until_serving(site_config_path, tmp_path / "gateway.log", *args, env=env)
    (line,) = [line for line in text.splitlines() if SERVING in line]
    assert re.match(rf"^\S+Z INFO dicombridge\.gateway: {SERVING} site=hosp-a port=\d+$", line), (
        line
    )
    assert not text.lstrip().startswith("{")


def test_gateway_bad_log_format_exits_2_naming_the_option(site_config_path: Path) -> None:
    """`--log-format xml` stops the gateway before it starts, with one line and exit 2."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicombridge",
            "gateway",
            "run",
            "-c",
            str(site_config_path),
            "--log-format",
            "xml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--log-format: 'xml' is not a log format" in result.stderr
    assert SERVING not in result.stderr


def test_gateway_on_a_terminal_logs_readable_lines(site_config_path: Path) -> None:
    """With stderr on a pseudo-terminal and no override, the gateway logs text."""
    master, slave = pty.openpty()
    try:
        process = _gateway(site_config_path, output=slave)
    finally:
        os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while SERVING.encode() not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
    finally:
        _stop(process)
        os.close(master)
    text = seen.decode(errors="replace")
    (line,) = [line for line in text.splitlines() if SERVING in line]
    assert re.search(rf"Z INFO dicombridge\.gateway: {SERVING} site=hosp-a port=\d+", line), text
    assert '{"time"' not in text
