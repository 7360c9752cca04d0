"""Logging for every long-running command: JSON lines for machines, text lines for people.

JSON (``--log-format json``; the default when stderr is not a terminal): one object per line,
``ts`` (RFC 3339, UTC, ms), ``level``, ``logger``, ``msg`` and any ``extra={...}`` fields. The
parent's log forwarding, CloudWatch and the tests read this format: it does not change.

Text (``--log-format text``; the default on a terminal): one line per record, the same
timestamp, the level, the logger, the message, then the extra fields as ``key=value``.

Loggers are ``trio_sign.<area>``; callers log sizes and ids, never key material (see
STYLE.md). Both formatters are the last line of defence, not the first: they redact extra
fields whose names suggest secrets. Records are written around a progress line on the same
terminal (:func:`trio_sign._progress.progress_paused`), never into it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from ._progress import progress_paused

#: The values of ``--log-format``.
LOG_FORMATS = ("text", "json")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = (
    "secret",
    "signing_share",
    "nonce",
    "data_key",
    "plaintext",
    "private",
    "key_material",
)
_REDACTED = "<redacted>"


def _timestamp(record: logging.LogRecord) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{ts}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's ``extra`` fields, secret-named ones redacted, values made JSON-safe."""
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if any(word in key.lower() for word in _SECRET_WORDS):
            out[key] = _REDACTED
            continue
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out


def _error(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        return f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
    return None


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        error = _error(record)
        if error is not None:
            out["error"] = error
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def _text_value(value: Any) -> str:
    """A ``key=value`` value: bare when it is one plain word, JSON-quoted otherwise."""
    text = value if isinstance(value, str) else json.dumps(value)
    if text and not any(ch.isspace() or ch in '"=\\' or not ch.isprintable() for ch in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class TextFormatter(logging.Formatter):
    """Format records as one line a person can read: time, level, logger, message, extras.

    ``2026-12-03T08:04:40.660Z INFO    trio_sign.parent.ingress ingress listening
    listen=unix:///run/ingress.sock``. Line breaks in a message are escaped, so one record is
    always one line; the extras are redacted exactly as :class:`JsonFormatter` redacts them.
    """

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record),
            f"{record.levelname:<7}",
            record.name,
            _one_line(record.getMessage()),
        ]
        fields = _extras(record)
        error = _error(record)
        if error is not None:
            fields["error"] = error
        parts += [f"{key}={_text_value(value)}" for key, value in fields.items()]
        return " ".join(parts)


class _TerminalSafeHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes each record beside the progress line, never into it."""

    def emit(self, record: logging.LogRecord) -> None:
        with progress_paused(self.stream):
            super().emit(record)


def default_log_format(stream: TextIO | None = None) -> str:
    """``text`` when ``stream`` (default stderr) is a terminal, ``json`` otherwise."""
    target = stream if stream is not None else sys.stderr
    try:
        return "text" if target.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or stream-like object
        return "json"


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, *, log_format: str = "json"
) -> None:
    """Send ``trio_sign.*`` logs to ``stream`` (default stderr) as JSON lines or text lines
    (``log_format``: one of :data:`LOG_FORMATS`)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
    handler = _TerminalSafeHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(TextFormatter() if log_format == "text" else JsonFormatter())
    root = logging.getLogger("trio_sign")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
