"""How a running gateway logs: JSON lines off a terminal, one readable line on one.

Log calls pass UIDs, sizes and statuses as ``extra`` fields, never PHI; both formats
print every extra field.

JSON (one object per line, for a log collector): ``time`` (ISO 8601, UTC, milliseconds),
``level``, ``logger``, ``message``, then the record's ``extra`` fields (an extra field
named like one of those four gets an ``extra_`` prefix); an exception adds ``exc_type``
(its qualified name) and ``traceback`` (the formatted traceback as one string)::

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "dicombridge.gateway",
     "message": "gateway serving DICOM", "site": "hosp-a", "port": 11112}

Text (for a person at a terminal)::

    2025-01-31T12:00:00.123Z INFO dicombridge.gateway: gateway serving DICOM site=hosp-a port=11112

``auto`` picks text when the stream is a terminal and JSON otherwise. The choice comes
from ``configure``'s argument (``dicombridge gateway run --log-format``), else from the
environment variable ``DICOMBRIDGE_LOG_FORMAT``, else ``auto``.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from dicombridge.errors import ConfigError

LOG_FORMAT_ENV: Final = "DICOMBRIDGE_LOG_FORMAT"
# The name of the handler ``configure`` installs on the root logger.
HANDLER_NAME: Final = "dicombridge"
# pynetdicom logs every PDU at INFO (and identifiers at DEBUG): its warnings and errors only.
PYNETDICOM_LEVEL: Final = logging.WARNING


class LogFormat(enum.StrEnum):
    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_RECORD_FIELDS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_BASE_KEYS: Final = ("time", "level", "logger", "message")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed as ``extra``."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


def utc_timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``: ``2025-01-31T12:00:00.123Z``."""
    when = datetime.fromtimestamp(created, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _jsonable(value: Any) -> Any:
    """What ``json.dumps`` cannot write itself: times, paths, sets, enums, bytes."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Path):
        return str(value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            document[f"extra_{key}" if key in _BASE_KEYS else key] = value
        if record.exc_info and record.exc_info[0] is not None:
            exc_type = record.exc_info[0]
            document["exc_type"] = f"{exc_type.__module__}.{exc_type.__qualname__}".removeprefix(
                "builtins."
            )
            document["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=_jsonable, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = f"{utc_timestamp(record.created)} {super().format(record)}"
        fields = extra_fields(record)
        if fields:
            head, newline, rest = line.partition("\n")  # keep fields on the message's line
            tail = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
            line = f"{head} {tail}{newline}{rest}"
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c == '"' for c in text) else text


def resolve(log_format: LogFormat | str | None, stream: TextIO) -> LogFormat:
    """The format to use on ``stream``: the argument, else ``$DICOMBRIDGE_LOG_FORMAT``,
    else auto; auto is text on a terminal and JSON otherwise."""
    source = "--log-format"
    if log_format is None:
        log_format = os.environ.get(LOG_FORMAT_ENV) or LogFormat.AUTO
        source = LOG_FORMAT_ENV
    try:
        chosen = LogFormat(str(log_format).strip().lower())
    except ValueError:
        raise ConfigError(
            "(environment)" if source == LOG_FORMAT_ENV else "(command line)",
            source,
            f"{log_format!r} is not a log format",
            "use auto, json or text",
        ) from None
    if chosen is LogFormat.AUTO:
        return LogFormat.TEXT if _is_terminal(stream) else LogFormat.JSON
    return chosen


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of a resolved format (json or text)."""
    return TextFormatter() if log_format is LogFormat.TEXT else JsonFormatter()


def configure(
    log_format: LogFormat | str | None = None,
    *,
    stream: TextIO | None = None,
    level: int = logging.INFO,
) -> LogFormat:
    """Send every record of ``level`` and above to ``stream`` (stderr) in one format;
    return the format chosen.

    For a process's entry point. The root logger's handlers that write to the same
    stream (``logging.basicConfig``'s) or that an earlier call installed are replaced,
    so that no record is written twice; others (to files, say) stay. pynetdicom's
    logger is kept at WARNING.
    """
    stream = sys.stderr if stream is None else stream
    chosen = resolve(log_format, stream)
    handler = logging.StreamHandler(stream)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter(chosen))
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME or getattr(old, "stream", None) is stream:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(PYNETDICOM_LEVEL)
    return chosen
