"""The gateway's side of the event-stream format (sans-io): events, ``retry:`` and comments.

The enclave parses what this writes with :class:`trio_sign.sse.EventStreamParser`; the format is
the WHATWG ``text/event-stream`` one. Every field is one line: event data is compact JSON, which
never contains a raw line break (``json.dumps`` escapes them; ``ensure_ascii`` also escapes
U+2028/U+2029 and everything else outside ASCII), so one ``data:`` line is always enough.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

#: An idle stream gets this comment; the enclave counts any bytes as liveness.
KEEPALIVE_COMMENT: Final = b": keepalive\n\n"

_FORBIDDEN: Final = frozenset("\r\n\x00")


def _check_field(what: str, value: str) -> None:
    if _FORBIDDEN.intersection(value):
        raise ValueError(f"an SSE {what} must not contain CR, LF or NUL: {value[:40]!r}")


def format_event(
    event: str,
    data: Mapping[str, Any],
    id: str | None = None,
    retry_ms: int | None = None,
) -> bytes:
    """One event: ``id:`` (if given), ``event:``, ``retry:`` (if given), one ``data:`` line.

    Args:
        event: the event type; not empty (an empty ``event:`` means ``message``).
        data: a JSON object; compact, ASCII-only JSON, so it is always a single line.
        id: the event id (becomes the client's ``Last-Event-ID``); ``""`` resets it, which the
            gateway never wants, so it is refused too.
        retry_ms: the reconnection time to set, in milliseconds (a non-negative integer).

    Error handling: ``ValueError`` for a CR, LF or NUL in ``event`` or ``id``, an empty ``event``
    or ``id``, a negative ``retry_ms`` or data that is not JSON-serialisable (NaN included);
    ``TypeError`` if ``data`` is not a mapping. These are bugs in the caller, not input errors.
    """
    if not event:
        raise ValueError("an SSE event type must not be empty")
    _check_field("event type", event)
    if not isinstance(data, Mapping):
        raise TypeError(f"SSE event data must be a JSON object, not {type(data).__name__}")
    lines: list[str] = []
    if id is not None:
        if not id:
            raise ValueError("an SSE event id must not be empty (it would reset Last-Event-ID)")
        _check_field("event id", id)
        lines.append(f"id: {id}")
    lines.append(f"event: {event}")
    if retry_ms is not None:
        lines.append(_retry_line(retry_ms))
    payload = json.dumps(dict(data), separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    lines.append(f"data: {payload}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def format_id(id: str) -> bytes:
    """A block with only ``id:``: it sets the client's last event ID without dispatching an
    event (WHATWG "dispatch the event" step 1), so that a reconnect resumes from there."""
    if not id:
        raise ValueError("an SSE event id must not be empty (it would reset Last-Event-ID)")
    _check_field("event id", id)
    return f"id: {id}\n\n".encode()


def format_retry(retry_ms: int) -> bytes:
    """A block that only sets the reconnection time (dispatches no event)."""
    return (_retry_line(retry_ms) + "\n\n").encode("ascii")


def format_comment(text: str = "") -> bytes:
    """A comment block (``: text``); clients ignore it but it proves the stream is alive."""
    _check_field("comment", text)
    return f": {text}\n\n".encode() if text else b":\n\n"


def _retry_line(retry_ms: int) -> str:
    if isinstance(retry_ms, bool) or not isinstance(retry_ms, int) or retry_ms < 0:
        raise ValueError(f"retry must be a non-negative integer of milliseconds, not {retry_ms!r}")
    return f"retry: {retry_ms}"
