"""JSON-lines logging for every long-running command.

One object per line: ``ts`` (RFC 3339, UTC, ms), ``level``, ``logger``, ``msg`` and any
``extra={...}`` fields. Loggers are ``trio_sign.<area>``; callers log sizes and ids, never key
material (see STYLE.md). The formatter is the last line of defence, not the first: it drops
extra fields whose names suggest secrets.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

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


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            if any(word in key.lower() for word in _SECRET_WORDS):
                out[key] = "<redacted>"
                continue
            out[key] = (
                value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
            )
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send ``trio_sign.*`` logs as JSON lines to ``stream`` (default stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("trio_sign")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
