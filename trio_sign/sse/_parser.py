"""Sans-io event-stream parser: the WHATWG HTML "event stream interpretation" rules, bounded.

Bytes in, :class:`MessageEvent` and :class:`RetryChanged` out; no ``await``, no sockets. One
parser per connection: the client hands the last event ID of the previous connection to the next
parser so that ``Last-Event-ID`` survives reconnects.
"""

from __future__ import annotations

import codecs
import re
from typing import Final

from ._events import MessageEvent, RetryChanged, SseProtocolError

#: Longest line accepted, in characters (code points), line terminator excluded.
DEFAULT_MAX_LINE_LENGTH: Final = 64 * 1024
#: Largest data buffer of one event, in characters, the ``"\n"`` between data lines included.
DEFAULT_MAX_EVENT_SIZE: Final = 256 * 1024
#: ``retry:`` values above this (in ms) are reported as this; nobody means 30 years.
MAX_RETRY_MS: Final = 10**12

_LINE_END: Final = re.compile(r"\r\n?|\n")
_BOM: Final = "\ufeff"


class EventStreamParser:
    """Parse a ``text/event-stream`` body.

    Args:
        last_event_id: the last event ID carried over from the previous connection (both the
            stream's last event ID and its last event ID buffer start with it; see the module
            docs of :mod:`trio_sign.sse` for why).
        max_line_length: longest line in characters; longer raises :class:`SseProtocolError`.
        max_event_size: largest data buffer of one event in characters; larger raises.

    Error handling: after :class:`SseProtocolError` the parser is dead (every later call raises)
    and :attr:`last_event_id` is rolled back to its value before the failing call, so no event
    completed in that call is skipped: reconnecting with that ID asks the server to send those
    events again (at-least-once delivery).
    """

    def __init__(
        self,
        *,
        last_event_id: str = "",
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
    ) -> None:
        if "\0" in last_event_id:
            raise ValueError("last_event_id must not contain NUL")
        self._max_line_length = max_line_length
        self._max_event_size = max_event_size
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bom_checked = False
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF ends no line
        self._line_parts: list[str] = []
        self._line_length = 0
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._id_buffer = last_event_id
        self._last_event_id = last_event_id
        self._failed = False

    @property
    def last_event_id(self) -> str:
        """The last event ID string: what to send as ``Last-Event-ID`` on reconnect."""
        return self._last_event_id

    def receive_data(self, data: bytes) -> list[MessageEvent | RetryChanged]:
        """Feed the next bytes of the body; return the events they complete, in order.

        Raises:
            SseProtocolError: a line or event over its limit (or the parser already failed).
        """
        if self._failed:
            raise SseProtocolError("the event stream already failed; reconnect")
        text = self._decoder.decode(data)
        if not text:
            return []
        if not self._bom_checked:
            self._bom_checked = True
            if text[0] == _BOM:
                text = text[1:]
                if not text:
                    return []
        events: list[MessageEvent | RetryChanged] = []
        before = self._last_event_id
        try:
            self._feed(text, events)
        except SseProtocolError:
            self._failed = True
            self._last_event_id = before
            raise
        return events

    # -- internals -------------------------------------------------------------------------

    def _feed(self, text: str, events: list[MessageEvent | RetryChanged]) -> None:
        pos = 0
        end = len(text)
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                pos = 1
        while pos < end:
            match = _LINE_END.search(text, pos)
            if match is None:
                self._append(text[pos:])
                return
            self._append(text[pos : match.start()])
            line = "".join(self._line_parts)
            self._line_parts.clear()
            self._line_length = 0
            if match.end() == end and match.group() == "\r":
                self._skip_lf = True
            pos = match.end()
            self._process_line(line, events)

    def _append(self, piece: str) -> None:
        if not piece:
            return
        self._line_parts.append(piece)
        self._line_length += len(piece)
        if self._line_length > self._max_line_length:
            raise SseProtocolError(
                f"event stream line longer than {self._max_line_length} characters"
                " (max_line_length)"
            )

    def _process_line(self, line: str, events: list[MessageEvent | RetryChanged]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return  # comment
        colon = line.find(":")
        if colon == -1:
            field, value = line, ""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value.startswith(" "):
                value = value[1:]
        if field == "event":
            self._event_type = value
        elif field == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max_event_size:
                raise SseProtocolError(
                    f"event stream event larger than {self._max_event_size} characters"
                    " (max_event_size)"
                )
        elif field == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif field == "retry" and value and value.isascii() and value.isdigit():
            digits = value.lstrip("0") or "0"
            ms = MAX_RETRY_MS if len(digits) > 13 else min(int(digits), MAX_RETRY_MS)
            events.append(RetryChanged(ms))
        # any other field is ignored

    def _dispatch(self, events: list[MessageEvent | RetryChanged]) -> None:
        self._last_event_id = self._id_buffer
        if self._data:
            # Joining with "\n" is the spec's "append data and LF, remove the last LF".
            events.append(
                MessageEvent(self._event_type or "message", "\n".join(self._data), self._id_buffer)
            )
        self._data.clear()
        self._data_size = 0
        self._event_type = ""
